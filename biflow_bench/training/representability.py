"""Can G represent F's inverse at all? G fitted to a fixed set of pairs (z, F's trajectory from z), the stage-2
objective on those pairs alone: if it cannot drive its output below the training noise sigma^2 there, something in
G (conditioning, state normalisation, output head, patch embedding, how z enters) keeps it from the map, and no
amount of training on fresh pairs would fix that."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import Stage2Config
from ..models.biflow import BiFlow
from ..models.tarflow import TARFlow
from .loop import build_optimizer, lr_at
from .losses import inverse_terms, stage2_targets, total


@dataclass
class FitCurve:
    steps: list[int] = field(default_factory=list)
    output_mse: list[float] = field(default_factory=list)  # per value, G(z) against the output target, every pair
    seconds: float = 0.0


@torch.no_grad()
def pair_mse(g: BiFlow, z: Tensor, target: Tensor, y: Tensor | None) -> float:
    return float((g(z, y, 0.0, with_states=False).x - target).double().pow(2).mean())  # unguided


def fit_fixed_pairs(g: BiFlow, flow: TARFlow, x: Tensor, y: Tensor | None, s2: Stage2Config, *, sigma: float,
                    steps: int, lr: float, batch_size: int = 128, seed: int = 0, every: int = 100,
                    precision: str = "fp32") -> FitCurve:
    """Train `g` on the pairs of the images `x` (one fixed noise draw each: z = F(x~) and F's trajectory) with the
    stage-2 objective (MSE terms, no label drop or guidance), AdamW with warm-up and cosine as in training; the
    output's MSE on every pair before training, every `every` steps and at the end."""
    gen = torch.Generator().manual_seed(seed)
    flow.eval().requires_grad_(False)
    z, targets = stage2_targets(flow, x, y, sigma, g.config.denoise, gen)
    opt = build_optimizer(g, lr, s2.weight_decay)
    curve, start = FitCurve([0], [pair_mse(g.eval(), z, targets[-1], y)]), time.perf_counter()
    g.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(s2.warmup, steps // 10), s2.schedule)
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            terms, _ = inverse_terms(g, z[idx], [t[idx] for t in targets], None if y is None else y[idx], s2,
                                     perceptual={}, generator=gen)
        opt.zero_grad(set_to_none=True)
        total(terms).backward()
        torch.nn.utils.clip_grad_norm_(g.parameters(), s2.grad_clip)
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.steps.append(step + 1)
            curve.output_mse.append(pair_mse(g.eval(), z, targets[-1], y))
            g.train()
    curve.seconds = time.perf_counter() - start
    return curve
