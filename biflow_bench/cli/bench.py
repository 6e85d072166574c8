"""`biflow-bench bench ...`: the speed of every sampler, F beside a reference TARFlow, quality against training
time, how the exact inverse's cost grows with the sequence length, and the 1-NFE peers' equal-compute budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError, did_you_mean
from ..paths import default_results_dir
from .args import (DataDir, Overrides, ResultsDir, Scale, Seed, check_device, check_scale, not_rank_zero, parse_list,
                   parse_overrides, positive, writable)

bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Benchmarks: speed of every sampler; F beside a reference TARFlow; quality against "
                             "training time; speed against sequence length.")


@bench_app.command("speed")
def bench_speed(
    scale: Scale = "tiny",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,64,256",
    train_batch_sizes: Annotated[str | None, typer.Option(help="--what train/all: batch sizes of the training "
                                                                "steps (default: --batch-sizes)")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    what: Annotated[str, typer.Option(help="sample, train or all")] = "sample",
    repeats: Annotated[int, typer.Option(help="timed calls per sampler and batch size")] = 5,
    train_settings: Annotated[str, typer.Option(help="--what train: training settings timed side by side, e.g. "
                                                     "fp32,bf16,fp32+compile (precision[+compile])")] = "fp32",
    compile: Annotated[bool, typer.Option("--compile", help="also time G's pass and the exact inverse's token step under torch.compile")] = False,
    results_dir: ResultsDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the record as JSON")] = False,
) -> None:
    """Time every sampler of the speed table (ms per image, NFE, FLOPs, speed-up, fraction of matmul peak)."""
    from ..speed.benchmark import WHATS, record_speed_bench
    from ..speed.harness import parse_train_setting
    from ..speed.table import format_speed_table

    check_scale(scale)
    check_device(device)
    if what not in WHATS:
        raise ConfigError(f"--what {what!r}: use one of {', '.join(WHATS)}{did_you_mean(what, WHATS)}")
    positive("--repeats", repeats)
    sizes = parse_list("--batch-sizes", batch_sizes, int, "1,64,256")
    train_sizes = sizes if train_batch_sizes is None else parse_list("--train-batch-sizes", train_batch_sizes, int,
                                                                     "128")
    for option, given, values in (("--batch-sizes", batch_sizes, sizes),
                                  ("--train-batch-sizes", train_batch_sizes, train_sizes)):
        if any(b < 1 for b in values):
            raise ConfigError(f"{option} {given!r}: every batch size must be a positive integer")
    settings = tuple(t.strip() for t in train_settings.split(","))
    for t in settings:
        try:
            parse_train_setting(t)
        except ValueError as e:
            raise ConfigError(f"--train-settings: {e}") from None
    results_dir = results_dir or default_results_dir()
    writable(results_dir)
    if not_rank_zero():
        return
    path, record = record_speed_bench(results_dir, scale, wait=True, batch_sizes=sizes, device=device,
                                      repeats=repeats, what=what, progress=sys.stderr.isatty(),
                                      train_settings=settings, compile=compile,
                                      train_batch_sizes=train_sizes)
    typer.echo(json.dumps(record, indent=2) if as_json else format_speed_table(record))
    typer.echo(f"record: {path}", err=True)


@bench_app.command("flow-reference")
def bench_flow_reference(
    reference: Annotated[Path | None, typer.Option(
        help="a checkout of apple/ml-tarflow (its transformer_flow.py is imported from there); needed for the "
             "'reference' variant")] = None,
    steps: Annotated[int, typer.Option(help="training steps per model (batch 64)")] = 1500,
    variants: Annotated[str, typer.Option(help="comma-separated: ours, ours-embed-std1, ours-no-out-norm, "
                                               "ours-out-bias-default, reference")] = "ours,reference",
    seed: Seed = 0,
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="also write the result as JSON here")] = None,
) -> None:
    """Train our F and the reference TARFlow side by side at one config; bits/dim on 1,000 held-out images."""
    from ..flow_reference import format_rows, run_flow_reference
    from ..files import atomic_write_json

    names = [v.strip() for v in variants.split(",") if v.strip()]
    if not_rank_zero():
        return
    result = run_flow_reference(reference, names, steps, seed, data_dir, progress=sys.stderr.isatty())
    if out is not None:
        atomic_write_json(out, result)
    typer.echo(format_rows(result))


@bench_app.command("curve")
def bench_curve(
    stage: Annotated[str, typer.Argument(metavar="STAGE", help="flow (F, by its exact inverse), backward (G) or peer (--set inverse=peer)")],
    scale: Scale = "small",
    every: Annotated[int, typer.Option(help="evaluate the weights every this many steps (and at the end)")] = 1000,
    scales: Annotated[str, typer.Option("--w", help="comma-separated guidance scales evaluated at each point")] = "0",
    num: Annotated[int, typer.Option(help="samples per point")] = 1000,
    from_checkpoints: Annotated[Path | None, typer.Option(
        help="score the training checkpoints (*.pt) kept in this folder and the stage's cached model, instead of "
             "training anew")] = None,
    kept: Annotated[bool, typer.Option(
        "--kept", help="score the checkpoints a peer's cached run kept (a doubling schedule) and its model")] = False,
    variant: Annotated[str | None, typer.Option(
        help="ABLATION/VARIANT whose config to use instead of the scale's preset (e.g. one-nfe/meanflow-1: the peer "
             "that table trained)")] = None,
    overrides: Overrides = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
    results_dir: ResultsDir = None,
) -> None:
    """Quality against training time: train F, G or a peer once (the scale's preset, or --variant's config, plus --set
    overrides), scoring
    its weights every --every steps with the tables' metrics (or score the checkpoints a run kept: --from-checkpoints,
    or --kept for a peer's run in the cache);
    record results/<scale>/curve/<stage>__seed<N>.json."""
    from ..config import apply_delta, scale_config
    from ..curve import STAGES, checkpoint_curve, curve_record, training_curve
    from ..files import dir_lock
    from ..results import write_record

    check_scale(scale)
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r}: use one of {', '.join(STAGES)}{did_you_mean(stage, STAGES)}")
    positive("--every", every)
    positive("--num", num)
    ws = parse_list("--w", scales, float, "0,1,2")
    if any(w < 0 for w in ws):
        raise ConfigError(f"--w {scales!r}: guidance scales must be >= 0")
    if variant is not None:
        from ..ablations import get_spec

        table, _, name = variant.partition("/")
        cfg = get_spec(table).resolve(name, scale, parse_overrides(overrides))
    else:
        cfg = apply_delta(scale_config(scale), parse_overrides(overrides), "--set")
    checkpoints = None
    if kept:
        if stage != "peer":
            raise ConfigError("--kept: only a peer's run keeps its checkpoints; use --from-checkpoints for F or G")
        from ..curve import kept_checkpoints
        checkpoints = kept_checkpoints(cfg, seed)
    elif from_checkpoints is not None:
        checkpoints = sorted(from_checkpoints.glob("*.pt")) if from_checkpoints.is_dir() else []
        if not checkpoints:
            raise ConfigError(f"--from-checkpoints {from_checkpoints}: no *.pt training checkpoints there")
    results_dir = results_dir or default_results_dir()
    writable(results_dir)
    if not_rank_zero():
        return
    body = (training_curve(cfg, stage, seed, every, ws, num, data_dir=data_dir) if checkpoints is None else
            checkpoint_curve(cfg, stage, seed, checkpoints, ws, num, data_dir=data_dir))
    with dir_lock(results_dir / scale, wait=True, timeout=600):
        path = write_record(results_dir, curve_record(cfg, seed, body))
    for p in body["points"]:
        shown = " ".join(f"{k}={p['metrics'][k]:.3f}" for k in ("fd_effnet", "acc_cls", "conf_cls", "bpd")
                         if k in p["metrics"])
        typer.echo(f"step {p['step']:6d}  {p['train_s'] / 60:6.1f} min  w={p['w']:g}  {shown}")
    typer.echo(f"record: {path}", err=True)


def _learned_inverse_setup(ablation: str, variant: str, scale: str, overrides: list[str] | None,
                           data_dir: Path | None):
    """A G-training bench's inputs: the variant's config (refused without a learned inverse), the training split and
    F from the cache (trained on a miss)."""
    from ..ablations import get_spec
    from ..data import dataset_splits
    from ..paths import default_cache_dir
    from ..training.cache import get_flow

    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(overrides))
    if cfg.inverse != "learned":
        raise ConfigError(f"{ablation}/{variant} has no learned inverse; pick a variant with a G")
    train = dataset_splits(cfg.dataset, str(data_dir) if data_dir else None).train
    flow, _ = get_flow(cfg, train, default_cache_dir())
    return cfg, train, flow


@bench_app.command("represent")
def bench_represent(
    ablation: Annotated[str, typer.Option(help="the spec whose variant sets G's config")] = "g-training",
    variant: Annotated[str, typer.Option(help="the variant of --ablation")] = "centre",
    scale: Scale = "small",
    pairs: Annotated[int, typer.Option(help="fixed training images, one noise draw each")] = 256,
    steps: Annotated[int, typer.Option(help="optimiser steps on those pairs")] = 2000,
    lr: Annotated[float | None, typer.Option(help="peak learning rate (default: the config's stage2.lr)")] = None,
    every: Annotated[int, typer.Option(help="measure the fit every this many steps")] = 250,
    overrides: Overrides = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
) -> None:
    """Can G represent F's inverse? Fit a fresh G to `--pairs` fixed pairs (z, F's trajectory) of the scale's F
    (from the cache, trained on a miss) and print the output's MSE on them against sigma^2, the training noise."""
    import torch

    from ..models.biflow import BiFlow
    from ..training.representability import fit_fixed_pairs

    check_scale(scale)
    for option, value in (("--pairs", pairs), ("--steps", steps), ("--every", every)):
        positive(option, value)
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr {lr}: must be > 0")
    cfg, train, flow = _learned_inverse_setup(ablation, variant, scale, overrides, data_dir)
    torch.manual_seed(seed + 1)
    g = BiFlow(cfg.trained_backward)
    x = train.images[:pairs]
    y = train.labels[:pairs] if cfg.backward.num_classes else None
    sigma = cfg.stage1.noise_sigma
    curve = fit_fixed_pairs(g, flow, x, y, cfg.stage2, sigma=sigma, steps=steps, lr=lr or cfg.stage2.lr,
                            batch_size=min(cfg.stage2.batch_size, pairs), seed=seed, every=every,
                            precision=cfg.stage2.precision)
    for step, mse in zip(curve.steps, curve.output_mse, strict=True):
        typer.echo(f"step {step:6d}  output MSE on the {pairs} pairs {mse:.5f} = {mse / sigma**2:7.2f} sigma^2")
    typer.echo(f"{curve.seconds / 60:.1f} min; sigma^2 = {sigma**2:g}; "
               + ("below sigma^2: G represents these pairs" if curve.output_mse[-1] < sigma**2 else
                  "NOT below sigma^2"))


