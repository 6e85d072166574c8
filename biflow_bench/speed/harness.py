"""What the speed benchmark times: models built from a variant's resolved config (random weights: a sampler's cost
does not depend on the values of its weights), one sampler call, and one training step of either stage as
training/loop.py's `fit` takes it (its optimizer: no weight decay on biases; its autocast and compile switches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..models.biflow import BiFlow
from ..models.flow_matching import FlowMatching
from ..models.meanflow import MeanFlow
from ..models.tarflow import TARFlow
from ..sample import Sampler, image_noise
from ..training.loop import autocast_context, build_optimizer, compile_in_place
from ..training.budget import random_batch
from ..training.stages import build_peer
from ..training.losses import nll_loss, stage2_loss


def unzero(model: nn.Module, seed: int) -> nn.Module:
    """Fill the zero-initialised parameters (output layers, adaLN modulation) with small random values, so no
    timed arithmetic runs on all-zero weights. Timing does not depend on the values otherwise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def build_variant_models(cfg: RunConfig, device: torch.device, seed: int = 0
                         ) -> tuple[TARFlow, BiFlow | MeanFlow | FlowMatching | None]:
    """F and (for the learned inverse) G, or a 1-NFE peer in G's place, of a resolved config, randomly initialised,
    in eval mode on `device`."""
    torch.manual_seed(seed)
    flow = unzero(TARFlow(cfg.flow), seed).to(device).eval()
    g = {"learned": lambda: BiFlow(cfg.backward), "peer": lambda: build_peer(cfg, cfg.peer)}.get(cfg.inverse)
    return flow, (unzero(g(), seed + 1).to(device).eval() if g else None)


def sampler_inputs(cfg: RunConfig, batch: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    shape = (cfg.flow.in_channels, cfg.flow.image_size, cfg.flow.image_size)
    z = image_noise(range(batch), shape).to(device)
    y = torch.arange(batch, device=device) % cfg.flow.num_classes if cfg.flow.num_classes else None
    return z, y


def sampler_call(sampler: Sampler, flow: TARFlow, g: BiFlow | None, z: Tensor, y: Tensor | None,
                  amp: bool, inference: bool = True, stats: dict[str, Any] | None = None) -> Callable[[], Tensor]:
    """One sampler call under inference_mode (no_grad when the score step needs autograd, or when not
    `inference`: FLOP counting needs composite ops such as linear decomposed into matmuls, which inference_mode
    skips), with bf16 autocast for G or a peer when `amp`. Jacobi decoding writes its passes into `stats`."""
    grad_ctx: Callable[[], AbstractContextManager] = (
        torch.inference_mode if inference and sampler.denoise != "score" else torch.no_grad)

    def call() -> Tensor:
        with grad_ctx():
            if amp and sampler.inverse != "exact":  # G's pass or a peer's steps
                with torch.autocast(z.device.type, dtype=torch.bfloat16):
                    x = dataclasses.replace(sampler, denoise="none")(flow, g, z, y)
                x = x.float()
                if sampler.denoise == "score":
                    x = flow.denoise(x, y, sampler.sigma)
                return x
            return sampler(flow, g, z, y, stats)

    return call


def parse_train_setting(setting: str) -> tuple[str, bool]:
    """"fp32", "bf16", "fp32+compile", "bf16+compile" -> (precision, compile): TrainingConfig's switches."""
    precision, _, rest = setting.partition("+")
    if precision not in ("fp32", "bf16") or rest not in ("", "compile"):
        raise ValueError(f"training setting {setting!r} is not one of fp32, bf16, fp32+compile, bf16+compile")
    return precision, rest == "compile"


def train_step(model: nn.Module, loss_fn: Callable[[], Tensor], device: torch.device, precision: str = "fp32",
                compile: bool = False, lr: float = 1e-4, weight_decay: float = 1e-4) -> Callable[[], None]:
    """One optimisation step as loop.fit does it, with its optimizer (parameter groups: no decay on biases),
    autocast and compilation: forward, backward, gradient clipping, AdamW (0.9, 0.95)."""
    opt = build_optimizer(model, lr, weight_decay)
    if compile:
        compile_in_place(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with autocast_context(device, precision, cuda_bf16=False):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def training_calls(cfg: RunConfig, device: torch.device, batch: int, seed: int, setting: str = "fp32",
                    ) -> dict[str, tuple[Callable[[], None], nn.Module, nn.Module | None]]:
    """{sampler name: (step, trained model, frozen model)} for stage 1 and stage 2 at one batch size, with the
    training `setting` (see parse_train_setting)."""
    precision, compile = parse_train_setting(setting)
    flow, g = build_variant_models(cfg, device, seed)
    assert g is not None
    x, y = (t.to(device) if t is not None else None for t in random_batch(cfg, batch, seed))
    flow.train()
    s1 = cfg.stage1
    frozen = TARFlow(cfg.flow).to(device).eval().requires_grad_(False)  # stage 2 trains G against a frozen F
    frozen.load_state_dict(flow.state_dict())
    flow_step = train_step(flow, lambda: nll_loss(flow, x + s1.noise_sigma * torch.randn_like(x), y), device,
                            precision, compile, weight_decay=s1.weight_decay)

    g.train()
    s2 = cfg.stage2
    step_gen = torch.Generator(device=device).manual_seed(seed)

    def g_loss() -> Tensor:
        loss, _ = stage2_loss(g, frozen, x, y if cfg.backward.num_classes else None, s2, sigma=s1.noise_sigma,
                              perceptual={}, generator=step_gen)
        return loss

    g_step = train_step(g, g_loss, device, precision, compile, weight_decay=s2.weight_decay)
    return {"train-flow": (flow_step, flow, None), "train-backward": (g_step, g, frozen)}
