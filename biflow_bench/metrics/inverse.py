"""How well G has learned F's inverse (BiFlow sec. 3): distances to F's trajectory on held-out pairs, and whether G's
output varies with its noise as much as F's exact inverse does (the measurements of the G study, reports/small).
Inputs are drawn on the CPU and moved to the models' device: the same numbers on any device, up to float rounding."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import add_noise
from ..models.biflow import BiFlow
from ..models.tarflow import TARFlow
from ..speed.timing import time_calls
from ..training.losses import rms_normalize


@torch.no_grad()
def inverse_gaps(flow: TARFlow, g: BiFlow, x: Tensor, y: Tensor | None, sigma: float, seed: int = 0) -> dict:
    """G against F's inverse on held-out pairs (x~ = x + sigma * eps, z = F(x~)), unguided, per value:
    'output': mean (G(z) - target)^2, the target being the clean x when G denoises itself (denoise 'learned'), else
    x~ (what G was trained to return, sec. 3.2); 'states': each supervised intermediate state against its forward
    state x_{B-1}, x_{B-2}, ..., compared as trained (both sides RMS-normalised under norm control, sec. 3.3)."""
    device = _device(flow)  # F and G share one
    noisy = add_noise(x.cpu(), sigma, torch.Generator().manual_seed(seed)).to(device)
    x, y = x.to(device), y.to(device) if y is not None else None
    trajectory = flow(noisy, y).trajectory
    out = g(trajectory[-1], y, 0.0, with_states=True)
    target = x if g.config.denoise == "learned" else noisy
    norm = rms_normalize if g.config.normalize_hidden else (lambda t: t)
    states = [float((norm(s) - norm(t)).double().pow(2).mean()) for s, t in zip(out.states, trajectory[::-1][1:])]
    return {"output": float((out.x - target).double().pow(2).mean()), "states": states}


def noise_sensitivity(g_images: Tensor, inverse_images: Tensor) -> float:
    """(K, M, ...) images of K labels x M noises, by G and by F's exact inverse from the same noises: the per-pixel
    standard deviation over the M noises, averaged over pixels and labels, of G's over the inverse's. 1: G varies
    with its noise as much as the inverse does; 0: G ignores it."""
    spread = lambda t: t.double().std(dim=1).mean()  # noqa: E731
    return float(spread(g_images) / spread(inverse_images))


@torch.no_grad()
def measure_noise_sensitivity(flow: TARFlow, g: BiFlow, num_classes: int, per_label: int = 32,
                              seed: int = 0, max_labels: int = 10) -> float:
    """`noise_sensitivity` of G and F's serial exact inverse, unguided, for per_label noises of each label (one
    unconditional set without labels); beyond max_labels classes (ImageNet's 1,000), max_labels evenly spaced ones.
    F's inverse returns x~, whose training noise adds sigma^2 to each pixel's variance: negligible beside the spread
    between images."""
    labels = sensitivity_labels(num_classes, max_labels)
    k = len(labels) if labels is not None else 1
    c = g.config
    z = torch.randn(k * per_label, c.in_channels, c.image_size, c.image_size,
                    generator=torch.Generator().manual_seed(seed)).to(_device(flow))
    y = labels.repeat_interleave(per_label).to(z.device) if labels is not None else None
    shape = (k, per_label, *z.shape[1:])
    return noise_sensitivity(g(z, y, 0.0, with_states=False).x.reshape(shape), flow.reverse(z, y).reshape(shape))


def sensitivity_labels(num_classes: int, max_labels: int) -> Tensor | None:
    """Every class up to max_labels, else max_labels evenly spaced ones (0, C / K, 2C / K, ...); None unconditional."""
    if not num_classes:
        return None
    k = min(num_classes, max_labels)
    return torch.arange(k) * num_classes // k


@torch.no_grad()
def ms_per_image_batch1(g: BiFlow, repeats: int = 20) -> float:
    """G's one pass at batch 1, eager, median over `repeats` after two warm-up passes (ms)."""
    c, device = g.config, _device(g)
    z = torch.randn(1, c.in_channels, c.image_size, c.image_size, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if c.num_classes else None
    times = sorted(time_calls(lambda: g.sample(z, y), device, repeats, warmup=2))
    return 1000 * times[len(times) // 2]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
