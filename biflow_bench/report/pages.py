"""The report's pages, one per table: an ablation's Markdown / CSV / LaTeX / PNG (ours beside the paper's, ranks,
Kendall's tau, calibration rows, the hand-written reading, other configurations, norms).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..ablations import AblationSpec
from .figures import ablation_figure, guidance_curves, guidance_figure
from .format import (DASH, dedup, first_value, fmt_num, fmt_ours, fmt_rank, fmt_sig, fmt_text, md_table, notes_block,
                     rel_link, tex_table)
from .reading import reading_checks
from .stats import VERDICT_METRICS, VERDICTS, kendall, pair_verdicts, verdict
from .tables import (ablation_table, calibration_cells, calibration_names, extra_columns, other_configs_table,
                     table_calibration)
from .writer import ReportWriter


COMMENTARY = "COMMENTARY.md"  # results/<scale>/<ablation>/: the hand-written reading of a table


def ablation_page(w: ReportWriter, results_dir: Path, scale: str, ablation: str, df: pd.DataFrame,
                     spec: AblationSpec | None, comment: str | None,
                     calibration_entries: dict[str, dict[str, Any]] | None = None,
                     others: pd.DataFrame | None = None,
                     section: Callable[[pd.DataFrame, str], str] | None = None) -> tuple[pd.DataFrame, float | None, str]:
    """A table's page; `section(table, metric)` gives a table's own section (the 1-NFE comparison's costs), placed
    after the ranks."""
    table = ablation_table(df, spec)
    tau, _, tau_text = kendall(table)
    # Records in the table's variant order, seeds ascending: notes and sample grids follow the table.
    rank_of = {v: i for i, v in enumerate(table["variant"])}
    ordered = df.assign(_o=df["variant"].map(rank_of)).sort_values(["_o", "seed"], kind="stable")
    title = spec.title if spec else ablation
    paper_table = (first_value(df["paper_table"]) or (spec.paper_table if spec else None)) or DASH
    metrics = sorted({m for m in df["metric"] if isinstance(m, str) and m})
    metric = metrics[0] if metrics else "metric"
    base = f"{scale}/{ablation}"
    out_dir = w.out_dir / scale

    guided = table["best_w"].notna().any()  # the column of guided rows' best w, where a table has them
    extras = extra_columns(df, list(table["variant"]))
    # The judged metrics stand beside ours; ranks and the other metrics go to a second table (and the CSV).
    judged, rest = ([e for e in extras if (e[0] in VERDICT_METRICS) == side] for side in (True, False))
    header = ["Variant", f"Ours ({metric}, ↓)", *[h for _, h, _ in judged], "Seeds", "NFE",
              *(["Best w"] if guided else []), "Paper FID"]
    cells = [[r.label, fmt_ours(r.ours, r.ours_std), *[fmt_ours(*col[i]) for _, _, col in judged], str(r.seeds),
              fmt_text(r.nfe_label), *([fmt_text(r.best_w)] if guided else []), fmt_num(r.paper_fid)]
             for i, r in enumerate(table.itertuples())]
    more_header = ["Variant", "Our rank", "Paper rank", *[h for _, h, _ in rest]]
    more = [[r.label, fmt_rank(r.our_rank), fmt_rank(r.paper_rank), *[fmt_ours(*col[i]) for _, _, col in rest]]
            for i, r in enumerate(table.itertuples())]
    align = "lr" + "r" * len(judged) + "rl" + "r" * (len(header) - 4 - len(judged))
    calibration = table_calibration(df, calibration_entries or {}) or {}
    cal_rows = [(str(r.get("label") or r.get("name")), r.get("metrics") if isinstance(r.get("metrics"), dict) else {})
                for r in calibration.get("rows", []) if isinstance(r, dict)]
    fill = [DASH] * (len(header) - 2 - len(judged))  # seeds, NFE, best w, paper: none for real data
    cal_cells = [(label, calibration_cells(m, [metric, *[k for k, _, _ in judged]]) + fill,
                  [DASH, DASH, *calibration_cells(m, [k for k, _, _ in rest])]) for label, m in cal_rows]
    tex_cells = [[label, *row] for label, row, _ in cal_cells] + cells  # tex_escape turns ± into $\pm$
    cells[:0] = [[f"*{label}*", *row] for label, row, _ in cal_cells]  # real data on top
    more[:0] = [[f"*{label}*", *row] for label, _, row in cal_cells]

    notes = []
    if len(metrics) > 1:
        notes.append(f"records use different primary metrics ({', '.join(metrics)}); our ranks compare unlike numbers")
    versions = sorted({int(v) for v in df["spec_version"] if isinstance(v, (int, float)) and not pd.isna(v)})
    if spec and versions and versions != [spec.version]:
        notes.append(f"records come from spec version(s) {', '.join(map(str, versions))}; the spec is now version "
                     f"{spec.version}")
    notes += [n for row_notes in ordered["notes"] for n in row_notes]
    notes = dedup(notes)

    md = [f"# {title}: scale `{scale}`\n", f"Paper: {paper_table}. Ablation `{ablation}`"
          + (f", spec version {spec.version}" if spec else "") + ".\n"]
    if spec and spec.description:
        md.append(" ".join(spec.description.split()) + "\n")
    md.append(md_table(header, cells, align))
    if cal_rows:
        accuracy = (calibration.get("classifier") or {}).get("test_accuracy")
        md.append(f"Rows in italics are real data, not models: {calibration.get('num_images')} training images scored "
                  "by the same code against the same held-out images (as they are: the floor; with the training "
                  f"noise sigma = {calibration.get('noise_sigma')}; blurred by a 3x3 box)."
                  + (f" The domain classifier (acc_cls, conf_cls, fd_cls) has {fmt_num(100 * accuracy, 1)}% test accuracy."
                     if isinstance(accuracy, (int, float)) else "") + "\n")
    caveat = "" if metric == "fid" else (f" Our metric is `{metric}` on this scale's data, not the paper's FID-50K on "
                                         "ImageNet: compare rankings, not values.")
    md.append("± is the std across seeds where a variant has more than one seed (never less than the runs' mean "
              "bootstrap std), otherwise the bootstrap std of the single run, rounded to what it supports. Arrows "
              f"give each metric's direction (↓ lower is better, ↑ higher); the paper's FID is lower-better.{caveat}\n")
    md.append(f"Kendall τ between our ranking (by {metric}) and the paper's (by FID): {tau_text}. "
              f"{verdict(table, metric)}\n")
    if comment:
        md.append(f"**Why.** {comment}\n")
        md += [f"> **Check against the records:** {c}\n" for c in reading_checks(comment, table)]
    pairs = verdicts_section(pair_verdicts(table, extras), dict(zip(table["variant"], table["label"])), metric)
    if pairs:
        md.append(pairs)
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
    md.append(f"## Ranks and more metrics\n\nRank 1 is the best (ours by {metric}, the paper's by FID).\n\n"
              + md_table(more_header, more, "lrr" + "r" * len(rest)))
    for part in (section(table, metric) if section else None, measurements_section(ordered), norms_section(ordered)):
        if part:
            md.append(part)
    if notes:
        md.append("## Notes\n\n" + notes_block(notes))
    other = other_configs_table(others, spec) if others is not None and len(others) else None
    if other is not None:
        md.append("## Other configurations\n\nRecords of configs other than each variant's default, one row per "
                  "config (seeds averaged within it only); not ranked against the paper.\n\n"
                  + md_table(["Variant", "Config", f"Ours ({metric}, ↓)", "Seeds", "NFE"],
                              [[r.label, r.overrides, fmt_ours(r.ours, r.ours_std), str(r.seeds), fmt_text(r.nfe_label)]
                               for r in other.itertuples()], "llrrl"))
    samples = []
    for r in ordered.itertuples():
        if isinstance(r.samples_png, str) and r.samples_png:
            target = results_dir / scale / r.samples_png
            missing = "" if target.is_file() else " (file missing)"
            samples.append(f"- {r.label}, seed {r.seed}{missing}:\n\n"
                           f"  ![{r.label}, seed {r.seed}]({rel_link(target, out_dir)})\n")
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
                             for name, (label, m) in zip(calibration_names(calibration), cal_rows)],
                            columns=csv.columns)
        csv = pd.concat([real, csv], ignore_index=True)
    if other is not None:
        csv = pd.concat([csv, other.assign(scale=scale, ablation=ablation, config=other["overrides"])[
            [c for c in csv.columns if c in other.columns or c in ("scale", "ablation", "config")]]],
            ignore_index=True)
    w.text(f"{base}.csv", csv.to_csv(index=False, lineterminator="\n"))
    w.text(f"{base}.tex", tex_table(header, tex_cells, align, f"{title} ({paper_table}); scale {scale}, "
                                     f"ours: {metric}. Kendall tau: {tau_text}.", f"tab:{scale}-{ablation}"))
    w.bytes(f"{base}.png", ablation_figure(table, f"{title} (scale {scale})"))
    return table, tau, tau_text


def verdicts_section(pairs: pd.DataFrame, labels: dict[str, str], metric: str, sigmas: float = 2.0) -> str | None:
    """`stats.pair_verdicts` as a table: one row per pair the paper orders, one column per judged metric."""
    if pairs.empty:
        return None
    keys = [k for k in pairs.columns if k not in ("better", "worse", "paper_gap") and not k.endswith("_z")]
    names = {"ours": metric}
    cells = [[labels.get(r["better"], r["better"]), labels.get(r["worse"], r["worse"]), fmt_num(r["paper_gap"]),
              *[r[k] + (f" ({r[f'{k}_z']:+.1f}σ)" if math.isfinite(r[f"{k}_z"]) else "") for k in keys]]
             for _, r in pairs.iterrows()]
    counts = "; ".join(f"{names.get(k, k)}: " + ", ".join(f"{int((pairs[k] == v).sum())} {v}" for v in VERDICTS)
                       for k in keys)
    return (f"## Verdict per pair\n\nEach pair of variants the paper orders, judged on each metric: *reproduced* when "
            f"ours orders them the paper's way by more than {sigmas:g}σ (σ: the two rows' ± in quadrature), "
            f"*reversed* when the other way by as much, else *unresolved*; in brackets our gap in σ, positive in the "
            f"paper's direction. {counts}.\n\n"
            + md_table(["Paper: better", "than", "Paper FID gap", *[names.get(k, k) for k in keys]], cells,
                       "llr" + "l" * len(keys)))


# (record column, header): what a table's reading rests on, measured in each record
MEASUREMENTS = (("metric_noise_residual", "noise left in samples"), ("diag_noise_residual_real", "… in real images"),
                ("diag_inverse_mse_clean", "G vs F⁻¹, clean target"), ("diag_inverse_mse_noisy", "G vs F⁻¹, noisy target"),
                ("diag_noise_sigma_sq", "σ²"), ("metric_bpd", "F bits/dim"), ("ms_per_image", "ms / image"))


def measurements_section(records: pd.DataFrame) -> str | None:
    """Per variant, mean over its seeds: the noise left in the samples beside real test images', G's mean squared
    gap to F's exact inverse on held-out pairs (beside sigma^2 of the training noise), F's bits/dim, ms per image."""
    cols = [(c, h) for c, h in MEASUREMENTS if c in records and np.isfinite(records[c].astype(float)).any()]
    if not cols or records.empty:
        return None
    cells = []
    for variant in dict.fromkeys(records["variant"]):
        g = records[records["variant"] == variant]
        cells.append([str(g["label"].iloc[0]), *[fmt_sig(float(g[c].astype(float).mean())) for c, _ in cols]])
    batches = {int(b) for b in records.get("sample_batch", ()) if math.isfinite(b)}
    headers = [f"{h} (batch {batches.pop()})" if c == "ms_per_image" and len(batches) == 1 else h for c, h in cols]
    return ("## Measurements behind the reading\n\nPer variant, mean over seeds (runner.diagnostics): the "
            "high-frequency noise left in the samples beside the same measure on real test images, how far G is from "
            "F's exact inverse on held-out pairs (mean squared error per value; σ² of the training noise for scale), "
            "F's bits/dim and the sampling time.\n\n"
            + md_table(["Variant", *headers], cells, "l" + "r" * len(cols)))


def norms_section(records: pd.DataFrame) -> str | None:
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
    cells = [[r.label, fmt_num(r.flow_clip), fmt_num(r.clip_percentile, 1), fmt_num(r.pre_clip_p99)]
             + [fmt_num(v) for v in r.trajectory_rms] for r in first.itertuples()]
    return ("## What norm control acted on\n\nF's affine parameters before the clip (|alpha|, |mu| on held-out "
            "noisy images) and the RMS of each state of its trajectory, x0 = x~ ... z; measured in each record.\n\n"
            + md_table(header, cells, "l" + "r" * (len(header) - 1)))


def commentary(results_dir: Path, scale: str, ablation: str) -> str | None:
    """The hand-written reading of a table, `results/<scale>/<ablation>/COMMENTARY.md`, kept with the records it
    explains (written by whoever ran them; the report never invents one) and rendered once, on the table's page:
    about five sentences on what reproduced and the measurement that explains it; history goes to docs/history.md.
    Lines are joined; a blank line starts a new paragraph (a page's paragraphs stay short enough to read)."""
    path = results_dir / scale / ablation / COMMENTARY
    if not path.is_file():
        return None
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    return "\n\n".join(p for p in paragraphs if p) or None
