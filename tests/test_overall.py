"""The report's one overall answer per scale (how many of the paper's pairwise orderings hold, which are reversed),
the README's copy of it checked against the committed records, and the smoke-test note of the tiny scales."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from biflow_bench.report.render import ReportSummary, render_report
from biflow_bench.report.stats import overall, verdict

ROOT = Path(__file__).resolve().parent.parent
OVERALL = re.compile(r"^\*\*Overall at scale `(\S+)`:\*\* .*", re.M)


def table(rows: dict[str, tuple[float, float, float]]) -> pd.DataFrame:
    """variant -> (ours, ours_std, paper FID)."""
    return pd.DataFrame([{"variant": v, "ours": o, "ours_std": s, "paper_fid": p, "metric": "fd_effnet"}
                         for v, (o, s, p) in rows.items()])


def test_overall_sums_the_tables_pairs_and_names_the_reversed_ones() -> None:
    tables = {
        # the paper: learned < score < none; ours: learned 10, none 20, score 30 -> score / none reversed (by 12σ)
        "denoise": table({"learned": (10.0, 0.3, 31.88), "score": (30.0, 0.5, 42.62), "none": (20.0, 0.7, 100.51)}),
        # the paper: biflow < itarflow; ours the other way, within noise
        "main": table({"biflow": (5.0, 1.0, 2.39), "itarflow": (4.0, 1.0, 6.83)}),
        # agrees, by 1σ: kept, not beyond the noise
        "norm-control": table({"clip": (1.0, 0.5, 1.0), "none": (2.0, 0.5, 2.0)}),
        "speed-like": table({"exact": (1.0, 0.1, float("nan")), "learned": (2.0, 0.1, 3.0)}),  # no pair: no table
    }
    assert overall(tables) == (
        "3 of the paper's 5 pairwise orderings hold in fd_effnet across 3 tables, 2 of them beyond 2σ noise; "
        "reversed: `none` beats `score` (denoise); `itarflow` beats `biflow` (main, within noise).")
    # the same counts as the tables' own lead lines
    leads = [re.search(r"(\d+) of (\d+) pairs keep the paper's order \((\d+) beyond", verdict(t))
             for t in tables.values()]
    assert [sum(int(m.group(i)) for m in leads if m) for i in (1, 2, 3)] == [3, 5, 2]

    assert overall({"one": tables["norm-control"]}).startswith("1 of the paper's 1 pairwise orderings hold in "
                                                               "fd_effnet across 1 table, 0 of them")
    assert overall({"one": tables["norm-control"]}).endswith("; none reversed.")
    assert overall({"speed-like": tables["speed-like"]}) is None and overall({}) is None


def test_report_opens_with_the_overall_line_and_calls_tiny_a_smoke_test(
        rendered: tuple[Path, Path, ReportSummary]) -> None:
    _, out, _ = rendered
    readme = (out / "README.md").read_text()
    title, first, *_ = readme.split("\n\n")
    assert title == "# BiFlow benchmark report"
    # denoise 2 of 3 (both beyond 2σ; none beats score), main: itarflow 4 beats biflow 5 (10σ): 2 of 4
    assert first == ("**Overall at scale `tiny`:** 2 of the paper's 4 pairwise orderings hold in fd_effnet across 2 "
                     "tables, 2 of them beyond 2σ noise; reversed: `none` beats `score` (denoise); `itarflow` beats "
                     "`biflow` (main). This scale is a smoke test: tiny models check that every code path runs; its "
                     "orderings say nothing about the paper's.")
    assert "## Scale `tiny`\n\nThis scale is a smoke test: tiny models check that every code path runs" in readme
    assert "Left out on purpose" not in readme  # nothing was


def test_readme_overall_line_is_the_one_rendered_from_the_committed_records(tmp_path: Path) -> None:
    """The README's one-line answer is the report's, rendered from results/ now: a re-measured table changes both."""
    render_report(ROOT / "results", tmp_path / "out", scales=["small"])
    rendered_line = OVERALL.search((tmp_path / "out" / "README.md").read_text())
    assert rendered_line and rendered_line.group(1) == "small"
    paragraphs = [" ".join(p.split()) for p in (ROOT / "README.md").read_text().split("\n\n")]
    assert [p for p in paragraphs if p.startswith("**Overall at scale")] == [rendered_line.group(0)]


def test_a_pair_shared_by_two_tables_counts_once() -> None:
    """The 1-NFE comparison's BiFlow rows are the main table's records: their pair is counted in main alone; a pair
    of new rows counts."""
    main = {"biflow": (5.0, 1.0, 2.39), "itarflow": (4.0, 1.0, 6.83)}
    tables = {"main": table(main), "one-nfe": table({**main, "meanflow": (9.0, 1.0, 3.43)})}
    assert overall(tables).startswith("1 of the paper's 3 pairwise orderings hold in fd_effnet across 2 tables")
    assert overall(tables).count("`itarflow` beats `biflow`") == 1
