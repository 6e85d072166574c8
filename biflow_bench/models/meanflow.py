"""MeanFlow (Geng et al. 2025): the one-step peer of the 1-NFE comparison, from the BiFlow authors' group.

On the flow-matching path z_t = (1 - t) x + t eps (t = 1 is noise), the network predicts the average velocity over
[r, t], u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_tau, tau) dtau, so one step from noise is exact:
z_r = z_t - (t - r) u(z_t, r, t). It is trained on the MeanFlow identity u = v - (t - r) du/dt
(training/peer_losses.py). The network is conditioned on t and on the interval t - r (MeanFlow's best
positional pair), and, for training-time guidance, on the guidance scale w (omega = 1 + w), so that one pass gives the
guided field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import BackboneConfig, ConditionedTransformer


@dataclass(frozen=True)
class MeanFlowConfig(BackboneConfig):
    guidance: bool = True  # training-time CFG: w is a condition (needs classes)

    def __post_init__(self) -> None:
        if self.guidance and not self.num_classes:
            raise ValueError("MeanFlowConfig.guidance needs class labels (num_classes > 0)")


class MeanFlow(nn.Module):
    def __init__(self, cfg: MeanFlowConfig):
        super().__init__()
        self.config = cfg
        scalars = ("t", "interval") + (("w",) if cfg.guidance else ())
        self.net = ConditionedTransformer(cfg, scalars=scalars)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None, w: Tensor | None = None) -> Tensor:
        """The average velocity u(z_t, r, t | y, w); r, t, w (B,) (w: 0 when None, ignored without guidance)."""
        extra = {"w": w if w is not None else torch.zeros_like(t)} if self.config.guidance else {}
        return self.net(z, y, t=t, interval=t - r, **extra)

    @torch.no_grad()
    def sample(self, z: Tensor, y: Tensor | None = None, steps: int = 1, cfg_scale: float = 0.0) -> Tensor:
        """x from noise z = z_1 in `steps` uniform jumps z_r = z_t - (t - r) u(z_t, r, t) (1 NFE a step: the guidance
        scale is a condition, not a second branch)."""
        if steps < 1:
            raise ValueError(f"MeanFlow samples with steps >= 1 (got {steps})")
        if cfg_scale and not self.config.guidance:
            raise ValueError("cfg_scale needs a MeanFlow trained with training-time guidance")
        b = z.shape[0]
        w = z.new_full((b,), float(cfg_scale)) if self.config.guidance else None
        times = torch.linspace(1.0, 0.0, steps + 1).tolist()
        for t, r in zip(times[:-1], times[1:]):
            z = z - (t - r) * self(z, z.new_full((b,), r), z.new_full((b,), t), y, w)
        return z

    def nfe(self, steps: int) -> int:
        return steps
