"""The report's file writer: atomic writes under the output directory, remembering what was written, and the
manifest-based sweep of files a previous render wrote that this one no longer produces (never anything else).
"""

from __future__ import annotations

from pathlib import Path

from ..files import atomic_write_bytes, atomic_write_text


MANIFEST = ".report-manifest"


class ReportWriter:
    """Atomic writes under `out_dir`, remembering what was written (for the summary and the stale-file sweep)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.files: list[Path] = []

    def text(self, rel: str, text: str) -> str:
        self.files.append(atomic_write_text(self.out_dir / rel, text))
        return rel

    def bytes(self, rel: str, data: bytes) -> str:
        self.files.append(atomic_write_bytes(self.out_dir / rel, data))
        return rel


def sweep_stale(out_dir: Path, written: list[Path], scales: set[str] | None) -> list[Path]:
    """Delete files the previous render listed in its manifest and this one did not write (within `scales`, or
    anywhere when None), then record what exists now. Only manifest entries inside `out_dir` are touched, so a
    user's own files there are never deleted."""
    manifest = out_dir / MANIFEST
    now = {p.relative_to(out_dir).as_posix() for p in written}
    before = set(filter(None, manifest.read_text().split("\n"))) if manifest.is_file() else set()
    removed, kept = [], set()
    root = out_dir.resolve()
    for rel in sorted(before - now):
        p = out_dir / rel
        if not p.is_file() or not p.resolve().is_relative_to(root):
            continue
        if scales is None or rel.split("/", 1)[0] in scales:
            p.unlink()
            removed.append(p)
        else:
            kept.add(rel)
    atomic_write_text(manifest, "\n".join(sorted(now | kept)) + "\n")
    return removed
