"""Speed benchmark: every sampler of the speed table (ablations/speed.toml) timed at several batch sizes.

For each variant the models are built from the variant's resolved config (random weights: a sampler's cost does
not depend on the values of its weights) and the variant's `Sampler` is timed end to end:

    nfe              sequential network evaluations per image (`Sampler.nfe`)
    flops_per_image  torch.utils.flop_counter over one call at a small batch (matmuls and attention only)
    ms_per_image     median over `repeats` timed calls after `warmup` untimed ones, divided by the batch size
                     (ms_min: the fastest call, a hint of how noisy the machine was)
    speedup          exact's ms / this ms at the same batch size
    peak_fraction    achieved FLOP/s over the matmul peak measured in the same run (a large square matmul)

`what="train"` times one optimisation step instead (forward + backward + AdamW): stage 1 (F by maximum likelihood)
as sampler "train-flow" and stage 2 (G against the frozen F) as "train-backward"; `what="all"` does both.
`record_speed_bench` runs it and writes the speed record: the one path both `biflow-bench bench speed` and
`biflow-bench run speed` take.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..ablations import get_spec
from ..config import RunConfig
from ..files import dir_lock
from ..metrics.likelihood import count_params
from ..models import layers
from ..provenance import device_name, machine_environment
from ..results import write_record
from ..sample import Sampler, image_noise
from ..training.loop import compile_in_place
from .flops import count_flops
from .harness import (build_variant_models, parse_train_setting, sampler_call, sampler_inputs,
                      training_calls)
from .timing import matmul_peak, peak_memory_mb, reset_peak_memory, time_calls


WHATS = ("sample", "train", "all")


TRAIN_VARIANT = "learned"  # the speed-table variant whose config the training-step rows use


FLOP_BATCH = 2  # batch of the FLOP-counting call (FLOPs per image do not depend on it)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_speed_bench(
    scale: str = "tiny",
    batch_sizes: Sequence[int] = (1, 64, 256),
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
    what: str = "sample",
    progress: bool = False,
    amp: bool | None = None,
    seed: int = 0,
    train_settings: Sequence[str] = ("fp32",),
    compile: bool = False,
    train_batch_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Time every sampler of the speed table (and/or a training step of each stage) at each batch size
    (`train_batch_sizes`, default `batch_sizes`, for the training steps); returns a speed record (see the module
    docstring). `amp` (default: on for cuda) runs G under bf16 autocast; F's exact
    inverse and score step always run in float32."""
    if what not in WHATS:
        raise ValueError(f"what={what!r} is not one of {', '.join(WHATS)}")
    train_batch_sizes = batch_sizes if train_batch_sizes is None else train_batch_sizes
    for sizes in (batch_sizes, train_batch_sizes):
        if not sizes or any(int(b) < 1 for b in sizes):
            raise ValueError(f"batch sizes must be positive integers, got {list(sizes)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    batch_sizes, train_batch_sizes = [int(b) for b in batch_sizes], [int(b) for b in train_batch_sizes]
    train_settings = list(dict.fromkeys(train_settings))
    if not train_settings:
        raise ValueError("train_settings needs at least one setting, e.g. fp32")
    for setting in train_settings:
        parse_train_setting(setting)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    amp = dev.type == "cuda" if amp is None else amp
    start = time.perf_counter()
    spec = get_spec("speed")

    _log(progress, f"matmul peak on {dev} ...")
    peak = matmul_peak(dev)
    peak_bf16 = matmul_peak(dev, torch.bfloat16)
    machine = {"device": device_name(dev), "matmul_peak_flops": peak, "matmul_peak_flops_bf16": peak_bf16,
               "threads": torch.get_num_threads(), "torch": torch.__version__}

    rows: list[dict[str, Any]] = []
    if what in ("sample", "all"):
        rows += _sampling_rows(spec, scale, batch_sizes, dev, repeats, warmup, amp, seed, peak, peak_bf16, progress,
                               compile)
        if spec.resolve("exact", scale).dataset == "latents":
            rows += _decoder_rows(spec.resolve("exact", scale), batch_sizes, dev, repeats, warmup, amp, peak,
                                  peak_bf16, progress)
    if what in ("train", "all"):
        rows += _training_rows(spec, scale, train_batch_sizes, dev, repeats, warmup, seed, peak, peak_bf16,
                               train_settings, progress)

    notes = [
        "Models are randomly initialised from each variant's resolved config: a sampler's cost does not depend on "
        "the values of its weights, so no training is needed (zero-initialised layers get small random values).",
        "ms_per_image: median wall time of one call over `repeats` calls (after `warmup`), divided by the batch "
        "size; at each batch size the samplers' calls are interleaved round by round, each timed call right after an "
        "untimed one of the same sampler (steady state, as when sampling many batches). Noise generation is "
        "excluded, the score step and CFG are included.",
        "speedup: the exact serial inverse's ms per image over this sampler's at the same batch size.",
        "flops_per_image: torch.utils.flop_counter over one call at batch "
        f"{FLOP_BATCH} (matmuls and attention only; elementwise ops are not counted); the score step counts "
        "F's forward and backward pass. peak_fraction: flops_per_image x images_per_s over the matmul peak "
        "(best of several large square matmuls in this run).",
        "The exact inverse decodes num_blocks x (tokens - 1) tokens one at a time with a preallocated KV cache; "
        "inference CFG batches the conditional and guiding passes into one batch of 2B.",
        "exact-jacobi solves the same inverse by Jacobi passes over groups of tokens until no value moves more "
        "than the tolerance (at most one pass per token: then it equals the serial result); its NFE is the passes "
        "of the timed batch, summed over the flow blocks, and its FLOPs are those of the FLOP-counting call.",
    ]
    if dev.type == "cpu":
        notes.append(f"CPU run with {torch.get_num_threads()} threads; peak_memory_mb is not measured on CPU "
                     "(None). Timings on a shared machine vary from run to run.")
    if amp:
        notes.append("G runs under bf16 autocast (its peak_fraction is against the bf16 matmul peak); F's exact "
                     "inverse and the score step run in float32.")
    if compile:
        notes.append("name:compiled rows: the same sampler under torch.compile (backend "
                     f"{layers.COMPILE_BACKEND} with its C++ wrapper, static shapes: compiled once per batch size in the "
                     "warm-up, untimed): "
                     "G's pass, or the exact inverse's per-token step (every layer, the read-out, guidance and the "
                     "update as one compiled function; decoder 'compiled'). Their speedup is against the eager exact "
                     "inverse (hand-fused: weights hoisted, KV cache in place).")
    if what in ("train", "all"):
        notes.append(f"train-flow / train-backward: one optimisation step (forward, backward, gradient clipping, "
                     f"AdamW) of stage 1 (F, maximum likelihood) and stage 2 (G against the frozen F, MSE + hidden "
                     f"alignment, no perceptual terms) with the '{TRAIN_VARIANT}' variant's config and train.py's "
                     "optimizer (no weight decay on biases). Settings (TrainingConfig.precision / .compile): "
                     f"{', '.join(train_settings)}, timed in interleaved rounds; a row named stage:setting is a "
                     f"setting other than the first ({train_settings[0]}), and speedup is over the first setting's "
                     "row of the same stage. peak_fraction is against the matmul peak of the setting's precision "
                     "(peak_fraction_fp32: against the float32 peak).")

    return {
        "schema": 1, "kind": "speed", "ablation": spec.name, "variant": "bench", "label": spec.title,
        "scale": scale, "seed": seed, "spec_version": spec.version,
        "config": {"batch_sizes": batch_sizes, "device": device, "repeats": repeats, "warmup": warmup,
                   "what": what, "amp": amp, **({"train_settings": train_settings} if what != "sample" else {}),
                   **({"compile": True} if compile else {})},
        "rows": rows, "machine": machine, "metrics": {}, "timing": {},
        "paper": {"table": spec.paper_table}, "notes": notes, "env": machine_environment(dev),
        "wall_time_s": time.perf_counter() - start,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def record_speed_bench(results_dir: Path | str, scale: str, wait: bool, **options: Any) -> tuple[Path, dict[str, Any]]:
    """Run the speed benchmark at `scale` and write its record: the one path a speed record is written by
    (`biflow-bench bench speed`, and `run speed` through runner.run). The scale's results directory stays locked
    from the start of the benchmark to the written record, as during an ablation run; `wait`: wait up to 10 min for
    another holder (the bench command), else LockBusy at once (`run`). Returns the record's path and the record."""
    with dir_lock(Path(results_dir) / scale, wait=wait, timeout=600 if wait else None):
        record = run_speed_bench(scale=scale, **options)
        return write_record(results_dir, record), record


def _sampling_rows(spec, scale: str, batch_sizes: list[int], dev: torch.device, repeats: int, warmup: int,
                   amp: bool, seed: int, peak: float, peak_bf16: float | None, progress: bool,
                   compile: bool = False) -> list[dict]:
    """One row per (variant, batch size). At each batch size the variants' timed calls are interleaved (one call of
    each variant per round), so a burst of load on a shared machine hits every sampler alike; each timed call follows
    an untimed call of the same sampler, so none pays for the cold caches another sampler left behind
    (docs/decisions.md)."""
    setups = {}
    for name, variant in spec.variants.items():
        cfg = spec.resolve(name, scale)
        sampler = Sampler.from_config(cfg)
        flow, g = build_variant_models(cfg, dev, seed)
        uses_flow = sampler.inverse == "exact" or sampler.denoise == "score"
        z, y = sampler_inputs(cfg, FLOP_BATCH, dev)
        flops = count_flops(sampler_call(sampler, flow, g, z, y, amp, inference=False)) / FLOP_BATCH
        row_peak = peak_bf16 if (amp and sampler.inverse != "exact" and peak_bf16) else peak
        setups[name] = (variant, cfg, sampler, flow, g, count_params(flow if uses_flow else None, g), flops, row_peak)
        compiled = None  # the same sampler with torch.compile where per-operator overhead dominates at batch 1:
        if compile and sampler.inverse == "learned" and sampler.denoise != "score":  # G's pass (a compiled copy)
            g_compiled = copy.deepcopy(g)
            compile_in_place(g_compiled, cpp_wrapper=True)  # type: ignore[arg-type]  # as the exact decoder's step
            compiled = (sampler, g_compiled)
        elif compile and sampler.inverse == "exact" and sampler.decoder == "serial":  # F's per-token step
            compiled = (dataclasses.replace(sampler, decoder="compiled"), g)
        if compiled is not None:
            label = f"{variant.label or name}, torch.compile"
            setups[f"{name}:compiled"] = (dataclasses.replace(variant, name=f"{name}:compiled", label=label, paper={}),
                                          cfg, compiled[0], flow, compiled[1], *setups[name][5:])

    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for bs in batch_sizes:
        calls, stats = {}, {}
        for name, (_, cfg, sampler, flow, g, *_) in setups.items():
            z, y = sampler_inputs(cfg, bs, dev)
            stats[name] = {}
            calls[name] = sampler_call(sampler, flow, g, z, y, amp, stats=stats[name])
        times: dict[str, list[float]] = {name: [] for name in calls}
        peak_mb: dict[str, float | None] = {}
        for name, call in calls.items():  # warm-up, which also gives the peak memory of a call (cuda)
            reset_peak_memory(dev)
            time_calls(call, dev, 0, max(warmup, 1 if dev.type == "cuda" else 0))
            peak_mb[name] = peak_memory_mb(dev)
        for _ in range(repeats):
            for name, call in calls.items():
                times[name] += time_calls(call, dev, 1, 1)
        for name in calls:
            sec = statistics.median(times[name])
            _, _, sampler, flow, g, *_ = setups[name]
            nfe, nfe_label = sampler.nfe(flow, g, stats[name].get("jacobi_iterations"))  # Jacobi: this batch's passes
            cells[name, bs] = {"ms": sec / bs * 1e3, "ips": bs / sec, "ms_min": min(times[name]) / bs * 1e3,
                               "peak_mb": peak_mb[name], "nfe": nfe, "nfe_label": nfe_label}
            _log(progress, f"{name:12s} batch {bs:4d}: {sec / bs * 1e3:9.3f} ms/image (nfe {nfe_label})")

    rows: list[dict[str, Any]] = []
    for name, (variant, _, _, _, _, params, flops, row_peak) in setups.items():
        for bs in batch_sizes:
            c = cells[name, bs]
            exact = cells.get(("exact", bs))
            rows.append({
                "sampler": name, "label": variant.label or name, "nfe": c["nfe"], "nfe_label": c["nfe_label"],
                "params": params, "flops_per_image": float(flops), "batch_size": bs, "ms_per_image": c["ms"],
                "images_per_s": c["ips"], "speedup": exact["ms"] / c["ms"] if exact else None,
                "peak_fraction": flops * c["ips"] / row_peak, "peak_memory_mb": c["peak_mb"],
                "paper_ms": _num(variant.paper.get("ms_per_image")),
                "paper_speedup": _num(variant.paper.get("speedup")),
                "ms_min": c["ms_min"],
            })
    return rows


def _decoder_rows(cfg: RunConfig, batch_sizes: list[int], dev: torch.device, repeats: int, warmup: int, amp: bool,
                  peak: float, peak_bf16: float | None, progress: bool) -> list[dict]:
    """The VAE decoder at latent scales, timed alone as the paper reports it (BiFlow Table 1 excludes it): the
    local sd-vae-ft-ema when there is one, else a random AutoencoderKL of its architecture (same cost)."""
    from ..latents import SD_VAE_ARCH, TINY_VAE_ARCH, load_vae, random_vae
    from ..weights import WeightsError

    try:
        vae, weights = load_vae(device=dev), "local weights"
    except WeightsError:
        arch = SD_VAE_ARCH if cfg.flow.image_size == 32 else TINY_VAE_ARCH
        vae, weights = random_vae(arch).to(dev), "random weights"
    decoder = vae.eval()
    shape = (cfg.flow.in_channels, cfg.flow.image_size, cfg.flow.image_size)

    def call_for(batch: int, inference: bool = True) -> Callable[[], Tensor]:
        z = image_noise(range(batch), shape).to(dev)

        def call() -> Tensor:
            with torch.inference_mode() if inference else torch.no_grad():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    return decoder.decode(z).sample

        return call

    flops = count_flops(call_for(FLOP_BATCH, inference=False)) / FLOP_BATCH
    params = count_params(decoder.decoder, decoder.post_quant_conv)
    rows = []
    for bs in batch_sizes:
        call = call_for(bs)
        reset_peak_memory(dev)
        times = time_calls(call, dev, repeats, max(warmup, 1))
        sec = statistics.median(times)
        rows.append({
            "sampler": "vae-decoder", "label": f"VAE decoder (sd-vae-ft-ema architecture, {weights})", "nfe": 1,
            "nfe_label": "1 (decoder)", "params": params, "flops_per_image": flops, "batch_size": bs,
            "ms_per_image": sec / bs * 1e3, "images_per_s": bs / sec, "speedup": None,
            "peak_fraction": flops * bs / sec / ((peak_bf16 if amp and peak_bf16 else peak)),
            "peak_memory_mb": peak_memory_mb(dev), "paper_ms": None, "paper_speedup": None,
            "ms_min": min(times) / bs * 1e3,
        })
        _log(progress, f"vae-decoder  batch {bs:4d}: {sec / bs * 1e3:9.3f} ms/image")
    return rows


def _training_rows(spec, scale: str, batch_sizes: list[int], dev: torch.device, repeats: int, warmup: int,
                   seed: int, peak: float, peak_bf16: float, settings: Sequence[str], progress: bool) -> list[dict]:
    """One row per (setting, stage, batch size). At each batch size every setting's steps are built and warmed up
    (compilation happens there), then timed in interleaved rounds, one step of each per round, so that a burst of
    load on a shared machine hits every setting alike. The first setting is the baseline of the speed-up."""
    cfg = spec.resolve(TRAIN_VARIANT, scale)
    labels = {"train-flow": "Training step, stage 1 (F, maximum likelihood)",
              "train-backward": "Training step, stage 2 (G against frozen F)"}
    flops: dict[str, float] = {}
    for name, (step, _, _) in training_calls(cfg, dev, FLOP_BATCH, seed).items():  # the same math in every setting
        flops[name] = count_flops(step) / FLOP_BATCH
    rows: list[dict[str, Any]] = []
    for bs in batch_sizes:
        steps = {(setting, name): call for setting in settings
                 for name, call in training_calls(cfg, dev, bs, seed, setting).items()}
        for (setting, name), (step, _, _) in steps.items():
            _log(progress, f"warming up {name} ({setting}) at batch {bs} ...")
            time_calls(step, dev, 0, max(warmup, 2 if parse_train_setting(setting)[1] else 0))
        times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
        for _ in range(repeats):
            for key, (step, _, _) in steps.items():
                times[key] += time_calls(step, dev, 1, 0)
        for (setting, name), (_, model, _) in steps.items():
            sec = statistics.median(times[setting, name])
            base = statistics.median(times[settings[0], name])
            ips = bs / sec
            row_peak = peak_bf16 if parse_train_setting(setting)[0] == "bf16" else peak
            rows.append({
                "sampler": name if setting == settings[0] else f"{name}:{setting}",
                "label": f"{labels[name]}, {setting}", "setting": setting, "nfe": 1,
                "nfe_label": "fwd + bwd + AdamW", "params": count_params(model), "flops_per_image": flops[name],
                "batch_size": bs, "ms_per_image": sec / bs * 1e3, "images_per_s": ips, "speedup": base / sec,
                "peak_fraction": flops[name] * ips / row_peak, "peak_fraction_fp32": flops[name] * ips / peak,
                "peak_memory_mb": peak_memory_mb(dev), "paper_ms": None, "paper_speedup": None,
                "ms_min": min(times[setting, name]) / bs * 1e3,
            })
            _log(progress, f"{name:14s} {setting:13s} batch {bs:4d}: {sec / bs * 1e3:9.3f} ms/image, "
                           f"{ips:9.1f} images/s, {100 * rows[-1]['peak_fraction']:.1f}% of the "
                           f"{'bf16' if row_peak is peak_bf16 else 'fp32'} peak")
    return rows


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
