"""`render_report`: every page of every scale (report/pages.py) and the index README with the headline table, the
ablation index with each table's verdict, speed links and the skipped files; then the stale-file sweep.
"""

from __future__ import annotations

import functools

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..ablations import AblationSpec, load_registry
from ..config import ConfigError
from ..paths import LOCAL_SCALES
from ..results import scan_records
from .bench_pages import curves_page, is_training, scaling_page, speed_page
from .configs import split_configs
from .editing_page import editing_page
from .figures import speed_quality_figure
from .frames import results_frame, speed_frame
from .format import DASH, first_value, fmt_num, fmt_ours, fmt_sig, fmt_text, md_table, rel_link, rel_or_abs
from . import one_nfe, tarflow
from .study import exact_recall, study_page
from .pages import ablation_page, commentary
from .stats import overall, verdict
from .tables import headline_table, load_calibration, order_scales, scale_label
from .writer import ReportWriter, sweep_stale


@dataclass
class ReportSummary:
    files: list[Path] = field(default_factory=list)  # every file written by this render, sorted
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # bad record files and why
    ablations: list[tuple[str, str]] = field(default_factory=list)  # (scale, ablation) rendered
    removed: list[Path] = field(default_factory=list)  # stale files of a previous render deleted
    separated: list[str] = field(default_factory=list)  # records of other configs shown apart from the tables
    kendall: dict[tuple[str, str], float | None] = field(default_factory=dict)  # (scale, ablation) -> tau


def batch_header(name: str, batches: pd.Series) -> tuple[str, bool]:
    """(`name` with the batch it was timed at, whether each cell must name its own batch): one batch -> the header."""
    shown = {b for b in batches if isinstance(b, str) and b}
    return (f"{name} (batch {shown.pop()})", False) if len(shown) == 1 else (name, bool(shown))


def _headline_md(h: pd.DataFrame) -> str:
    if h.empty:
        return "No `main` records at this scale.\n"
    metric = first_value(h["metric"]) or "metric"
    acc = bool(np.isfinite(h["acc_cls"].astype(float)).any())  # a column only where some record has it
    ms_header, per_cell = batch_header("ms / image", h["sample_batch"])
    speed_header, _ = batch_header("speed-up vs exact", h["sample_batch"])

    def at(text: str, batch: Any) -> str:
        return f"{text} (batch {batch})" if per_cell and text != DASH and isinstance(batch, str) else text

    cells = [[r.label, fmt_ours(r.ours, r.ours_std), *([fmt_ours(r.acc_cls, r.acc_cls_std)] * acc), str(r.seeds),
              fmt_text(r.nfe_label), at(fmt_sig(r.ms_per_image, 2), r.sample_batch),
              at(DASH if math.isnan(r.speedup_vs_exact) else f"×{fmt_num(r.speedup_vs_exact, 1)}", r.sample_batch),
              fmt_num(r.paper_fid)] for r in h.itertuples()]
    return md_table(["Variant", f"Ours ({metric}, ↓)", *(["acc_cls ↑"] * acc), "Seeds", "NFE", ms_header,
                     speed_header, "Paper FID"], cells, "lr" + "r" * acc + "rlrrr")


def _load_registry_quietly() -> tuple[dict[str, AblationSpec], str | None]:
    """The report must render from records alone, so a broken or missing spec directory is a note, not an error."""
    try:
        return load_registry(), None
    except (ConfigError, OSError) as e:
        return {}, str(e).splitlines()[0]


# The git-ignored scales are the smoke tests: tiny models that check every code path runs, not measurements
SMOKE = ("a smoke test: tiny models check that every code path runs; its orderings say nothing about the "
         "paper's")


