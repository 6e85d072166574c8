"""Training objectives: maximum likelihood for F (stage 1) and the inverse-learning objectives for G (stage 2).

Stage 2 (BiFlow sec. 3), with F frozen and x~ = x + sigma * eps the noisy input F was trained on:

    x_0 = x~, x_1, ..., x_B = z = F(x~)              the forward trajectory
    targets = x_{B-1}, ..., x_0 (, x)                one per stage of G; learned denoising adds the clean x (sec. 3.2)
    supervised: the output only (naive), or every stage (hidden distillation / alignment, eq. 2)

Every term is a per-sample distance D, adaptively re-weighted D / sg((D + c)^p) (eq. 7) and averaged over the batch:
the output term, each supervised hidden state (norm control normalises both sides first, sec. 3.3) and each
perceptual term (on the output image, VAE-decoded at latent scales, against the real image). D is the squared
distance summed over dimensions (the authors' convention; with p = 1 the scale cancels up to c).

Training-time CFG (eq. 5): G receives w as a condition, and the mix (G_w(h | c) + w G(h | null)) / (1 + w) is what
must match the forward state at each supervised depth; dropped labels train with w = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..config import Stage2Config
from ..data import add_noise, drop_labels
from ..models.biflow import BiFlow
from ..models.tarflow import TARFlow
from .perceptual import build_perceptual


def nll_loss(flow: TARFlow, x: Tensor, y: Tensor | None) -> Tensor:
    """Stage 1: negative log-likelihood per dimension in nats (TARFlow eq. 6)."""
    return -flow.log_prob(x, y).mean() / flow.config.num_dims


def rms_normalize(t: Tensor, eps: float = 1e-6) -> Tensor:
    """Norm control on G's side (sec. 3.3): each sample's state scaled to unit root-mean-square."""
    return t * torch.rsqrt(t.flatten(1).pow(2).mean(1) + eps).view(-1, *[1] * (t.dim() - 1))


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample squared L2 distance, summed over every non-batch dimension: (B, ...) -> (B,)."""
    return (a - b).flatten(1).pow(2).sum(1)


def adaptive_weight(d: Tensor, c: float = 0.01, p: float = 1.0) -> Tensor:
    """Adaptive re-weighting D / sg((D + c)^p) (eq. 7), per sample: every term contributes a gradient of comparable
    scale whatever its magnitude; p = 0 is the plain distance."""
    return d / adaptive_denominator(d, c, p)


def adaptive_denominator(d: Tensor, c: float = 0.01, p: float = 1.0) -> Tensor:
    """Eq. 7's sg((D + c)^p), per sample: what a term's distance is divided by."""
    return (d.detach() + c).pow(p)


def sample_guidance(dropped: Tensor, cfg_max: float, distribution: str, generator: torch.Generator) -> Tensor:
    """Training-time CFG scales w (B,): omega = 1 + w with density ~ 1 / omega on [1, 1 + cfg_max] ("inverse":
    log omega uniform) or w ~ U[0, cfg_max] ("uniform"); w = 0 where the label was dropped."""
    u = torch.rand(dropped.shape, generator=generator, device=dropped.device)
    w = torch.expm1(u * math.log1p(cfg_max)) if distribution == "inverse" else u * cfg_max
    return torch.where(dropped, torch.zeros_like(w), w)


def cfg_mix(guided: Tensor, uncond: Tensor, w: Tensor) -> Tensor:
    """Eq. 5: (G_w(h | c) + w G(h | null)) / (1 + w), per sample; w = 0 gives the guided prediction itself."""
    wk = w.view(-1, *[1] * (guided.dim() - 1))
    return (guided + wk * uncond) / (1 + wk)


def build_perceptual_terms(s2: Stage2Config) -> nn.ModuleDict:
    """'mse+lpips+convnext' -> {'lpips': ..., 'convnext': ...} with the networks the config names; MSE needs none."""
    nets = {"lpips": s2.lpips_net, "convnext": s2.convnext_net}
    names = [n for n in s2.metric.split("+") if n != "mse"]
    return nn.ModuleDict({
        n: build_perceptual(n, nets[n], weights=s2.perceptual_weights, size=s2.perceptual_size,
                            crop_min=s2.perceptual_crop_min)
        for n in names
    })


def perceptual_weight(s2: Stage2Config, term: str) -> float:
    """The weight of perceptual term `term` in G's objective."""
    return {"lpips": s2.lpips_weight, "convnext": s2.convnext_weight}[term]


