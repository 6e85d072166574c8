"""Pages of the benchmark records that are not ablation tables: quality against training time (`bench curve`), the
speed-up against the exact inverse's serial steps (`bench scaling`) and the speed table (`bench speed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from ..ablations import AblationSpec
from ..curve import flattening
from .figures import curve_figure, scaling_figure, speed_figure
from .format import DASH, dedup, fmt_count, fmt_num, fmt_sig, fmt_text, md_table, notes_block, tex_table
from .writer import ReportWriter

# metric -> higher is better; the curve page's columns where a record has them
CURVE_METRICS = {"fd_effnet": False, "fd_cls": False, "acc_cls": True, "conf_cls": True, "bpd": False}


def _flattening_sentence(points: Sequence[dict[str, Any]], metric: str, w: float, higher: bool) -> str:
    flat = flattening(list(points), metric, w, higher)
    if flat is None:
        return f"`{metric}` at w = {w:g}: every doubling of training improved it by more than its noise."
    return (f"`{metric}` at w = {w:g}: flat from step {flat['step']} (doubling to step {flat['to_step']} gained "
            f"{fmt_num(flat['gain'], 3)}, within the noise {fmt_num(flat['noise'], 3)}).")


def _schedule_sentence(rec: dict[str, Any]) -> str:
    """Whether a point stands for a shorter run: under cosine decay the learning rate depends on the run's length."""
    stage = rec["config"][{"flow": "stage1", "backward": "stage2"}.get(rec["stage"], "peer")]
    if stage.get("schedule", "cosine") == "constant":
        return (f"Learning rate {stage['lr']:g}, constant after a {stage['warmup']}-step warm-up: it does not depend "
                f"on the run's length ({stage['steps']:,} steps).\n")
    return (f"Learning rate {stage['lr']:g} with cosine decay over the whole run ({stage['steps']:,} steps), so a "
            "point is not a shorter run's final model.\n")


def curves_page(w: ReportWriter, scale: str, records: Sequence[dict[str, Any]]) -> str:
    """`<scale>/curves.md`: per curve record a figure, the points and where each metric flattens. Returns the
    page's path relative to the report."""
    md = [f"# Quality against training time: scale `{scale}`\n",
          "Snapshots of one training run scored by the tables' metrics (`biflow-bench bench curve`): F by its exact "
          "inverse with score denoising, G by its one pass, a 1-NFE peer by its own sampler. A metric *flattens* where doubling the training gained "
          "no more than one point's noise (bootstrap std for the Fréchet distances, standard error for acc_cls / "
          "conf_cls).\n"]
    for rec in records:
        points, name = rec["points"], f"curve-{rec['variant']}-seed{rec['seed']}"
        metrics = [m for m in CURVE_METRICS if any(m in p["metrics"] for p in points)]
        shown = [m for m in metrics if m != "bpd"]
        title = f"{rec.get('label') or rec['variant']}, seed {rec['seed']} (scale {scale})"
        w.bytes(f"{scale}/{name}.png", curve_figure(points, shown, title))
        steps = sorted({p["step"] for p in points})
        md.append(f"## {rec.get('label') or rec['variant']}, seed {rec['seed']}\n")
        md.append(f"![{title}]({name}.png)\n")
        md.append(_schedule_sentence(rec))
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


def is_training(sampler: str) -> bool:
    """A speed row of an optimisation step (speed/benchmark.py's train-flow, train-backward), not of a sampler."""
    return sampler.startswith("train-")


def _per_batch(rows: pd.DataFrame, samplers: Sequence[str], batches: Sequence[float], col: str,
               fmt: Callable[[float], str]) -> list[list[str]]:
    """One cell per (sampler, batch size): `fmt` of the column, or a dash where that pair was not timed."""
    cell = {(r.sampler, r.batch_size): getattr(r, col) for r in rows.itertuples()}
    return [[fmt(cell[s, b]) if (s, b) in cell else DASH for b in batches] for s in samplers]


