"""The ablation runner: spec + variant + scale + seed -> one result record.

    resolve     scale preset + spec baseline + variant delta (+ --set overrides)       (ablations.py, config.py)
    stage 1     F from the artifact cache, trained on a miss; shared by every variant with the same F config
    stage 2     G likewise (none for the exact inverse)
    sample      one seed per image, class-balanced labels                               (sample.py)
    evaluate    Frechet distance / IS in the scale's feature space, NLL of F, NFE, params, latency
    record      results/<scale>/<ablation>/<variant>__seed<N>[__<config hash>].json, written atomically under a
                directory lock (results.py: the hash names every config but the variant's default)

A variant already recorded with the same config hash (a valid record) is skipped unless `force`; records of other
configs stay beside it. A killed run resumes from the checkpoint of the stage it was in, because every artifact and
checkpoint is keyed by the hash of what determines it.
"""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .ablations import AblationSpec, get_spec
from .artifacts import default_cache_dir, get_backward, get_flow
from .config import ConfigError, RunConfig
from .data import DataSplits, class_balanced_labels, load_dataset, save_image_grid, to_uint8
from .io import dir_lock
from .metrics import INCEPTION_NAME, RESULT_KEYS, bits_per_dim, compute_fidelity, count_params, reference_stats
from .models.biflow import BiFlow
from .models.tarflow import TARFlow
from .perceptual import WEIGHT_MODES
from .results import RESULT_SCHEMA, _check_name, config_id, config_overrides, find_record, record_path, write_record
from .sample import Sampler, generate
from .weights import resolve_weights

DEFAULT_RESULTS = Path("results")


@dataclass
class RunOptions:
    results_dir: Path = DEFAULT_RESULTS
    cache_dir: Path | None = None
    data_dir: Path | None = None
    force: bool = False
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    micro_batch: int | None = None  # rows per forward pass in training (None: the whole batch)

    @property
    def cache(self) -> Path:
        return self.cache_dir or default_cache_dir()


@dataclass
class Trained:
    cfg: RunConfig
    flow: TARFlow
    g: BiFlow | None
    splits: DataSplits
    train: dict[str, Any]  # per stage: seconds, final loss terms, skipped steps, cached or not


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@cache
def _dataset(name: str, data_dir: str | None) -> DataSplits:
    return load_dataset(name, data_dir)


