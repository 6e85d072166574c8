"""The ablation runner: spec + variant + scale + seed -> one result record.

    resolve     scale preset + spec baseline + variant delta (+ --set overrides)       (ablations.py, config.py)
    stage 1     F from the artifact cache, trained on a miss; shared by every variant with the same F config
    stage 2     G likewise (none for the exact inverse)                                 (training/cache.py)
    sample      one seed per image, class-balanced labels                               (sample.py)
    evaluate    Frechet distance / IS / precision / recall in the scale's feature space, the domain classifier's
                acc_cls / conf_cls / fd_cls (evaluation.py), NLL of F; diagnostics (noise left in the samples, for
                a learned inverse how far G is from F's inverse; measure.py); NFE, params, latency; guided rows at
                every w of the shared sweep, reported at the best. Latent scales decode the samples with the VAE
                and score them against FID reference statistics instead (latent_eval.py)
    calibrate   pixel scales: the same metrics on real images (evaluation.py: as they are, + training noise, 3x3
                box blur), once per (dataset, eval config, number of images, noise): results/<scale>/calibration.json
    record      results/<scale>/<ablation>/<variant>__seed<N>[__<config hash>].json, written atomically under a
                directory lock (measure.py measures, results.py stores: the hash names every config but the
                variant's default)

A variant already recorded with the same config hash (a valid record) is skipped unless `force`; records of other
configs stay beside it. A variant whose config hash and seed another table has recorded (every table's baseline is
the same run) shares that record's measurement instead of training and evaluating it again, unless `force`. A
killed run resumes from the checkpoint of the stage it was in, because every artifact and checkpoint is keyed by the
hash of what determines it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .ablations import AblationSpec, get_spec
from .config import ConfigError, RunConfig
from .data import class_balanced_labels, dataset_splits, image_grid_png
from .distributed import DistEnv, barrier, broadcast_object
from .edit_table import measure_edits
from .evaluation import ensure_calibration, image_metrics
from .files import LockBusy, dir_lock
from .identity import RunIdentity, run_identity
from .latent_eval import latent_eval, latent_metrics, unit_range
from .metrics.extractors import INCEPTION_NAME, RESULT_KEYS
from .measure import Trained, build_measurement, held_out_bpd, primary_metric
from .paths import default_cache_dir, default_results_dir
from .provenance import environment
from .results import (check_name, find_measurement, find_record, log, share_measurement,
                      write_grids, write_record, write_variant_record)
from .sample import Sampler, generate, guidance_scales
from .speed.benchmark import record_speed_bench
from .training.cache import distributed_micro_batch, train_stages
from .training.perceptual import WEIGHT_MODES, perceptual_networks, require_weights
from .weights import resolve_weights

@dataclass
class RunOptions:
    results_dir: Path = field(default_factory=default_results_dir)  # results/ of the checkout (paths.py)
    cache_dir: Path | None = None
    data_dir: Path | None = None
    force: bool = False
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)
    micro_batch: int | None = None  # rows per forward pass in training (None: the batch split over the ranks)
    env: DistEnv = field(default_factory=DistEnv)  # this process's place in a torchrun job (one process: the default)
    vae: str | Path | None = None  # latent scales: the VAE directory (None: BIFLOW_VAE, then the local caches)
    ref_stats: Path | None = None  # latent scales: FID reference statistics (.npz) or a folder of reference images

    @property
    def cache(self) -> Path:
        return self.cache_dir or default_cache_dir()


def preflight(cfg: RunConfig, seed: int) -> None:
    """What would otherwise fail only after training: the seed, the perceptual and feature networks named by the
    config, and their pretrained weights (WeightsError names the file). Raises before any work starts."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed {seed!r}: must be an integer from 0 to 2**32 - 1")
    s2 = cfg.stage2
    if cfg.inverse == "learned" and s2.metric != "mse":
        if s2.perceptual_weights not in WEIGHT_MODES:
            raise ConfigError(f"stage2.perceptual_weights={s2.perceptual_weights!r} is not one of "
                              f"{', '.join(WEIGHT_MODES)}")
        if s2.perceptual_weights == "pretrained":
            for term, network in perceptual_networks(s2).items():
                require_weights(term, network)
    if cfg.eval.extractor not in RESULT_KEYS:
        raise ConfigError(f"eval.extractor={cfg.eval.extractor!r} is not one of {', '.join(RESULT_KEYS)}")
    if cfg.eval.extractor == INCEPTION_NAME:
        resolve_weights(INCEPTION_NAME)


