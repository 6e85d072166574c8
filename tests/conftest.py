"""Shared fixtures: small models with non-trivial weights (zero-initialised output layers would make every flow
the identity), and an isolated artifact cache / results directory per test."""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits

from biflow_bench import paths
from biflow_bench.models import TARFlow, TARFlowConfig


def randomize(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with N(0, scale^2 / fan_in)-ish noise so no layer is the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale / fan_in**0.5)
    return model


def small_flow(dtype: torch.dtype = torch.float64, **overrides) -> TARFlow:
    cfg = dict(in_channels=1, image_size=4, patch_size=2, channels=16, num_blocks=3, layers_per_block=1,
               num_heads=2, num_classes=3, clip=None)
    cfg.update(overrides)
    return randomize(TARFlow(TARFlowConfig(**cfg))).to(dtype).eval()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op / BLAS thread, like each torchrun worker and the OMP_NUM_THREADS=1 subprocesses of the
    reliability tests (results are bit-exact for a given thread count). These models are tiny: on a shared 2-core
    machine spinning worker threads made files 3-10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path / "cache"))
    # the default results, reports and sample folders follow the checkout: a test never writes into the real one
    monkeypatch.setattr(paths, "project_root", lambda: tmp_path / "checkout")
    monkeypatch.setenv("BIFLOW_THREADS", "1")  # the CLI's thread count: the one thread of _one_thread
    monkeypatch.setenv("BIFLOW_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("BIFLOW_SPECS", "")  # the built-in specs alone, whatever the shell names (--specs adds here)
    torch.manual_seed(0)
