"""Likelihood and size: bits/dim of a flow on held-out images, and parameter counts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def bits_per_dim(flow: nn.Module, images: Tensor, labels: Tensor | None, levels: int, batch_size: int = 250) -> float:
    """Mean negative log-likelihood of `flow` in bits per dimension on images in [-1, 1] with `levels` grey levels.

        bpd = (-log p(x) / D + log((levels - 1) / 2)) / log 2

    The log((levels - 1) / 2) term is the Jacobian of the affine map from [-1, 1] to the pixel scale [0, levels - 1],
    so the number is per pixel unit, comparable with published bits/dim. No dequantisation term is added: the density
    is evaluated at `images` as given (add uniform/Gaussian noise before calling to measure a dequantised bound).
    D = flow.config.num_dims; the average is over images.
    """
    d, offset = flow.config.num_dims, math.log((levels - 1) / 2)
    param = next(flow.parameters())
    total = 0.0
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(param.device, param.dtype)
            y = None if labels is None else labels[i : i + batch_size].to(param.device)
            total += float((-flow.log_prob(x, y).double() / d + offset).sum())
    return total / images.shape[0] / math.log(2)


def count_params(*modules: nn.Module | None) -> int:
    """Number of parameters of the given modules (None skipped; shared tensors counted once per module, frozen ones
    included)."""
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())
