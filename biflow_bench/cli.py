"""`biflow-bench`: list, run and report the ablations, plus single steps (train, sample, eval) and benchmarks.

Every user mistake (unknown ablation / variant / scale, malformed spec, missing data or weights, wrong override
type, a count that is not positive, a device that is not there, busy, missing or unwritable directories) ends in one
line on stderr and exit code 2, checked here before any work starts; nothing is half-written. Ctrl-C ends with one
line and exit code 130.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from .ablations import load_registry
from .config import SCALES, ConfigError, did_you_mean
from .data import DataError
from .files import LockBusy
from .weights import WeightsError

def _plain_help() -> None:
    """Click-style help: this typer prints option types as "<int>" and required arguments as "{ABLATION}"; show
    "INT" and "ABLATION" instead (arguments carry their own help text)."""
    core = typer.core
    if hasattr(core.TyperOption, "display_type_rich") and hasattr(core.TyperArgument, "_usage_display_name"):
        option_type = core.TyperOption.display_type_rich
        core.TyperOption.display_type_rich = lambda self, ctx: (option_type(self, ctx) or "").strip("<>").upper()
        core.TyperArgument.display_type_rich = lambda self, ctx: None
        core.TyperArgument._usage_display_name = lambda self: self.display_name_raw + ("" if self.required else "?")


_plain_help()
# rich_markup_mode=None: plain click help (no "<bool>" type column, no "{ablation}" placeholders)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Reproducible ablation benchmarks for Bidirectional Normalizing Flow (BiFlow).")
bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Benchmarks: speed of every sampler; F beside a reference TARFlow.")
app.add_typer(bench_app, name="bench")

USER_ERRORS = (ConfigError, DataError, WeightsError, LockBusy)

Scale = Annotated[str, typer.Option(help=f"scale preset: {', '.join(SCALES)}")]
Seed = Annotated[int, typer.Option(help="training and sampling seed")]
ResultsDir = Annotated[Path, typer.Option(help="where records are written (results/<scale>/<ablation>/)")]
Overrides = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                     help="config override (TOML value), repeatable")]
DataDir = Annotated[Path | None, typer.Option(help="dataset directory (small scale: Fashion-MNIST IDX files)")]
Ablation = Annotated[str, typer.Argument(metavar="ABLATION", help="ablation name (see `biflow-bench list`)")]
Variant = Annotated[str, typer.Argument(metavar="VARIANT", help="variant of the ablation (see `biflow-bench list`)")]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is read as TOML (1e-3, true, "mse") and falls back to a bare string."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set stage2.steps=200")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _options(results_dir: Path, data_dir: Path | None, force: bool, overrides: list[str] | None):
    from .runner import RunOptions

    # progress: a bar on a terminal, periodic lines in a log (loop.fit decides)
    return RunOptions(results_dir=results_dir, data_dir=data_dir, force=force, overrides=parse_overrides(overrides))


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}{did_you_mean(scale, SCALES)}")


def _positive(option: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{option} {value}: must be a positive integer")
    return value


def _writable(directory: Path, option: str = "--results-dir") -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):  # unique: runs may share the folder
            pass
    except OSError as e:
        raise ConfigError(f"{option} {directory}: directory is not writable ({e.strerror or e}); pass another "
                          f"{option}") from None


def _check_out_file(out: Path, suffixes: tuple[str, ...]) -> None:
    """--out names a file of a format we write, in a directory we can write to."""
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"--out {out}: use a {' or '.join(suffixes)} path (the file is written in that format)")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; name a file")
    _writable(out.parent if str(out.parent) else Path("."), "--out")


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
    results_dir: ResultsDir = Path("results"),
    data_dir: DataDir = None,
    force: Annotated[bool, typer.Option("--force", help="re-run variants that already have a record of this config")
                     ] = False,
    set_: Overrides = None,
) -> None:
    """Train, sample and evaluate each variant of an ablation; one JSON record per variant and config."""
    from . import runner
    from .ablations import get_spec

    _check_scale(scale)
    spec = get_spec(ablation)
    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    if variants is not None and not names:
        raise ConfigError(f"--variants {variants!r}: name at least one variant of {ablation} (see `biflow-bench list`)")
    if spec.kind == "speed" and (variants or set_):
        raise ConfigError(f"{ablation} is the speed benchmark: it takes no --variants or --set (it times every "
                          "sampler); use `biflow-bench bench speed` for its options")
    for name in names or []:
        spec.resolve(name, scale)  # an unknown variant: one line with the valid names
    _writable(results_dir)
    paths = runner.run(ablation, names, scale, seed, _options(results_dir, data_dir, force, set_))
    typer.echo("\n".join(str(p) for p in paths))


@app.command()
def report(
    results_dir: Annotated[Path, typer.Option(help="where the records are (results/<scale>/<ablation>/)")
                           ] = Path("results"),
    out: Annotated[Path, typer.Option(help="report directory")] = Path("reports"),
) -> None:
    """Regenerate the tables, figures and reports/README.md from the records in results/."""
    from .report.render import render_report

    if not results_dir.is_dir():
        raise ConfigError(f"--results-dir {results_dir}: no such directory; run an ablation first (biflow-bench run "
                          "...) or pass the directory holding the records")
    _writable(out, "--out")
    summary = render_report(results_dir, out)
    for path, reason in summary.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    for note in summary.separated:
        typer.echo(f"separated {note}", err=True)
    typer.echo(f"wrote {len(summary.files)} files to {out} ({out / 'README.md'})")


def _trained(ablation: str, variant: str, scale: str, seed: int, data_dir: Path | None, overrides: list[str] | None):
    from . import runner
    from .ablations import get_spec

    _check_scale(scale)
    opts = _options(Path("results"), data_dir, False, overrides)
    cfg = get_spec(ablation).resolve(variant, scale, opts.overrides)
    return runner, runner.train_variant(cfg, seed, opts)


@app.command()
def train(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0, data_dir: DataDir = None,
          set_: Overrides = None) -> None:
    """Train (or load from the artifact cache) F and G of one variant."""
    _, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    typer.echo(json.dumps(t.train, indent=2))


@app.command()
def sample(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0,
           num: Annotated[int, typer.Option(help="images in the grid")] = 100,
           out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("samples.png"),
           data_dir: DataDir = None, set_: Overrides = None) -> None:
    """Sample a grid from one variant (trains it first when not cached)."""
    from .data import save_image_grid

    _positive("--num", num)
    _check_out_file(out, (".png",))
    runner, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    images, ms = runner.sample_variant(t, seed, num)
    save_image_grid(images, out, nrow=max(1, int(num**0.5)))
    typer.echo(f"{out} ({ms:.3f} ms per image)")


@app.command("eval")
def eval_(ablation: Ablation, variant: Variant, scale: Scale = "tiny", seed: Seed = 0, data_dir: DataDir = None,
          set_: Overrides = None) -> None:
    """Evaluate one variant and print its metrics (no record written)."""
    runner, t = _trained(ablation, variant, scale, seed, data_dir, set_)
    images, ms = runner.sample_variant(t, seed)
    typer.echo(json.dumps({**runner.evaluate(t, images, seed, data_dir), "ms_per_image": ms}, indent=2))


Device = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")]
VaePath = Annotated[str | None, typer.Option("--vae", help="diffusers AutoencoderKL directory (default: BIFLOW_VAE, "
                                                          "then the local caches)")]


def _check_device(device: str | None) -> None:
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: use cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu")


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

    _check_device(device)
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

    _check_scale(scale)
    _check_device(device)
    if micro_batch is not None:
        _positive("--micro-batch", micro_batch)
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    dataset = load_dataset(cfg.dataset, data_dir).train
    env = init_from_env(device)
    summary = train_stages(cfg, seed, dataset, default_cache_dir(), env, micro_batch)
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
    ref_stats: Annotated[Path | None, typer.Option(help="FID reference statistics (.npz with mu, sigma, e.g. ADM's "
                                                       "VIRTUAL_imagenet256_labeled.npz): report FID / IS")] = None,
    out: Annotated[Path | None, typer.Option(help=".npz (uint8 NHWC arr_0 + labels: ADM's format) or .png")] = None,
    device: Device = None,
    set_: Overrides = None,
) -> None:
    """Sample a trained variant on every process of a torchrun job (image i from seed (seed, i), class i mod K);
    rank 0 gathers the images in order, writes --out and, with --ref-stats, prints FID / IS (Inception)."""
    from .ablations import get_spec
    from .distributed import init_from_env, shutdown
    from .sample import sample_trained

    _check_scale(scale)
    _check_device(device)
    for option, value in (("--num-images", num), ("--batch-size", batch_size)):
        if value is not None:
            _positive(option, value)
    if out is not None:
        _check_out_file(out, (".npz", ".png"))
    cfg = get_spec(ablation).resolve(variant, scale, parse_overrides(set_))
    env = init_from_env(device)
    result = sample_trained(cfg, seed, env, num=num, batch_size=batch_size, vae=vae, ref_stats=ref_stats, out=out)
    if env.is_main:
        typer.echo(json.dumps(result, indent=2))
    shutdown()


@bench_app.command("speed")
def bench_speed(
    scale: Scale = "tiny",
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,64,256",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    what: Annotated[str, typer.Option(help="sample, train or all")] = "sample",
    repeats: Annotated[int, typer.Option(help="timed calls per sampler and batch size")] = 5,
    train_settings: Annotated[str, typer.Option(help="--what train: training settings timed side by side, e.g. "
                                                     "fp32,bf16,fp32+compile (precision[+compile])")] = "fp32",
    compile: Annotated[bool, typer.Option("--compile", help="also time G's pass under torch.compile")] = False,
    results_dir: ResultsDir = Path("results"),
    as_json: Annotated[bool, typer.Option("--json", help="print the record as JSON")] = False,
) -> None:
    """Time every sampler of the speed table (ms per image, NFE, FLOPs, speed-up, fraction of matmul peak)."""
    from .speed.benchmark import WHATS, record_speed_bench
    from .speed.harness import parse_train_setting
    from .speed.table import format_speed_table

    _check_scale(scale)
    _check_device(device)
    if what not in WHATS:
        raise ConfigError(f"--what {what!r}: use one of {', '.join(WHATS)}{did_you_mean(what, WHATS)}")
    _positive("--repeats", repeats)
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes {batch_sizes!r}: expected comma-separated integers, e.g. 1,64,256") from None
    if any(b < 1 for b in sizes):
        raise ConfigError(f"--batch-sizes {batch_sizes!r}: every batch size must be a positive integer")
    settings = tuple(t.strip() for t in train_settings.split(","))
    for t in settings:
        try:
            parse_train_setting(t)
        except ValueError as e:
            raise ConfigError(f"--train-settings: {e}") from None
    _writable(results_dir)
    path, record = record_speed_bench(results_dir, scale, wait=True, batch_sizes=sizes, device=device,
                                      repeats=repeats, what=what, progress=sys.stderr.isatty(),
                                      train_settings=settings, compile=compile)
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
    from .flow_reference import format_rows, run_flow_reference
    from .files import atomic_write_json

    names = [v.strip() for v in variants.split(",") if v.strip()]
    result = run_flow_reference(reference, names, steps, seed, data_dir, progress=sys.stderr.isatty())
    if out is not None:
        atomic_write_json(out, result)
    typer.echo(format_rows(result))
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