def train_variant(cfg: RunConfig, seed: int, opts: RunOptions) -> Trained:
    """F and (for the learned inverse) G for `cfg` (checked by `preflight`), from the artifact cache or trained now."""
    splits = dataset_splits(cfg.dataset, str(opts.data_dir) if opts.data_dir else None)
    if cfg.flow.num_classes and splits.train.num_classes > cfg.flow.num_classes:
        raise ConfigError(f"{cfg.scale}: the data has {splits.train.num_classes} classes but the models embed "
                          f"{cfg.flow.num_classes}; pass data of at most {cfg.flow.num_classes} classes or set "
                          f"flow.num_classes and backward.num_classes")
    latent = latent_eval(cfg, opts.vae, opts.ref_stats, opts.env, opts.cache) if cfg.dataset == "latents" else None
    flow, g, train = train_stages(cfg, seed, splits.train, opts.cache, opts.env, opts.micro_batch, opts.progress)
    return Trained(cfg, flow, g, splits, train, latent)


def sample_variant(t: Trained, seed: int, num: int | None = None, cfg_scale: float | None = None,
                   env: DistEnv | None = None) -> tuple[torch.Tensor | None, float]:
    """`num` images (default: the config's) with class-balanced labels at guidance `cfg_scale` (default: the
    config's); returns them and ms per image. Under torchrun every rank makes its share and rank 0 gets them all
    (the other ranks None): image i comes from seed (seed, i) whatever the number of processes. Latent scales
    return the VAE-decoded images as uint8."""
    cfg = t.cfg
    num = num or cfg.sample.num_samples
    labels = class_balanced_labels(num, cfg.flow.num_classes) if cfg.flow.num_classes else None
    sampler = Sampler.from_config(cfg)
    if cfg_scale is not None:
        sampler = dataclasses.replace(sampler, cfg_scale=cfg_scale)
    start = time.perf_counter()
    post = t.latent.postprocess() if t.latent is not None else None
    images = generate(sampler, t.flow, t.g, labels, range(num), cfg.sample.batch_size, seed, env, post)
    return images, (time.perf_counter() - start) * 1000 / num


GUIDANCE_CAP = 16.0  # the largest w a sweep extends to when its best w sits at its edge


def guidance_cap(cfg: RunConfig) -> float:
    """The largest w a sweep extends to: GUIDANCE_CAP, or the largest w a training-time-CFG G was trained on."""
    if cfg.inverse == "learned" and cfg.backward.cfg_mode == "training-time":
        return min(GUIDANCE_CAP, cfg.stage2.cfg_max)
    if cfg.inverse == "peer" and cfg.peer.kind == "meanflow":  # trained with w as a condition, as G
        return min(GUIDANCE_CAP, cfg.peer.cfg_max)
    return GUIDANCE_CAP


def next_guidance(best_w: float | None, swept: list[float], cap: float = GUIDANCE_CAP) -> float | None:
    """The w to try next when the best w is the largest swept (double it, up to `cap`), else None: the curve turned."""
    top = max(swept)
    return None if best_w is None or best_w < top or top <= 0 or top >= cap else min(2 * top, cap)


def sweep_guidance(t: Trained, seed: int, data_dir: Path | None, cache_dir: Path | None = None,
                   env: DistEnv | None = None) -> tuple[dict[str, Any], torch.Tensor] | None:
    """Sample and evaluate at every guidance scale of the run, and beyond while the best w is the largest
    (next_guidance); the best w by the primary metric is the row's result, as the paper reports its guided rows.
    Returns {'scales', 'curve', 'best_w', 'selected_by'[, 'extended', 'note']} and the best w's images; under
    torchrun every rank samples its share and rank 0 alone evaluates (the other ranks get None)."""
    curve, best_images, best = [], None, None
    scales, extended = list(guidance_scales(t.cfg)), []

    def point(w: float) -> None:
        nonlocal best, best_images
        images, ms = sample_variant(t, seed, cfg_scale=w, env=env)
        if images is None:  # not rank 0
            return
        metrics = evaluate(t, images, seed, data_dir, cache_dir, nll=False)  # F's NLL does not depend on w
        metric = primary_metric(metrics)
        curve.append({"w": w, "metrics": metrics, "ms_per_image": ms})
        if best is None or metrics[metric] < best["metrics"][metric]:
            best, best_images = curve[-1], images

    for w in scales:
        point(w)
    while len(scales) > 1:  # a single w is a setting, not a sweep: nothing to extend
        w = next_guidance(best["w"] if best else None, scales + extended, guidance_cap(t.cfg))
        w = broadcast_object(w, env) if env is not None else w  # every rank samples, rank 0 decides
        if w is None:
            break
        extended.append(w)
        point(w)
    if best is None or best_images is None:
        return None
    guidance = {"scales": scales, "curve": curve, "best_w": best["w"], "selected_by": primary_metric(best["metrics"])}
    if extended:  # the loop stops where the curve turns or at the cap
        guidance.update(extended=extended, note=(
            f"guidance sweep extended to w = {', '.join(f'{w:g}' for w in extended)}: its best w was its largest "
            f"({max(scales):g}); " + (f"the curve turns after w = {best['w']:g}" if best["w"] < max(extended) else
                                      f"still best at the cap w = {max(extended):g}, the curve has not turned")))
    return guidance, best_images


