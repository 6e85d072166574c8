"""`biflow-bench`: list, run and report the ablations, plus single steps (train, sample, eval) and benchmarks.

Every user mistake (unknown ablation / variant / scale, malformed spec, missing data or weights, wrong override
type, a count that is not positive, a device that is not there, busy, missing or unwritable directories) ends in one
line on stderr and exit code 2, checked here before any work starts; nothing is half-written. Ctrl-C ends with one
line and exit code 130.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from .ablations import load_registry
from .cli_args import (USER_ERRORS, Ablation, DataDir, Device, Overrides, RefStats, ResultsDir, Scale, Seed, VaePath,
                       Variant, check_device, check_out_file, check_scale, parse_overrides, positive, writable)
from .cli_bench import bench_app
from .config import ConfigError, scale_config
from .paths import default_results_dir

# rich_markup_mode=None: plain click help (no "<bool>" type column, no "{ablation}" placeholders)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Reproducible ablation benchmarks for Bidirectional Normalizing Flow (BiFlow).")
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"biflow-bench {version('biflow-bench')}")
        raise typer.Exit()


@app.callback()
def _global_options(
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: BIFLOW_THREADS, OMP_NUM_THREADS, "
                                                         "else an equal share of the cores among running "
                                                         "biflow-bench jobs)")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Reproducible ablation benchmarks for Bidirectional Normalizing Flow (BiFlow)."""
    from . import threads as thread_budget

    if threads is not None:
        positive("--threads", threads)
    try:
        thread_budget.configure(threads)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _options(results_dir: Path, data_dir: Path | None, force: bool, overrides: list[str] | None):
    from .runner import RunOptions

    # progress: a bar on a terminal, periodic lines in a log (loop.fit decides)
    return RunOptions(results_dir=results_dir, data_dir=data_dir, force=force, overrides=parse_overrides(overrides))


@app.command("list")
def list_ablations() -> None:
    """The registered ablations and their variants, with the paper's numbers."""
    for spec in load_registry().values():
        typer.echo(f"{spec.name} (v{spec.version}, {spec.kind}): {spec.title} -- {spec.paper_table}")
        for v in spec.variants.values():
            paper = ", ".join(f"{k}={val}" for k, val in v.paper.items())
            typer.echo(f"  {v.name:<16} {v.label}" + (f"  [paper: {paper}]" if paper else ""))


@app.command()
def run(
    ablation: Ablation,
    variants: Annotated[str | None, typer.Option(help="comma-separated variants (default: all)")] = None,
    scale: Scale = "tiny",
    seed: Seed = 0,
    results_dir: ResultsDir = None,
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option("--force", help="re-run variants that already have a record of this config")
                     ] = False,
    set_: Overrides = None,
    micro_batch: Annotated[int | None, typer.Option(help="rows per forward pass in training (default: the batch "
                                                        "split over the processes); part of the record's config")
                           ] = None,
    vae: VaePath = None,
    ref_stats: RefStats = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cpu at the pixel scales, cuda when "
                                                    "available at the latent ones)")] = None,
) -> None:
    """Train, sample and evaluate each variant of an ablation; one JSON record per variant and config. Under
    torchrun the same command trains with DDP across the processes, shards the sampling (image i from seed i
    whatever their number) and evaluates and writes on rank 0 alone. At the latent scales (tiny-latent, paper,
    paper-xl) --data-dir holds the prepared latents, every process decodes its samples with --vae and rank 0 scores
    them against --ref-stats (FID / IS at paper scale)."""
    from . import runner
    from .ablations import get_spec
    from .distributed import init_from_env, shutdown

    check_scale(scale)
    check_device(device)
    latent = scale_config(scale).dataset == "latents"
    if not latent and (vae is not None or ref_stats is not None):
        raise ConfigError(f"--vae and --ref-stats are for the latent scales (tiny-latent, paper, paper-xl); scale "
                          f"{scale!r} is evaluated against its dataset's held-out images")
    if vae is not None:  # stage 2's perceptual terms decode with BIFLOW_VAE's VAE (training/stages.py): the same one
        os.environ["BIFLOW_VAE"] = str(vae)
    spec = get_spec(ablation)
    names = [v.strip() for v in variants.split(",")] if variants is not None else None
    if names is not None and "" in names:
        raise ConfigError(f"--variants {variants!r}: give comma-separated variant names of {ablation}, none empty "
                          "(see `biflow-bench list`)")
    if spec.kind == "speed" and (variants or set_):
        raise ConfigError(f"{ablation} is the speed benchmark: it takes no --variants or --set (it times every "
                          "sampler); use `biflow-bench bench speed` for its options")
    if spec.kind != "speed":  # an unknown variant or a bad override: one line, before anything is written
        for name in names or spec.variants:
            spec.resolve(name, scale, parse_overrides(set_))
    if micro_batch is not None:
        positive("--micro-batch", micro_batch)
    results_dir = results_dir or default_results_dir()
    writable(results_dir)
    opts = _options(results_dir, data_dir, force, set_)
    opts.vae, opts.ref_stats = vae, ref_stats
    opts.micro_batch, opts.env = micro_batch, init_from_env(device or (None if latent else "cpu"))
    try:
        paths = runner.run(ablation, names, scale, seed, opts)
    finally:
        shutdown()
    if opts.env.is_main:
        typer.echo("\n".join(str(p) for p in paths))


