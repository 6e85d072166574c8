"""The 1-NFE comparison's cost section (report/one_nfe.py): training FLOPs from the budget a peer's record keeps,
the FLOP axis of the curves, the speed rows, and the page it lands on."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from biflow_bench.report.one_nfe import budget_of, compute_curves, cost_rows, steps_points, training_cost

BUDGET = {"flops_per_step": {"flow": 10, "backward": 4, "meanflow": 7}, "biflow_flops": 10 * 100 + 4 * 20,
          "peer_steps": {"meanflow": 154}}


def _rec(variant: str, train: dict, metric: str = "mse", **extra) -> dict:
    return {"variant": variant, "train": train, "config": {"stage2": {"metric": metric}, "peer": {"kind": "meanflow"},
                                                           "stage1": {"steps": 100}}, **extra}


def test_training_cost_counts_each_rows_own_steps():
    f = {"steps": 100, "seconds": 60.0}
    g = {"steps": 20, "seconds": 30.0}
    assert training_cost(_rec("itarflow", {"stage1": f}), BUDGET) == (1000, 60.0, False)
    assert training_cost(_rec("biflow-mse", {"stage1": f, "stage2": g}), BUDGET) == (1080, 90.0, False)
    # the perceptual G spends more than the MSE G the budget counts: a lower bound
    assert training_cost(_rec("biflow", {"stage1": f, "stage2": g}, "mse+lpips"), BUDGET) == (1080, 90.0, True)
    peer = _rec("meanflow-1", {"peer": {"steps": 154, "seconds": 80.0}, "budget": BUDGET})
    assert training_cost(peer, BUDGET) == (154 * 7, 80.0, False)
    assert budget_of([_rec("itarflow", {"stage1": f}), peer]) == BUDGET
    # each peer's record counts its own step: the budget merges them
    other = {**BUDGET, "flops_per_step": {"flow": 10, "backward": 4, "flow-matching": 3}}
    merged = budget_of([peer, _rec("flow-matching-1", {"peer": {"steps": 360, "seconds": 1.0}, "budget": other})])
    assert merged["flops_per_step"] == {"flow": 10, "backward": 4, "meanflow": 7, "flow-matching": 3}
    flops, _, _ = training_cost(peer, None)  # no budget recorded yet: unknown, not zero
    assert math.isnan(flops)


def test_cost_rows_read_the_speed_row_of_each_sampler_and_average_seeds():
    recs = [_rec("meanflow-1", {"peer": {"steps": 154, "seconds": s}, "budget": BUDGET}, nfe=1,
                 params={"flow": 0, "backward": 900}) for s in (60.0, 120.0)]
    table = pd.DataFrame([{"variant": "meanflow-1", "label": "MF", "nfe_label": "1", "ours": 5.0, "ours_std": 1.0}])
    speed = pd.DataFrame([{"sampler": "meanflow-1", "batch_size": b, "ms_per_image": ms} for b, ms in ((1, 2.0),
                                                                                                      (256, 0.5))])
    row = cost_rows(recs, table, speed).iloc[0]
    assert (row["minutes"], row["flops"], row["params"], row["ms_1"], row["ms_256"]) == (1.5, 1078, 900, 2.0, 0.5)


def test_curves_put_g_after_fs_whole_run_and_take_the_best_w():
    points = [{"step": s, "w": w, "metrics": {"fd_effnet": v}} for s, w, v in ((10, 0.0, 9.0), (10, 1.0, 7.0),
                                                                               (20, 0.0, 5.0), (20, 1.0, 6.0))]
    curves = [{"variant": v, "seed": 0, "config": {"stage1": {"steps": 100}}, "points": points}
              for v in ("flow", "backward", "meanflow", "flow-matching")]
    out = compute_curves(curves, BUDGET, "fd_effnet")
    assert out["iTARFlow (F, exact inverse), seed 0"] == [(100, 7.0), (200, 5.0)]
    assert out["BiFlow (G after F), seed 0"] == [(1000 + 40, 7.0), (1000 + 80, 5.0)]
    assert out["MeanFlow, seed 0"] == [(70, 7.0), (140, 5.0)]
    assert "flow matching, seed 0" not in out  # no FLOPs per step for it in the budget: left out, not guessed


def test_steps_points_average_seeds_per_solver_and_nfe():
    recs = [{"config": {"sample": {"solver": solver}}, "nfe": nfe, "metric": "fd_effnet",
             "metrics": {"fd_effnet": v}} for solver, nfe, v in (("euler", 2, 10.0), ("euler", 2, 12.0),
                                                                  ("euler", 4, 8.0), ("heun", 6, 7.0))]
    assert steps_points(recs) == {"euler": [(2.0, 11.0), (4.0, 8.0)], "heun": [(6.0, 7.0)]}


@pytest.mark.parametrize("variant", ["itarflow", "biflow"])
def test_params_are_the_sampling_networks(variant):
    params = {"flow": 490, "backward": 0 if variant == "itarflow" else 870}
    recs = [_rec(variant, {"stage1": {"steps": 100, "seconds": 1.0}}, params=params, nfe=1)]
    table = pd.DataFrame([{"variant": variant, "label": variant, "nfe_label": "1", "ours": 1.0, "ours_std": 0.1}])
    row = cost_rows(recs, table, pd.DataFrame(columns=["sampler", "batch_size", "ms_per_image"])).iloc[0]
    assert row["params"] == (490 if variant == "itarflow" else 870)
    assert math.isnan(row["ms_1"])


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_the_steps_study_samples_the_one_nfe_tables_flow_matching_model(scale):
    """The steps study (ablations/flow-matching-steps.toml) is the one-nfe table's trained flow-matching peer with
    other samplers: the same cache key, so it trains nothing of its own."""
    from pathlib import Path

    from biflow_bench.ablations import get_spec
    from biflow_bench.training.budget import resolved_peer
    from biflow_bench.training.cache import peer_dir

    def home(table: str, variant: str) -> Path:
        cfg = get_spec(table).resolve(variant, scale)
        return peer_dir(Path("cache"), cfg, resolved_peer(cfg), 0)

    table = home("one-nfe", "flow-matching-32")
    study = get_spec("flow-matching-steps")
    assert {home("flow-matching-steps", v) for v in (list(study.variants)[:1] if scale == "small" else study.variants)} \
        == {table}
