"""Pages of the benchmark records that are not ablation tables: quality against training time (`bench curve`) and
the speed-up against the exact inverse's serial steps (`bench scaling`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..curve import flattening
from .figures import curve_figure, scaling_figure
from .format import fmt_num, md_table
from .writer import ReportWriter

# metric -> higher is better; the curve page's columns where a record has them
CURVE_METRICS = {"fd_effnet": False, "fd_cls": False, "acc_cls": True, "conf_cls": True, "bpd": False}


def _flattening_sentence(points: Sequence[dict[str, Any]], metric: str, w: float, higher: bool) -> str:
    flat = flattening(list(points), metric, w, higher)
    if flat is None:
        return f"`{metric}` at w = {w:g}: every doubling of training improved it by more than its noise."
    return (f"`{metric}` at w = {w:g}: flat from step {flat['step']} (doubling to step {flat['to_step']} gained "
            f"{fmt_num(flat['gain'], 3)}, within the noise {fmt_num(flat['noise'], 3)}).")


def curves_page(w: ReportWriter, scale: str, records: Sequence[dict[str, Any]]) -> str:
    """`<scale>/curves.md`: per curve record a figure, the points and where each metric flattens. Returns the
    page's path relative to the report."""
    md = [f"# Quality against training time: scale `{scale}`\n",
          "Snapshots of one training run scored by the tables' metrics (`biflow-bench bench curve`): F by its exact "
          "inverse with score denoising, G by its one pass. The learning rate decays over the whole run, so a point "
          "is not a shorter run's final model. A metric *flattens* where doubling the training gained no more than "
          "one point's noise (bootstrap std for the Fréchet distances, standard error for acc_cls / conf_cls).\n"]
    for rec in records:
        points, name = rec["points"], f"curve-{rec['variant']}-seed{rec['seed']}"
        metrics = [m for m in CURVE_METRICS if any(m in p["metrics"] for p in points)]
        shown = [m for m in metrics if m != "bpd"]
        title = f"{rec.get('label') or rec['variant']}, seed {rec['seed']} (scale {scale})"
        w.bytes(f"{scale}/{name}.png", curve_figure(points, shown, title))
        steps = sorted({p["step"] for p in points})
        md.append(f"## {rec.get('label') or rec['variant']}, seed {rec['seed']}\n")
        md.append(f"![{title}]({name}.png)\n")
        if rec.get("checkpoints"):
            md.append(f"Scored after training (`--from-checkpoints`): {rec['checkpoints']} training checkpoints of "
                      "the run that made the cached model, then that model; minutes are the checkpoints' own "
                      "training time.\n")
        cells = [[str(p["step"]), fmt_num(p["train_s"] / 60, 1), f"{p['w']:g}",
                  *[fmt_num(p["metrics"].get(m), 3) for m in metrics]]
                 for p in sorted(points, key=lambda p: (p["step"], p["w"]))]
        md.append(md_table(["Step", "Minutes", "w", *metrics], cells, "rrr" + "r" * len(metrics)))
        if len(steps) > 1:
            md.append("".join(f"- {_flattening_sentence(points, m, wv, CURVE_METRICS[m])}\n"
                              for m in shown for wv in sorted({p['w'] for p in points})))
    w.text(f"{scale}/curves.md", "\n".join(md))
    return f"{scale}/curves.md"


def scaling_page(w: ReportWriter, scale: str, record: dict[str, Any]) -> str:
    """`<scale>/speed-scaling.md`: the speed-up of G over the exact inverse against serial steps, measured and in
    FLOPs. Returns the page's path relative to the report."""
    rows = record["rows"]
    title = "Exact inverse (+ CFG + score step) against one pass of G, paper-B/2 models on this machine"
    w.bytes(f"{scale}/speed-scaling.png", scaling_figure(rows, title))
    cells = [[str(r["latent_side"]), str(r["tokens"]), str(r["serial_steps"]), fmt_num(r["ms_exact"], 1),
              fmt_num(r["ms_learned"], 1), f"×{fmt_num(r['speedup'], 1)}", f"×{fmt_num(r['flop_ratio'], 2)}"]
             for r in rows]
    md = ["# Where the speed-up comes from\n",
          "Randomly initialised iTARFlow-B/2 and BiFlow-B/2 (timing needs no training) on latents of growing side, "
          f"patch 2, batch {rows[0]['batch_size'] if rows else '?'} (`biflow-bench bench scaling`). The exact inverse "
          "decodes one token per block at a time (serial steps = blocks x (tokens - 1)), guided and followed by one "
          "score step; G is one pass. The FLOP ratio is the speed-up if both ran at the same FLOP/s: where the "
          "measured ratio is above it, the exact inverse loses to serial latency, not to arithmetic.\n",
          md_table(["Latent side", "Tokens", "Serial steps", "Exact ms / image", "G ms / image", "Measured",
                    "FLOP ratio"], cells, "rrrrrrr"),
          "![speed-up against serial steps](speed-scaling.png)\n"]
    w.text(f"{scale}/speed-scaling.md", "\n".join(md))
    return f"{scale}/speed-scaling.md"