@app.command()
def progress(
    scale: Scale = "small",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds of the reproduction")] = "0,1",
    results_dir: ResultsDir = None,
    estimate_from: Annotated[Path | None, typer.Option(
        help="records of an earlier run of the same configs (the committed results/) whose wall times estimate the "
             "rows still missing")] = None,
) -> None:
    """How far a reproduction has come: per ablation and seed the rows recorded at the current config, the minutes
    they took, and about how many are left."""
    from .cli_args import parse_list
    from .progress import format_progress, progress_rows

    check_scale(scale)
    if estimate_from is not None and not estimate_from.is_dir():
        raise ConfigError(f"--estimate-from {estimate_from}: no such directory; pass the directory holding the "
                          "reference records (results) or leave it out")
    rows = progress_rows(results_dir or default_results_dir(), scale, list(parse_list("--seeds", seeds, int, "0,1")),
                         reference_dir=estimate_from)
    typer.echo(format_progress(rows, scale), nl=False)


@app.command()
def report(
    results_dir: ResultsDir = None,
    out: Annotated[Path | None, typer.Option(help="report directory (default: reports/ of the checkout; "
                                                  "runs/reports when --scales names tiny or tiny-latent)")] = None,
    scales: Annotated[str | None, typer.Option(help="comma-separated scales to render (default: every scale "
                                                    "found but the git-ignored tiny and tiny-latent)")] = None,
    include_archive: Annotated[bool, typer.Option(help="also show the superseded records of <results-dir>/archive, "
                                                       "under each table's Other configurations")] = False,
) -> None:
    """Regenerate the tables, figures and README.md of a report from the records in results/."""
    from .paths import LOCAL_SCALES, default_reports_dir
    from .report.render import render_report
    from .results import scan_records

    results_dir = results_dir or default_results_dir()
    if not results_dir.is_dir():
        raise ConfigError(f"--results-dir {results_dir}: no such directory; run an ablation first (biflow-bench run "
                          "...) or pass the directory holding the records")
    chosen = [s.strip() for s in scales.split(",")] if scales else None
    for scale in chosen or []:
        check_scale(scale)
    if chosen is None:
        found = {rec["scale"] for _, rec in scan_records(results_dir, include_archive)[0]}
        chosen = sorted(found - set(LOCAL_SCALES))
    out = out or default_reports_dir(local=bool(set(chosen) & set(LOCAL_SCALES)))
    writable(out, "--out")
    summary = render_report(results_dir, out, scales=chosen, include_archive=include_archive)
    for path, reason in summary.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for note in summary.separated:
        typer.echo(f"separated {note}", err=True)
    typer.echo(f"wrote {len(summary.files)} files to {out} ({out / 'README.md'}; scales {', '.join(chosen) or 'none'})")


