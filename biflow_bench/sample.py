"""Samplers. Image i is always drawn from noise seeded by (seed, i), so samples never depend on the batch size,
the number of processes or the order of work (edm2's per-image seeds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import RunConfig
from .models.biflow import BiFlow
from .models.tarflow import TARFlow


def image_noise(seeds: range | list[int], shape: tuple[int, ...], base_seed: int = 0) -> Tensor:
    """One standard normal draw of `shape` per image seed."""
    gen = torch.Generator()
    out = torch.empty(len(seeds), *shape)
    for row, s in enumerate(seeds):
        gen.manual_seed(base_seed * 1_000_003 + s)
        out[row] = torch.randn(shape, generator=gen)
    return out


@dataclass(frozen=True)
class Sampler:
    """The sampling recipe of a run: which inverse, which denoising, which guidance."""

    inverse: str  # "learned" | "exact"
    denoise: str  # "learned" | "score" | "none"
    cfg_scale: float
    sigma: float  # noise level F was trained with (score denoising)
    guidance_temperature: float | None = None
    annealed: bool = False

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Sampler:
        return cls(cfg.inverse, cfg.backward.denoise, cfg.sample.cfg_scale, cfg.stage1.noise_sigma,
                   cfg.sample.guidance_temperature, cfg.sample.annealed)

    @torch.no_grad()
    def __call__(self, flow: TARFlow, g: BiFlow | None, z: Tensor, y: Tensor | None) -> Tensor:
        if self.inverse == "exact":
            x = flow.reverse(z, y, guidance=self.cfg_scale, guidance_temperature=self.guidance_temperature,
                             annealed=self.annealed)
        else:
            assert g is not None, "the learned inverse needs a backward model"
            x = g.sample(z, y, cfg_scale=self.cfg_scale)
        if self.denoise == "score":
            x = flow.denoise(x, y, self.sigma)
        return x

    def nfe(self, flow: TARFlow, g: BiFlow | None) -> tuple[int, str]:
        """Sequential network evaluations per image and a readable label ("1", "2", "4x15 serial + score")."""
        if self.inverse == "exact":
            steps = flow.num_serial_steps()
            label = f"{flow.config.num_blocks}x{flow.config.num_tokens - 1} serial"
            label += " x2 (CFG)" if self.cfg_scale else ""
        else:
            assert g is not None
            steps = g.nfe(self.cfg_scale)
            label = str(steps)
        if self.denoise == "score":  # one forward + backward pass through F
            steps, label = steps + 1, label + " + score step"
        return steps, label


def generate(sampler: Sampler, flow: TARFlow, g: BiFlow | None, labels: Tensor | None, seeds: range,
             batch_size: int, base_seed: int = 0) -> Tensor:
    """Images for `seeds` (one per seed) in batches; values clamped to [-1, 1]."""
    shape = (flow.config.in_channels, flow.config.image_size, flow.config.image_size)
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = seeds[i : i + batch_size]
        z = image_noise(chunk, shape, base_seed)
        y = None if labels is None else labels[i : i + batch_size]
        out.append(sampler(flow, g, z, y).clamp(-1, 1))
    return torch.cat(out)
