"""`biflow-bench list / run / progress / report`: the ablation tables, from the registry to the rendered report."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from ..ablations import load_registry
from ..config import ConfigError, scale_config
from ..paths import default_results_dir
from .args import (Ablation, DataDir, Overrides, RefStats, ResultsDir, Scale, Seed, VaePath, check_device, check_scale,
                   parse_list, parse_overrides, positive, run_options, writable)

run_app = typer.Typer()


@run_app.command("list")
def list_ablations() -> None:
    """The registered ablations and their variants, with the paper's numbers (and the file of each of your own)."""
    registry = load_registry()
    width = max(len(v) for spec in registry.values() for v in spec.variants)  # one label column for every table
    for spec in registry.values():
        mine = "" if spec.builtin else f"  [{spec.path}]"
        typer.echo(f"{spec.name} (v{spec.version}, {spec.kind}): {spec.title}"
                   + (f" -- {spec.paper_table}" if spec.paper_table else "") + mine)
        for v in spec.variants.values():
            paper = ", ".join(f"{k}={val}" for k, val in v.paper.items())
            typer.echo(f"  {v.name:<{width}} {v.label}" + (f"  [paper: {paper}]" if paper else ""))


@run_app.command()
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
    reverse: Annotated[bool, typer.Option("--reverse", help="run the variants last to first: a second job on the "
                                                            "same table meets the first in the middle")] = False,
) -> None:
    """Train, sample and evaluate each variant of an ablation; one JSON record per variant and config. Jobs on one
    table share its rows: each leaves to the other a row that the other is measuring. Under
    torchrun the same command trains with DDP across the processes, shards the sampling (image i from seed i
    whatever their number) and evaluates and writes on rank 0 alone. At the latent scales (tiny-latent, paper,
    paper-xl) --data-dir holds the prepared latents, every process decodes its samples with --vae and rank 0 scores
    them against --ref-stats (FID / IS at paper scale)."""
    from .. import runner
    from ..ablations import get_spec
    from ..distributed import init_from_env, shutdown
    from ..latents import latent_inputs
    from ..paths import default_cache_dir
    from ..progress import run_plan

    check_scale(scale)
    check_device(device)
    latent = scale_config(scale).dataset == "latents"
    if not latent and (vae is not None or ref_stats is not None):
        raise ConfigError(f"--vae and --ref-stats are for the latent scales (tiny-latent, paper, paper-xl); scale "
                          f"{scale!r} is evaluated against its dataset's held-out images")
    spec = get_spec(ablation)
    names = [v.strip() for v in variants.split(",")] if variants is not None else None
    if names is not None and "" in names:
        raise ConfigError(f"--variants {variants!r}: give comma-separated variant names of {ablation}, none empty "
                          "(see `biflow-bench list`)")
    if spec.kind == "speed" and (variants or set_):
        raise ConfigError(f"{ablation} is the speed benchmark: it takes no --variants or --set (it times every "
                          "sampler); use `biflow-bench bench speed` for its options")
    configs = None
    if spec.kind != "speed":  # an unknown variant, a bad override, missing weights: one line, before anything starts
        names = names or list(spec.variants)
        names = names[::-1] if reverse else names
        configs = runner.resolve_variants(spec, names, scale, seed, parse_overrides(set_))
    if micro_batch is not None:
        positive("--micro-batch", micro_batch)
    results_dir = results_dir or default_results_dir()
    writable(results_dir)
    env = init_from_env(device or (None if latent else "cpu"))
    data_dir, vae, ref_stats = latent_inputs(scale, data_dir, vae, ref_stats, default_cache_dir(), env)
    if vae is not None:  # stage 2's perceptual terms decode with BIFLOW_VAE's VAE (training/stages.py): the same one
        os.environ["BIFLOW_VAE"] = str(vae)
    opts = run_options(results_dir, data_dir, force, set_)
    opts.vae, opts.ref_stats = vae, ref_stats
    opts.micro_batch, opts.env = micro_batch, env
    # printed before the first variant: how many, and about how long
    plan = (lambda: run_plan(spec, names, scale, seed, opts)) if spec.kind != "speed" else None
    try:
        paths = runner.run(ablation, names, scale, seed, opts, plan, configs)
    finally:
        shutdown()
    if opts.env.is_main:
        typer.echo("\n".join(str(p) for p in paths))


@run_app.command()
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
    from ..progress import format_progress, progress_rows

    check_scale(scale)
    if estimate_from is not None and not estimate_from.is_dir():
        raise ConfigError(f"--estimate-from {estimate_from}: no such directory; pass the directory holding the "
                          "reference records (results) or leave it out")
    rows = progress_rows(results_dir or default_results_dir(), scale, list(parse_list("--seeds", seeds, int, "0,1")),
                         reference_dir=estimate_from)
    typer.echo(format_progress(rows, scale), nl=False)


@run_app.command()
def report(
    results_dir: ResultsDir = None,
    out: Annotated[Path | None, typer.Option(help="report directory (default: reports/ of the checkout; "
                                                  "runs/reports when it renders tiny or tiny-latent)")] = None,
    scales: Annotated[str | None, typer.Option(help="comma-separated scales to render (default: every scale "
                                                    "found; of the checkout's own results/, all but the "
                                                    "git-ignored tiny and tiny-latent)")] = None,
    include_archive: Annotated[bool, typer.Option(help="also show the superseded records of <results-dir>/archive, "
                                                       "under each table's Other configurations")] = False,
) -> None:
    """Regenerate the tables, figures and README.md of a report from the records in results/."""
    from ..paths import LOCAL_SCALES, default_reports_dir, is_checkout_results
    from ..report.render import render_report
    from ..results import scan_records

    results_dir = results_dir or default_results_dir()
    if not results_dir.is_dir():
        raise ConfigError(f"--results-dir {results_dir}: no such directory; run an ablation first (biflow-bench run "
                          "...) or pass the directory holding the records")
    chosen = [s.strip() for s in scales.split(",")] if scales else None
    for scale in chosen or []:
        check_scale(scale)
    left_out: list[str] = []
    if chosen is None:
        found = Counter(rec["scale"] for _, rec in scan_records(results_dir, include_archive)[0])
        # the checkout's own results keep their git-ignored smoke scales out of the committed report; any other
        # directory renders every scale it holds
        left_out = list(LOCAL_SCALES) if is_checkout_results(results_dir) else []
        chosen = sorted(set(found) - set(left_out))
    out = out or default_reports_dir(local=bool(set(chosen) & set(LOCAL_SCALES)))
    writable(out, "--out")
    summary = render_report(results_dir, out, scales=chosen, include_archive=include_archive, left_out=left_out)
    for scale in (s for s in left_out if found[s]):
        typer.echo(f"left out {found[scale]} record(s) of scale {scale} ({results_dir / scale}): --scales {scale} "
                   "renders them", err=True)
    for path, reason in summary.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for note in summary.separated:
        typer.echo(f"separated {note}", err=True)
    typer.echo(f"wrote {len(summary.files)} files to {out} ({out / 'README.md'}; scales {', '.join(chosen) or 'none'})")