def evaluate(t: Trained, images: torch.Tensor, seed: int, data_dir: Path | None = None,
             cache_dir: Path | None = None, nll: bool = True) -> dict[str, float]:
    """Sample quality against held-out real images (`image_metrics`, the labels being those `sample_variant` drew),
    and (`nll`) F's NLL on held-out noisy data (what F models). Latent scales: `latent_metrics` of the decoded images."""
    cfg = t.cfg
    labels = class_balanced_labels(images.shape[0], cfg.flow.num_classes) if cfg.flow.num_classes else None
    metrics = image_metrics(cfg, images, labels, data_dir, cache_dir) if t.latent is None else \
        latent_metrics(cfg, images, t.latent)
    if nll and t.flow is not None:  # a peer has no likelihood
        metrics["bpd"] = held_out_bpd(t, seed)
    return metrics


def identity(spec: AblationSpec, variant: str, scale: str, opts: RunOptions,
             cfg: RunConfig | None = None) -> tuple[RunConfig, RunIdentity]:
    """The config a run of the variant resolves to under `opts` (`cfg`, when resolved already) and its identity
    (identity.run_identity)."""
    cfg = cfg or spec.resolve(variant, scale, opts.overrides)
    micro = distributed_micro_batch(cfg, opts.env, opts.micro_batch)
    return cfg, run_identity(cfg, spec.resolve(variant, scale), micro)


def resolve_variants(spec: AblationSpec, names: list[str], scale: str, seed: int,
                     overrides: dict[str, Any]) -> dict[str, RunConfig]:
    """Each variant's config, resolved once and checked before any work starts (`preflight`, the names its record
    file takes); the CLI calls it before the process group exists, `run` passes the result down."""
    configs = {}
    for name in names:
        configs[name] = cfg = spec.resolve(name, scale, overrides)
        preflight(cfg, seed)
        for key, value in (("ablation", spec.name), ("variant", name)):
            if err := check_name(value, key):
                raise ConfigError(f"{spec.path or spec.name}: {err}: it names the results file")
    return configs


def run_variant(spec: AblationSpec, variant: str, scale: str, seed: int, opts: RunOptions, cfg: RunConfig,
                ident: RunIdentity) -> Path | None:
    """Train, sample, evaluate and record one variant of resolved config `cfg` and identity `ident`. Under torchrun
    every rank trains (DDP) and samples its share; rank 0 alone evaluates and writes, and returns the record's path
    (the other ranks None)."""
    start = time.perf_counter()
    shown = ", ".join(f"{k}={v}" for k, v in ident.overrides.items())
    if opts.env.is_main:
        log(f"[{spec.name}/{variant}] scale={scale} seed={seed}"
            + (f" config {ident.config_hash} ({shown})" if shown else ""))
    t = train_variant(cfg, seed, opts)
    swept = sweep_guidance(t, seed, opts.data_dir, opts.cache, opts.env)
    if swept is None:  # not rank 0
        return None
    guidance, images = swept
    calibration = ensure_calibration(cfg, opts.results_dir, opts.data_dir, opts.cache) if t.latent is None else None
    png = image_grid_png(unit_range(images[:100]), nrow=10)
    return write_variant_record(spec, variant, scale, seed, opts.results_dir, ident,
                                build_measurement(t, seed, ident, guidance, calibration), png, start)


def run_edit_variant(spec: AblationSpec, variant: str, scale: str, seed: int, opts: RunOptions, cfg: RunConfig,
                     ident: RunIdentity) -> Path | None:
    """The editing table's record of one variant (edit_table.py) from its trained F and G: rank 0 edits and writes;
    under torchrun the other ranks only train."""
    start = time.perf_counter()
    t = train_variant(cfg, seed, opts)
    if not opts.env.is_main:
        return None
    log(f"[{spec.name}/{variant}] scale={scale} seed={seed}: editing held-out images")
    body, grids = measure_edits(t, seed, opts.cache, opts.data_dir, opts.progress)
    pngs = write_grids(spec, variant, scale, seed, opts.results_dir, ident, grids)
    return write_record(opts.results_dir, {
        "kind": "editing", "ablation": spec.name, "variant": variant, "scale": scale, "seed": seed,
        "label": spec.variants[variant].label or variant, "spec_version": spec.version, "config": cfg.to_dict(),
        "config_hash": ident.config_hash, "overrides": ident.overrides, "micro_batch": ident.micro_batch, **body,
        "grids": pngs, "train": t.train, "env": environment(), "wall_time_s": time.perf_counter() - start,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})


