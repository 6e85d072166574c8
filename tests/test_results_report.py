"""Result records (write/read/validation, skipping bad files) and the report rendered from them alone."""

from __future__ import annotations

import itertools
import math
import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # the report draws on Figure objects directly; this keeps any stray pyplot headless too

import pandas as pd
import pytest
from PIL import Image

from biflow_bench.files import atomic_write_json
from biflow_bench.ablations import AblationSpec, Variant
from biflow_bench.report.render import ReportSummary, render_report
from biflow_bench.report.stats import pair_verdicts, verdict
from biflow_bench.report.tables import ablation_table, headline_table
from biflow_bench.results import (
    RESULT_SCHEMA, BadRecord, find_record, is_done, load_results, load_speed_records, read_record, record_path,
    scan_records, write_record,
)
from biflow_bench.config import SCALES, apply_delta, config_hash
from biflow_bench.identity import config_id, config_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# denoise: ours ranks learned < none < score, the paper learned < score < none -> one discordant pair of three.
DENOISE = {  # variant: (label, [values per seed], bootstrap std, paper FID, NFE)
    "learned": ("Learned denoising", [9.0, 11.0], 0.3, 31.88, 1),
    "score": ("Score-based denoising", [30.0], 0.5, 42.62, 2),
    "none": ("No denoising", [20.0], 0.7, 100.51, 1),
}


def make_record(ablation: str, variant: str, seed: int, value: float, *, label: str, std: float = 0.1,
                paper_fid: float | None = None, nfe: int = 1, inverse: str = "learned", ms: float = 1.0,
                scale: str = "tiny", notes: tuple[str, ...] = (), samples_png: str | None = None) -> dict[str, Any]:
    return {
        "schema": RESULT_SCHEMA, "kind": "ablation", "ablation": ablation, "variant": variant, "label": label,
        "scale": scale, "seed": seed, "spec_version": 1, "config": {"inverse": inverse, "scale": scale},
        "metric": "fd_effnet",
        "metrics": {"fd_effnet": value, "fd_effnet_std": std, "is_effnet": 3.0, "bpd": 1.5},
        "nfe": nfe, "nfe_label": str(nfe), "params": {"flow": 100, "backward": 50},
        "timing": {"ms_per_image": ms, "images_per_s": 1000.0 / ms},
        "paper": {"fid": paper_fid, "table": "Table 3", "nfe": nfe},
        "notes": list(notes), "samples_png": samples_png,
        "env": {"device": "cpu"}, "wall_time_s": 1.0, "created": "2026-11-23T10:00:00Z",
    }


def speed_record(scale: str = "tiny") -> dict[str, Any]:
    rows = []
    for sampler, label, nfe, ms1 in (("exact", "exact inverse", 64, 40.0), ("learned", "learned 1-NFE", 1, 0.8)):
        for bs in (1, 8):
            ms = ms1 / (1 if bs == 1 else 4)
            rows.append({"sampler": sampler, "label": label, "nfe": nfe, "params": 150, "flops_per_image": 1e6,
                         "batch_size": bs, "ms_per_image": ms, "images_per_s": 1000 / ms,
                         "speedup": (40.0 / ms1), "peak_fraction": 0.01, "paper_ms": None, "paper_speedup": None})
    return {"schema": RESULT_SCHEMA, "kind": "speed", "ablation": "speed", "variant": "bench", "scale": scale,
            "seed": 0, "rows": rows, "machine": {"device": "cpu", "matmul_peak_flops": 1e11},
            "notes": ["timed on CPU"]}


def build_results(rdir: Path) -> Path:
    """Two quality ablations (one with two seeds), a speed record, one sample grid."""
    grid = rdir / "tiny" / "samples" / "denoise" / "learned__seed0.png"
    grid.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(grid)
    for variant, (label, values, std, fid, nfe) in DENOISE.items():
        for seed, value in enumerate(values):
            write_record(rdir, make_record(
                "denoise", variant, seed, value, label=label, std=std, paper_fid=fid, nfe=nfe,
                notes=("perceptual networks use random weights (offline)",),
                samples_png="samples/denoise/learned__seed0.png" if (variant, seed) == ("learned", 0) else None))
    write_record(rdir, make_record("main", "biflow", 0, 5.0, label="BiFlow (learned)", paper_fid=2.39, ms=0.5))
    write_record(rdir, make_record("main", "itarflow", 0, 4.0, label="iTARFlow (exact)", paper_fid=6.83, nfe=129,
                                   inverse="exact", ms=50.0))
    write_record(rdir, speed_record())
    return rdir


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    return build_results(tmp_path / "results")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ReportSummary]:
    """One report (records alone, no spec registry) over the fixture plus four bad files, shared by the read-only
    report tests: drawing the figures is most of the suite's time."""
    root = tmp_path_factory.mktemp("rendered")
    rdir = build_results(root / "results")
    add_bad_files(rdir)
    return rdir, root / "report", render_report(rdir, root / "report", registry={})


