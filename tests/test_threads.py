"""The thread budget: fixed counts from the user, and an equal share among registered running jobs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from biflow_bench import threads


def test_fixed_threads_order(monkeypatch):
    monkeypatch.delenv("BIFLOW_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.fixed_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.fixed_threads() == 3
    monkeypatch.setenv("BIFLOW_THREADS", "2")
    assert threads.fixed_threads() == 2
    assert threads.fixed_threads(5) == 5
    monkeypatch.setenv("BIFLOW_THREADS", "two")
    with pytest.raises(ValueError, match="BIFLOW_THREADS='two'"):
        threads.fixed_threads()


@pytest.mark.parametrize("cores, jobs, expected", [(2, 1, 2), (2, 2, 1), (2, 5, 1), (16, 3, 5), (1, 0, 1)])
def test_share(cores, jobs, expected):
    assert threads.share(cores, jobs) == expected


def test_budget_follows_running_jobs(tmp_path):
    """A second registered process halves this one's threads; when it ends, this one grows back and the dead
    job's file is removed."""
    before = torch.get_num_threads()
    budget = threads.ThreadBudget(tmp_path, cores=4)
    try:
        assert budget.rebalance(force=True) == 4
        holder = ("import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
                  "print('held', flush=True); time.sleep(60)")
        other = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "999999.lock")],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "held"
            assert budget.rebalance(force=True) == 2
            assert torch.get_num_threads() == 2
        finally:
            other.kill()
            other.wait()
        assert budget.rebalance(force=True) == 4
        assert not (tmp_path / "999999.lock").exists()
    finally:
        budget.close()
        torch.set_num_threads(before)
    assert not list(tmp_path.glob("*.lock"))


def test_rebalance_is_rate_limited(tmp_path):
    budget = threads.ThreadBudget(tmp_path, cores=2)
    try:
        (tmp_path / "x").mkdir()
        calls = []
        budget.running_jobs = lambda: calls.append(1) or 1  # type: ignore[method-assign]
        budget._checked = time.monotonic()
        budget.rebalance()
        assert calls == []
        budget.rebalance(force=True)
        assert calls == [1]
    finally:
        budget.close()
