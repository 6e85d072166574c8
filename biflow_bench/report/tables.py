"""The report's tables as DataFrames, built from the records frame (frames.results_frame): one row per variant of an
ablation (seeds averaged within one config hash), records of other configs apart (split by configs.split_configs),
the headline (`main`) table, and the calibration / extra metric columns.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..ablations import AblationSpec
from ..config import SCALES
from ..results import CALIBRATION
from .format import first_value, float_or_nan, fmt_ours
from .stats import table_noise


def variant_order(df: pd.DataFrame, spec: AblationSpec | None = None) -> list[str]:
    """The spec's variant order, then any variant only the records know (renamed or removed rows), by name."""
    seen = sorted(set(df["variant"]))
    listed = list(spec.variants) if spec else []
    return listed + [v for v in seen if v not in listed]


def other_configs_table(df: pd.DataFrame, spec: AblationSpec | None = None) -> pd.DataFrame:
    """One row per (variant, config label) of the records configs.split_configs set apart: mean over its seeds and
    noise."""
    rows = []
    for v in variant_order(df, spec):
        for (h, label), g in df[df["variant"] == v].groupby(["config_hash", "overrides"], sort=True):
            row = ablation_table(g, None).iloc[0].to_dict()
            rows.append({**row, "config_hash": h, "overrides": label})
    cols = ["variant", "label", "overrides", "config_hash", "metric", "ours", "ours_std", "noise", "seeds", "nfe_label"]
    return pd.DataFrame(rows, columns=cols)


def ablation_table(df: pd.DataFrame, spec: AblationSpec | None = None) -> pd.DataFrame:
    """One row per variant of one (scale, ablation): ours (mean over seeds and its noise), NFE, paper FID, ranks.

    Noise is the std across seeds when a variant has more than one (floored at the runs' mean bootstrap std), else
    the bootstrap std stored with the single run. A seed whose metric is NaN makes the mean NaN: a diverged run is
    shown, not silently averaged away.
    Variants the spec lists but no record has are kept with their paper number so missing runs are visible."""
    rows = []
    for v in variant_order(df, spec):
        g = df[df["variant"] == v]
        sv = spec.variants.get(v) if spec else None
        vals = g["value"].astype(float)
        n = len(g)
        if n > 1:  # a std over a few seeds can land below one run's sampling noise by chance: never report less
            seeds_std, boot_std = float(vals.std(ddof=1)), float(g["value_std"].astype(float).mean())
            std, noise = (boot_std, "bootstrap") if boot_std > seeds_std else (seeds_std, "seeds")
        elif n == 1:
            std, noise = float(g["value_std"].iloc[0]), "bootstrap"
        else:
            std, noise = math.nan, ""
        nfe_labels = sorted({x for x in g["nfe_label"] if isinstance(x, str)})
        paper_fid = first_value(g["paper_fid"])
        if paper_fid is None and sv is not None and isinstance(sv.paper.get("fid"), (int, float)):
            paper_fid = float(sv.paper["fid"])
        paper_ms = first_value(g["paper_ms_per_image"]) if "paper_ms_per_image" in g else None
        if paper_ms is None and sv is not None and isinstance(sv.paper.get("ms_per_image"), (int, float)):
            paper_ms = float(sv.paper["ms_per_image"])
        batches = sorted({int(b) for b in g["sample_batch"] if math.isfinite(b)}) if "sample_batch" in g else []
        best_ws = sorted({float(w) for w in g["best_w"] if isinstance(w, float) and math.isfinite(w)}) \
            if "best_w" in g else []
        rows.append({
            "best_w": "/".join(f"{w:g}" for w in best_ws) or None,
            "variant": v, "label": first_value(g["label"]) or (sv.label if sv and sv.label else v),
            "metric": first_value(g["metric"]), "ours": float(vals.mean(skipna=False)) if n else math.nan,
            "ours_std": std, "noise": noise, "seeds": n, "nfe_label": "/".join(nfe_labels) or None,
            "inverse": first_value(g["inverse"]) if "inverse" in g else None,
            "ms_per_image": float(g["ms_per_image"].astype(float).mean()) if n else math.nan,
            "sample_batch": "/".join(map(str, batches)) or None,  # the batch ms_per_image was timed at
            "paper_fid": math.nan if paper_fid is None else float(paper_fid),
            "paper_ms_per_image": math.nan if paper_ms is None else float(paper_ms),
        })
    out = pd.DataFrame(rows, columns=["variant", "label", "metric", "ours", "ours_std", "noise", "seeds", "nfe_label",
                                      "best_w", "inverse", "ms_per_image", "sample_batch", "paper_fid",
                                      "paper_ms_per_image"])
    # The paper's ordering: the order its words state where the spec gives one (paper `order`), else its FID.
    stated = spec is not None and any("order" in spec.variants[v].paper for v in out["variant"] if v in spec.variants)
    out["paper_order"] = [float(spec.variants[v].paper.get("order", math.nan)) if v in spec.variants else math.nan
                          for v in out["variant"]] if stated else out["paper_fid"]
    # Rank 1 = lowest (best); ties share the better rank; variants without a number get no rank.
    out["our_rank"] = out["ours"].rank(method="min").astype("Int64")
    out["paper_rank"] = out["paper_order"].astype(float).rank(method="min").astype("Int64")
    return out


