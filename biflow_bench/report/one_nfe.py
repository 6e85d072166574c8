"""The 1-NFE comparison's own section of its page (ablations/one-nfe.toml): what each row cost to train and to
sample beside its quality, and three figures: quality against NFE (flow matching's step curve from the
`flow-matching-steps` study), against training compute (the curve records of F, G and each peer, scored at
checkpoints of their own runs) and against ms / image (the speed record).

Training FLOPs come from the budget a peer's record keeps (training/budget.equal_compute: FLOPs per step of F, the
MSE G and each peer at their batch sizes) times each row's recorded steps; minutes are the rows' own training time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .figures import png_bytes, wrap_label
from .format import DASH, fmt_num, md_table
from .writer import ReportWriter

TABLE = "one-nfe"
STEPS_STUDY = "flow-matching-steps"
# the speed table's row (ablations/speed.toml) that times each row's sampler
SPEED_ROW = {"itarflow": "exact-cfg-score", "biflow-mse": "learned-cfg", "biflow": "learned-cfg",
             "meanflow-1": "meanflow-1", "meanflow-2": "meanflow-2", "flow-matching-1": "flow-matching-1",
             "flow-matching-32": "flow-matching-32"}
SPEED_BATCHES = (1, 256)
# the curve records' x axis in FLOPs: F's steps, G's steps after F's whole run, a peer's steps
CURVE_LABELS = {"flow": "iTARFlow (F, exact inverse)", "backward": "BiFlow (G after F)", "meanflow": "MeanFlow",
                "flow-matching": "flow matching"}


def budget_of(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The FLOP budget the peers' records keep (the same at every seed of a scale; each record counts its own
    peer's step), merged, or None before any peer ran."""
    budgets = [r["train"]["budget"] for r in records if "budget" in r.get("train", {})]
    if not budgets:
        return None
    per_step = {k: v for b in budgets for k, v in b["flops_per_step"].items()}
    return {**budgets[0], "flops_per_step": per_step}


def training_cost(rec: dict[str, Any], budget: dict[str, Any] | None) -> tuple[float, float, bool]:
    """(training FLOPs, training seconds, whether the FLOPs are a lower bound) of one record: F's steps (+ G's) or
    the peer's. A G with perceptual terms costs more than the MSE G the budget counts: its FLOPs are a bound."""
    train, per_step = rec.get("train", {}), (budget or {}).get("flops_per_step", {})
    if "peer" in train:
        stages = [(train["peer"], per_step.get(rec["config"]["peer"]["kind"]))]
    else:
        stages = [(train[s], per_step.get(name)) for s, name in (("stage1", "flow"), ("stage2", "backward"))
                  if s in train]
    flops = sum(s["steps"] * f if f else math.nan for s, f in stages)
    seconds = sum(float(s.get("seconds", math.nan)) for s, _ in stages)
    lower_bound = "stage2" in train and rec["config"]["stage2"]["metric"] != "mse"
    return flops, seconds, lower_bound


def speed_ms(speed: pd.DataFrame, variant: str, batch: int) -> float:
    row = speed[(speed["sampler"] == SPEED_ROW.get(variant, variant)) & (speed["batch_size"] == batch)]
    return float(row["ms_per_image"].iloc[-1]) if len(row) else math.nan


