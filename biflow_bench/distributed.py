"""Process-group helpers and collectives for torchrun (one process per GPU, or a few CPU processes with gloo).

    env = init_from_env()     RANK / WORLD_SIZE / LOCAL_RANK -> process group (nccl on CUDA, gloo on CPU), device;
                              collectives wait BIFLOW_DIST_TIMEOUT_MIN minutes (default 120) for rank 0's evaluation
    all_true / any_true / mean_over_ranks / barrier / broadcast_object   the collectives the training loop, the
                              cache and the runner agree with (rank 0 decides what is skipped and writes)
    gather_rows(...)          rank r holds rows r, r + W, ...; rank 0 gets the whole table in row order

Stage orchestration (train F, then G, into the artifact cache; one process or DDP) lives in training/cache.py (`train_stages`);
`biflow-bench run` under torchrun trains with DDP, samples sharded, and evaluates and writes on rank 0 (runner.py).

How the work is split (loop.fit, sample.generate): every global batch is cut into micro-batches of a fixed size; rank
r takes micro-batches r, r + W, ... (gradient accumulation over them), and each micro-batch draws its randomness from
(seed, step, micro-batch index). So the same global batch and micro-batch size give the same training on 1 process
with accumulation or on W processes, up to float reduction order. Sampling gives image i noise from (seed, i) and
rank r the images r, r + W, ..., so samples do not depend on the number of processes or the batch size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


DEFAULT_TIMEOUT_MIN = 120.0


def collective_timeout() -> timedelta:
    """How long a collective waits: the other ranks wait at one while rank 0 alone evaluates a variant (FID-50K at
    every w of the sweep), far beyond NCCL's default of 10 minutes. BIFLOW_DIST_TIMEOUT_MIN overrides it."""
    raw = os.environ.get("BIFLOW_DIST_TIMEOUT_MIN", "").strip()
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MIN
    except ValueError:
        minutes = float("nan")
    if not 0 < minutes < math.inf:  # false for nan too
        raise ConfigError(f"BIFLOW_DIST_TIMEOUT_MIN={raw!r} is not a positive number of minutes: set it to e.g. 120")
    return timedelta(minutes=minutes)


def init_from_env(device: str | None = None) -> DistEnv:
    """The process's place in a torchrun job (a single process when WORLD_SIZE is unset or 1). `device` "cpu" or
    "cuda"; default: CUDA when available. With WORLD_SIZE > 1 the default process group is initialised (env://)
    with `collective_timeout()`."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=collective_timeout())
    return DistEnv(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_true(flag: bool, env: DistEnv) -> bool:
    """True when `flag` is true on every rank (a MIN all-reduce)."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool, env: DistEnv) -> bool:
    return not all_true(not flag, env)


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank (picklable; the other ranks' values are ignored)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average of per-rank scalars (the same keys on every rank)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def gather_rows(local: Tensor | None, env: DistEnv) -> Tensor | None:
    """Rank r holds rows r, r + W, r + 2W, ... of a table (None: no rows); rank 0 returns the whole table in row
    order, the other ranks None."""
    if not env.distributed:
        return local
    parts: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(None if local is None else local.cpu(), parts, dst=0)
    if parts is None:
        return None
    present = [p for p in parts if p is not None]
    out = present[0].new_empty(sum(len(p) for p in present), *present[0].shape[1:])
    for r, p in enumerate(parts):
        if p is not None:
            out[r :: env.world_size] = p
    return out
