"""The numbers of the prose pages checked against the records they come from (issue 41, items 7-9): the G study's
tables rendered from results/small/g-training/ (report/doc_tables.py), each number its prose and the study's reading
quote recomputed from its record, the README's table and σ gaps against the report rendered from results/, a gap
called "within noise" only where it is within 2σ; and the README short enough to be an entry point, no report
paragraph too long to read."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from biflow_bench.report.doc_tables import TABLES, update_page
from biflow_bench.report.format import fmt_sig
from biflow_bench.report.render import render_report
from biflow_bench.report.study import timing_spread
from record_claims import (ACC, FDC, FDE, IMSE, NS, REC, RESULTS, ROOT, archived, beyond, check, f0, f1, f2, f3,
                           f4, flat, pm, quiet, recs, same, val, within)

G_STUDY = ROOT / "docs" / "g-study.md"
G_READING = RESULTS / "small" / "g-training" / "COMMENTARY.md"
README = ROOT / "README.md"


def all_g() -> list[dict[str, Any]]:
    """Every point's default records of the G study."""
    folder = RESULTS / "small" / "g-training"
    names = {p.name.split("__seed")[0] for p in folder.glob("*__seed*.json")}
    return [r for name in sorted(names) for r in recs(name)]


def imse(v: str) -> str:
    return fmt_sig(val(v, IMSE))


def exact(key: str) -> float:
    return val("exact", key, "inverse-strategy")


STEPS = ("lr-1e-2", "steps-1600", "steps-3200", "steps-6400", "steps-12800")
COSTLY = ("depth-2", "depth-3", "width-192", "batch-256")
PERCEPTUAL = ("perceptual-both", "perceptual-lpips", "perceptual-weight-quarter", "perceptual-crop-full")
SIGMA2 = 0.0025
TRAIN_S = "timing.stage2_s"


def pct(a: str, b: str) -> float:
    return 100 * (1 - val(a, IMSE) / val(b, IMSE))


