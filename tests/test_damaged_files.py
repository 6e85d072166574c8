"""Damaged files are named and never trusted (tiny_runs.RUN, starting from copies of conftest's clean run):

    cached artifacts    truncated / bit-flipped / foreign flow.pt and backward.pt: a warning naming each, rebuilt
                        exactly as the clean run built them
    results files       truncated or foreign JSON: `report` names and skips it; `run` does not count it as done
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from biflow_bench import runner
from biflow_bench.report.format import fmt_ours
from biflow_bench.results import read_record, record_path
from biflow_bench.training.cache import load_model
from cli_helpers import invoke
from tiny_runs import CACHED, HASH, KEY1, KEY2, comparable, copy_cache, flip, opts, sidecar, truncate

# ----------------------------------------------------------------------------------------------------------------------
# corrupted, truncated or foreign cached artifacts


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
# truncated or foreign JSON in results/


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
