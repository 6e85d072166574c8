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