def add_bad_files(rdir: Path) -> dict[str, Path]:
    good = record_path(rdir, "tiny", "denoise", "learned", 0).read_text()
    bad = {
        "truncated": rdir / "tiny" / "denoise" / "score__seed7.json",
        "foreign": rdir / "tiny" / "denoise" / "hello.json",
        "schema": rdir / "tiny" / "main" / "biflow__seed3.json",
        "moved": rdir / "tiny" / "main" / "biflow__seed4.json",
    }
    bad["truncated"].write_text(good[: len(good) // 2])
    bad["foreign"].write_text(json.dumps({"hello": 1}))
    bad["schema"].write_text(json.dumps({**make_record("main", "biflow", 3, 1.0, label="x"), "schema": 99}))
    bad["moved"].write_text(json.dumps(make_record("main", "biflow", 0, 1.0, label="x")))  # says seed 0
    return bad


def kendall_tau_by_hand(xs: list[float], ys: list[float]) -> float:
    """Tau-a from concordant and discordant pairs (no ties in the fixture, where tau-a equals scipy's tau-b)."""
    pairs = list(itertools.combinations(range(len(xs)), 2))
    s = sum((1 if (xs[i] - xs[j]) * (ys[i] - ys[j]) > 0 else -1) for i, j in pairs)
    return s / len(pairs)


def table_rows(md: str) -> dict[str, list[str]]:
    """First cell -> cells, for every body row of the pipe tables in `md` (the first row wins: the main table comes
    before the per-pair verdicts and the measurements, whose rows also start with a variant's label)."""
    rows: dict[str, list[str]] = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| :--") and not line.startswith("| --"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0], cells)
    return rows


# ------------------------------------------------------------------------------------------------------ results


def test_record_round_trip(tmp_path: Path) -> None:
    rec = make_record("denoise", "learned", 2, 12.3, label="Learned", paper_fid=31.88)
    del rec["schema"]  # stamped by the writer
    path = write_record(tmp_path, rec)
    assert path == tmp_path / "tiny" / "denoise" / "learned__seed2.json"
    assert read_record(path) == {**rec, "schema": RESULT_SCHEMA, "config_hash": config_id(rec["config"])}
    assert is_done(tmp_path, "tiny", "denoise", "learned", 2)
    assert not is_done(tmp_path, "tiny", "denoise", "learned", 3)  # no file


def test_write_refuses_invalid_records(tmp_path: Path) -> None:
    rec = make_record("denoise", "learned", 0, 1.0, label="x")
    with pytest.raises(BadRecord, match="metrics"):
        write_record(tmp_path, {k: v for k, v in rec.items() if k != "metrics"})
    with pytest.raises(BadRecord, match="variant"):
        write_record(tmp_path, {**rec, "variant": "../escape"})
    with pytest.raises(BadRecord, match="primary metric"):
        write_record(tmp_path, {**rec, "metric": "fid"})
    with pytest.raises(BadRecord, match="schema 2"):
        write_record(tmp_path, {**rec, "schema": 2})
    with pytest.raises(BadRecord, match=r"rows\[0\]"):
        write_record(tmp_path, {**speed_record(), "rows": [{"sampler": "exact", "batch_size": 1}]})
    assert not list(tmp_path.rglob("*.json"))


def test_bad_files_are_rejected_and_skipped(results: Path) -> None:
    bad = add_bad_files(results)
    expected_reason = {"truncated": "not valid JSON", "foreign": "no 'schema' key", "schema": "schema 99"}
    for key, reason in expected_reason.items():
        with pytest.raises(BadRecord, match=re.escape(reason)) as err:
            read_record(bad[key])
        assert str(bad[key]) in str(err.value) and "\n" not in str(err.value)
    assert not is_done(results, "tiny", "denoise", "score", 7)  # truncated
    assert not is_done(results, "tiny", "main", "biflow", 3)  # wrong schema
    assert not is_done(results, "tiny", "main", "biflow", 4)  # valid JSON, but a copy of seed 0's record

    df, skipped = load_results(results)
    reasons = {p: why for p, why in skipped}
    assert set(reasons) == set(bad.values())
    assert "belongs at tiny/main/biflow__seed0.json" in reasons[bad["moved"]]
    assert len(df) == 6 and set(df["kind"]) == {"ablation"}  # the 6 good quality records, nothing else


def test_load_results_flattens_records(results: Path) -> None:
    df, skipped = load_results(results)
    assert skipped == []
    row = df[(df["ablation"] == "denoise") & (df["variant"] == "score")].iloc[0]
    assert (row["value"], row["value_std"], row["metric_is_effnet"], row["metric_bpd"]) == (30.0, 0.5, 3.0, 1.5)
    assert (row["paper_fid"], row["paper_table"], row["params_total"]) == (42.62, "Table 3", 150.0)
    assert row["nfe_label"] == "2"
    assert list(df[df["variant"] == "learned"]["seed"]) == [0, 1]

    both, _ = load_results(results, kinds=("ablation", "speed"))
    assert set(both["kind"]) == {"ablation", "speed"}
    speed, _ = load_speed_records(results)
    assert len(speed) == 4 and set(speed["sampler"]) == {"exact", "learned"}
    assert speed[speed["sampler"] == "exact"]["batch_size"].tolist() == [1.0, 8.0]


def test_headline_table_speedup(results: Path) -> None:
    df, _ = load_results(results)
    h = headline_table(df).set_index("variant")
    assert h.loc["biflow", "speedup_vs_exact"] == pytest.approx(100.0)  # 50 ms exact / 0.5 ms learned
    assert h.loc["itarflow", "speedup_vs_exact"] == pytest.approx(1.0)
    assert h.loc["biflow", "ours"] == 5.0 and h.loc["biflow", "paper_fid"] == 2.39


# ------------------------------------------------------------------------------------------------------- report


def test_report_tables_ranks_and_kendall(rendered: tuple[Path, Path, ReportSummary]) -> None:
    _, out, summary = rendered
    assert summary.ablations == [("tiny", "denoise"), ("tiny", "main")]
    md = (out / "tiny" / "denoise.md").read_text()
    rows = table_rows(md)
    more_rows = table_rows(md.split("## Ranks and more metrics")[1])

    # variant -> (our mean, our rank, paper rank), computed here from DENOISE
    means = {v: sum(vals) / len(vals) for v, (_, vals, _, _, _) in DENOISE.items()}
    paper = {v: spec[3] for v, spec in DENOISE.items()}
    for v, (label, vals, std, fid, nfe) in DENOISE.items():
        cells = rows[label]
        our_rank = 1 + sum(m < means[v] for m in means.values())
        paper_rank = 1 + sum(p < paper[v] for p in paper.values())
        # std across 2 seeds (9, 11) = sqrt(2) = 1.4 (two digits: one would misstate it), else the bootstrap std
        noise = "1.4" if len(vals) > 1 else f"{std:.1f}"
        assert cells[1] == f"{means[v]:.1f} ± {noise}"
        assert cells[2:] == [str(len(vals)), str(nfe), f"{fid:.2f}"]
        assert more_rows[label][1:] == [str(our_rank), str(paper_rank)]  # ranks in the second table
    assert list(rows)[1:4] == ["Learned denoising", "No denoising", "Score-based denoising"]  # sorted by variant name

    variants = list(DENOISE)
    tau = kendall_tau_by_hand([means[v] for v in variants], [paper[v] for v in variants])
    assert tau == pytest.approx(1 / 3)
    assert f"Kendall τ between our ranking (by fd_effnet) and the paper's (by FID): {tau:.3f} over 3 variants." in md
    assert summary.kendall[("tiny", "denoise")] == pytest.approx(tau)
    assert md.count("perceptual networks use random weights (offline)") == 1  # deduplicated over 4 records
    tex = (out / "tiny" / "denoise.tex").read_text()
    assert "10.0 $\\pm$ 1.4" in tex and "31.88" in tex and "fd\\_effnet" in tex
    csv = (out / "tiny" / "denoise.csv").read_text().splitlines()
    assert csv[0].startswith("scale,ablation,variant,label,metric,ours,ours_std")
    assert len(csv) == 4

    # main: ours 5 vs 4, paper 2.39 vs 6.83 -> fully discordant
    main_md = (out / "tiny" / "main.md").read_text()
    assert "Kendall τ between our ranking (by fd_effnet) and the paper's (by FID): -1.000 over 2 variants." in main_md


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


def test_verdict_counts_pairs_against_noise(rendered: tuple[Path, Path, ReportSummary]) -> None:
    _, out, _ = rendered
    # ours: learned 10 ± 1.41, score 30 ± 0.5, none 20 ± 0.7; the paper: learned < score < none. Every gap is
    # larger than 2 sigma, and score / none are the other way round.
    expected = ("By fd_effnet: the paper's best variant (`learned`) is best here too; 2 of 3 pairs keep the paper's "
                "order (2 beyond 2σ noise); reversed here: `none` beats `score`.")
    assert expected in (out / "tiny" / "denoise.md").read_text()
    assert f"- [denoise](tiny/denoise.md) (`denoise`): {expected}" in (out / "README.md").read_text()

    table = pd.DataFrame({"variant": ["a", "b", "c"], "ours": [1.0, 1.5, float("nan")], "ours_std": [0.5, 0.5, 0.1],
                          "paper_fid": [2.0, 1.0, 3.0]})
    assert verdict(table, "fd_cls") == ("By fd_cls: the paper's best variant is `b`; ours is `a`; 0 of 1 pairs keep "
                                        "the paper's order (0 beyond 2σ noise); reversed here: `a` beats `b` (within "
                                        "noise).")
    assert verdict(table.assign(metric="fd_effnet")).startswith("By fd_effnet: the paper's")  # the table's metric
    assert verdict(table.iloc[:1], "fd_effnet").startswith("By fd_effnet: not comparable")


def test_pair_verdicts_golden() -> None:
    """Each pair the paper orders gets, per metric, reproduced / reversed / unresolved at 2 sigma (sigma: the two
    rows' noise in quadrature), with the gap in sigma units, positive in the paper's direction."""
    table = pd.DataFrame({"variant": ["a", "b", "c", "d"], "ours": [10.0, 12.0, 8.0, 1.0],
                          "ours_std": [1.0, 1.0, 0.0, 0.0], "paper_fid": [1.0, 2.0, 3.0, float("nan")]})
    extras = [("acc_cls", "acc_cls ↑", [(0.9, 0.01), (0.8, 0.01), (0.95, 0.03), (0.5, 0.0)]),
              ("fd_cls", "fd_cls ↓", [(5.0, 1.0), (4.0, 1.0), (float("nan"), 1.0), (1.0, 0.0)]),
              ("conf_cls", "conf_cls ↑", [(0.1, 0.0), (0.9, 0.0), (0.5, 0.0), (0.5, 0.0)])]  # not judged
    pairs = pair_verdicts(table, extras)
    assert [(r.better, r.worse, r.paper_gap) for r in pairs.itertuples()] == [("a", "b", 1.0), ("a", "c", 2.0),
                                                                               ("b", "c", 1.0)]
    assert list(pairs["ours"]) == ["unresolved", "unresolved", "reversed"]  # z = 2/sqrt2, -2 (not beyond), -4
    assert pairs["ours_z"].tolist() == pytest.approx([2 / math.sqrt(2), -2.0, -4.0])
    assert list(pairs["acc_cls"]) == ["reproduced", "unresolved", "reversed"]
    assert pairs["acc_cls_z"].tolist() == pytest.approx([0.1 / math.hypot(0.01, 0.01), -0.05 / math.hypot(0.01, 0.03),
                                                         -0.15 / math.hypot(0.01, 0.03)])
    assert list(pairs["fd_cls"]) == ["unresolved", "missing", "missing"]  # -1/sqrt2, then c has no number
    assert pairs["fd_cls_z"].iloc[0] == pytest.approx(-1 / math.sqrt(2)) and math.isnan(pairs["fd_cls_z"].iloc[1])
    assert "conf_cls" not in pairs


def test_measurements_section_averages_diagnostics_over_seeds() -> None:
    from biflow_bench.report.pages import measurements_section

    records = pd.DataFrame({"variant": ["a", "a", "b"], "label": ["A", "A", "B"],
                            "metric_noise_residual": [0.01, 0.03, 0.05], "diag_noise_residual_real": [0.04] * 3,
                            "diag_inverse_mse_clean": [0.1, 0.3, float("nan")], "metric_bpd": [5.0, 5.0, 5.0],
                            "ms_per_image": [1.0, 3.0, 2.0]})
    md = measurements_section(records)
    rows = table_rows(md)
    assert rows["Variant"] == ["Variant", "noise left in samples", "… in real images", "G vs F⁻¹, clean target",
                               "F bits/dim", "ms / image"]  # columns no record has are left out
    assert rows["A"] == ["A", "0.0200", "0.0400", "0.200", "5.00", "2.00"]  # three significant digits
    batched = table_rows(measurements_section(records.assign(sample_batch=500.0)))
    assert batched["Variant"][-1] == "ms / image (batch 500)"
    assert rows["B"][3] == "—"
    assert measurements_section(records.drop(columns=[c for c in records if c not in ("variant", "label")])) is None


def test_seed_std_is_floored_at_the_bootstrap_std(tmp_path: Path) -> None:
    """Two seeds that agree by chance (10.0, 10.1) do not make the number more certain than one run's own noise."""
    for seed, value in enumerate((10.0, 10.1)):
        write_record(tmp_path, make_record("denoise", "learned", seed, value, label="L", std=0.5, paper_fid=1.0))
    for seed, value in enumerate((10.0, 14.0)):
        write_record(tmp_path, make_record("denoise", "none", seed, value, label="N", std=0.5, paper_fid=2.0))
    df, _ = load_results(tmp_path)
    table = ablation_table(df).set_index("variant")
    assert table.loc["learned", "ours_std"] == pytest.approx(0.5) and table.loc["learned", "noise"] == "bootstrap"
    assert table.loc["none", "ours_std"] == pytest.approx(8 ** 0.5) and table.loc["none", "noise"] == "seeds"


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


# ------------------------------------------------------------------------------------------- records keyed by config


def _variant_of(base: dict[str, Any], seed: int, value: float, config: dict[str, Any],
                overrides: dict[str, Any] | None = None, version: int = 1) -> dict[str, Any]:
    return {**base, "seed": seed, "metrics": {**base["metrics"], "fd_effnet": value}, "config": config,
            "overrides": overrides or {}, "spec_version": version}


def test_records_of_other_configs_sit_side_by_side(tmp_path: Path) -> None:
    base = make_record("denoise", "learned", 0, 10.0, label="Learned")
    default, short = {"inverse": "learned", "stage2": {"steps": 400}}, {"inverse": "learned", "stage2": {"steps": 100}}
    assert config_overrides(short, default) == {"stage2.steps": 100}
    h_default, h_short = config_id(default), config_id(short)
    assert h_default != h_short and config_id(default, micro_batch=8) not in (h_default, h_short)

    plain = write_record(tmp_path, _variant_of(base, 0, 10.0, default))
    hashed = write_record(tmp_path, _variant_of(base, 0, 2000.0, short, {"stage2.steps": 100}))
    assert plain == record_path(tmp_path, "tiny", "denoise", "learned", 0)
    assert hashed == record_path(tmp_path, "tiny", "denoise", "learned", 0, h_short) != plain
    assert hashed.name == f"learned__seed0__{h_short}.json"
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, h_default) == plain
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, h_short) == hashed
    assert find_record(tmp_path, "tiny", "denoise", "learned", 1, h_short) is None  # another seed: not done
    assert read_record(plain)["metrics"]["fd_effnet"] == 10.0  # the override did not replace the default record

    # the spec's default changes: the new default record takes the readable name, the old one moves to the archive
    # under its hash, with its grid
    grid = tmp_path / "tiny" / "samples" / "denoise" / "learned__seed0.png"
    grid.parent.mkdir(parents=True)
    grid.write_bytes(b"old grid")
    atomic_write_json(plain, {**read_record(plain), "samples_png": "samples/denoise/learned__seed0.png"})
    newer = {"inverse": "learned", "stage2": {"steps": 500}}
    assert write_record(tmp_path, _variant_of(base, 0, 7.0, newer, version=2)) == plain
    aside = record_path(tmp_path / "archive", "tiny", "denoise", "learned", 0, h_default)
    assert read_record(aside)["metrics"]["fd_effnet"] == 10.0 and read_record(plain)["metrics"]["fd_effnet"] == 7.0
    archived_grid = tmp_path / "archive" / "tiny" / read_record(aside)["samples_png"]
    assert archived_grid.read_bytes() == b"old grid" and not grid.exists()
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, h_default) is None  # superseded: not done today
    records, skipped = scan_records(tmp_path)
    assert skipped == [] and len(records) == 2 and len(scan_records(tmp_path, include_archive=True)[0]) == 3


