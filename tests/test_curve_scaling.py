"""Quality against training time (curve.py, `bench curve`) and speed-up against serial steps (speed/scaling.py,
`bench scaling`): the flattening rule by hand, a tiny run of each end to end, their report pages, their CLI checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from biflow_bench.config import ConfigError, apply_delta, scale_config
from biflow_bench.curve import checkpoint_curve, curve_record, flattening, kept_checkpoints, training_curve
from biflow_bench.data import dataset_splits
from biflow_bench.report.render import render_report
from biflow_bench.results import scan_records, write_record
from biflow_bench.speed.scaling import scaling_record, scaling_rows
from biflow_bench.training.cache import get_flow, get_peer, peer_dir
from biflow_bench.training.loop import doubling
from biflow_bench.training.stages import train_backward, train_flow


def _points(values: dict[int, tuple[float, float]], w: float = 0.0, key: str = "fd_effnet") -> list[dict]:
    return [{"step": s, "train_s": 6.0 * s, "images_seen": s, "w": w, "metrics": {key: v, f"{key}_std": sd}}
            for s, (v, sd) in values.items()]


def test_flattening_golden():
    # 100 -> 200 gains 30 (> noise 5), 200 -> 400 gains 20 (> 4), 400 -> 800 gains 2 (<= 3): flat from step 400
    pts = _points({100: (100.0, 5.0), 200: (70.0, 4.0), 400: (50.0, 3.0), 800: (48.0, 3.0)})
    assert flattening(pts, "fd_effnet", 0.0) == {"step": 400, "to_step": 800, "gain": 2.0, "noise": 3.0}
    assert flattening(pts[:3], "fd_effnet", 0.0) is None  # every doubling paid
    assert flattening(pts, "fd_effnet", 1.0) is None  # no points at that w
    # higher is better: 0.5 -> 0.7 pays (0.2 > 0.01), 0.7 -> 0.705 does not (0.005 <= 0.01)
    acc = _points({10: (0.5, 0.01), 20: (0.7, 0.01), 40: (0.705, 0.01)}, key="acc_cls")
    flat = flattening(acc, "acc_cls", 0.0, higher_is_better=True)
    assert flat["step"] == 20 and flat["to_step"] == 40 and flat["gain"] == pytest.approx(0.005)
    # a step whose half-step has no point is compared with the last point before it: 30 against 10 (<= 15)
    odd = _points({10: (9.0, 1.0), 30: (8.5, 1.0)})
    assert flattening(odd, "fd_effnet", 0.0) == {"step": 10, "to_step": 30, "gain": 0.5, "noise": 1.0}


@pytest.mark.parametrize("stage", ["flow", "backward", "peer"])
def test_tiny_curve_scores_snapshots_and_renders(stage: str, tmp_path: Path):
    # F under cosine decay, G and the peer under the constant schedule: the page says which a point stands for
    cfg = apply_delta(scale_config("tiny"), {"stage1.steps": 20, "stage2.steps": 20, "eval.num_real": 60,
                                             "stage1.schedule": "cosine", "stage2.schedule": "constant",
                                             "peer.steps": 20, "peer.equal_compute": False,
                                             "peer.schedule": "constant",
                                             "inverse": "peer" if stage == "peer" else "learned"})
    body = training_curve(cfg, stage, 0, every=10, scales=(0.0, 1.0), num=40, cache_dir=tmp_path / "cache",
                          progress=False)
    assert [(p["step"], p["w"]) for p in body["points"]] == [(10, 0.0), (10, 1.0), (20, 0.0), (20, 1.0)]
    trained = {"flow": cfg.stage1, "backward": cfg.stage2, "peer": cfg.peer}[stage]
    batch = trained.batch_size
    assert all(p["images_seen"] == p["step"] * batch for p in body["points"])
    assert all({"fd_effnet", "acc_cls", "acc_cls_std"} <= set(p["metrics"]) for p in body["points"])
    assert ("bpd" in body["points"][0]["metrics"]) == (stage == "flow")  # F's likelihood, once per point
    assert body["points"][0]["train_s"] < body["points"][2]["train_s"]
    path = write_record(tmp_path / "results", curve_record(cfg, 0, body))
    variant = "meanflow" if stage == "peer" else stage  # a peer's curve is named by its kind
    assert path == tmp_path / "results" / "tiny" / "curve" / f"{variant}__seed0.json"
    assert scan_records(tmp_path / "results")[1] == []  # a valid record
    render_report(tmp_path / "results", tmp_path / "report", registry={})
    page = (tmp_path / "report" / "tiny" / "curves.md").read_text()
    assert "![" in page and (tmp_path / "report" / "tiny" / f"curve-{variant}-seed0.png").is_file()
    assert "| 20 |" in page and "`fd_effnet` at w = 0:" in page
    assert (f"Learning rate {trained.lr:g} with cosine decay over the whole run (20 steps)" in page) == (stage == "flow")
    assert (f"constant after a {trained.warmup}-step warm-up" in page) == (stage != "flow")
    assert "[Quality against training time](tiny/curves.md)" in (tmp_path / "report" / "README.md").read_text()


def test_curve_from_checkpoints_matches_the_curve_of_a_fresh_run(tmp_path: Path):
    # a run's kept checkpoint (step 10 of 20) scores exactly as the fresh curve's snapshot at step 10: training and
    # sampling are seeded, so the weights and the samples are the same; the last point is the cached model
    cfg = apply_delta(scale_config("tiny"), {"stage1.steps": 20, "stage1.checkpoint_every": 10, "eval.num_real": 60})
    fresh = training_curve(cfg, "flow", 0, every=10, scales=(0.0,), num=40, cache_dir=tmp_path / "c1",
                           progress=False)
    kept = tmp_path / "kept"
    kept.mkdir()
    train_flow(cfg, dataset_splits(cfg.dataset, None).train,
               kept / "checkpoint.pt", progress=False)  # a 20-step run leaves its step-10 checkpoint
    body = checkpoint_curve(cfg, "flow", 0, [kept / "checkpoint.pt"], (0.0,), 40, cache_dir=tmp_path / "c2",
                            progress=False)
    assert [p["step"] for p in body["points"]] == [10, 20] and body["checkpoints"] == 1
    for a, b in zip(fresh["points"], body["points"], strict=True):
        assert a["metrics"]["fd_effnet"] == pytest.approx(b["metrics"]["fd_effnet"], rel=1e-5)
        assert a["metrics"]["bpd"] == pytest.approx(b["metrics"]["bpd"], rel=1e-6)
    assert 0 < body["points"][0]["train_s"] < body["points"][1]["train_s"]
    write_record(tmp_path / "results", curve_record(cfg, 0, body))
    render_report(tmp_path / "results", tmp_path / "report", registry={})
    assert "1 training checkpoints" in (tmp_path / "report" / "tiny" / "curves.md").read_text()
    other = apply_delta(cfg, {"flow.channels": 2 * cfg.flow.channels})
    with pytest.raises(ConfigError, match="do not fit the flow of this config"):
        checkpoint_curve(other, "flow", 0, [kept / "checkpoint.pt"], (0.0,), 40, cache_dir=tmp_path / "c2",
                         progress=False)


def test_scaling_rows_count_serial_steps_and_render(tmp_path: Path):
    rows = scaling_rows((4, 8), batch=1, repeats=1, warmup=0, scale="tiny-latent")
    assert [(r["tokens"], r["blocks"]) for r in rows] == [(4, 4), (16, 4)]
    assert [r["serial_steps"] for r in rows] == [4 * 3, 4 * 15]  # blocks x (tokens - 1)
    for r in rows:
        assert r["speedup"] == pytest.approx(r["ms_exact"] / r["ms_learned"])
        assert r["flop_ratio"] == pytest.approx(r["flops_exact"] / r["flops_learned"]) and r["flop_ratio"] > 1
    assert rows[1]["flops_exact"] > rows[0]["flops_exact"]
    write_record(tmp_path / "results", scaling_record(rows))
    render_report(tmp_path / "results", tmp_path / "report", registry={})
    page = (tmp_path / "report" / "paper" / "speed-scaling.md").read_text()
    assert "| 8 | 16 | 60 |" in page and (tmp_path / "report" / "paper" / "speed-scaling.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["bench", "curve", "flw"], "stage 'flw': use one of flow, backward, peer; did you mean 'flow'?"),
    (["bench", "curve", "flow", "--every", "0"], "--every 0: must be a positive integer"),
    (["bench", "curve", "flow", "--w", "a,b"], "--w 'a,b': expected comma-separated numbers"),
    (["bench", "curve", "flow", "--set", "stage1.steps=x"], "stage1.steps"),
    (["bench", "curve", "peer", "--variant", "one-nfe/nope", "--kept"], "unknown variant 'nope' of ablation 'one-nfe'"),
    (["bench", "curve", "flow", "--kept"], "--kept: only a peer's run keeps its checkpoints"),
    (["bench", "curve", "peer", "--kept", "--variant", "one-nfe/meanflow-1", "--seed", "7"], "no kept checkpoints"),
    (["bench", "scaling", "--sides", "7"], "--sides '7': each side must be an even integer"),
    (["bench", "scaling", "--repeats", "0"], "--repeats 0: must be a positive integer"),
])
def test_curve_and_scaling_options_fail_in_one_line(args, message, capsys, monkeypatch):
    from biflow_bench import cli

    monkeypatch.setattr("sys.argv", ["biflow-bench", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_benchmarks_run_on_rank_zero_alone(tmp_path: Path, monkeypatch):
    """Under torchrun a benchmark times one process: every other rank checks its options and leaves, writing nothing."""
    from biflow_bench import cli

    monkeypatch.setenv("RANK", "1")
    for args in (["bench", "scaling", "--sides", "4"], ["bench", "curve", "flow", "--scale", "tiny"],
                 ["bench", "speed", "--scale", "tiny"]):
        monkeypatch.setattr("sys.argv", ["biflow-bench", *args, "--results-dir", str(tmp_path / "r")])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code in (0, None)
    assert not any(p.is_file() for p in (tmp_path / "r").rglob("*"))


def test_curve_from_checkpoints_of_g_scores_their_ema_weights(tmp_path: Path):
    # G's kept checkpoint is scored by its EMA weights, exactly as the fresh curve's snapshot at the same step
    cfg = apply_delta(scale_config("tiny"), {"stage1.steps": 20, "stage2.steps": 20, "stage2.checkpoint_every": 10,
                                             "eval.num_real": 60})
    fresh = training_curve(cfg, "backward", 0, every=10, scales=(0.0,), num=40, cache_dir=tmp_path / "c",
                           progress=False)
    splits = dataset_splits(cfg.dataset, None)
    (tmp_path / "kept").mkdir()
    train_backward(cfg, get_flow(cfg, splits.train, tmp_path / "c", False)[0], splits.train, 0,
                   tmp_path / "kept" / "checkpoint.pt", False)
    body = checkpoint_curve(cfg, "backward", 0, [tmp_path / "kept" / "checkpoint.pt"], (0.0,), 40,
                            cache_dir=tmp_path / "c", progress=False)
    assert [p["step"] for p in body["points"]] == [10, 20]
    for a, b in zip(fresh["points"], body["points"], strict=True):
        assert a["metrics"]["fd_effnet"] == pytest.approx(b["metrics"]["fd_effnet"], rel=1e-6)


def test_a_peer_keeps_checkpoints_at_a_doubling_schedule_and_they_score_as_a_fresh_curve(tmp_path: Path):
    # the kept steps do not depend on the run's length (a quarter of checkpoint_every, doubling); the final step is
    # the cached model's, not a kept file
    assert [s for s in range(1, 1100) if doubling(125)(s)] == [125, 250, 500, 1000]
    cfg = apply_delta(scale_config("tiny"), {"inverse": "peer", "peer.steps": 20, "peer.equal_compute": False,
                                             "peer.checkpoint_every": 20, "eval.num_real": 60})
    fresh = training_curve(cfg, "peer", 0, every=5, scales=(0.0,), num=40, cache_dir=tmp_path / "c1", progress=False)
    splits = dataset_splits(cfg.dataset, None)
    get_peer(cfg, cfg.peer, 0, splits.train, tmp_path / "c2", progress=False)
    kept = sorted(peer_dir(tmp_path / "c2", cfg, cfg.peer, 0).glob("checkpoint-*.pt"))
    assert [p.name for p in kept] == ["checkpoint-0000005.pt", "checkpoint-0000010.pt"]
    assert kept_checkpoints(cfg, 0, tmp_path / "c2") == kept  # what `bench curve peer --kept` scores
    with pytest.raises(ConfigError, match="no kept checkpoints"):
        kept_checkpoints(cfg, 1, tmp_path / "c2")  # another seed: not trained
    body = checkpoint_curve(cfg, "peer", 0, kept, (0.0,), 40, cache_dir=tmp_path / "c2", progress=False)
    assert [p["step"] for p in body["points"]] == [5, 10, 20]
    by_step = {p["step"]: p["metrics"]["fd_effnet"] for p in fresh["points"]}
    for p in body["points"]:  # the EMA's weights, as the fresh curve's snapshots
        assert p["metrics"]["fd_effnet"] == pytest.approx(by_step[p["step"]], rel=1e-6)
