"""The backward model G and stage 2: every strategy x denoising x norm control x CFG mode trains, and G's
contract (1 NFE, no call into F, training-time CFG from one pass, F frozen) holds."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from conftest import randomize

from biflow_bench.config import Stage2Config, scale_config
from biflow_bench.data import load_digits
from biflow_bench.training.losses import build_perceptual_terms, stage2_loss
from biflow_bench.models import BiFlow, TARFlow, build_models
from biflow_bench.models.biflow import CFG_MODES, DENOISE_MODES, STRATEGIES
from biflow_bench.training.stages import train_backward

SMALL = dict(channels=32, width=32, num_blocks=2, num_groups=2, num_heads=2)


@pytest.fixture(scope="module")
def batch():
    data = load_digits().train
    return data.images[:16], data.labels[:16]


@pytest.fixture(scope="module")
def frozen_flow():
    flow, _ = build_models("tiny", **SMALL)
    return randomize(flow, scale=0.5).eval().requires_grad_(False)


def _optimise(g: BiFlow, flow: TARFlow, x, y, perceptual=None, steps: int = 8) -> list[float]:
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(step % 2)  # two fixed noise draws: a fixed problem to descend on
        s2 = Stage2Config(label_drop=0.1, cfg_max=2.0, perceptual_batch=8)
        loss, terms = stage2_loss(g, flow, x, y, s2, sigma=0.1, perceptual=perceptual or {}, generator=gen)
        assert torch.isfinite(loss) and all(v == v for v in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(sum(terms.values()))
    return losses


@pytest.mark.parametrize("strategy,denoise,cfg_mode,normalize",
                         list(itertools.product(STRATEGIES, DENOISE_MODES, CFG_MODES, [True, False])))
def test_every_option_trains(strategy, denoise, cfg_mode, normalize, batch, frozen_flow):
    _, g = build_models("tiny", **SMALL, strategy=strategy, denoise=denoise, cfg_mode=cfg_mode,
                        normalize_hidden=normalize)
    losses = _optimise(g, frozen_flow, *batch)
    assert sum(losses[-2:]) < sum(losses[:2])
    assert len(g.stages) == 2 + (denoise == "learned")


@pytest.mark.parametrize("metric", ["mse+lpips", "mse+lpips+convnext"])
def test_perceptual_metrics_train(metric, batch, frozen_flow):
    _, g = build_models("tiny", **SMALL, cfg_mode="none")
    perceptual = build_perceptual_terms(Stage2Config(metric=metric, lpips_net="effnet-lite1",
                                                     convnext_net="effnet-lite2", perceptual_size=32))
    losses = _optimise(g, frozen_flow, *batch, perceptual=perceptual, steps=8)
    assert sum(losses[-2:]) < sum(losses[:2])
    assert all(not p.requires_grad for p in perceptual.parameters())


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_learned_sampling_is_one_pass_of_g_and_never_touches_f():
    flow, g = build_models("tiny", denoise="learned", cfg_mode="training-time")
    touched = []
    for m in flow.modules():
        m.register_forward_hook(lambda mod, *_: touched.append(type(mod).__name__))
    g_calls, stage_rows = _count_calls(g), []
    g.stages[0].register_forward_hook(lambda mod, args, out: stage_rows.append(args[0].shape[0]))
    x = g.sample(torch.randn(5, 1, 8, 8), torch.arange(5), cfg_scale=1.0)
    assert x.shape == (5, 1, 8, 8) and not touched and g_calls[0] == 1 and stage_rows == [5]
    assert g.nfe(1.0) == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sampling_skips_the_projection_heads_and_equals_the_training_pass(strategy):
    _, g = build_models("tiny", strategy=strategy, cfg_mode="training-time")
    randomize(g, scale=0.5).eval()
    head_calls = []
    for head in g.heads:
        head.register_forward_hook(lambda *_: head_calls.append(1))
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    x = g.sample(z, y, cfg_scale=1.5)
    assert not head_calls
    with torch.no_grad():
        full = g(z, y, 1.5)
    assert len(head_calls) == len(g.heads)
    assert len(full.states) == (0 if strategy == "naive" else g.config.num_stages - 1)
    torch.testing.assert_close(x, full.x, rtol=0, atol=0)


def test_inference_cfg_evaluates_two_branches():
    _, g = build_models("tiny", cfg_mode="inference")
    stage_rows = []
    g.stages[0].register_forward_hook(lambda mod, args, out: stage_rows.append(args[0].shape[0]))
    g.sample(torch.randn(5, 1, 8, 8), torch.arange(5), cfg_scale=1.0)
    assert stage_rows == [10]  # conditional and unconditional branches, batched: 2 evaluations per image
    assert g.nfe(1.0) == 2 and g.nfe(0.0) == 1


def test_training_time_cfg_scale_is_a_condition_of_one_pass():
    _, g = build_models("tiny", cfg_mode="training-time")
    randomize(g, scale=0.5)
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    a, b = g.sample(z, y, cfg_scale=0.0), g.sample(z, y, cfg_scale=2.0)
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(g.sample(z, y, cfg_scale=2.0), b)


def test_cfg_scale_without_cfg_training_is_refused():
    _, g = build_models("tiny", cfg_mode="none")
    with pytest.raises(ValueError, match="cfg_mode"):
        g.sample(torch.randn(1, 1, 8, 8), torch.tensor([0]), cfg_scale=1.0)


def test_projection_heads_receive_gradients(batch, frozen_flow):
    _, g = build_models("tiny", **SMALL, strategy="hidden-align", cfg_mode="none")
    assert len(g.heads) == g.config.num_stages - 1
    loss, _ = stage2_loss(g, frozen_flow, *batch, Stage2Config(label_drop=0.0), sigma=0.1, perceptual={},
                          generator=torch.Generator().manual_seed(0))
    loss.backward()
    for head in g.heads:
        assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0


def test_stage2_leaves_f_bit_identical():
    cfg = scale_config("tiny")
    cfg = dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, steps=5, batch_size=16, warmup=1))
    flow = randomize(TARFlow(cfg.flow), scale=0.5)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    g, result = train_backward(cfg, flow, load_digits().train, seed=0, progress=False)
    assert result.steps == 5 and set(result.terms) == {"hidden", "mse"}
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())
