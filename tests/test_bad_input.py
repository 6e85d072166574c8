"""Runs that cannot succeed stop with one line naming what to fix, never a traceback:

    non-finite loss     stops naming the step, the loss terms and the last checkpoint, exit 1
    bad input           broken specs, missing weights, bad seeds and values: one line, exit 2, before any training
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from biflow_bench.files import verified_torch_load
from cli_helpers import invoke, one_line_error
from tiny_runs import RUN, SETS

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------------------------
# non-finite loss


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
# bad input: one line, exit 2, before any training


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

