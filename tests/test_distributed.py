"""Multi-process training and sampling under torchrun (2 CPU processes, gloo): a DDP run resumes a one-process
checkpoint, writes only from rank 0 and trains exactly what one process with gradient accumulation trains; samples
do not depend on the number of processes or the batch size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import biflow_bench.training.stages as train_module
from biflow_bench.ablations import get_spec
from biflow_bench.config import ConfigError, TrainingConfig
from biflow_bench.data import load_digits
from biflow_bench.distributed import DistEnv, collective_timeout, gather_rows, init_from_env
from biflow_bench.identity import backward_key, flow_key
from biflow_bench.sample import Sampler, generate, sample_trained
from biflow_bench.training.cache import distributed_micro_batch, load_model
from biflow_bench.training.loop import TrainingInterrupted, fit
from biflow_bench.training.stages import train_backward, train_flow

# 12 + 6 steps of the tiny scale; global batch 16 in micro-batches of 8: two processes, or one accumulating twice
OVERRIDES = {"stage1.steps": 12, "stage2.steps": 6, "stage1.batch_size": 16, "stage2.batch_size": 16,
             "stage1.checkpoint_every": 4, "stage2.checkpoint_every": 4}
SET = [arg for k, v in OVERRIDES.items() for arg in ("--set", f"{k}={v}")]
MICRO = 8

# Runs the CLI and logs every file it publishes (atomic writes end in os.replace: checkpoints, artifacts, outputs)
# with the rank that made it.
LOGGING_CLI = """
import os, sys
replace = os.replace
def logged(src, dst, **kw):
    with open(os.environ["WRITE_LOG"], "a") as f:
        f.write(f"{os.environ['RANK']} {dst}\\n")
    return replace(src, dst, **kw)