def stage2_targets(
    flow: TARFlow, x: Tensor, y: Tensor | None, sigma: float, denoise: str, generator: torch.Generator
) -> tuple[Tensor, list[Tensor]]:
    """z = F(x~) and the forward trajectory read backwards, one target per stage of G (the clean x last for
    learned denoising)."""
    noisy = add_noise(x, sigma, generator)
    with torch.no_grad():
        trajectory = flow(noisy, y).trajectory
    targets = trajectory[::-1][1:]
    return trajectory[-1], targets + [x] if denoise == "learned" else targets


def stage2_loss(
    g: BiFlow,
    flow: TARFlow,
    x: Tensor,
    y: Tensor | None,
    s2: Stage2Config,
    *,
    sigma: float,
    perceptual: Mapping[str, nn.Module],
    generator: torch.Generator,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The stage-2 objective of G's strategy (eq. 2 and 7, with eq. 5 for training-time CFG) on fresh pairs of the
    batch: the sum of `inverse_terms` on z = F(x~) and F's trajectory."""
    z, targets = stage2_targets(flow, x, y, sigma, g.config.denoise, generator)
    terms, shown = inverse_terms(g, z, targets, y, s2, perceptual=perceptual, generator=generator, decode=decode)
    return total(terms), shown


def total(terms: Mapping[str, Tensor]) -> Tensor:
    """The objective: the sum of its terms, in their order."""
    return torch.stack(list(terms.values())).sum()


def inverse_terms(
    g: BiFlow,
    z: Tensor,
    targets: list[Tensor],
    y: Tensor | None,
    s2: Stage2Config,
    *,
    perceptual: Mapping[str, nn.Module],
    generator: torch.Generator,
    decode: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """G's loss terms on given pairs, by name ('hidden 1'..'hidden k' from z's side, 'output', then each perceptual
    term), each weight * mean_b D / sg((D + c)^p) (eq. 7), and the raw distances for display: 'mse' (output, per
    dimension), 'hidden' (sum over states of the per-dimension distance) and each perceptual term. `decode` maps
    latents to images for the perceptual terms."""
    cfg = g.config
    y_g, w = y, None
    if cfg.cfg_mode != "none" and y is not None:
        y_g = drop_labels(y, s2.label_drop, g.null_class, generator)
        if cfg.cfg_mode == "training-time":
            w = sample_guidance(y_g == g.null_class, s2.cfg_max, s2.cfg_distribution, generator)
    out = g(z, y_g, w)
    preds = out.states + [out.x]
    supervised = targets[-len(preds):]  # naive: the output only
    if w is not None:  # eq. 5: the mix with G's own unconditional prediction is matched to the forward states
        with torch.set_grad_enabled(s2.cfg_uncond_grad and torch.is_grad_enabled()):
            unc = g(z, None, torch.zeros_like(w))
        preds = [cfg_mix(p, u, w) for p, u in zip(preds, unc.states + [unc.x], strict=True)]

    terms: dict[str, Tensor] = {}
    shown: dict[str, float] = {}
    dims = out.x[0].numel()

    def add(name: str, d: Tensor, weight: float = 1.0) -> None:
        terms[name] = weight * adaptive_weight(d, s2.adaptive_c, s2.adaptive_p).mean()

    if len(preds) > 1:
        norm = rms_normalize if cfg.normalize_hidden else (lambda t: t)
        hidden = [squared_distance(norm(p), norm(t)) for p, t in zip(preds[:-1], supervised[:-1], strict=True)]
        for i, d in enumerate(hidden):
            add(f"hidden {i + 1}", d, s2.hidden_weight)
        shown["hidden"] = float(sum(d.detach().mean() for d in hidden)) / dims
    d_out = squared_distance(preds[-1], supervised[-1])
    add("output", d_out)
    shown["mse"] = float(d_out.detach().mean()) / dims
    if perceptual:  # the prediction (not the eq. 5 mix) against the real image, never an extrapolated target
        n = s2.perceptual_batch
        image, real = out.x[:n], supervised[-1][:n]
        if decode is not None:
            image = decode(image)
            with torch.no_grad():
                real = decode(real)
        for name, net in perceptual.items():
            d = net(image, real, generator)
            add(name, d, perceptual_weight(s2, name))
            shown[name] = float(d.detach().mean())
    return terms, shown
