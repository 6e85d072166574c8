"""The report's figures as PNG bytes (matplotlib, fixed metadata so re-renders are byte-identical): an ablation's
metric beside the paper's FID, guidance curves, speed against batch size, speed against quality.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .format import first_value


# Agg writes the matplotlib version into PNG metadata by default; dropping it keeps figures byte-identical across
# matplotlib patch releases, not only across re-renders.
PNG_METADATA: dict[str, Any] = {"Software": None}


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=PNG_METADATA)
    return buf.getvalue()


def wrap_label(s: str, width: int = 30) -> str:
    return "\n".join(textwrap.wrap(s, width)) or s


def ablation_figure(table: pd.DataFrame, title: str) -> bytes:
    """Two panels sharing the variant axis: our metric (error bars = the table's noise) and the paper's FID."""
    n = len(table)
    fig = Figure(figsize=(10, 1.6 + 0.55 * n), layout="constrained")
    ax_ours, ax_paper = fig.subplots(1, 2, sharey=True)
    y = np.arange(n)
    metric = first_value(table["metric"]) or "metric"
    ours = table["ours"].to_numpy(float)
    err = np.nan_to_num(table["ours_std"].to_numpy(float), nan=0.0)
    ax_ours.barh(y, np.nan_to_num(ours, nan=0.0), xerr=err, color="tab:blue", capsize=3)
    ax_paper.barh(y, np.nan_to_num(table["paper_fid"].to_numpy(float), nan=0.0), color="tab:gray")
    for ax, vals, missing in ((ax_ours, ours, "not run"), (ax_paper, table["paper_fid"].to_numpy(float), "no number")):
        for yi, v in zip(y, vals):
            if math.isnan(v):
                ax.text(0, yi, f" {missing}", va="center", fontsize=8, color="0.4")
    ax_ours.set_yticks(y, [wrap_label(s) for s in table["label"]], fontsize=8)
    ax_ours.invert_yaxis()  # first variant on top, as in the table
    ax_ours.set_xlabel(f"ours: {metric} (lower is better)")
    ax_paper.set_xlabel("paper: FID (lower is better)")
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def guidance_curves(df: pd.DataFrame, order: Sequence[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Per guided variant: the swept w and the primary metric at each, averaged over its seeds."""
    curves = {}
    for v in order:
        points: dict[float, list[float]] = {}
        for curve in df.loc[df["variant"] == v, "guidance_curve"]:
            for w, value in curve or ():
                points.setdefault(w, []).append(value)
        if len(points) > 1:
            ws = sorted(points)
            curves[v] = (ws, [float(np.mean(points[w])) for w in ws])
    return curves


def guidance_figure(curves: dict[str, tuple[list[float], list[float]]], labels: dict[str, str], metric: str,
                    title: str) -> bytes:
    """Metric against guidance scale w, one line per guided variant (the best w of each marked)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for v, (ws, values) in curves.items():
        (line,) = ax.plot(ws, values, marker="o", label=wrap_label(labels.get(v, v), 50))
        best = int(np.nanargmin(values)) if np.isfinite(values).any() else None
        if best is not None:
            ax.plot([ws[best]], [values[best]], marker="*", markersize=14, color=line.get_color())
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def speed_figure(speed: pd.DataFrame, order: Sequence[str], title: str) -> bytes:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for sampler in order:
        g = speed[speed["sampler"] == sampler].sort_values("batch_size")
        ax.plot(g["batch_size"], g["ms_per_image"], marker="o", label=first_value(g["label"]) or sampler)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({int(b) for b in speed["batch_size"] if math.isfinite(b)})
    ax.set_xticks(sizes, [str(b) for b in sizes])  # the batch sizes timed, not powers of two written as 2^k
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per image")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return png_bytes(fig)


def speed_quality_figure(table: pd.DataFrame, title: str) -> bytes:
    """Ours (this machine) and, where the records or spec carry them, the paper's (TPU) speed against quality."""
    has_paper = bool(np.isfinite(table["paper_ms_per_image"].astype(float) * table["paper_fid"].astype(float)).any())
    fig = Figure(figsize=(11 if has_paper else 6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if has_paper else 1, squeeze=False)[0]
    metric = first_value(table["metric"]) or "metric"
    t = table[np.isfinite(table["ms_per_image"].astype(float) * table["ours"].astype(float))]
    axes[0].errorbar(t["ms_per_image"], t["ours"], yerr=np.nan_to_num(t["ours_std"].to_numpy(float)), fmt="o",
                     capsize=3)
    for _, r in t.iterrows():
        axes[0].annotate(wrap_label(r["label"], 24), (r["ms_per_image"], r["ours"]), fontsize=7, xytext=(4, 4),
                         textcoords="offset points")
    axes[0].set(xscale="log", xlabel="ms per image (this machine)", ylabel=f"{metric} (lower is better)",
                title="ours")
    if has_paper:
        p = table[np.isfinite(table["paper_ms_per_image"].astype(float) * table["paper_fid"].astype(float))]
        axes[1].plot(p["paper_ms_per_image"], p["paper_fid"], "s", color="tab:gray")
        for _, r in p.iterrows():
            axes[1].annotate(wrap_label(r["label"], 24), (r["paper_ms_per_image"], r["paper_fid"]), fontsize=7,
                             xytext=(4, 4), textcoords="offset points")
        axes[1].set(xscale="log", xlabel="ms per image (paper, TPU)", ylabel="FID (lower is better)", title="paper")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.2, y=0.1)  # room for the point labels
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def curve_figure(points: Sequence[dict[str, Any]], metrics: Sequence[str], title: str) -> bytes:
    """Quality against training minutes of one curve record: a panel per metric, a line per guidance scale."""
    fig = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    for ax, metric in zip(np.atleast_1d(fig.subplots(1, len(metrics))), metrics, strict=True):
        for w in sorted({p["w"] for p in points}):
            pts = sorted((p["train_s"] / 60, p["metrics"][metric]) for p in points
                         if p["w"] == w and isinstance(p["metrics"].get(metric), (int, float)))
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"w = {w:g}")
        ax.set_xlabel("training minutes (this machine)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def scaling_figure(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """Speed-up of one pass of G over the exact inverse against the exact inverse's serial steps: measured, and
    the FLOP ratio (the speed-up if both ran at the same FLOP/s)."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    steps = [r["serial_steps"] for r in rows]
    ax.plot(steps, [r["speedup"] for r in rows], "o-", label="measured (ms ratio)")
    ax.plot(steps, [r["flop_ratio"] for r in rows], "s--", label="FLOP ratio")
    for r in rows:
        ax.annotate(f"{r['tokens']} tokens", (r["serial_steps"], r["speedup"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("serial steps of the exact inverse (blocks x tokens)")
    ax.set_ylabel("exact inverse / G")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return png_bytes(fig)
