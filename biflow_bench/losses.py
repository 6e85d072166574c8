"""Training objectives: maximum likelihood for F (stage 1) and the inverse-learning objectives for G (stage 2).

Stage 2 (BiFlow sec. 3), with F frozen and x~ = x + sigma * eps the noisy input F was trained on:

    x_0 = x~, x_1, ..., x_B = z = F(x~)              the forward trajectory
    targets = x_{B-1}, ..., x_0 (, x)                one per stage of G; learned denoising adds the clean x
    loss    = D_out(x', target_out) + lambda * sum_k D(norm(target_k), norm(phi_k(h_k)))

D_out is MSE plus, per `metric`, perceptual terms with adaptive re-weighting D / sg((D + eps)^p) (sec. 3.4);
`norm` is norm control's per-sample RMS normalisation of G's states (sec. 3.3). Training-time CFG replaces each
target t_k by (1 + w) t_k - w sg(u_k), u_k being G's own unconditional prediction (sec. 3.4).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import add_noise, drop_labels
from .models.biflow import BiFlow
from .models.tarflow import TARFlow
from .perceptual import adaptive_weight, build_perceptual


def nll_loss(flow: TARFlow, x: Tensor, y: Tensor | None) -> Tensor:
    """Stage 1: negative log-likelihood per dimension in nats (TARFlow eq. 6)."""
    return -flow.log_prob(x, y).mean() / flow.config.num_dims


def rms_normalize(t: Tensor, eps: float = 1e-6) -> Tensor:
    return t * torch.rsqrt(t.flatten(1).pow(2).mean(1) + eps).view(-1, *[1] * (t.dim() - 1))


def build_perceptual_terms(metric: str, weights: str, size: int = 32) -> nn.ModuleDict:
    """'mse+lpips+convnext' -> {'lpips': ..., 'convnext': ...}; MSE needs no network."""
    names = [n for n in metric.split("+") if n != "mse"]
    return nn.ModuleDict({n: build_perceptual(n, weights=weights, size=size) for n in names})


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
    *,
    sigma: float,
    label_drop: float,
    cfg_max: float,
    hidden_weight: float,
    adaptive_p: float,
    perceptual: Mapping[str, nn.Module],
    perceptual_batch: int = 32,
    generator: torch.Generator,
) -> tuple[Tensor, dict[str, float]]:
    cfg = g.config
    z, targets = stage2_targets(flow, x, y, sigma, cfg.denoise, generator)
    b = x.shape[0]
    y_g, w = y, None
    if cfg.cfg_mode != "none" and y is not None:
        y_g = drop_labels(y, label_drop, g.null_class, generator)
        drop = y_g == g.null_class
        if cfg.cfg_mode == "training-time":
            w = torch.rand(b, generator=generator, device=x.device) * cfg_max
            w = torch.where(drop, torch.zeros_like(w), w)
    out = g(z, y_g, w)
    preds = out.states + [out.x]
    supervised = targets[-len(preds) :]  # naive: the output only
    if w is not None:  # training-time CFG: extrapolate the targets away from G's unconditional prediction
        with torch.no_grad():
            unc = g(z, None, torch.zeros_like(w))
        wk = w.view(b, 1, 1, 1)
        supervised = [(1 + wk) * t - wk * u for t, u in zip(supervised, unc.states + [unc.x], strict=True)]
    terms: dict[str, Tensor] = {}  # what the optimiser sees
    shown: dict[str, Tensor] = {}  # raw distances for the progress bar (adaptive weighting makes its terms ~1)
    if len(preds) > 1:
        hidden = [
            F.mse_loss(rms_normalize(p), rms_normalize(t)) if cfg.normalize_hidden else F.mse_loss(p, t)
            for p, t in zip(preds[:-1], supervised[:-1], strict=True)
        ]
        terms["hidden"] = shown["hidden"] = hidden_weight * torch.stack(hidden).sum()
    terms["mse"] = shown["mse"] = F.mse_loss(out.x, supervised[-1])
    for name, net in perceptual.items():
        d = net(out.x[:perceptual_batch], supervised[-1][:perceptual_batch])
        terms[name], shown[name] = adaptive_weight(d, p=adaptive_p).mean(), d.mean()
    loss = torch.stack(list(terms.values())).sum()
    return loss, {k: float(v.detach()) for k, v in shown.items()}
