"""Who writes which record into a results directory (tiny_runs.RUN, starting from copies of conftest's clean run):

    concurrent runs     a second job leaves to the first the row the first is measuring and takes the others;
                        another seed and another table run beside it
    overrides           a `--set` run is a new record beside the recorded one, which stays as it was
    shared rows         a run another table already recorded (same config and seed) takes that measurement
"""

from __future__ import annotations

import shutil
import signal

import pytest

from biflow_bench import runner
from biflow_bench.files import dir_lock
from biflow_bench.results import find_measurement, read_record, record_path, write_record
from tiny_runs import (
    CACHED, HASH, OVERRIDES, RUN, TIMING, cli_run, comparable, copy_cache, drive, finish, opts, record_of, start,
)

# ----------------------------------------------------------------------------------------------------------------------
# two runs on one results directory


@pytest.mark.slow
def test_a_second_job_leaves_a_busy_row_and_nothing_is_written_twice(clean, tmp_path):
    results, cache = tmp_path / "results", copy_cache(clean.cache, tmp_path / "cache")
    results.mkdir()
    lock = results / "tiny" / "denoise" / ".lock-learned-seed0"
    first = start(RUN, results, cache)
    try:
        # once it holds the row's lock, stall it (SIGSTOP): it keeps the lock for as long as the test needs
        drive((first, lambda: lock.exists() and lock.read_text() == f"pid {first.pid}",
               lambda p: p.send_signal(signal.SIGSTOP), "the row's lock"))
        try:
            second = cli_run(RUN, results, cache)
        finally:
            first.send_signal(signal.SIGCONT)
    except BaseException:
        first.kill()
        raise
    assert second.returncode == 0 and second.stdout.strip() == "", second.stderr
    assert f"[denoise/learned] being measured by pid {first.pid} (seed 0): left to it" in second.stderr
    out = finish(first)
    assert out.returncode == 0, out.stderr
    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert files == ["tiny/.lock", "tiny/calibration.json", "tiny/denoise/.lock-learned-seed0",
                     f"tiny/denoise/learned__seed0__{HASH}.json", f"tiny/samples/denoise/learned__seed0__{HASH}.png"]
    assert comparable(record_of(results), CACHED) == comparable(clean.record, CACHED)

    # jobs on one table share its rows: with `none` taken, a job asked for both measures score alone;
    # another seed of the row, and another table, run beside the busy one
    with dir_lock(results / "tiny" / "denoise", wait=False, name=".lock-none-seed0"):
        shared = cli_run(["run", "denoise", "--variants", "score,none", "--reverse", *RUN[4:]], results, cache)
        seed1 = cli_run([*RUN, "--seed", "1"], results, cache)
        other = cli_run(["run", "distance-metric", "--variants", "mse", *RUN[4:]], results, cache)
    assert shared.returncode == seed1.returncode == other.returncode == 0, shared.stderr + seed1.stderr + other.stderr
    assert "[1/2] denoise/none" in shared.stderr and "[2/2] denoise/score" in shared.stderr  # last to first
    assert "[denoise/none] being measured by pid" in shared.stderr
    assert sorted(p.name.split("__")[0] for p in (results / "tiny" / "denoise").glob("*__seed0__*.json")) \
        == ["learned", "score"]
    assert list((results / "tiny" / "denoise").glob("learned__seed1__*.json"))
    assert list((results / "tiny" / "distance-metric").glob("mse__seed0__*.json"))


# ----------------------------------------------------------------------------------------------------------------------
# which recorded run counts as done


@pytest.mark.slow
def test_an_override_is_a_new_run_beside_the_recorded_one(clean, tmp_path, capfd):
    """The README's `--set` example: not "already recorded", and the record without it stays as it was."""
    results, cache = tmp_path / "results", copy_cache(clean.cache, tmp_path / "cache")
    shutil.copytree(clean.results, results)
    first = record_path(results, "tiny", "denoise", "learned", 0, HASH)
    before = first.read_bytes()
    longer = runner.RunOptions(results_dir=results, cache_dir=cache, overrides={**OVERRIDES, "stage2.steps": 8},
                               progress=False)
    (path,) = runner.run("denoise", ["learned"], "tiny", 0, longer)
    assert "already recorded" not in capfd.readouterr().err
    record = read_record(path)
    assert path != first and path.name == f"learned__seed0__{record['config_hash']}.json"
    assert record["overrides"]["stage2.steps"] == 8 and record["train"]["stage1"]["cached"] is True
    assert first.read_bytes() == before  # kept beside it, untouched
    assert runner.run("denoise", ["learned"], "tiny", 0, longer) == [path]  # now this config is done too
    assert "already recorded" in capfd.readouterr().err


@pytest.mark.slow
def test_a_run_recorded_by_one_table_is_shared_by_another(clean, tmp_path, capfd):
    """Distance metric's MSE row is denoise's learned row (the baseline, same config hash and seed): it takes that
    record's measurement with its own table fields, trains and evaluates nothing (an empty cache stays empty)."""
    results, cache = tmp_path / "results", tmp_path / "cache"
    shutil.copytree(clean.results, results)
    (path,) = runner.run("distance-metric", ["mse"], "tiny", 0, opts(results, cache))
    assert "sharing its measurement" in capfd.readouterr().err and not cache.exists()
    rec = read_record(path)
    assert path == record_path(results, "tiny", "distance-metric", "mse", 0, HASH)
    assert rec["measured_in"] == f"denoise/learned__seed0__{HASH}.json" and rec["label"] != clean.record["label"]
    own = ("ablation", "variant", "label", "spec_version", "paper", "samples_png", "env", "measured_in", *TIMING)
    assert {k: v for k, v in rec.items() if k not in own} == {k: v for k, v in clean.record.items() if k not in own}
    assert rec["timing"] == clean.record["timing"]  # the sampler's latency, as measured
    png = (results / "tiny" / rec["samples_png"]).read_bytes()
    assert png == (results / "tiny" / clean.record["samples_png"]).read_bytes()
    assert find_measurement(results, "tiny", 1, HASH) is None  # another seed is another run
    assert find_measurement(results, "tiny", 0, "0" * 16) is None
    (results / "tiny" / clean.record["samples_png"]).unlink()  # a source without its grid is passed over
    assert find_measurement(results, "tiny", 0, HASH) == (path, rec)
    older = {**rec, "diagnostics": {k: v for k, v in rec["diagnostics"].items() if k != "noise_sensitivity"}}
    write_record(results, older)  # a G record from before the noise sensitivity: measured anew, not shared
    assert "noise_sensitivity" in rec["diagnostics"] and find_measurement(results, "tiny", 0, HASH) is None
