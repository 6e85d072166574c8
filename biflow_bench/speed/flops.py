"""FLOP counting: torch.utils.flop_counter's formulas for matmuls and attention (SDPA on CPU included), counted over
one call (elementwise ops are not counted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_mapping() -> dict:
    """flop_counter knows the CUDA attention kernels but not SDPA's CPU one; count it like the others."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return mapping


class _FlopCounter(TorchDispatchMode):
    """Sums flop_counter's per-op formulas over every aten op that runs. Unlike FlopCounterMode it tracks no
    modules, whose hooks break `torch.autograd.grad` (the score step)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in _flop_mapping().items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` by torch.utils.flop_counter's formulas (matmuls, convolutions, attention; the
    backward of whatever runs under autograd included)."""
    with _FlopCounter() as counter:
        fn()
    return counter.total
