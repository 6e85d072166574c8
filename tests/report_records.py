"""Hand-made result records for the report tests (and any test that needs a record on disk): make_record and
speed_record, build_results (two quality tables and a speed record; conftest's `results` and `rendered`),
add_bad_files, variant_of (a record of another config), and table_rows to read a rendered page's tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from biflow_bench.results import RESULT_SCHEMA, record_path, write_record

# denoise: ours ranks learned < none < score, the paper learned < score < none -> one discordant pair of three.
DENOISE = {  # variant: (label, [values per seed], bootstrap std, paper FID, NFE)
    "learned": ("Learned denoising", [9.0, 11.0], 0.3, 31.88, 1),
    "score": ("Score-based denoising", [30.0], 0.5, 42.62, 2),
    "none": ("No denoising", [20.0], 0.7, 100.51, 1),
}


def make_record(ablation: str, variant: str, seed: int, value: float, *, label: str, std: float = 0.1,
                paper_fid: float | None = None, nfe: int = 1, inverse: str = "learned", ms: float = 1.0,
                scale: str = "tiny", notes: tuple[str, ...] = (), samples_png: str | None = None) -> dict[str, Any]:
    return {
        "schema": RESULT_SCHEMA, "kind": "ablation", "ablation": ablation, "variant": variant, "label": label,
        "scale": scale, "seed": seed, "spec_version": 1, "config": {"inverse": inverse, "scale": scale},
        "metric": "fd_effnet",
        "metrics": {"fd_effnet": value, "fd_effnet_std": std, "is_effnet": 3.0, "bpd": 1.5},
        "nfe": nfe, "nfe_label": str(nfe), "params": {"flow": 100, "backward": 50},
        "timing": {"ms_per_image": ms, "images_per_s": 1000.0 / ms},
        "paper": {"fid": paper_fid, "table": "Table 3", "nfe": nfe},
        "notes": list(notes), "samples_png": samples_png,
        "env": {"device": "cpu"}, "wall_time_s": 1.0, "created": "2026-11-23T10:00:00Z",
    }


def speed_record(scale: str = "tiny") -> dict[str, Any]:
    rows = []
    for sampler, label, nfe, ms1 in (("exact", "exact inverse", 64, 40.0), ("learned", "learned 1-NFE", 1, 0.8)):
        for bs in (1, 8):
            ms = ms1 / (1 if bs == 1 else 4)
            rows.append({"sampler": sampler, "label": label, "nfe": nfe, "params": 150, "flops_per_image": 1e6,
                         "batch_size": bs, "ms_per_image": ms, "images_per_s": 1000 / ms,
                         "speedup": (40.0 / ms1), "peak_fraction": 0.01, "paper_ms": None, "paper_speedup": None})
    return {"schema": RESULT_SCHEMA, "kind": "speed", "ablation": "speed", "variant": "bench", "scale": scale,
            "seed": 0, "rows": rows, "machine": {"device": "cpu", "matmul_peak_flops": 1e11},
            "notes": ["timed on CPU"]}


def build_results(rdir: Path) -> Path:
    """Two quality ablations (one with two seeds), a speed record, one sample grid."""
    grid = rdir / "tiny" / "samples" / "denoise" / "learned__seed0.png"
    grid.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(grid)
    for variant, (label, values, std, fid, nfe) in DENOISE.items():
        for seed, value in enumerate(values):
            write_record(rdir, make_record(
                "denoise", variant, seed, value, label=label, std=std, paper_fid=fid, nfe=nfe,
                notes=("perceptual networks use random weights (offline)",),
                samples_png="samples/denoise/learned__seed0.png" if (variant, seed) == ("learned", 0) else None))
    write_record(rdir, make_record("main", "biflow", 0, 5.0, label="BiFlow (learned)", paper_fid=2.39, ms=0.5))
    write_record(rdir, make_record("main", "itarflow", 0, 4.0, label="iTARFlow (exact)", paper_fid=6.83, nfe=129,
                                   inverse="exact", ms=50.0))
    write_record(rdir, speed_record())
    return rdir


def add_bad_files(rdir: Path) -> dict[str, Path]:
    """Four files a reader must skip, beside build_results' records: truncated, foreign, of an unknown schema, and a
    valid record under another seed's name."""
    good = record_path(rdir, "tiny", "denoise", "learned", 0).read_text()
    bad = {
        "truncated": rdir / "tiny" / "denoise" / "score__seed7.json",
        "foreign": rdir / "tiny" / "denoise" / "hello.json",
        "schema": rdir / "tiny" / "main" / "biflow__seed3.json",
        "moved": rdir / "tiny" / "main" / "biflow__seed4.json",
    }
    bad["truncated"].write_text(good[: len(good) // 2])
    bad["foreign"].write_text(json.dumps({"hello": 1}))
    bad["schema"].write_text(json.dumps({**make_record("main", "biflow", 3, 1.0, label="x"), "schema": 99}))
    bad["moved"].write_text(json.dumps(make_record("main", "biflow", 0, 1.0, label="x")))  # says seed 0
    return bad


def table_rows(md: str) -> dict[str, list[str]]:
    """First cell -> cells, for every body row of the pipe tables in `md` (the first row wins: the main table comes
    before the per-pair verdicts and the measurements, whose rows also start with a variant's label)."""
    rows: dict[str, list[str]] = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| :--") and not line.startswith("| --"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0], cells)
    return rows


def variant_of(base: dict[str, Any], seed: int, value: float, config: dict[str, Any],
               overrides: dict[str, Any] | None = None, version: int = 1) -> dict[str, Any]:
    """`base` as the record of another seed, value, config (its overrides) and spec version."""
    return {**base, "seed": seed, "metrics": {**base["metrics"], "fd_effnet": value}, "config": config,
            "overrides": overrides or {}, "spec_version": version}