def test_a_run_of_todays_config_archives_the_old_default_record_with_its_own_grid(tmp_path: Path) -> None:
    """A new run writes its grid under the readable name the old default record's grid has: the old record and
    its grid go to the archive first, so the archived record still shows its own samples."""
    import time

    from biflow_bench.ablations import get_spec
    from biflow_bench.identity import run_identity
    from biflow_bench.record import write_variant_record

    spec = get_spec("denoise")
    cfg = spec.resolve("learned", "tiny")
    old = {**make_record("denoise", "learned", 0, 900.0, label="Learned", samples_png="samples/denoise/learned__seed0.png"),
           "config": {**cfg.to_dict(), "stage2": {**cfg.to_dict()["stage2"], "steps": 7}}}
    old_path = write_record(tmp_path, old)
    (tmp_path / "tiny" / "samples" / "denoise").mkdir(parents=True)
    (tmp_path / "tiny" / old["samples_png"]).write_bytes(b"old grid")
    ident = run_identity(spec, "learned", "tiny", cfg, None)
    measurement = {**make_record("denoise", "learned", 0, 500.0, label="Learned"), "config": cfg.to_dict(),
                   "guidance": {"scales": [0.0], "best_w": 0.0}}
    path = write_variant_record(spec, "learned", "tiny", 0, tmp_path, ident, measurement, b"new grid", time.perf_counter())
    assert path == old_path and (tmp_path / "tiny" / read_record(path)["samples_png"]).read_bytes() == b"new grid"
    (archived, rec), = scan_records(tmp_path / "archive")[0]
    assert rec["metrics"]["fd_effnet"] == 900.0 and (tmp_path / "archive" / "tiny" / rec["samples_png"]).read_bytes() == b"old grid"


