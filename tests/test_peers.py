"""The 1-NFE peers' formulas (models/flow_matching.py, models/meanflow.py, training/peer_losses.py) against plainly
written references on tiny tensors: the flow-matching path, loss and solvers, MeanFlow's (r, t) draw, its guided
target field, the identity's target through a JVP, its loss and its 1- and 2-step sampler; and their sizes beside G."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from biflow_bench.config import SCALES
from biflow_bench.metrics.likelihood import count_params
from biflow_bench.models.biflow import BiFlow
from biflow_bench.models.flow_matching import FlowMatching, FlowMatchingConfig
from biflow_bench.models.meanflow import MeanFlow, MeanFlowConfig
from biflow_bench.training.peer_losses import (flow_matching_loss, guided_velocity, meanflow_loss, meanflow_target,
                                               sample_times)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in model.parameters():  # the read-out starts at zero: give every weight a value
        p.data.normal_(0, 0.05)
    return model


class LinearField(FlowMatching):
    """v(z, t, y) = 0.5 z + t + 0.3 [y is a real class]: solvers checked by hand."""

    def forward(self, z, t, y=None):
        real = torch.zeros(z.shape[0]) if y is None else (y != self.config.num_classes).float()
        return 0.5 * z + t.view(-1, 1, 1, 1) + 0.3 * real.view(-1, 1, 1, 1)


def test_flow_matching_loss_is_the_velocity_regression_on_the_linear_path():
    model = _randomize(FlowMatching(FlowMatchingConfig(num_classes=10)))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    loss = flow_matching_loss(model, x, y, torch.Generator().manual_seed(3), label_drop=0.5)
    gen = torch.Generator().manual_seed(3)  # the same draws, in the same order
    eps, t = torch.randn(x.shape, generator=gen), torch.rand(4, generator=gen)
    dropped = torch.rand(4, generator=gen) < 0.5
    y_ref = torch.where(dropped, torch.full_like(y, 10), y)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(loss, ((model(z, t, y_ref) - (eps - x)) ** 2).mean())


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_flow_matching_solvers_and_guidance_by_hand(solver):
    model = LinearField(FlowMatchingConfig(num_classes=10))
    z1, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])

    def v(z, t, w):  # (1 + w) v_c - w v_u of LinearField
        return 0.5 * z + t + (1 + w) * 0.3

    for w in (0.0, 2.0):
        z, times = z1.clone(), [1.0, 0.5, 0.0]
        for t, s in zip(times[:-1], times[1:]):
            step = v(z, t, w) if solver == "euler" else 0.5 * (v(z, t, w) + v(z + (s - t) * v(z, t, w), s, w))
            z = z + (s - t) * step
        torch.testing.assert_close(model.sample(z1, y, steps=2, solver=solver, cfg_scale=w), z)
    assert model.nfe(8, solver, 1.0) == 8 * (2 if solver == "heun" else 1) * 2
    for bad in ({"steps": 0}, {"solver": "rk4"}):
        with pytest.raises(ValueError, match="steps >= 1 and a solver of euler, heun"):
            model.sample(z1, y, **bad)


class QuadraticMean(MeanFlow):
    """u(z, r, t | y, w) = t z + r^2 + 0.1 y + 0.2 w: the identity's terms known in closed form."""

    def forward(self, z, r, t, y=None, w=None):
        k = lambda a: a.view(-1, 1, 1, 1).to(z.dtype)  # noqa: E731
        return k(t) * z + k(r) ** 2 + 0.1 * k(y) + 0.2 * k(w if w is not None else torch.zeros_like(t))


def test_meanflow_target_is_the_identity_with_the_total_derivative():
    model = QuadraticMean(MeanFlowConfig(num_classes=10))
    z, v = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    r, t, y, w = torch.tensor([0.1, 0.2, 0.5]), torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 2, 3]), torch.rand(3)
    u, target = meanflow_target(model, z, r, t, v, y, w)
    k = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    dudt = k(t) * v + z  # v . d_z u + d_t u of t z + r^2 + ...
    torch.testing.assert_close(u, model(z, r, t, y, w))
    torch.testing.assert_close(target, v - k(t - r) * dudt)  # r = t (second row): plain flow matching, u_tgt = v
    assert not target.requires_grad