def preflight(cfg: RunConfig, seed: int) -> None:
    """What would otherwise fail only after training: the seed, the perceptual and feature networks named by the
    config, and their pretrained weights (WeightsError names the file). Raises before any work starts."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed {seed!r}: must be an integer from 0 to 2**32 - 1")
    if cfg.dataset == "latents":  # samples must be decoded by the VAE and scored against ImageNet's statistics
        raise ConfigError(f"scale {cfg.scale!r} trains on VAE latents: `run` covers the pixel scales (tiny, small); "
                          "use `train-dist` and `sample-dist --vae DIR --ref-stats NPZ` (README: Paper scale)")
    s2 = cfg.stage2
    if cfg.inverse == "learned" and s2.metric != "mse":
        if s2.perceptual_weights not in WEIGHT_MODES:
            raise ConfigError(f"stage2.perceptual_weights={s2.perceptual_weights!r} is not one of "
                              f"{', '.join(WEIGHT_MODES)}")
        if s2.perceptual_weights == "pretrained":
            resolve_weights("vgg16")
            if "convnext" in s2.metric:
                resolve_weights("convnextv2")
    if cfg.eval.extractor not in RESULT_KEYS:
        raise ConfigError(f"eval.extractor={cfg.eval.extractor!r} is not one of {', '.join(RESULT_KEYS)}")
    if cfg.eval.extractor == INCEPTION_NAME:
        resolve_weights(INCEPTION_NAME)


def train_variant(cfg: RunConfig, seed: int, opts: RunOptions) -> Trained:
    """F and (for the learned inverse) G for `cfg`, from the artifact cache or trained now."""
    preflight(cfg, seed)
    splits = _dataset(cfg.dataset, str(opts.data_dir) if opts.data_dir else None)
    micro = opts.micro_batch
    flow, flow_art = get_flow(cfg, seed, splits.train, opts.cache, opts.progress, micro)
    train = {"stage1": {**flow_art.meta, "cached": flow_art.cached, "key": cfg.stage1_key(seed, micro)}}
    g = None
    if cfg.inverse == "learned":
        g, g_art = get_backward(cfg, seed, flow, splits.train, opts.cache, opts.progress, micro)
        train["stage2"] = {**g_art.meta, "cached": g_art.cached, "key": cfg.stage2_key(seed, micro)}
    return Trained(cfg, flow, g, splits, train)


def sample_variant(t: Trained, seed: int, num: int | None = None) -> tuple[torch.Tensor, float]:
    """`num` images (default: the config's) with class-balanced labels; returns them and ms per image."""
    cfg = t.cfg
    num = num or cfg.sample.num_samples
    labels = class_balanced_labels(num, cfg.flow.num_classes) if cfg.flow.num_classes else None
    start = time.perf_counter()
    images = generate(Sampler.from_config(cfg), t.flow, t.g, labels, range(num), cfg.sample.batch_size, seed)
    return images, (time.perf_counter() - start) * 1000 / num


@cache
def _reference_stats(dataset: str, data_dir: str | None, num_real: int, extractor: str, resize: int):
    """Feature mean and covariance of the held-out real images, once per process."""
    real = _dataset(dataset, data_dir).test.images[:num_real]
    return reference_stats(to_uint8(real), extractor=extractor, resize=resize)


def evaluate(t: Trained, images: torch.Tensor, seed: int, data_dir: Path | None = None) -> dict[str, float]:
    """Sample quality against held-out real images, and F's NLL on held-out noisy data (what F models)."""
    cfg, test = t.cfg, t.splits.test
    reference = _reference_stats(cfg.dataset, str(data_dir) if data_dir else None, cfg.eval.num_real,
                                 cfg.eval.extractor, cfg.eval.resize)
    metrics = compute_fidelity(to_uint8(images), reference, extractor=cfg.eval.extractor, resize=cfg.eval.resize)
    n = cfg.eval.nll_samples
    gen = torch.Generator().manual_seed(seed)
    noisy = test.images[:n] + cfg.stage1.noise_sigma * torch.randn(test.images[:n].shape, generator=gen)
    labels = test.labels[:n] if cfg.flow.num_classes else None
    metrics["bpd"] = bits_per_dim(t.flow, noisy, labels, test.levels)
    return metrics


def primary_metric(metrics: dict[str, float]) -> str:
    return next(k for k in ("fid", "fd_effnet") if k in metrics)


def notes_for(cfg: RunConfig) -> list[str]:
    notes = []
    if cfg.eval.extractor != "inception-v3-compat":
        notes.append(f"fd_effnet / is_effnet: Frechet distance and Inception Score in {cfg.eval.extractor} features "
                     f"(ImageNet weights) on {cfg.sample.num_samples} samples; not comparable to FID in absolute terms")
    if cfg.inverse == "learned" and cfg.stage2.metric != "mse" and cfg.stage2.perceptual_weights == "random":
        notes.append(f"perceptual terms ({cfg.stage2.metric}) use randomly initialised networks: pretrained VGG / "
                     "ConvNeXt V2 weights are not available offline")
    return notes


def environment() -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"git_commit": commit or "unknown", "torch": torch.__version__, "python": platform.python_version(),
            "device": "cpu", "threads": str(torch.get_num_threads())}


@dataclass(frozen=True)
class RunIdentity:
    """What a record is keyed by beyond (scale, ablation, variant, seed): results.py's config hash, and how the
    config differs from the variant's default (empty: the readable file name)."""

    config_hash: str
    overrides: dict[str, Any]
    micro_batch: int | None