def test_an_earlier_archived_run_of_the_same_config_is_kept_not_overwritten(tmp_path: Path) -> None:
    """Two runs of one config superseded in turn (a table re-run before a preset change): the archive keeps both,
    each with its own grid; the latest takes the hashed name the report reads, the earlier one a name stamped with
    its creation time."""
    from biflow_bench.results import archive_superseded

    def superseded_run(created: str, value: float, grid: bytes) -> None:
        png = "samples/denoise/learned__seed0.png"
        write_record(tmp_path, {**make_record("denoise", "learned", 0, value, label="Learned", samples_png=png),
                                "created": created})
        (tmp_path / "tiny" / png).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tiny" / png).write_bytes(grid)
        assert archive_superseded(record_path(tmp_path, "tiny", "denoise", "learned", 0), tmp_path, "a-newer-config")

    superseded_run("2026-12-03T03:02:21Z", 900.0, b"first grid")
    superseded_run("2026-12-03T12:45:20Z", 800.0, b"second grid")
    (latest, rec), = scan_records(tmp_path, include_archive=True)[0]
    assert scan_records(tmp_path, include_archive=True)[1] == []
    assert rec["metrics"]["fd_effnet"] == 800.0 and (tmp_path / "archive" / "tiny" / rec["samples_png"]).read_bytes() == b"second grid"
    earlier = latest.with_name(f"{latest.stem}__20261203T030221Z.json")
    first = read_record(earlier)
    assert first["metrics"]["fd_effnet"] == 900.0 and (tmp_path / "archive" / "tiny" / first["samples_png"]).read_bytes() == b"first grid"
    assert not (tmp_path / "tiny" / "denoise" / "learned__seed0.json").exists()