def claims_g_study() -> list[tuple[str, list[str]]]:
    """(the sentence as docs/g-study.md writes it, with {} for each number, the numbers from the records)"""
    lo, hi = timing_spread(all_g())
    spans = {v: val(v, "timing.stage2_s") for v in ("lr-1e-1", "lr-3e-3")}
    costly_fde = [val(v, FDE) for v in COSTLY]
    costly_z = [float(beyond(v, "steps-1600", "fd_effnet")) for v in COSTLY]
    return [
        ("recall {}, one look per class in its sample grids, {} per value", [f3(val("centre", REC)), imse("centre")]),
        ("spans {} ms (lr-3e-2__seed0.json) to {} ms (centre__seed0.json)", [f2(lo), f2(hi)]),
        ("took {} s (lr-1e-1) to {} s (lr-3e-3)", [f0(spans["lr-1e-1"]), f0(spans["lr-3e-3"])]),
        ("the distance to F's inverse falls {}x ({} to {}) and the noise sensitivity goes from {} to {}",
         [f0(val("centre", IMSE) / val("lr-1e-2", IMSE)), imse("centre"), imse("lr-1e-2"), f2(val("centre", NS)),
          f2(val("lr-1e-2", NS))]),
        ("1e-2 and 3e-2 tie (fd_effnet {} against {}, within noise)",
         [pm("lr-1e-2", "fd_effnet"), quiet(pm("lr-3e-2", "fd_effnet"), within("lr-1e-2", "lr-3e-2", "fd_effnet"))]),
        ("to the last digit (fd_effnet {}; now results/archive/small/inverse-strategy/hidden-align__seed0__"
         "30e3d77e549de906.json", [same(f3(archived("inverse-strategy", "hidden-align", "30e3d77e549de906", FDE, "0")),
                                        f3(val("centre", FDE)))]),
        ("the unguided exact inverse: recall {}, fd_effnet {}, acc_cls {}, fd_cls {} (inverse-strategy",
         [f2(exact(REC)), f0(exact(FDE)), f2(exact(ACC)), f0(exact(FDC))]),
        ("(x{}, x{}, x{}, x{} on the inverse MSE: {}, {}, {}, {}, {})",
         [f1(val(a, IMSE) / val(b, IMSE)) for a, b in zip(STEPS, STEPS[1:])] + [imse(v) for v in STEPS]),
        ("At 12,800 steps ({} minutes of G training on one thread, as the run timed it) G sits {} per value from F's "
         "inverse, {} σ²", [f0(val("steps-12800", "timing.stage2_s") / 60), imse("steps-12800"),
                            f1(val("steps-12800", IMSE) / SIGMA2)]),
        ("in fd_effnet ({} against {}) and fd_cls ({} against {}), with more recall ({} against {})",
         [f0(val("steps-12800", FDE)), f0(exact(FDE)), f0(val("steps-12800", FDC)), f0(exact(FDC)),
          f2(val("steps-12800", REC)), f2(exact(REC))]),
        ("acc_cls falls slowly as G learns the inverse ({} at 800 steps, {} at 12,800; the unguided exact inverse's: "
         "{})",
         [f2(val("lr-1e-2", ACC)), f2(val("steps-12800", ACC)), f2(exact(ACC))]),
        ("({}M, {}M and {}M parameters against {}M",
         [f2(recs(v)[0]["params"]["backward"] / 1e6) for v in ("depth-2", "depth-3", "width-192", "lr-1e-2")]),
        ("at 800 steps they reach {}, {}, {} and {}, against {} for 1,600 steps",
         [imse(v) for v in COSTLY] + [imse("steps-1600")]),
        ("trail it in fd_effnet ({}-{} against {}, {}σ to {}σ)",
         [f0(min(costly_fde)), f0(max(costly_fde)), pm("steps-1600", "fd_effnet"), f1(min(costly_z)),
          f1(max(costly_z))]),
        ("beyond noise ({} against {}; fd_effnet {} against {})",
         [imse("depth-3"), imse("depth-2"), pm("depth-3", "fd_effnet"),
          quiet(pm("depth-2", "fd_effnet"), within("depth-3", "depth-2", "fd_effnet"))]),
        ("Half the batch was worse ({})", [imse("batch-64")]),
        ("left the distance where it was ({} against {}) but its samples scored worse, fd_effnet {} against {} ({}σ) "
         "and fd_cls {} against {} ({}σ)",
         [imse("adaptive-off"), imse("lr-1e-2"), pm("adaptive-off", "fd_effnet"), pm("lr-1e-2", "fd_effnet"),
          beyond("adaptive-off", "lr-1e-2", "fd_effnet"), f0(val("adaptive-off", FDC)), f0(val("lr-1e-2", FDC)),
          beyond("adaptive-off", "lr-1e-2", "fd_cls")]),
        ("quarter weight: {}, fd_effnet {} and fd_cls {}, within noise of lr 1e-2 at 800 steps ({}σ, {}σ)",
         [imse("hidden-quarter"), f0(val("hidden-quarter", FDE)), f0(val("hidden-quarter", FDC)),
          within("hidden-quarter", "lr-1e-2", "fd_effnet"), within("hidden-quarter", "lr-1e-2", "fd_cls")]),
        ("by {}% at 800 steps ({} against {}; fd_effnet {} against {}, {}σ) and by {}% at 1,600 ({} against {}; "
         "fd_effnet {} against {}, {}σ); a longer warm-up by {}% at 800 ({}), its fd_effnet within noise ({})",
         [f0(pct("schedule-constant", "lr-1e-2")), imse("schedule-constant"), imse("lr-1e-2"),
          pm("schedule-constant", "fd_effnet"), pm("lr-1e-2", "fd_effnet"),
          beyond("schedule-constant", "lr-1e-2", "fd_effnet"), f1(pct("schedule-constant-1600", "steps-1600")),
          imse("schedule-constant-1600"), imse("steps-1600"), pm("schedule-constant-1600", "fd_effnet"),
          pm("steps-1600", "fd_effnet"), beyond("schedule-constant-1600", "steps-1600", "fd_effnet"),
          f0(pct("warmup-400", "lr-1e-2")), imse("warmup-400"),
          quiet(pm("warmup-400", "fd_effnet"), within("warmup-400", "lr-1e-2", "fd_effnet"))]),
        ("No EMA at all: {} against {}, fd_effnet {} both",
         [imse("ema-off"), imse("lr-1e-2"), same(f0(val("ema-off", FDE)), f0(val("lr-1e-2", FDE)))]),
        ("main fd_cls {} with the perceptual terms against {} without",
         [f0(archived("main", "biflow", "005dc5b0241fab9d", FDC)),
          f0(archived("main", "biflow-mse", "2c933e73ce2197a4", FDC))]),
        ("+ LPIPS + ConvNeXt {} against MSE's {}",
         [f0(archived("distance-metric", "mse+lpips+convnext", "c3f0748a066bfaaf", FDC)),
          f0(archived("distance-metric", "mse", "30e3d77e549de906", FDC))]),
        ("fd_effnet falls from {} to {}", [f0(val("lr-1e-2", FDE)), f0(val("perceptual-both", FDE))]),
        ("only the LPIPS stand-in alone beats MSE beyond noise ({} against {}, {}σ); both terms ({}, {}σ) and both "
         "at a quarter weight ({}, {}σ) are within noise of MSE",
         [pm("perceptual-lpips", "fd_cls"), pm("lr-1e-2", "fd_cls"),
          beyond("perceptual-lpips", "lr-1e-2", "fd_cls"),
          f0(val("perceptual-both", FDC)), within("perceptual-both", "lr-1e-2", "fd_cls"),
          f0(val("perceptual-weight-quarter", FDC)), within("perceptual-weight-quarter", "lr-1e-2", "fd_cls")]),
        ("costs the inverse little ({} against {}); the pooled ConvNeXt-style term moves G away from F's inverse ({})",
         [imse("perceptual-lpips"), imse("lr-1e-2"), imse("perceptual-both")]),
        ("on whole images both terms give fd_cls {} against {} cropped ({}σ)",
         [pm("perceptual-crop-full", "fd_cls"), pm("perceptual-both", "fd_cls"),
          beyond("perceptual-crop-full", "perceptual-both", "fd_cls")]),
        ("whose 800-step points above took {}-{} s of in-run training against {} s for MSE alone",
         [f0(min(val(v, TRAIN_S) for v in PERCEPTUAL)), f0(max(val(v, TRAIN_S) for v in PERCEPTUAL)),
          f0(val("lr-1e-2", TRAIN_S))]),
        ("sits {} and {} per value from F's inverse (results/small/norm-control/clip__seed0.json",
         [f4(float(r["diagnostics"]["inverse_mse_clean"])) for r in recs("clip", "norm-control")]),
        ("with noise sensitivity {} and recall {} (the exact inverse's, unguided: {}, seed mean); main's MSE G with "
         "training-time CFG sits {} from it",
         [f2(val("clip", NS, "norm-control")), f2(val("clip", REC, "norm-control")), f2(exact(REC)),
          f3(val("biflow-mse", IMSE, "main"))]),
        ("scores fd_effnet {} against the exact inverse's {}",
         [pm("biflow-mse", "fd_effnet", "main"), pm("itarflow", "fd_effnet", "main")]),
    ]