def render_report(results_dir: Path | str, out_dir: Path | str, scales: Sequence[str] | None = None,
                  registry: dict[str, AblationSpec] | None = None, include_archive: bool = False,
                  left_out: Sequence[str] = ()) -> ReportSummary:
    """Regenerate `out_dir` from the records under `results_dir` (all scales found, or `scales`).

    `registry` gives variant order, labels and fallback paper numbers; by default the project's specs are loaded,
    and an empty dict renders from the records alone. `include_archive` adds the superseded records of
    results_dir/archive under each table's Other configurations. `left_out` names scales left out on purpose (the
    checkout's git-ignored ones): the README says so and how to render them."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    registry_error = None
    if registry is None:
        registry, registry_error = _load_registry_quietly()
    records, skipped = scan_records(results_dir, include_archive)
    df = results_frame(records)
    speed = speed_frame(records)
    extra = {kind: [rec for _, rec in records if rec["kind"] == kind] for kind in ("curve", "scaling", "editing")}
    found = set(df["scale"]) | set(speed["scale"]) | {rec["scale"] for recs in extra.values() for rec in recs}
    chosen = order_scales(found if scales is None else set(scales))

    w = ReportWriter(out_dir)
    summary = ReportSummary(skipped=skipped)
    readme = ["# BiFlow benchmark report\n",
              f"Regenerated from the records in `{rel_link(results_dir, out_dir)}`: every number below comes from those "
              "files. Arrows give each metric's direction (↓ lower is better, ↑ higher); each table's reading is on "
              "its page, under its lead line (which judges the primary metric it names).\n"]
    if registry_error:
        readme.append(f"The ablation specs could not be loaded ({registry_error}); variant order and labels come "
                      "from the records alone.\n")
    if left_out:
        folders = ", ".join(f"`{rel_link(results_dir / s, out_dir)}/`" for s in left_out)
        readme.append(f"Left out on purpose: the smoke-test records of {folders}, which git ignores, so that this "
                      f"report stays as committed; `biflow-bench report --scales {','.join(left_out)}` renders them "
                      "(into runs/reports).\n")
    if not chosen:
        readme.append("No records found.\n")
    overall_lines = []
    for scale in chosen:
        readme.append(f"## Scale `{scale}`\n")
        if scale in LOCAL_SCALES:
            readme.append(f"This scale is {SMOKE}.\n")
        sdf, others = split_configs(df[df["scale"] == scale].assign(
            label=lambda d: d["label"].map(lambda x: scale_label(x, scale))), registry)
        for (ablation, variant, label), g in others.groupby(["ablation", "variant", "overrides"], sort=True):
            summary.separated.append(f"{scale}/{ablation}/{variant}: {len(g)} record(s) of another config "
                                     f"({label}) shown apart from the table, under Other configurations")
        sspeed = speed[speed["scale"] == scale]
        sspeed = sspeed.assign(label=sspeed["label"].map(lambda x: scale_label(x, scale)))
        curves = [rec for rec in extra["curve"] if rec["scale"] == scale]
        scaling = [rec for rec in extra["scaling"] if rec["scale"] == scale]
        if curves or scaling:
            readme.append("### Training time and sequence length\n")
            if curves:
                readme.append(f"- [Quality against training time]({curves_page(w, scale, curves)})\n")
            if scaling:
                readme.append(f"- [Speed-up against the exact inverse's serial steps]"
                              f"({scaling_page(w, scale, scaling[-1])})\n")
        edits = [rec for rec in extra["editing"] if rec["scale"] == scale]
        if edits:
            spec = registry.get(edits[0]["ablation"])
            page = editing_page(w, results_dir, scale, edits, spec.title if spec else "Editing",
                                spec.description if spec else "")
            readme.append(f"### Editing\n\n- [{spec.title if spec else 'Editing'}]({page}) (`{edits[0]['ablation']}`)\n")
        if sdf.empty and others.empty and sspeed.empty:
            if not (curves or scaling or edits):
                readme.append("No records at this scale.\n")
            continue
        main_spec = registry.get("main")
        readme.append(f"### Headline: {main_spec.title if main_spec else 'main'} (`main`)\n")
        readme.append(_headline_md(headline_table(sdf, main_spec)))

        index_rows, readings, tables = [], [], {}
        main_table = None
        calibration_entries = load_calibration(results_dir, scale)
        studies = []
        for ablation in sorted(set(sdf["ablation"]) | set(others["ablation"])):
            spec = registry.get(ablation)
            comment = commentary(results_dir, scale, ablation)
            if spec is not None and spec.kind == "study":  # its own page: points, not a table against the paper
                paths = set(sdf.loc[sdf["ablation"] == ablation, "path"])
                points = [rec for path, rec in records if str(path) in paths]
                page = study_page(w, results_dir, scale, ablation, points, spec, comment, exact_recall(sdf))
                studies.append(f"- [{spec.title}]({page}) (`{ablation}`)\n")
                continue
            section = None  # a table's own section: the 1-NFE comparison's costs, the noise table's sigma figure
            mine = [rec for path, rec in records if rec["kind"] == "ablation" and rec["scale"] == scale]
            own = [r for r in mine if r["ablation"] == ablation]
            if ablation == one_nfe.TABLE:
                section = functools.partial(
                    one_nfe.one_nfe_section, w, f"{scale}/{ablation}", records=own, speed=sspeed, curves=curves,
                    steps_records=[r for r in mine if r["ablation"] == one_nfe.STEPS_STUDY])
            elif ablation == tarflow.NOISE_TABLE:
                section = functools.partial(tarflow.noise_section, w, f"{scale}/{ablation}", records=own)
            table, tau, tau_text = ablation_page(w, results_dir, scale, ablation, sdf[sdf["ablation"] == ablation],
                                                    spec, comment, calibration_entries, others[others["ablation"] == ablation],
                                                    section)
            summary.ablations.append((scale, ablation))
            summary.kendall[(scale, ablation)] = tau
            tables[ablation] = table
            if ablation == "main":
                main_table = table
            run = int((table["seeds"] > 0).sum())
            p = f"{scale}/{ablation}"
            index_rows.append([f"[{spec.title if spec else ablation}]({p}.md)", f"`{ablation}`",
                               f"{run}/{len(table)}", DASH if tau is None else f"{tau:.3f}",
                               f"[CSV]({p}.csv) · [LaTeX]({p}.tex) · [figure]({p}.png)"])
            readings.append(f"- [{spec.title if spec else ablation}]({p}.md) (`{ablation}`): {verdict(table)}\n")
        # a user's table (BIFLOW_SPECS) may include a paper table's rows: counted, they would count twice
        paper_tables = {name: t for name, t in tables.items() if name not in registry or registry[name].builtin}
        if line := overall(paper_tables):
            overall_lines.append(f"**Overall at scale `{scale}`:** {line}"
                                 + (f" This scale is {SMOKE}." if scale in LOCAL_SCALES else "") + "\n")
        if index_rows:
            readme.append("### Ablations\n")
            readme.append(md_table(["Table", "Ablation", "Variants run", "Kendall τ", "Files"], index_rows, "llrrl"))
            readme.append("Lead lines (σ: the noise in each table; the reading of each table is on its page):\n\n"
                          + "".join(readings))

        if studies:
            readme.append("### Studies\n")
            readme.append("".join(studies))

        if not sspeed.empty:
            quality_link = None
            if main_table is not None and np.isfinite(
                    main_table["ms_per_image"].astype(float) * main_table["ours"].astype(float)).any():
                quality_link = w.bytes(f"{scale}/speed_quality.png",
                                       speed_quality_figure(main_table, f"Speed against quality (scale {scale})"))
            speed_page(w, scale, sspeed, registry.get("speed"),
                          quality_link and Path(quality_link).name, commentary(results_dir, scale, "speed"))
            readme.append("### Speed\n")
            batches = ", ".join(f"{b:g}" for b in sorted(set(sspeed.loc[~sspeed["sampler"].map(is_training),
                                                                         "batch_size"].astype(float))))
            readme.append(f"- [Sampling speed table]({scale}/speed.md) (timed at batch {batches}) · "
                          f"[CSV]({scale}/speed.csv) · [LaTeX]({scale}/speed.tex) · [figure]({scale}/speed.png)\n"
                          + (f"- [Speed against quality]({quality_link}) (the `main` variants)\n"
                             if quality_link else ""))

    if summary.separated:
        readme.append("## Other configurations\n\nSeeds are averaged within one config only; these records were "
                      "shown apart from their tables:\n\n" + "".join(f"- {n}\n" for n in summary.separated))
    readme[1:1] = overall_lines  # the one answer per scale, under the title
    readme.append("## Skipped files\n")
    if skipped:
        readme.append("These files under the results directory are not valid records and were left out:\n\n"
                      + "".join(f"- `{rel_or_abs(p, results_dir)}`: {why}\n" for p, why in skipped))
    else:
        readme.append("None: every record file was read.\n")
    w.text("README.md", "\n".join(readme))

    # A render of some scales leaves the other scales' files alone (only the README is shared).
    summary.removed = sweep_stale(out_dir, w.files, None if scales is None else set(chosen))
    summary.files = sorted(w.files)
    return summary