def headline_table(df: pd.DataFrame, spec: AblationSpec | None = None) -> pd.DataFrame:
    """The `main` ablation per scale: our metric, the domain classifier's acc_cls where recorded, NFE, ms per image,
    and the speed-up of each variant over the exact inverse (exact ms / variant ms) where an exact-inverse variant
    was timed at that scale."""
    main = df[df["ablation"] == "main"]
    parts = []
    for scale in order_scales(set(main["scale"])):
        t = ablation_table(main[main["scale"] == scale], spec)
        t = t[t["seeds"] > 0]
        exact = t[(t["inverse"] == "exact") & np.isfinite(t["ms_per_image"].astype(float))]
        exact_ms = float(exact["ms_per_image"].iloc[0]) if len(exact) else math.nan
        t = t.assign(scale=scale, speedup_vs_exact=exact_ms / t["ms_per_image"].astype(float))
        acc = dict((k, cells) for k, _, cells in extra_columns(main[main["scale"] == scale], list(t["variant"])))
        acc_cells = acc.get("acc_cls", [(math.nan, math.nan)] * len(t))  # the domain classifier's class accuracy
        parts.append(t.assign(acc_cls=[m for m, _ in acc_cells], acc_cls_std=[sd for _, sd in acc_cells]))
    cols = ["scale", "variant", "label", "inverse", "metric", "ours", "ours_std", "acc_cls", "acc_cls_std", "noise",
            "seeds", "nfe_label", "ms_per_image", "sample_batch", "speedup_vs_exact", "paper_fid"]
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)[cols]


MODEL_SIZE = {"paper": "B/2", "paper-xl": "XL/2"}  # the paper's model names; other scales train small models


def scale_label(label: Any, scale: str) -> Any:
    """A spec label names the paper's models ("BiFlow-B/2"); at a scale that trains other models, drop the size
    ("BiFlow"), and at paper-xl say XL/2."""
    if not isinstance(label, str):
        return label
    size = MODEL_SIZE.get(scale)
    return re.sub(r"-(B|XL)/2\b", f"-{size}" if size else "", label)


def order_scales(scales: set[str]) -> list[str]:
    """Preset order (tiny, small, ...) first, unknown scales after by name."""
    return [s for s in SCALES if s in scales] + sorted(s for s in scales if s not in SCALES)


# Metrics shown beside the primary one where records have them: (metric key, column header).
EXTRA_METRICS = (("acc_cls", "acc_cls ↑"), ("conf_cls", "conf_cls ↑"), ("fd_cls", "fd_cls ↓"),
                 ("precision_effnet", "precision ↑"), ("recall_effnet", "recall ↑"), ("precision", "precision ↑"),
                 ("recall", "recall ↑"))


def load_calibration(results_dir: Path, scale: str) -> dict[str, dict[str, Any]]:
    """The calibration entries of a scale by key ({} when the file is missing or unreadable)."""
    path = results_dir / scale / CALIBRATION
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("rows"), list)} \
        if isinstance(entries, dict) else {}


def table_calibration(df: pd.DataFrame, entries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The calibration entry the table's records name (the most common one), or None."""
    keys = [k for k in df["calibration"] if isinstance(k, str) and k in entries] if "calibration" in df else []
    return entries[max(sorted(set(keys)), key=keys.count)] if keys else None


def extra_columns(df: pd.DataFrame, variants: Sequence[str]) -> list[tuple[str, str, list[tuple[float, float]]]]:
    """(key, header, [(mean, noise) per variant]) for each EXTRA_METRICS key some record has a number for."""
    out = []
    for key, header in EXTRA_METRICS:
        col = f"metric_{key}"
        if col not in df or not np.isfinite(df[col].astype(float)).any():
            continue
        std_col = f"metric_{key}_std"
        cells = []
        for v in variants:
            g = df[df["variant"] == v]
            vals = g[col].astype(float)
            std = table_noise(vals, g[std_col]) if std_col in g and len(g) else math.nan
            cells.append((float(vals.mean()) if len(g) else math.nan, std))
        out.append((key, header, cells))
    return out


def calibration_cells(metrics: dict[str, Any], keys: Sequence[str]) -> list[str]:
    """A calibration row's cell for each metric key (± its bootstrap std)."""
    return [fmt_ours(float_or_nan(metrics.get(k)), float_or_nan(metrics.get(f"{k}_std"))) for k in keys]


def calibration_names(calibration: dict[str, Any]) -> list[str]:
    return [str(r.get("name")) for r in calibration.get("rows", []) if isinstance(r, dict)]
