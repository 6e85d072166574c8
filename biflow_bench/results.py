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
(one line, naming the file), and `scan_records` skips such files and says why instead of failing the report
(report/frames.py reads the records as DataFrames). `write_variant_record` writes a run's record and sample grid.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .ablations import AblationSpec
from .files import atomic_write_bytes, atomic_write_json
from .identity import RunIdentity, earlier_hashes, record_config_hash
from .provenance import environment

RESULT_SCHEMA = 1
IDENTITY_KEYS = ("ablation", "variant", "scale", "seed")
ARCHIVE = "archive"  # results/archive/: superseded records, read only when asked
CALIBRATION = "calibration.json"  # results/<scale>/: real-data calibration rows, one entry per calibration key
# curve: quality against training time (curve.py); scaling: speed-up against the exact inverse's serial steps;
# editing: the editing table's measurements of one trained variant (edit_table.py)
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "ablation": ("metric", "metrics"), "speed": ("rows",), "curve": ("points",), "scaling": ("rows",),
    "editing": ("rows", "config")}
SPEED_ROW_KEYS = ("sampler", "batch_size", "ms_per_image")

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


def check_name(value: Any, key: str) -> str | None:
    """Identity fields become path components, so they must be plain names."""
    if key == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"'seed' must be a non-negative integer, got {value!r}"
        return None
    if not isinstance(value, str) or not value or value.startswith(".") or any(c in value for c in "/\\\n"):
        return f"{key!r} must be a plain non-empty name, got {value!r}"
    return None


def is_number(v: Any) -> bool:
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
        if err := check_name(record[key], key):
            return err
    if kind == "ablation":
        metric, metrics = record["metric"], record["metrics"]
        if not isinstance(metric, str) or not metric:
            return "'metric' must name the primary metric"
        if not isinstance(metrics, dict) or metric not in metrics:
            return f"'metrics' must be an object holding the primary metric {metric!r}"
        bad = sorted(k for k, v in metrics.items() if not is_number(v))
        if bad:
            return f"non-numeric metric value(s) for {', '.join(bad)}"
    if kind == "speed":
        rows = record["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return "'rows' must be a list of objects"
        for i, row in enumerate(rows):
            if absent := [k for k in SPEED_ROW_KEYS if k not in row]:
                return f"rows[{i}] lacks {', '.join(absent)}"
            if not all(is_number(row[k]) and row[k] is not None for k in ("batch_size", "ms_per_image")):
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


G_DIAGNOSTICS = ("noise_sensitivity",)  # what a G record measures today (measure.diagnostics): older ones aren't shared


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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def share_measurement(spec: AblationSpec, variant: str, scale: str, seed: int, results_dir: Path, ident: RunIdentity,
                      source: Path, rec: dict[str, Any], config: dict[str, Any] | None = None) -> Path:
    """Record `variant` from `rec`, another table's record of the same config hash and seed: the same models, samples
    and metrics (see results.find_measurement), so nothing is trained or evaluated again; the table's own fields
    (label, the paper's numbers, and `config`: its resolved config, which may differ from the source's in settings
    the run never reads) are this variant's, and `measured_in` names the record the numbers come from."""
    start = time.perf_counter()
    measured_in = rec.get("measured_in") or source.relative_to(results_dir / scale).as_posix()
    log(f"[{spec.name}/{variant}] seed={seed}: same config ({ident.config_hash}) and seed as {measured_in}; "
        "sharing its measurement")
    png = (results_dir / scale / rec["samples_png"]).read_bytes()
    own = {"measured_in": measured_in, **({"config": config} if config is not None else {})}
    return write_variant_record(spec, variant, scale, seed, results_dir, ident, {**rec, **own}, png, start)


def write_grids(spec: AblationSpec, variant: str, scale: str, seed: int, results_dir: Path, ident: RunIdentity,
                grids: dict[str, bytes]) -> dict[str, str]:
    """Write a record's image grids where the report finds them, samples/<table>/<record's stem>[-<name>].png, after
    archiving a superseded record (before its grid's name is taken); returns each grid's path under the scale."""
    home = record_path(results_dir, scale, spec.name, variant, seed, ident.config_hash if ident.overrides else None)
    archive_superseded(home, results_dir, ident.config_hash)
    paths = {}
    for name, png in grids.items():
        paths[name] = f"samples/{spec.name}/{home.stem}{f'-{name}' if name else ''}.png"
        atomic_write_bytes(results_dir / scale / paths[name], png)
    return paths


def write_variant_record(spec: AblationSpec, variant: str, scale: str, seed: int, results_dir: Path,
                         ident: RunIdentity, measurement: dict[str, Any], png: bytes, start: float) -> Path:
    """Write the sample grid and the record of one variant: `measurement` (what was measured; a shared record may
    carry another table's fields, which this variant's own replace) + the table's and this run's own fields."""
    samples_png = write_grids(spec, variant, scale, seed, results_dir, ident, {"": png})[""]
    v = spec.variants[variant]
    own = {
        "schema": RESULT_SCHEMA, "kind": "ablation", "ablation": spec.name, "variant": variant,
        "label": v.label or variant, "scale": scale, "seed": seed, "spec_version": spec.version,
        "overrides": ident.overrides,
    }
    record = {
        **own, **measurement, **own,  # own fields at the top, and over any the measurement carries
        "paper": {**v.paper, "table": spec.paper_table},
        "samples_png": str(samples_png), "env": environment(),
        "wall_time_s": time.perf_counter() - start,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path = write_record(results_dir, record)
    metric, metrics, guidance = record["metric"], record["metrics"], record["guidance"]
    at_w = f" (best w={guidance['best_w']:g})" if len(guidance["scales"]) > 1 else ""
    bpd = f" bpd={metrics['bpd']:.3f}" if "bpd" in metrics else ""
    log(f"[{spec.name}/{variant}] {metric}={metrics[metric]:.3f}{at_w}{bpd} nfe={record['nfe_label']} -> {path}")
    return path