def test_meanflow_target_of_the_network_matches_finite_differences():
    model = _randomize(MeanFlow(MeanFlowConfig(num_classes=10))).double()
    z, v = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    r, t = torch.tensor([0.2, 0.0], dtype=torch.float64), torch.tensor([0.6, 1.0], dtype=torch.float64)
    y, w = torch.tensor([4, 10]), torch.tensor([1.5, 0.0], dtype=torch.float64)
    u, target = meanflow_target(model, z, r, t, v, y, w)
    h = 1e-5
    with torch.no_grad():  # d/dtau u(z + tau v, r, t + tau) at tau = 0
        dudt = (model(z + h * v, r, t + h, y, w) - model(z - h * v, r, t - h, y, w)) / (2 * h)
    torch.testing.assert_close(target, v - (t - r).view(-1, 1, 1, 1) * dudt, rtol=1e-6, atol=1e-8)
    u.sum().backward()  # the prediction keeps its graph: the loss trains the network through u
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_guided_velocity_mixes_the_models_own_fields():
    model = QuadraticMean(MeanFlowConfig(num_classes=10))
    z, v, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8])
    y, w = torch.tensor([2, 10]), torch.tensor([3.0, 0.0])  # the second row's label dropped: w = 0
    u_c = t.view(-1, 1, 1, 1) * z + t.view(-1, 1, 1, 1) ** 2 + 0.1 * y.view(-1, 1, 1, 1) + 0.2 * w.view(-1, 1, 1, 1)
    u_u = t.view(-1, 1, 1, 1) * z + t.view(-1, 1, 1, 1) ** 2 + 0.1 * 10
    expected = v + (1 - 1 / (1 + w)).view(-1, 1, 1, 1) * (u_c - u_u)
    got = guided_velocity(model, z, t, v, y, w)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[1], v[1])  # no guidance: the path's own velocity


def test_sample_times_sorted_logit_normal_with_a_share_of_equal_pairs():
    like = torch.zeros(1)
    r, t = sample_times(6, -0.4, 1.0, 0.25, torch.Generator().manual_seed(1), like)
    gen = torch.Generator().manual_seed(1)
    a = torch.sigmoid(-0.4 + torch.randn(6, generator=gen))
    b = torch.sigmoid(-0.4 + torch.randn(6, generator=gen))
    same = torch.rand(6, generator=gen) >= 0.25
    b = torch.where(same, a, b)
    torch.testing.assert_close(r, torch.minimum(a, b))
    torch.testing.assert_close(t, torch.maximum(a, b))
    r, t = sample_times(20_000, -0.4, 1.0, 0.25, torch.Generator().manual_seed(2), like)
    assert (r <= t).all() and abs(float((r != t).float().mean()) - 0.25) < 0.02


