"""The report's statistics: the noise rule of a table (std across seeds, floored at the bootstrap std), Kendall's tau
between our ordering and the paper's, the verdict sentence on whether the paper's ordering reproduced, and the one
line over every table of a scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import kendalltau


def paper_order(table: pd.DataFrame) -> pd.Series:
    """The paper's ordering of the rows, lower better: the order its words state (`paper_order`, from the spec's
    paper `order`) where the table has one, else its FID."""
    return (table["paper_order"] if "paper_order" in table else table["paper_fid"]).astype(float)


def comparable(table: pd.DataFrame) -> pd.DataFrame:
    """The rows that have both our number and the paper's ordering: the ones an ordering can be judged on."""
    return table[np.isfinite(table["ours"].astype(float)) & np.isfinite(paper_order(table))]


def kendall(table: pd.DataFrame) -> tuple[float | None, int, str]:
    """(tau, pairs, explanation) between our means and the paper's FIDs over variants that have both."""
    both = comparable(table)
    n = len(both)
    if n < 2:
        return None, n, f"n/a: {n} variant(s) have both our number and the paper's; need 2"
    tau = float(kendalltau(both["ours"].to_numpy(float), paper_order(both).to_numpy(float)).statistic)
    if math.isnan(tau):
        return None, n, f"n/a: one side is constant over the {n} variants that have both"
    tau += 0.0  # no "-0.000"
    return tau, n, f"{tau:.3f} over {n} variants"


@dataclass(frozen=True)
class Pair:
    better: str  # the paper's better variant of the pair
    worse: str
    kept: bool  # ours orders the pair the paper's way
    resolved: bool  # ... or the other way, by more than `sigmas` x the two numbers' combined noise


def paper_pairs(table: pd.DataFrame, sigmas: float = 2.0) -> list[Pair]:
    """Every pair of variants the paper's ordering separates, judged in our primary metric."""
    both = comparable(table)
    rows = list(both.assign(order=paper_order(both)).sort_values("order", kind="stable").itertuples())
    pairs = []
    for i, better in enumerate(rows):
        for worse in rows[i + 1:]:
            if better.order == worse.order:
                continue
            gap = worse.ours - better.ours
            noise = math.hypot(*(0.0 if math.isnan(x) else x for x in (better.ours_std, worse.ours_std)))
            pairs.append(Pair(better.variant, worse.variant, gap > 0, abs(gap) > sigmas * noise))
    return pairs


def primary_metric(table: pd.DataFrame) -> str:
    return next((m for m in table.get("metric", ()) if isinstance(m, str) and m), "our metric")


def verdict(table: pd.DataFrame, metric: str | None = None, sigmas: float = 2.0) -> str:
    """One sentence on whether the paper's ordering reproduced in our primary metric (named first, as the sentence
    judges no other): for every pair of variants the paper separates, do ours order them the same way, and is our
    gap larger than `sigmas` x the combined noise of the two numbers?"""
    metric = metric or primary_metric(table)
    both = comparable(table)
    if len(both) < 2:
        return f"By {metric}: not comparable, fewer than two variants have both our number and the paper's."
    pairs = paper_pairs(both, sigmas)
    if not pairs:
        return f"By {metric}: not comparable, the paper's numbers do not order these variants."
    best_ours = both.loc[both["ours"].astype(float).idxmin(), "variant"]
    best_paper = both.loc[paper_order(both).idxmin(), "variant"]
    lead = (f"By {metric}: the paper's best variant (`{best_paper}`) is best here too" if best_ours == best_paper
            else f"By {metric}: the paper's best variant is `{best_paper}`; ours is `{best_ours}`")
    kept = [p for p in pairs if p.kept]
    text = (f"{lead}; {len(kept)} of {len(pairs)} pairs keep the paper's order ({sum(p.resolved for p in kept)} "
            f"beyond {sigmas:g}σ noise)")
    if flipped := [p for p in pairs if not p.kept]:
        text += "; reversed here: " + ", ".join(f"`{p.worse}` beats `{p.better}`" + ("" if p.resolved else
                                                                                    " (within noise)") for p in flipped)
    return text + "."