def claims_g_reading() -> list[tuple[str, list[str]]]:
    """The study's reading (its COMMENTARY.md, shown on reports/small/g-training.md)."""
    lo, hi = timing_spread(all_g())
    return [
        ("cut the distance to F's inverse {}x, {} to {} per value, and raised the noise sensitivity from {} to {}",
         [f0(val("centre", IMSE) / val("lr-1e-2", IMSE)), imse("centre"), imse("lr-1e-2"), f2(val("centre", NS)),
          f2(val("lr-1e-2", NS))]),
        ("each doubling paying less: {}, {}, {}, {}, {} at 800 to 12,800 steps", [imse(v) for v in STEPS]),
        ("G sits {} σ² from F's inverse and one unguided pass scores fd_effnet {} and fd_cls {} against the unguided "
         "exact inverse's {} and {}, recall {} against {}",
         [f1(val("steps-12800", IMSE) / SIGMA2), f0(val("steps-12800", FDE)), f0(val("steps-12800", FDC)),
          f0(exact(FDE)), f0(exact(FDC)), f2(val("steps-12800", REC)), f2(exact(REC))]),
        ("reached less at 800 steps ({}-{}) than 1,600 steps of the preset's size ({})",
         [fmt_sig(min(val(v, IMSE) for v in COSTLY)), fmt_sig(max(val(v, IMSE) for v in COSTLY)), imse("steps-1600")]),
        ("({} without eq. 7's re-weighting, {} with the hidden states at a quarter weight, against {})",
         [imse("adaptive-off"), imse("hidden-quarter"), imse("lr-1e-2")]),
        ("(fd_effnet {} against {}, {}σ, on one seed of a resumed run)",
         [f0(val("adaptive-off", FDE)), f0(val("lr-1e-2", FDE)), beyond("adaptive-off", "lr-1e-2", "fd_effnet")]),
        ("beat cosine by {}% at 800 steps and {}% at 1,600",
         [f0(pct("schedule-constant", "lr-1e-2")), f1(pct("schedule-constant-1600", "steps-1600"))]),
        ("beats MSE on fd_cls beyond noise ({} against {}, {}σ); both terms ({}, {}σ) and both at a quarter weight "
         "({}, {}σ) are within noise of MSE",
         [f0(val("perceptual-lpips", FDC)), f0(val("lr-1e-2", FDC)), beyond("perceptual-lpips", "lr-1e-2", "fd_cls"),
          f0(val("perceptual-both", FDC)), within("perceptual-both", "lr-1e-2", "fd_cls"),
          f0(val("perceptual-weight-quarter", FDC)), within("perceptual-weight-quarter", "lr-1e-2", "fd_cls")]),
        ("pulls G from F's inverse ({})", [imse("perceptual-both")]),
        ("one architecture's batch-1 pass spans {} to {} ms here", [f2(lo), f2(hi)]),
    ]


