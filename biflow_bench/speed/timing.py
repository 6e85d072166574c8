"""Timing primitives: wall time of calls after warm-up with the device synchronised, the matmul peak a run's FLOP rates
are measured against, and peak memory on CUDA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones (synchronised on cuda)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                min_tries: int = 5, max_tries: int = 30, budget_s: float = 0.5) -> float:
    """FLOP/s of a large square matmul, 2 n^3 / t for the best of at least `min_tries` timed products (more, up
    to `max_tries`, while `budget_s` lasts: the best of many is a steadier peak on a shared machine)."""
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    reps = 1 if device.type == "cpu" else 10  # on cuda, amortise the launch and the synchronisation
    best = math.inf
    with torch.inference_mode():
        a @ b
        sync(device)
        start = time.perf_counter()
        for i in range(max_tries):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
            if i + 1 >= min_tries and time.perf_counter() - start > budget_s:
                break
    return 2 * n**3 / best


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
