"""Ablation specs: one TOML file per table of the paper (ablations/*.toml), loaded and validated into a registry.

A spec is a versioned delta on the scale preset (lm-evaluation-harness style): `include` pulls in a shared base,
`[baseline]` holds dotted-key overrides common to every variant, and each `[variants.NAME]` adds its own `set`
overrides and the paper's numbers for that row, so every report can show ours beside the paper's.

    name = "denoise"
    version = 1
    title = "Denoising mode"
    paper_table = "BiFlow Table 3 (denoising), BiFlow-B/2, FID-50K w/o CFG"
    include = "_base.toml"
    [baseline]
    "backward.strategy" = "hidden-align"
    [variants.learned]
    paper = { fid = 31.88 }
    set = { "backward.denoise" = "learned" }

An included file (and what it includes in turn) gives its baseline, its variants with their paper numbers and its
paper_table; the including file adds its own on top and may not redefine an included variant. An include is looked up
beside the spec, then among the built-in specs, so a spec anywhere can build on _base.toml or on a paper table. The
paper's numbers and paper_table are optional: a table of your own has none.

The built-in specs are ablations/*.toml (BIFLOW_ABLATIONS moves the folder); BIFLOW_SPECS names more spec files or
folders (os.pathsep-separated) whose specs join them (docs/your-own-ablation.md). Files starting with '_' are shared
bases, not ablations.
"""

from __future__ import annotations

import itertools
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SCALES, ConfigError, RunConfig, apply_delta, did_you_mean, scale_config

SPEC_KEYS = {"name", "version", "title", "paper_table", "description", "include", "baseline", "at_scale", "variants",
             "kind", "judge"}
VARIANT_KEYS = {"set", "paper", "label"}
# order: the paper's ranking stated in words, without numbers (1 best; equal orders unordered), judged in place of FID
PAPER_KEYS = {"fid", "is", "nfe", "ms_per_image", "params_m", "speedup", "note", "order"}
# study: run like a table, outside the paper's tables (make g-study); editing: trained variants' edits (edit_table.py)
KINDS = ("quality", "speed", "study", "editing")
# what a study's axis may be judged by (all lower is better; default the first): `judge = { axis = "fd_cls" }`
STUDY_JUDGES = ("inverse_mse_clean", "fd_cls", "fd_effnet")


class SpecError(ConfigError):
    """A malformed ablation spec; the message names the file and the key."""


@dataclass(frozen=True)
class Variant:
    name: str
    delta: dict[str, Any]
    paper: dict[str, Any] = field(default_factory=dict)  # the paper's numbers for this row (fid, is, nfe, ...)
    label: str = ""