def test_report_averages_seeds_only_within_one_config(tmp_path: Path) -> None:
    rdir = tmp_path / "results"
    base = make_record("denoise", "learned", 0, 10.0, label="Learned", paper_fid=31.88)
    default, short = {"inverse": "learned", "stage2": {"steps": 400}}, {"inverse": "learned", "stage2": {"steps": 100}}
    write_record(rdir, _variant_of(base, 0, 2000.0, short, {"stage2.steps": 100}))  # seed 0 with an override
    write_record(rdir, _variant_of(base, 1, 500.0, default))  # seed 1 with the default config
    write_record(rdir, _variant_of(base, 2, 600.0, default))
    old = {"inverse": "learned", "stage2": {"steps": 300}}  # an older spec's default
    write_record(rdir, _variant_of(base, 4, 900.0, old, version=0))
    write_record(rdir, _variant_of(base, 3, 950.0, old, version=0))
    write_record(rdir, _variant_of(base, 3, 550.0, default))  # moves the seed-3 record above to the archive
    summary = render_report(rdir, tmp_path / "report", registry={})
    md = (tmp_path / "report" / "tiny" / "denoise.md").read_text()
    main, other = md.split("## Other configurations")
    assert table_rows(main)["Learned"][1] == "550 ± 50"  # seeds 500, 550, 600: std 50  # seeds 1-3 of the default config only
    assert table_rows(main)["Learned"][2] == "3"
    rows = [line.strip("|").split(" | ") for line in other.splitlines() if line.startswith("| Learned")]
    assert sorted((r[1].strip(), r[2], r[3]) for r in rows) == [
        ("stage2.steps=100", "2000.0 ± 0.1", "1"), ("stage2.steps=300", "900.0 ± 0.1", "1")]
    assert len(summary.separated) == 2 and any("stage2.steps=100" in n for n in summary.separated)
    csv = pd.read_csv(tmp_path / "report" / "tiny" / "denoise.csv", keep_default_na=False)
    assert sorted(csv["config"]) == ["", "stage2.steps=100", "stage2.steps=300"]  # by the keys that differ


