"""The report: Markdown, CSV and LaTeX tables and PNG figures regenerated from the result records alone.

    <out>/README.md                          index per scale: headline (`main`), ablation tables, speed, skipped files
    <out>/<scale>/<ablation>.{md,csv,tex,png}  ours (mean ± noise) beside the paper's FID, ranks and Kendall's tau;
                                               real-data calibration rows on top (results/<scale>/calibration.json)
                                               and the domain-classifier / precision-recall columns records have
    <out>/<scale>/speed.{md,csv,tex,png}       ms per image against batch size for every sampler
    <out>/<scale>/speed_quality.png            our metric against ms per image of the `main` variants (when speed
                                               records exist at that scale too), beside the paper's where known

Seeds are averaged only within one config hash (results.py): each table row is a variant's default config; records
of other configs (--set overrides, a micro-batch, an older spec's default) are rows of their own under "Other
configurations", labelled by how their config differs, and the report says what it separated.

Output is a pure function of the records (and the spec registry, for variant order and labels): no timestamps,
sorted iteration and fixed figure metadata, so regenerating an unchanged results directory is byte-identical.
Every file is written atomically; files a previous render wrote that this one no longer produces are removed
(only those listed in the previous render's manifest, never anything else in the output directory).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.stats import kendalltau

from .ablations import AblationSpec, load_registry
from .config import SCALES, ConfigError
from .files import atomic_write_bytes, atomic_write_text
from .results import results_frame, scan_records, speed_frame

MANIFEST = ".report-manifest"
COMMENTARY = "COMMENTARY.md"  # results/<scale>/<ablation>/: the hand-written reading of a table
DASH = "—"
# Agg writes the matplotlib version into PNG metadata by default; dropping it keeps figures byte-identical across
# matplotlib patch releases, not only across re-renders.
PNG_METADATA: dict[str, Any] = {"Software": None}


@dataclass
class ReportSummary:
    files: list[Path] = field(default_factory=list)  # every file written by this render, sorted
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # bad record files and why
    ablations: list[tuple[str, str]] = field(default_factory=list)  # (scale, ablation) rendered
    removed: list[Path] = field(default_factory=list)  # stale files of a previous render deleted
    separated: list[str] = field(default_factory=list)  # records of other configs shown apart from the tables
    kendall: dict[tuple[str, str], float | None] = field(default_factory=dict)  # (scale, ablation) -> tau


# ----------------------------------------------------------------------------------------------------- formatting


def _num(x: Any, digits: int = 2) -> str:
    """Fixed decimals for ordinary magnitudes, significant digits for tiny ones (a 0.004 std is not "0.00")."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    x = float(x)
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf"
    if x != 0 and abs(x) < 0.1:
        return f"{x:.{digits + 1}g}"
    return f"{x:.{digits}f}"