@bench_app.command("terms")
def bench_terms(
    ablation: Annotated[str, typer.Option(help="the spec whose variant sets G's config")] = "g-training",
    variant: Annotated[str, typer.Option(help="the variant of --ablation")] = "perceptual-both",
    scale: Scale = "small",
    batches: Annotated[int, typer.Option(help="fresh training batches to average over")] = 8,
    fresh: Annotated[bool, typer.Option(help="a freshly initialised G instead of the trained one")] = False,
    overrides: Overrides = None,
    seed: Seed = 0,
    data_dir: DataDir = None,
) -> None:
    """Which term of G's objective drives it? Per term (each hidden state, the output, each perceptual term): its
    gradient's norm on G's parameters, its share of the summed norms and its cosine with the whole gradient, for the
    trained G of the variant (from the cache, trained on a miss) or a fresh one; for the LPIPS-style term, each
    feature stage's share of that term's gradient."""
    import torch

    from ..models.biflow import BiFlow
    from ..paths import default_cache_dir
    from ..training.cache import get_backward
    from ..training.losses import build_perceptual_terms
    from ..training.term_gradients import measure_term_shares

    check_scale(scale)
    positive("--batches", batches)
    cfg, train, flow = _learned_inverse_setup(ablation, variant, scale, overrides, data_dir)
    if fresh:
        torch.manual_seed(seed + 1)
        g = BiFlow(cfg.trained_backward)
    else:
        g, _ = get_backward(cfg, seed, flow, train, default_cache_dir())
    shares = measure_term_shares(g, flow, train, cfg.stage2, sigma=cfg.stage1.noise_sigma,
                                 perceptual=build_perceptual_terms(cfg.stage2), batches=batches, seed=seed)
    typer.echo(f"{ablation}/{variant}, {'fresh' if fresh else 'trained'} G, {batches} batches of "
               f"{cfg.stage2.batch_size}")
    typer.echo(f"{'term':<10} {'grad norm':>10} {'share':>7} {'cosine':>7}")
    for name, row in shares.items():
        typer.echo(f"{name:<10} {row['norm']:10.4g} {row['share']:7.3f} {row['cosine']:7.3f}")