def test_report_row_is_the_current_preset_even_with_fewer_seeds(tmp_path: Path) -> None:
    # a preset changed within one spec version: the table's row is the config a run would record today, not the
    # older default that still has more seeds
    from biflow_bench.ablations import get_spec

    rdir, spec = tmp_path / "results", get_spec("denoise")
    current = spec.resolve("learned", "tiny").to_dict()
    older = {**current, "stage2": {**current["stage2"], "precision": "bf16"}}
    base = make_record("denoise", "learned", 0, 10.0, label="Learned")
    for seed in (0, 1):
        write_record(rdir, _variant_of(base, seed, 900.0 + seed, older))
    write_record(rdir, _variant_of(base, 0, 500.0, current))  # moves the older seed-0 record to the archive
    render_report(rdir, tmp_path / "report", registry={"denoise": spec})
    main, other = (tmp_path / "report" / "tiny" / "denoise.md").read_text().split("## Other configurations")
    assert table_rows(main)["Learned"][1] == "500.0 ± 0.1" and table_rows(main)["Learned"][2] == "1"
    assert "| Learned | stage2.precision=bf16 | 901.0 ± 0.1 |" in other  # labelled by how it differs from today's


def test_stage_keys_cover_micro_batch_and_device() -> None:
    cfg = SCALES["small"]  # both stages at batch 128
    assert cfg.stage1_key(cfg.stage1.batch_size) == cfg.stage1_key()  # one pass per batch: the same training
    assert cfg.stage1_key(32) != cfg.stage1_key() and cfg.stage2_key(0, 32) != cfg.stage2_key(0)
    assert cfg.stage1_key(device="cuda") != cfg.stage1_key()  # bf16 autocast on CUDA
    assert cfg.effective_micro_batch(cfg.stage1.batch_size) is None and cfg.effective_micro_batch(32) == 32


