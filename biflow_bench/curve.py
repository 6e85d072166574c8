"""Quality against training time: one training run of F (stage 1), G (stage 2) or a 1-NFE peer (inverse "peer")
whose weights are evaluated every `every` steps by the metrics of the tables, to show where more training stops
paying; or the checkpoints a run kept (a peer keeps them at a doubling schedule: training/stages.train_peer).

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

from .config import ConfigError, RunConfig, apply_delta
from .data import dataset_splits
from .files import verified_torch_load
from .models.biflow import BiFlow
from .models.tarflow import TARFlow
from .paths import default_cache_dir
from .provenance import environment
from .measure import Trained
from .runner import evaluate, sample_variant
from .training.budget import resolved_peer
from .training.cache import get_backward, get_flow, get_peer, peer_dir
from .training.loop import Snapshot, with_ema
from .training.stages import build_peer, train_backward, train_flow, train_peer

STAGES = ("flow", "backward", "peer")


def curve_config(cfg: RunConfig, stage: str) -> RunConfig:
    """What a point is evaluated as: F by its exact inverse with score denoising, G or a peer as configured."""
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    if (stage == "peer") != (cfg.inverse == "peer"):
        raise ConfigError(f"the {stage} curve needs " + ("--set inverse=peer (and peer.kind)" if stage == "peer" else
                                                         "a config whose inverse is not 'peer' (use stage peer)"))
    return apply_delta(cfg, {"inverse": "exact", "backward.denoise": "score"}) if stage == "flow" else cfg


def training_curve(cfg: RunConfig, stage: str, seed: int, every: int, scales: tuple[float, ...], num: int,
                   cache_dir: Path | None = None, data_dir: Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Train `stage` of `cfg` from scratch (G against F from the artifact cache), evaluating its weights (G: the EMA
    weights) every `every` steps and at the end on `num` samples at each guidance scale of `scales`. Returns the
    record body: {'stage', 'every', 'points': [{'step', 'train_s', 'images_seen', 'w', 'metrics'}]}."""
    if every < 1:
        raise ConfigError("a curve needs --every >= 1")
    scorer = _Scorer(cfg, stage, seed, scales, num, cache_dir, data_dir, progress)
    t0, eval_s = time.perf_counter(), 0.0

    def score(step: int, weights: dict[str, torch.Tensor]) -> None:
        nonlocal eval_s
        start = time.perf_counter()
        scorer(step, start - t0 - eval_s, weights)
        eval_s += time.perf_counter() - start

    if stage == "flow":
        train_flow(cfg, scorer.splits.train, None, progress, snapshot=Snapshot(every, score))
    elif stage == "peer":
        train_peer(cfg, resolved_peer(cfg), scorer.splits.train, seed, None, progress, snapshot=Snapshot(every, score))
    else:
        train_backward(cfg, scorer.flow, scorer.splits.train, seed, None, progress, snapshot=Snapshot(every, score))
    return scorer.body(every=every)


