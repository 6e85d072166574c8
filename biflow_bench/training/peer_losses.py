"""The training objectives of the 1-NFE peers (models/flow_matching.py, models/meanflow.py), on the path
z_t = (1 - t) x + t eps with velocity v = eps - x (t = 1 is noise):

    flow_matching_loss   || v(z_t, t, y) - v ||^2, t ~ U[0, 1], labels dropped for CFG (SiT)
    sample_times         (r, t): both logit-normal, r = t on a share of the batch (plain flow matching there), sorted
    guided_velocity      training-time CFG's target field: v + (1 - 1/omega) (u(z_t, t, t | y, w) - u(z_t, t, t | null)),
                         omega = 1 + w, the model's own fields under a stop-gradient (its fixed point is the guided
                         field (1 + w) v_c - w v_u); w = 0 (dropped labels) leaves v
    meanflow_target      the MeanFlow identity's target u_tgt = v~ - (t - r) (v~ . d_z u + d_t u), the total derivative
                         one Jacobian-vector product (torch.func.jvp) with tangent (v~, 0, 1) in (z, r, t)
    meanflow_loss        adaptive-weighted || u - sg(u_tgt) ||^2 (the weighting of BiFlow's eq. 7)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data import drop_labels
from ..models.flow_matching import FlowMatching
from ..models.meanflow import MeanFlow
from .losses import adaptive_weight, sample_guidance


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *[1] * (like.dim() - 1))


def path(x: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(z_t, v): the point of the linear path at time t (B,) and its velocity eps - x."""
    tk = _per_sample(t, x)
    return (1 - tk) * x + tk * eps, eps - x


def flow_matching_loss(model: FlowMatching, x: Tensor, y: Tensor | None, generator: torch.Generator,
                       label_drop: float = 0.1) -> Tensor:
    """Mean squared error of the velocity at t ~ U[0, 1], labels dropped with probability `label_drop` (CFG)."""
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    t = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    z, v = path(x, eps, t)
    if y is not None:
        y = drop_labels(y, label_drop, model.config.num_classes, generator)
    return (model(z, t, y) - v).pow(2).mean()


def logit_normal(n: int, mean: float, std: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """sigmoid(mean + std * N(0, 1)), n draws."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=like.device, dtype=like.dtype))


def sample_times(n: int, mean: float, std: float, interval_share: float, generator: torch.Generator,
                 like: Tensor) -> tuple[Tensor, Tensor]:
    """(r, t) with r <= t: two logit-normal draws, sorted; with probability 1 - `interval_share` r = t (MeanFlow's
    ratio of r != t, 25% on ImageNet)."""
    t, r = logit_normal(n, mean, std, generator, like), logit_normal(n, mean, std, generator, like)
    same = torch.rand(n, generator=generator, device=like.device) >= interval_share
    r = torch.where(same, t, r)
    return torch.minimum(t, r), torch.maximum(t, r)


def guided_velocity(model: MeanFlow, z: Tensor, t: Tensor, v: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Training-time CFG's target field v + (1 - 1/omega) (u_c - u_u), omega = 1 + w, where u_c = u(z, t, t | y, w)
    and u_u = u(z, t, t | null, 0) are the model's instantaneous fields under a stop-gradient."""
    b = z.shape[0]
    null = torch.full_like(y, model.config.num_classes)
    with torch.no_grad():
        u = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), torch.cat([y, null]),
                  torch.cat([w, torch.zeros_like(w)]))
    return v + _per_sample(1 - 1 / (1 + w), v) * (u[:b] - u[b:])


def meanflow_target(model: MeanFlow, z: Tensor, r: Tensor, t: Tensor, v: Tensor, y: Tensor | None,
                    w: Tensor | None) -> tuple[Tensor, Tensor]:
    """(u(z, r, t), u_tgt): the prediction, with its graph, and the MeanFlow identity's target
    u_tgt = v - (t - r) du/dt (no graph), du/dt = v . d_z u + d_t u by one forward-mode JVP with tangent (v, 0, 1)."""

    def u_of(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model(z_, r_, t_, y, w)

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no forward-mode derivative
        u, dudt = torch.func.jvp(u_of, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return u, (v - _per_sample(t - r, v) * dudt).detach()


def meanflow_loss(model: MeanFlow, x: Tensor, y: Tensor | None, generator: torch.Generator, *,
                  time_mean: float = -0.4, time_std: float = 1.0, interval_share: float = 0.25,
                  label_drop: float = 0.1, cfg_max: float = 7.0, cfg_distribution: str = "inverse",
                  adaptive_c: float = 1e-3, adaptive_p: float = 1.0, terms: dict[str, float] | None = None) -> Tensor:
    """MeanFlow's objective on a batch: (r, t) by `sample_times`, the guided target field with w drawn as G's
    training-time CFG draws it (omega = 1 + w with density ~ 1 / omega; dropped labels: w = 0 and v itself), the
    identity's target, and the adaptive weighting D / sg(D + c)^p of the squared error summed over dimensions.
    The weighted loss is about 1 whatever the error (p = 1): `terms` gets the error per value ("error") to follow."""
    b = x.shape[0]
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    r, t = sample_times(b, time_mean, time_std, interval_share, generator, x)
    z, v = path(x, eps, t)
    w = None
    if model.config.guidance:
        assert y is not None, "training-time guidance needs labels"
        dropped = torch.rand(b, generator=generator, device=x.device) < label_drop
        w = sample_guidance(dropped, cfg_max, cfg_distribution, generator).to(x.dtype)
        y = torch.where(dropped, torch.full_like(y, model.config.num_classes), y)
        v = guided_velocity(model, z, t, v, y, w)
    elif y is not None:
        y = drop_labels(y, label_drop, model.config.num_classes, generator)
    u, target = meanflow_target(model, z, r, t, v, y, w)
    if terms is not None:
        terms["error"] = float((u - target).detach().pow(2).mean())
    return adaptive_weight((u - target).pow(2).flatten(1).sum(1), adaptive_c, adaptive_p).mean()