def test_a_record_moved_aside_under_its_whole_config_hash_still_counts(tmp_path: Path) -> None:
    """Records moved aside before the hash left out unused perceptual settings carry the whole config's hash in
    their names: they still read, and still count as done."""
    old = {"inverse": "learned", "stage2": {"metric": "mse", "steps": 400, "perceptual_size": 64}}
    base = make_record("denoise", "learned", 0, 10.0, label="Learned")
    plain = write_record(tmp_path, _variant_of(base, 0, 10.0, old))
    whole = record_path(tmp_path, "tiny", "denoise", "learned", 0, config_hash(old))
    assert config_hash(old) != config_id(old)
    plain.rename(whole)
    records, skipped = scan_records(tmp_path)
    assert skipped == [] and len(records) == 1
    assert find_record(tmp_path, "tiny", "denoise", "learned", 0, config_id(old)) == whole


def test_perceptual_code_version_keys_only_the_gs_trained_with_perceptual_terms(monkeypatch) -> None:
    """A change to the perceptual terms' code retrains the Gs that use them, and no other model."""
    import biflow_bench.identity as identity

    mse, lpips = SCALES["tiny"], apply_delta(SCALES["tiny"], {"stage2.metric": "mse+lpips"})
    before = (mse.stage1_key(), mse.stage2_key(0), lpips.stage2_key(0))
    monkeypatch.setattr(identity, "PERCEPTUAL_CODE_VERSION", identity.PERCEPTUAL_CODE_VERSION + 1)
    assert (mse.stage1_key(), mse.stage2_key(0)) == before[:2] and lpips.stage2_key(0) != before[2]


def test_perceptual_settings_a_metric_never_reads_are_not_part_of_a_runs_identity() -> None:
    """An MSE run is the same run whatever its (unused) perceptual settings: the same record hash and G; an LPIPS
    run ignores the ConvNeXt term's settings but not the crop size it trains with."""
    def ids(delta: dict) -> tuple[str, str]:
        cfg = apply_delta(SCALES["tiny"], delta)
        return config_id(cfg.to_dict()), cfg.stage2_key(0)

    mse, lpips = {"stage2.metric": "mse"}, {"stage2.metric": "mse+lpips"}
    assert ids({**mse, "stage2.perceptual_size": 32, "stage2.lpips_net": "vgg16"}) == ids(mse)
    assert ids({**lpips, "stage2.convnext_net": "convnextv2", "stage2.convnext_weight": 2.0}) == ids(lpips)
    assert all(a != b for a, b in zip(ids({**lpips, "stage2.perceptual_size": 48}), ids(lpips)))
    assert config_overrides(apply_delta(SCALES["tiny"], {"stage2.perceptual_batch": 4}).to_dict(),
                            SCALES["tiny"].to_dict()) == {}


