"""The rehearsal of a latent scale at its real shapes (`biflow-bench rehearse`): under torchrun with 2 CPU processes
every decoder runs, the exact ones agree, the record says which weights were random; random weights only by name."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biflow_bench.cli import main
from biflow_bench.metrics.extractors import INCEPTION_NAME, extract_features
from biflow_bench.rehearsal import DECODERS, random_inception


@pytest.mark.slow
def test_rehearsal_under_torchrun_runs_every_decoder_and_marks_random_weights(tmp_path):
    out = tmp_path / "tiny-latent.json"
    env = {**os.environ, "BIFLOW_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "biflow_bench", "rehearse", "--scale", "tiny-latent", "--random-weights", "vae",
                          "--out", str(out)], capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(out)  # rank 0 alone prints and writes
    rec = json.loads(out.read_text())
    assert rec["rehearsal"] is True and rec["world_size"] == 2 and rec["latent_shape"] == [4, 16, 16]
    assert "random weights" in rec["weights"]["vae"] and rec["weights"]["inception"] == "pretrained"
    assert rec["train"]["stage1"]["world_size"] == 2 and rec["train"]["stage2"]["steps"] == 2
    assert list(rec["decoders"]) == [name for name, _ in DECODERS]
    for name, d in rec["decoders"].items():
        assert d["shape"] == [4, 3, 32, 32] and d["dtype"] == "uint8" and math.isfinite(d["fd_effnet"]), name
        if name in ("exact-jacobi", "exact-compiled"):  # one inverse solved three ways: a grey level or so apart
            assert d["max_levels_from_serial"] <= 2, (name, d)
    assert rec["decoders"]["learned"]["nfe"] == "1" and rec["seconds"]["total_s"] > 0


def test_random_inception_loads_through_the_real_path_only_when_named(tmp_path, monkeypatch):
    """A random Inception of the real architecture, saved where BIFLOW_INCEPTION_WEIGHTS points: features of the
    real dimension through the real loading code; seeded, so made twice it is the same network."""
    a, b = random_inception(tmp_path / "a.pth"), random_inception(tmp_path / "b.pth")
    sa, sb = torch.load(a), torch.load(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    monkeypatch.setenv("BIFLOW_INCEPTION_WEIGHTS", str(a))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    feats = next(iter(extract_features(images, INCEPTION_NAME).values()))
    assert feats.shape == (2, 2048) and feats.std() > 0


@pytest.mark.parametrize("args, message", [
    (["--random-weights", "vgg16"], "random weights can stand in for vae, inception only"),
    (["--scale", "small"], "scale 'small' has no latent path"),
    (["--num-images", "0"], "--num-images"),
])
def test_rehearse_refuses_bad_options_in_one_line(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BIFLOW_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["biflow-bench", "rehearse", *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_readme_states_the_committed_rehearsals_minutes_and_memory():
    root = Path(__file__).resolve().parent.parent
    rec = json.loads((root / "results" / "rehearsal" / "paper.json").read_text())
    assert rec["rehearsal"] is True and rec["scale"] == "paper" and rec["world_size"] == 2
    assert rec["params"]["flow"] > 100e6 and rec["image_side"] == 256
    assert list(rec["decoders"]) == [name for name, _ in DECODERS]
    readme = " ".join((root / "README.md").read_text().split())
    minutes, gib = re.search(r"It took ([\d.]+) min, ([\d.]+) GiB per process", readme).groups()
    assert (minutes, gib) == (f"{rec['seconds']['total_s'] / 60:.1f}", f"{rec['peak_rss_gib_per_process']:.1f}")
