"""Multi-process training and sampling under torchrun (one process per GPU, or a few CPU processes with gloo).

    env = init_from_env()     RANK / WORLD_SIZE / LOCAL_RANK -> process group (nccl on CUDA, gloo on CPU), device
    train_stages(...)         stage 1 then stage 2 under DDP into the artifact cache; only rank 0 writes
    gather_rows(...)          rank r holds rows r, r + W, ...; rank 0 gets the whole table in row order

How the work is split (train.fit, sample.generate): every global batch is cut into micro-batches of a fixed size; rank
r takes micro-batches r, r + W, ... (gradient accumulation over them), and each micro-batch draws its randomness from
(seed, step, micro-batch index). So the same global batch and micro-batch size give the same training on 1 process
with accumulation or on W processes, up to float reduction order. Sampling gives image i noise from (seed, i) and
rank r the images r, r + W, ..., so samples do not depend on the number of processes or the batch size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


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


def init_from_env(device: str | None = None) -> DistEnv:
    """The process's place in a torchrun job (a single process when WORLD_SIZE is unset or 1). `device` "cpu" or
    "cuda"; default: CUDA when available. With WORLD_SIZE > 1 the default process group is initialised (env://)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
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


def train_stages(cfg, seed: int, dataset, cache_dir: Path, env: DistEnv, micro_batch: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """F (stage 1) and, for the learned inverse, G (stage 2) of `cfg` under DDP, stored in the artifact cache exactly
    where `artifacts.get_flow` / `get_backward` look (cache/stage{1,2}/<key>/), so a later single-process `run` or
    `sample-dist` reuses them. A stage whose artifact exists is loaded, not trained. Only rank 0 writes (checkpoints
    and artifacts); every rank returns the per-stage summary."""
    from .artifacts import save_model
    from .train import train_backward, train_flow

    def stage(directory: Path, name: str, train) -> tuple[Any, dict[str, Any]]:
        path = directory / name
        model, meta = _load(path, env)
        if model is not None:
            return model.to(env.device), {**meta, "cached": True, "key": directory.name}
        model, result = train(directory / "checkpoint.pt")
        meta = {"seconds": result.seconds, "terms": result.terms, "skipped_steps": result.skipped_steps,
                "steps": result.steps, "resumed_from": result.resumed_from, "world_size": env.world_size,
                "micro_batch": micro_batch or result.micro_batch, "device": env.device.type}
        if env.is_main:
            save_model(model, path, meta)
            for leftover in (directory / "checkpoint.pt", directory / "checkpoint.pt.sha256"):
                leftover.unlink(missing_ok=True)
        barrier(env)
        return model, {**meta, "cached": False, "key": directory.name}

    # the micro-batch size changes the randomness drawn (one stream per micro-batch), so it is part of the key
    micro_batch = micro_batch or (cfg.stage1.batch_size // env.world_size if env.distributed else None)
    device = env.device.type
    flow, summary = stage(cache_dir / "stage1" / cfg.stage1_key(micro_batch, device), "flow.pt",
                          lambda ck: train_flow(cfg, dataset, ck, progress and env.is_main, env=env,
                                                micro_batch=micro_batch))
    out = {"stage1": summary}
    if cfg.inverse == "learned":
        _, out["stage2"] = stage(cache_dir / "stage2" / cfg.stage2_key(seed, micro_batch, device), "backward.pt",
                                 lambda ck: train_backward(cfg, flow, dataset, seed, ck, progress and env.is_main,
                                                           env=env, micro_batch=micro_batch))
    return out


def _load(path: Path, env: DistEnv) -> tuple[Any, dict[str, Any]]:
    """A cached artifact on every rank, or (None, {}) on every rank when any rank cannot read it."""
    from .artifacts import load_model
    from .files import CorruptArtifact

    model, meta = None, {}
    if path.exists():
        try:
            model, meta = load_model(path)
        except CorruptArtifact:
            model = None
    if not all_true(model is not None, env):
        return None, {}
    return model, meta