def checkpoint_curve(cfg: RunConfig, stage: str, seed: int, checkpoints: list[Path], scales: tuple[float, ...],
                     num: int, cache_dir: Path | None = None, data_dir: Path | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """The same points scored from a finished run instead of a new one: `checkpoints` are training checkpoints of
    `stage` of `cfg` (the files fit writes every checkpoint_every steps, kept as the run went; G: their EMA
    weights), and the last point is the stage's trained model from the artifact cache (trained on a miss). Each
    point's training seconds are the checkpoint's own."""
    scorer = _Scorer(cfg, stage, seed, scales, num, cache_dir, data_dir, progress)
    for path in sorted(checkpoints):
        state = verified_torch_load(path)
        if not isinstance(state, dict) or not {"step", "model", "elapsed"} <= set(state):
            raise ConfigError(f"{path}: not a training checkpoint (no step / model / elapsed); pass the "
                              "checkpoint.pt files a stage writes every checkpoint_every steps")
        weights = state["model"]
        if stage != "flow" and state.get("ema"):  # G's and a peer's curves score the EMA's weights, as fit's snapshots do
            weights = with_ema(scorer.model(), weights, state["ema"])
        scorer(int(state["step"]), float(state["elapsed"]), weights, source=str(path))
    if stage == "flow":
        (model, artifact), steps = get_flow(cfg, scorer.splits.train, scorer.cache, progress), cfg.stage1.steps
    elif stage == "peer":
        peer = resolved_peer(cfg)
        (model, artifact), steps = get_peer(cfg, peer, seed, scorer.splits.train, scorer.cache, progress), peer.steps
    else:
        model, artifact = get_backward(cfg, seed, scorer.flow, scorer.splits.train, scorer.cache, progress)
        steps = cfg.stage2.steps
    scorer(steps, float(artifact.meta.get("seconds", float("nan"))), model.state_dict(), source=str(artifact.path))
    return scorer.body(checkpoints=len(checkpoints))


def kept_checkpoints(cfg: RunConfig, seed: int, cache_dir: Path | None = None) -> list[Path]:
    """The checkpoints the cached run of `cfg`'s peer kept (training/stages.train_peer's doubling schedule)."""
    folder = peer_dir(cache_dir or default_cache_dir(), cfg, resolved_peer(cfg), seed)
    found = sorted(folder.glob("checkpoint-*.pt"))
    if not found:
        raise ConfigError(f"no kept checkpoints in {folder}: train the peer first (its table's row, e.g. "
                          "`biflow-bench run one-nfe --variants meanflow-1`) with the same --set and --seed")
    return found


class _Scorer:
    """Scores one stage's weights at a step: samples at each guidance scale, evaluated by the tables' metrics."""

    def __init__(self, cfg: RunConfig, stage: str, seed: int, scales: tuple[float, ...], num: int,
                 cache_dir: Path | None, data_dir: Path | None, progress: bool):
        if num < 1 or not scales:
            raise ConfigError("a curve needs --num >= 1 and at least one guidance scale")
        self.cfg, self.stage, self.seed, self.scales, self.num = cfg, stage, seed, scales, num
        self.eval_cfg = apply_delta(curve_config(cfg, stage), {"sample.num_samples": num})
        self.data_dir = data_dir
        self.splits = dataset_splits(cfg.dataset, str(data_dir) if data_dir else None)
        self.cache = cache_dir or default_cache_dir()
        self.flow = None if stage != "backward" else get_flow(cfg, self.splits.train, self.cache, progress)[0]
        self.points: list[dict[str, Any]] = []

    def model(self) -> torch.nn.Module:
        """An untrained model of the stage, to load a point's weights into."""
        if self.stage == "peer":
            return build_peer(self.cfg, self.cfg.peer)
        return TARFlow(self.cfg.flow) if self.stage == "flow" else BiFlow(self.cfg.trained_backward)

    def __call__(self, step: int, train_s: float, weights: dict[str, torch.Tensor], source: str = "") -> None:
        model = self.model()
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise ConfigError(f"{source or 'weights'} at step {step} do not fit the {self.stage} of this config "
                              f"(pass the --set overrides it was trained with): {str(e).splitlines()[0]}") from None
        model.eval()
        t = Trained(self.eval_cfg, model if self.stage == "flow" else self.flow,
                    None if self.stage == "flow" else model, self.splits, {})
        batch = {"flow": self.cfg.stage1, "backward": self.cfg.stage2, "peer": self.cfg.peer}[self.stage].batch_size
        for w in self.scales:
            images, _ = sample_variant(t, self.seed, cfg_scale=w)
            metrics = evaluate(t, images, self.seed, self.data_dir, self.cache,
                               nll=self.stage == "flow" and w == self.scales[0])
            self.points.append({"step": step, "train_s": train_s, "images_seen": step * batch, "w": w,
                                "metrics": metrics})

    def body(self, **how: Any) -> dict[str, Any]:
        return {"stage": self.stage, **how, "scales": list(self.scales), "num_samples": self.num,
                "points": self.points}


def curve_record(cfg: RunConfig, seed: int, body: dict[str, Any]) -> dict[str, Any]:
    """A curve's record: results/<scale>/curve/<stage or peer kind>__seed<N>.json."""
    variant = cfg.peer.kind if body["stage"] == "peer" else body["stage"]  # one curve per peer
    return {"kind": "curve", "scale": cfg.scale, "ablation": "curve", "variant": variant, "seed": seed,
            "label": {"flow": "F (exact inverse, score denoising)", "backward": "G (one pass)",
                      "peer": f"{cfg.peer.kind} ({cfg.sample.steps} steps)"}[body["stage"]],
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
