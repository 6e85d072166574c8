"""Runs end the same however they get there, under real fault injection (tiny_runs.RUN, compared with conftest's
clean run):

    determinism         the same command twice on the CPU gives the same record, grid and models bar timings
    SIGKILL             the re-run resumes from the stage checkpoint and ends with the clean run's record
    SIGTERM / Ctrl-C    a checkpoint at the next step boundary, exit 130, "re-run the same command"; the re-run
                        resumes, and a damaged checkpoint is named and not loaded
"""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from biflow_bench import runner
from biflow_bench.files import verified_torch_load
from biflow_bench.results import read_record
from biflow_bench.training.cache import load_model
from tiny_runs import (
    CACHED, KEY1, KEY2, RESUMED, RUN, Run, cli_run, comparable, copy_cache, dirs, drive, finish, flip, opts, record_of,
    sidecar, start,
)

# ----------------------------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.slow
def test_same_command_twice_gives_the_same_record(first_wave):
    a, b = first_wave["clean"], first_wave["again"]
    assert a.record["train"]["stage1"]["cached"] is False and a.record["train"]["stage2"]["resumed_from"] == 0
    assert comparable(a.record) == comparable(b.record)
    png = a.record["samples_png"]
    assert (a.results / "tiny" / png).read_bytes() == (b.results / "tiny" / png).read_bytes()
    for stage, name in (("stage1", f"{KEY1}/flow.pt"), ("stage2", f"{KEY2}/backward.pt")):
        ma, mb = (load_model(r.cache / stage / name)[0].state_dict() for r in (a, b))
        assert all(torch.equal(ma[k], mb[k]) for k in ma), stage


# ----------------------------------------------------------------------------------------------------------------------
# SIGKILL mid-training


@pytest.fixture(scope="module")
def killed(first_wave) -> tuple[Run, int]:
    """The first wave's run SIGKILLed mid stage 1, then the same command again: (that run, the step it resumed at)."""
    results, cache, returncode, checkpoint = first_wave["killed"]
    assert returncode == -signal.SIGKILL
    step = verified_torch_load(checkpoint)["step"]
    assert 0 < step < 40 and step % 10 == 0
    assert not (cache / "stage1" / KEY1 / "flow.pt").exists() and not list(results.rglob("*.json"))
    out = cli_run(RUN, results, cache)
    assert out.returncode == 0, out.stderr
    assert not checkpoint.exists() and not sidecar(checkpoint).exists()  # removed once the stage is done
    return Run(results, cache, record_of(results), out.stderr), step


@pytest.mark.slow
def test_sigkill_mid_training_resumes_from_the_checkpoint(clean, killed):
    run, step = killed
    assert run.record["train"]["stage1"]["resumed_from"] == step  # picked up, not started again
    assert run.record["train"]["stage2"]["resumed_from"] == 0
    assert comparable(run.record, RESUMED) == comparable(clean.record, RESUMED)


@pytest.mark.slow
def test_resumed_loss_terms_match_the_clean_run(clean, killed):
    assert killed[0].record["train"]["stage1"]["terms"] == clean.record["train"]["stage1"]["terms"]


# ----------------------------------------------------------------------------------------------------------------------
# SIGTERM / Ctrl-C


@pytest.fixture(scope="module")
def interrupted(clean, tmp_path_factory) -> dict[int, tuple[Path, Path, Path, subprocess.CompletedProcess]]:
    """Two runs at once, stage 1 from the clean run's cache, stage 2 interrupted after its first checkpoint: one by
    SIGTERM, one by SIGINT (Ctrl-C)."""
    runs, events = {}, []
    for sig in (signal.SIGTERM, signal.SIGINT):
        results, cache = dirs(tmp_path_factory.mktemp(sig.name))
        copy_cache(clean.cache, cache, ("stage1",))
        checkpoint = cache / "stage2" / KEY2 / "checkpoint.pt"
        p = start(RUN, results, cache)
        runs[sig] = (results, cache, checkpoint, p)
        events.append((p, sidecar(checkpoint).exists, lambda p, sig=sig: p.send_signal(sig), f"{sig.name} checkpoint"))
    drive(*events)
    return {sig: (*r[:3], finish(r[3], 120)) for sig, r in runs.items()}


def _interrupt(sig: int, interrupted) -> tuple[Path, Path, Path, int]:
    """Exit 130 with how to resume, a checkpoint at a step boundary after the signal, and nothing else written."""
    results, cache, checkpoint, out = interrupted[sig]
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"interrupted: stage 2 \(G\) interrupted at step (\d+)/20; checkpoint saved to (.+); "
                     r"re-run the same command to resume", last)
    assert m, out.stderr
    step = verified_torch_load(checkpoint)["step"]
    assert int(m[1]) == step and 5 <= step < 20 and Path(m[2]) == checkpoint
    assert not list(results.rglob("*.json")) and not (checkpoint.parent / "backward.pt").exists()
    return results, cache, checkpoint, step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(clean, interrupted):
    results, cache, checkpoint, step = _interrupt(signal.SIGTERM, interrupted)
    (path,) = runner.run("denoise", ["learned"], "tiny", 0, opts(results, cache))  # (the CLI re-run: SIGKILL test)
    record = read_record(path)
    assert record["train"]["stage2"]["resumed_from"] == step and record["train"]["stage1"]["cached"] is True
    assert comparable(record, RESUMED + ("cached",)) == comparable(clean.record, RESUMED + ("cached",))


@pytest.mark.slow
def test_ctrl_c_checkpoint_then_a_corrupted_checkpoint_is_not_loaded(clean, interrupted, capfd):
    results, cache, checkpoint, _ = _interrupt(signal.SIGINT, interrupted)
    flip(checkpoint)
    (path,) = runner.run("denoise", ["learned"], "tiny", 0, opts(results, cache))
    err = capfd.readouterr().err
    assert f"warning: {checkpoint}: checksum mismatch" in err and "starting this stage again" in err
    record = read_record(path)
    assert record["train"]["stage2"]["resumed_from"] == 0  # trained from scratch, not from the damaged state
    assert comparable(record, CACHED) == comparable(clean.record, CACHED)