def speed_page(w: ReportWriter, scale: str, speed: pd.DataFrame, spec: AblationSpec | None,
               quality_link: str | None, comment: str | None) -> None:
    """The speed record's page: per sampler its time and speed-up at each batch size (the batch in the header), its
    cost (serial steps, FLOPs, parameters, share of the matmul peak), the paper's times, and the training steps."""
    # Several speed records (seeds) at one scale: average each (sampler, batch size) cell.
    listed = list(spec.variants) if spec else []
    first_seen = list(dict.fromkeys(speed.sort_values(["seed", "order"])["sampler"]))
    order = [s for s in listed if s in first_seen] + sorted(s for s in first_seen if s not in listed)
    agg = (speed.groupby(["sampler", "batch_size"], sort=False)
           .agg(label=("label", "first"), nfe=("nfe_label", "first"), serial=("nfe", "first"),
                flops=("flops_per_image", "mean"), params=("params", "mean"),
                ms_per_image=("ms_per_image", "mean"), images_per_s=("images_per_s", "mean"),
                speedup=("speedup", "mean"), peak_fraction=("peak_fraction", "mean"), paper_ms=("paper_ms", "mean"),
                paper_speedup=("paper_speedup", "mean"), records=("seed", "nunique"))
           .reset_index())
    agg["_o"] = agg["sampler"].map(order.index)
    agg = agg.sort_values(["_o", "batch_size"], kind="stable").drop(columns="_o").reset_index(drop=True)
    training = agg["sampler"].map(is_training)
    sampling, steps = agg[~training], agg[training]
    first = sampling.drop_duplicates("sampler").set_index("sampler")
    # A decoder whose step count depends on the batch (Jacobi) lists each count it took.
    joined = sampling.groupby("sampler", sort=False).agg(
        nfe=("nfe", lambda x: " / ".join(dict.fromkeys(v for v in x if isinstance(v, str) and v))),
        serial=("serial", lambda x: "/".join(dict.fromkeys(fmt_count(v) for v in x))))
    samplers, batches = list(first.index), sorted(set(sampling["batch_size"]))
    at = [f"batch {b:g}" for b in batches]

    def times(x: float) -> str:
        return DASH if math.isnan(x) else f"×{fmt_num(x, 1)}"

    header = ["Sampler", "NFE", *[f"ms / image ({b})" for b in at], *[f"speed-up vs exact ({b})" for b in at]]
    cells = [[first.at[s, "label"], fmt_text(joined.at[s, "nfe"]), *ms, *up]  # NFE: the CLI's label, as `bench speed`
             for s, ms, up in zip(samplers, _per_batch(sampling, samplers, batches, "ms_per_image", fmt_sig),
                                  _per_batch(sampling, samplers, batches, "speedup", times))]
    cost = [[first.at[s, "label"], joined.at[s, "serial"], fmt_sig(first.at[s, "flops"] / 1e9, 2),
             fmt_count(first.at[s, "params"]), *[DASH if c == DASH else f"{c}%" for c in peak]]
            for s, peak in zip(samplers, _per_batch(sampling, samplers, batches, "peak_fraction",
                                                    lambda x: fmt_sig(100 * x, 2)))]
    paper = [f"{first.at[s, 'label']} {fmt_sig(first.at[s, 'paper_ms'], 2)} ms"
             + ("" if math.isnan(first.at[s, "paper_speedup"]) else f" (×{fmt_num(first.at[s, 'paper_speedup'], 0)})")
             for s in samplers if math.isfinite(first.at[s, "paper_ms"])]
    machines = sorted({(str(d), float(p)) for d, p in zip(speed["device"], speed["matmul_peak_flops"])})
    title = spec.title if spec else "Sampling speed"
    md = [f"# {title}: scale `{scale}`\n"]
    if spec:
        md.append(f"Paper: {spec.paper_table}.\n")
    md.append("Machine: " + "; ".join(f"device `{d}`, measured matmul peak {fmt_count(p)}FLOP/s" for d, p in machines)
              + ".\n")
    md.append(md_table(header, cells, "ll" + "r" * (len(header) - 2)))
    md.append("Speed-up vs exact: the exact serial inverse's ms per image over the sampler's, at the same batch size; "
              "at batch 1 the exact inverse's serial steps set the time, at larger batches they run as batched "
              "matrix products."
              + (f" The paper's times per image (TPU, without the VAE decoder): {'; '.join(paper)}: compare "
                 "speed-ups, not milliseconds." if paper else "") + "\n")
    if comment:
        md.append(f"**Why.** {comment}\n")
    md.append("![ms per image against batch size](speed.png)\n")
    md.append("Files: [CSV](speed.csv) · [LaTeX](speed.tex)"
              + (f" · [speed against quality]({quality_link})" if quality_link else "") + "\n")
    md.append("## Cost per image\n\nSerial steps: the network evaluations an image waits for one after the other (the "
              "exact inverse: one per token and flow block; CFG batches its two passes, the score step adds one).\n\n"
              + md_table(["Sampler", "Serial steps", "GFLOP / image", "Params", *[f"% of matmul peak ({b})" for b in at]],
                         cost, "l" + "r" * (3 + len(at))))
    if len(steps):
        md.append("## Training step\n\nOne optimisation step per setting; speed-up over the stage's first setting "
                  "at the same batch.\n\n"
                  + md_table(["Training step", "Batch", "ms / image", "images / s", "speed-up (same batch)",
                              "% of matmul peak"],
                             [[r.label, fmt_count(r.batch_size), fmt_sig(r.ms_per_image), fmt_sig(r.images_per_s),
                               times(r.speedup), f"{fmt_sig(100 * r.peak_fraction, 2)}%"] for r in steps.itertuples()],
                             "lrrrrr"))
    notes = dedup([n for ns in speed["notes"] for n in ns])
    if notes:
        md.append("## Notes\n\n" + notes_block(notes))
    w.text(f"{scale}/speed.md", "\n".join(md))
    csv = agg.assign(scale=scale, batch_size=agg["batch_size"].astype("Int64"))
    w.text(f"{scale}/speed.csv", csv[["scale", *agg.columns]].to_csv(index=False, lineterminator="\n"))
    w.text(f"{scale}/speed.tex", tex_table(header, cells, "ll" + "r" * (len(header) - 2), f"{title}; scale {scale}",
                                           f"tab:{scale}-speed"))
    w.bytes(f"{scale}/speed.png", speed_figure(speed, order, f"{title} (scale {scale})"))