def test_meanflow_loss_is_the_adaptive_weighted_identity_error():
    model = _randomize(MeanFlow(MeanFlowConfig(num_classes=10)))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    kw = dict(interval_share=0.5, label_drop=0.25, cfg_max=7.0, adaptive_c=0.01, adaptive_p=0.5)
    terms: dict[str, float] = {}
    loss = meanflow_loss(model, x, y, torch.Generator().manual_seed(4), **kw, terms=terms)
    gen = torch.Generator().manual_seed(4)  # the same draws, in the same order
    eps = torch.randn(x.shape, generator=gen)
    r, t = sample_times(4, -0.4, 1.0, 0.5, gen, x)
    k = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    z = (1 - k(t)) * x + k(t) * eps
    dropped = torch.rand(4, generator=gen) < 0.25
    w = torch.where(dropped, 0.0, torch.expm1(torch.rand(4, generator=gen) * torch.log1p(torch.tensor(7.0))))
    y_in = torch.where(dropped, 10, y)
    v = guided_velocity(model, z, t, eps - x, y_in, w)
    u, target = meanflow_target(model, z, r, t, v, y_in, w)
    d = ((u - target) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(loss, (d / (d.detach() + 0.01) ** 0.5).mean())
    assert terms["error"] == pytest.approx(float(d.detach().sum() / x.numel()), rel=1e-5)  # logged: per value


def test_meanflow_samples_in_one_or_two_jumps():
    model = QuadraticMean(MeanFlowConfig(num_classes=10))
    z1, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 5])
    k = lambda a: torch.tensor(a).view(-1, 1, 1, 1)  # noqa: E731
    u = lambda z, r, t, w: t * z + r**2 + 0.1 * y.view(-1, 1, 1, 1) + 0.2 * w  # noqa: E731
    torch.testing.assert_close(model.sample(z1, y, steps=1, cfg_scale=2.0), z1 - u(z1, 0.0, 1.0, 2.0))
    half = z1 - 0.5 * u(z1, 0.5, 1.0, 2.0)
    torch.testing.assert_close(model.sample(z1, y, steps=2, cfg_scale=2.0), half - 0.5 * u(half, 0.0, 0.5, 2.0))
    assert model.nfe(2) == 2 and k(1.0).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="steps >= 1"):
        model.sample(z1, y, steps=0)


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_peers_sit_at_gs_parameter_count(scale):
    """Both peers on G's backbone (width, blocks, heads, classes): within 10% of G's parameters."""
    cfg = SCALES[scale]
    b = cfg.trained_backward
    shape = dict(in_channels=b.in_channels, image_size=b.image_size, patch_size=b.patch_size, width=b.width,
                 depth=b.num_stages * b.layers_per_group, num_heads=b.num_heads, num_classes=b.num_classes)
    g = count_params(BiFlow(b))
    for peer in (MeanFlow(MeanFlowConfig(**shape)), FlowMatching(FlowMatchingConfig(**shape))):
        assert abs(count_params(peer) / g - 1) < 0.10, (type(peer).__name__, count_params(peer), g)


def test_a_peer_trains_through_the_cache_and_is_keyed_by_its_settings(tmp_path):
    """A peer is a cached stage like F and G: trained on a miss (a few tiny steps), loaded on a hit as its own class,
    keyed by its kind and training but not by `compile` (same math)."""
    import dataclasses

    from biflow_bench.config import PeerConfig
    from biflow_bench.data import load_digits
    from biflow_bench.identity import peer_key
    from biflow_bench.training.cache import get_peer, load_model

    cfg, data = SCALES["tiny"], load_digits().train
    for kind, cls in (("meanflow", MeanFlow), ("flow-matching", FlowMatching)):
        peer = PeerConfig(kind=kind, steps=3, batch_size=16, warmup=1, checkpoint_every=2)
        model, art = get_peer(cfg, peer, 0, data, tmp_path, progress=False)
        assert isinstance(model, cls) and not art.cached and art.meta["steps"] == 3
        again, hit = get_peer(cfg, peer, 0, data, tmp_path, progress=False)
        assert hit.cached and type(again) is cls and art.path.parent.parent.name == "peer"
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
        assert type(load_model(art.path)[0]) is cls
        z, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
        out = again.sample(z, y, steps=1) if kind == "meanflow" else again.sample(z, y, steps=2, solver="heun")
        assert out.shape == z.shape and torch.isfinite(out).all()
    base = PeerConfig()
    keys = {peer_key(cfg, dataclasses.replace(base, **d), 0) for d in ({}, {"kind": "flow-matching"}, {"lr": 3e-3})}
    assert len(keys | {peer_key(cfg, base, 1)}) == 4  # the run's seed too
    assert peer_key(cfg, dataclasses.replace(base, compile=True), 0) == peer_key(cfg, base, 0)


