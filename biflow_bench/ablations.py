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
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, apply_delta, did_you_mean, scale_config

SPEC_KEYS = {"name", "version", "title", "paper_table", "description", "include", "baseline", "variants", "kind",
             "judge"}
VARIANT_KEYS = {"set", "paper", "label"}
PAPER_KEYS = {"fid", "is", "nfe", "ms_per_image", "params_m", "speedup", "note"}
KINDS = ("quality", "speed", "study")  # study: run like a table, outside the paper's tables (make g-study)
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

    def resolve(self, variant: str, scale: str, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Scale preset + baseline + variant delta (+ user overrides) -> the run's config."""
        if variant not in self.variants:
            raise SpecError(f"unknown variant {variant!r} of ablation {self.name!r}; valid: {', '.join(self.variants)}"
                            + did_you_mean(variant, self.variants))
        cfg = apply_delta(scale_config(scale), self.baseline, source=f"{self.path} [baseline]")
        cfg = apply_delta(cfg, self.variants[variant].delta, source=f"{self.path} [variants.{variant}]")
        return apply_delta(cfg, overrides or {}, source="--set")


def default_spec_dir() -> Path:
    env = os.environ.get("BIFLOW_ABLATIONS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "ablations"


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


def load_spec(path: str | Path) -> AblationSpec:
    path = Path(path)
    raw = _read_toml(path)
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SPEC_KEYS))}")
    baseline: dict[str, Any] = {}
    if "include" in raw:
        base = _read_toml(path.parent / str(raw["include"]), where=f"{path}: include ")
        baseline.update(_flatten(base.get("baseline", {}), f"{path.parent / str(raw['include'])}: [baseline]"))
    baseline.update(_flatten(raw.get("baseline", {}), f"{path}: [baseline]"))
    for key in ("name", "title", "paper_table"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise SpecError(f"{path}: missing or empty string key {key!r}")
    if not PLAIN_NAME.fullmatch(raw["name"]):
        raise SpecError(f"{path}: name {raw['name']!r} must be lower-case letters, digits, '-' and '+' (it names "
                        "folders and Makefile targets)")
    if not isinstance(raw.get("version"), int) or isinstance(raw.get("version"), bool):
        raise SpecError(f"{path}: 'version' must be an integer")
    kind = raw.get("kind", "quality")
    if kind not in KINDS:
        raise SpecError(f"{path}: kind={kind!r} is not one of {', '.join(KINDS)}")
    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, dict) or not variants_raw:
        raise SpecError(f"{path}: needs at least one [variants.NAME] table")
    variants = {}
    for name, v in variants_raw.items():
        where = f"{path}: [variants.{name}]"
        if not PLAIN_NAME.fullmatch(name):
            raise SpecError(f"{where}: the variant name must be lower-case letters, digits, '-' and '+' (it names "
                            "result files)")
        if not isinstance(v, dict):
            raise SpecError(f"{where} must be a table")
        bad = set(v) - VARIANT_KEYS
        if bad:
            raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; valid: {', '.join(sorted(VARIANT_KEYS))}")
        paper = v.get("paper", {})
        if not isinstance(paper, dict) or set(paper) - PAPER_KEYS:
            raise SpecError(f"{where}: 'paper' must be a table with keys among {', '.join(sorted(PAPER_KEYS))}")
        variants[name] = Variant(name, _flatten(v.get("set", {}), f"{where}.set"), dict(paper), str(v.get("label", "")))
    judge = raw.get("judge", {})
    if not isinstance(judge, dict) or not set(judge.values()) <= set(STUDY_JUDGES) or (judge and kind != "study"):
        raise SpecError(f"{path}: 'judge' is a study's table of axis = metric, the metric one of "
                        f"{', '.join(STUDY_JUDGES)}")
    spec = AblationSpec(
        name=raw["name"], version=raw["version"], title=raw["title"], paper_table=raw["paper_table"],
        baseline=baseline, variants=variants, description=str(raw.get("description", "")), kind=kind, path=str(path),
        judge=dict(judge),
    )
    for name in variants:  # every variant must resolve: catches bad keys and types at load
        try:
            spec.resolve(name, "tiny")
        except SpecError:
            raise
        except ConfigError as e:
            raise SpecError(str(e)) from None
    return spec


PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9+-]*")


def load_registry(spec_dir: str | Path | None = None) -> dict[str, AblationSpec]:
    """All specs under `spec_dir` (files starting with '_' are shared bases, not ablations); duplicates refused."""
    spec_dir = Path(spec_dir) if spec_dir else default_spec_dir()
    if not spec_dir.is_dir():
        raise SpecError(f"ablation spec directory {spec_dir} not found; set BIFLOW_ABLATIONS to the folder of *.toml specs")
    registry: dict[str, AblationSpec] = {}
    for path in sorted(spec_dir.glob("*.toml")):
        if path.name.startswith("_"):
            continue
        spec = load_spec(path)
        if spec.name in registry:
            raise SpecError(f"{path}: duplicate ablation name {spec.name!r} (also in {registry[spec.name].path})")
        registry[spec.name] = spec
    return registry


def get_spec(name: str, registry: dict[str, AblationSpec] | None = None) -> AblationSpec:
    registry = load_registry() if registry is None else registry
    if name not in registry:
        raise SpecError(f"unknown ablation {name!r}; valid: {', '.join(registry)}{did_you_mean(name, registry)}")
    return registry[name]
