"""Result records: one JSON file per run, keyed by its whole resolved config, written atomically and read defensively.

    <results_dir>/<scale>/<ablation>/<variant>__seed<N>.json            the variant's default config
    <results_dir>/<scale>/<ablation>/<variant>__seed<N>__<hash>.json    any other config (--set, --micro-batch)

A run's identity is (scale, ablation, variant, seed, config hash); the config hash (identity.config_id) covers every
setting of the resolved RunConfig the run reads and, where it changes the numbers, the micro-batch the training was
split into (the number of processes alone does not: it only changes float reduction order). A record says how its
config differs from the variant's default (`overrides`, dotted keys); a record with no overrides takes the readable
name, every other record carries its hash in the file name, so records of different configs sit side by side and
none replaces another: a default-named record of another config (an older spec or preset) is moved with its grid to
the archive, under its hashed name, before a new default record takes its place. A run is done only when a record
with its exact config hash exists (`find_record`).

    <results_dir>/archive/<scale>/<ablation>/<variant>__seed<N>__<hash>.json    superseded records (older configs)

Records in the archive (and their grids under archive/<scale>/samples/) are read only when asked
(`scan_records(..., include_archive=True)`): never by find_record / find_measurement, nor by a default report.

A record carries everything a table needs (metric, bootstrap std, NFE, timing, the paper's number, notes, grid).
Readers never trust a file: a truncated write, a foreign JSON or a record of another schema raises `BadRecord`
(one line, naming the file), and `load_results` skips such files and says why instead of failing the report.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .files import atomic_write_json
from .identity import earlier_hashes, overrides_label, record_config_hash

RESULT_SCHEMA = 1
KINDS = ("ablation", "speed")
IDENTITY_KEYS = ("ablation", "variant", "scale", "seed")
ARCHIVE = "archive"  # results/archive/: superseded records, read only when asked
CALIBRATION = "calibration.json"  # results/<scale>/: real-data calibration rows, one entry per calibration key
# curve: quality against training time (curve.py); scaling: speed-up against the exact inverse's serial steps
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "ablation": ("metric", "metrics"), "speed": ("rows",), "curve": ("points",), "scaling": ("rows",)}
SPEED_ROW_KEYS = ("sampler", "batch_size", "ms_per_image")

# Columns of `load_results` that exist even when no record was found, so callers can filter an empty frame.
RESULT_COLUMNS = (
    "scale", "ablation", "variant", "seed", "kind", "label", "metric", "value", "value_std", "nfe", "nfe_label",
    "paper_fid", "paper_table", "paper_nfe", "paper_ms_per_image", "ms_per_image", "images_per_s", "params_total",
    "inverse", "spec_version", "config_hash", "overrides", "samples_png", "notes", "wall_time_s", "best_w",
    "guidance_curve", "trajectory_rms", "flow_clip", "clip_percentile", "pre_clip_p99", "path", "calibration",
    "config", "micro_batch", "archived", "sample_batch",
)
SPEED_COLUMNS = (
    "scale", "seed", "order", "sampler", "label", "nfe", "nfe_label", "params", "flops_per_image", "batch_size", "ms_per_image",
    "images_per_s", "speedup", "peak_fraction", "paper_ms", "paper_speedup", "device", "matmul_peak_flops", "notes",
    "path",
)


class BadRecord(ValueError):
    """A results file that is not a valid record; `str()` is one line that names the file."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def record_path(results_dir: Path | str, scale: str, ablation: str, variant: str, seed: int,
                config_hash: str | None = None) -> Path:
    """Where a record lives: the readable name for the variant's default config (`config_hash` None), else the
    name carrying the config hash."""
    tag = f"__{config_hash}" if config_hash else ""
    return Path(results_dir) / scale / ablation / f"{variant}__seed{seed}{tag}.json"


def _home(rec: Mapping[str, Any], results_dir: Path) -> Path:
    """The path a record is written to: hashed unless it is its variant's default config."""
    tag = record_config_hash(rec) if rec["kind"] == "ablation" and rec.get("overrides") else None
    return record_path(results_dir, rec["scale"], rec["ablation"], rec["variant"], rec["seed"], tag)


def _homes(rec: Mapping[str, Any], results_dir: Path) -> list[Path]:
    """Every path a valid record may be found at: its home, or its hashed name (moved aside, see write_record)."""
    homes = [_home(rec, results_dir)]
    if rec["kind"] == "ablation":  # and the names earlier code moved records aside to (identity.earlier_hashes)
        for h in (record_config_hash(rec), *earlier_hashes(rec)):
            hashed = record_path(results_dir, rec["scale"], rec["ablation"], rec["variant"], rec["seed"], h)
            homes += [hashed] if hashed not in homes else []
    return homes


