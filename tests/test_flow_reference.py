"""F's initialisation and the plumbing of `bench flow-reference` (our F beside a reference TARFlow checkout): the
variants each undo one initialisation choice, and the wrapper computes the reference's log-likelihood correctly."""

from __future__ import annotations

import math
import types
from pathlib import Path

import pytest
import torch

from biflow_bench.config import ConfigError
from biflow_bench.flow_reference import ReferenceFlow, build, load_reference_module
from biflow_bench.models import TARFlow, TARFlowConfig


def test_flow_class_embedding_starts_small():
    torch.manual_seed(0)
    flow = TARFlow(TARFlowConfig(channels=64, num_classes=10))
    for block in flow.blocks:
        assert float(block.class_embed.weight.detach().std()) == pytest.approx(0.01, rel=0.15)
        assert torch.equal(block.proj_out.bias, torch.zeros_like(block.proj_out.bias))


def test_bench_variants_toggle_one_choice_each():
    ours = build("ours", 0, None)
    std1 = build("ours-embed-std1", 0, None)
    assert float(std1.blocks[0].class_embed.weight.detach().std()) == pytest.approx(1.0, rel=0.1)
    assert float(ours.blocks[0].class_embed.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert isinstance(build("ours-no-out-norm", 0, None).blocks[0].norm_out, torch.nn.Identity)
    assert float(build("ours-out-bias-default", 0, None).blocks[0].proj_out.bias.detach().abs().max()) > 0
    assert torch.equal(std1.blocks[0].pos, ours.blocks[0].pos)  # everything else as in `ours`
    with pytest.raises(ConfigError, match="--reference"):
        build("reference", 0, None)
    with pytest.raises(ConfigError, match="transformer_flow.py"):
        load_reference_module(Path("/nonexistent"))


def test_reference_wrapper_log_prob_and_dropped_labels():
    seen = {}

    class FakeModel(torch.nn.Module):  # stands in for the reference: z = 2x, per-dimension logdet 0.25
        def __init__(self, **kwargs):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, y=None):
            seen["y"] = y
            tokens = 2 * x.flatten(1)
            return tokens.view(x.shape[0], -1, 1), [], torch.full((x.shape[0],), 0.25)

    cfg = TARFlowConfig(image_size=4, patch_size=2, num_classes=3)
    wrapped = ReferenceFlow(types.SimpleNamespace(Model=FakeModel), cfg)
    x = torch.linspace(-1, 1, 32).view(2, 1, 4, 4)
    lp = wrapped.log_prob(x, torch.tensor([3, 1]))
    d = 16
    expected = -0.5 * (2 * x).flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) + d * 0.25
    assert torch.allclose(lp, expected)
    assert seen["y"].tolist() == [-1, 1]  # our null class 3 -> the reference's dropped label -1