def test_equal_compute_gives_each_peer_bi_flows_training_flops():
    """BiFlow's budget is F's steps x its step's FLOPs + G's likewise; a peer's steps spend it, rounded down. G's step
    runs F forward (and the perceptual networks of its metric) besides itself; MeanFlow's step pays its JVP and the
    guidance pass over flow matching's plain regression."""
    from biflow_bench.ablations import get_spec
    from biflow_bench.config import PeerConfig
    from biflow_bench.training.budget import equal_compute, step_flops
    from biflow_bench.speed.flops import count_flops
    from biflow_bench.models.tarflow import TARFlow

    cfg = get_spec("main").resolve("biflow-mse", "tiny", {"stage2.steps": 100})  # the stages' steps differ
    peers = (PeerConfig(kind="meanflow", batch_size=32), PeerConfig(kind="flow-matching", batch_size=32))
    budget = equal_compute(cfg, peers)
    f = budget["flops_per_step"]
    assert budget["biflow_flops"] == cfg.stage1.steps * f["flow"] + cfg.stage2.steps * f["backward"]
    for peer in peers:
        steps = budget["peer_steps"][peer.kind]
        assert steps * f[peer.kind] <= budget["biflow_flops"] < (steps + 1) * f[peer.kind]
    x = torch.zeros(cfg.stage2.batch_size, 1, 8, 8)
    assert f["backward"] > count_flops(lambda: TARFlow(cfg.flow)(x, torch.zeros(len(x), dtype=torch.long)))
    assert f["meanflow"] > 2 * f["flow-matching"]
    lpips = step_flops(get_spec("distance-metric").resolve("mse+lpips", "tiny"))
    assert lpips["backward"] > step_flops(get_spec("distance-metric").resolve("mse", "tiny"))["backward"]


@pytest.mark.slow
def test_one_nfe_table_runs_its_peers_at_the_tiny_scale(tmp_path, monkeypatch, capsys):
    """`run one-nfe --scale tiny`: each peer row trains its peer (here a few steps, not BiFlow's budget), samples in
    its steps (MeanFlow's jumps, flow matching's solver) and records NFE and G-sized parameters, with no F."""
    import json

    from cli_helpers import invoke

    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path / "cache"))
    sets = {"peer.equal_compute": "false", "peer.steps": 6, "sample.num_samples": 40, "eval.num_real": 40,
            "sample.cfg_sweep": "[0.0, 1.0]"}
    code, out, err = invoke(["run", "one-nfe", "--scale", "tiny", "--variants", "meanflow-2,flow-matching-32",
                             "--results-dir", str(tmp_path / "results"),
                             *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]], monkeypatch, capsys)
    assert code == 0, err
    mf, fm = (json.loads(Path(p).read_text()) for p in out.split())
    guided = 2 if fm["guidance"]["best_w"] else 1  # a guided step evaluates both branches
    assert mf["nfe"] == 2 and fm["nfe"] == 64 * guided and fm["nfe_label"].startswith(f"{64 * guided} (32 heun steps")
    for rec in (mf, fm):
        assert rec["train"]["peer"]["steps"] == 6 and rec["params"]["flow"] == 0 and "bpd" not in rec["metrics"]
        assert rec["metric"] == "fd_effnet" and rec["metrics"]["acc_cls"] >= 0 and rec["notes"][0].startswith("1-NFE")


@pytest.mark.parametrize("option, message", [
    ("sample.steps=0", "sample.steps=0 is out of range: it must be >= 1"),
    ("sample.solver=rk4", "sample.solver='rk4' is not one of euler, heun"),
    ("peer.kind=gan", "peer.kind='gan' is not one of meanflow, flow-matching"),
])
def test_bad_peer_options_are_one_line(option, message, tmp_path, monkeypatch, capsys):
    from cli_helpers import invoke

    code, _, err = invoke(["run", "one-nfe", "--scale", "tiny", "--variants", "meanflow-1", "--set", option,
                           "--results-dir", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()