def test_seeds_of_g_share_one_f() -> None:
    """A run's seed varies G (and sampling), not F: F is trained once per F config, its seed is stage1.seed."""
    cfg = SCALES["tiny"]
    assert cfg.stage2_key(1) != cfg.stage2_key(0)
    other_f = apply_delta(cfg, {"stage1.seed": 1})
    assert other_f.stage1_key() != cfg.stage1_key() and other_f.stage2_key(0) != cfg.stage2_key(0)


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


# ------------------------------------------------------------------------------------------- a page a reader can scan


def test_numbers_are_rounded_to_what_their_noise_supports() -> None:
    from biflow_bench.report.format import fmt_ours, fmt_sig

    assert fmt_ours(0.8112, 0.0117) == "0.81 ± 0.01" and fmt_ours(425.46, 7.39) == "425 ± 7"
    assert fmt_ours(1055.95, 69.9) == "1056 ± 70"  # an integer part is never rounded to zeros
    assert fmt_ours(2.32, 1.27) == "2.3 ± 1.3"  # one digit (1) would misstate the ± by a fifth: two
    assert fmt_ours(0.92, 0.00624, tex=True) == r"0.920 $\pm$ 0.006"
    assert fmt_ours(0.19, float("nan")) == "0.19" and fmt_ours(float("nan"), 1.0) == "—"
    assert [fmt_sig(x) for x in (54.6968, 0.025948, 5.6124)] == ["54.7", "0.0259", "5.61"]


def _rich_record(variant: str, seed: int, value: float, *, batch: int = 500, **kw: Any) -> dict[str, Any]:
    """A record with every metric a small-scale record has, guided, timed at the sampling batch `batch`."""
    rec = make_record("main", variant, seed, value, **kw)
    rec["metrics"].update(acc_cls=0.8, acc_cls_std=0.01, conf_cls=0.7, conf_cls_std=0.01, fd_cls=30.0,
                          fd_cls_std=2.0, precision_effnet=0.5, recall_effnet=0.2)
    rec["timing"]["sample_batch"] = batch
    rec["guidance"] = {"scales": [0.0, 1.0], "best_w": 1.0, "selected_by": "fd_effnet",
                       "curve": [{"w": w, "metrics": {"fd_effnet": value + 1 - w}, "ms_per_image": 1.0}
                                 for w in (0.0, 1.0)]}
    return rec


def test_main_table_fits_eight_columns_and_the_speed_figures_name_their_batch(tmp_path: Path) -> None:
    rdir, out = tmp_path / "results", tmp_path / "report"
    write_record(rdir, _rich_record("biflow", 0, 5.0, label="BiFlow", paper_fid=2.39, ms=0.5))
    write_record(rdir, _rich_record("itarflow", 0, 4.0, label="iTARFlow", paper_fid=6.83, inverse="exact", ms=5.0))
    write_record(rdir, speed_record())
    render_report(rdir, out, registry={})
    page = (out / "tiny" / "main.md").read_text()
    main_header = table_rows(page)["Variant"]
    assert main_header == ["Variant", "Ours (fd_effnet, ↓)", "acc_cls ↑", "fd_cls ↓", "Seeds", "NFE", "Best w",
                           "Paper FID"]
    more = table_rows(page.split("## Ranks and more metrics")[1])
    assert more["Variant"] == ["Variant", "Our rank", "Paper rank", "conf_cls ↑", "precision ↑", "recall ↑"]
    assert more["BiFlow"][1:] == ["2", "1", "0.70 ± 0.01", "0.50", "0.20"]
    assert "textbackslash" not in (out / "tiny" / "main.tex").read_text()  # every ± column is TeX, not escaped TeX

    readme = (out / "README.md").read_text()
    assert "Lower is better for every quality metric" not in readme and "↑ higher" in readme
    headline = table_rows(readme)["Variant"]
    assert len(headline) <= 8 and "ms / image (batch 500)" in headline and "speed-up vs exact (batch 500)" in headline
    assert table_rows(readme)["BiFlow"][-3:] == ["0.50", "×10.0", "2.39"]
    speed = table_rows((out / "tiny" / "speed.md").read_text())["Sampler"]
    assert speed == ["Sampler", "NFE", "ms / image (batch 1)", "ms / image (batch 8)", "speed-up vs exact (batch 1)",
                     "speed-up vs exact (batch 8)"]


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
