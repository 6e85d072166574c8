"""Artifact cache, the pipeline's step between training and sampling: trained models keyed by a hash of everything
that determines them, and the orchestration of the two training stages around it (`get_flow`, `get_backward`,
both in `train_stages`), one code path for one process and for every rank of a torchrun job.

    <cache>/stage1/<key>/flow.pt        F, shared by every variant whose data, flow and stage-1 config agree (and
                                        micro-batch / device, where they change the weights: identity.flow_key)
    <cache>/stage2/<key>/backward.pt    G, keyed by its own config and the key of the F it was trained against
    <cache>/peer/<key>/peer.pt          a 1-NFE peer (MeanFlow, flow matching), keyed by its data, backbone and training
    <cache>/*/<key>/checkpoint.pt       the in-progress training state (resumed after a kill, removed when done)

Every file has a .sha256 sidecar; a corrupted or truncated artifact, or one that holds another model than its key
says (a foreign or moved file), is reported by name and rebuilt, never loaded. A stage's meta says `resumed_from`,
the checkpoint step its training picked up from (0: from scratch).
Each artifact carries its model config, so it can be rebuilt without re-typing flags (nanoGPT-style). The cache's
home is paths.default_cache_dir (BIFLOW_CACHE, else the project's runs/cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ..config import ConfigError, PeerConfig, RunConfig
from ..data import ImageDataset, LatentDataset
from ..distributed import DistEnv, all_true, barrier
from ..files import CorruptArtifact, LockBusy, atomic_torch_save, dir_lock, remove_artifact, verified_torch_load
from ..identity import backward_key, flow_key, peer_key
from ..models.biflow import BiFlow, BiFlowConfig
from ..models.flow_matching import FlowMatching, FlowMatchingConfig
from ..models.meanflow import MeanFlow, MeanFlowConfig
from ..models.tarflow import TARFlow, TARFlowConfig
from .loop import FitResult
from .budget import equal_compute, resolved_peer
from .stages import build_peer, train_backward, train_flow, train_peer


def stage1_dir(cache_dir: Path, cfg: RunConfig, micro_batch: int | None = None, device: str = "cpu") -> Path:
    """Where F of `cfg` lives: <cache>/stage1/<key>/ (flow.pt, and checkpoint.pt while it trains)."""
    return cache_dir / "stage1" / flow_key(cfg, micro_batch, device)


def stage2_dir(cache_dir: Path, cfg: RunConfig, seed: int, micro_batch: int | None = None,
               device: str = "cpu") -> Path:
    """Where G of `cfg` and `seed` lives: <cache>/stage2/<key>/ (backward.pt, and checkpoint.pt while it trains)."""
    return cache_dir / "stage2" / backward_key(cfg, seed, micro_batch, device)


@dataclass
class Artifact:
    path: Path
    cached: bool  # loaded from the cache rather than trained by this call
    meta: dict[str, Any]


# Every model the cache holds, by the name its artifact stores (artifacts from before the name: F or G by config)
MODELS = {cls.__name__: (cls, config) for cls, config in ((TARFlow, TARFlowConfig), (BiFlow, BiFlowConfig),
                                                          (MeanFlow, MeanFlowConfig), (FlowMatching, FlowMatchingConfig))}


def save_model(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    atomic_torch_save({"model": type(model).__name__, "config": model.config.to_dict(),
                       "state_dict": model.state_dict(), "meta": meta}, path)


def load_model(path: Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild a model (F, G or a peer) from an artifact alone (the config travels inside it)."""
    blob = verified_torch_load(path)
    try:  # a checksummed file that is not a model artifact of this version (foreign, or another architecture)
        cfg = blob["config"]
        cls, config = MODELS[blob.get("model") or ("BiFlow" if "strategy" in cfg else "TARFlow")]
        model = cls(config(**cfg))
        model.load_state_dict(blob["state_dict"])
        meta = dict(blob["meta"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptArtifact(f"{path}: not a model artifact of this version ({reason})") from None
    return model.eval(), meta


def _cached(path: Path, expected: Any, remove: bool = True) -> tuple[Any, dict[str, Any]] | None:
    """The artifact at `path` when it is readable and holds a model of `expected`'s config; else None, and
    (`remove`: the process that writes) the bad file is deleted so the stage is rebuilt."""
    if not path.exists():
        return None
    try:
        model, meta = load_model(path)
        if model.config != expected:
            raise CorruptArtifact(f"{path}: holds a model of another config than its cache key says (moved file?)")
        return model, meta
    except CorruptArtifact as e:
        if remove:
            print(f"warning: {e}; rebuilding it", file=sys.stderr)
            remove_artifact(path)
        return None


def _meta(result: FitResult, env: DistEnv) -> dict[str, Any]:
    """What a record's `train` section says about a stage; resumed_from > 0 when a checkpoint was picked up."""
    meta = {"seconds": result.seconds, "terms": result.terms, "skipped_steps": result.skipped_steps,
            "steps": result.steps, "resumed_from": result.resumed_from}
    if env.distributed:
        meta.update(world_size=env.world_size, micro_batch=result.micro_batch, device=env.device.type)
    return meta


def _store(model: TARFlow | BiFlow, directory: Path, name: str, meta: dict[str, Any]) -> Path:
    """The trained model into the cache; its finished training's checkpoint is removed."""
    path = directory / name
    save_model(model, path, meta)
    remove_artifact(directory / "checkpoint.pt")
    return path


def _stage(directory: Path, name: str, expected: Any,
           train: Callable[[Path], tuple[Any, FitResult]], env: DistEnv) -> tuple[Any, Artifact]:
    """One stage through the cache, on one process or every rank of a torchrun job alike: the artifact when every
    rank can read it, else trained (DDP across the ranks), written by rank 0 alone, then shared."""
    path = directory / name
    with _training_lock(directory, env):
        hit = _cached(path, expected, remove=env.is_main)
        if all_true(hit is not None, env):
            return hit[0].to(env.device), Artifact(path, True, hit[1])  # type: ignore[index]
        model, result = train(directory / "checkpoint.pt")
        meta = _meta(result, env)
        if env.is_main:
            _store(model, directory, name, meta)
        barrier(env)
    return model, Artifact(path, False, meta)


@contextlib.contextmanager
def _training_lock(directory: Path, env: DistEnv) -> Iterator[None]:
    """One process: the artifact's lock, so that two runs side by side (two tables on one cache) train it once,
    the second waiting for the first and then loading its result. Under torchrun the ranks train together."""
    with contextlib.ExitStack() as stack:
        if env.world_size == 1:
            try:
                stack.enter_context(dir_lock(directory, wait=False))
            except LockBusy:
                print(f"[cache] another process is training {directory}: waiting for it", file=sys.stderr, flush=True)
                stack.enter_context(dir_lock(directory, wait=True))
        yield


def get_flow(cfg: RunConfig, dataset: ImageDataset | LatentDataset, cache_dir: Path, progress: bool = True,
             micro_batch: int | None = None, env: DistEnv | None = None) -> tuple[TARFlow, Artifact]:
    """F of `cfg` from the cache, trained on a miss (under torchrun: with DDP on every rank)."""
    env = env or DistEnv()
    return _stage(stage1_dir(cache_dir, cfg, micro_batch, env.device.type), "flow.pt", cfg.flow,
                  lambda ck: train_flow(cfg, dataset, ck, progress and env.is_main, env=env, micro_batch=micro_batch),
                  env)


def get_backward(cfg: RunConfig, seed: int, flow: TARFlow, dataset: ImageDataset | LatentDataset, cache_dir: Path,
                 progress: bool = True, micro_batch: int | None = None,
                 env: DistEnv | None = None) -> tuple[BiFlow, Artifact]:
    """G of `cfg` and `seed` against `flow`, from the cache or trained likewise."""
    env = env or DistEnv()
    return _stage(stage2_dir(cache_dir, cfg, seed, micro_batch, env.device.type), "backward.pt", cfg.trained_backward,
                  lambda ck: train_backward(cfg, flow, dataset, seed, ck, progress and env.is_main, env=env,
                                            micro_batch=micro_batch), env)


def peer_dir(cache_dir: Path, cfg: RunConfig, peer: PeerConfig, seed: int, micro_batch: int | None = None,
             device: str = "cpu") -> Path:
    """Where a 1-NFE peer of `cfg`'s data and backbone lives: <cache>/peer/<key>/ (peer.pt, checkpoint.pt)."""
    return cache_dir / "peer" / peer_key(cfg, peer, seed, micro_batch, device)


def get_peer(cfg: RunConfig, peer: PeerConfig, seed: int, dataset: ImageDataset | LatentDataset, cache_dir: Path,
             progress: bool = True, micro_batch: int | None = None,
             env: DistEnv | None = None) -> tuple[MeanFlow | FlowMatching, Artifact]:
    """A 1-NFE peer from the cache, trained on a miss, like F and G."""
    env = env or DistEnv()
    return _stage(peer_dir(cache_dir, cfg, peer, seed, micro_batch, env.device.type), "peer.pt",
                  build_peer(cfg, peer).config,
                  lambda ck: train_peer(cfg, peer, dataset, seed, ck, progress and env.is_main, env=env,
                                        micro_batch=micro_batch), env)


def train_stages(cfg: RunConfig, seed: int, dataset: ImageDataset | LatentDataset, cache_dir: Path,
                 env: DistEnv | None = None, micro_batch: int | None = None,
                 progress: bool = True) -> tuple[TARFlow | None, nn.Module | None, dict[str, Any]]:
    """F (stage 1) and, for the learned inverse, G (stage 2) of `cfg`, each from the cache or trained, on one
    process or every rank of a torchrun job (the micro-batch defaults to an even split of the batch over the
    ranks, `distributed_micro_batch`). Returns F, G (None for the exact inverse) and the per-stage summary a
    record's `train` section holds; for a peer (inverse "peer"): no F, the peer in G's place, trained at its
    resolved steps (training/budget.py), the run's seed its own."""
    env = env or DistEnv()
    micro_batch = distributed_micro_batch(cfg, env, micro_batch)
    cfg = seeded_flow(cfg, seed)
    if cfg.inverse == "peer":  # at equal compute the record keeps the budget: the FLOPs of F's, G's and its steps
        budget = equal_compute(cfg, (cfg.peer,)) if cfg.peer.equal_compute else None
        model, art = get_peer(cfg, resolved_peer(cfg, budget), seed, dataset, cache_dir, progress, micro_batch, env)
        return None, model, {"peer": {**art.meta, "cached": art.cached, "key": art.path.parent.name},
                             **({"budget": budget} if budget else {})}
    flow, art = get_flow(cfg, dataset, cache_dir, progress, micro_batch, env)
    summary = {"stage1": {**art.meta, "cached": art.cached, "key": art.path.parent.name}}
    g = None
    if cfg.inverse == "learned":
        g, art = get_backward(cfg, seed, flow, dataset, cache_dir, progress, micro_batch, env)
        summary["stage2"] = {**art.meta, "cached": art.cached, "key": art.path.parent.name}
    return flow, g, summary


def seeded_flow(cfg: RunConfig, seed: int) -> RunConfig:
    """`cfg` with stage1.seed -1 (F seeded by the run) resolved to the run's seed: the F its key and training see."""
    if cfg.stage1.seed >= 0:
        return cfg
    return dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, seed=seed))


