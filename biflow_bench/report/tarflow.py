"""The noise table's own section (ablations/tarflow-noise.toml): the metric against the training noise sigma, one
curve with score denoising and one without, as TARFlow draws its noise ablation (sec. 2.4-2.5). Each row's sigma,
noise kind and denoising are read from its records' configs, not from its name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import png_bytes
from .format import fmt_num, md_table
from .writer import ReportWriter

NOISE_TABLE = "tarflow-noise"
DENOISE_LABELS = {"score": "with score denoising", "none": "raw"}


def noise_points(records: Sequence[dict[str, Any]], table: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: its sigma, noise kind ("gaussian" / "uniform"), denoising, and the table's metric."""
    settings = {}
    for rec in records:
        c = rec["config"]
        settings[rec["variant"]] = (float(c["stage1"]["noise_sigma"]), c["stage1"].get("noise", "gaussian"),
                                    c["backward"]["denoise"])
    rows = [{"variant": r.variant, "sigma": settings[r.variant][0], "noise": settings[r.variant][1],
             "denoise": settings[r.variant][2], "ours": r.ours, "ours_std": r.ours_std}
            for r in table.itertuples() if r.variant in settings]
    return pd.DataFrame(rows, columns=["variant", "sigma", "noise", "denoise", "ours", "ours_std"])


def noise_summary(points: pd.DataFrame) -> dict[str, tuple[float, float, float | None] | None]:
    """Per denoising mode, over the Gaussian noise levels (TARFlow's claims are about sigma; the uniform rows are a
    marker of their own): (best sigma, best metric, worst / best, None with one level), or None without a point."""
    out: dict[str, tuple[float, float, float | None] | None] = {}
    for d in DENOISE_LABELS:
        p = points[(points["denoise"] == d) & (points["noise"] == "gaussian")
                   & np.isfinite(points["ours"].astype(float))]
        out[d] = None if p.empty else (float(p.loc[p["ours"].idxmin(), "sigma"]), float(p["ours"].min()),
                                       float(p["ours"].max() / p["ours"].min()) if len(p) > 1 else None)
    return out


def noise_figure(points: pd.DataFrame, metric: str, title: str) -> bytes:
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (denoise, label) in enumerate(DENOISE_LABELS.items()):
        for noise, marker, line in (("gaussian", "o", "-"), ("uniform", "s", "none")):
            p = points[(points["denoise"] == denoise) & (points["noise"] == noise)].sort_values("sigma")
            if len(p):
                ax.errorbar(p["sigma"], p["ours"], yerr=np.nan_to_num(p["ours_std"].to_numpy(float)), marker=marker,
                            linestyle=line, capsize=3, color=f"C{i}",
                            label=f"{noise} noise, {label}" if noise == "uniform" else f"Gaussian noise, {label}")
    ax.set(xscale="log", xlabel="training noise σ (std; pixels in [-1, 1])", ylabel=f"{metric} (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def noise_section(w: ReportWriter, base: str, table: pd.DataFrame, metric: str, *,
                  records: Sequence[dict[str, Any]]) -> str:
    """The markdown of the page's sigma section; writes its figure to `<base>-sigma.png`."""
    points = noise_points(records, table)
    if points.empty:
        return ""
    name = base.rsplit("/", 1)[-1]
    w.bytes(f"{base}-sigma.png", noise_figure(points, metric, f"{metric} against the training noise "
                                              f"({base.split('/')[0]})"))
    cells = [[DENOISE_LABELS[d], *(("—", "—", "—") if r is None else
                                   (fmt_num(r[0], 4), fmt_num(r[1], 1), fmt_num(r[2], 2) if r[2] else "—"))]
             for d, r in noise_summary(points).items()]
    return "\n".join([
        "## The metric against the training noise\n",
        f"![{metric} against sigma]({name}-sigma.png)\n",
        md_table(["Samples", "Best σ", f"Best {metric}", "Worst / best"], cells, "lrrr"),
        "Over the Gaussian noise levels; worst / best: how far the metric moves across them (TARFlow: much less with "
        "denoising).\n"])
