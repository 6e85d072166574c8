"""What one run of a variant measured, as the dict its record holds (the runner's measure step, runner.py; the
record's storage is results.py's):

    Trained                the trained variant a run measures: its config, F, G, data and training summary
    build_measurement      the metrics at the guidance sweep's best w, F's held-out NLL, NFE, parameters, timing,
                           diagnostics (noise left in real images; for a learned inverse how far G is from F's inverse
                           and its noise sensitivity), F's norms, the training summary and the notes (`notes_for`)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .config import RunConfig
from .data import DataSplits
from .identity import RunIdentity
from .latent_eval import LatentEval
from .metrics.flow_norms import flow_norms
from .metrics.images import residual_noise
from .metrics.inverse import inverse_gaps, measure_noise_sensitivity, ms_per_image_batch1
from .metrics.likelihood import bits_per_dim, count_params
from .models.biflow import BiFlow
from .models.flow_matching import FlowMatching
from .models.meanflow import MeanFlow
from .models.tarflow import TARFlow
from .sample import Sampler, guidance_scales
from .training.perceptual import describe, perceptual_networks

INVERSE_PAIRS = 256  # held-out images on which G is compared with F's inverse


@dataclass
class Trained:
    cfg: RunConfig
    flow: TARFlow | None  # None for a peer
    g: BiFlow | MeanFlow | FlowMatching | None  # G, or a peer in its place
    splits: DataSplits
    train: dict[str, Any]  # per stage: seconds, final loss terms, skipped steps, cached or not
    latent: LatentEval | None = None  # latent scales: the VAE that decodes the samples and the reference statistics


def build_measurement(t: Trained, seed: int, ident: RunIdentity, guidance: dict[str, Any],
                      calibration: str | None) -> dict[str, Any]:
    """What a record says one run measured: the metrics at the sweep's best w (`guidance`, runner.sweep_guidance)
    with F's held-out NLL, NFE, parameters, timing, diagnostics, F's norms, the training summary and the notes."""
    cfg = t.cfg
    best = next(point for point in guidance["curve"] if point["w"] == guidance["best_w"])
    metrics, ms_per_image = dict(best["metrics"]), best["ms_per_image"]
    if t.flow is not None:  # a peer has no likelihood
        metrics["bpd"] = held_out_bpd(t, seed)
    sampler = dataclasses.replace(Sampler.from_config(cfg), cfg_scale=guidance["best_w"])
    nfe, nfe_label = sampler.nfe(t.flow, t.g)
    metric = primary_metric(metrics)
    return {
        "config": cfg.to_dict(), "config_hash": ident.config_hash, "micro_batch": ident.micro_batch,
        "metric": metric, "metrics": metrics, "nfe": nfe, "nfe_label": nfe_label, "guidance": guidance,
        "diagnostics": diagnostics(t, seed), "calibration": calibration,
        "params": {"flow": count_params(t.flow) if t.flow is not None else 0,
                   "backward": count_params(t.g) if t.g is not None else 0},
        "timing": {"ms_per_image": ms_per_image, "images_per_s": 1000 / ms_per_image,
                   "sample_batch": cfg.sample.batch_size,
                   **({"g_ms_batch1": ms_per_image_batch1(t.g)} if cfg.inverse == "learned" else {}),
                   **{f"{k}_s": v["seconds"] for k, v in t.train.items() if "seconds" in v}},  # not the budget
        "notes": notes_for(cfg, t.train),
        **({"flow_norms": flow_norms(t.flow, *held_out_noisy(t, seed, min(500, cfg.eval.nll_samples)))}
           if t.flow is not None else {}),
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
    if cfg.inverse == "peer":  # no F: nothing to compare with F's inverse
        return out
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


def notes_for(cfg: RunConfig, train: dict[str, Any] | None = None) -> list[str]:
    notes = []
    if cfg.inverse == "peer":
        steps = (train or {}).get("peer", {}).get("steps")
        notes.append(f"1-NFE peer: {cfg.peer.kind} on G's backbone, trained directly on the data"
                     + (f" for {steps} steps" if steps else "")
                     + (" (BiFlow's training FLOPs: F's steps + G's)" if cfg.peer.equal_compute else ""))
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
