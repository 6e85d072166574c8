"""`biflow-bench`: list, run and report the ablations, plus single steps (train, sample, eval), the torchrun jobs of
the latent scales and benchmarks.

    args.py    what every command shares: option types, checks of user input, RunOptions from the options
    run.py     list, run, progress, report: the ablation tables
    steps.py   train, sample, eval: one step of one variant
    dist.py    prepare-latents, train-dist, sample-dist: torchrun jobs (latent scales)
    bench.py   bench speed / flow-reference / curve / represent / scaling

Every user mistake (unknown ablation / variant / scale, malformed spec, missing data or weights, wrong override
type, a count that is not positive, a device that is not there, busy, missing or unwritable directories) ends in one
line on stderr and exit code 2, checked here before any work starts; nothing is half-written. Ctrl-C ends with one
line and exit code 130.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..config import ConfigError
from .args import USER_ERRORS, positive
from .bench import bench_app
from .dist import dist_app
from .run import run_app
from .steps import steps_app

# rich_markup_mode=None: plain click help (no "<bool>" type column, no "{ablation}" placeholders)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Reproducible ablation benchmarks for Bidirectional Normalizing Flow (BiFlow).")
for commands in (run_app, steps_app, dist_app):  # unnamed: their commands sit at the top level, in this order
    app.add_typer(commands)
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
    specs: Annotated[list[Path] | None, typer.Option(
        "--specs", metavar="PATH", help="your own ablation specs: a TOML file or a folder of them, beside the "
                                        "built-in ones (repeatable; adds to BIFLOW_SPECS; docs/your-own-ablation.md)")
                     ] = None,
) -> None:
    """Reproducible ablation benchmarks for Bidirectional Normalizing Flow (BiFlow)."""
    from .. import threads as thread_budget
    from ..ablations import add_spec_paths

    if specs:
        add_spec_paths(specs)
    if threads is not None:
        positive("--threads", threads)
    try:
        thread_budget.configure(threads)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class CtrlC(Exception):
    """Ctrl-C outside training (click would turn KeyboardInterrupt into a silent exit 130)."""


def _raise_ctrl_c(_signum: int, _frame: object) -> None:
    raise CtrlC


def main() -> None:
    """Entry point: user errors become one line and exit code 2; Ctrl-C says what was kept and how to resume (exit
    130): training saves a checkpoint at the next step (loop._StopFlag), anywhere else the command stops at once."""
    from ..training.loop import TrainingDiverged, TrainingInterrupted

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
