"""The command line: listing, and every user mistake as one line on stderr with exit code 2."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import FAST, invoke


def cli(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biflow_bench", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


def test_list_shows_ablations_and_paper_numbers():
    out = cli("list")
    assert out.returncode == 0
    assert "inverse-strategy" in out.stdout and "hidden-align" in out.stdout and "36.93" in out.stdout
    # every label starts in one column, after the longest variant name
    columns = {re.match(r"  \S+ +", line).end() for line in out.stdout.splitlines() if line.startswith("  ")}
    assert len(columns) == 1 and "  mse+lpips+convnext " in out.stdout


@pytest.mark.parametrize("args,message", [
    (["run", "nope"], "unknown ablation 'nope'; valid: denoise"),
    (["run", "denoise", "--variants", "learned,bogus"], "unknown variant 'bogus' of ablation 'denoise'; valid: learned, score, none"),
    (["run", "denoise", "--scale", "huge"], "unknown scale 'huge'; valid scales: tiny, small"),
    (["run", "denoise", "--set", "stage2.steps=many"], "stage2.steps = 'many' has the wrong type; expected int"),
    (["run", "denoise", "--set", "stage2.stepz=3"], "unknown key 'stage2.stepz'; valid keys here: steps, "),
    (["run", "denoise", "--set", "stage2.stepz=3"], "; did you mean 'steps'?"),
    (["run", "denoise", "--set", "oops"], "expected KEY=VALUE"),
    (["bench", "speed", "--batch-sizes", "1,x"], "expected comma-separated integers"),
    (["progress", "--estimate-from", "no/such/dir"], "--estimate-from no/such/dir: no such directory"),
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
    tables = [name for name, spec in load_registry().items() if spec.kind == "quality"]  # not speed, nor studies
    for target, scale in (("demo", "tiny"), ("reproduce-small", "small")):
        plan = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=root, capture_output=True,
                              text=True, check=True).stdout
        own_target = ("one-nfe", "tarflow-")  # make reproduce-one-nfe, make reproduce-tarflow
        for name in tables if target == "demo" else [t for t in tables if not t.startswith(own_target)]:
            assert f"biflow-bench run {name} --scale {scale} --seed 0" in plan, (target, name)
        assert f"bench speed --scale {scale}" in plan and "biflow-bench report" in plan
    assert "--seed 1" in plan  # reproduce-small adds the second seed of the baselines
    one_nfe = subprocess.run(["make", "-n", "--no-print-directory", "reproduce-one-nfe"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
    assert all(f"biflow-bench run one-nfe --scale small --seed {s}" in one_nfe for s in (0, 1))
    demo = subprocess.run(["make", "-n", "--no-print-directory", "demo"], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    assert "biflow-bench report --results-dir results --out runs/demo/reports" in demo  # an ignored place: the git tree stays clean
    ignored = subprocess.run(["git", "check-ignore", "runs/demo/reports/README.md", "results/tiny/x.json"], cwd=root,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["runs/demo/reports/README.md", "results/tiny/x.json"]


@pytest.mark.parametrize("args,message", [
    (["bench", "speed", "--what", "nope"], "--what 'nope': use one of sample, train, all"),
    (["bench", "speed", "--what", "sampel"], "did you mean 'sample'?"),
    (["bench", "speed", "--repeats", "0"], "--repeats 0: must be a positive integer"),
    (["bench", "terms", "--batches", "0"], "--batches 0: must be a positive integer"),
    (["bench", "terms", "--variant", "perceptual-bth"], "did you mean 'perceptual-both'?"),
    (["bench", "terms", "--ablation", "inverse-strategy", "--variant", "exact"], "has no learned inverse"),
    (["progress", "--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers, e.g. 0,1"),
    (["bench", "speed", "--batch-sizes", "0"], "every batch size must be a positive integer"),
    (["bench", "speed", "--train-batch-sizes", "64,-1"], "--train-batch-sizes '64,-1': every batch size must be"),
    (["bench", "speed", "--device", "gpu"], "--device 'gpu': use cpu or cuda"),
    (["sample", "main", "biflow", "--num", "-3"], "--num -3: must be a positive integer"),
    (["sample", "main", "biflow", "--num", "0"], "--num 0: must be a positive integer"),
    (["sample", "main", "biflow", "--out", "/proc/g.png"], "--out /proc: directory is not writable"),
    (["sample", "main", "biflow", "--out", "g.jpg"], "--out g.jpg: use a .png path"),
    (["sample-dist", "main", "biflow", "--out", "g.jpg"], "--out g.jpg: use a .npz or .png path"),
    (["sample-dist", "main", "biflow", "--micro-batch", "0"], "--micro-batch 0: must be a positive integer"),
    (["run", "denoise", "--micro-batch", "-1"], "--micro-batch -1: must be a positive integer"),
    (["report", "--results-dir", "/nonexistent"], "--results-dir /nonexistent: no such directory"),
    (["run", "speed", "--variants", "learned"], "speed is the speed benchmark: it takes no --variants or --set"),
    (["run", "denoize"], "unknown ablation 'denoize'; valid: "),
    (["run", "denoize"], "; did you mean 'denoise'?"),
    (["run", "denoise", "--variants", "lerned"], "did you mean 'learned'?"),
    (["run", "denoise", "--scale", "tinny"], "did you mean 'tiny'?"),
    (["run", "denoise", "--variants", ","], "--variants ',': give comma-separated variant names of denoise, none "
                                            "empty"),
    (["run", "denoise", "--variants", "learned,,none"], "--variants 'learned,,none': give comma-separated"),
    (["run", "denoise", "--set", "stage2.lr=-1"], "stage2.lr=-1 is out of range: it must be > 0"),
    (["run", "denoise", "--set", "stage2.lr=nan"], "stage2.lr=nan is out of range: it must be > 0"),
    (["run", "denoise", "--set", "stage2.label_drop=1.5"], "stage2.label_drop=1.5 is out of range: it must be >= 0 "
                                                           "and <= 1"),
    (["run", "denoise", "--set", "stage2.ema_decay=2.0"], "stage2.ema_decay=2.0 is out of range"),
    (["run", "denoise", "--set", "stage2.warmup=-1"], "stage2.warmup=-1 is out of range: it must be >= 0"),
    (["--threads", "0", "list"], "--threads 0: must be a positive integer"),
    (["train-dist", "denoise", "learned", "--micro-batch", "0"], "--micro-batch 0: must be a positive integer"),
])
def test_every_bad_option_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(args, monkeypatch, capsys)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "g.jpg").exists() and not list(tmp_path.iterdir())  # nothing written


def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["bench", "speed", "--device", "cuda"], ["train-dist", "denoise", "learned", "--device", "cuda"]):
        code, _, err = invoke(args, monkeypatch, capsys)
        assert code == 2 and err.strip() == "error: --device cuda: torch sees no CUDA device here; use --device cpu"


def test_unwritable_report_out_names_out(tmp_path, monkeypatch, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "file").write_text("")
    code, _, err = invoke(["report", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "file" / "r")],
                          monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: --out {tmp_path / 'file' / 'r'}: directory is not writable")
    assert "pass another --out" in err and "--results-dir" not in err


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_ctrl_c_while_sampling_exits_130_with_one_line(command, tmp_path, monkeypatch, capsys):
    from biflow_bench import paths, runner

    monkeypatch.setattr(paths, "project_root", lambda: tmp_path)  # sample's default --out: not into the checkout

    def interrupted(*_a, **_k):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while sampling
        time.sleep(5)

    monkeypatch.setattr(runner, "sample_variant", interrupted)
    monkeypatch.chdir(tmp_path)
    code, _, err = invoke([command, "denoise", "learned", *FAST], monkeypatch, capsys)
    # training's progress lines (no terminal here) come first; the interruption is one line, no traceback
    *progress, last = err.strip().splitlines()
    assert code == 130 and all(line.startswith(("stage 1 (F): ", "stage 2 (G): ")) for line in progress), err
    assert last.startswith("interrupted: stopped by Ctrl-C") and "re-run the same command" in last


def test_help_is_plain_and_describes_arguments():
    out = cli("sample", "--help")
    assert out.returncode == 0 and "Usage: python -m biflow_bench sample [OPTIONS] ABLATION VARIANT" in out.stdout
    assert "ABLATION  ablation name" in out.stdout and "VARIANT   variant of the ablation" in out.stdout
    assert not any(noise in out.stdout for noise in ("<bool>", "<str>", "{ABLATION}", "{ablation}", "╭"))
    assert "--set KEY=VALUE" in out.stdout and "--num, --num-images INT" in out.stdout


def _checkout(tmp_path, monkeypatch):
    """A stand-in project root for the default paths (the real checkout stays untouched) and a working directory
    elsewhere; BIFLOW_CACHE unset, so the defaults are what is tested."""
    from biflow_bench import paths

    root, cwd = tmp_path / "checkout", tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.setattr(paths, "project_root", lambda: root)
    monkeypatch.delenv("BIFLOW_CACHE")
    monkeypatch.chdir(cwd)
    return root, cwd


def _grid_cells(path: Path, side: int) -> tuple[int, int]:
    """(columns, rows) of a grid of side x side images (1 px padding, shown at twice the size)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
    cell = 2 * (side + 1)
    assert (width - 2) % cell == 0 and (height - 2) % cell == 0, im.size
    return (width - 2) // cell, (height - 2) // cell