def _check_name(value: Any, key: str) -> str | None:
    """Identity fields become path components, so they must be plain names."""
    if key == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"'seed' must be a non-negative integer, got {value!r}"
        return None
    if not isinstance(value, str) or not value or value.startswith(".") or any(c in value for c in "/\\\n"):
        return f"{key!r} must be a plain non-empty name, got {value!r}"
    return None


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def validation_error(record: Any) -> str | None:
    """Why `record` is not a valid record of this schema, or None when it is."""
    if not isinstance(record, dict):
        return f"not a record: top-level JSON is a {type(record).__name__}, expected an object"
    if "schema" not in record:
        return "not a biflow-bench record (no 'schema' key)"
    if record["schema"] != RESULT_SCHEMA:
        return f"schema {record['schema']!r} is not supported (this version reads schema {RESULT_SCHEMA})"
    kind = record.get("kind")
    if not isinstance(kind, str) or not kind:
        return "missing or empty 'kind'"
    missing = [k for k in (*IDENTITY_KEYS, *REQUIRED_KEYS.get(kind, ())) if k not in record]
    if missing:
        return f"missing required key(s) {', '.join(missing)}"
    for key in IDENTITY_KEYS:
        if err := _check_name(record[key], key):
            return err
    if kind == "ablation":
        metric, metrics = record["metric"], record["metrics"]
        if not isinstance(metric, str) or not metric:
            return "'metric' must name the primary metric"
        if not isinstance(metrics, dict) or metric not in metrics:
            return f"'metrics' must be an object holding the primary metric {metric!r}"
        bad = sorted(k for k, v in metrics.items() if not _is_number(v))
        if bad:
            return f"non-numeric metric value(s) for {', '.join(bad)}"
    if kind == "speed":
        rows = record["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return "'rows' must be a list of objects"
        for i, row in enumerate(rows):
            if absent := [k for k in SPEED_ROW_KEYS if k not in row]:
                return f"rows[{i}] lacks {', '.join(absent)}"
            if not all(_is_number(row[k]) and row[k] is not None for k in ("batch_size", "ms_per_image")):
                return f"rows[{i}]: batch_size and ms_per_image must be numbers"
    for key in ("paper", "timing", "params", "config", "env", "overrides"):
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"{key!r} must be an object"
    micro = record.get("micro_batch")
    if micro is not None and (not isinstance(micro, int) or isinstance(micro, bool) or micro < 1):
        return f"'micro_batch' must be a positive integer or null, got {micro!r}"
    if record.get("notes") is not None and not isinstance(record["notes"], list):
        return "'notes' must be a list of strings"
    return None


def write_record(results_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """Validate and atomically write `record` at its home (see the module docstring); the schema is stamped when
    absent and an ablation record's `config_hash` is computed from its config. A valid record of another config
    at the readable name is moved to its own hashed name first: records of other configs are never overwritten."""
    results_dir = Path(results_dir)
    rec = {"schema": RESULT_SCHEMA, **record}
    scale, ablation, variant, seed = (rec.get(k, "?") for k in ("scale", "ablation", "variant", "seed"))
    path = record_path(results_dir, str(scale), str(ablation), str(variant), seed)
    if err := validation_error(rec):
        raise BadRecord(path, f"refusing to write: {err}")
    if rec["kind"] == "ablation":
        rec["config_hash"] = record_config_hash(rec)
        archive_superseded(_home(rec, results_dir), results_dir, rec["config_hash"])
    return atomic_write_json(_home(rec, results_dir), rec)


def archive_superseded(path: Path, results_dir: Path | str, config_hash: str) -> Path | None:
    """Before a record of `config_hash` takes the name `path`: a valid record of another config there (an older
    preset or spec) moves to the archive under its hashed name, with its sample grid, so neither is overwritten. An
    earlier run of that config archived before keeps its record and grid under a name stamped with its creation
    time (read by nothing; the archive's report shows the latest run of each config). Returns where it went."""
    results_dir = Path(results_dir)
    if (old := valid_record(path)) is None:
        return None
    if old["kind"] != "ablation" or (old_hash := record_config_hash(old)) == config_hash:
        return None
    archive = results_dir / ARCHIVE
    dest = record_path(archive, old["scale"], old["ablation"], old["variant"], old["seed"], old_hash)
    if (earlier := valid_record(dest)) is not None and earlier != old:
        stamp = "".join(c for c in str(earlier.get("created", "")) if c.isalnum()) or "earlier"
        _archive(earlier, archive, archive, dest.with_name(f"{dest.stem}__{stamp}.json"))
        dest.unlink()
    _archive(old, results_dir, archive, dest)
    path.unlink()
    return dest


def _archive(rec: dict[str, Any], grids_from: Path, archive: Path, dest: Path) -> None:
    """Write `rec` at `dest` in the archive, its sample grid (under grids_from) moved beside it under dest's stem."""
    scale = rec["scale"]
    grid = grids_from / scale / str(rec.get("samples_png"))
    if rec.get("samples_png") and grid.is_file():
        png = Path("samples") / rec["ablation"] / f"{dest.stem}.png"
        (archive / scale / png).parent.mkdir(parents=True, exist_ok=True)
        os.replace(grid, archive / scale / png)
        rec = {**rec, "samples_png": str(png)}
    atomic_write_json(dest, rec)


def valid_record(path: Path | str) -> dict[str, Any] | None:
    """The record at `path`, or None where there is none or it is not a valid record."""
    try:
        return read_record(path)
    except (FileNotFoundError, BadRecord):
        return None


def read_record(path: Path | str) -> dict[str, Any]:
    """The record stored at `path`; BadRecord when the file is unreadable, not JSON or not a valid record."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise BadRecord(path, f"unreadable ({e.strerror or e})") from None
    if not data.strip():
        raise BadRecord(path, "empty file (interrupted write?)")
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRecord(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise BadRecord(path, f"not valid JSON, truncated? ({e.msg} at line {e.lineno} column {e.colno})") from None
    if err := validation_error(record):
        raise BadRecord(path, err)
    return record


def find_record(results_dir: Path | str, scale: str, ablation: str, variant: str, seed: int,
                config_hash: str) -> Path | None:
    """The path of a valid record of exactly this run (this config hash), or None: the run must be done."""
    results_dir = Path(results_dir)
    plain = record_path(results_dir, scale, ablation, variant, seed)
    # its readable name, its hashed name, then any other hashed name (a record moved aside under an earlier hash)
    for path in dict.fromkeys([plain, record_path(results_dir, scale, ablation, variant, seed, config_hash),
                               *sorted(plain.parent.glob(f"{plain.stem}__*.json"))]):
        if (rec := valid_record(path)) is None:
            continue
        if ((rec["scale"], rec["ablation"], rec["variant"], rec["seed"]) == (scale, ablation, variant, seed)
                and rec["kind"] == "ablation" and record_config_hash(rec) == config_hash):
            return path
    return None


G_DIAGNOSTICS = ("noise_sensitivity",)  # what a G record measures today (record.diagnostics): older ones aren't shared


def measures_today(rec: dict[str, Any]) -> bool:
    return rec["config"].get("inverse") != "learned" or all(k in rec.get("diagnostics", {}) for k in G_DIAGNOSTICS)


def find_measurement(results_dir: Path | str, scale: str, seed: int,
                     config_hash: str) -> tuple[Path, dict[str, Any]] | None:
    """A valid ablation record, in any table, of this config hash and seed (the first by path) whose sample grid is
    on disk and that `measures_today`, or None. Its models, samples and metrics are those this run would produce:
    every stage and every image is seeded from the config and the seed."""
    results_dir = Path(results_dir)
    for path in sorted((results_dir / scale).glob("*/*.json")):
        rec = valid_record(path)
        if (rec is not None and rec["kind"] == "ablation" and (rec["scale"], rec["seed"]) == (scale, seed)
                and record_config_hash(rec) == config_hash and path in _homes(rec, results_dir)
                and (results_dir / scale / str(rec.get("samples_png"))).is_file() and measures_today(rec)):
            return path, rec
    return None


def is_done(results_dir: Path | str, scale: str, ablation: str, variant: str, seed: int,
            config_hash: str | None = None) -> bool:
    """True only when a valid record for exactly this run is stored: a corrupt file means the run must be redone.
    Without `config_hash`, any config's record at the readable name counts."""
    if config_hash is not None:
        return find_record(results_dir, scale, ablation, variant, seed, config_hash) is not None
    path = record_path(results_dir, scale, ablation, variant, seed)
    if (rec := valid_record(path)) is None:
        return False
    return (rec["scale"], rec["ablation"], rec["variant"], rec["seed"]) == (scale, ablation, variant, seed)


def scan_records(results_dir: Path | str, include_archive: bool = False
                 ) -> tuple[list[tuple[Path, dict[str, Any]]], list[tuple[Path, str]]]:
    """Every valid record under `results_dir` (sorted by path) and every skipped file with its reason; with
    `include_archive`, then those of results_dir/archive, each with `"archived": True` added.

    Only files at the record depth (<scale>/<ablation>/*.json) are considered, so other JSON in the tree is not
    mistaken for a record; hidden files (temp files of atomic writes) are ignored. A valid record stored under a
    path its own fields do not give (a copied or moved file) is skipped: it would duplicate or mislabel a run."""
    results_dir = Path(results_dir)
    records, skipped = _scan(results_dir, archived=False)
    if include_archive:
        more, bad = _scan(results_dir / ARCHIVE, archived=True)
        records, skipped = records + more, skipped + bad
    return records, skipped


def _scan(results_dir: Path, archived: bool) -> tuple[list[tuple[Path, dict[str, Any]]], list[tuple[Path, str]]]:
    records: list[tuple[Path, dict[str, Any]]] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for path in sorted(results_dir.glob("*/*/*.json")):
        if path.name.startswith(".") or not path.is_file() or path.relative_to(results_dir).parts[0] == ARCHIVE:
            continue
        try:
            rec = read_record(path)
        except FileNotFoundError:  # removed between listing and reading
            continue
        except BadRecord as e:
            skipped.append((path, e.reason))
            continue
        homes = _homes(rec, results_dir)
        if path not in homes and not (archived and any(path.stem.startswith(f"{h.stem}__") for h in homes[1:])):
            skipped.append((path, f"its fields say it belongs at {homes[0].relative_to(results_dir).as_posix()} "
                                  "(copied or moved file?)"))
            continue
        identity = (rec["kind"], rec["scale"], rec["ablation"], rec["variant"], rec["seed"],
                    record_config_hash(rec) if rec["kind"] == "ablation" else None)
        if identity in seen:
            if path not in homes:  # an earlier run of an archived config (archive_superseded): kept, not reported
                continue
            skipped.append((path, f"the same run (config {identity[-1]}) as {seen[identity].relative_to(results_dir)}"
                                  "; duplicate left out"))
            continue
        seen[identity] = path
        records.append((path, {**rec, "archived": True} if archived else rec))
    return records, skipped


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _dict(rec: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = rec.get(key)
    return v if isinstance(v, dict) else {}


def _notes(rec: Mapping[str, Any]) -> tuple[str, ...]:
    """The record's notes, and its guidance sweep's (runner.sweep_guidance: a sweep extended past its edge)."""
    note = _dict(rec, "guidance").get("note")
    return tuple(str(n) for n in rec.get("notes") or ()) + ((str(note),) if note else ())


def _guidance(rec: Mapping[str, Any], metric: Any) -> dict[str, Any]:
    """A guided row's best w and its curve [(w, primary metric), ...] when it swept more than one scale."""
    guidance = _dict(rec, "guidance")
    curve = [(float(p["w"]), _float(_dict(p, "metrics").get(metric))) for p in guidance.get("curve") or ()
             if isinstance(p, Mapping) and _is_number(p.get("w"))]
    if len(curve) < 2:
        return {"best_w": math.nan, "guidance_curve": ()}
    return {"best_w": _float(guidance.get("best_w")), "guidance_curve": tuple(curve)}


def _flow_norms(rec: Mapping[str, Any]) -> dict[str, Any]:
    """F's trajectory RMS per state, its clip value, the percentile of |pre-clip parameter| the clip sits at, and
    the largest per-block 99th percentile of |alpha|, |mu| (metrics/flow_norms.py)."""
    norms = _dict(rec, "flow_norms")
    rms = norms.get("trajectory_rms")
    p99 = [_float(_dict(b, k).get("p99")) for b in norms.get("blocks") or () if isinstance(b, dict)
           for k in ("alpha", "mu")]
    return {"trajectory_rms": tuple(_float(v) for v in rms) if isinstance(rms, list) else (),
            "flow_clip": _float(norms.get("clip")), "clip_percentile": _float(norms.get("clip_percentile")),
            "pre_clip_p99": max(p99) if p99 else math.nan}


def _result_row(path: Path, rec: Mapping[str, Any]) -> dict[str, Any]:
    metrics, paper, timing = _dict(rec, "metrics"), _dict(rec, "paper"), _dict(rec, "timing")
    params = [v for v in _dict(rec, "params").values() if _is_number(v) and v is not None]
    metric = rec.get("metric")
    nfe = rec.get("nfe")
    nfe_label = rec.get("nfe_label")
    row: dict[str, Any] = {
        "scale": rec["scale"], "ablation": rec["ablation"], "variant": rec["variant"], "seed": rec["seed"],
        "kind": rec["kind"], "label": rec.get("label") or rec["variant"], "metric": metric,
        "value": _float(metrics.get(metric)) if metric else math.nan,
        "value_std": _float(metrics.get(f"{metric}_std")) if metric else math.nan,
        "nfe": nfe, "nfe_label": str(nfe_label) if nfe_label is not None else (str(nfe) if nfe is not None else None),
        "paper_fid": _float(paper.get("fid")), "paper_table": paper.get("table"), "paper_nfe": paper.get("nfe"),
        "paper_ms_per_image": _float(paper.get("ms_per_image")),
        "ms_per_image": _float(timing.get("ms_per_image")), "images_per_s": _float(timing.get("images_per_s")),
        "sample_batch": _float(timing.get("sample_batch", _dict(_dict(rec, "config"), "sample").get("batch_size"))),
        "params_total": float(sum(params)) if params else math.nan,
        "inverse": _dict(rec, "config").get("inverse"), "spec_version": rec.get("spec_version"),
        "config_hash": record_config_hash(rec), "overrides": overrides_label(_dict(rec, "overrides")),
        "samples_png": rec.get("samples_png"), "notes": _notes(rec),
        "wall_time_s": _float(rec.get("wall_time_s")), **_guidance(rec, metric), **_flow_norms(rec),
        "path": str(path), "calibration": rec.get("calibration") if isinstance(rec.get("calibration"), str) else None,
        "config": _dict(rec, "config"), "micro_batch": rec.get("micro_batch"), "archived": rec.get("archived") is True,
    }
    row.update({f"metric_{k}": _float(v) for k, v in sorted(metrics.items())})
    row.update({f"diag_{k}": _float(v) for k, v in sorted(_dict(rec, "diagnostics").items())})
    return row


def results_frame(records: Iterable[tuple[Path, Mapping[str, Any]]],
                  kinds: Iterable[str] = ("ablation",)) -> pd.DataFrame:
    """One flattened row per record of the given kinds, sorted by (scale, ablation, variant, seed)."""
    kinds = tuple(kinds)
    rows = [_result_row(p, r) for p, r in records if r["kind"] in kinds]
    if not rows:
        return pd.DataFrame(columns=list(RESULT_COLUMNS))
    df = pd.DataFrame(rows)
    metric_cols = sorted(c for c in df.columns if c.startswith(("metric_", "diag_")))  # metrics, then diagnostics
    df = df[[*RESULT_COLUMNS, *metric_cols]]
    return df.sort_values(["scale", "ablation", "variant", "seed"], kind="stable").reset_index(drop=True)


def speed_frame(records: Iterable[tuple[Path, Mapping[str, Any]]]) -> pd.DataFrame:
    """One row per timed (sampler, batch size) of every speed record, in the record's own row order."""
    out = []
    for path, rec in records:
        if rec["kind"] != "speed":
            continue
        machine = _dict(rec, "machine")
        for i, row in enumerate(rec["rows"]):
            out.append({
                "scale": rec["scale"], "seed": rec["seed"], "order": i, "sampler": str(row["sampler"]),
                "label": row.get("label") or str(row["sampler"]), "nfe": row.get("nfe"),
                "nfe_label": str(row.get("nfe_label") or row.get("nfe") or "") or None,
                **{k: _float(row.get(k)) for k in ("params", "flops_per_image", "batch_size", "ms_per_image",
                                                   "images_per_s", "speedup", "peak_fraction", "paper_ms",
                                                   "paper_speedup")},
                "device": machine.get("device"), "matmul_peak_flops": _float(machine.get("matmul_peak_flops")),
                "notes": _notes(rec), "path": str(path),
            })
    if not out:
        return pd.DataFrame(columns=list(SPEED_COLUMNS))
    df = pd.DataFrame(out)[list(SPEED_COLUMNS)]
    return df.sort_values(["scale", "seed", "order"], kind="stable").reset_index(drop=True)


def load_results(results_dir: Path | str, kinds: Iterable[str] = ("ablation",),
                 include_archive: bool = False) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """(one row per valid record of `kinds`, [(skipped file, reason)]); bad files never make this fail."""
    records, skipped = scan_records(results_dir, include_archive)
    return results_frame(records, kinds), skipped


def load_speed_records(results_dir: Path | str) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """(one row per timed sampler and batch size of every speed record, [(skipped file, reason)])."""
    records, skipped = scan_records(results_dir)
    return speed_frame(records), skipped