def _count(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    x = float(x)
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _text(x: Any) -> str:
    """A string cell; pandas turns missing strings into NaN, which is truthy, so `x or DASH` is not enough."""
    return x if isinstance(x, str) and x else DASH


def _rank(x: Any) -> str:
    return DASH if x is None or pd.isna(x) else str(int(x))


def _ours(mean: float, std: float, tex: bool = False) -> str:
    if math.isnan(mean):
        return DASH
    pm = r" $\pm$ " if tex else " ± "
    return _num(mean) + (pm + _num(std) if not math.isnan(std) else "")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A GitHub pipe table; `align` has one of l/r per column. Hand-written so cells are never re-parsed as
    numbers (tabulate would turn "12.30" into "12.3")."""
    esc = [[str(c).replace("|", r"\|") for c in r] for r in [header, *rows]]
    sep = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(r) + " |" for r in [esc[0], sep, *esc[1:]]]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(s: Any) -> str:
    out = "".join(_TEX.get(c, c) for c in str(s))
    for uni, tex in (("±", r"$\pm$"), ("—", "--"), ("×", r"$\times$"), ("↓", r"$\downarrow$"), ("↑", r"$\uparrow$"),
                     ("τ", r"$\tau$")):
        out = out.replace(uni, tex)
    return out


def _tex_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str, caption: str, label: str,
               raw_cols: Sequence[int] = ()) -> str:
    """booktabs table via pandas (jinja2 ships with torch); cells are escaped here, except columns already TeX."""
    body = [[c if i in raw_cols else _tex_escape(c) for i, c in enumerate(r)] for r in rows]
    df = pd.DataFrame(body, columns=[_tex_escape(h) for h in header])
    return df.to_latex(index=False, escape=False, column_format=align, caption=_tex_escape(caption), label=label)


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


# ------------------------------------------------------------------------------------------------------- tables


def variant_order(df: pd.DataFrame, spec: AblationSpec | None = None) -> list[str]:
    """The spec's variant order, then any variant only the records know (renamed or removed rows), by name."""
    seen = sorted(set(df["variant"]))
    listed = list(spec.variants) if spec else []
    return listed + [v for v in seen if v not in listed]


def _first(values: pd.Series) -> Any:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return vals[0] if vals else None


def split_configs(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(records of each variant's default config, records of every other config) of one (scale, ablation).

    A variant's table row averages seeds of one config hash only: the records without overrides, and when those
    hold several configs (an older spec's defaults) the one of the newest spec version (then the most seeds). The
    rest gets an `overrides` label (how it differs, or which earlier default it is) and is shown apart."""
    df = df.assign(overrides=df["overrides"].fillna("") if "overrides" in df else "")
    keep = pd.Series(df["overrides"] == "", index=df.index)
    labels = df["overrides"].copy()
    for _, g in df[keep].groupby("variant", sort=True):
        if g["config_hash"].nunique() < 2:
            continue
        ranked = sorted(g.groupby("config_hash"), key=lambda kv: (-_version(kv[1]), -len(kv[1]), kv[0]))
        for h, older in ranked[1:]:
            keep[older.index] = False
            labels[older.index] = f"default of spec v{_version(older)} (config {h})"
    df = df.assign(overrides=labels)
    return df[keep], df[~keep]


def _version(g: pd.DataFrame) -> int:
    versions = [int(v) for v in g["spec_version"] if isinstance(v, (int, float)) and not pd.isna(v)]
    return max(versions, default=0)


def other_configs_table(df: pd.DataFrame, spec: AblationSpec | None = None) -> pd.DataFrame:
    """One row per (variant, config hash) of the records `split_configs` set apart: mean over its seeds and noise."""
    rows = []
    for v in variant_order(df, spec):
        for h, g in df[df["variant"] == v].groupby("config_hash", sort=True):
            row = ablation_table(g, None).iloc[0].to_dict()
            rows.append({**row, "config_hash": h, "overrides": _first(g["overrides"]) or ""})
    cols = ["variant", "label", "overrides", "config_hash", "metric", "ours", "ours_std", "noise", "seeds", "nfe_label"]
    return pd.DataFrame(rows, columns=cols)


def ablation_table(df: pd.DataFrame, spec: AblationSpec | None = None) -> pd.DataFrame:
    """One row per variant of one (scale, ablation): ours (mean over seeds and its noise), NFE, paper FID, ranks.

    Noise is the std across seeds when a variant has more than one (floored at the runs' mean bootstrap std), else
    the bootstrap std stored with the single run. A seed whose metric is NaN makes the mean NaN: a diverged run is
    shown, not silently averaged away.
    Variants the spec lists but no record has are kept with their paper number so missing runs are visible."""
    rows = []
    for v in variant_order(df, spec):
        g = df[df["variant"] == v]
        sv = spec.variants.get(v) if spec else None
        vals = g["value"].astype(float)
        n = len(g)
        if n > 1:  # a std over a few seeds can land below one run's sampling noise by chance: never report less
            seeds_std, boot_std = float(vals.std(ddof=1)), float(g["value_std"].astype(float).mean())
            std, noise = (boot_std, "bootstrap") if boot_std > seeds_std else (seeds_std, "seeds")
        elif n == 1:
            std, noise = float(g["value_std"].iloc[0]), "bootstrap"
        else:
            std, noise = math.nan, ""
        nfe_labels = sorted({x for x in g["nfe_label"] if isinstance(x, str)})
        paper_fid = _first(g["paper_fid"])
        if paper_fid is None and sv is not None and isinstance(sv.paper.get("fid"), (int, float)):
            paper_fid = float(sv.paper["fid"])
        paper_ms = _first(g["paper_ms_per_image"]) if "paper_ms_per_image" in g else None
        if paper_ms is None and sv is not None and isinstance(sv.paper.get("ms_per_image"), (int, float)):
            paper_ms = float(sv.paper["ms_per_image"])
        best_ws = sorted({float(w) for w in g["best_w"] if isinstance(w, float) and math.isfinite(w)}) \
            if "best_w" in g else []
        rows.append({
            "best_w": "/".join(f"{w:g}" for w in best_ws) or None,
            "variant": v, "label": _first(g["label"]) or (sv.label if sv and sv.label else v),
            "metric": _first(g["metric"]), "ours": float(vals.mean(skipna=False)) if n else math.nan,
            "ours_std": std, "noise": noise, "seeds": n, "nfe_label": "/".join(nfe_labels) or None,
            "inverse": _first(g["inverse"]) if "inverse" in g else None,
            "ms_per_image": float(g["ms_per_image"].astype(float).mean()) if n else math.nan,
            "paper_fid": math.nan if paper_fid is None else float(paper_fid),
            "paper_ms_per_image": math.nan if paper_ms is None else float(paper_ms),
        })
    out = pd.DataFrame(rows, columns=["variant", "label", "metric", "ours", "ours_std", "noise", "seeds", "nfe_label",
                                      "best_w", "inverse", "ms_per_image", "paper_fid", "paper_ms_per_image"])
    # Rank 1 = lowest (best); ties share the better rank; variants without a number get no rank.
    out["our_rank"] = out["ours"].rank(method="min").astype("Int64")
    out["paper_rank"] = out["paper_fid"].rank(method="min").astype("Int64")
    return out


def kendall(table: pd.DataFrame) -> tuple[float | None, int, str]:
    """(tau, pairs, explanation) between our means and the paper's FIDs over variants that have both."""
    both = table[np.isfinite(table["ours"].astype(float)) & np.isfinite(table["paper_fid"].astype(float))]
    n = len(both)
    if n < 2:
        return None, n, f"n/a: {n} variant(s) have both our number and the paper's; need 2"
    tau = float(kendalltau(both["ours"].to_numpy(float), both["paper_fid"].to_numpy(float)).statistic)
    if math.isnan(tau):
        return None, n, f"n/a: one side is constant over the {n} variants that have both"
    tau += 0.0  # no "-0.000"
    return tau, n, f"{tau:.3f} over {n} variants"


def verdict(table: pd.DataFrame, sigmas: float = 2.0) -> str:
    """One sentence on whether the paper's ordering reproduced: for every pair of variants the paper separates, do
    ours order them the same way, and is our gap larger than `sigmas` x the combined noise of the two numbers?"""
    both = table[np.isfinite(table["ours"].astype(float)) & np.isfinite(table["paper_fid"].astype(float))]
    if len(both) < 2:
        return "Not comparable: fewer than two variants have both our number and the paper's."
    rows = list(both.sort_values("paper_fid").itertuples())
    agree, flipped, pairs = [], [], 0
    for i, better in enumerate(rows):
        for worse in rows[i + 1:]:
            if better.paper_fid == worse.paper_fid:
                continue
            pairs += 1
            gap = worse.ours - better.ours
            noise = math.hypot(*(0.0 if math.isnan(x) else x for x in (better.ours_std, worse.ours_std)))
            resolved = abs(gap) > sigmas * noise
            (agree if gap > 0 else flipped).append((better.variant, worse.variant, resolved))
    if not pairs:
        return "Not comparable: the paper's numbers do not order these variants."
    best_ours, best_paper = both.loc[both["ours"].astype(float).idxmin(), "variant"], rows[0].variant
    lead = (f"The paper's best variant (`{best_paper}`) is best here too" if best_ours == best_paper
            else f"The paper's best variant is `{best_paper}`; ours is `{best_ours}`")
    resolved_agree = sum(r for *_, r in agree)
    text = f"{lead}; {len(agree)} of {pairs} pairs keep the paper's order ({resolved_agree} beyond {sigmas:g}σ noise)"
    if flipped:
        shown = ", ".join(f"`{w}` beats `{b}`" + ("" if r else " (within noise)") for b, w, r in flipped)
        text += f"; reversed here: {shown}"
    return text + "."


def headline_table(df: pd.DataFrame, spec: AblationSpec | None = None) -> pd.DataFrame:
    """The `main` ablation per scale: our metric, NFE, ms per image, and the speed-up of each variant over the exact
    inverse (exact ms / variant ms) where an exact-inverse variant was timed at that scale."""
    main = df[df["ablation"] == "main"]
    parts = []
    for scale in _order_scales(set(main["scale"])):
        t = ablation_table(main[main["scale"] == scale], spec)
        t = t[t["seeds"] > 0]
        exact = t[(t["inverse"] == "exact") & np.isfinite(t["ms_per_image"].astype(float))]
        exact_ms = float(exact["ms_per_image"].iloc[0]) if len(exact) else math.nan
        t = t.assign(scale=scale, speedup_vs_exact=exact_ms / t["ms_per_image"].astype(float))
        parts.append(t)
    cols = ["scale", "variant", "label", "inverse", "metric", "ours", "ours_std", "noise", "seeds", "nfe_label",
            "ms_per_image", "speedup_vs_exact", "paper_fid"]
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)[cols]


MODEL_SIZE = {"paper": "B/2", "paper-xl": "XL/2"}  # the paper's model names; other scales train small models


def scale_label(label: Any, scale: str) -> Any:
    """A spec label names the paper's models ("BiFlow-B/2"); at a scale that trains other models, drop the size
    ("BiFlow"), and at paper-xl say XL/2."""
    if not isinstance(label, str):
        return label
    size = MODEL_SIZE.get(scale)
    return re.sub(r"-(B|XL)/2\b", f"-{size}" if size else "", label)


def _order_scales(scales: set[str]) -> list[str]:
    """Preset order (tiny, small, ...) first, unknown scales after by name."""
    return [s for s in SCALES if s in scales] + sorted(s for s in scales if s not in SCALES)


# ---------------------------------------------------------------------------------- calibration, metric columns

CALIBRATION = "calibration.json"  # results/<scale>/: written by the runner (runner.ensure_calibration)
# Metrics shown beside the primary one where records have them: (metric key, column header).
EXTRA_METRICS = (("acc_cls", "acc_cls ↑"), ("conf_cls", "conf_cls ↑"), ("fd_cls", "fd_cls ↓"),
                 ("precision_effnet", "precision ↑"), ("recall_effnet", "recall ↑"), ("precision", "precision ↑"),
                 ("recall", "recall ↑"))


def load_calibration(results_dir: Path, scale: str) -> dict[str, dict[str, Any]]:
    """The calibration entries of a scale by key ({} when the file is missing or unreadable)."""
    path = results_dir / scale / CALIBRATION
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("rows"), list)} \
        if isinstance(entries, dict) else {}


def table_calibration(df: pd.DataFrame, entries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The calibration entry the table's records name (the most common one), or None."""
    keys = [k for k in df["calibration"] if isinstance(k, str) and k in entries] if "calibration" in df else []
    return entries[max(sorted(set(keys)), key=keys.count)] if keys else None


def _noise(values: pd.Series, stds: pd.Series) -> float:
    """The table's noise rule: the std across seeds, floored at the runs' mean bootstrap std (one run: its own)."""
    boot = float(stds.astype(float).mean()) if len(stds) else math.nan
    return max(float(values.std(ddof=1)), boot) if len(values) > 1 else boot


def extra_columns(df: pd.DataFrame, variants: Sequence[str]) -> list[tuple[str, str, list[tuple[float, float]]]]:
    """(key, header, [(mean, noise) per variant]) for each EXTRA_METRICS key some record has a number for."""
    out = []
    for key, header in EXTRA_METRICS:
        col = f"metric_{key}"
        if col not in df or not np.isfinite(df[col].astype(float)).any():
            continue
        std_col = f"metric_{key}_std"
        cells = []
        for v in variants:
            g = df[df["variant"] == v]
            vals = g[col].astype(float)
            std = _noise(vals, g[std_col]) if std_col in g and len(g) else math.nan
            cells.append((float(vals.mean()) if len(g) else math.nan, std))
        out.append((key, header, cells))
    return out


def _calibration_cells(metrics: dict[str, Any], keys: Sequence[str], fill: int, tex: bool = False) -> list[str]:
    """A calibration row's cells: the primary metric (± its bootstrap std), `fill` dashes (no seeds / NFE / best w /
    paper / ranks), then the extra metric columns."""
    def cell(k: str) -> str:
        return _ours(_float_or_nan(metrics.get(k)), _float_or_nan(metrics.get(f"{k}_std")), tex=tex)

    return [cell(keys[0]), *[DASH] * fill, *[cell(k) for k in keys[1:]]]


def _calibration_names(calibration: dict[str, Any]) -> list[str]:
    return [str(r.get("name")) for r in calibration.get("rows", []) if isinstance(r, dict)]


def _float_or_nan(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


# ------------------------------------------------------------------------------------------------------ figures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=PNG_METADATA)
    return buf.getvalue()


def _wrap(s: str, width: int = 30) -> str:
    return "\n".join(textwrap.wrap(s, width)) or s


def ablation_figure(table: pd.DataFrame, title: str) -> bytes:
    """Two panels sharing the variant axis: our metric (error bars = the table's noise) and the paper's FID."""
    n = len(table)
    fig = Figure(figsize=(10, 1.6 + 0.55 * n), layout="constrained")
    ax_ours, ax_paper = fig.subplots(1, 2, sharey=True)
    y = np.arange(n)
    metric = _first(table["metric"]) or "metric"
    ours = table["ours"].to_numpy(float)
    err = np.nan_to_num(table["ours_std"].to_numpy(float), nan=0.0)
    ax_ours.barh(y, np.nan_to_num(ours, nan=0.0), xerr=err, color="tab:blue", capsize=3)
    ax_paper.barh(y, np.nan_to_num(table["paper_fid"].to_numpy(float), nan=0.0), color="tab:gray")
    for ax, vals, missing in ((ax_ours, ours, "not run"), (ax_paper, table["paper_fid"].to_numpy(float), "no number")):
        for yi, v in zip(y, vals):
            if math.isnan(v):
                ax.text(0, yi, f" {missing}", va="center", fontsize=8, color="0.4")
    ax_ours.set_yticks(y, [_wrap(s) for s in table["label"]], fontsize=8)
    ax_ours.invert_yaxis()  # first variant on top, as in the table
    ax_ours.set_xlabel(f"ours: {metric} (lower is better)")
    ax_paper.set_xlabel("paper: FID (lower is better)")
    fig.suptitle(title, fontsize=10)
    return _png(fig)


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
        (line,) = ax.plot(ws, values, marker="o", label=_wrap(labels.get(v, v), 50))
        best = int(np.nanargmin(values)) if np.isfinite(values).any() else None
        if best is not None:
            ax.plot([ws[best]], [values[best]], marker="*", markersize=14, color=line.get_color())
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def speed_figure(speed: pd.DataFrame, order: Sequence[str], title: str) -> bytes:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for sampler in order:
        g = speed[speed["sampler"] == sampler].sort_values("batch_size")
        ax.plot(g["batch_size"], g["ms_per_image"], marker="o", label=_first(g["label"]) or sampler)
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
    return _png(fig)


def speed_quality_figure(table: pd.DataFrame, title: str) -> bytes:
    """Ours (this machine) and, where the records or spec carry them, the paper's (TPU) speed against quality."""
    has_paper = bool(np.isfinite(table["paper_ms_per_image"].astype(float) * table["paper_fid"].astype(float)).any())
    fig = Figure(figsize=(11 if has_paper else 6, 4.5), layout="constrained")
    axes = fig.subplots(1, 2 if has_paper else 1, squeeze=False)[0]
    metric = _first(table["metric"]) or "metric"
    t = table[np.isfinite(table["ms_per_image"].astype(float) * table["ours"].astype(float))]
    axes[0].errorbar(t["ms_per_image"], t["ours"], yerr=np.nan_to_num(t["ours_std"].to_numpy(float)), fmt="o",
                     capsize=3)
    for _, r in t.iterrows():
        axes[0].annotate(_wrap(r["label"], 24), (r["ms_per_image"], r["ours"]), fontsize=7, xytext=(4, 4),
                         textcoords="offset points")
    axes[0].set(xscale="log", xlabel="ms per image (this machine)", ylabel=f"{metric} (lower is better)",
                title="ours")
    if has_paper:
        p = table[np.isfinite(table["paper_ms_per_image"].astype(float) * table["paper_fid"].astype(float))]
        axes[1].plot(p["paper_ms_per_image"], p["paper_fid"], "s", color="tab:gray")
        for _, r in p.iterrows():
            axes[1].annotate(_wrap(r["label"], 24), (r["paper_ms_per_image"], r["paper_fid"]), fontsize=7,
                             xytext=(4, 4), textcoords="offset points")
        axes[1].set(xscale="log", xlabel="ms per image (paper, TPU)", ylabel="FID (lower is better)", title="paper")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.2, y=0.1)  # room for the point labels
    fig.suptitle(title, fontsize=10)
    return _png(fig)


# ------------------------------------------------------------------------------------------------------ writing


class _Writer:
    """Atomic writes under `out_dir`, remembering what was written (for the summary and the stale-file sweep)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[Path] = []

    def text(self, rel: str, text: str) -> str:
        self.files.append(atomic_write_text(self.out_dir / rel, text))
        return rel

    def bytes(self, rel: str, data: bytes) -> str:
        self.files.append(atomic_write_bytes(self.out_dir / rel, data))
        return rel


def _notes_block(notes: Sequence[str]) -> str:
    return "".join(f"- {n}\n" for n in notes)


def _dedup(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _render_ablation(w: _Writer, results_dir: Path, scale: str, ablation: str, df: pd.DataFrame,
                     spec: AblationSpec | None, comment: str | None,
                     calibration_entries: dict[str, dict[str, Any]] | None = None,
                     others: pd.DataFrame | None = None) -> tuple[pd.DataFrame, float | None, str]:
    table = ablation_table(df, spec)
    tau, _, tau_text = kendall(table)
    # Records in the table's variant order, seeds ascending: notes and sample grids follow the table.
    rank_of = {v: i for i, v in enumerate(table["variant"])}
    ordered = df.assign(_o=df["variant"].map(rank_of)).sort_values(["_o", "seed"], kind="stable")
    title = spec.title if spec else ablation
    paper_table = (_first(df["paper_table"]) or (spec.paper_table if spec else None)) or DASH
    metrics = sorted({m for m in df["metric"] if isinstance(m, str) and m})
    metric = metrics[0] if metrics else "metric"
    base = f"{scale}/{ablation}"
    out_dir = w.out_dir / scale

    guided = table["best_w"].notna().any()  # the column of guided rows' best w, where a table has them
    header = ["Variant", f"Ours ({metric}, ↓)", "Seeds", "NFE", *(["Best w"] if guided else []), "Paper FID",
              "Our rank", "Paper rank"]
    cells = [[r.label, _ours(r.ours, r.ours_std), str(r.seeds), _text(r.nfe_label),
              *([_text(r.best_w)] if guided else []), _num(r.paper_fid), _rank(r.our_rank), _rank(r.paper_rank)]
             for r in table.itertuples()]
    fill = len(header) - 2  # the calibration rows' empty cells between our metric and the extra metrics
    tex_cells = [[c if i != 1 else _ours(r.ours, r.ours_std, tex=True) for i, c in enumerate(row)]
                 for row, r in zip(cells, table.itertuples())]
    extras = extra_columns(df, list(table["variant"]))
    header += [h for _, h, _ in extras]
    for i, row in enumerate(cells):
        row += [_ours(*col[i]) for _, _, col in extras]
        tex_cells[i] += [_ours(*col[i], tex=True) for _, _, col in extras]
    align = "lrrl" + "r" * (len(header) - 4)
    calibration = table_calibration(df, calibration_entries or {}) or {}
    cal_rows = [(str(r.get("label") or r.get("name")), r.get("metrics") if isinstance(r.get("metrics"), dict) else {})
                for r in calibration.get("rows", []) if isinstance(r, dict)]
    keys = [metric, *[k for k, _, _ in extras]]
    cells[:0] = [[f"*{label}*", *_calibration_cells(m, keys, fill)] for label, m in cal_rows]  # real data on top
    tex_cells[:0] = [[label, *_calibration_cells(m, keys, fill, tex=True)] for label, m in cal_rows]

    notes = []
    if len(metrics) > 1:
        notes.append(f"records use different primary metrics ({', '.join(metrics)}); our ranks compare unlike numbers")
    versions = sorted({int(v) for v in df["spec_version"] if isinstance(v, (int, float)) and not pd.isna(v)})
    if spec and versions and versions != [spec.version]:
        notes.append(f"records come from spec version(s) {', '.join(map(str, versions))}; the spec is now version "
                     f"{spec.version}")
    notes += [n for row_notes in ordered["notes"] for n in row_notes]
    notes = _dedup(notes)

    md = [f"# {title}: scale `{scale}`\n", f"Paper: {paper_table}. Ablation `{ablation}`"
          + (f", spec version {spec.version}" if spec else "") + ".\n"]
    if spec and spec.description:
        md.append(" ".join(spec.description.split()) + "\n")
    md.append(_md_table(header, cells, align))
    if cal_rows:
        accuracy = (calibration.get("classifier") or {}).get("test_accuracy")
        md.append(f"Rows in italics are real data, not models: {calibration.get('num_images')} training images scored "
                  "by the same code against the same held-out images (as they are: the floor; with the training "
                  f"noise sigma = {calibration.get('noise_sigma')}; blurred by a 3x3 box)."
                  + (f" The domain classifier (acc_cls, conf_cls, fd_cls) has {_num(100 * accuracy, 1)}% test accuracy."
                     if isinstance(accuracy, (int, float)) else "") + "\n")
    md.append(f"Kendall τ between our ranking and the paper's: {tau_text}. {verdict(table)}\n")
    if comment:
        md.append(f"**Why.** {comment}\n")
    caveat = "" if metric == "fid" else (f" Our metric is `{metric}` on this scale's data, not the paper's FID-50K on "
                                         "ImageNet: compare rankings, not values.")
    md.append("± is the std across seeds where a variant has more than one seed (never less than the runs' mean "
              "bootstrap std), otherwise the bootstrap std of the single run. Lower is better in both columns; "
              f"rank 1 is the best.{caveat}\n")
    md.append(f"![{title}]({ablation}.png)\n")
    curves = guidance_curves(df, list(table["variant"]))
    if curves:
        labels = dict(zip(table["variant"], table["label"]))
        w.bytes(f"{base}-guidance.png", guidance_figure(curves, labels, metric, f"{title}: {metric} against "
                                                         f"guidance scale (scale {scale})"))
        md.append("Guided rows are reported at their best w (column *Best w*; ★ in the figure), the same sweep "
                  "for every sampler, as the paper reports its guided rows.\n")
        md.append(f"![{title}: metric against guidance]({ablation}-guidance.png)\n")
    md.append(f"Files: [CSV]({ablation}.csv) · [LaTeX]({ablation}.tex)\n")
    norms = _norms_section(ordered)
    if norms:
        md.append(norms)
    if notes:
        md.append("## Notes\n\n" + _notes_block(notes))
    other = other_configs_table(others, spec) if others is not None and len(others) else None
    if other is not None:
        md.append("## Other configurations\n\nRecords of configs other than each variant's default, one row per "
                  "config (seeds averaged within it only); not ranked against the paper.\n\n"
                  + _md_table(["Variant", "Config", f"Ours ({metric}, ↓)", "Seeds", "NFE"],
                              [[r.label, r.overrides, _ours(r.ours, r.ours_std), str(r.seeds), _text(r.nfe_label)]
                               for r in other.itertuples()], "llrrl"))
    samples = []
    for r in ordered.itertuples():
        if isinstance(r.samples_png, str) and r.samples_png:
            target = results_dir / scale / r.samples_png
            missing = "" if target.is_file() else " (file missing)"
            samples.append(f"- {r.label}, seed {r.seed}{missing}:\n\n"
                           f"  ![{r.label}, seed {r.seed}]({_rel(target, out_dir)})\n")
    if samples:
        md.append("## Samples\n\n" + "\n".join(samples))
    w.text(f"{base}.md", "\n".join(md))

    csv = table.assign(scale=scale, ablation=ablation, config="", **{k: [c[0] for c in col] for k, _, col in extras})[
        ["scale", "ablation", "variant", "label", "metric", "ours", "ours_std", "noise", "seeds", "nfe_label",
         "best_w", "ms_per_image", "paper_fid", "our_rank", "paper_rank", "config", *[k for k, _, _ in extras]]]
    if cal_rows:
        real = pd.DataFrame([{"scale": scale, "ablation": ablation, "variant": f"calibration:{name}", "label": label,
                              "metric": metric, "ours": m.get(metric, math.nan),
                              "ours_std": m.get(f"{metric}_std", math.nan), "noise": "bootstrap",
                              **{k: m.get(k, math.nan) for k, _, _ in extras}}
                             for name, (label, m) in zip(_calibration_names(calibration), cal_rows)],
                            columns=csv.columns)
        csv = pd.concat([real, csv], ignore_index=True)
    if other is not None:
        csv = pd.concat([csv, other.assign(scale=scale, ablation=ablation, config=other["overrides"])[
            [c for c in csv.columns if c in other.columns or c in ("scale", "ablation", "config")]]],
            ignore_index=True)
    w.text(f"{base}.csv", csv.to_csv(index=False, lineterminator="\n"))
    w.text(f"{base}.tex", _tex_table(header, tex_cells, align, f"{title} ({paper_table}); scale {scale}, "
                                     f"ours: {metric}. Kendall tau: {tau_text}.", f"tab:{scale}-{ablation}",
                                     raw_cols=(1,)))
    w.bytes(f"{base}.png", ablation_figure(table, f"{title} (scale {scale})"))
    return table, tau, tau_text


def _norms_section(records: pd.DataFrame) -> str | None:
    """What norm control acted on, per variant (seed 0 or the first seed): F's clip c, where c sits among the
    |pre-clip| affine parameters on held-out data, their largest per-block 99th percentile, and the RMS of every
    trajectory state. Shown where the table's variants use different forward flows."""
    first = records.drop_duplicates("variant")
    first = first[[len(r) > 0 for r in first["trajectory_rms"]]] if "trajectory_rms" in first else first.iloc[0:0]
    if len(first) < 2 or len({tuple(np.round(r, 6)) for r in first["trajectory_rms"]}) < 2:
        return None
    states = max(len(r) for r in first["trajectory_rms"])
    header = ["Variant", "clip c", "c at percentile", "max p99 pre-clip"] + \
        [f"RMS x{k}" if k < states - 1 else "RMS z" for k in range(states)]
    cells = [[r.label, _num(r.flow_clip), _num(r.clip_percentile, 1), _num(r.pre_clip_p99)]
             + [_num(v) for v in r.trajectory_rms] for r in first.itertuples()]
    return ("## What norm control acted on\n\nF's affine parameters before the clip (|alpha|, |mu| on held-out "
            "noisy images) and the RMS of each state of its trajectory, x0 = x~ ... z; measured in each record.\n\n"
            + _md_table(header, cells, "l" + "r" * (len(header) - 1)))


def commentary(results_dir: Path, scale: str, ablation: str) -> str | None:
    """The hand-written reading of a table, `results/<scale>/<ablation>/COMMENTARY.md`, kept with the records it
    explains (written by whoever ran them; the report never invents one)."""
    path = results_dir / scale / ablation / COMMENTARY
    return " ".join(path.read_text(encoding="utf-8").split()) if path.is_file() else None


def _render_speed(w: _Writer, scale: str, speed: pd.DataFrame, spec: AblationSpec | None,
                  quality_link: str | None, comment: str | None) -> None:
    # Several speed records (seeds) at one scale: average each (sampler, batch size) cell.
    listed = list(spec.variants) if spec else []
    first_seen = list(dict.fromkeys(speed.sort_values(["seed", "order"])["sampler"]))
    order = [s for s in listed if s in first_seen] + sorted(s for s in first_seen if s not in listed)
    agg = (speed.groupby(["sampler", "batch_size"], sort=False)
           .agg(label=("label", "first"), nfe=("nfe_label", "first"), params=("params", "mean"),
                ms_per_image=("ms_per_image", "mean"), images_per_s=("images_per_s", "mean"),
                speedup=("speedup", "mean"), peak_fraction=("peak_fraction", "mean"), paper_ms=("paper_ms", "mean"),
                paper_speedup=("paper_speedup", "mean"), records=("seed", "nunique"))
           .reset_index())
    agg["_o"] = agg["sampler"].map(order.index)
    agg = agg.sort_values(["_o", "batch_size"], kind="stable").drop(columns="_o").reset_index(drop=True)

    header = ["Sampler", "NFE", "Params", "Batch", "ms / image", "images / s", "Speed-up", "% of matmul peak",
              "Paper ms", "Paper speed-up"]
    cells = [[r.label, _text(r.nfe),  # the CLI's NFE label ("4x15 serial + score step"), as in `bench speed`
              _count(r.params), _count(r.batch_size), _num(r.ms_per_image, 3), _num(r.images_per_s, 1),
              DASH if math.isnan(r.speedup) else f"×{_num(r.speedup, 1)}",
              DASH if math.isnan(r.peak_fraction) else f"{_num(100 * r.peak_fraction)}%", _num(r.paper_ms),
              DASH if math.isnan(r.paper_speedup) else f"×{_num(r.paper_speedup, 0)}"] for r in agg.itertuples()]
    machines = sorted({(str(d), float(p)) for d, p in zip(speed["device"], speed["matmul_peak_flops"])})
    title = spec.title if spec else "Sampling speed"
    md = [f"# {title}: scale `{scale}`\n"]
    if spec:
        md.append(f"Paper: {spec.paper_table}.\n")
    md.append("Machine: " + "; ".join(f"device `{d}`, measured matmul peak {_count(p)}FLOP/s" for d, p in machines)
              + ".\n")
    md.append(_md_table(header, cells, "llrrrrrrrr"))
    md.append("Speed-up is as measured by the speed benchmark; the paper's times are on TPU and exclude the VAE "
              "decoder, so compare speed-ups, not milliseconds.\n")
    if comment:
        md.append(f"**Why.** {comment}\n")
    md.append("![ms per image against batch size](speed.png)\n")
    md.append("Files: [CSV](speed.csv) · [LaTeX](speed.tex)"
              + (f" · [speed against quality]({quality_link})" if quality_link else "") + "\n")
    notes = _dedup([n for ns in speed["notes"] for n in ns])
    if notes:
        md.append("## Notes\n\n" + _notes_block(notes))
    w.text(f"{scale}/speed.md", "\n".join(md))
    csv = agg.assign(scale=scale, batch_size=agg["batch_size"].astype("Int64"))
    w.text(f"{scale}/speed.csv", csv[["scale", *agg.columns]].to_csv(index=False, lineterminator="\n"))
    w.text(f"{scale}/speed.tex", _tex_table(header, cells, "llrrrrrrrr", f"{title}; scale {scale}",
                                            f"tab:{scale}-speed"))
    w.bytes(f"{scale}/speed.png", speed_figure(speed, order, f"{title} (scale {scale})"))


def _headline_md(h: pd.DataFrame) -> str:
    if h.empty:
        return "No `main` records at this scale.\n"
    metric = _first(h["metric"]) or "metric"
    cells = [[r.label, _text(r.inverse), _ours(r.ours, r.ours_std), str(r.seeds), _text(r.nfe_label),
              _num(r.ms_per_image, 3), DASH if math.isnan(r.speedup_vs_exact) else f"×{_num(r.speedup_vs_exact, 1)}",
              _num(r.paper_fid)] for r in h.itertuples()]
    return _md_table(["Variant", "Inverse", f"Ours ({metric}, ↓)", "Seeds", "NFE", "ms / image",
                      "Speed-up vs exact", "Paper FID"], cells, "llrrlrrr")


def _load_registry_quietly() -> tuple[dict[str, AblationSpec], str | None]:
    """The report must render from records alone, so a broken or missing spec directory is a note, not an error."""
    try:
        return load_registry(), None
    except (ConfigError, OSError) as e:
        return {}, str(e).splitlines()[0]


def render_report(results_dir: Path | str, out_dir: Path | str, scales: Sequence[str] | None = None,
                  registry: dict[str, AblationSpec] | None = None) -> ReportSummary:
    """Regenerate `out_dir` from the records under `results_dir` (all scales found, or `scales`).

    `registry` gives variant order, labels and fallback paper numbers; by default the project's specs are loaded,
    and an empty dict renders from the records alone."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    registry_error = None
    if registry is None:
        registry, registry_error = _load_registry_quietly()
    records, skipped = scan_records(results_dir)
    df = results_frame(records)
    speed = speed_frame(records)
    found = set(df["scale"]) | set(speed["scale"])
    chosen = _order_scales(found if scales is None else set(scales))

    w = _Writer(out_dir)
    summary = ReportSummary(skipped=skipped)
    readme = ["# BiFlow benchmark report\n",
              f"Regenerated from the records in `{_rel(results_dir, out_dir)}`: every number below comes from those "
              "files. Lower is better for every quality metric; rank 1 is the best.\n"]
    if registry_error:
        readme.append(f"The ablation specs could not be loaded ({registry_error}); variant order and labels come "
                      "from the records alone.\n")
    if not chosen:
        readme.append("No records found.\n")
    for scale in chosen:
        readme.append(f"## Scale `{scale}`\n")
        sdf, others = split_configs(df[df["scale"] == scale].assign(
            label=lambda d: d["label"].map(lambda x: scale_label(x, scale))))
        for (ablation, variant, label), g in others.groupby(["ablation", "variant", "overrides"], sort=True):
            summary.separated.append(f"{scale}/{ablation}/{variant}: {len(g)} record(s) of another config "
                                     f"({label}) shown apart from the table, under Other configurations")
        sspeed = speed[speed["scale"] == scale]
        sspeed = sspeed.assign(label=sspeed["label"].map(lambda x: scale_label(x, scale)))
        if sdf.empty and others.empty and sspeed.empty:
            readme.append("No records at this scale.\n")
            continue
        main_spec = registry.get("main")
        readme.append(f"### Headline: {main_spec.title if main_spec else 'main'} (`main`)\n")
        readme.append(_headline_md(headline_table(sdf, main_spec)))

        index_rows, readings = [], []
        main_table = None
        calibration_entries = load_calibration(results_dir, scale)
        for ablation in sorted(set(sdf["ablation"]) | set(others["ablation"])):
            spec = registry.get(ablation)
            comment = commentary(results_dir, scale, ablation)
            table, tau, tau_text = _render_ablation(w, results_dir, scale, ablation, sdf[sdf["ablation"] == ablation],
                                                    spec, comment, calibration_entries, others[others["ablation"] == ablation])
            summary.ablations.append((scale, ablation))
            summary.kendall[(scale, ablation)] = tau
            if ablation == "main":
                main_table = table
            run = int((table["seeds"] > 0).sum())
            p = f"{scale}/{ablation}"
            index_rows.append([f"[{spec.title if spec else ablation}]({p}.md)", f"`{ablation}`",
                               f"{run}/{len(table)}", DASH if tau is None else f"{tau:.3f}",
                               f"[CSV]({p}.csv) · [LaTeX]({p}.tex) · [figure]({p}.png)"])
            readings.append(f"- **{spec.title if spec else ablation}** (`{ablation}`): {verdict(table)}"
                            + (f" {comment}" if comment else "") + "\n")
        if index_rows:
            readme.append("### Ablations\n")
            readme.append(_md_table(["Table", "Ablation", "Variants run", "Kendall τ", "Files"], index_rows, "llrrl"))
            readme.append("What reproduced (σ: the noise in each table):\n\n" + "".join(readings))

        if not sspeed.empty:
            quality_link = None
            if main_table is not None and np.isfinite(
                    main_table["ms_per_image"].astype(float) * main_table["ours"].astype(float)).any():
                quality_link = w.bytes(f"{scale}/speed_quality.png",
                                       speed_quality_figure(main_table, f"Speed against quality (scale {scale})"))
            comment = commentary(results_dir, scale, "speed")
            _render_speed(w, scale, sspeed, registry.get("speed"),
                          quality_link and Path(quality_link).name, comment)
            readme.append("### Speed\n")
            readme.append(f"- [Sampling speed table]({scale}/speed.md) · [CSV]({scale}/speed.csv) · "
                          f"[LaTeX]({scale}/speed.tex) · [figure]({scale}/speed.png)\n"
                          + (f"- [Speed against quality]({quality_link}) (the `main` variants)\n"
                             if quality_link else "")
                          + (f"\n{comment}\n" if comment else ""))

    if summary.separated:
        readme.append("## Other configurations\n\nSeeds are averaged within one config only; these records were "
                      "shown apart from their tables:\n\n" + "".join(f"- {n}\n" for n in summary.separated))
    readme.append("## Skipped files\n")
    if skipped:
        readme.append("These files under the results directory are not valid records and were left out:\n\n"
                      + "".join(f"- `{_rel_or_abs(p, results_dir)}`: {why}\n" for p, why in skipped))
    else:
        readme.append("None: every record file was read.\n")
    w.text("README.md", "\n".join(readme))

    # A render of some scales leaves the other scales' files alone (only the README is shared).
    summary.removed = _sweep_stale(out_dir, w.files, None if scales is None else set(chosen))
    summary.files = sorted(w.files)
    return summary


def _rel_or_abs(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _sweep_stale(out_dir: Path, written: list[Path], scales: set[str] | None) -> list[Path]:
    """Delete files the previous render listed in its manifest and this one did not write (within `scales`, or
    anywhere when None), then record what exists now. Only manifest entries inside `out_dir` are touched, so a
    user's own files there are never deleted."""
    manifest = out_dir / MANIFEST
    now = {p.relative_to(out_dir).as_posix() for p in written}
    before = set(filter(None, manifest.read_text().split("\n"))) if manifest.is_file() else set()
    removed, kept = [], set()
    root = out_dir.resolve()
    for rel in sorted(before - now):
        p = out_dir / rel
        if not p.is_file() or not p.resolve().is_relative_to(root):
            continue
        if scales is None or rel.split("/", 1)[0] in scales:
            p.unlink()
            removed.append(p)
        else:
            kept.add(rel)
    atomic_write_text(manifest, "\n".join(sorted(now | kept)) + "\n")
    return removed