@bench_app.command("scaling")
def bench_scaling(
    sides: Annotated[str, typer.Option(help="comma-separated latent sides (patch 2: side^2 / 4 tokens)")] = "8,16,32",
    batch: Annotated[int, typer.Option(help="images per timed call")] = 1,
    repeats: Annotated[int, typer.Option(help="timed calls per sampler and shape")] = 3,
    results_dir: ResultsDir = None,
) -> None:
    """Speed-up of one pass of G over the exact inverse (+ CFG + score step) against the exact inverse's serial
    steps: the paper-B/2 models, randomly initialised, on latents up to the paper's 32x32x4; FLOP ratio beside it."""
    from ..files import dir_lock
    from ..results import write_record
    from ..speed.scaling import scaling_record, scaling_rows

    shape = parse_list("--sides", sides, int, "8,16,32")
    if any(s < 2 or s % 2 for s in shape):
        raise ConfigError(f"--sides {sides!r}: each side must be an even integer >= 2 (patch size 2)")
    positive("--batch", batch)
    positive("--repeats", repeats)
    results_dir = results_dir or default_results_dir()
    writable(results_dir)
    if not_rank_zero():
        return
    rows = scaling_rows(shape, batch, repeats, progress=True)
    with dir_lock(results_dir / "paper", wait=True, timeout=600):
        path = write_record(results_dir, scaling_record(rows))
    typer.echo(f"record: {path}", err=True)


