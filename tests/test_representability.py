"""G can represent F's inverse: fitted to 256 fixed pairs (z, F's trajectory) of a trained tiny F, its output gets
below the training noise sigma^2. A G that could not (z entering wrongly, a broken head or normalisation) would stall
far above it whatever the training (issue 32's representability check; `biflow-bench bench represent` runs it at any
scale)."""

from __future__ import annotations

import pytest
import torch

from biflow_bench.ablations import get_spec
from biflow_bench.data import dataset_splits
from biflow_bench.models.biflow import BiFlow
from biflow_bench.training.cache import get_flow
from biflow_bench.training.representability import fit_fixed_pairs


@pytest.mark.slow
def test_g_fits_fixed_pairs_of_a_trained_flow_below_sigma_squared(tmp_path):
    cfg = get_spec("g-training").resolve("centre", "tiny", {"stage1.steps": 200})
    train = dataset_splits(cfg.dataset, None).train
    flow, _ = get_flow(cfg, train, tmp_path / "cache", progress=False)
    torch.manual_seed(1)
    g = BiFlow(cfg.trained_backward)
    sigma = cfg.stage1.noise_sigma
    curve = fit_fixed_pairs(g, flow, train.images[:256], train.labels[:256], cfg.stage2, sigma=sigma, steps=400,
                            lr=2e-3, every=400)
    assert curve.output_mse[-1] < sigma**2 < curve.output_mse[0], curve.output_mse