def claims_readme() -> list[tuple[str, list[str]]]:
    calibration = json.loads((RESULTS / "small" / "calibration.json").read_text())
    entry = calibration["entries"][recs("itarflow", "main")[0]["calibration"]]  # the preset's: the README's rows
    real = {row["name"]: row["metrics"] for row in entry["rows"]}
    threads = flat(ROOT / "docs" / "threads.md")
    demo, table = "4 min 55 s", "38.6 s"
    assert f"`make demo` took {demo}" in threads and f"| alone, automatic (2 threads) | {table} |" in threads
    assert "234 minutes" in flat(ROOT / "docs" / "history.md")
    return [
        ("`make demo` took {} and one tiny table (`biflow-bench run denoise --scale tiny`) {}", [demo, table]),
        ("Fashion-MNIST CNN the suite trains ({}% test accuracy)", [f1(100 * entry["classifier"]["test_accuracy"])]),
        ("training images {} (acc_cls {}, fd_cls {}), with the training noise {}, blurred by a 3x3 box {} "
         "(acc_cls {}, fd_cls {})",
         [f0(real["real"]["fd_effnet"]), f2(real["real"]["acc_cls"]), f0(real["real"]["fd_cls"]),
          f0(real["real+noise"]["fd_effnet"]), f0(real["real+blur"]["fd_effnet"]), f2(real["real+blur"]["acc_cls"]),
          f0(real["real+blur"]["fd_cls"])]),
        ("comes within {} per value of F's inverse on held-out pairs (σ² = {} is F's training noise; the former "
         "preset's G: {}), its output varies with its noise {} as much as the inverse's, and its recall is {} against "
         "the inverse's {}",
         [f3(val("clip", IMSE, "norm-control")), f4(SIGMA2), imse("centre"), f2(val("clip", NS, "norm-control")),
          f2(val("clip", REC, "norm-control")), f2(exact(REC))]),
        ("the learning rate (x{}), then the steps (12,800 steps reach {}",
         [f0(val("centre", IMSE) / val("lr-1e-2", IMSE)), f3(val("steps-12800", IMSE))]),
        ("trails it in fd_effnet (x{})", [f2(val("biflow-mse", FDE, "main") / val("itarflow", FDE, "main"))]),
        ("From scratch on 2 cores it took {}", ["234 minutes"]),
    ]


def test_g_study_tables_are_the_records_rendered():
    """docs/g-study.md's tables of study points are what doc_tables renders from results/ now (rewrite them with
    `python -m biflow_bench.report.doc_tables docs/g-study.md`)."""
    text = G_STUDY.read_text(encoding="utf-8")
    assert all(f"<!-- records-table: {name} -->" in text for name in TABLES)
    assert update_page(text, RESULTS) == text


def test_g_study_prose_quotes_its_records():
    check(G_STUDY, claims_g_study())


def test_g_study_reading_quotes_its_records():
    check(G_READING, claims_g_reading())


def test_readme_quotes_its_records():
    check(README, claims_readme())


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    render_report(RESULTS, out, scales=["small"])
    return out


