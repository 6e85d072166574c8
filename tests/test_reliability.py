"""The suite's reliability guarantees, each under real fault injection.

    SIGKILL mid-training        the re-run resumes from the stage checkpoint and ends with the clean run's record
    SIGTERM / Ctrl-C            a checkpoint at the next step boundary, exit 130, "re-run the same command"
    corrupt cache files         truncated / bit-flipped / foreign flow.pt, backward.pt, checkpoint.pt: named, rebuilt
    bad results files           `report` names and skips them; `run` does not count them as done
    concurrent runs             the second refuses (one line, exit 2) while the first holds the results lock
    non-finite loss             stops naming the step, the loss terms and the last checkpoint, exit 1
    bad input                   broken specs, missing weights, bad seeds: one line, exit 2, before any training
    determinism                 the same command twice on the CPU gives the same record bar timings
    fuzzing                     mutated specs raise SpecError or load; random argument lists exit 0 or 2

Every end-to-end run uses the tiny scale with short schedules (SETS) and one CPU thread (OMP_NUM_THREADS=1 in
subprocesses, torch.set_num_threads(1) in-process): results are bit-exact for a given thread count, and two threads
on a shared 2-core machine are several times slower. One clean run (`clean`) is shared: every other run is compared
with it, and the cached-artifact tests start from copies of its cache.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from biflow_bench import cli, runner
from biflow_bench.ablations import SpecError, get_spec, load_spec
from biflow_bench.training.cache import load_model
from biflow_bench.files import dir_lock, verified_torch_load
from biflow_bench.report.format import fmt_ours
from biflow_bench.results import find_measurement, find_record, read_record, record_path, write_record

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = {"stage1.steps": 40, "stage1.checkpoint_every": 10, "stage2.steps": 20, "stage2.checkpoint_every": 5,
             "sample.num_samples": 60, "eval.num_real": 60, "eval.nll_samples": 60, "eval.resize": 32}
SETS = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
RUN = ["run", "denoise", "--variants", "learned", "--scale", "tiny", *SETS]
CFG = get_spec("denoise").resolve("learned", "tiny", OVERRIDES)
KEY1, KEY2 = CFG.stage1_key(), CFG.stage2_key(0)
# the config hash of RUN's record: its overrides put it at learned__seed0__<hash>.json, beside the default's
HASH = runner.identity(get_spec("denoise"), "learned", "tiny", runner.RunOptions(overrides=OVERRIDES))[1].config_hash
TIMING = ("timing", "wall_time_s", "created")


# ----------------------------------------------------------------------------------------------------------------------
# helpers



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


# A resumed stage averages its loss terms over the steps since the resume only (loop.fit keeps them in memory and
# not in the checkpoint), so `terms` is left out of resumed comparisons; see test_resumed_loss_terms_match_the_clean_run.
RESUMED = ("seconds", "resumed_from", "terms")
CACHED = ("seconds", "cached")  # a cached artifact's meta is the one it was trained with


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def invoke(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The CLI entry point in-process: (exit code, stdout, stderr); any other exception escapes (a traceback)."""
    monkeypatch.setattr(sys, "argv", ["biflow-bench", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    code = e.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out.out, out.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@dataclass
class Run:
    results: Path
    cache: Path
    record: dict
    stderr: str


def _dirs(root: Path) -> tuple[Path, Path]:
    (root / "results").mkdir(parents=True)
    return root / "results", root / "cache"


@pytest.fixture(scope="module")
def first_wave(tmp_path_factory) -> dict:
    """Three runs of the same command at once (2 cores; they share nothing): two clean runs, each with its own fresh
    cache and results directory, and one SIGKILLed as soon as its first stage-1 checkpoint is on disk."""
    dirs = {name: _dirs(tmp_path_factory.mktemp(name)) for name in ("clean", "again", "killed")}
    procs = {name: start(RUN, *d) for name, d in dirs.items()}
    checkpoint = dirs["killed"][1] / "stage1" / KEY1 / "checkpoint.pt"
    drive((procs["killed"], sidecar(checkpoint).exists, subprocess.Popen.kill, "the first stage-1 checkpoint"))
    wave = {"killed": (*dirs["killed"], procs["killed"].wait(30), checkpoint)}
    for name in ("clean", "again"):
        out = finish(procs[name])
        assert out.returncode == 0, out.stderr
        wave[name] = Run(*dirs[name], record_of(dirs[name][0]), out.stderr)
    return wave


@pytest.fixture(scope="module")
def clean_pair(first_wave) -> tuple[Run, Run]:
    return first_wave["clean"], first_wave["again"]


@pytest.fixture(scope="module")
def clean(clean_pair) -> Run:
    return clean_pair[0]


def copy_cache(src: Path, dst: Path, stages: tuple[str, ...] = ("stage1", "stage2")) -> Path:
    for stage in stages:
        shutil.copytree(src / stage, dst / stage)
    return dst


def opts(results: Path, cache: Path) -> runner.RunOptions:
    return runner.RunOptions(results_dir=results, cache_dir=cache, overrides=OVERRIDES, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# 8. determinism (first: it only needs the clean pair)


@pytest.mark.slow
def test_same_command_twice_gives_the_same_record(clean_pair):
    a, b = clean_pair
    assert a.record["train"]["stage1"]["cached"] is False and a.record["train"]["stage2"]["resumed_from"] == 0
    assert comparable(a.record) == comparable(b.record)
    png = a.record["samples_png"]
    assert (a.results / "tiny" / png).read_bytes() == (b.results / "tiny" / png).read_bytes()
    for stage, name in (("stage1", f"{KEY1}/flow.pt"), ("stage2", f"{KEY2}/backward.pt")):
        ma, mb = (load_model(r.cache / stage / name)[0].state_dict() for r in (a, b))
        assert all(torch.equal(ma[k], mb[k]) for k in ma), stage


# ----------------------------------------------------------------------------------------------------------------------
# 1. SIGKILL mid-training


@pytest.fixture(scope="module")
def killed(first_wave) -> tuple[Run, int]:
    """The run SIGKILLed mid stage 1 (first wave), then the same command again."""
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
# 2. SIGTERM / Ctrl-C


@pytest.fixture(scope="module")
def interrupted(clean, tmp_path_factory) -> dict[int, tuple[Path, Path, Path, subprocess.CompletedProcess]]:
    """Two runs at once, stage 1 from the clean run's cache, stage 2 interrupted after its first checkpoint: one by
    SIGTERM, one by SIGINT (Ctrl-C)."""
    runs, events = {}, []
    for sig in (signal.SIGTERM, signal.SIGINT):
        root = tmp_path_factory.mktemp(sig.name)
        results, cache = _dirs(root)
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


# ----------------------------------------------------------------------------------------------------------------------
# 3. corrupted, truncated or foreign cached artifacts


def _foreign(path: Path, other: Path) -> None:
    """A checksummed, loadable artifact that holds another model (a file copied under the wrong key)."""
    shutil.copyfile(other, path)
    shutil.copyfile(sidecar(other), sidecar(path))


@pytest.mark.parametrize("flow_damage,g_damage", [("truncate", "flip"), ("flip", "foreign")])
@pytest.mark.slow
def test_damaged_artifacts_are_named_rebuilt_and_never_loaded(clean, tmp_path, capfd, flow_damage, g_damage):
    results, cache = tmp_path / "results", copy_cache(clean.cache, tmp_path / "cache")
    flow_pt, g_pt = cache / "stage1" / KEY1 / "flow.pt", cache / "stage2" / KEY2 / "backward.pt"
    for path, damage, other in ((g_pt, g_damage, flow_pt), (flow_pt, flow_damage, g_pt)):  # `other` still intact
        {"truncate": truncate, "flip": flip, "foreign": lambda p, o=other: _foreign(p, o)}[damage](path)
    (path,) = runner.run("denoise", ["learned"], "tiny", 0, opts(results, cache))
    err = capfd.readouterr().err
    for damaged in (flow_pt, g_pt):
        assert re.search(rf"warning: {re.escape(str(damaged))}: .*; rebuilding it", err), err
    record = read_record(path)
    assert not record["train"]["stage1"]["cached"] and not record["train"]["stage2"]["cached"]
    assert comparable(record) == comparable(clean.record)  # rebuilt exactly; the damaged bytes were never used
    for name in (flow_pt, g_pt):
        rebuilt, original = (load_model(root / name.relative_to(cache))[0].state_dict() for root in (cache, clean.cache))
        assert all(torch.equal(rebuilt[k], original[k]) for k in original)


# ----------------------------------------------------------------------------------------------------------------------
# 4. truncated or foreign JSON in results/


@pytest.mark.slow
def test_report_names_and_skips_bad_results_files(clean, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    shutil.copytree(clean.results, results)
    good = record_path(results, "tiny", "denoise", "learned", 0, HASH)
    truncated = good.with_name("score__seed0.json")
    truncated.write_text(good.read_text()[:200])
    foreign = good.with_name("package.json")
    foreign.write_text(json.dumps({"name": "left-pad", "version": "1.3.0"}))
    listed = good.with_name("none__seed0.json")
    listed.write_text("[1, 2, 3]\n")
    code, out, err = invoke(["report", "--results-dir", str(results), "--out", str(tmp_path / "reports"),
                             "--scales", "tiny"], monkeypatch, capsys)
    assert code == 0, err
    for path, reason in ((truncated, "not valid JSON"), (foreign, "no 'schema' key"), (listed, "top-level JSON is a list")):
        assert re.search(rf"^skipped {re.escape(str(path))}: .*{reason}", err, re.M), err
    readme = (tmp_path / "reports" / "README.md").read_text()
    # the valid record (of an overridden config: a row of its own, not a default row) is rendered, the truncated
    # one is not counted
    assert "| `denoise` | 0/3 |" in readme and "tiny/denoise/learned: 1 record(s) of another config" in readme
    table = (tmp_path / "reports" / "tiny" / "denoise.md").read_text()
    ours = fmt_ours(clean.record["metrics"]["fd_effnet"], clean.record["metrics"]["fd_effnet_std"])
    assert re.search(rf"^\| Learned denoising \(extra stage of G\) \| [^|]*stage1.steps=40[^|]* \| "
                     rf"{re.escape(ours)} \|", table, re.M), table
    assert "| Score-based denoising through F | — | 0 |" in table


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
@pytest.mark.slow
def test_run_does_not_count_a_bad_record_as_done(clean, tmp_path, capfd, damage):
    results, cache = tmp_path / "results", copy_cache(clean.cache, tmp_path / "cache")
    shutil.copytree(clean.results, results)
    path = record_path(results, "tiny", "denoise", "learned", 0, HASH)
    if damage == "truncated":
        truncate(path)
    else:  # a valid record of another seed, copied to this name
        path.write_text(json.dumps({**clean.record, "seed": 7}))
    runner.run("denoise", ["learned"], "tiny", 0, opts(results, cache))
    assert "already recorded" not in capfd.readouterr().err
    assert comparable(read_record(path), CACHED) == comparable(clean.record, CACHED)


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


# ----------------------------------------------------------------------------------------------------------------------
# 5. two runs on one results directory


@pytest.mark.slow
def test_second_concurrent_run_refuses_and_nothing_is_written_twice(clean, tmp_path):
    results, cache = tmp_path / "results", copy_cache(clean.cache, tmp_path / "cache")
    results.mkdir()
    lock = results / "tiny" / "denoise" / ".lock"
    first = start(RUN, results, cache)
    try:
        # once it holds the lock, stall it (SIGSTOP): it keeps the lock for as long as the test needs
        drive((first, lambda: lock.exists() and lock.read_text() == f"pid {first.pid}",
               lambda p: p.send_signal(signal.SIGSTOP), "the results lock"))
        try:
            second = cli_run(RUN, results, cache)
        finally:
            first.send_signal(signal.SIGCONT)
    except BaseException:
        first.kill()
        raise
    assert second.returncode == 2 and second.stdout == ""
    line = one_line_error(second.stderr)
    assert line == (f"error: {results / 'tiny' / 'denoise'} is in use by pid {first.pid}; wait for it to finish or "
                    "use another --results-dir")
    out = finish(first)
    assert out.returncode == 0, out.stderr
    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert files == ["tiny/.lock", "tiny/calibration.json", "tiny/denoise/.lock",
                     f"tiny/denoise/learned__seed0__{HASH}.json", f"tiny/samples/denoise/learned__seed0__{HASH}.png"]
    assert comparable(record_of(results), CACHED) == comparable(clean.record, CACHED)

    # the lock is the table's: another table runs beside a busy one (distance-metric's MSE row: the same models)
    with dir_lock(results / "tiny" / "denoise", wait=False):
        other = cli_run(["run", "distance-metric", "--variants", "mse", *RUN[4:]], results, cache)
    assert other.returncode == 0, other.stderr
    assert list((results / "tiny" / "distance-metric").glob("mse__seed0__*.json"))


# ----------------------------------------------------------------------------------------------------------------------
# 6. non-finite loss


def test_diverging_run_stops_naming_step_terms_and_checkpoint(tmp_path, monkeypatch, capsys):
    cache, results = tmp_path / "cache", tmp_path / "results"
    monkeypatch.setenv("BIFLOW_CACHE", str(cache))
    code, _, err = invoke([*RUN, "--set", "stage1.lr=1e6", "--set", "stage1.checkpoint_every=2", "--set",
                           "stage1.max_bad_steps=3", "--results-dir", str(results)], monkeypatch, capsys)
    assert code == 1
    m = re.fullmatch(r"error: stage 1 \(F\): 3 non-finite losses in a row at step (\d+) \(nll=nan\); "
                     r"last good checkpoint: (\S+)", err.strip().splitlines()[-1])
    assert m and "Traceback" not in err, err
    state = verified_torch_load(m[2])
    assert Path(m[2]).parent.parent == cache / "stage1" and state["step"] <= int(m[1])
    assert not list(cache.rglob("flow.pt")) and not list(results.rglob("*.json"))


# ----------------------------------------------------------------------------------------------------------------------
# 7. bad input: one line, exit 2, before any training


def _spec_dir(tmp_path: Path, edit) -> Path:
    specs = tmp_path / "specs"
    shutil.copytree(ROOT / "ablations", specs)
    edit(specs)
    return specs


def _sub(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


BROKEN_SPECS = {
    "wrong-type": (lambda d: _sub(d / "denoise.toml", '"backward.denoise" = "score"', '"backward.denoise" = 3'),
                   "denoise.toml", "backward.denoise = 3 has the wrong type"),
    "syntax": (lambda d: _sub(d / "denoise.toml", "[variants.none]", "[variants.none"), "denoise.toml",
               "not valid TOML"),
    "missing-include": (lambda d: (d / "_base.toml").unlink(), "_base.toml", "file not found"),
    "unknown-key": (lambda d: _sub(d / "main.toml", "version = 3", "version = 3\nauthor = 'x'"), "main.toml",
                    "unknown key(s) author"),
    "path-in-variant-name": (lambda d: _sub(d / "denoise.toml", "[variants.learned]", '[variants."../learned"]'),
                             "denoise.toml", "the variant name must be lower-case letters"),
}


@pytest.mark.parametrize("case", list(BROKEN_SPECS))
@pytest.mark.parametrize("command", ["run", "list"])
def test_broken_spec_names_file_and_key(case, command, tmp_path, monkeypatch, capsys):
    edit, filename, message = BROKEN_SPECS[case]
    monkeypatch.setenv("BIFLOW_ABLATIONS", str(_spec_dir(tmp_path, edit)))
    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path / "cache"))
    variant = "../learned" if case == "path-in-variant-name" else "learned"
    args = ["run", "denoise", "--variants", variant, *SETS, "--results-dir", str(tmp_path / "r")]
    code, _, err = invoke(args if command == "run" else ["list"], monkeypatch, capsys)
    assert code == 2
    line = one_line_error(err)
    assert str(tmp_path / "specs" / filename) in line and message in line, line
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["variable-points-nowhere", "no-variable-empty-caches"])
def test_missing_weights_stop_before_training(case, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for var in ("TORCH_HOME", "HF_HOME", "HOME"):
        monkeypatch.setenv(var, str(empty))
    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path / "cache"))
    if case == "variable-points-nowhere":
        monkeypatch.setenv("BIFLOW_VGG16_WEIGHTS", str(tmp_path / "nope" / "vgg16.pth"))
        expected = f"{tmp_path / 'nope' / 'vgg16.pth'} does not exist (from BIFLOW_VGG16_WEIGHTS)"
    else:
        monkeypatch.delenv("BIFLOW_VGG16_WEIGHTS", raising=False)
        expected = f"not found: put vgg16-397923af.pth (from https://download.pytorch.org/models/vgg16-397923af.pth) " \
                   f"in {empty / 'hub' / 'checkpoints'} or set BIFLOW_VGG16_WEIGHTS"
    code, _, err = invoke(["run", "distance-metric", "--variants", "mse+lpips", *SETS, "--set",
                           "stage2.perceptual_weights=pretrained", "--set", "stage2.lpips_net=vgg16",
                           "--results-dir", str(tmp_path / "r")],
                          monkeypatch, capsys)
    assert code == 2 and expected in one_line_error(err), err
    assert not (tmp_path / "cache").exists()  # nothing was trained before the check


@pytest.mark.parametrize("args,message", [
    (["--seed", "-1"], "seed -1: must be an integer from 0 to 2**32 - 1"),
    (["--seed", "99999999999999999999"], "seed 99999999999999999999: must be an integer from 0 to 2**32 - 1"),
    (["--set", "stage2.perceptual_weights=imagenet", "--set", "stage2.metric=mse+lpips"],
     "stage2.perceptual_weights='imagenet' is not one of pretrained, random"),
    (["--set", "eval.extractor=clip"], "eval.extractor='clip' is not one of effnet-lite0, inception-v3-compat"),
])
def test_values_that_would_fail_after_training_fail_first(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path / "cache"))
    code, _, err = invoke([*RUN, *args, "--results-dir", str(tmp_path / "r")], monkeypatch, capsys)
    assert code == 2 and message in one_line_error(err), err
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------------------------------
# 9. fuzzing: specs and argument lists


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def _toml(doc: dict) -> str:
    """Top-level scalars, then each table (values inline), enough for the spec format."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            if k == "variants" and all(isinstance(x, dict) for x in v.values()):
                for name, body in v.items():
                    lines.append(f"[variants.{json.dumps(name)}]")
                    lines += [f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in body.items()]
            else:
                lines.append(f"[{json.dumps(k)}]")
                lines += [f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


VALID_SPEC = {
    "name": "fuzz", "version": 1, "title": "Fuzzed", "paper_table": "none", "include": "_base.toml",
    "baseline": {"stage2.metric": "mse", "sample.cfg_scale": 0.0},
    "variants": {"a": {"label": "A", "paper": {"fid": 1.5, "nfe": 1}, "set": {"backward.denoise": "learned"}},
                 "b": {"set": {"backward.denoise": "none", "stage1.steps": 10, "flow.clip": "none"}}},
}
ODD_VALUES = ["", " ", ".", "..", "none", 0, -1, 2**63 - 1, 1.5, float("nan"), float("inf"), True, [], [1, "a"],
              {}, {"x": 1}, {"stage1": {"steps": "x"}}, "stage1.steps", "\u00e9\u4e2d", "a/b", "../_base.toml"]
ODD_KEYS = ["", "x", "stage1", "stage1.", ".steps", "stage1.steps.x", "stage9.steps", "flow.nope", "inverse",
            "scale", "version", "VARIANTS", "include", "set", "paper", "label", "kind", "\u00e9"]


def _paths(doc, prefix=()):
    """Every (path to a key) in the nested document."""
    for k, v in doc.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _mutate_doc(rng: random.Random) -> str:
    doc = copy.deepcopy(VALID_SPEC)
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(doc))
        if not paths:
            break
        *parent_path, key = rng.choice(paths)
        parent = doc
        for p in parent_path:
            parent = parent[p]
        op = rng.choice(["value", "delete", "add", "rename"])
        if op == "value":
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif op == "delete":
            del parent[key]
        elif op == "add":
            parent[rng.choice(ODD_KEYS)] = copy.deepcopy(rng.choice(ODD_VALUES + ["mse", 3]))
        else:
            parent[rng.choice(ODD_KEYS)] = parent.pop(key)
    return _toml(doc)


def _mutate_text(rng: random.Random) -> bytes:
    data = bytearray(_toml(VALID_SPEC).encode())
    op = rng.choice(["truncate", "delete", "insert", "flip", "random", "swap-lines", "duplicate-line"])
    i = rng.randrange(len(data))
    if op == "truncate":
        return bytes(data[:i])
    if op == "delete":
        del data[i:i + rng.randint(1, 20)]
    elif op == "insert":
        data[i:i] = bytes(rng.choice(b'[]{}="\'.,#\n\\ \x00\xff\xfeabc123') for _ in range(rng.randint(1, 8)))
    elif op == "flip":
        data[i] ^= 1 << rng.randrange(8)
    elif op == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
    else:
        lines = bytes(data).split(b"\n")
        a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
        if op == "swap-lines":
            lines[a], lines[b] = lines[b], lines[a]
        else:
            lines.insert(b, lines[a])
        return b"\n".join(lines)
    return bytes(data)


# Defects the fuzzer once found: each must now be a one-line SpecError that names the spec file to fix.
SPEC_DEFECTS = {
    "include-empty": 'include = ""\n[variants.a]',  # was IsADirectoryError
    "include-dot": 'include = "."\n[variants.a]',
    "dunder-section": '[variants.a]\nset = { "__class__.steps" = 1 }',  # was TypeError
    "post-init-unnamed": '[variants.a]\nset = { "stage2.metric" = "bogus" }',  # RunConfig.__post_init__'s check
    "include-unnamed": 'include = "missing.toml"\n[variants.a]',  # must name the including spec too
    "zero-checkpoint-every": '[variants.a]\nset = { "stage1.checkpoint_every" = 0 }',  # was ZeroDivisionError
    "variant-path": '[variants."../a"]',  # variant names become file names
}


@pytest.mark.parametrize("case", list(SPEC_DEFECTS))
def test_spec_loader_defects_are_spec_errors_naming_the_file(case, tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(f'name = "x"\nversion = 1\ntitle = "t"\npaper_table = "p"\n{SPEC_DEFECTS[case]}\n')
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_fuzzed_specs_raise_spec_error_or_load(tmp_path):
    shutil.copy(ROOT / "ablations" / "_base.toml", tmp_path / "_base.toml")
    rng = random.Random(20260523)
    outcomes = {"loaded": 0, "SpecError": 0}
    for i in range(300):
        path = tmp_path / f"spec{i}.toml"
        data = _mutate_doc(rng).encode() if i % 2 else _mutate_text(rng)
        path.write_bytes(data)
        try:
            load_spec(path)
            outcomes["loaded"] += 1
        except SpecError as e:
            assert "\n" not in str(e), (data, str(e))
            outcomes["SpecError"] += 1
        except Exception as e:
            raise AssertionError(f"case {i}: {type(e).__name__}: {e}\n{data!r}") from e
    assert outcomes["loaded"] >= 20 and outcomes["SpecError"] >= 150, outcomes  # both paths were exercised


# Prepended to every fuzzed command that trains, samples or benchmarks, so the real command runs in a second or two;
# the fuzzed options come after and win where they name the same option or key.
FAST = {
    "steps": ["--set", "stage1.steps=2", "--set", "stage2.steps=2", "--set", "sample.num_samples=20",
              "--set", "eval.num_real=20", "--set", "eval.nll_samples=20", "--set", "eval.resize=32"],
    "bench speed": ["--batch-sizes", "1", "--repeats", "1"],
}


def _random_argv(rng: random.Random, tmp: Path, one_change: bool = False) -> list[str]:
    """A command with mostly its own options (random values, some malformed), sometimes a foreign option or token;
    `one_change`: a valid command (its first positional choices) with a single option set to a random value, so
    that each bad value meets the code on its own rather than behind another refusal."""
    values = {
        "--scale": ["tiny", "small", "huge", ""], "--seed": ["0", "3", "-1", "x", "1e3", "99999999999999999999"],
        "--variants": ["learned", "learned,,score", ",", "bogus", "learned,bogus", "../x", "exact,naive"],
        "--set": ["stage1.steps=1", "stage1.steps=x", "oops", "=1", "stage9.x=1", "flow.clip=none", "a.b.c=1",
                  "sample.cfg_scale=inf", 'stage2.metric="mse+lpips"', "inverse=exact", "stage2.metric=[1",
                  "stage2.perceptual_weights=random", "eval.extractor=nope", "backward.denoise=score"],
        "--results-dir": [str(tmp / "r"), str(tmp / "file" / "r"), "/proc/no/such", ""],
        "--out": [str(tmp / "o.png"), str(tmp / "reports"), str(tmp / "file" / "x"), "/proc/no/such"],
        "--batch-sizes": ["1,2", "x", "", "0", "1,,2"], "--device": ["cpu", "tpu", "cuda"],
        "--num": ["0", "-5", "3", "x"], "--repeats": ["0", "-1", "2"], "--what": ["sample", "train", "nope"],
        "--data-dir": [str(tmp / "none"), str(tmp / "file")],
    }
    step_opts = ["--scale", "--seed", "--data-dir", "--set"]
    commands = {  # name: (positionals, options, flags)
        "list": ([], [], []),
        "run": ([["denoise", "main", "speed", "nope", "", "norm-control"]],
                ["--variants", "--scale", "--seed", "--results-dir", "--data-dir", "--set"], ["--force"]),
        "report": ([], ["--results-dir", "--out"], []),
        "train": ([["denoise", "nope"], ["learned", "exact", "x"]], step_opts, []),
        "sample": ([["main", "nope"], ["biflow", "learned"]], [*step_opts, "--num", "--out"], []),
        "eval": ([["inverse-strategy"], ["exact", "naive", ""]], step_opts, []),
        "bench speed": ([], ["--scale", "--batch-sizes", "--device", "--what", "--repeats", "--results-dir"],
                        ["--json"]),
    }
    if one_change:
        name = rng.choice([c for c in commands if commands[c][1]])
        positionals, options, _ = commands[name]
        opt = rng.choice(options)
        return [*name.split(), *(choices[0] for choices in positionals), opt, rng.choice(values[opt])]
    name = rng.choice([*commands, "bogus", ""])
    argv = name.split() if name else []
    positionals, options, flags = commands.get(name, ([], list(values), []))
    for choices in positionals:
        if rng.random() < 0.9:
            argv.append(rng.choice(choices))
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.08:
            argv.append(rng.choice(["--help", "--bogus", "-x", "--", "d\u00e9noise", *flags, *flags]))
        elif r < 0.15:
            argv.append(rng.choice(list(values)))  # an option of another command, or one without its value
        elif options:
            opt = rng.choice(options)
            argv += [opt, rng.choice(values[opt])]
    return argv


@pytest.mark.slow  # random commands that run for real: trains, samples and evaluates tiny runs end to end
def test_fuzzed_argument_lists_exit_0_or_2(tmp_path, monkeypatch, capsys):
    """Random argument lists run the real commands (tiny scale, FAST schedules): each ends in exit 0, or in exit 2
    with a message, never in a traceback."""
    import functools

    from biflow_bench import paths
    from biflow_bench.speed import benchmark as bench

    monkeypatch.setattr(paths, "project_root", lambda: tmp_path)  # default results, reports, samples: not the checkout's
    # `run speed` has no options to shorten it: the real benchmark at one batch size and one timed call
    monkeypatch.setattr(bench, "run_speed_bench", functools.partial(bench.run_speed_bench, batch_sizes=(1,),
                                                                    repeats=1, warmup=0))
    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    rng = random.Random(7)
    codes: dict[int, int] = {}
    ran: collections.Counter = collections.Counter()
    for i in range(100):
        argv = _random_argv(rng, tmp_path, one_change=i % 2 == 1)
        if argv[:1] in (["run"], ["train"], ["sample"], ["eval"]):
            argv = [argv[0], *FAST["steps"], *argv[1:]]
        elif argv[:2] == ["bench", "speed"]:
            argv = [*argv[:2], *FAST["bench speed"], *argv[2:]]
        monkeypatch.setattr(sys, "argv", ["biflow-bench", *argv])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # noqa: BLE001 -- anything else would reach the user as a traceback
            raise AssertionError(f"case {i} {argv}: {type(e).__name__}: {e}") from e
        out, err = capsys.readouterr()
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:  # a message, or the help (no_args_is_help prints it to stdout and exits 2)
            assert err.strip() or "Usage:" in out, argv
        codes[code] = codes.get(code, 0) + 1
        ran[argv[0] if argv else ""] += code == 0
    assert codes.get(0, 0) >= 10 and codes.get(2, 0) >= 20, (codes, ran)  # both outcomes were exercised
    assert sum(ran[c] for c in ("run", "train", "sample", "eval")) >= 4, ran  # real work, not only refusals
