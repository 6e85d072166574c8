"""Flow matching (SiT-style linear interpolant, velocity prediction): the multi-step reference of the 1-NFE comparison.

The path from data to noise is z_t = (1 - t) x + t eps, t in [0, 1] (t = 1 is noise), and the network v(z_t, t, y)
regresses the path's velocity eps - x (training/peer_losses.py). Sampling integrates dz/dt = v from t = 1 to 0 in
`steps` uniform steps with Euler (1 evaluation a step) or Heun (2); classifier-free guidance evaluates the
conditional and the unconditional (null class) velocity as one batch and extrapolates, (1 + w) v_c - w v_u.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import BackboneConfig, ConditionedTransformer

SOLVERS = ("euler", "heun")


@dataclass(frozen=True)
class FlowMatchingConfig(BackboneConfig):
    pass


class FlowMatching(nn.Module):
    def __init__(self, cfg: FlowMatchingConfig):
        super().__init__()
        self.config = cfg
        self.net = ConditionedTransformer(cfg, scalars=("t",))

    def forward(self, z: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The velocity v(z_t, t, y); t (B,)."""
        return self.net(z, y, t=t)

    def velocity(self, z: Tensor, t: float, y: Tensor | None, cfg_scale: float) -> Tensor:
        """The (guided) velocity at time t: (1 + w) v(z, t, y) - w v(z, t, null) with w = cfg_scale."""
        b = z.shape[0]
        if not cfg_scale:
            return self(z, z.new_full((b,), t), y)
        if y is None:
            raise ValueError("classifier-free guidance needs class labels y")
        null = torch.full_like(y, self.config.num_classes)
        v = self(torch.cat([z, z]), z.new_full((2 * b,), t), torch.cat([y, null]))
        return torch.lerp(v[b:], v[:b], 1.0 + cfg_scale)

    @torch.no_grad()
    def sample(self, z: Tensor, y: Tensor | None = None, steps: int = 1, solver: str = "euler",
               cfg_scale: float = 0.0) -> Tensor:
        """x from noise z = z_1 in `steps` uniform steps of `solver` down to t = 0."""
        if steps < 1 or solver not in SOLVERS:
            raise ValueError(f"flow matching samples with steps >= 1 and a solver of {', '.join(SOLVERS)} "
                             f"(got steps={steps}, solver={solver!r})")
        times = torch.linspace(1.0, 0.0, steps + 1).tolist()
        for t, s in zip(times[:-1], times[1:]):
            v = self.velocity(z, t, y, cfg_scale)
            if solver == "euler":
                z = z + (s - t) * v
            else:  # Heun: the trapezoid of the velocities at both ends of the Euler step
                v_end = self.velocity(z + (s - t) * v, s, y, cfg_scale)
                z = z + (s - t) * 0.5 * (v + v_end)
        return z

    def nfe(self, steps: int, solver: str, cfg_scale: float = 0.0) -> int:
        """Network evaluations per sample (a guided evaluation runs two branches)."""
        return steps * (2 if solver == "heun" else 1) * (2 if cfg_scale else 1)
