"""Guided rows at their best w (the sweep's bookkeeping in records and the report) and the norm-control
measurements (trajectory RMS, pre-clip parameter percentiles) against plain references."""

from __future__ import annotations

import types

import numpy as np
import torch

from conftest import randomize, small_flow

from biflow_bench.ablations import load_registry
from biflow_bench.config import scale_config
from biflow_bench.metrics.flow_norms import flow_norms
from biflow_bench.models.layers import guidance_weights
from biflow_bench.report.figures import guidance_curves
from biflow_bench.report.render import render_report
from biflow_bench.report.frames import load_results
from biflow_bench.results import write_record
from biflow_bench.sample import guidance_scales
from report_records import make_record


def test_annealed_guidance_weight_grows_linearly_to_the_last_token():
    # TARFlow sec. 2.6: the exact inverse decoding token t = 1..N-1 extrapolates with w_t = w t / (N - 1)
    n, w = 5, 2.0
    assert guidance_weights(w, n, annealed=True) == [w * t / (n - 1) for t in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 2.0]
    assert guidance_weights(w, n, annealed=False) == [2.0, 2.0, 2.0, 2.0]


def test_guided_rows_sweep_and_unguided_rows_do_not():
    registry = load_registry()
    sweep = (0.0, 0.5, 1.0, 2.0, 4.0)  # ablations/_base.toml
    for ablation, variant in (("main", "itarflow"), ("main", "biflow"), ("main", "biflow-mse"),
                              ("training-cfg", "training-time"), ("training-cfg", "inference")):
        assert guidance_scales(registry[ablation].resolve(variant, "small")) == sweep, (ablation, variant)
    assert guidance_scales(registry["main"].resolve("itarflow-jacobi", "small")) == (1.0,)  # the serial samples' w
    for ablation, variant in (("training-cfg", "none"), ("denoise", "learned"), ("inverse-strategy", "exact")):
        assert guidance_scales(registry[ablation].resolve(variant, "small")) == (0.0,)
    assert guidance_scales(scale_config("tiny")) == (0.0,)


def test_main_table_has_the_papers_three_rows():
    main = load_registry()["main"]
    assert {v: main.variants[v].paper["fid"] for v in main.variants if "fid" in main.variants[v].paper} == \
        {"itarflow": 6.83, "biflow-mse": 6.79, "biflow": 2.39}
    assert main.resolve("itarflow-jacobi", "small").sample.decoder == "jacobi"
    assert main.resolve("biflow", "small").stage2.metric == "mse+lpips+convnext"
    assert main.resolve("biflow-mse", "small").stage2.metric == "mse"


def _guided_record(variant: str, curve: list[tuple[float, float]], seed: int = 0) -> dict:
    best_w, best = min(curve, key=lambda p: p[1])
    record = make_record("training-cfg", variant, seed, best, label=variant)
    record["config_hash"] = f"h{variant}"  # one config, two seeds
    record["guidance"] = {"scales": [w for w, _ in curve], "best_w": best_w, "selected_by": "fd_effnet",
                          "curve": [{"w": w, "metrics": {"fd_effnet": v}, "ms_per_image": 1.0} for w, v in curve]}
    return record


def test_report_shows_best_w_and_draws_metric_against_w(tmp_path):
    rdir = tmp_path / "results"
    write_record(rdir, _guided_record("training-time", [(0.0, 9.0), (1.0, 5.0), (2.0, 7.0)]))
    extended = _guided_record("training-time", [(0.0, 8.0), (1.0, 6.0), (2.0, 4.0)], seed=1)
    extended["guidance"].update(extended=[2.0], note="guidance sweep extended to w = 2: its best w was its largest")
    write_record(rdir, extended)
    write_record(rdir, make_record("training-cfg", "none", 0, 10.0, label="none"))
    df, _ = load_results(rdir)
    curves = guidance_curves(df, ["training-time", "none"])
    assert curves == {"training-time": ([0.0, 1.0, 2.0], [8.5, 5.5, 5.5])}  # averaged over the two seeds
    render_report(rdir, tmp_path / "report", registry={})
    md = (tmp_path / "report" / "tiny" / "training-cfg.md").read_text()
    assert "Best w" in md and "| 1/2 |" in md  # the two seeds' best w
    assert "- guidance sweep extended to w = 2: its best w was its largest" in md  # the record's note, under Notes
    assert (tmp_path / "report" / "tiny" / "training-cfg-guidance.png").stat().st_size > 1000