@bench_app.command("budget")
def bench_budget(
    ablation: Annotated[str, typer.Option(help="the spec whose variant sets BiFlow's training")] = "main",
    variant: Annotated[str, typer.Option(help="the variant of --ablation (a learned inverse)")] = "biflow-mse",
    scale: Scale = "small",
    overrides: Overrides = None,
) -> None:
    """Equal training compute for the 1-NFE comparison: FLOPs per training step of F, G and each peer (MeanFlow, flow
    matching on G's backbone), BiFlow's budget (F's steps + G's) and the peer steps that spend the same."""
    from ..ablations import get_spec
    from ..config import PEERS, PeerConfig
    from ..training.budget import equal_compute

    check_scale(scale)
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(overrides))
    if cfg.inverse != "learned":
        raise ConfigError(f"{ablation}/{variant} has no learned inverse: BiFlow's budget is F's training plus G's")
    peers = tuple(PeerConfig(kind=kind, batch_size=cfg.stage2.batch_size) for kind in PEERS)
    budget = equal_compute(cfg, peers)
    flops = budget["flops_per_step"]
    typer.echo(f"{ablation}/{variant} at scale {scale}: F {cfg.stage1.steps} steps x {flops['flow'] / 1e9:.2f} GFLOP "
               f"+ G {cfg.stage2.steps} x {flops['backward'] / 1e9:.2f} = {budget['biflow_flops'] / 1e12:.1f} TFLOP")
    for peer in peers:
        typer.echo(f"  {peer.kind:<14} {flops[peer.kind] / 1e9:8.2f} GFLOP per step (batch {peer.batch_size}): "
                   f"{budget['peer_steps'][peer.kind]} steps")