def overall(tables: dict[str, pd.DataFrame], sigmas: float = 2.0) -> str | None:
    """One sentence over the tables of a scale (ablation -> table): how many of the paper's pairwise orderings hold in
    ours, summed over the tables' lead lines (`verdict`), and which are reversed; None when no table has a pair. A
    pair that an earlier table (by name) already holds with the same numbers, ours and the paper's (rows a table
    shares with another: the 1-NFE comparison's BiFlow rows are the main table's), counts once."""
    pairs, seen = {}, set()
    for name, t in sorted(tables.items()):
        values = dict(zip(t["variant"], zip(t["ours"].astype(float), paper_order(t))))
        pairs[name] = []
        for p in paper_pairs(t, sigmas):
            key = (p.better, p.worse, values[p.better], values[p.worse])
            if key not in seen:
                seen.add(key)
                pairs[name].append(p)
    total = sum(map(len, pairs.values()))
    if not total:
        return None
    kept = [p for ps in pairs.values() for p in ps if p.kept]
    metrics = sorted({primary_metric(t) for name, t in tables.items() if pairs[name]})
    flipped = [f"`{p.worse}` beats `{p.better}` ({name}" + ("" if p.resolved else ", within noise") + ")"
               for name, ps in pairs.items() for p in ps if not p.kept]
    n = sum(map(bool, pairs.values()))
    return (f"{len(kept)} of the paper's {total} pairwise orderings hold in {' / '.join(metrics)} across {n} "
            f"table{'s' * (n != 1)}, {sum(p.resolved for p in kept)} of them beyond {sigmas:g}σ noise; "
            + ("reversed: " + "; ".join(flipped) if flipped else "none reversed") + ".")


def table_noise(values: pd.Series, stds: pd.Series) -> float:
    """The table's noise rule: the std across seeds, floored at the runs' mean bootstrap std (one run: its own)."""
    boot = float(stds.astype(float).mean()) if len(stds) else math.nan
    return max(float(values.std(ddof=1)), boot) if len(values) > 1 else boot


# Metrics judged pair by pair beside the primary one: the domain classifier's, independent of ImageNet features
# (key -> higher is better).
VERDICT_METRICS = {"acc_cls": True, "fd_cls": False}
VERDICTS = ("reproduced", "reversed", "unresolved", "missing")


def pair_verdicts(table: pd.DataFrame, extras: list[tuple[str, str, list[tuple[float, float]]]],
                  sigmas: float = 2.0) -> pd.DataFrame:
    """For every pair of variants the paper orders (`paper_order`) and for the primary metric ('ours') and each of
    VERDICT_METRICS among `extras` ((key, header, [(mean, noise) per table row])): 'reproduced' when ours orders the
    pair the paper's way by more than `sigmas` x the combined noise (hypot of the two rows' ±), 'reversed' when the
    other way by as much, else 'unresolved' ('missing' when a row has no number); `<key>_z` is the gap in units of
    that noise, positive in the paper's direction. One row per pair: better, worse (the paper's), paper_gap (its
    FIDs', NaN where it states the order in words), then the verdicts."""
    columns = {"ours": (list(zip(table["ours"].astype(float), table["ours_std"].astype(float))), False)}
    columns.update({key: (cells, VERDICT_METRICS[key]) for key, _, cells in extras if key in VERDICT_METRICS})
    table = table.reset_index(drop=True)
    table = table.assign(order=paper_order(table))
    ranked = sorted((r for r in table.itertuples() if math.isfinite(r.order)), key=lambda r: r.order)
    rows = []
    for i, better in enumerate(ranked):
        for worse in ranked[i + 1:]:
            if better.order == worse.order:
                continue
            row: dict[str, object] = {"better": better.variant, "worse": worse.variant,
                                      "paper_gap": float(worse.paper_fid) - float(better.paper_fid)}
            for key, (cells, higher) in columns.items():
                (mean_b, std_b), (mean_w, std_w) = cells[better.Index], cells[worse.Index]
                gap = (mean_b - mean_w) if higher else (mean_w - mean_b)  # > 0: the paper's direction
                noise = math.hypot(*(s if math.isfinite(s) else 0.0 for s in (std_b, std_w)))
                if not math.isfinite(gap):  # a row without a number (not run yet): nothing to judge
                    row[key], row[f"{key}_z"] = "missing", math.nan
                    continue
                z = gap / noise if noise > 0 else math.copysign(math.inf, gap) if gap else 0.0
                row[key] = "unresolved" if abs(z) <= sigmas else "reproduced" if z > 0 else "reversed"
                row[f"{key}_z"] = z
            rows.append(row)
    return pd.DataFrame(rows)