def cost_rows(records: Sequence[dict[str, Any]], table: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """One row per variant of the table: NFE, parameters of the sampling networks, training FLOPs and minutes
    (seed means), ms / image at SPEED_BATCHES, and the table's metric."""
    budget = budget_of(records)
    out = []
    for r in table.itertuples():
        own = [rec for rec in records if rec["variant"] == r.variant]
        costs = [training_cost(rec, budget) for rec in own]
        # the networks that sample: G or the peer (in G's place), F for the exact inverse
        params = [rec.get("params", {}).get("backward") or rec.get("params", {}).get("flow", math.nan) for rec in own]
        out.append({"variant": r.variant, "label": r.label, "nfe_label": r.nfe_label,
                    "nfe": float(np.mean([rec.get("nfe", math.nan) for rec in own])) if own else math.nan,
                    "params": float(np.mean(params)) if params else math.nan,
                    "flops": float(np.mean([c[0] for c in costs])) if costs else math.nan,
                    "minutes": float(np.mean([c[1] for c in costs])) / 60 if costs else math.nan,
                    "bound": any(c[2] for c in costs), "ours": r.ours, "ours_std": r.ours_std,
                    **{f"ms_{b}": speed_ms(speed, r.variant, b) for b in SPEED_BATCHES}})
    return pd.DataFrame(out)


def steps_points(steps_records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Flow matching's step curve per solver: (NFE, metric) of each point of the steps study, seeds averaged."""
    by: dict[tuple[str, float], list[float]] = {}
    for rec in steps_records:
        solver = rec["config"]["sample"]["solver"]
        by.setdefault((solver, float(rec["nfe"])), []).append(float(rec["metrics"][rec["metric"]]))
    curves: dict[str, list[tuple[float, float]]] = {}
    for (solver, nfe), values in sorted(by.items()):
        curves.setdefault(solver, []).append((nfe, float(np.mean(values))))
    return curves


def compute_curves(curves: Sequence[dict[str, Any]], budget: dict[str, Any] | None, metric: str
                   ) -> dict[str, list[tuple[float, float]]]:
    """Per curve record, (training FLOPs, best `metric` over its guidance scales) at each scored step: F's steps,
    G's steps after F's whole run (its record's stage 1), a peer's steps."""
    per_step = (budget or {}).get("flops_per_step", {})
    out: dict[str, list[tuple[float, float]]] = {}
    for rec in curves:
        name = rec["variant"]
        if name not in CURVE_LABELS or name not in per_step:  # no budget yet: no FLOP axis
            continue
        offset = rec["config"]["stage1"]["steps"] * per_step.get("flow", math.nan) if name == "backward" else 0.0
        best: dict[int, float] = {}
        for p in rec["points"]:
            value = p["metrics"].get(metric)
            if isinstance(value, (int, float)):
                best[p["step"]] = min(best.get(p["step"], math.inf), float(value))
        out[f"{CURVE_LABELS[name]}, seed {rec['seed']}"] = [(offset + s * per_step[name], v)
                                                             for s, v in sorted(best.items())]
    return out


def _scatter(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    for x, y, label in zip(xs, ys, labels, strict=True):
        if np.isfinite(x) and np.isfinite(y):
            ax.plot(x, y, "o")
            ax.annotate(wrap_label(label, 24), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")


def one_nfe_figure(costs: pd.DataFrame, steps: dict[str, list[tuple[float, float]]],
                   curves: dict[str, list[tuple[float, float]]], metric: str, title: str) -> bytes:
    """Three panels: the metric against NFE, against training compute and against ms / image at the largest batch."""
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_nfe, ax_flops, ax_ms = fig.subplots(1, 3)
    for solver, pts in steps.items():
        ax_nfe.plot(*zip(*pts), "-", marker=".", label=f"flow matching, {solver} (steps study)")
    _scatter(ax_nfe, costs["nfe"], costs["ours"], costs["label"])
    for name, pts in curves.items():
        ax_flops.plot([x / 1e12 for x, _ in pts], [y for _, y in pts], "-", marker=".", label=name)
    _scatter(ax_flops, costs["flops"] / 1e12, costs["ours"], costs["label"])
    batch = SPEED_BATCHES[-1]
    _scatter(ax_ms, costs[f"ms_{batch}"], costs["ours"], costs["label"])
    for ax, empty in ((ax_ms, "no speed record of these samplers yet (make bench-speed)"),
                      (ax_flops, "no FLOP budget yet (a peer's record keeps it)")):
        if not ax.lines:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    for ax, xlabel in ((ax_nfe, "network evaluations per image (NFE)"), (ax_flops, "training compute (TFLOP)"),
                       (ax_ms, f"ms per image at batch {batch} (this machine)")):
        ax.set(xscale="log", xlabel=xlabel, ylabel=f"{metric} (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(x=0.2, y=0.1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return png_bytes(fig)


def one_nfe_section(w: ReportWriter, base: str, table: pd.DataFrame, metric: str, *,
                    records: Sequence[dict[str, Any]], speed: pd.DataFrame, curves: Sequence[dict[str, Any]],
                    steps_records: Sequence[dict[str, Any]]) -> str:
    """The markdown of the page's cost section; writes its figure to `<base>-compute.png`."""
    costs = cost_rows(records, table, speed)
    budget = budget_of(records)
    cells = [[r.label, r.nfe_label if isinstance(r.nfe_label, str) else DASH, fmt_num(r.params / 1e6, 3),
              ("≥ " if r.bound and np.isfinite(r.flops) else "") + fmt_num(r.flops / 1e12, 1), fmt_num(r.minutes, 1),
              *[fmt_num(getattr(r, f"ms_{b}"), 2) for b in SPEED_BATCHES]] for r in costs.itertuples()]
    header = ["Variant", "NFE", "Params (M)", "Training (TFLOP)", "Training (min)",
              *[f"ms / image, batch {b}" for b in SPEED_BATCHES]]
    md = ["## Cost: training compute and sampling time\n",
          md_table(header, cells, "llrrrrr"),
          ("Training FLOPs: torch.utils.flop_counter per step (forward and backward) times the row's steps; F's and G's "
           "steps for BiFlow, F's for the exact inverse, the peer's own (its steps spend BiFlow MSE's budget of "
           f"{fmt_num(budget['biflow_flops'] / 1e12, 1)} TFLOP: `biflow-bench bench budget`). "
           if budget else "Training FLOPs appear once a peer's record keeps the budget. ")
          + "≥: the perceptual G's networks are not in the count. Minutes are each run's own training time on this "
          "machine (F's shared by the rows that use it; runs with two jobs on two cores). ms / image: the speed "
          "table's row for the sampler (random weights, `make bench-speed`), a blank where it has none. Params: the "
          "networks that sample (G or the peer; F for the exact inverse).\n"]
    steps = steps_points(steps_records)
    curve_pts = compute_curves(curves, budget, metric)
    name = base.rsplit("/", 1)[-1]
    w.bytes(f"{base}-compute.png", one_nfe_figure(costs, steps, curve_pts, metric, f"Quality against NFE, training "
                                                  f"compute and sampling time ({base.split('/')[0]})"))
    md.append(f"![quality against NFE, training compute and time]({name}-compute.png)\n")
    md.append("Left: flow matching's step curve (study `flow-matching-steps`, one w) and each row at its NFE. Middle: "
              "curves of quality against training FLOPs, each method scored at checkpoints of its own run (best of "
              "the w each curve scores; BiFlow's G after F's whole run) and each row at its cost. Right: each row "
              "at its sampling time.\n")
    return "\n".join(md)
