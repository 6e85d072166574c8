"""What every `biflow-bench` command shares: option types, the checks of user input (each a one-line ConfigError that
says how to fix it, exit code 2 in cli.main), the runner's options and click-style help.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import SCALES, ConfigError, did_you_mean
from ..data import DataError
from ..files import LockBusy
from ..weights import WeightsError

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

USER_ERRORS = (ConfigError, DataError, WeightsError, LockBusy)

Scale = Annotated[str, typer.Option(help=f"scale preset: {', '.join(SCALES)}")]
Seed = Annotated[int, typer.Option(help="training and sampling seed")]
# default None: the project's results/ (paths.default_results_dir), resolved by the command, not the working directory
ResultsDir = Annotated[Path | None, typer.Option(help="where records are written (results/<scale>/<ablation>/; "
                                                      "default: results/ of the project, see README)")]
Overrides = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                     help="config override (TOML value), repeatable")]
DataDir = Annotated[Path | None, typer.Option(help="dataset directory (small scale: Fashion-MNIST IDX files; latent "
                                                    "scales: what prepare-latents wrote)")]
Ablation = Annotated[str, typer.Argument(metavar="ABLATION", help="ablation name (see `biflow-bench list`)")]
Variant = Annotated[str, typer.Argument(metavar="VARIANT", help="variant of the ablation (see `biflow-bench list`)")]

Device = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")]
VaePath = Annotated[str | None, typer.Option("--vae", help="diffusers AutoencoderKL directory (default: BIFLOW_VAE, "
                                                          "then the local caches)")]
RefStats = Annotated[Path | None, typer.Option(help="FID reference statistics (.npz with mu, sigma, e.g. ADM's "
                                                    "VIRTUAL_imagenet256_labeled.npz) or a folder of reference images")]



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


def run_options(results_dir: Path, data_dir: Path | None, force: bool, overrides: list[str] | None):
    """The runner's options from the command's (runner imported here: `--help` stays fast)."""
    from ..runner import RunOptions

    # progress: a bar on a terminal, periodic lines in a log (loop.fit decides)
    return RunOptions(results_dir=results_dir, data_dir=data_dir, force=force, overrides=parse_overrides(overrides))


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}{did_you_mean(scale, SCALES)}")


def positive(option: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{option} {value}: must be a positive integer")
    return value


def writable(directory: Path, option: str = "--results-dir") -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):  # unique: runs may share the folder
            pass
    except OSError as e:
        raise ConfigError(f"{option} {directory}: directory is not writable ({e.strerror or e}); pass another "
                          f"{option}") from None


def check_out_file(out: Path, suffixes: tuple[str, ...]) -> None:
    """--out names a file of a format we write, in a directory we can write to."""
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"--out {out}: use a {' or '.join(suffixes)} path (the file is written in that format)")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; name a file")
    writable(out.parent if str(out.parent) else Path("."), "--out")


def check_device(device: str | None) -> None:
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: use cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu")


def not_rank_zero() -> bool:
    """True in a torchrun process other than rank 0: a benchmark times one process, so the others leave at once."""
    return int(os.environ.get("RANK", "0")) != 0


def parse_list(option: str, text: str, kind: type, example: str) -> tuple:
    """A comma-separated option as a tuple of `kind` (int or float), or a one-line ConfigError."""
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise ConfigError(f"{option} {text!r}: expected comma-separated {noun}, e.g. {example}") from None
