"""The study page (report/study.py): points averaged over seeds, each axis's best point against the centre."""

from __future__ import annotations

import pytest

from biflow_bench.report.study import axis_of, axis_summary, study_points


def _rec(variant: str, seed: int, mse: float, sens: float, recall: float = 0.1, fd_cls: float = 50.0) -> dict:
    return {"variant": variant, "seed": seed, "label": variant,
            "diagnostics": {"inverse_mse_clean": mse, "noise_sensitivity": sens, "noise_sigma_sq": 0.0025},
            "metrics": {"recall_effnet": recall, "fd_effnet": 100.0, "acc_cls": 0.5, "precision_effnet": 0.2,
                        "fd_cls": fd_cls},
            "timing": {"stage2_s": 120.0, "g_ms_batch1": 1.5}}


def test_axis_of_a_point_is_its_name_up_to_the_first_dash():
    assert [axis_of(v) for v in ("centre", "lr-3e-3", "steps-1600", "depth-2")] == ["centre", "lr", "steps", "depth"]


def test_points_average_seeds_and_each_axis_is_judged_against_the_centre():
    records = [_rec("centre", 0, 0.12, 0.2), _rec("centre", 1, 0.08, 0.4), _rec("lr-3e-3", 0, 0.05, 0.5),
               _rec("lr-1e-2", 0, 0.02, 0.6, recall=0.2), _rec("steps-1600", 0, 0.04, 0.3)]
    deltas = {"centre": {}, "lr-3e-3": {"stage2.lr": 3e-3}, "lr-1e-2": {"stage2.lr": 1e-2},
              "steps-1600": {"stage2.lr": 1e-2, "stage2.steps": 1600}}
    points = study_points(records, list(deltas), exact_recall=0.2, deltas=deltas)
    centre = points[0]
    assert centre["seeds"] == 2 and centre["diag.inverse_mse_clean"] == pytest.approx(0.10)
    assert centre["sigma2"] == pytest.approx(0.10 / 0.0025) and centre["train_min"] == pytest.approx(2.0)
    assert points[2]["recall_ratio"] == pytest.approx(1.0)
    # lr's best is 1e-2 (0.02), varied from the centre: 0.10 / 0.02 = x5, sensitivity 0.6 - 0.3; steps was varied
    # from lr-1e-2 (its delta less one key): 0.02 / 0.04 = x0.5, 0.3 - 0.6
    assert [p["base"] for p in points] == [None, "centre", "centre", "lr-1e-2"]
    assert axis_summary(points) == [["`lr`", "inverse MSE", "lr-1e-2", "centre", "x5.00", "+0.30"],
                                    ["`steps`", "inverse MSE", "steps-1600", "lr-1e-2", "x0.50", "-0.30"]]


def test_an_axis_is_judged_by_what_its_spec_names_and_varied_from_the_largest_part_of_its_delta():
    """A perceptual axis judged by fd_cls: its best point is the lowest fd_cls, not the lowest inverse MSE; a point
    two keys from the lr point (metric and a weight) is varied from the point one key from it, not from lr."""
    records = [_rec("lr-1e-2", 0, 0.02, 0.8, fd_cls=60.0), _rec("perceptual-both", 0, 0.03, 0.8, fd_cls=80.0),
               _rec("perceptual-weight", 0, 0.025, 0.8, fd_cls=48.0), _rec("perceptual-lpips", 0, 0.021, 0.8, fd_cls=90.0)]
    deltas = {"lr-1e-2": {"stage2.lr": 1e-2}, "perceptual-both": {"stage2.lr": 1e-2, "stage2.metric": "a+b"},
              "perceptual-weight": {"stage2.lr": 1e-2, "stage2.metric": "a+b", "stage2.w1": 0.2, "stage2.w2": 0.2},
              "perceptual-lpips": {"stage2.lr": 1e-2, "stage2.metric": "a"}}
    points = study_points(records, list(deltas), exact_recall=0.2, deltas=deltas)
    assert [p["base"] for p in points] == [None, "lr-1e-2", "perceptual-both", "lr-1e-2"]
    relabelled = study_points(records, list(deltas), exact_recall=0.2, deltas=deltas, labels={"lr-1e-2": "lr 1e-2"})
    assert [p["label"] for p in relabelled][:2] == ["lr 1e-2", "perceptual-both"]  # the spec's label over the record's
    assert axis_summary(points, {"perceptual": "fd_cls"})[1] == [
        "`perceptual`", "fd_cls", "perceptual-weight", "perceptual-both", "x1.67", "+0.00"]
    assert axis_summary(points)[1][:3] == ["`perceptual`", "inverse MSE", "perceptual-lpips"]


def test_every_judge_a_spec_may_name_is_one_the_page_knows():
    from biflow_bench.ablations import STUDY_JUDGES
    from biflow_bench.report.study import JUDGES

    assert set(JUDGES) == set(STUDY_JUDGES)


def test_a_study_spec_gets_its_own_page_and_an_index_line(tmp_path):
    """Records of a spec of kind "study" render as its study page (not an ablation table against the paper), listed
    under Studies in the report's README."""
    from biflow_bench.ablations import AblationSpec, Variant
    from biflow_bench.report.render import render_report
    from biflow_bench.results import write_record
    from report_records import make_record

    spec = AblationSpec(name="g-training", version=1, title="Which knob", paper_table="", baseline={}, kind="study",
                        variants={"centre": Variant("centre", {}), "lr-3e-3": Variant("lr-3e-3", {"stage2.lr": 3e-3})})
    for variant, mse in (("centre", 0.1), ("lr-3e-3", 0.05)):
        rec = make_record("g-training", variant, 0, 100.0, label=variant)
        rec["diagnostics"] = {"inverse_mse_clean": mse, "noise_sensitivity": 0.5, "noise_sigma_sq": 0.0025}
        write_record(tmp_path / "results", rec)
    render_report(tmp_path / "results", tmp_path / "report", registry={"g-training": spec})
    page = (tmp_path / "report" / "tiny" / "g-training.md").read_text()
    assert "| `lr` | inverse MSE | lr-3e-3 | centre | x2.00 | +0.00 |" in page and (tmp_path / "report" / "tiny" / "g-training.png").is_file()
    index = (tmp_path / "report" / "README.md").read_text()
    assert "### Studies" in index and "[Which knob](tiny/g-training.md)" in index
    assert not (tmp_path / "report" / "tiny" / "g-training.csv").exists()  # no ablation table was written
