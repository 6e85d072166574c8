"""The speed record as a terminal table (`biflow-bench bench speed` prints it).
"""

from __future__ import annotations

import math
from typing import Any


def _fmt(v: Any, spec: str, dash: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return dash
    return format(v, spec)


def format_speed_table(record: dict[str, Any]) -> str:
    """A markdown table of a speed record's rows, with the machine and the notes underneath."""
    head = ["sampler", "NFE", "serial steps", "batch", "ms/image", "images/s", "speed-up", "% peak", "params (M)",
            "GFLOP/image", "paper ms", "paper speed-up"]
    body = []
    for r in record["rows"]:
        body.append([
            str(r["sampler"]), str(r.get("nfe_label") or r.get("nfe", "")), _fmt(r.get("nfe"), "d"),
            str(r["batch_size"]),
            _fmt(r.get("ms_per_image"), ".3f"), _fmt(r.get("images_per_s"), ".1f"),
            _fmt(r.get("speedup"), ".2f") if r.get("speedup") is None else f"x{r['speedup']:.2f}",
            _fmt(None if r.get("peak_fraction") is None else 100 * r["peak_fraction"], ".1f"),
            _fmt(None if r.get("params") is None else r["params"] / 1e6, ".3f"),
            _fmt(None if r.get("flops_per_image") is None else r["flops_per_image"] / 1e9, ".4f"),
            _fmt(r.get("paper_ms"), ".2f"),
            "-" if r.get("paper_speedup") is None else f"x{r['paper_speedup']:.0f}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    right = {i for i in range(2, len(head))}  # numbers

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    m = record.get("machine", {})
    peak = m.get("matmul_peak_flops")
    title = (f"{record.get('label', 'Sampling speed')} - scale {record.get('scale')}, {m.get('device', '?')}, "
             f"matmul peak {_fmt(None if peak is None else peak / 1e9, '.1f')} GFLOP/s"
             + (f" (bf16 {m['matmul_peak_flops_bf16'] / 1e9:.1f} GFLOP/s)" if m.get("matmul_peak_flops_bf16") else ""))
    out = [title, "", line(head), sep, *(line(r) for r in body)]
    paper = record.get("paper", {}).get("table")
    if paper:
        out += ["", f"paper: {paper}"]
    return "\n".join(out) + "\n"
