"""Equal training compute for the 1-NFE comparison (issue 42): BiFlow's training costs F's stage 1 plus G's stage 2
(which runs F forward for its targets, and the perceptual networks of its metric); a peer trained directly on the
data gets the same FLOPs, so its step count is that budget over its own FLOPs per step.

    step_flops(cfg, peers)        FLOPs of one training step (forward + backward, torch.utils.flop_counter's
                                  formulas) of F, G and each peer, at the stages' batch sizes
    equal_compute(cfg, peers)     BiFlow's budget and each peer's steps within it
    resolved_peer(cfg)            the run's peer with its steps (at equal compute: from the budget)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import PeerConfig, RunConfig
from ..models.biflow import BiFlow
from ..models.tarflow import TARFlow
from ..speed.flops import count_flops
from .losses import build_perceptual_terms, nll_loss, stage2_loss
from .stages import build_peer, train_peer_loss


def random_batch(cfg: RunConfig, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A seeded stand-in for a training batch of `cfg`'s data: pixels uniform in [-1, 1], random labels."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.flow.in_channels, cfg.flow.image_size, cfg.flow.image_size)
    x = torch.rand(batch, *shape, generator=gen) * 2 - 1
    y = torch.randint(0, cfg.flow.num_classes, (batch,), generator=gen) if cfg.flow.num_classes else None
    return x, y


def step_flops(cfg: RunConfig, peers: tuple[PeerConfig, ...] = (), seed: int = 0) -> dict[str, int]:
    """{"flow": F's step, "backward": G's step (F's forward for the targets and the metric's perceptual terms
    included), peer.kind: each peer's step} in FLOPs, each at its own batch size."""
    torch.manual_seed(seed)
    flow, g = TARFlow(cfg.flow), BiFlow(cfg.trained_backward)
    x, y = random_batch(cfg, cfg.stage1.batch_size, seed)
    out = {"flow": count_flops(lambda: nll_loss(flow, x + cfg.stage1.noise_sigma * torch.randn_like(x), y).backward())}
    flow.requires_grad_(False)
    perceptual = build_perceptual_terms(dataclasses.replace(cfg.stage2, perceptual_weights="random"))
    x, y = random_batch(cfg, cfg.stage2.batch_size, seed)
    gen = torch.Generator().manual_seed(seed)
    out["backward"] = count_flops(lambda: stage2_loss(
        g, flow, x, y if cfg.backward.num_classes else None, cfg.stage2, sigma=cfg.stage1.noise_sigma,
        perceptual=perceptual, generator=gen)[0].backward())
    for peer in peers:
        model = build_peer(cfg, peer)
        xp, yp = random_batch(cfg, peer.batch_size, seed)
        out[peer.kind] = count_flops(lambda: train_peer_loss(cfg, peer, model, xp, yp, gen)[0].backward())
    return out


def equal_compute(cfg: RunConfig, peers: tuple[PeerConfig, ...], seed: int = 0) -> dict[str, Any]:
    """BiFlow's training FLOPs (stage1.steps x F's step + stage2.steps x G's) and, per peer, the steps that spend
    the same (rounded down), with the FLOPs per step behind them."""
    flops = step_flops(cfg, peers, seed)
    budget = cfg.stage1.steps * flops["flow"] + cfg.stage2.steps * flops["backward"]
    return {"flops_per_step": flops, "biflow_flops": budget,
            "peer_steps": {p.kind: budget // flops[p.kind] for p in peers}}


def resolved_peer(cfg: RunConfig, budget: dict[str, Any] | None = None) -> PeerConfig:
    """cfg.peer as it trains: at equal compute (peer.equal_compute) its steps those of BiFlow's budget with the
    run's F and G settings (`budget`: equal_compute's answer, when the caller has it), else its own."""
    if not cfg.peer.equal_compute:
        return cfg.peer
    steps = (budget or equal_compute(cfg, (cfg.peer,)))["peer_steps"][cfg.peer.kind]
    return dataclasses.replace(cfg.peer, steps=max(1, int(steps)), equal_compute=False)