def test_sample_writes_every_image_asked_for(tmp_path, monkeypatch, capsys):
    """--num 7 is 7 images: three to a row, the last row partly filled (not a 2 x 2 square of 4)."""
    import torch

    from biflow_bench.ablations import get_spec
    from biflow_bench.data import save_image_grid

    out = tmp_path / "g.png"
    code, stdout, err = invoke(["sample", "denoise", "learned", "--num", "7", "--out", str(out), *FAST], monkeypatch,
                               capsys)
    assert code == 0, err
    side = get_spec("denoise").resolve("learned", "tiny", {}).flow.image_size
    assert _grid_cells(out, side) == (3, 3) and "7 images" in stdout
    for n, cells in ((4, (2, 2)), (5, (3, 2)), (10, (4, 3))):
        save_image_grid(torch.zeros(n, 1, 4, 4), tmp_path / f"{n}.png")
        assert _grid_cells(tmp_path / f"{n}.png", 4) == cells, n


def test_sample_writes_into_an_ignored_place_of_the_project_and_says_where(tmp_path, monkeypatch, capsys):
    root, cwd = _checkout(tmp_path, monkeypatch)
    code, stdout, err = invoke(["sample", "denoise", "learned", "--num", "4", "--seed", "3", *FAST], monkeypatch,
                               capsys)
    expected = root / "runs" / "samples" / "denoise-learned-tiny-seed3.png"
    assert code == 0 and expected.is_file() and str(expected) in stdout, err
    assert not list(cwd.iterdir())  # nothing in the working directory
    ignored = subprocess.run(["git", "check-ignore", "runs/samples/denoise-learned-tiny-seed3.png"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert ignored.returncode == 0, "runs/samples/ must be git-ignored"


def test_cache_and_results_follow_the_project_not_the_working_directory(tmp_path, monkeypatch, capsys):
    """A second `train` from another folder loads the models the first one trained (no second runs/cache)."""
    import json

    root, cwd = _checkout(tmp_path, monkeypatch)
    code, stdout, err = invoke(["train", "denoise", "learned", *FAST], monkeypatch, capsys)
    assert code == 0, err
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    code, stdout, err = invoke(["train", "denoise", "learned", *FAST], monkeypatch, capsys)
    summary = json.loads(stdout)
    assert code == 0 and summary["stage1"]["cached"] and summary["stage2"]["cached"], err
    assert (root / "runs" / "cache" / "stage1").is_dir() and not list(cwd.iterdir()) and not list(other.iterdir())


def test_default_paths_resolve_against_the_checkout_else_the_user_folders(tmp_path, monkeypatch):
    from biflow_bench import paths
    from biflow_bench.paths import default_cache_dir

    checkout = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("BIFLOW_CACHE")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "project_root", paths.find_checkout)  # the real one (conftest isolates every test)
    assert paths.project_root() == checkout
    assert default_cache_dir() == checkout / "runs" / "cache" and paths.default_results_dir() == checkout / "results"
    monkeypatch.setenv("BIFLOW_CACHE", "mine")  # the override, as given
    assert default_cache_dir() == Path("mine")
    monkeypatch.delenv("BIFLOW_CACHE")
    monkeypatch.setattr(paths, "project_root", lambda: None)  # installed outside a checkout
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "biflow-bench"
    assert paths.default_results_dir() == tmp_path / "home" / ".local" / "share" / "biflow-bench" / "results"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "biflow-bench"


def test_report_renders_the_committed_scales_unless_asked(tmp_path, monkeypatch, capsys):
    """`report` with no --scales leaves the git-ignored tiny scale out (the committed report stays as it is); asked
    for tiny without --out, it writes into runs/reports, not reports/."""
    from biflow_bench import paths
    from biflow_bench.results import write_record
    from report_records import make_record

    monkeypatch.setattr(paths, "project_root", lambda: tmp_path)
    results = tmp_path / "results"
    for scale in ("tiny", "small"):
        write_record(results, make_record("denoise", "learned", 0, 10.0, label="learned", scale=scale))
    code, out, _ = invoke(["report"], monkeypatch, capsys)
    assert code == 0 and "scales small" in out
    index = (tmp_path / "reports" / "README.md").read_text()
    assert "Scale `small`" in index and "Scale `tiny`" not in index and not (tmp_path / "reports" / "tiny").exists()
    code, out, _ = invoke(["report", "--scales", "tiny"], monkeypatch, capsys)
    assert code == 0 and (tmp_path / "runs" / "reports" / "tiny" / "denoise.md").is_file()
    assert "Scale `tiny`" not in (tmp_path / "reports" / "README.md").read_text()
    code, _, err = invoke(["report", "--scales", "tinny"], monkeypatch, capsys)
    assert code == 2 and "did you mean 'tiny'?" in err
    code, _, err = invoke(["report"], monkeypatch, capsys)  # the page and stderr say what was left out and why
    assert code == 0 and f"left out 1 record(s) of scale tiny ({results / 'tiny'}): --scales tiny renders" in err
    assert "Left out on purpose: the smoke-test records of `../results/tiny/`, `../results/tiny-latent/`, which " \
        "git ignores" in (tmp_path / "reports" / "README.md").read_text()


def test_report_of_another_results_directory_renders_every_scale_it_holds(tmp_path, monkeypatch, capsys):
    from biflow_bench.results import write_record
    from report_records import make_record

    results = tmp_path / "elsewhere"  # not the checkout's results/ (conftest: the checkout is tmp_path/checkout)
    write_record(results, make_record("denoise", "none", 0, 10.0, label="none", scale="tiny"))
    code, out, err = invoke(["report", "--results-dir", str(results), "--out", str(tmp_path / "y")], monkeypatch,
                            capsys)
    index = (tmp_path / "y" / "README.md").read_text()
    assert code == 0 and "scales tiny)" in out and "left out" not in err
    assert "## Scale `tiny`\n\nThis scale is a smoke test" in index and "No records found" not in index
    assert "Left out" not in index and (tmp_path / "y" / "tiny" / "denoise.md").is_file()