def _trained(ablation: str, variant: str, scale: str, seed: int, data_dir: Path | None, overrides: list[str] | None):
    """The runner, this process's place in a torchrun job (one process: the default) and the trained variant (F and
    G from the cache, trained on a miss; under torchrun with DDP)."""
    from . import runner
    from .ablations import get_spec
    from .distributed import init_from_env

    check_scale(scale)
    if scale_config(scale).dataset == "latents":
        raise ConfigError(f"scale {scale!r} trains on VAE latents: `run ABLATION --scale {scale} --vae DIR --ref-stats "
                          "NPZ` makes a table's records, `train-dist` and `sample-dist` train and sample one variant")
    opts = _options(default_results_dir(), data_dir, False, overrides)
    cfg = get_spec(ablation).resolve(variant, scale, opts.overrides)
    opts.env = init_from_env("cpu")
    return runner, opts.env, runner.train_variant(cfg, seed, opts)


@app.command()
def train(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0, data_dir: DataDir = None,
          set_: Overrides = None) -> None:
    """Train (or load from the artifact cache) F and G of one variant (under torchrun: with DDP)."""
    from .distributed import shutdown

    _, env, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    if env.is_main:
        typer.echo(json.dumps(t.train, indent=2))
    shutdown()


@app.command()
def sample(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0,
           num: Annotated[int, typer.Option("--num", "--num-images",
                                            help="images in the grid (under torchrun: --num-images)")] = 100,
           out: Annotated[Path | None, typer.Option(help="PNG grid to write (default: runs/samples/ABLATION-VARIANT-"
                                                         "SCALE-seedN.png of the project, git-ignored)")] = None,
           data_dir: DataDir = None, set_: Overrides = None) -> None:
    """Sample a grid of every one of --num images from one variant (trains it first when not cached; under torchrun
    each process samples its share and rank 0 writes the grid)."""
    from .data import grid_columns, save_image_grid
    from .distributed import shutdown
    from .paths import default_samples_dir

    positive("--num", num)
    out = out or default_samples_dir() / f"{ablation}-{variant}-{scale}-seed{seed}.png"
    check_out_file(out, (".png",))
    runner, env, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    images, ms = runner.sample_variant(t, seed, num, env=env)
    if images is not None:
        save_image_grid(images, out)
        cols = grid_columns(num)
        typer.echo(f"wrote {num} images to {out} ({cols} to a row, {-(-num // cols)} rows; {ms:.3f} ms per image)")
    shutdown()


@app.command("eval")
def eval_(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0, data_dir: DataDir = None,
          set_: Overrides = None) -> None:
    """Evaluate one variant and print its metrics (no record written; under torchrun the sampling is shared and
    rank 0 evaluates)."""
    from .distributed import shutdown

    runner, env, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    images, ms = runner.sample_variant(t, seed, env=env)
    if images is not None:
        typer.echo(json.dumps({**runner.evaluate(t, images, seed, data_dir), "ms_per_image": ms}, indent=2))
    shutdown()


@app.command("prepare-latents")
def prepare_latents(
    image_dir: Annotated[Path, typer.Argument(help="ImageNet-style folder: one subfolder of images per class")],
    out_dir: Annotated[Path, typer.Argument(help="where meta.json and the latent shards go")],
    vae: VaePath = None,
    image_size: int = 256,
    batch_size: int = 64,
    shard_size: int = 5000,
    workers: Annotated[int, typer.Option(help="image-decoding worker processes per rank")] = 4,
    device: Device = None,
) -> None:
    """Encode an image folder into VAE posterior moments (resumable; under torchrun rank r takes shards r, r+W, ...)."""
    from .distributed import barrier, init_from_env, shutdown
    from .latents import load_vae
    from .latents import prepare_latents as prepare

    check_device(device)
    env = init_from_env(device)
    model = load_vae(vae, env.device)
    written = prepare(image_dir, out_dir, model, image_size, batch_size, env.rank, env.world_size, shard_size, workers,
                      progress=sys.stderr.isatty())
    barrier(env)
    typer.echo(f"[rank {env.rank}] wrote {len(written)} shards to {out_dir}")
    shutdown()


