"""Artifact cache: trained models keyed by a hash of everything that determines them.

    <cache>/stage1/<key>/flow.pt        F, shared by every variant whose data, flow and stage-1 config agree (and
                                        micro-batch / device, where they change the weights: config.stage1_key)
    <cache>/stage2/<key>/backward.pt    G, keyed by its own config and the key of the F it was trained against
    <cache>/*/<key>/checkpoint.pt       the in-progress training state (resumed after a kill, removed when done)

Every file has a .sha256 sidecar; a corrupted or truncated artifact, or one that holds another model than its key
says (a foreign or moved file), is reported by name and rebuilt, never loaded. A stage's meta says `resumed_from`,
the checkpoint step its training picked up from (0: from scratch).
Each artifact carries its model config, so it can be rebuilt without re-typing flags (nanoGPT-style).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig
from .data import ImageDataset
from .files import CorruptArtifact, atomic_torch_save, verified_torch_load
from .models.biflow import BiFlow, BiFlowConfig
from .models.tarflow import TARFlow, TARFlowConfig
from .train import FitResult, train_backward, train_flow


def default_cache_dir() -> Path:
    return Path(os.environ.get("BIFLOW_CACHE", "runs/cache"))


@dataclass
class Artifact:
    path: Path
    cached: bool  # loaded from the cache rather than trained by this call
    meta: dict[str, Any]


def save_model(model: TARFlow | BiFlow, path: Path, meta: dict[str, Any]) -> None:
    atomic_torch_save({"config": model.config.to_dict(), "state_dict": model.state_dict(), "meta": meta}, path)


def load_model(path: Path) -> tuple[TARFlow | BiFlow, dict[str, Any]]:
    """Rebuild F or G from an artifact alone (the config travels inside it)."""
    blob = verified_torch_load(path)
    try:  # a checksummed file that is not a model artifact of this version (foreign, or another architecture)
        cfg = blob["config"]
        model: TARFlow | BiFlow = BiFlow(BiFlowConfig(**cfg)) if "strategy" in cfg else TARFlow(TARFlowConfig(**cfg))
        model.load_state_dict(blob["state_dict"])
        meta = dict(blob["meta"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptArtifact(f"{path}: not a model artifact of this version ({reason})") from None
    return model.eval(), meta


def _cached(path: Path, expected: TARFlowConfig | BiFlowConfig) -> tuple[Any, dict[str, Any]] | None:
    if not path.exists():
        return None
    try:
        model, meta = load_model(path)
        if model.config != expected:
            raise CorruptArtifact(f"{path}: holds a model of another config than its cache key says (moved file?)")
        return model, meta
    except CorruptArtifact as e:
        print(f"warning: {e}; rebuilding it", file=sys.stderr)
        path.unlink(missing_ok=True)
        Path(str(path) + ".sha256").unlink(missing_ok=True)
        return None


def _meta(result: FitResult) -> dict[str, Any]:
    """What a record's `train` section says about a stage; resumed_from > 0 when a checkpoint was picked up."""
    return {"seconds": result.seconds, "terms": result.terms, "skipped_steps": result.skipped_steps,
            "steps": result.steps, "resumed_from": result.resumed_from}


def _finish(model: TARFlow | BiFlow, directory: Path, name: str, meta: dict[str, Any]) -> Artifact:
    path = directory / name
    save_model(model, path, meta)
    for leftover in (directory / "checkpoint.pt", directory / "checkpoint.pt.sha256"):
        leftover.unlink(missing_ok=True)
    return Artifact(path, False, meta)


def get_flow(cfg: RunConfig, dataset: ImageDataset, cache_dir: Path, progress: bool = True,
             micro_batch: int | None = None) -> tuple[TARFlow, Artifact]:
    directory = cache_dir / "stage1" / cfg.stage1_key(micro_batch)
    hit = _cached(directory / "flow.pt", cfg.flow)
    if hit is not None:
        return hit[0], Artifact(directory / "flow.pt", True, hit[1])  # type: ignore[return-value]
    flow, result = train_flow(cfg, dataset, directory / "checkpoint.pt", progress, micro_batch=micro_batch)
    return flow, _finish(flow, directory, "flow.pt", _meta(result))


def get_backward(cfg: RunConfig, seed: int, flow: TARFlow, dataset: ImageDataset, cache_dir: Path,
                 progress: bool = True, micro_batch: int | None = None) -> tuple[BiFlow, Artifact]:
    directory = cache_dir / "stage2" / cfg.stage2_key(seed, micro_batch)
    hit = _cached(directory / "backward.pt", cfg.backward)
    if hit is not None:
        return hit[0], Artifact(directory / "backward.pt", True, hit[1])  # type: ignore[return-value]
    g, result = train_backward(cfg, flow, dataset, seed, directory / "checkpoint.pt", progress,
                               micro_batch=micro_batch)
    return g, _finish(g, directory, "backward.pt", _meta(result))
