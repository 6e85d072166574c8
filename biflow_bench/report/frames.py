"""The records as the report reads them: one flattened DataFrame row per record (`results_frame`), one per timed
sampler of the speed records (`speed_frame`); results.py stores and finds the records themselves."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..identity import overrides_label, record_config_hash
from ..results import is_number, scan_records

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
             if isinstance(p, Mapping) and is_number(p.get("w"))]
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
    params = [v for v in _dict(rec, "params").values() if is_number(v) and v is not None]
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
