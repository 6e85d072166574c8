"""The ablation runner: spec + variant + scale + seed -> one result record.

    resolve     scale preset + spec baseline + variant delta (+ --set overrides)       (ablations.py, config.py)
    stage 1     F from the artifact cache, trained on a miss; shared by every variant with the same F config
    stage 2     G likewise (none for the exact inverse)
    sample      one seed per image, class-balanced labels                               (sample.py)
    evaluate    Frechet distance / IS / precision / recall in the scale's feature space, the domain classifier's
                acc_cls / conf_cls / fd_cls (evaluation.py), NLL of F; diagnostics (noise left in the samples, for
                a learned inverse how far G is from F's inverse); NFE, params, latency; guided rows at every w of
                the shared sweep, reported at the best. Latent scales decode the samples with the VAE and score
                them against FID reference statistics instead (latent_eval.py)
    calibrate   pixel scales: the same metrics on real images (evaluation.py: as they are, + training noise, 3x3
                box blur), once per (dataset, eval config, number of images, noise): results/<scale>/calibration.json
    record      results/<scale>/<ablation>/<variant>__seed<N>[__<config hash>].json, written atomically under a
                directory lock (results.py: the hash names every config but the variant's default)

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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .ablations import AblationSpec, get_spec
from .cache import default_cache_dir, distributed_micro_batch, train_stages
from .config import ConfigError, RunConfig
from .data import DataSplits, class_balanced_labels, image_grid_png
from .evaluation import dataset_splits, ensure_calibration, image_metrics
from .distributed import DistEnv, barrier, broadcast_object
from .files import LockBusy, atomic_write_bytes, dir_lock
from .identity import RunIdentity, run_identity
from .latent_eval import LatentEval, latent_eval, latent_metrics, unit_range
from .metrics.extractors import INCEPTION_NAME, RESULT_KEYS
from .metrics.flow_norms import flow_norms
from .metrics.images import residual_noise
from .metrics.inverse import inverse_gaps, measure_noise_sensitivity, ms_per_image_batch1
from .metrics.likelihood import bits_per_dim, count_params
from .models.biflow import BiFlow
from .models.tarflow import TARFlow
from .provenance import environment
from .results import RESULT_SCHEMA, _check_name, find_measurement, find_record, record_path, write_record
from .sample import Sampler, generate
from .speed.benchmark import record_speed_bench
from .training.perceptual import WEIGHT_MODES, describe, require_weights
from .weights import resolve_weights

DEFAULT_RESULTS = Path("results")
INVERSE_PAIRS = 256  # held-out images on which G is compared with F's inverse


@dataclass
class RunOptions:
    results_dir: Path = DEFAULT_RESULTS
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


@dataclass
class Trained:
    cfg: RunConfig
    flow: TARFlow
    g: BiFlow | None
    splits: DataSplits
    train: dict[str, Any]  # per stage: seconds, final loss terms, skipped steps, cached or not
    latent: LatentEval | None = None  # latent scales: the VAE that decodes the samples and the reference statistics


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    """F and (for the learned inverse) G for `cfg`, from the artifact cache or trained now."""
    preflight(cfg, seed)
    splits = dataset_splits(cfg.dataset, str(opts.data_dir) if opts.data_dir else None)
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


def guidance_scales(cfg: RunConfig) -> tuple[float, ...]:
    """The guidance scales a run is evaluated at: the sweep for a guided row (cfg_scale > 0), else its cfg_scale."""
    return cfg.sample.cfg_sweep if cfg.sample.cfg_scale > 0 and cfg.sample.cfg_sweep else (cfg.sample.cfg_scale,)


def guidance_cap(cfg: RunConfig) -> float:
    """The largest w a sweep extends to: GUIDANCE_CAP, or the largest w a training-time-CFG G was trained on."""
    trained_on = getattr(getattr(cfg, "stage2", None), "cfg_max", GUIDANCE_CAP)
    learned_cfg = getattr(cfg, "inverse", "") == "learned" and cfg.backward.cfg_mode == "training-time"
    return min(GUIDANCE_CAP, trained_on) if learned_cfg else GUIDANCE_CAP


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
    if nll:
        metrics["bpd"] = held_out_bpd(t, seed)
    return metrics


def held_out_bpd(t: Trained, seed: int) -> float:
    """F's bits/dim on held-out noisy images."""
    noisy, labels = held_out_noisy(t, seed, t.cfg.eval.nll_samples)
    return bits_per_dim(t.flow, noisy, labels, t.splits.test.levels)


