"""Training stages: stage 1 trains F by maximum likelihood, stage 2 trains G against the frozen F. Both run through
training/loop.py's `fit`; training/cache.py stores what they return, keyed by config.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data import ImageDataset, LatentDataset, add_noise, drop_labels
from ..distributed import DistEnv
from ..latents import differentiable_decoder, load_vae
from ..models.biflow import BiFlow
from ..models.tarflow import TARFlow
from .loop import FitResult, Snapshot, fit
from .losses import build_perceptual_terms, nll_loss, stage2_loss


def train_flow(cfg: RunConfig, dataset: ImageDataset | LatentDataset, checkpoint: Path | None = None,
               progress: bool = True, env: DistEnv | None = None,
               micro_batch: int | None = None, snapshot: Snapshot | None = None) -> tuple[TARFlow, FitResult]:
    """Stage 1: F by maximum likelihood on noise-augmented data x + sigma*eps (TARFlow sec. 2.4) with label drop.
    Seeded by stage1.seed alone: every seed of G trains against the same F."""
    s1 = cfg.stage1
    torch.manual_seed(s1.seed)
    flow = TARFlow(cfg.flow)
    levels_offset = math.log((dataset.levels - 1) / 2)

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x = add_noise(x, s1.noise_sigma, gen)
        labels = drop_labels(y, s1.label_drop, cfg.flow.num_classes, gen) if cfg.flow.num_classes else None
        loss = nll_loss(model, x, labels)  # type: ignore[arg-type]
        return loss, {"nll": float(loss.detach())}

    def postfix(avg: dict[str, float]) -> dict[str, str]:
        return {"bits/dim": f"{(avg.get('nll', float('nan')) + levels_offset) / math.log(2):.3f}"}

    result = fit(flow, loss_fn, dataset, s1, seed=s1.seed, checkpoint=checkpoint, desc="stage 1 (F)",
                 progress=progress, postfix=postfix, env=env, micro_batch=micro_batch, snapshot=snapshot)
    return flow, result


def train_backward(cfg: RunConfig, flow: TARFlow, dataset: ImageDataset | LatentDataset, seed: int,
                   checkpoint: Path | None = None, progress: bool = True, env: DistEnv | None = None,
                   micro_batch: int | None = None, snapshot: Snapshot | None = None) -> tuple[BiFlow, FitResult]:
    """Stage 2: G against the frozen F (BiFlow sec. 3); F's weights are never updated."""
    torch.manual_seed(seed + 1)
    g = BiFlow(cfg.trained_backward)
    s2 = cfg.stage2
    device = (env or DistEnv()).device
    flow.to(device).eval().requires_grad_(False)
    perceptual = build_perceptual_terms(s2).to(device)
    decode = None
    if perceptual and cfg.dataset == "latents":  # perceptual terms see VAE-decoded images, as in the paper
        decode = differentiable_decoder(load_vae(None, device))

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return stage2_loss(model, flow, x, y if cfg.backward.num_classes else None, s2,  # type: ignore[arg-type]
                           sigma=cfg.stage1.noise_sigma, perceptual=perceptual, generator=gen, decode=decode)

    result = fit(g, loss_fn, dataset, s2, seed=seed, checkpoint=checkpoint, ema_decay=s2.ema_decay,
                 desc="stage 2 (G)", progress=progress, env=env, micro_batch=micro_batch, snapshot=snapshot)
    return g, result