def identity(spec: AblationSpec, variant: str, scale: str, opts: RunOptions) -> tuple[RunConfig, RunIdentity]:
    cfg = spec.resolve(variant, scale, opts.overrides)
    micro = cfg.effective_micro_batch(opts.micro_batch)
    overrides = config_overrides(cfg.to_dict(), spec.resolve(variant, scale).to_dict())
    if micro is not None:
        overrides["micro_batch"] = micro
    return cfg, RunIdentity(config_id(cfg.to_dict(), micro), overrides, micro)


def run_variant(spec: AblationSpec, variant: str, scale: str, seed: int, opts: RunOptions) -> Path:
    start = time.perf_counter()
    cfg, ident = identity(spec, variant, scale, opts)
    shown = ", ".join(f"{k}={v}" for k, v in ident.overrides.items())
    log(f"[{spec.name}/{variant}] scale={scale} seed={seed}" + (f" config {ident.config_hash} ({shown})" if shown else ""))
    t = train_variant(cfg, seed, opts)
    images, ms_per_image = sample_variant(t, seed)
    metrics = evaluate(t, images, seed, opts.data_dir)
    scale_dir = opts.results_dir / scale
    name = record_path(opts.results_dir, scale, spec.name, variant, seed,
                       ident.config_hash if ident.overrides else None).stem
    samples_png = Path("samples") / spec.name / f"{name}.png"
    save_image_grid(images, scale_dir / samples_png, nrow=10)
    sampler = Sampler.from_config(cfg)
    nfe, nfe_label = sampler.nfe(t.flow, t.g)
    metric = primary_metric(metrics)
    v = spec.variants[variant]
    record = {
        "schema": RESULT_SCHEMA, "kind": "ablation", "ablation": spec.name, "variant": variant,
        "label": v.label or variant, "scale": scale, "seed": seed, "spec_version": spec.version,
        "config": cfg.to_dict(), "config_hash": ident.config_hash, "overrides": ident.overrides,
        "micro_batch": ident.micro_batch, "metric": metric, "metrics": metrics,
        "nfe": nfe, "nfe_label": nfe_label,
        "params": {"flow": count_params(t.flow), "backward": count_params(t.g) if t.g is not None else 0},
        "timing": {"ms_per_image": ms_per_image, "images_per_s": 1000 / ms_per_image,
                   "sample_batch": cfg.sample.batch_size,
                   **{f"{k}_s": v["seconds"] for k, v in t.train.items()}},
        "paper": {**v.paper, "table": spec.paper_table}, "notes": notes_for(cfg),
        "samples_png": str(samples_png), "train": t.train, "env": environment(),
        "wall_time_s": time.perf_counter() - start,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path = write_record(opts.results_dir, record)
    log(f"[{spec.name}/{variant}] {metric}={metrics[metric]:.3f} bpd={metrics['bpd']:.3f} nfe={nfe_label} -> {path}")
    return path


def run(ablation: str, variants: list[str] | None = None, scale: str = "tiny", seed: int = 0,
        opts: RunOptions | None = None) -> list[Path]:
    """Run (or skip, when a record of the same config hash exists) each variant of an ablation; returns the record
    paths."""
    opts = opts or RunOptions()
    spec = get_spec(ablation)
    names = variants or list(spec.variants)
    for name in names:  # validate everything before any work starts
        preflight(spec.resolve(name, scale, opts.overrides), seed)
        for key, value in (("ablation", spec.name), ("variant", name)):
            if err := _check_name(value, key):
                raise ConfigError(f"{spec.path or spec.name}: {err}: it names the results file")
    if spec.kind == "speed":
        from .bench import run_speed_bench

        with dir_lock(opts.results_dir / scale, wait=False):
            return [write_record(opts.results_dir, run_speed_bench(scale=scale, progress=opts.progress))]
    paths = []
    with dir_lock(opts.results_dir / scale, wait=False):
        for name in names:
            _, ident = identity(spec, name, scale, opts)
            found = find_record(opts.results_dir, scale, spec.name, name, seed, ident.config_hash)
            if found is not None and not opts.force:
                log(f"[{spec.name}/{name}] already recorded (config {ident.config_hash}), skipping: {found} "
                    "(--force to re-run)")
                paths.append(found)
                continue
            paths.append(run_variant(spec, name, scale, seed, opts))
    return paths