def held_out_noisy(t: Trained, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n held-out images with the training noise (what F models) and their labels."""
    test = t.splits.test
    gen = torch.Generator().manual_seed(seed)
    noisy = test.images[:n] + t.cfg.stage1.noise_sigma * torch.randn(test.images[:n].shape, generator=gen)
    device = next(t.flow.parameters()).device  # F's device (CUDA at the paper scale)
    return noisy.to(device), test.labels[:n].to(device) if t.cfg.flow.num_classes else None


def diagnostics(t: Trained, seed: int) -> dict[str, float]:
    """Measurements the tables' readings cite: the noise left in real test images (noise_residual_real, beside the
    samples' noise_residual in the metrics) and, for a learned inverse, how well G has learned F's inverse
    (metrics/inverse.py): its distance to F's inverse on INVERSE_PAIRS held-out images, output and each supervised
    state, with sigma^2 (the noise F was trained on) for scale, and its noise sensitivity. Latent scales measure no
    noise left in images (their samples are decoded, their test set latents); G's measurements need it on the CPU."""
    cfg, test = t.cfg, t.splits.test
    n = min(INVERSE_PAIRS, len(test))
    out = {} if t.latent is not None else {"noise_residual_real": residual_noise(test.images[: cfg.sample.num_samples])}
    out["noise_sigma_sq"] = cfg.stage1.noise_sigma**2
    if t.g is not None and not on_cpu(t.g):
        log("warning: G's inverse gaps, noise sensitivity and batch-1 latency are measured on the CPU only "
            "(metrics/inverse.py); this record has none")
    elif t.g is not None:
        labels = test.labels[:n] if cfg.flow.num_classes else None
        gaps = inverse_gaps(t.flow, t.g, test.images[:n], labels, cfg.stage1.noise_sigma, seed)
        out["inverse_mse_clean" if t.g.config.denoise == "learned" else "inverse_mse_noisy"] = gaps["output"]
        if gaps["states"]:
            out["inverse_mse_states"] = gaps["states"]
        out["noise_sensitivity"] = measure_noise_sensitivity(t.flow, t.g, cfg.flow.num_classes, seed=seed)
    return out


def on_cpu(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


def primary_metric(metrics: dict[str, float]) -> str:
    return next(k for k in ("fid", "fd_effnet") if k in metrics)


def perceptual_networks(s2) -> dict[str, str]:
    """The network of each perceptual term of a stage-2 config: {'lpips': 'effnet-lite1', ...}."""
    nets = {"lpips": s2.lpips_net, "convnext": s2.convnext_net}
    return {term: nets[term] for term in s2.metric.split("+") if term != "mse"}


def notes_for(cfg: RunConfig) -> list[str]:
    notes = []
    if cfg.eval.extractor != "inception-v3-compat":
        notes.append(f"fd_effnet / is_effnet: Frechet distance and Inception Score in {cfg.eval.extractor} features "
                     f"(ImageNet weights) on {cfg.sample.num_samples} samples; not comparable to FID in absolute terms")
    if cfg.inverse == "learned":
        s2 = cfg.stage2
        nets = perceptual_networks(s2)
        if nets:
            notes.append("perceptual terms: " + "; ".join(describe(t, n, s2.perceptual_weights) for t, n in nets.items()))
            if s2.perceptual_weights != "random" and any(n.startswith("effnet") for n in nets.values()):
                notes.append("a loss in ImageNet features can flatter an ImageNet-feature metric (fd_effnet): judge "
                             "the perceptual rows by the domain metrics as well")
        if cfg.backward.strategy == "hidden-distill":
            form = "residual input-space updates" if cfg.backward.distill_residual else \
                "each stage's state re-embedded from input space (the paper's form)"
            notes.append(f"hidden distillation: {form}")
    if len(guidance_scales(cfg)) > 1:
        notes.append("guided row: reported at its best w of the sweep " +
                     ", ".join(f"{w:g}" for w in cfg.sample.cfg_sweep) + " (selected by the primary metric)")
    return notes


def identity(spec: AblationSpec, variant: str, scale: str, opts: RunOptions) -> tuple[RunConfig, RunIdentity]:
    """The config a run of the variant resolves to under `opts` and its identity (identity.run_identity)."""
    cfg = spec.resolve(variant, scale, opts.overrides)
    return cfg, run_identity(spec, variant, scale, cfg, distributed_micro_batch(cfg, opts.env, opts.micro_batch))


def run_variant(spec: AblationSpec, variant: str, scale: str, seed: int, opts: RunOptions) -> Path | None:
    """Train, sample, evaluate and record one variant. Under torchrun every rank trains (DDP) and samples its share;
    rank 0 alone evaluates and writes, and returns the record's path (the other ranks None)."""
    start = time.perf_counter()
    cfg, ident = identity(spec, variant, scale, opts)
    shown = ", ".join(f"{k}={v}" for k, v in ident.overrides.items())
    if opts.env.is_main:
        log(f"[{spec.name}/{variant}] scale={scale} seed={seed}"
            + (f" config {ident.config_hash} ({shown})" if shown else ""))
    t = train_variant(cfg, seed, opts)
    swept = sweep_guidance(t, seed, opts.data_dir, opts.cache, opts.env)
    if swept is None:  # not rank 0
        return None
    guidance, images = swept
    best = next(point for point in guidance["curve"] if point["w"] == guidance["best_w"])
    metrics, ms_per_image = dict(best["metrics"]), best["ms_per_image"]
    metrics["bpd"] = held_out_bpd(t, seed)
    calibration = ensure_calibration(cfg, opts.results_dir, opts.data_dir, opts.cache) if t.latent is None else None
    sampler = dataclasses.replace(Sampler.from_config(cfg), cfg_scale=guidance["best_w"])
    nfe, nfe_label = sampler.nfe(t.flow, t.g)
    metric = primary_metric(metrics)
    measurement = {
        "config": cfg.to_dict(), "config_hash": ident.config_hash, "micro_batch": ident.micro_batch,
        "metric": metric, "metrics": metrics, "nfe": nfe, "nfe_label": nfe_label, "guidance": guidance,
        "diagnostics": diagnostics(t, seed), "calibration": calibration,
        "params": {"flow": count_params(t.flow), "backward": count_params(t.g) if t.g is not None else 0},
        "timing": {"ms_per_image": ms_per_image, "images_per_s": 1000 / ms_per_image,
                   "sample_batch": cfg.sample.batch_size,
                   **({"g_ms_batch1": ms_per_image_batch1(t.g)} if t.g is not None and on_cpu(t.g) else {}),
                   **{f"{k}_s": v["seconds"] for k, v in t.train.items()}},
        "notes": notes_for(cfg),
        "flow_norms": flow_norms(t.flow, *held_out_noisy(t, seed, min(500, cfg.eval.nll_samples))),
        "train": t.train,
        **({"latent": t.latent.source} if t.latent is not None else {}),
    }
    png = image_grid_png(unit_range(images[:100]), nrow=10)
    return write_variant_record(spec, variant, scale, seed, opts, ident, measurement, png, start)


def share_measurement(spec: AblationSpec, variant: str, scale: str, seed: int, opts: RunOptions, ident: RunIdentity,
                      source: Path, rec: dict[str, Any]) -> Path:
    """Record `variant` from `rec`, another table's record of the same config hash and seed: the same models, samples
    and metrics (see results.find_measurement), so nothing is trained or evaluated again; the table's own fields
    (label, the paper's numbers) are this variant's, and `measured_in` names the record the numbers come from."""
    start = time.perf_counter()
    measured_in = rec.get("measured_in") or source.relative_to(opts.results_dir / scale).as_posix()
    log(f"[{spec.name}/{variant}] seed={seed}: same config ({ident.config_hash}) and seed as {measured_in}; "
        "sharing its measurement")
    png = (opts.results_dir / scale / rec["samples_png"]).read_bytes()
    return write_variant_record(spec, variant, scale, seed, opts, ident, {**rec, "measured_in": measured_in}, png,
                                start)


def write_variant_record(spec: AblationSpec, variant: str, scale: str, seed: int, opts: RunOptions,
                         ident: RunIdentity, measurement: dict[str, Any], png: bytes, start: float) -> Path:
    """Write the sample grid and the record of one variant: `measurement` (what was measured; a shared record may
    carry another table's fields, which this variant's own replace) + the table's and this run's own fields."""
    name = record_path(opts.results_dir, scale, spec.name, variant, seed,
                       ident.config_hash if ident.overrides else None).stem
    samples_png = Path("samples") / spec.name / f"{name}.png"
    atomic_write_bytes(opts.results_dir / scale / samples_png, png)
    v = spec.variants[variant]
    own = {
        "schema": RESULT_SCHEMA, "kind": "ablation", "ablation": spec.name, "variant": variant,
        "label": v.label or variant, "scale": scale, "seed": seed, "spec_version": spec.version,
        "overrides": ident.overrides,
    }
    record = {
        **own, **measurement, **own,  # own fields at the top, and over any the measurement carries
        "paper": {**v.paper, "table": spec.paper_table},
        "samples_png": str(samples_png), "env": environment(),
        "wall_time_s": time.perf_counter() - start,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path = write_record(opts.results_dir, record)
    metric, metrics, guidance = record["metric"], record["metrics"], record["guidance"]
    at_w = f" (best w={guidance['best_w']:g})" if len(guidance["scales"]) > 1 else ""
    log(f"[{spec.name}/{variant}] {metric}={metrics[metric]:.3f}{at_w} bpd={metrics['bpd']:.3f} "
        f"nfe={record['nfe_label']} -> {path}")
    return path


def run(ablation: str, variants: list[str] | None = None, scale: str = "tiny", seed: int = 0,
        opts: RunOptions | None = None) -> list[Path]:
    """Run (or skip, when a record of the same config hash exists) each variant of an ablation; returns the record
    paths."""
    opts = opts or RunOptions()
    spec = get_spec(ablation)
    names = variants or list(spec.variants)
    for name in names:  # validate everything before any work starts
        cfg = spec.resolve(name, scale, opts.overrides)
        preflight(cfg, seed)
        if cfg.dataset == "latents":  # the VAE and the reference statistics (loaded once, kept for the run)
            latent_eval(cfg, opts.vae, opts.ref_stats, opts.env, opts.cache)
        for key, value in (("ablation", spec.name), ("variant", name)):
            if err := _check_name(value, key):
                raise ConfigError(f"{spec.path or spec.name}: {err}: it names the results file")
    env = opts.env
    if spec.kind == "speed":  # timing is one process's business: rank 0 times, the others wait
        paths = [record_speed_bench(opts.results_dir, scale, wait=False, progress=opts.progress)[0]] \
            if env.is_main else []
        barrier(env)
        return paths
    paths = []
    with main_rank_lock(opts.results_dir / scale / spec.name, env):  # one run per table; tables side by side
        for name in names:
            _, ident = identity(spec, name, scale, opts)
            found = find_record(opts.results_dir, scale, spec.name, name, seed, ident.config_hash) \
                if env.is_main else None
            found = broadcast_object(found, env)  # rank 0's results directory decides, for every rank
            if found is not None and not opts.force:
                if env.is_main:
                    log(f"[{spec.name}/{name}] already recorded (config {ident.config_hash}), skipping: {found} "
                        "(--force to re-run)")
                paths.append(found)
                continue
            shared = find_measurement(opts.results_dir, scale, seed, ident.config_hash) \
                if env.is_main and not opts.force else None
            if broadcast_object(shared is not None, env):  # rank 0 copies; the other ranks have nothing to do
                path = share_measurement(spec, name, scale, seed, opts, ident, *shared) if env.is_main else None
                paths.append(broadcast_object(path, env))
                continue
            path = run_variant(spec, name, scale, seed, opts)
            barrier(env)  # the other ranks wait for rank 0's evaluation before the next variant's training
            paths.append(broadcast_object(path, env))
    return paths


@contextlib.contextmanager
def main_rank_lock(directory: Path, env: DistEnv) -> Iterator[None]:
    """The table's results lock (results/<scale>/<table>), held by rank 0 alone for the whole job; when it is busy
    every rank raises the same one-line LockBusy."""
    with contextlib.ExitStack() as stack:
        error = None
        if env.is_main:
            try:
                stack.enter_context(dir_lock(directory, wait=False))
            except LockBusy as e:
                error = str(e)
        error = broadcast_object(error, env)
        if error is not None:
            raise LockBusy(error)
        yield
