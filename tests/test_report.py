"""The report's files, rendered from result records alone (report/render.py): figures, links and sample grids,
byte-identical re-renders that sweep stale files, one scale at a time, skipped files named, the spec's order and
labels, no spec registry, the speed page, and the readings (COMMENTARY.md) shown and checked against the records."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the report draws on Figure objects directly; this keeps any stray pyplot headless too

import pytest
from PIL import Image

from biflow_bench.ablations import AblationSpec, Variant
from biflow_bench.report.render import ReportSummary, render_report
from biflow_bench.results import write_record
from report_records import DENOISE, make_record, speed_record, table_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------------------------------------------------
# files, links and re-renders


def test_report_figures_links_and_samples(rendered: tuple[Path, Path, ReportSummary]) -> None:
    results, out, summary = rendered
    pngs = [p for p in summary.files if p.suffix == ".png"]
    assert {p.name for p in pngs} == {"denoise.png", "main.png", "speed.png", "speed_quality.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()

    readme = (out / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert {"tiny/denoise.md", "tiny/speed.md", "tiny/speed_quality.png", "tiny/main.tex"} <= set(links)
    for link in links:
        assert (out / link).is_file(), link
    headline = table_rows(readme)["BiFlow (learned)"]
    assert headline[1:] == ["5.0 ± 0.1", "1", "1", "0.50", "×100.0", "2.39"]

    # The sample grid is referenced, not copied, by a path that resolves from the Markdown's folder.
    md = (out / "tiny" / "denoise.md").read_text()
    (ref,) = re.findall(r"!\[Learned denoising, seed 0\]\(([^)]+)\)", md)
    assert (out / "tiny" / ref).resolve() == (results / "tiny" / "samples/denoise/learned__seed0.png").resolve()
    assert not list(out.rglob("learned__seed0.png"))

    speed_md = (out / "tiny" / "speed.md").read_text()
    speed_rows = [line for line in speed_md.splitlines() if line.startswith("| exact inverse")]
    # one row per sampler: NFE, ms per image at batch 1 and 8, the speed-up at each
    assert speed_rows[0] == "| exact inverse | 64 | 40.0 | 10.0 | ×1.0 | ×1.0 |"
    # its cost: serial steps (the nfe count), GFLOP per image (1e6 FLOPs), params, % of the matmul peak per batch
    assert speed_rows[1] == "| exact inverse | 64 | 0.0010 | 150 | 1.0% | 1.0% |"
    assert "device `cpu`" in speed_md and "timed on CPU" in speed_md


def test_rerender_is_byte_identical_and_sweeps_stale_files(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    first = render_report(results, out, registry={})
    snapshot = {p: p.read_bytes() for p in first.files}
    assert any(p.suffix == ".md" for p in snapshot)
    second = render_report(results, out, registry={})
    assert second.files == first.files and second.removed == []
    assert {p: p.read_bytes() for p in second.files} == snapshot  # Markdown, CSV, LaTeX and PNG alike

    mine = out / "tiny" / "my-notes.md"  # a user's file: never swept
    mine.write_text("keep me")
    for p in (results / "tiny" / "main").glob("*.json"):
        p.unlink()
    third = render_report(results, out, registry={})
    assert sorted(p.name for p in third.removed) == ["main.csv", "main.md", "main.png", "main.tex",
                                                     "speed_quality.png"]
    assert mine.read_text() == "keep me" and not (out / "tiny" / "main.md").exists()
    assert "No `main` records at this scale." in (out / "README.md").read_text()


def test_render_of_one_scale_leaves_other_scales_alone(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "report"
    for scale in ("tiny", "small"):
        write_record(results, make_record("main", "biflow", 0, 5.0, label="BiFlow", scale=scale))
    render_report(results, out, registry={})
    partial = render_report(results, out, scales=["tiny"], registry={})
    assert partial.removed == [] and (out / "small" / "main.md").is_file()
    assert "## Scale `small`" not in (out / "README.md").read_text()
    # the partial render kept small/ in the manifest, so a full render still sweeps it once its records go
    (results / "small" / "main" / "biflow__seed0.json").unlink()
    swept = render_report(results, out, registry={}).removed
    assert sorted(p.relative_to(out).as_posix() for p in swept) == [f"small/main.{x}"
                                                                     for x in ("csv", "md", "png", "tex")]
    assert (out / "tiny" / "main.md").is_file()


def test_readme_names_skipped_files(rendered: tuple[Path, Path, ReportSummary]) -> None:
    _, out, summary = rendered
    assert len(summary.skipped) == 4
    skipped_section = (out / "README.md").read_text().split("## Skipped files", 1)[1]
    assert "- `tiny/denoise/score__seed7.json`: not valid JSON" in skipped_section
    assert "- `tiny/denoise/hello.json`: not a biflow-bench record (no 'schema' key)" in skipped_section
    assert "- `tiny/main/biflow__seed3.json`: schema 99 is not supported" in skipped_section
    assert "tiny/main/biflow__seed4.json" in skipped_section
    # the good records still rendered
    assert "31.88" in (out / "tiny" / "denoise.md").read_text()


def test_spec_order_labels_and_missing_variants(results: Path, tmp_path: Path) -> None:
    variants = {n: Variant(n, {}, {"fid": DENOISE[n][3]} if n in DENOISE else {"fid": 7.5}, f"spec {n}")
                for n in ("none", "score", "learned", "never-run")}
    spec = AblationSpec(name="denoise", version=1, title="Denoising mode", paper_table="Table 3a", baseline={},
                        variants=variants)
    out = tmp_path / "report"
    render_report(results, out, registry={"denoise": spec})
    md = (out / "tiny" / "denoise.md").read_text()
    assert md.startswith("# Denoising mode: scale `tiny`")
    rows = table_rows(md)
    # spec order; record labels win over the spec's; the unrun variant keeps its paper number and no rank of ours
    assert list(rows)[1:5] == ["No denoising", "Score-based denoising", "Learned denoising", "spec never-run"]
    assert list(rows)[5] == "Paper: better"  # the per-pair verdicts follow the table
    assert rows["spec never-run"][1:] == ["—", "0", "—", "7.50"]
    assert table_rows(md.split("## Ranks and more metrics")[1])["spec never-run"][1:] == ["—", "1"]
    assert "0.333 over 3 variants" in md  # the unrun variant does not enter tau


def test_report_without_spec_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIFLOW_ABLATIONS", str(tmp_path / "no-such-dir"))
    results, out = tmp_path / "results", tmp_path / "report"
    write_record(results, make_record("denoise", "learned", 0, 1.0, label="Learned", paper_fid=31.88))
    summary = render_report(results, out)  # registry=None: load the specs, which fails here
    assert summary.ablations == [("tiny", "denoise")] and summary.kendall[("tiny", "denoise")] is None
    assert "The ablation specs could not be loaded" in (out / "README.md").read_text()
    md = (out / "tiny" / "denoise.md").read_text()
    assert "Kendall τ between our ranking (by fd_effnet) and the paper's (by FID): n/a: 1 variant(s)" in md


def test_speed_page_nfe_matches_the_cli_and_tiny_labels_drop_b2(tmp_path: Path) -> None:
    from biflow_bench.report.tables import scale_label

    rec = speed_record()
    rec["rows"] = [{**r, "nfe_label": "4x15 serial" if r["sampler"] == "exact" else "1"} for r in rec["rows"]]
    write_record(tmp_path / "results", rec)
    render_report(tmp_path / "results", tmp_path / "report", registry={})
    rows = table_rows((tmp_path / "report" / "tiny" / "speed.md").read_text())
    assert rows["exact inverse"][1] == "4x15 serial"  # the label `bench speed` prints, not the count 64
    assert scale_label("BiFlow-B/2 (learned inverse, 1-NFE)", "tiny") == "BiFlow (learned inverse, 1-NFE)"
    assert scale_label("iTARFlow-B/2 (exact inverse)", "paper-xl") == "iTARFlow-XL/2 (exact inverse)"
    assert scale_label("BiFlow-B/2", "paper") == "BiFlow-B/2"


# ----------------------------------------------------------------------------------------------------------------------
# readings beside the records


def test_commentary_beside_the_records_is_shown(results: Path, tmp_path: Path) -> None:
    (results / "tiny" / "denoise" / "COMMENTARY.md").write_text("Score is\nbetter here because of X.\n")
    render_report(results, tmp_path / "out", registry={})
    assert "**Why.** Score is better here because of X." in (tmp_path / "out" / "tiny" / "denoise.md").read_text()
    assert "Score is better" not in (tmp_path / "out" / "README.md").read_text()  # rendered once, on its page
    main_page = (tmp_path / "out" / "tiny" / "main.md").read_text()
    assert "**Why.**" not in main_page
    assert "Our metric is `fd_effnet` on this scale's data" in main_page and "{" not in main_page
    (results / "tiny" / "speed" / "COMMENTARY.md").write_text("The CPU is\nmemory-bound.\n")
    render_report(results, tmp_path / "out", registry={})
    assert "**Why.** The CPU is memory-bound." in (tmp_path / "out" / "tiny" / "speed.md").read_text()
    assert "memory-bound" not in (tmp_path / "out" / "README.md").read_text()


def test_a_reading_that_states_more_seeds_than_a_row_has_is_flagged(results: Path, tmp_path: Path) -> None:
    # the fixture's denoise table: learned has two seeds, score and none one each
    commentary = results / "tiny" / "denoise" / "COMMENTARY.md"
    commentary.write_text("Two seeds of every row. Score beats none.\n")
    render_report(results, tmp_path / "out", registry={})
    page = (tmp_path / "out" / "tiny" / "denoise.md").read_text()
    (check,) = [line for line in page.splitlines() if line.startswith("> **Check against the records:**")]
    assert "states 2 seeds" in check and "`score` has 1" in check and "`none` has 1" in check
    assert "`learned`" not in check
    commentary.write_text("Score beats none (two sampling seeds of the exact inverse).\n")  # no seed count stated
    render_report(results, tmp_path / "out", registry={})
    assert "Check against the records" not in (tmp_path / "out" / "tiny" / "denoise.md").read_text()


def test_committed_readings_are_short_and_agree_with_their_records(tmp_path: Path) -> None:
    """Each table's reading says what reproduced and why in about five sentences, without run history
    (docs/history.md keeps that), and states no seed count its table's rows lack."""
    root = Path(__file__).resolve().parent.parent / "results"
    readings = sorted(root.glob("small/*/COMMENTARY.md"))
    assert readings
    for path in readings:
        text = " ".join(path.read_text(encoding="utf-8").split())
        assert len(re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)) <= 5, path
        assert not re.search(r"earlier (runs?|records)|re-run|from one `make", text, re.I), path
    render_report(root, tmp_path / "out", scales=["small"])
    for page in (tmp_path / "out" / "small").glob("*.md"):
        assert "Check against the records" not in page.read_text(), page