@torch.no_grad()
def test_flow_norms_against_a_plain_reference():
    flow = small_flow(torch.float32, clip=0.5)
    randomize(flow, scale=2.0)
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    got = flow_norms(flow, x, y, batch_size=4)  # two batches: sums must be pooled, not averaged per batch
    trajectory = flow(x, y).trajectory
    assert len(got["trajectory_rms"]) == len(trajectory) == 4
    for a, t in zip(got["trajectory_rms"], trajectory):
        assert abs(a - float(t.pow(2).mean().sqrt())) < 1e-5
    raw = []
    for k, block in enumerate(flow.blocks):  # the pre-clip parameters, recomputed by hand through the block
        seq = block._order(flow._tokens(trajectory[k]))
        h = block._embed(seq, 0, y)
        for layer in block.layers:
            h = layer(h)
        alpha, mu = block.proj_out(block.norm_out(h))[:, :-1].chunk(2, dim=-1)
        raw += [alpha.abs().flatten(), mu.abs().flatten()]
        assert abs(got["blocks"][k]["alpha"]["max"] - float(alpha.abs().max())) < 1e-5
        assert abs(got["blocks"][k]["mu"]["p90"] - float(np.percentile(mu.abs().flatten().numpy(), 90))) < 1e-5
    values = torch.cat(raw)
    assert got["clip"] == 0.5
    assert abs(got["clip_percentile"] - float((values < 0.5).float().mean() * 100)) < 1e-6
    assert 0 < got["clip_percentile"] < 100  # this flow's clip binds on some parameters
    assert not any(block.proj_out._forward_hooks for block in flow.blocks)  # hooks removed


def test_norm_section_compares_variants_with_different_flows(tmp_path):
    rdir = tmp_path / "results"
    for variant, clip, rms in (("clip", 3.0, [1.0, 0.9, 1.1]), ("none", None, [1.0, 2.5, 7.0])):
        record = make_record("norm-control", variant, 0, 5.0, label=variant)
        record["flow_norms"] = {"trajectory_rms": rms, "clip": clip, "clip_percentile": 97.5 if clip else None,
                                "blocks": [{"alpha": {"p99": 1.5}, "mu": {"p99": 2.5}}]}
        write_record(rdir, record)
    render_report(rdir, tmp_path / "report", registry={})
    md = (tmp_path / "report" / "tiny" / "norm-control.md").read_text()
    assert "What norm control acted on" in md and "97.5" in md and "7.00" in md


def _fake_sweep(monkeypatch, sweep, fd_of_w, inverse="exact", **cfg_fields):
    """runner.sweep_guidance over a fake run (the exact inverse unless told) whose fd_effnet at guidance w is
    fd_of_w(w): no model, no data."""
    import biflow_bench.runner as runner

    cfg = types.SimpleNamespace(sample=types.SimpleNamespace(cfg_scale=1.0, cfg_sweep=tuple(sweep)), inverse=inverse,
                                **cfg_fields)
    monkeypatch.setattr(runner, "sample_variant", lambda t, seed, cfg_scale, env: (torch.tensor([cfg_scale]), 1.0))
    monkeypatch.setattr(runner, "evaluate", lambda t, images, *a, **k: {"fd_effnet": fd_of_w(float(images[0]))})
    guidance, images = runner.sweep_guidance(types.SimpleNamespace(cfg=cfg), 0, None)
    return guidance, float(images[0])


def test_a_sweep_whose_best_w_is_its_edge_extends_until_the_curve_turns(monkeypatch):
    sweep = [0.0, 0.5, 1.0, 2.0, 4.0]
    # still falling at 4: doubled to 8 (better), then 16 (worse): the curve turned, best w 8
    guidance, best_images_w = _fake_sweep(monkeypatch, sweep, lambda w: (w - 9.0) ** 2)
    assert guidance["extended"] == [8.0, 16.0] and guidance["best_w"] == 8.0 == best_images_w
    assert [p["w"] for p in guidance["curve"]] == sweep + [8.0, 16.0] and guidance["scales"] == sweep
    assert "extended to w = 8, 16" in guidance["note"] and "turns after w = 8" in guidance["note"]
    # still falling at the cap: stops there and says so
    guidance, _ = _fake_sweep(monkeypatch, sweep, lambda w: -w)
    assert guidance["extended"] == [8.0, 16.0] and guidance["best_w"] == 16.0
    assert "has not turned" in guidance["note"]
    # a G trained with training-time CFG on w <= cfg_max is not asked for more
    trained = dict(inverse="learned", backward=types.SimpleNamespace(cfg_mode="training-time"),
                   stage2=types.SimpleNamespace(cfg_max=7.0))
    guidance, _ = _fake_sweep(monkeypatch, sweep, lambda w: -w, **trained)
    assert guidance["extended"] == [7.0] and guidance["best_w"] == 7.0
    # best inside the sweep, or a single w (not a sweep): nothing added
    for points, fd in ((sweep, lambda w: (w - 1.0) ** 2), ([1.0], lambda w: -w)):
        guidance, _ = _fake_sweep(monkeypatch, points, fd)
        assert [p["w"] for p in guidance["curve"]] == points and "extended" not in guidance and "note" not in guidance
