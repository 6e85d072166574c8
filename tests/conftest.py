"""Shared fixtures: small models with non-trivial weights (zero-initialised output layers would make every flow
the identity), an isolated artifact cache / results directory per test, the hand-made records and their report
(report_records.py), and the reliability tests' clean end-to-end runs (tiny_runs.py). The last two import their
helpers when first used: conftest itself loads neither the report nor the runner."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from threadpoolctl import threadpool_limits

from biflow_bench import paths
from biflow_bench.models import TARFlow, TARFlowConfig

if TYPE_CHECKING:
    from biflow_bench.report.render import ReportSummary
    from tiny_runs import Run


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
    """One intra-op / BLAS thread, like each torchrun worker and the OMP_NUM_THREADS=1 subprocesses of
    tiny_runs.py (results are bit-exact for a given thread count). These models are tiny: on a shared 2-core
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


# ----------------------------------------------------------------------------------------------------------------------
# hand-made records (report_records.py) and one report of them


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """report_records.build_results in this test's own directory: a test may change it."""
    from report_records import build_results

    return build_results(tmp_path / "results")


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ReportSummary]:
    """(results, report, ReportSummary): one report (records alone, no spec registry) over build_results plus
    add_bad_files' four bad files, shared by the tests that only read it: drawing the figures is most of a report's
    time."""
    from biflow_bench.report.render import render_report
    from report_records import add_bad_files, build_results

    root = tmp_path_factory.mktemp("rendered")
    rdir = build_results(root / "results")
    add_bad_files(rdir)
    return rdir, root / "report", render_report(rdir, root / "report", registry={})


# ----------------------------------------------------------------------------------------------------------------------
# the reliability tests' clean runs of tiny_runs.RUN (test_resume, test_damaged_files, test_results_dir)


@pytest.fixture(scope="session")
def first_wave(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three runs of tiny_runs.RUN at once (2 cores; they share nothing), each with its own fresh cache and results
    directory: "clean" and "again" (Runs, both exit 0), and "killed" (results, cache, return code, checkpoint path),
    SIGKILLed as soon as its first stage-1 checkpoint is on disk (test_resume's `killed` re-runs it)."""
    from tiny_runs import KEY1, RUN, Run, dirs, drive, finish, record_of, sidecar, start

    roots = {name: dirs(tmp_path_factory.mktemp(name)) for name in ("clean", "again", "killed")}
    procs = {name: start(RUN, *d) for name, d in roots.items()}
    checkpoint = roots["killed"][1] / "stage1" / KEY1 / "checkpoint.pt"
    drive((procs["killed"], sidecar(checkpoint).exists, subprocess.Popen.kill, "the first stage-1 checkpoint"))
    wave = {"killed": (*roots["killed"], procs["killed"].wait(30), checkpoint)}
    for name in ("clean", "again"):
        out = finish(procs[name])
        assert out.returncode == 0, out.stderr
        wave[name] = Run(*roots[name], record_of(roots[name][0]), out.stderr)
    return wave


@pytest.fixture(scope="session")
def clean(first_wave: dict) -> Run:
    """The first wave's clean run: every other run is compared with it, and the cache and results tests start from
    copies of its cache and results directory."""
    return first_wave["clean"]
