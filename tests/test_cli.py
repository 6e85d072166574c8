"""The command line: listing, and every user mistake as one line on stderr with exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biflow_bench", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


def test_list_shows_ablations_and_paper_numbers():
    out = cli("list")
    assert out.returncode == 0
    assert "inverse-strategy" in out.stdout and "hidden-align" in out.stdout and "36.93" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["run", "nope"], "unknown ablation 'nope'; valid: denoise"),
    (["run", "denoise", "--variants", "learned,bogus"], "unknown variant 'bogus' of ablation 'denoise'; valid: learned, score, none"),
    (["run", "denoise", "--scale", "huge"], "unknown scale 'huge'; valid scales: tiny, small"),
    (["run", "denoise", "--set", "stage2.steps=many"], "stage2.steps = 'many' has the wrong type; expected int"),
    (["run", "denoise", "--set", "stage2.stepz=3"], "unknown key 'stage2.stepz'"),
    (["run", "denoise", "--set", "oops"], "expected KEY=VALUE"),
    (["bench", "speed", "--batch-sizes", "1,x"], "expected comma-separated integers"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    out = cli(*args, "--results-dir", str(tmp_path)) if args[0] == "run" else cli(*args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"error: {out.stderr.strip()[7:]}" and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = cli("run", "denoise", "--results-dir", str(blocker / "results"))
    assert out.returncode == 2 and "is not writable" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_missing_dataset_names_package(tmp_path):
    out = cli("run", "denoise", "--scale", "small", "--results-dir", str(tmp_path / "r"),
              env={"BIFLOW_DATA": str(tmp_path), "BIFLOW_CACHE": str(tmp_path / "c")})
    assert out.returncode == 2 and "dataset-fashion-mnist" in out.stderr and "Traceback" not in out.stderr


def test_unknown_option_is_a_usage_error():
    out = cli("run", "denoise", "--bogus")
    assert out.returncode == 2 and "No such option" in out.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_demo_and_reproduce_small_run_every_ablation():
    """`make -n` lists the commands each target would run: every registered table but speed (a bench, not a run)."""
    from biflow_bench.ablations import load_registry

    root = Path(__file__).resolve().parents[1]
    tables = [name for name in load_registry() if name != "speed"]
    for target, scale in (("demo", "tiny"), ("reproduce-small", "small")):
        plan = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=root, capture_output=True,
                              text=True, check=True).stdout
        for name in tables:
            assert f"biflow-bench run {name} --scale {scale} --seed 0" in plan, (target, name)
        assert f"bench speed --scale {scale}" in plan and "biflow-bench report" in plan
    assert "--seed 1" in plan  # reproduce-small adds the second seed of the baselines