def table(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows


def test_readme_main_table_is_the_reports(report: Path):
    """The README's copy of Table 1: ours, acc_cls, fd_cls and the paper's FID as the report renders them from the
    records, the ms / image of the records (in-run, at the sampling batch)."""
    readme = table(README.read_text(encoding="utf-8"), "BiFlow Table 1 (`main`)")
    page = {row[0]: row for row in table((report / "small" / "main.md").read_text(), "Variant")}
    rows = {"itarflow": "iTARFlow (exact inverse + CFG + score denoising)",
            "biflow-mse": "BiFlow, MSE + training-time CFG (1-NFE)",
            "biflow": "BiFlow, + LPIPS + ConvNeXt + training-time CFG (1-NFE)"}
    assert len(readme) == len(rows)
    for ours, (variant, label) in zip(readme, rows.items()):
        theirs = page[label]
        assert (ours[1], ours[2], ours[3], ours[6]) == (theirs[1], theirs[2], theirs[3], theirs[-1]), (ours, theirs)
        assert ours[5] == f1(val(variant, "timing.ms_per_image", "main")), ours


def test_readme_sigma_gaps_are_the_reports(report: Path):
    """Each σ a per-table line of the README gives is one of that table's verdicts in the report."""
    lines = [ln for ln in " ".join(README.read_text().split("\n  ")).splitlines() if ln.startswith("- [")]
    quoted = 0
    for line in lines:
        page = re.match(r"- \[[^]]+\]\(reports/(small/[\w-]+\.md)\)", line)
        assert page, line
        verdicts = set(re.findall(r"\(([+-]\d+\.\d)σ\)", (report / page.group(1)).read_text()))
        for sigma in re.findall(r"([+-]?\d+\.\d)σ", line):
            quoted += 1
            assert (sigma if sigma[0] in "+-" else f"+{sigma}") in verdicts, (sigma, line, sorted(verdicts))
        assert not re.search(r"[<>≥≤]\s*\d+(\.\d+)?σ", line), f"a bound, not the report's number: {line}"
    assert quoted >= 6


README_MAX_LINES = 180
PARAGRAPH_MAX_CHARS = 1200


def paragraphs(md: str) -> list[str]:
    """A Markdown page's paragraphs: blocks between blank lines, each list item its own, tables and code left out."""
    md = re.sub(r"^```.*?^```", "", md, flags=re.S | re.M)
    found = []
    for block in re.split(r"\n\s*\n", md):
        lines = [ln for ln in block.splitlines() if not ln.lstrip().startswith("|")]
        current: list[str] = []
        for ln in lines:
            if re.match(r"\s*([-*]|\d+\.)\s", ln) and current:
                found.append(" ".join(current))
                current = []
            current.append(ln.strip())
        if current:
            found.append(" ".join(current))
    return [p for p in found if p]


def test_readme_is_an_entry_point():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES


def test_no_report_paragraph_is_too_long_to_read():
    long = [(str(page.relative_to(ROOT)), len(p), p[:60]) for page in sorted((ROOT / "reports").rglob("*.md"))
            for p in paragraphs(page.read_text(encoding="utf-8")) if len(p) > PARAGRAPH_MAX_CHARS]
    assert not long, long


def test_paragraphs_split_at_blank_lines_and_list_items_not_inside_tables():
    md = "one\ntwo\n\n- a\n  b\n- c\n\n| x |\n|---|\n| y |\n\n```\ncode\n```\n"
    assert paragraphs(md) == ["one two", "- a b", "- c"]


def test_study_page_marks_in_run_timings_as_indicative():
    """The study page's minutes and milliseconds are timed inside runs on a shared machine: the page says so, with
    the spread one G architecture's records show, and sends speed questions to the speed harness."""
    from biflow_bench.report.study import timing_note

    def rec(width: int, ms: float) -> dict[str, Any]:
        return {"config": {"backward": {"width": width}}, "timing": {"g_ms_batch1": ms}}

    records = [rec(96, 2.0), rec(96, 6.0), rec(96, 3.0), rec(192, 1.0), rec(192, 9.0 * 1.1)]
    assert timing_spread(records) == (1.0, 9.9)  # the widest ratio of one architecture, never across two
    assert timing_spread([rec(96, 2.0), rec(192, 7.0)]) is None
    note = timing_note(records[:3])
    assert "indicative only: one G architecture's batch-1 pass spans 2.00 to 6.00 ms" in note and "bench speed" in note
    assert "spans" not in timing_note([rec(96, 2.0)]) and "indicative only" in timing_note([rec(96, 2.0)])
