"""A study's page (a spec of kind "study", e.g. ablations/g-training.toml): per point, how well G learned F's inverse
(measure.diagnostics), its samples' quality and its cost, the best point of each axis against the centre, a figure.

A point's axis is its variant name up to the first "-" ("lr-3e-3" -> "lr"); "centre" is the point every axis starts
from. Points are read straight from their records, seeds averaged."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..ablations import AblationSpec

from .figures import png_bytes
from .format import DASH, fmt_num, md_table, rel_link
from .writer import ReportWriter

CENTRE = "centre"
# (key, header): what each point measured; `diag.` keys come from the record's diagnostics, `metric.` from its metrics
COLUMNS = (("diag.inverse_mse_clean", "inverse MSE ↓"), ("sigma2", "= σ² x"), ("diag.noise_sensitivity", "noise sens. ↑"),
           ("metric.recall_effnet", "recall ↑"), ("recall_ratio", "recall / exact's"),
           ("metric.precision_effnet", "precision ↑"), ("metric.fd_effnet", "fd_effnet ↓"),
           ("metric.fd_cls", "fd_cls ↓"), ("metric.acc_cls", "acc_cls ↑"),
           ("train_min", "training (min, in-run)"), ("g_ms", "G ms (batch 1, in-run)"))


# what an axis can be judged by (ablations.STUDY_JUDGES; lower is better): the point's key and the measure's name
JUDGES = {"inverse_mse_clean": ("diag.inverse_mse_clean", "inverse MSE"), "fd_cls": ("metric.fd_cls", "fd_cls"),
          "fd_effnet": ("metric.fd_effnet", "fd_effnet")}


def axis_of(variant: str) -> str:
    return variant.split("-")[0]


def _mean(values: Sequence[Any]) -> float:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(np.mean(nums)) if nums else float("nan")


def exact_recall(df: pd.DataFrame) -> float:
    """The unguided exact inverse's recall at a scale (inverse-strategy's `exact` row, seeds averaged): the yardstick
    of G's recall. `df`: one scale's records frame (frames.results_frame)."""
    rows = df[(df["ablation"] == "inverse-strategy") & (df["variant"] == "exact")]
    col = "metric_recall_effnet"
    return float(rows[col].astype(float).mean()) if col in rows and len(rows) else float("nan")


def base_of(variant: str, deltas: dict[str, dict[str, Any]]) -> str | None:
    """The point `variant` was varied from: the one whose delta is the largest proper part of its own (same keys,
    same values; the centre's empty delta is part of every other; the centre has none)."""
    own = deltas.get(variant, {})
    parts = [(len(delta), name) for name, delta in deltas.items()
             if len(delta) < len(own) and all(own.get(k, object()) == v for k, v in delta.items())]
    return max(parts, key=lambda p: p[0])[1] if parts else None


def study_points(records: Sequence[dict[str, Any]], order: Sequence[str], exact_recall: float,
                 deltas: dict[str, dict[str, Any]] | None = None, labels: dict[str, str] | None = None) -> list[dict]:
    """One row per variant (in `order`, then any others by name), its measurements averaged over seeds, and the
    point it was varied from (`deltas`: each variant's spec delta; without them, the centre). `labels`: the spec's
    labels, over those the records were written with."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_variant.setdefault(rec["variant"], []).append(rec)
    names = [v for v in order if v in by_variant] + sorted(set(by_variant) - set(order))
    points = []
    for name in names:
        recs = by_variant[name]
        label = (labels or {}).get(name) or recs[0].get("label") or name
        p: dict[str, Any] = {"variant": name, "axis": axis_of(name), "label": label,
                             "seeds": len(recs), "base": base_of(name, deltas) if deltas else CENTRE}
        for key, _ in COLUMNS:
            section, _, field = key.partition(".")
            if field:
                p[key] = _mean([r.get("diagnostics" if section == "diag" else "metrics", {}).get(field) for r in recs])
        p["sigma2"] = p["diag.inverse_mse_clean"] / _mean([r.get("diagnostics", {}).get("noise_sigma_sq") for r in recs])
        p["recall_ratio"] = p["metric.recall_effnet"] / exact_recall if exact_recall > 0 else float("nan")
        p["train_min"] = _mean([r.get("timing", {}).get("stage2_s") or r.get("train", {}).get("peer", {}).get("seconds")
                                for r in recs]) / 60  # G's training, or a peer's (a peer's search)
        p["best_w"] = _mean([r.get("guidance", {}).get("best_w") for r in recs])
        p["g_ms"] = _mean([r.get("timing", {}).get("g_ms_batch1") for r in recs])
        points.append(p)
    return points


def axis_summary(points: Sequence[dict[str, Any]], judge: dict[str, str] | None = None) -> list[list[str]]:
    """Per axis, its best point by its judge (`judge`: axis -> a JUDGES name; default the inverse MSE), the point
    the axis was varied from, and how many times lower the judged measure is at the best than at that base (the
    change in noise sensitivity beside it)."""
    by_name = {p["variant"]: p for p in points}
    rows = []
    for axis in dict.fromkeys(p["axis"] for p in points if p["variant"] != CENTRE):
        key, measure = JUDGES[(judge or {}).get(axis, "inverse_mse_clean")]
        group = [p for p in points if p["axis"] == axis and np.isfinite(p[key])]
        if not group:
            continue
        best = min(group, key=lambda p: p[key])
        base = by_name.get(best["base"])
        gain = base[key] / best[key] if base else float("nan")
        sens = round(best["diag.noise_sensitivity"] - base["diag.noise_sensitivity"], 2) + 0.0 if base else math.nan
        rows.append([f"`{axis}`", measure, best["label"], base["label"] if base else DASH,  # + 0.0: no "-0.00"
                     f"x{fmt_num(gain, 2)}" if np.isfinite(gain) else DASH,
                     f"{sens:+.2f}" if np.isfinite(sens) else DASH])
    return rows


def timing_spread(records: Sequence[dict[str, Any]]) -> tuple[float, float] | None:
    """The widest range of `timing.g_ms_batch1` among records of one G architecture (the same `config.backward`):
    how far a timing taken inside a run, on a shared machine, moves when nothing it times has changed. None where no
    architecture has two timed records."""
    by_arch: dict[str, list[float]] = {}
    for rec in records:
        ms = rec.get("timing", {}).get("g_ms_batch1")
        if isinstance(ms, (int, float)) and math.isfinite(ms):
            arch = json.dumps(rec.get("config", {}).get("backward"), sort_keys=True)
            by_arch.setdefault(arch, []).append(float(ms))
    spans = [(min(v), max(v)) for v in by_arch.values() if len(v) > 1]
    return max(spans, key=lambda s: s[1] / s[0] if s[0] > 0 else math.inf) if spans else None


def measured(points: Sequence[dict[str, Any]], key: str) -> bool:
    """Whether any point measured `key` (a peer's search has no G diagnostics)."""
    return any(np.isfinite(p.get(key, math.nan)) for p in points)


def study_figure(points: Sequence[dict[str, Any]], sigma2: float, title: str) -> bytes:
    labels = [p["label"] for p in points][::-1]
    y = np.arange(len(points))
    panels = [panel for panel in (("diag.inverse_mse_clean", "inverse MSE per value (log)", sigma2, "σ²"),
                                  ("diag.noise_sensitivity", "noise sensitivity (exact inverse = 1)", 1.0,
                                   "exact inverse"),
                                  ("metric.fd_effnet", "fd_effnet", None, None), ("metric.fd_cls", "fd_cls", None, None))
              if measured(points, panel[0])]
    fig = Figure(figsize=(4 * len(panels), 0.45 * len(points) + 1.6))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (key, xlabel, ref, ref_label) in zip(axes, panels, strict=True):
        ax.barh(y, [p[key] for p in points][::-1], color="#4c72b0")
        if ref is not None:
            ax.axvline(ref, color="#c44e52", linestyle="--", label=ref_label)
            ax.legend(loc="lower right", fontsize=8)
        if key == "diag.inverse_mse_clean":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short log axis overlap
        ax.set_xlabel(xlabel)
    axes[0].set_yticks(y, labels, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return png_bytes(fig)


def timing_note(records: Sequence[dict[str, Any]]) -> str:
    """What the in-run minutes and milliseconds are worth, with the spread the records themselves show."""
    spread = timing_spread(records)
    seen = (f": one G architecture's batch-1 pass spans {fmt_num(spread[0])} to {fmt_num(spread[1])} ms across these "
            "records" if spread and spread[1] > spread[0] else "")
    return ("Minutes and milliseconds were timed inside each run, on a machine other jobs shared, and are indicative "
            f"only{seen}. Draw no conclusion from them; the speed page (`bench speed`) times samplers interleaved "
            "and warm.")


def study_page(w: ReportWriter, results_dir: Path, scale: str, name: str, records: Sequence[dict[str, Any]],
               spec: AblationSpec | None, comment: str | None, exact_recall: float) -> str:
    """Write <scale>/<name>.md and its figure; returns the page's path relative to the report."""
    deltas = {name: v.delta for name, v in spec.variants.items()} if spec else None
    labels = {name: v.label for name, v in spec.variants.items()} if spec else None
    points = study_points(records, list(spec.variants) if spec else [], exact_recall, deltas, labels)
    sigma2 = _mean([r.get("diagnostics", {}).get("noise_sigma_sq") for r in records])
    title = spec.title if spec else name
    base = f"{scale}/{name}"
    md = [f"# {title}: scale `{scale}`\n"]
    if spec and spec.description:
        md.append(" ".join(spec.description.split()) + "\n")
    if comment:
        md.append(f"**Reading.** {comment}\n")
    md.append("## Which knob matters\n\nPer axis, its best point by the measure it is judged by (the distance to F's "
              "inverse unless the spec says otherwise), the point the axis was varied from, how many times lower that "
              "measure is at the best than at that point, and the change in noise sensitivity.\n\n"
              + md_table(["Axis", "Judged by", "Best point", "Varied from", "Measure, from / best",
                          "Noise sensitivity change"], axis_summary(points, spec.judge if spec else None), "llllrr"))
    formats = {"diag.inverse_mse_clean": "{:.3g}", "sigma2": "{:.1f}", "metric.fd_effnet": "{:.0f}", "metric.fd_cls": "{:.0f}",
               "train_min": "{:.1f}"}  # the rest: two decimals
    g_study = measured(points, "diag.inverse_mse_clean")  # else a peer's search: no F, no inverse to match
    columns = [(k, h) for k, h in (*COLUMNS, ("best_w", "best w")) if measured(points, k)]
    cells = [[p["label"], str(p["seeds"]), *[DASH if not np.isfinite(p[k]) else formats.get(k, "{:.2f}").format(p[k])
                                             for k, _ in columns]] for p in points]
    about = ("Inverse MSE: G's output against F's exact inverse on held-out pairs, per value (σ² = "
             f"{fmt_num(sigma2, 4)}, the training noise). Noise sensitivity: the per-pixel spread of G's samples over "
             "its noise, over that of F's exact inverse from the same noises (1 = as varied). Recall / exact's: "
             f"against the unguided exact inverse's recall ({fmt_num(exact_recall, 3)}). Unguided samples."
             if g_study else "Guided points are reported at their best w of the shared sweep (column best w).")
    md.append(f"## Every point\n\nEach point is its own run with its own schedule. {about} {timing_note(records)}\n\n"
              + md_table(["Point", "Seeds", *[h for _, h in columns]], cells, "lr" + "r" * len(columns)))
    md.append(f"![{title}]({name}.png)\n")
    grids = [f"- {r.get('label') or r['variant']}, seed {r['seed']}:\n\n"
             f"  ![{r['variant']}]({rel_link(results_dir / scale / r['samples_png'], w.out_dir / scale)})\n"
             for r in sorted(records, key=lambda r: ([p["variant"] for p in points].index(r["variant"]), r["seed"]))
             if r.get("samples_png")]
    if grids:
        md.append("## Samples\n\n" + "\n".join(grids))
    w.bytes(f"{base}.png", study_figure(points, sigma2, f"{title} (scale {scale})"))
    return w.text(f"{base}.md", "\n".join(md))
