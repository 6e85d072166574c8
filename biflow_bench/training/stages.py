"""Training stages: stage 1 trains F by maximum likelihood, stage 2 trains G against the frozen F. Both run through
training/loop.py's `fit`; training/cache.py stores what they return, keyed by config.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import ConfigError, PeerConfig, RunConfig
from ..data import ImageDataset, LatentDataset, add_noise, drop_labels
from ..distributed import DistEnv
from ..latents import differentiable_decoder, load_vae
from ..models.biflow import BiFlow
from ..models.flow_matching import FlowMatching, FlowMatchingConfig
from ..models.meanflow import MeanFlow, MeanFlowConfig
from ..models.tarflow import TARFlow
from .loop import FitResult, Snapshot, doubling, fit
from .losses import build_perceptual_terms, nll_loss, stage2_loss
from .peer_losses import flow_matching_loss, meanflow_loss


def train_flow(cfg: RunConfig, dataset: ImageDataset | LatentDataset, checkpoint: Path | None = None,
               progress: bool = True, env: DistEnv | None = None,
               micro_batch: int | None = None, snapshot: Snapshot | None = None) -> tuple[TARFlow, FitResult]:
    """Stage 1: F by maximum likelihood on noise-augmented data x + sigma*eps (TARFlow sec. 2.4) with label drop.
    Seeded by stage1.seed alone: every seed of G trains against the same F."""
    s1 = cfg.stage1
    if s1.seed < 0:
        raise ConfigError("stage1.seed=-1 (F seeded by the run's seed) is resolved by a table's run; set stage1.seed "
                          "to a seed >= 0 here")
    torch.manual_seed(s1.seed)
    flow = TARFlow(cfg.flow)
    levels_offset = math.log((dataset.levels - 1) / 2)

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x = add_noise(x, s1.noise_sigma, gen, s1.noise)
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


def build_peer(cfg: RunConfig, peer: PeerConfig) -> MeanFlow | FlowMatching:
    """The peer on G's backbone: G's width, heads and classes, one block per block of G's stages (its size within a
    few percent of G's, tests/test_peers.py); MeanFlow with training-time CFG when the data has classes."""
    b = cfg.trained_backward
    shape = dict(in_channels=b.in_channels, image_size=b.image_size, patch_size=b.patch_size, width=b.width,
                 depth=b.num_stages * b.layers_per_group, num_heads=b.num_heads, mlp_ratio=b.mlp_ratio,
                 num_classes=b.num_classes)
    if peer.kind == "meanflow":
        return MeanFlow(MeanFlowConfig(**shape, guidance=bool(b.num_classes)))
    return FlowMatching(FlowMatchingConfig(**shape))


def train_peer_loss(cfg: RunConfig, peer: PeerConfig, model: nn.Module, x: Tensor, y: Tensor | None,
                    generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
    """A peer's objective on one batch (training/peer_losses.py) with the stage's settings."""
    labels = y if cfg.backward.num_classes else None
    terms: dict[str, float] = {}
    if peer.kind == "meanflow":
        loss = meanflow_loss(model, x, labels, generator, time_mean=peer.time_mean,  # type: ignore[arg-type]
                             time_std=peer.time_std, interval_share=peer.interval_share, label_drop=peer.label_drop,
                             cfg_max=peer.cfg_max, cfg_distribution=peer.cfg_distribution,
                             adaptive_c=peer.adaptive_c, adaptive_p=peer.adaptive_p, terms=terms)
    else:
        loss = flow_matching_loss(model, x, labels, generator, peer.label_drop)  # type: ignore[arg-type]
    return loss, {peer.kind: float(loss.detach()), **terms}


def train_peer(cfg: RunConfig, peer: PeerConfig, dataset: ImageDataset | LatentDataset, seed: int,
               checkpoint: Path | None = None, progress: bool = True, env: DistEnv | None = None,
               micro_batch: int | None = None, snapshot: Snapshot | None = None) -> tuple[nn.Module, FitResult]:
    """A 1-NFE peer trained directly on the data (issue 42), by its own objective (training/peer_losses.py), on
    the same data and pixel range as F and G; seeded by the run's seed, as G. Its checkpoints at a doubling
    schedule (a quarter of checkpoint_every, twice that, ...) are kept for the quality-against-compute curve."""
    torch.manual_seed(seed + 2)
    model = build_peer(cfg, peer)

    def loss_fn(m: nn.Module, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        return train_peer_loss(cfg, peer, m, x, y, gen)

    result = fit(model, loss_fn, dataset, peer, seed=seed, checkpoint=checkpoint, ema_decay=peer.ema_decay,
                 desc=f"peer ({peer.kind})", progress=progress, env=env, micro_batch=micro_batch, snapshot=snapshot,
                 keep_at=doubling(max(1, peer.checkpoint_every // 4)))
    return model, result
