"""Tables of the docs/ pages rendered from the records they quote, so a page's numbers cannot drift from them.

A page marks each such table with a pair of comments, the table's name in the first:

    <!-- records-table: g-study-lr -->
    | lr | inverse MSE | ...
    <!-- /records-table -->

`update_page` rewrites what lies between the marks from the records (`python -m biflow_bench.report.doc_tables
docs/g-study.md`); tests/test_docs_numbers.py checks that the committed page equals its rendering. Each row is one
variant's default-config records, `results/<scale>/<ablation>/<variant>__seed<N>.json`, seeds averaged; a metric
with a bootstrap std gets its ± by the report's noise rule (stats.table_noise, format.fmt_ours)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .format import DASH, fmt_ours, fmt_sig, md_table
from .stats import table_noise

# key -> (header, record section, field, format: a format string, "sig" for three significant digits, or "±" for
# mean ± noise by the report's rule)
COLUMNS: dict[str, tuple[str, str, str, str]] = {
    "inverse_mse": ("inverse MSE", "diagnostics", "inverse_mse_clean", "sig"),
    "noise_sensitivity": ("noise sensitivity", "diagnostics", "noise_sensitivity", "{:.2f}"),
    "recall": ("recall", "metrics", "recall_effnet", "{:.3f}"),
    "precision": ("precision", "metrics", "precision_effnet", "{:.2f}"),
    "fd_effnet": ("fd_effnet", "metrics", "fd_effnet", "±"),
    "acc_cls": ("acc_cls", "metrics", "acc_cls", "{:.2f}"),
    "fd_cls": ("fd_cls", "metrics", "fd_cls", "±"),
    "train_s": ("G training (s, in-run)", "timing", "stage2_s", "{:.0f}"),
}


@dataclass(frozen=True)
class DocTable:
    ablation: str
    first: str                       # the first column's header
    rows: tuple[tuple[str, str], ...]  # (variant, the row's label)
    columns: tuple[str, ...]         # COLUMNS keys
    scale: str = "small"


_G = "g-training"
_LR_ROWS = (("centre", "1e-3 (former preset)"), ("lr-3e-3", "3e-3"), ("lr-1e-2", "1e-2"), ("lr-3e-2", "3e-2"),
            ("lr-1e-1", "1e-1"))
_AXES_ROWS = (("lr-1e-2", "800 steps"), ("steps-1600", "1,600 steps"), ("steps-3200", "3,200 steps"),
              ("steps-6400", "6,400 steps"), ("steps-12800", "12,800 steps"), ("depth-2", "2 layers per stage"),
              ("depth-3", "3 layers per stage"), ("width-192", "width 192"), ("batch-64", "batch 64"),
              ("batch-256", "batch 256"), ("adaptive-off", "no adaptive re-weighting (p = 0)"),
              ("hidden-quarter", "hidden-state weight 0.25"), ("schedule-constant", "constant after warm-up"),
              ("schedule-constant-1600", "constant after warm-up, 1,600 steps"), ("warmup-400", "warm-up 400"),
              ("ema-999", "EMA 0.999"), ("ema-off", "no EMA"))
_PERCEPTUAL_ROWS = (("lr-1e-2", "MSE only (lr 1e-2)"),
                    ("perceptual-both", "+ LPIPS + ConvNeXt stand-ins, weight 1 each"),
                    ("perceptual-lpips", "+ LPIPS stand-in alone"),
                    ("perceptual-weight-quarter", "both, weight 0.25 each"),
                    ("perceptual-crop-full", "both, on the whole image (no crop)"))

TABLES: dict[str, DocTable] = {
    "g-study-lr": DocTable(_G, "lr", _LR_ROWS, ("inverse_mse", "noise_sensitivity", "recall", "fd_effnet",
                                                   "acc_cls", "fd_cls")),
    "g-study-axes": DocTable(_G, "point", _AXES_ROWS, ("inverse_mse", "noise_sensitivity", "recall", "fd_effnet",
                                                          "acc_cls", "fd_cls", "train_s")),
    "g-study-perceptual": DocTable(_G, "point", _PERCEPTUAL_ROWS, ("inverse_mse", "recall", "precision",
                                                                     "fd_effnet", "acc_cls", "fd_cls", "train_s")),
}

MARK = re.compile(r"(<!-- records-table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /records-table -->)", re.S)
_DEFAULT = re.compile(r"^(?P<variant>.+)__seed(?P<seed>\d+)\.json$")


def variant_records(results_dir: Path, scale: str, ablation: str, variant: str) -> list[dict[str, Any]]:
    """A variant's default-config records (`<variant>__seed<N>.json`; not the hash-named records of other configs),
    by seed."""
    folder = results_dir / scale / ablation
    found = []
    for path in folder.glob(f"{variant}__seed*.json"):
        m = _DEFAULT.match(path.name)
        if m and m["variant"] == variant:
            found.append((int(m["seed"]), json.loads(path.read_text(encoding="utf-8"))))
    return [rec for _, rec in sorted(found, key=lambda f: f[0])]


def cell(records: Sequence[dict[str, Any]], key: str) -> str:
    _, section, field, fmt = COLUMNS[key]
    values = [r.get(section, {}).get(field) for r in records]
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values:
        return DASH
    mean = float(np.mean(values))
    if fmt == "sig":
        return fmt_sig(mean)
    if fmt != "±":
        return fmt.format(mean)
    stds = [r.get(section, {}).get(f"{field}_std") for r in records]
    return fmt_ours(mean, table_noise(pd.Series(values), pd.Series([s for s in stds if s is not None], dtype=float)))


def render_table(results_dir: Path, name: str) -> str:
    table = TABLES[name]
    cells = []
    for variant, label in table.rows:
        records = variant_records(results_dir, table.scale, table.ablation, variant)
        if not records:
            raise FileNotFoundError(f"no records of {table.ablation}/{variant} at scale {table.scale} under "
                                    f"{results_dir}: table {name} cannot be rendered")
        seeds = "" if len(records) == 1 else f" ({len(records)} seeds)"
        cells.append([label + seeds, *[cell(records, key) for key in table.columns]])
    header = [table.first, *[COLUMNS[key][0] for key in table.columns]]
    return md_table(header, cells, "l" + "r" * len(table.columns))


def update_page(text: str, results_dir: Path) -> str:
    """The page with every marked table rendered anew from the records."""
    unknown = [m["name"] for m in MARK.finditer(text) if m["name"] not in TABLES]
    if unknown:
        raise KeyError(f"unknown records-table name(s): {', '.join(unknown)}; known: {', '.join(TABLES)}")
    return MARK.sub(lambda m: m.group(1) + render_table(results_dir, m["name"]) + m.group(4), text)


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the marked tables of each page given (default docs/g-study.md) from the checkout's results/."""
    root = Path(__file__).resolve().parents[2]
    pages = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or [root / "docs" / "g-study.md"]
    for page in pages:
        old = page.read_text(encoding="utf-8")
        new = update_page(old, root / "results")
        if new != old:
            page.write_text(new, encoding="utf-8")
            print(f"updated {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
