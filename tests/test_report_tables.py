"""The numbers on the report's pages: each table's means, noise, ranks and Kendall τ against the paper, the headline
speed-up, seeds averaged only within one config (today's preset's row first), the verdicts on the paper's pairwise
orderings, the measurements section, rounding to what the noise supports, and the main table's columns."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # the report draws on Figure objects directly; this keeps any stray pyplot headless too

import pandas as pd
import pytest

from biflow_bench.report.render import ReportSummary, render_report
from biflow_bench.report.stats import pair_verdicts, verdict
from biflow_bench.report.tables import ablation_table, headline_table
from biflow_bench.report.frames import load_results
from biflow_bench.results import write_record
from report_records import DENOISE, make_record, speed_record, table_rows, variant_of

# ----------------------------------------------------------------------------------------------------------------------
# tables, ranks and noise


def kendall_tau_by_hand(xs: list[float], ys: list[float]) -> float:
    """Tau-a from concordant and discordant pairs (no ties in the fixture, where tau-a equals scipy's tau-b)."""
    pairs = list(itertools.combinations(range(len(xs)), 2))
    s = sum((1 if (xs[i] - xs[j]) * (ys[i] - ys[j]) > 0 else -1) for i, j in pairs)
    return s / len(pairs)


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


def test_headline_table_speedup(results: Path) -> None:
    df, _ = load_results(results)
    h = headline_table(df).set_index("variant")
    assert h.loc["biflow", "speedup_vs_exact"] == pytest.approx(100.0)  # 50 ms exact / 0.5 ms learned
    assert h.loc["itarflow", "speedup_vs_exact"] == pytest.approx(1.0)
    assert h.loc["biflow", "ours"] == 5.0 and h.loc["biflow", "paper_fid"] == 2.39


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


def test_report_averages_seeds_only_within_one_config(tmp_path: Path) -> None:
    rdir = tmp_path / "results"
    base = make_record("denoise", "learned", 0, 10.0, label="Learned", paper_fid=31.88)
    default, short = {"inverse": "learned", "stage2": {"steps": 400}}, {"inverse": "learned", "stage2": {"steps": 100}}
    write_record(rdir, variant_of(base, 0, 2000.0, short, {"stage2.steps": 100}))  # seed 0 with an override
    write_record(rdir, variant_of(base, 1, 500.0, default))  # seed 1 with the default config
    write_record(rdir, variant_of(base, 2, 600.0, default))
    old = {"inverse": "learned", "stage2": {"steps": 300}}  # an older spec's default
    write_record(rdir, variant_of(base, 4, 900.0, old, version=0))
    write_record(rdir, variant_of(base, 3, 950.0, old, version=0))
    write_record(rdir, variant_of(base, 3, 550.0, default))  # moves the seed-3 record above to the archive
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
        write_record(rdir, variant_of(base, seed, 900.0 + seed, older))
    write_record(rdir, variant_of(base, 0, 500.0, current))  # moves the older seed-0 record to the archive
    render_report(rdir, tmp_path / "report", registry={"denoise": spec})
    main, other = (tmp_path / "report" / "tiny" / "denoise.md").read_text().split("## Other configurations")
    assert table_rows(main)["Learned"][1] == "500.0 ± 0.1" and table_rows(main)["Learned"][2] == "1"
    assert "| Learned | stage2.precision=bf16 | 901.0 ± 0.1 |" in other  # labelled by how it differs from today's


# ----------------------------------------------------------------------------------------------------------------------
# verdicts on the paper's orderings


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


def test_an_order_stated_in_words_is_judged_in_place_of_fid() -> None:
    """A spec's paper `order` (TARFlow: "T = K best, T = 1 fails", one FID among three rows) orders the pairs, ranks
    and Kendall's tau; rows of equal order are not paired, the FID gap is shown only where both FIDs are known."""
    from biflow_bench.ablations import AblationSpec, Variant
    from biflow_bench.report.stats import kendall, overall, paper_pairs

    variants = {"t1": Variant("t1", {}, {"fid": 267.0, "order": 3}), "t2": Variant("t2", {}, {"order": 1}),
                "t4": Variant("t4", {}, {"order": 2}), "t8": Variant("t8", {}, {"order": 2}),
                "raw": Variant("raw", {}, {})}
    spec = AblationSpec(name="depth", version=1, title="t", paper_table="p", description="", baseline={},
                        variants=variants)
    df = pd.DataFrame({"variant": list(variants), "value": [30.0, 10.0, 20.0, 5.0, 1.0],
                       "value_std": [1.0] * 5, "label": list(variants), "metric": ["fd_effnet"] * 5,
                       "nfe_label": ["n"] * 5, "ms_per_image": [1.0] * 5, "paper_fid": [267.0] + [float("nan")] * 4})
    table = ablation_table(df, spec)
    ranks = table.set_index("variant")["paper_rank"]
    assert ranks[["t1", "t2", "t4", "t8"]].tolist() == [4, 1, 2, 2] and pd.isna(ranks["raw"])
    pairs = pair_verdicts(table, [])
    assert [(r.better, r.worse) for r in pairs.itertuples()] == [("t2", "t4"), ("t2", "t8"), ("t2", "t1"),
                                                                  ("t4", "t1"), ("t8", "t1")]
    assert list(pairs["ours"]) == ["reproduced", "reversed", "reproduced", "reproduced", "reproduced"]
    assert pairs["paper_gap"].isna().all()  # one FID: no gap in FID to show
    assert [(p.better, p.worse, p.kept) for p in paper_pairs(table)] == [(a, b, k) for a, b, k in zip(
        pairs["better"], pairs["worse"], [True, False, True, True, True])]
    assert kendall(table)[1] == 4  # the four ordered rows, not the raw one
    assert overall({"depth": table}).startswith("4 of the paper's 5 pairwise orderings hold")
    # without a stated order the same table is ordered by its one FID: nothing to pair
    assert pair_verdicts(ablation_table(df, None), []).empty


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


# ----------------------------------------------------------------------------------------------------------------------
# a page a reader can scan


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
