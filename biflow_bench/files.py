"""Files that survive kills: atomic writes (temp file, fsync, rename), sha256 sidecars, and a directory lock.

A reader never sees a half-written file: every artifact is written to a temp file in the same directory, fsynced
and renamed over the target. Checkpoints and cached models carry a `<name>.sha256` sidecar written after the file;
a file whose digest does not match (or has no sidecar) is reported by name as `CorruptArtifact`, never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class CorruptArtifact(RuntimeError):
    """A checkpoint or cached artifact failed its checksum (truncated, bit-flipped or half-written)."""


class LockBusy(RuntimeError):
    """Another process holds a directory lock; `holder` says which ("pid N")."""

    def __init__(self, message: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.holder = holder


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_temp(path: Path, data: bytes) -> str:
    """`data` in a fsynced temp file beside `path` (same filesystem, so it can be renamed over it), with the mode an
    ordinary file gets under the process's umask (mkstemp's 0600 would hide records in a shared results folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _replace_all(pairs: list[tuple[str, Path]]) -> None:
    """Rename each temp file over its target, back to back, then make the renames durable."""
    try:
        for tmp, path in pairs:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in pairs:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(pairs[0][1].parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    path = Path(path)
    _replace_all([(_write_temp(path, data), path)])
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def atomic_torch_save(obj: Any, path: Path | str) -> Path:
    """torch.save to bytes, then the file and its checksum sidecar, each written atomically (file first).

    Both are fully written and fsynced to temp files before either is renamed, so a kill can only separate the
    new file from its digest between two back-to-back renames (and the pair is then reported as corrupt)."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    data_tmp = _write_temp(path, data)
    try:
        digest_tmp = _write_temp(_sidecar(path), (sha256_bytes(data) + "\n").encode())
    except BaseException:
        os.unlink(data_tmp)
        raise
    _replace_all([(data_tmp, path), (digest_tmp, _sidecar(path))])
    return path


def verified_torch_load(path: Path | str) -> Any:
    """Load a file written by `atomic_torch_save` after checking its digest against the sidecar."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not sidecar.exists():
        raise CorruptArtifact(f"{path}: no checksum sidecar {sidecar.name} (interrupted write?)")
    data = path.read_bytes()
    expected = sidecar.read_text().strip()
    if sha256_bytes(data) != expected:
        raise CorruptArtifact(f"{path}: checksum mismatch (truncated or corrupted file)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # a matching digest over a file torch cannot read
        raise CorruptArtifact(f"{path}: unreadable ({e})") from None


def remove_artifact(path: Path | str) -> None:
    path = Path(path)
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


@contextlib.contextmanager
def dir_lock(directory: Path | str, wait: bool = True, timeout: float | None = None,
             name: str = ".lock") -> Iterator[Path]:
    """An exclusive advisory lock on `directory/name` (flock: released by the kernel if the holder dies).

    wait=False raises LockBusy at once; otherwise waits, up to `timeout` seconds when given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / name
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not wait or (timeout is not None and time.monotonic() - start > timeout):
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                    raise LockBusy(f"{directory} is in use by {holder}; wait for it to finish or use another "
                                   "--results-dir", holder) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
