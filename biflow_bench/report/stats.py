"""The report's statistics: the noise rule of a table (std across seeds, floored at the bootstrap std), Kendall's tau
between our ordering and the paper's, and the verdict sentence on whether the paper's ordering reproduced.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.stats import kendalltau


def kendall(table: pd.DataFrame) -> tuple[float | None, int, str]:
    """(tau, pairs, explanation) between our means and the paper's FIDs over variants that have both."""
    both = table[np.isfinite(table["ours"].astype(float)) & np.isfinite(table["paper_fid"].astype(float))]
    n = len(both)
    if n < 2:
        return None, n, f"n/a: {n} variant(s) have both our number and the paper's; need 2"
    tau = float(kendalltau(both["ours"].to_numpy(float), both["paper_fid"].to_numpy(float)).statistic)
    if math.isnan(tau):
        return None, n, f"n/a: one side is constant over the {n} variants that have both"
    tau += 0.0  # no "-0.000"
    return tau, n, f"{tau:.3f} over {n} variants"


def verdict(table: pd.DataFrame, sigmas: float = 2.0) -> str:
    """One sentence on whether the paper's ordering reproduced: for every pair of variants the paper separates, do
    ours order them the same way, and is our gap larger than `sigmas` x the combined noise of the two numbers?"""
    both = table[np.isfinite(table["ours"].astype(float)) & np.isfinite(table["paper_fid"].astype(float))]
    if len(both) < 2:
        return "Not comparable: fewer than two variants have both our number and the paper's."
    rows = list(both.sort_values("paper_fid").itertuples())
    agree, flipped, pairs = [], [], 0
    for i, better in enumerate(rows):
        for worse in rows[i + 1:]:
            if better.paper_fid == worse.paper_fid:
                continue
            pairs += 1
            gap = worse.ours - better.ours
            noise = math.hypot(*(0.0 if math.isnan(x) else x for x in (better.ours_std, worse.ours_std)))
            resolved = abs(gap) > sigmas * noise
            (agree if gap > 0 else flipped).append((better.variant, worse.variant, resolved))
    if not pairs:
        return "Not comparable: the paper's numbers do not order these variants."
    best_ours, best_paper = both.loc[both["ours"].astype(float).idxmin(), "variant"], rows[0].variant
    lead = (f"The paper's best variant (`{best_paper}`) is best here too" if best_ours == best_paper
            else f"The paper's best variant is `{best_paper}`; ours is `{best_ours}`")
    resolved_agree = sum(r for *_, r in agree)
    text = f"{lead}; {len(agree)} of {pairs} pairs keep the paper's order ({resolved_agree} beyond {sigmas:g}σ noise)"
    if flipped:
        shown = ", ".join(f"`{w}` beats `{b}`" + ("" if r else " (within noise)") for b, w, r in flipped)
        text += f"; reversed here: {shown}"
    return text + "."


def table_noise(values: pd.Series, stds: pd.Series) -> float:
    """The table's noise rule: the std across seeds, floored at the runs' mean bootstrap std (one run: its own)."""
    boot = float(stds.astype(float).mean()) if len(stds) else math.nan
    return max(float(values.std(ddof=1)), boot) if len(values) > 1 else boot