def run(ablation: str, variants: list[str] | None = None, scale: str = "tiny", seed: int = 0,
        opts: RunOptions | None = None, plan: Callable[[], str] | None = None,
        configs: dict[str, RunConfig] | None = None) -> list[Path]:
    """Run (or skip, when a record of the same config hash exists) each variant of an ablation, in the order given,
    leaving to another job a row it is measuring; returns the record paths of the rows this job measured or found.
    `configs`: the variants as `resolve_variants` resolved and checked them (else resolved here). `plan` gives the
    line rank 0 prints before the first variant (the CLI's: how many variants and about how long,
    progress.run_plan)."""
    opts = opts or RunOptions()
    spec = get_spec(ablation)
    names = variants or list(spec.variants)
    if configs is None:
        configs = resolve_variants(spec, names, scale, seed, opts.overrides) if spec.kind != "speed" else {}
    idents = {}
    for name, cfg in configs.items():  # what needs the processes, checked before any work starts too
        idents[name] = identity(spec, name, scale, opts, cfg)[1]  # refuses a batch the processes cannot share
        if cfg.dataset == "latents":  # the VAE and the reference statistics (loaded once, kept for the run)
            latent_eval(cfg, opts.vae, opts.ref_stats, opts.env, opts.cache)
    env = opts.env
    if spec.kind == "speed":  # timing is one process's business: rank 0 times, the others wait
        paths = [record_speed_bench(opts.results_dir, scale, wait=False, progress=opts.progress)[0]] \
            if env.is_main else []
        barrier(env)
        return paths
    paths, left = [], []
    if plan is not None and env.is_main:
        log(plan())
    for k, name in enumerate(names, 1):
        if env.is_main:  # how far the run has come, against the plan above
            log(f"[{k}/{len(names)}] {spec.name}/{name}")
        with row_lock(opts.results_dir / scale / spec.name, name, seed, env) as holder:
            if holder is not None:  # another job measures this row: it is theirs, and we go on to the next
                if env.is_main:
                    log(f"[{spec.name}/{name}] being measured by {holder} (seed {seed}): left to it")
                left.append(name)
                continue
            path = measure_row(spec, name, scale, seed, opts, configs[name], idents[name])
        paths.append(path)
    if left and env.is_main:
        log(f"{spec.name}: {len(left)} variant(s) left to the other job(s) on this table: {', '.join(left)}")
    return paths


def measure_row(spec: AblationSpec, name: str, scale: str, seed: int, opts: RunOptions, cfg: RunConfig,
                ident: RunIdentity) -> Path | None:
    """One row of a table, its lock held: skipped when recorded (looked up under the lock, so that a row another job
    has just finished is not measured twice), copied when another table recorded the same measurement, else run."""
    env = opts.env
    found = find_record(opts.results_dir, scale, spec.name, name, seed, ident.config_hash) if env.is_main else None
    found = broadcast_object(found, env)  # rank 0's results directory decides, for every rank
    if found is not None and not opts.force:
        if env.is_main:
            log(f"[{spec.name}/{name}] already recorded (config {ident.config_hash}), skipping: {found} "
                "(--force to re-run)")
        return found
    shared = find_measurement(opts.results_dir, scale, seed, ident.config_hash) \
        if env.is_main and not opts.force and spec.kind == "quality" else None
    if broadcast_object(shared is not None, env):  # rank 0 copies; the other ranks have nothing to do
        path = share_measurement(spec, name, scale, seed, opts.results_dir, ident, *shared,
                                 config=cfg.to_dict()) if env.is_main else None
        return broadcast_object(path, env)
    measure = run_edit_variant if spec.kind == "editing" else run_variant
    path = measure(spec, name, scale, seed, opts, cfg, ident)
    barrier(env)  # the other ranks wait for rank 0's evaluation before the next variant's training
    return broadcast_object(path, env)


@contextlib.contextmanager
def row_lock(directory: Path, variant: str, seed: int, env: DistEnv) -> Iterator[str | None]:
    """The lock of one row (results/<scale>/<table>/.lock-<variant>-seed<k>), taken by rank 0 without waiting and
    held while the row is measured: yields None when it is ours, else who holds it (every rank alike). Jobs on one
    table thus share its rows: each takes the rows no other job holds (`run --reverse` meets a forward job in the
    middle)."""
    with contextlib.ExitStack() as stack:
        holder = None
        if env.is_main:
            try:
                stack.enter_context(dir_lock(directory, wait=False, name=f".lock-{variant}-seed{seed}"))
            except LockBusy as e:
                holder = e.holder
        yield broadcast_object(holder, env)
