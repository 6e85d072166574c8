"""The end-to-end run the reliability tests share (test_resume, test_damaged_files, test_results_dir): one tiny
`denoise` command with short schedules, its cache keys and record, and helpers to start, drive, damage and compare
runs of it. The clean runs themselves are conftest.py's `first_wave` and `clean` fixtures.

Every run uses one CPU thread (OMP_NUM_THREADS=1 in subprocesses, torch.set_num_threads(1) in-process): results are
bit-exact for a given thread count, and two threads on a shared 2-core machine are several times slower.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from biflow_bench import runner
from biflow_bench.ablations import get_spec
from biflow_bench.identity import backward_key, flow_key
from biflow_bench.results import find_record, read_record, record_path

OVERRIDES = {"stage1.steps": 40, "stage1.checkpoint_every": 10, "stage2.steps": 20, "stage2.checkpoint_every": 5,
             "sample.num_samples": 60, "eval.num_real": 60, "eval.nll_samples": 60, "eval.resize": 32}
SETS = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
RUN = ["run", "denoise", "--variants", "learned", "--scale", "tiny", *SETS]
CFG = get_spec("denoise").resolve("learned", "tiny", OVERRIDES)
KEY1, KEY2 = flow_key(CFG), backward_key(CFG, 0)
# the config hash of RUN's record: its overrides put it at learned__seed0__<hash>.json, beside the default's
HASH = runner.identity(get_spec("denoise"), "learned", "tiny", runner.RunOptions(overrides=OVERRIDES))[1].config_hash
TIMING = ("timing", "wall_time_s", "created")

# The keys of each `train` stage left out when comparing a record with the clean run's (`comparable`). A resumed
# stage's loss terms are those of the clean run: the checkpoint keeps the last 50 steps' terms (loop.fit's `recent`),
# so `terms` is compared (test_resumed_loss_terms_match_the_clean_run checks stage 1's on their own).
RESUMED = ("seconds", "resumed_from")
CACHED = ("seconds", "cached")  # a cached artifact's meta is the one it was trained with


@dataclass
class Run:
    results: Path
    cache: Path
    record: dict
    stderr: str


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "BIFLOW_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(args: list[str], results: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "biflow_bench", *args, "--results-dir", str(results)],
                            env=_env(cache), cwd=results.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def cli_run(args: list[str], results: Path, cache: Path) -> subprocess.CompletedProcess:
    return finish(start(args, results, cache))


def drive(*events: tuple[subprocess.Popen, object, object, str], timeout: float = 240) -> None:
    """Poll running processes; when an event's condition holds, apply its action to the process once."""
    pending = list(events)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            for event in list(pending):
                p, condition, action, what = event
                if condition():
                    action(p)
                    pending.remove(event)
                elif p.poll() is not None:
                    raise AssertionError(f"process ended (rc {p.returncode}) before {what}: {p.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {', '.join(e[3] for e in pending)}")
            time.sleep(0.02)
    except BaseException:
        for p, *_ in events:
            p.kill()
        raise


def dirs(root: Path) -> tuple[Path, Path]:
    """A fresh (results, cache) pair under `root`; the results directory exists, the cache does not yet."""
    (root / "results").mkdir(parents=True)
    return root / "results", root / "cache"


def copy_cache(src: Path, dst: Path, stages: tuple[str, ...] = ("stage1", "stage2")) -> Path:
    for stage in stages:
        shutil.copytree(src / stage, dst / stage)
    return dst


def opts(results: Path, cache: Path) -> runner.RunOptions:
    """RUN's options for runner.run in-process."""
    return runner.RunOptions(results_dir=results, cache_dir=cache, overrides=OVERRIDES, progress=False)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record_of(results: Path) -> dict:
    path = find_record(results, "tiny", "denoise", "learned", 0, HASH)
    assert path == record_path(results, "tiny", "denoise", "learned", 0, HASH)
    return read_record(path)


def comparable(record: dict, drop: tuple[str, ...] = ("seconds",)) -> dict:
    """The record without its timing fields and the given keys of each `train` stage."""
    r = copy.deepcopy(record)
    for key in TIMING:
        r.pop(key)
    for point in r.get("guidance", {}).get("curve", []):
        point.pop("ms_per_image")
    for stage in r["train"].values():
        for key in drop:
            stage.pop(key)
    return r


def flip(path: Path) -> None:
    """Invert 16 bytes in the middle of the file."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
