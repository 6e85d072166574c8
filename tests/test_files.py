"""Atomic writes, checksummed artifacts and the results-directory lock."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from biflow_bench.files import (CorruptArtifact, LockBusy, atomic_torch_save, atomic_write_json, dir_lock,
                             verified_torch_load)


def test_checksummed_round_trip(tmp_path):
    path = atomic_torch_save({"w": torch.arange(5)}, tmp_path / "a.pt")
    assert torch.equal(verified_torch_load(path)["w"], torch.arange(5))
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-sidecar"])
def test_damaged_artifact_is_detected(tmp_path, damage):
    path = atomic_torch_save({"w": torch.randn(100)}, tmp_path / "a.pt")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        (tmp_path / "a.pt.sha256").unlink()
    with pytest.raises(CorruptArtifact, match="a.pt"):
        verified_torch_load(path)


def test_atomic_json_replaces_whole_file(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    atomic_write_json(tmp_path / "r.json", {"b": 2})
    assert (tmp_path / "r.json").read_text().strip() == '{\n  "b": 2\n}'


def _hold(directory, ready, release):
    with dir_lock(directory):
        ready.set()
        release.wait(10)


def test_lock_refuses_or_waits(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(20)
    with pytest.raises(LockBusy, match="in use by pid"):
        with dir_lock(tmp_path, wait=False):
            pass
    release.set()
    start = time.monotonic()
    with dir_lock(tmp_path, wait=True, timeout=20):  # granted once the holder exits
        assert time.monotonic() - start < 20
    holder.join(10)


def test_written_files_get_the_usual_mode_not_0600(tmp_path):
    """Records, reports and cache files in a shared folder must be readable by others (umask 022: 0644)."""
    import os
    import stat

    from biflow_bench.files import atomic_torch_save, atomic_write_text

    old = os.umask(0o022)
    try:
        paths = [atomic_write_text(tmp_path / "r.json", "{}"), atomic_torch_save({"a": 1}, tmp_path / "m.pt")]
        paths.append(tmp_path / "m.pt.sha256")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [0o644] * 3


def test_an_artifact_in_training_is_waited_for_and_loaded_not_trained_again(tmp_path):
    """Two runs side by side on one cache (two tables): the second finds the artifact's lock held by the first,
    waits, and loads what the first stored instead of training it again."""
    import threading

    from biflow_bench.distributed import DistEnv
    from biflow_bench.models import TARFlow, preset_configs
    from biflow_bench.training import cache

    cfg = preset_configs("tiny")[0]
    directory, model = tmp_path / "stage1" / "key", TARFlow(cfg)
    trained, out = [], []

    def train(checkpoint):
        trained.append(checkpoint)
        raise AssertionError("trained again")

    with dir_lock(directory, wait=False):  # the first run, training
        waiter = threading.Thread(target=lambda: out.append(cache._stage(directory, "flow.pt", cfg, train, DistEnv())))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and not out  # the second run waits
        cache.save_model(model, directory / "flow.pt", {"seconds": 1.0})
    waiter.join(timeout=30)
    loaded, artifact = out[0]
    assert not trained and artifact.cached and artifact.meta == {"seconds": 1.0}
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
