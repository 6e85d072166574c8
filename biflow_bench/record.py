"""The record step of the runner (runner.py): what one run of a variant measured, as the dict its record holds, and
the record's files.

    build_measurement      the metrics at the guidance sweep's best w, F's held-out NLL, NFE, parameters, timing,
                           diagnostics (noise left in real images; for a learned inverse how far G is from F's inverse
                           and its noise sensitivity), F's norms, the training summary and the notes (`notes_for`)
    write_variant_record   results/<scale>/<ablation>/<variant>__seed<N>[__<config hash>].json and its sample grid,
                           written atomically (results.py: the hash names every config but the variant's default)
    share_measurement      a variant whose config hash and seed another table has recorded: that record's
                           measurement, naming it in `measured_in`
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .ablations import AblationSpec
from .config import RunConfig
from .files import atomic_write_bytes
from .identity import RunIdentity
from .metrics.flow_norms import flow_norms
from .metrics.images import residual_noise
from .metrics.inverse import inverse_gaps, measure_noise_sensitivity, ms_per_image_batch1
from .metrics.likelihood import bits_per_dim, count_params
from .provenance import environment
from .results import RESULT_SCHEMA, archive_superseded, record_path, write_record
from .sample import Sampler, guidance_scales
from .training.perceptual import describe, perceptual_networks

if TYPE_CHECKING:  # annotations only: runner.py imports this module
    from .runner import Trained

INVERSE_PAIRS = 256  # held-out images on which G is compared with F's inverse


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_measurement(t: Trained, seed: int, ident: RunIdentity, guidance: dict[str, Any],
                      calibration: str | None) -> dict[str, Any]:
    """What a record says one run measured: the metrics at the sweep's best w (`guidance`, runner.sweep_guidance)
    with F's held-out NLL, NFE, parameters, timing, diagnostics, F's norms, the training summary and the notes."""
    cfg = t.cfg
    best = next(point for point in guidance["curve"] if point["w"] == guidance["best_w"])
    metrics, ms_per_image = dict(best["metrics"]), best["ms_per_image"]
    metrics["bpd"] = held_out_bpd(t, seed)
    sampler = dataclasses.replace(Sampler.from_config(cfg), cfg_scale=guidance["best_w"])
    nfe, nfe_label = sampler.nfe(t.flow, t.g)
    metric = primary_metric(metrics)
    return {
        "config": cfg.to_dict(), "config_hash": ident.config_hash, "micro_batch": ident.micro_batch,
        "metric": metric, "metrics": metrics, "nfe": nfe, "nfe_label": nfe_label, "guidance": guidance,
        "diagnostics": diagnostics(t, seed), "calibration": calibration,
        "params": {"flow": count_params(t.flow), "backward": count_params(t.g) if t.g is not None else 0},
        "timing": {"ms_per_image": ms_per_image, "images_per_s": 1000 / ms_per_image,
                   "sample_batch": cfg.sample.batch_size,
                   **({"g_ms_batch1": ms_per_image_batch1(t.g)} if t.g is not None else {}),
                   **{f"{k}_s": v["seconds"] for k, v in t.train.items()}},
        "notes": notes_for(cfg),
        "flow_norms": flow_norms(t.flow, *held_out_noisy(t, seed, min(500, cfg.eval.nll_samples))),
        "train": t.train,
        **({"latent": t.latent.source} if t.latent is not None else {}),
    }


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
    noise left in images (their samples are decoded, their test set latents)."""
    cfg, test = t.cfg, t.splits.test
    n = min(INVERSE_PAIRS, len(test))
    out = {} if t.latent is not None else {"noise_residual_real": residual_noise(test.images[: cfg.sample.num_samples])}
    out["noise_sigma_sq"] = cfg.stage1.noise_sigma**2
    if t.g is not None:
        labels = test.labels[:n] if cfg.flow.num_classes else None
        gaps = inverse_gaps(t.flow, t.g, test.images[:n], labels, cfg.stage1.noise_sigma, seed)
        out["inverse_mse_clean" if t.g.config.denoise == "learned" else "inverse_mse_noisy"] = gaps["output"]
        if gaps["states"]:
            out["inverse_mse_states"] = gaps["states"]
        out["noise_sensitivity"] = measure_noise_sensitivity(t.flow, t.g, cfg.flow.num_classes, seed=seed)
    return out


def primary_metric(metrics: dict[str, float]) -> str:
    return next(k for k in ("fid", "fd_effnet") if k in metrics)


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


def share_measurement(spec: AblationSpec, variant: str, scale: str, seed: int, results_dir: Path, ident: RunIdentity,
                      source: Path, rec: dict[str, Any]) -> Path:
    """Record `variant` from `rec`, another table's record of the same config hash and seed: the same models, samples
    and metrics (see results.find_measurement), so nothing is trained or evaluated again; the table's own fields
    (label, the paper's numbers) are this variant's, and `measured_in` names the record the numbers come from."""
    start = time.perf_counter()
    measured_in = rec.get("measured_in") or source.relative_to(results_dir / scale).as_posix()
    log(f"[{spec.name}/{variant}] seed={seed}: same config ({ident.config_hash}) and seed as {measured_in}; "
        "sharing its measurement")
    png = (results_dir / scale / rec["samples_png"]).read_bytes()
    return write_variant_record(spec, variant, scale, seed, results_dir, ident, {**rec, "measured_in": measured_in},
                                png, start)


def write_variant_record(spec: AblationSpec, variant: str, scale: str, seed: int, results_dir: Path,
                         ident: RunIdentity, measurement: dict[str, Any], png: bytes, start: float) -> Path:
    """Write the sample grid and the record of one variant: `measurement` (what was measured; a shared record may
    carry another table's fields, which this variant's own replace) + the table's and this run's own fields."""
    home = record_path(results_dir, scale, spec.name, variant, seed, ident.config_hash if ident.overrides else None)
    archive_superseded(home, results_dir, ident.config_hash)  # before its grid's name is taken
    samples_png = Path("samples") / spec.name / f"{home.stem}.png"
    atomic_write_bytes(results_dir / scale / samples_png, png)
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
    path = write_record(results_dir, record)
    metric, metrics, guidance = record["metric"], record["metrics"], record["guidance"]
    at_w = f" (best w={guidance['best_w']:g})" if len(guidance["scales"]) > 1 else ""
    log(f"[{spec.name}/{variant}] {metric}={metrics[metric]:.3f}{at_w} bpd={metrics['bpd']:.3f} "
        f"nfe={record['nfe_label']} -> {path}")
    return path
