"""Threads on a shared machine: each `biflow-bench` process takes its share of the cores it may use.

OpenMP's worker threads busy-wait between parallel regions, so two jobs that each take every core fight over them
and both crawl (docs/threads.md has the measurements). A run that was not told its thread count registers itself in
a directory of running jobs (one lock file per process, held while it lives) and uses cores // jobs threads,
re-checked at step and batch boundaries, so a job started beside it makes both shrink and its end lets the other
grow back. `--threads N`, BIFLOW_THREADS or OMP_NUM_THREADS fix the count instead (one thread is bit-exact across
runs; the automatic count depends on what else runs).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from pathlib import Path

import torch

RECHECK_S = 2.0  # how often `rebalance` looks at the registry


def registry_dir() -> Path:
    """The directory of running jobs: BIFLOW_JOBS_DIR, else one per machine in the temporary directory."""
    return Path(os.environ.get("BIFLOW_JOBS_DIR") or Path(tempfile.gettempdir()) / "biflow-bench-jobs")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fixed_threads(requested: int | None = None) -> int | None:
    """The thread count the user fixed: --threads, else BIFLOW_THREADS, else OMP_NUM_THREADS; None for automatic."""
    if requested is not None:
        return requested
    for var in ("BIFLOW_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{var}={value!r} is not a whole number of threads; set it to e.g. 1") from None
            if n < 1:
                raise ValueError(f"{var}={n} must be at least 1")
            return n
    return None


def share(cores: int, jobs: int) -> int:
    """Threads of one of `jobs` running jobs on `cores` cores: an equal share, at least one."""
    return max(1, cores // max(1, jobs))


class ThreadBudget:
    """This process's entry in the registry and its current thread count."""

    def __init__(self, registry: Path | None = None, cores: int | None = None) -> None:
        self.registry, self.cores = registry or registry_dir(), cores or usable_cores()
        self.registry.mkdir(parents=True, exist_ok=True)
        self._file = open(self.registry / f"{os.getpid()}.lock", "w")  # noqa: SIM115 (held for the process's life)
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self.threads, self._checked = 0, 0.0
        self.rebalance(force=True)

    def running_jobs(self) -> int:
        """Registered processes still alive (their lock is held); the files of dead ones are removed."""
        jobs = 0
        for path in self.registry.glob("*.lock"):
            if path.name == Path(self._file.name).name:
                jobs += 1
                continue
            try:
                with open(path) as f:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: its owner is gone
                path.unlink(missing_ok=True)
            except BlockingIOError:
                jobs += 1
            except OSError:
                continue
        return jobs

    def rebalance(self, force: bool = False) -> int:
        now = time.monotonic()
        if force or now - self._checked >= RECHECK_S:
            self._checked = now
            threads = share(self.cores, self.running_jobs())
            if threads != self.threads:
                torch.set_num_threads(threads)
                self.threads = threads
        return self.threads

    def close(self) -> None:
        path = Path(self._file.name)
        self._file.close()
        path.unlink(missing_ok=True)


_budget: ThreadBudget | None = None


def configure(requested: int | None = None) -> None:
    """Called once at start-up: a fixed count, or a registered automatic share."""
    global _budget
    fixed = fixed_threads(requested)
    if fixed is not None:
        torch.set_num_threads(fixed)
    elif _budget is None:
        _budget = ThreadBudget()


def rebalance() -> None:
    """At a step or batch boundary: follow the registry (a no-op unless `configure` chose automatic threads)."""
    if _budget is not None:
        _budget.rebalance()