@dataclass(frozen=True)
class AblationSpec:
    name: str
    version: int
    title: str
    paper_table: str
    baseline: dict[str, Any]
    variants: dict[str, Variant]
    description: str = ""
    kind: str = "quality"  # "speed": a timing table, run by the speed benchmark
    path: str = ""
    judge: dict[str, str] = field(default_factory=dict)  # study: axis -> one of STUDY_JUDGES (else the first)
    # [at_scale.NAME]: the baseline's deltas at one scale only (a table's shorter schedule at the small scale)
    at_scale: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resolve(self, variant: str, scale: str, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Scale preset + baseline (+ its deltas at this scale) + variant delta (+ user overrides) -> the run's
        config."""
        if variant not in self.variants:
            raise SpecError(f"unknown variant {variant!r} of ablation {self.name!r}; valid: {', '.join(self.variants)}"
                            + did_you_mean(variant, self.variants))
        cfg = apply_delta(scale_config(scale), self.baseline, source=f"{self.path} [baseline]")
        cfg = apply_delta(cfg, self.at_scale.get(scale, {}), source=f"{self.path} [at_scale.{scale}]")
        cfg = apply_delta(cfg, self.variants[variant].delta, source=f"{self.path} [variants.{variant}]")
        return apply_delta(cfg, overrides or {}, source="--set")

    @property
    def builtin(self) -> bool:
        """One of the paper's tables (ablations/), not a user's (BIFLOW_SPECS), which may include a paper table's
        rows and numbers."""
        return bool(self.path) and Path(self.path).resolve().parent == default_spec_dir().resolve()


SPECS_ENV = "BIFLOW_SPECS"


def default_spec_dir() -> Path:
    env = os.environ.get("BIFLOW_ABLATIONS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "ablations"


def user_spec_paths() -> list[Path]:
    """The spec files and folders BIFLOW_SPECS names (os.pathsep-separated; empty entries skipped)."""
    paths = [Path(p) for p in os.environ.get(SPECS_ENV, "").split(os.pathsep) if p]
    for path in paths:
        if not path.exists():
            raise SpecError(f"{SPECS_ENV} (or --specs): {path}: no such spec file or folder")
    return paths


def add_spec_paths(paths: list[Path]) -> None:
    """--specs: ahead of BIFLOW_SPECS, in the environment, so every load in this process and the ones it starts
    (a torchrun's workers) sees the same registry."""
    os.environ[SPECS_ENV] = os.pathsep.join(filter(None, [*map(str, paths), os.environ.get(SPECS_ENV)]))


def _read_toml(path: Path, where: str = "") -> dict[str, Any]:
    """`where` names the spec that points at `path` (its include), so an error says which file to fix."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(f"{where}{path}: file not found") from None
    except OSError as e:  # a directory (include = "" or "."), no permission, ...
        raise SpecError(f"{where}{path}: cannot read ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}{path}: not valid TOML ({e})") from None


def _flatten(table: Any, where: str) -> dict[str, Any]:
    """Dotted keys may be written quoted ("stage2.metric") or as nested tables; both flatten to dotted keys."""
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table of dotted keys")
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _flatten(v, where).items()})
        else:
            out[k] = v
    return out


def _check_keys(keys: Any, valid: set[str], where: str) -> None:
    bad = sorted(set(keys) - valid)
    if bad:
        raise SpecError(f"{where}: unknown key(s) {', '.join(bad)}; valid: {', '.join(sorted(valid))}"
                        + did_you_mean(bad[0], valid))


def _include_path(spec: Path, include: Any) -> Path:
    """Beside the spec, else among the built-in specs: a spec anywhere may build on _base.toml or a paper table."""
    if not isinstance(include, str) or "\0" in include:
        raise SpecError(f"{spec}: 'include' must name a spec file, e.g. include = \"_base.toml\"")
    beside, builtin = spec.parent / include, default_spec_dir() / include
    if beside.exists():
        return beside
    if builtin.is_file():
        return builtin
    raise SpecError(f"{spec}: include {beside}: file not found (nor among the built-in specs, {default_spec_dir()})")


def _read_spec(path: Path, chain: tuple[Path, ...] = (), where: str = ""
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]], dict[str, Variant]]:
    """A spec file with its includes followed: (its own keys, paper_table defaulting to the included one's; the
    baseline; its deltas per scale; the variants), the included ones first. `chain`: the including files, to refuse
    a cycle."""
    raw = _read_toml(path, where)
    _check_keys(raw, SPEC_KEYS, str(path))
    chain = (*chain, path.resolve())
    baseline: dict[str, Any] = {}
    at_scale: dict[str, dict[str, Any]] = {}
    variants: dict[str, Variant] = {}
    origin: dict[str, str] = {}  # variant -> the file that defines it, for the redefinition error
    if "include" in raw:
        included = _include_path(path, raw["include"])
        if included.resolve() in chain:
            raise SpecError(f"{path}: include {included} is a cycle ({' -> '.join(p.name for p in chain)} -> "
                            f"{included.name})")
        base_raw, baseline, at_scale, variants = _read_spec(included, chain, where=f"{path}: include ")
        origin = {name: str(included) for name in variants}
        if "paper_table" in base_raw:  # the included rows' paper numbers come from that table
            raw = {"paper_table": base_raw["paper_table"], **raw}
    baseline.update(_flatten(raw.get("baseline", {}), f"{path}: [baseline]"))
    scales_raw = raw.get("at_scale", {})
    if not isinstance(scales_raw, dict) or not all(isinstance(v, dict) for v in scales_raw.values()):
        raise SpecError(f"{path}: 'at_scale' must be [at_scale.SCALE] tables of dotted keys")
    for scale, delta in scales_raw.items():
        if scale not in SCALES:
            raise SpecError(f"{path}: [at_scale.{scale}]: unknown scale; valid: {', '.join(SCALES)}"
                            + did_you_mean(scale, SCALES))
        at_scale[scale] = {**at_scale.get(scale, {}), **_flatten(delta, f"{path}: [at_scale.{scale}]")}
    variants_raw = raw.get("variants", {})
    if not isinstance(variants_raw, dict):
        raise SpecError(f"{path}: 'variants' must be [variants.NAME] tables")
    for name, v in variants_raw.items():
        where = f"{path}: [variants.{name}]"
        if not PLAIN_NAME.fullmatch(name):
            raise SpecError(f"{where}: the variant name must be lower-case letters, digits, '-' and '+' (it names "
                            "result files)")
        if name in variants:
            raise SpecError(f"{where}: variant {name!r} is already defined in {origin[name]} (included); give yours "
                            "another name")
        if not isinstance(v, dict):
            raise SpecError(f"{where} must be a table")
        _check_keys(v, VARIANT_KEYS, where)
        paper = v.get("paper", {})
        if not isinstance(paper, dict):
            raise SpecError(f"{where}: 'paper' must be a table with keys among {', '.join(sorted(PAPER_KEYS))}")
        _check_keys(paper, PAPER_KEYS, f"{where}.paper")
        if "order" in paper and not (isinstance(paper["order"], int) and paper["order"] >= 1):
            raise SpecError(f"{where}.paper: 'order' must be a whole number >= 1 (1: the paper's best)")
        variants[name] = Variant(name, _flatten(v.get("set", {}), f"{where}.set"), dict(paper), str(v.get("label", "")))
    return raw, baseline, at_scale, variants


def load_spec(path: str | Path) -> AblationSpec:
    path = Path(path)
    raw, baseline, at_scale, variants = _read_spec(path)
    for key in ("name", "title"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise SpecError(f"{path}: missing or empty string key {key!r}")
    if not isinstance(raw.get("paper_table", ""), str):  # optional: a table of your own has no paper
        raise SpecError(f"{path}: 'paper_table' must be a string")
    if not PLAIN_NAME.fullmatch(raw["name"]):
        raise SpecError(f"{path}: name {raw['name']!r} must be lower-case letters, digits, '-' and '+' (it names "
                        "folders and Makefile targets)")
    if not isinstance(raw.get("version"), int) or isinstance(raw.get("version"), bool):
        raise SpecError(f"{path}: 'version' must be an integer")
    kind = raw.get("kind", "quality")
    if kind not in KINDS:
        raise SpecError(f"{path}: kind={kind!r} is not one of {', '.join(KINDS)}")
    if not variants:
        raise SpecError(f"{path}: needs at least one [variants.NAME] table (its own or an included spec's)")
    judge = raw.get("judge", {})
    if not isinstance(judge, dict) or not set(judge.values()) <= set(STUDY_JUDGES) or (judge and kind != "study"):
        raise SpecError(f"{path}: 'judge' is a study's table of axis = metric, the metric one of "
                        f"{', '.join(STUDY_JUDGES)}")
    spec = AblationSpec(
        name=raw["name"], version=raw["version"], title=raw["title"], paper_table=raw.get("paper_table", ""),
        baseline=baseline, variants=variants, description=str(raw.get("description", "")), kind=kind, path=str(path),
        judge=dict(judge), at_scale=at_scale,
    )
    for name, scale in itertools.product(variants, ("tiny", *at_scale)):  # every variant must resolve: catches bad
        try:                                                                 # keys and types at load
            spec.resolve(name, scale)
        except SpecError:
            raise
        except ConfigError as e:
            raise SpecError(str(e)) from None
    return spec


PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9+-]*")


def load_registry(spec_dir: str | Path | None = None) -> dict[str, AblationSpec]:
    """The specs under `spec_dir` (default: the built-in ones) and those BIFLOW_SPECS names; a name defined twice is
    refused, naming both files."""
    spec_dir = Path(spec_dir) if spec_dir else default_spec_dir()
    if not spec_dir.is_dir():
        raise SpecError(f"ablation spec directory {spec_dir} not found; set BIFLOW_ABLATIONS to the folder of *.toml specs")
    files: dict[Path, Path] = {}  # by resolved path: a file named twice (its folder and itself) is read once
    for entry in (spec_dir, *user_spec_paths()):
        for path in sorted(entry.glob("*.toml")) if entry.is_dir() else [entry]:
            if not path.name.startswith("_"):
                files.setdefault(path.resolve(), path)
    registry: dict[str, AblationSpec] = {}
    for path in files.values():
        spec = load_spec(path)
        if spec.name in registry:
            raise SpecError(f"{path}: duplicate ablation name {spec.name!r} (also in {registry[spec.name].path}); "
                            "rename one")
        registry[spec.name] = spec
    return registry


def get_spec(name: str, registry: dict[str, AblationSpec] | None = None) -> AblationSpec:
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise SpecError(f"unknown ablation {name!r}; valid: {', '.join(registry)}{did_you_mean(name, registry)}")
    return registry[name]