@app.command("train-dist")
def train_dist(
    ablation: Ablation,
    variant: Variant,
    scale: Scale = "tiny",
    seed: Seed = 0,
    data_dir: DataDir = None,
    micro_batch: Annotated[int | None, typer.Option(help="rows per forward pass (default: the global batch / number "
                                                        "of processes); the same value on any number of processes "
                                                        "gives the same training")] = None,
    device: Device = None,
    set_: Overrides = None,
) -> None:
    """Train F and G of one variant with DDP on every process of a torchrun job (or on one process); rank 0 writes
    the checkpoints and the artifacts to the cache that `run`, `sample` and `sample-dist` read."""
    from .ablations import get_spec
    from .cache import default_cache_dir, train_stages
    from .data import load_dataset
    from .distributed import init_from_env, shutdown

    check_scale(scale)
    check_device(device)
    if micro_batch is not None:
        positive("--micro-batch", micro_batch)
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    dataset = load_dataset(cfg.dataset, data_dir).train
    env = init_from_env(device)
    summary = train_stages(cfg, seed, dataset, default_cache_dir(), env, micro_batch)[2]
    if env.is_main:
        typer.echo(json.dumps(summary, indent=2))
    shutdown()


@app.command("sample-dist")
def sample_dist(
    ablation: Ablation,
    variant: Variant,
    scale: Scale = "tiny",
    seed: Seed = 0,
    num: Annotated[int | None, typer.Option("--num-images", help="images (default: the scale's, 50,000 at paper "
                                                               "scale); not --num, which torchrun would take")] = None,
    batch_size: Annotated[int | None, typer.Option(help="images per forward pass and process")] = None,
    vae: VaePath = None,
    ref_stats: RefStats = None,
    out: Annotated[Path | None, typer.Option(help=".npz (uint8 NHWC arr_0 + labels: ADM's format) or .png")] = None,
    device: Device = None,
    set_: Overrides = None,
    micro_batch: Annotated[int | None, typer.Option(help="the micro-batch the variant was trained with (default: "
                                                        "its batch split over these processes, as train-dist does)")
                           ] = None,
) -> None:
    """Sample a trained variant on every process of a torchrun job (image i from seed (seed, i), class i mod K);
    rank 0 gathers the images in order, writes --out and, with --ref-stats, prints FID / IS (Inception)."""
    from .ablations import get_spec
    from .distributed import init_from_env, shutdown
    from .sample import sample_trained

    check_scale(scale)
    check_device(device)
    for option, value in (("--num-images", num), ("--batch-size", batch_size), ("--micro-batch", micro_batch)):
        if value is not None:
            positive(option, value)
    if out is not None:
        check_out_file(out, (".npz", ".png"))
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    env = init_from_env(device)
    result = sample_trained(cfg, seed, env, num=num, batch_size=batch_size, vae=vae, ref_stats=ref_stats, out=out,
                            micro_batch=micro_batch)
    if env.is_main:
        typer.echo(json.dumps(result, indent=2))
    shutdown()


class CtrlC(Exception):
    """Ctrl-C outside training (click would turn KeyboardInterrupt into a silent exit 130)."""


def _raise_ctrl_c(_signum: int, _frame: object) -> None:
    raise CtrlC


def main() -> None:
    """Entry point: user errors become one line and exit code 2; Ctrl-C says what was kept and how to resume (exit
    130): training saves a checkpoint at the next step (loop._StopFlag), anywhere else the command stops at once."""
    from .training.loop import TrainingDiverged, TrainingInterrupted

    previous = signal.signal(signal.SIGINT, _raise_ctrl_c)
    try:
        app()  # click handles its own usage errors (exit 2) and typer.Exit
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except TrainingInterrupted as e:
        typer.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
    except CtrlC:
        typer.echo("interrupted: stopped by Ctrl-C; trained models stay in the cache and no record or output was "
                   "written for the step in progress; re-run the same command to finish", err=True)
        sys.exit(130)
    except TrainingDiverged as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