def distributed_micro_batch(cfg: RunConfig, env: DistEnv, micro_batch: int | None = None) -> int | None:
    """The micro-batch `train_stages` trains with: the micro-batch size changes the randomness drawn (one stream per
    micro-batch), so it is part of the key. Under DDP it defaults to the largest size that splits both stages'
    batches evenly over the processes (the tiny scale trains F at 64 and G at 32): one size for every variant, so
    that they share F. A size that does not split a trained stage's batch is refused before any training."""
    batches = {"learned": (cfg.stage1.batch_size, cfg.stage2.batch_size), "exact": (cfg.stage1.batch_size,),
               "peer": (cfg.peer.batch_size,)}[cfg.inverse]
    if micro_batch is None and env.distributed:
        common = math.gcd(cfg.stage1.batch_size, cfg.stage2.batch_size, cfg.peer.batch_size)
        micro_batch = max(1, common // env.world_size)
    for batch in batches if micro_batch is not None else ():
        if batch % micro_batch or (batch // micro_batch) % env.world_size:
            raise ConfigError(f"a training batch of {batch} does not split into micro-batches of {micro_batch} "
                              f"shared evenly by {env.world_size} processes: pass --micro-batch M such that "
                              f"{' and '.join(map(str, batches))} are multiples of {env.world_size} x M")
    return micro_batch
