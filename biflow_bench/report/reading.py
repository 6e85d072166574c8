"""A table's hand-written reading checked against the records it describes: the seed counts it states."""

from __future__ import annotations

import re

import pandas as pd

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
           "ten": 10}
# "Two seeds of every row", "3 seeds": a count right before "seeds" (not "two sampling seeds", which names a kind)
SEED_CLAIM = re.compile(r"\b(" + "|".join(NUMBERS) + r"|\d+) seeds\b", re.IGNORECASE)


def stated_seeds(reading: str) -> int | None:
    """The largest seed count a reading states, or None where it states none."""
    counts = [NUMBERS.get(m.lower()) or int(m) for m in SEED_CLAIM.findall(reading)]
    return max(counts) if counts else None


def reading_checks(reading: str, table: pd.DataFrame) -> list[str]:
    """A sentence for each way the reading disagrees with its table (report/tables.ablation_table): today, a row with
    fewer seeds than the reading states."""
    claimed = stated_seeds(reading)
    if claimed is None:
        return []
    short = [f"`{r.variant}` has {r.seeds}" for r in table.itertuples() if int(r.seeds) < claimed]
    if not short:
        return []
    return [f"the reading states {claimed} seeds, but in the table " + ", ".join(short)
            + " seed(s): it was written for other records than these"]
