"""Quality against training time: one training run of F (stage 1) or G (stage 2) whose weights are evaluated every
`every` steps by the metrics of the tables, to show where more training stops paying.

The points are snapshots of one run (the learning rate still decays towards the run's end, as in FID-against-kimg
curves), at the scale's preset config plus overrides: F by its exact inverse with score denoising at each guidance
scale asked for, G by its one pass. Training seconds exclude the evaluations. One record per (scale, stage, seed):
results/<scale>/curve/<stage>__seed<N>.json.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import torch

from .cache import default_cache_dir, get_flow
from .config import ConfigError, RunConfig, apply_delta
from .evaluation import dataset_splits
from .models.biflow import BiFlow
from .models.tarflow import TARFlow
from .provenance import environment
from .runner import Trained, evaluate, sample_variant
from .training.loop import Snapshot
from .training.stages import train_backward, train_flow

STAGES = ("flow", "backward")


def curve_config(cfg: RunConfig, stage: str) -> RunConfig:
    """What a point is evaluated as: F by its exact inverse with score denoising, G as configured."""
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    return apply_delta(cfg, {"inverse": "exact", "backward.denoise": "score"}) if stage == "flow" else cfg


def training_curve(cfg: RunConfig, stage: str, seed: int, every: int, scales: tuple[float, ...], num: int,
                   cache_dir: Path | None = None, data_dir: Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Train `stage` of `cfg` from scratch (G against F from the artifact cache), evaluating its weights (G: the EMA
    weights) every `every` steps and at the end on `num` samples at each guidance scale of `scales`. Returns the
    record body: {'stage', 'every', 'points': [{'step', 'train_s', 'images_seen', 'w', 'metrics'}]}."""
    if every < 1 or num < 1 or not scales:
        raise ConfigError("a curve needs --every >= 1, --num >= 1 and at least one guidance scale")
    eval_cfg = apply_delta(curve_config(cfg, stage), {"sample.num_samples": num})
    splits = dataset_splits(cfg.dataset, str(data_dir) if data_dir else None)
    cache = cache_dir or default_cache_dir()
    flow = None if stage == "flow" else get_flow(cfg, splits.train, cache, progress)[0]
    batch = cfg.stage1.batch_size if stage == "flow" else cfg.stage2.batch_size
    points: list[dict[str, Any]] = []
    eval_s = 0.0
    t0 = time.perf_counter()

    def score(step: int, weights: dict[str, torch.Tensor]) -> None:
        nonlocal eval_s
        start = time.perf_counter()
        model = TARFlow(cfg.flow) if stage == "flow" else BiFlow(cfg.trained_backward)
        model.load_state_dict(weights)
        model.eval()
        t = Trained(eval_cfg, model if stage == "flow" else flow, None if stage == "flow" else model,
                           splits, {})
        train_s = start - t0 - eval_s
        for w in scales:
            images, _ = sample_variant(t, seed, cfg_scale=w)
            metrics = evaluate(t, images, seed, data_dir, cache, nll=stage == "flow" and w == scales[0])
            points.append({"step": step, "train_s": train_s, "images_seen": step * batch, "w": w, "metrics": metrics})
        eval_s += time.perf_counter() - start

    if stage == "flow":
        train_flow(cfg, splits.train, None, progress, snapshot=Snapshot(every, score))
    else:
        train_backward(cfg, flow, splits.train, seed, None, progress, snapshot=Snapshot(every, score))
    return {"stage": stage, "every": every, "scales": list(scales), "num_samples": num, "points": points}


def curve_record(cfg: RunConfig, seed: int, body: dict[str, Any]) -> dict[str, Any]:
    """A curve's record: results/<scale>/curve/<stage>__seed<N>.json."""
    return {"kind": "curve", "scale": cfg.scale, "ablation": "curve", "variant": body["stage"], "seed": seed,
            "label": {"flow": "F (exact inverse, score denoising)", "backward": "G (one pass)"}[body["stage"]],
            "config": cfg.to_dict(), **body, "env": environment(),
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def flattening(points: list[dict[str, Any]], metric: str, w: float, higher_is_better: bool = False
               ) -> dict[str, Any] | None:
    """Where a curve at guidance `w` flattens: the first point whose gain in `metric` over the point at (or before)
    half its step is within that earlier point's noise (`<metric>_std`, 0 when absent): doubling the training no
    longer paid. {'step': the earlier step, 'to_step', 'gain', 'noise'}, or None while every doubling paid."""
    sign = -1.0 if higher_is_better else 1.0
    series = sorted((p["step"], sign * p["metrics"][metric], p["metrics"].get(f"{metric}_std", 0.0))
                    for p in points if p["w"] == w and isinstance(p["metrics"].get(metric), (int, float)))
    for i, (step, value, _) in enumerate(series):
        earlier = [s for s in series[:i] if s[0] <= step / 2]
        if earlier:
            prev_step, prev_value, prev_std = earlier[-1]
            if prev_value - value <= prev_std:
                return {"step": prev_step, "to_step": step, "gain": prev_value - value, "noise": prev_std}
    return None