os.replace = logged
from biflow_bench.cli import main
sys.argv[0] = "biflow-bench"
main()
"""


def torchrun(tmp: Path, cache: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, Path]]]:
    script, log = tmp / "logging_cli.py", tmp / "writes.log"
    script.write_text(LOGGING_CLI)
    log.unlink(missing_ok=True)
    env = {**os.environ, "BIFLOW_CACHE": str(cache), "WRITE_LOG": str(log), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    writes = [(line.split(" ", 1)[0], Path(line.split(" ", 1)[1])) for line in log.read_text().splitlines()]
    return out, writes



@pytest.fixture(scope="module")
def cfg():
    return get_spec("main").resolve("biflow", "tiny", OVERRIDES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cfg):
    """A one-process run of stage 1 interrupted at step 7 (its checkpoint in the cache), then resumed and finished
    (with stage 2) by `train-dist` on 2 processes."""
    tmp = tmp_path_factory.mktemp("dist")
    cache = tmp / "cache"
    ckpt = cache / "stage1" / flow_key(cfg, MICRO) / "checkpoint.pt"
    calls = []

    def interrupting_nll(model, x, y):
        calls.append(1)
        if len(calls) == 2 * 6 + 1:  # SIGINT during step 6 (2 micro-batches a step): checkpoint at step 7
            os.kill(os.getpid(), signal.SIGINT)
        return nll_loss(model, x, y)

    nll_loss = train_module.nll_loss
    train_module.nll_loss = interrupting_nll
    try:
        with pytest.raises(TrainingInterrupted):
            train_flow(cfg, load_digits().train, ckpt, progress=False, micro_batch=MICRO)
    finally:
        train_module.nll_loss = nll_loss
    assert torch.load(ckpt, weights_only=False)["step"] == 7
    out, writes = torchrun(tmp, cache, "train-dist", "main", "biflow", "--scale", "tiny", *SET,
                           "--micro-batch", str(MICRO))
    return tmp, cache, out, writes


@pytest.mark.slow
def test_torchrun_training_resumes_writes_once_and_matches_one_process(trained, cfg):
    tmp, cache, out, writes = trained
    summary = json.loads(out.stdout)  # one JSON document: only rank 0 printed
    assert summary["stage1"]["resumed_from"] == 7 and summary["stage1"]["world_size"] == 2
    assert summary["stage2"]["resumed_from"] == 0 and summary["stage2"]["micro_batch"] == MICRO
    assert writes and {rank for rank, _ in writes} == {"0"}  # rank 1 wrote nothing
    s1, s2 = cache / "stage1" / flow_key(cfg, MICRO), cache / "stage2" / backward_key(cfg, 0, MICRO)
    written = [p for _, p in writes]
    assert written.count(s2 / "checkpoint.pt") == 1 and written.count(s1 / "checkpoint.pt") == 1  # steps 8, 4
    files = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(cache)) for p in (s1 / "flow.pt", s1 / "flow.pt.sha256",
                                                               s2 / "backward.pt", s2 / "backward.pt.sha256"))

    # one process accumulating 2 micro-batches of 8, uninterrupted: the same training up to float reduction order
    data = load_digits().train
    flow, _ = train_flow(cfg, data, progress=False, micro_batch=MICRO)
    g, _ = train_backward(cfg, flow, data, 0, progress=False, micro_batch=MICRO)
    for mine, path in ((flow, s1 / "flow.pt"), (g, s2 / "backward.pt")):
        theirs = load_model(path)[0].state_dict()
        for name, value in mine.state_dict().items():
            torch.testing.assert_close(value, theirs[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_samples_do_not_depend_on_processes_or_batch_size(trained, cfg):
    tmp, cache, _, _ = trained
    out, writes = torchrun(tmp, cache, "sample-dist", "main", "biflow", "--scale", "tiny", *SET,
                           "--num-images", "16", "--batch-size", "4", "--out", str(tmp / "two.npz"))
    assert json.loads(out.stdout)["processes"] == 2 and writes == [("0", tmp / "two.npz")]  # by rank 0 alone
    one = sample_trained(cfg, 0, num=16, batch_size=16, out=tmp / "one.npz", cache_dir=cache, micro_batch=MICRO)
    assert one["num_images"] == 16
    two, one = np.load(tmp / "two.npz"), np.load(tmp / "one.npz")
    assert two["arr_0"].shape == (16, 8, 8, 3) and two["arr_0"].dtype == np.uint8
    assert np.array_equal(two["arr_0"], one["arr_0"]) and two["labels"].tolist() == [i % 10 for i in range(16)]

    # the float samples themselves, per batch size, in one process
    flow = load_model(cache / "stage1" / flow_key(cfg, MICRO) / "flow.pt")[0]
    g = load_model(cache / "stage2" / backward_key(cfg, 0, MICRO) / "backward.pt")[0]
    labels = torch.arange(16) % 10
    by_batch = [generate(Sampler.from_config(cfg), flow, g, labels, range(16), b, 0) for b in (4, 16)]
    assert torch.equal(by_batch[0], by_batch[1])


def test_single_process_env_and_gather():
    env = init_from_env("cpu")
    assert env == DistEnv() and env.is_main and not env.distributed
    rows = torch.arange(6).view(3, 2)
    assert gather_rows(rows, env) is rows


def test_process_group_waits_for_rank_0s_evaluation(monkeypatch):
    """The other ranks wait at a collective while rank 0 evaluates alone: the group is made with a timeout far
    beyond NCCL's 10 minutes (BIFLOW_DIST_TIMEOUT_MIN), and a bad setting is refused in one line."""
    from datetime import timedelta
    import biflow_bench.distributed as distributed

    made = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: made.update(kw, backend=backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("BIFLOW_DIST_TIMEOUT_MIN", raising=False)
    assert init_from_env("cpu") == DistEnv(1, 2)
    assert made == {"backend": "gloo", "rank": 1, "world_size": 2, "timeout": timedelta(hours=2)}
    monkeypatch.setenv("BIFLOW_DIST_TIMEOUT_MIN", "300")
    assert collective_timeout() == timedelta(hours=5)
    for bad in ("0", "-5", "nan", "inf", "two hours"):
        monkeypatch.setenv("BIFLOW_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ConfigError, match="BIFLOW_DIST_TIMEOUT_MIN=.* is not a positive number of minutes"):
            collective_timeout()


def test_default_micro_batch_splits_both_stages_over_the_processes():
    """One micro-batch for both stages (every variant shares F): the largest that splits F's and G's batches
    evenly over the processes; a size that cannot is refused in one line before any training."""
    cfg = get_spec("main").resolve("biflow", "tiny")  # F trains at 64, G at 32
    assert (cfg.stage1.batch_size, cfg.stage2.batch_size) == (64, 32)
    assert distributed_micro_batch(cfg, DistEnv()) is None  # one process: one pass per batch
    assert distributed_micro_batch(cfg, DistEnv(0, 2)) == 16 and distributed_micro_batch(cfg, DistEnv(0, 4)) == 8
    assert distributed_micro_batch(cfg, DistEnv(0, 2), 8) == 8
    with pytest.raises(ConfigError, match="a training batch of 64 does not split into micro-batches of 10"):
        distributed_micro_batch(cfg, DistEnv(0, 3))
    with pytest.raises(ConfigError, match="batch of 32 does not split into micro-batches of 32 shared evenly by 2"):
        distributed_micro_batch(cfg, DistEnv(0, 2), 32)
    exact = get_spec("main").resolve("itarflow", "tiny")  # no G: only F's batch must split
    assert distributed_micro_batch(exact, DistEnv(0, 2), 32) == 32


def test_global_batch_must_split_evenly():
    model = torch.nn.Linear(2, 1)
    def train(batch_size):
        return TrainingConfig(steps=1, batch_size=batch_size, lr=1e-3, warmup=1, weight_decay=0.0)

    with pytest.raises(ConfigError, match="does not split into micro-batches of 5"):
        fit(model, lambda m, x, y, g: (m(x).sum(), {}), load_digits().train, train(16), seed=0, micro_batch=5,
            progress=False)
    with pytest.raises(ConfigError, match="shared evenly by 2 processes"):
        fit(model, lambda m, x, y, g: (m(x).sum(), {}), load_digits().train, train(24), seed=0, micro_batch=8,
            progress=False, env=DistEnv(0, 2))


@pytest.mark.slow
def test_torchrun_run_writes_the_one_process_record_and_leaves_a_busy_row(tmp_path):
    """`biflow-bench run` under torchrun at the tiny scale's own batches (F 64, G 32: the default micro-batch, 16,
    splits both over 2 processes): DDP training, sharded sampling, evaluation and the record on rank 0 alone; the
    record equals the one-process run's with the same micro-batch (float tolerance). While another job measures the
    row, a torchrun job leaves it to that job on every rank alike."""
    from biflow_bench import runner
    from biflow_bench.files import dir_lock

    steps = {k: v for k, v in OVERRIDES.items() if "batch_size" not in k}
    extra = {"sample.cfg_scale": 0.0, "sample.num_samples": 60, "eval.num_real": 60, "eval.nll_samples": 60}
    args = ["run", "main", "--variants", "biflow-mse", "--scale", "tiny",
            *[a for k, v in {**steps, **extra}.items() for a in ("--set", f"{k}={v}")],
            "--results-dir", str(tmp_path / "two")]
    out, writes = torchrun(tmp_path, tmp_path / "cache-two", *args)
    assert {rank for rank, _ in writes} == {"0"}  # rank 1 wrote nothing: no checkpoint, artifact or record
    (two,) = [Path(line) for line in out.stdout.splitlines() if line.endswith(".json")]
    opts = runner.RunOptions(results_dir=tmp_path / "one", cache_dir=tmp_path / "cache-one", progress=False,
                             overrides={**steps, **extra}, micro_batch=16)
    (one,) = runner.run("main", ["biflow-mse"], "tiny", 0, opts)
    assert one.relative_to(tmp_path / "one") == two.relative_to(tmp_path / "two")  # the same config hash and name
    rec_one, rec_two = (json.loads(p.read_text()) for p in (one, two))
    assert rec_two["overrides"]["micro_batch"] == 16 and rec_two["config_hash"] == rec_one["config_hash"]
    assert rec_two["train"]["stage2"]["world_size"] == 2 and "world_size" not in rec_one["train"]["stage2"]
    assert rec_one["metrics"].keys() == rec_two["metrics"].keys()
    for key, value in rec_one["metrics"].items():
        assert rec_two["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key

    env = {**os.environ, "BIFLOW_CACHE": str(tmp_path / "cache-two"), "OMP_NUM_THREADS": "1"}
    before = two.stat().st_mtime_ns
    with dir_lock(tmp_path / "two" / "tiny" / "main", wait=False, name=".lock-biflow-mse-seed0"):
        busy = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "biflow_bench", *args], capture_output=True, text=True, timeout=300, env=env,
                              cwd=tmp_path)
    assert busy.returncode == 0, busy.stderr[-2000:]
    left = [line for line in busy.stderr.splitlines() if "left to it" in line]
    assert left == [f"[main/biflow-mse] being measured by pid {os.getpid()} (seed 0): left to it"], busy.stderr[-2000:]
    assert two.stat().st_mtime_ns == before and busy.stdout.strip() == ""  # every rank left the row alone


@pytest.mark.slow
def test_torchrun_sample_shares_the_sampling_and_rank_0_writes_the_grid(trained, cfg):
    """`biflow-bench sample` under torchrun: the models trained with the batch split over 2 processes (the cache
    of `trained`), each process samples its share, rank 0 writes the grid: the same PNG as one process makes."""
    from PIL import Image

    from biflow_bench.data import save_image_grid

    tmp, cache, _, _ = trained
    out, writes = torchrun(tmp, cache, "sample", "main", "biflow", "--scale", "tiny", *SET, "--num-images", "16",
                           "--out", str(tmp / "grid.png"))
    assert writes == [("0", tmp / "grid.png")] and out.stdout.count("grid.png") == 1
    flow = load_model(cache / "stage1" / flow_key(cfg, MICRO) / "flow.pt")[0]
    g = load_model(cache / "stage2" / backward_key(cfg, 0, MICRO) / "backward.pt")[0]
    images = generate(Sampler.from_config(cfg), flow, g, torch.arange(16) % 10, range(16), 16, 0)
    save_image_grid(images, tmp / "one.png", nrow=4)
    assert np.array_equal(np.asarray(Image.open(tmp / "grid.png")), np.asarray(Image.open(tmp / "one.png")))
