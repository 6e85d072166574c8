"""How far a reproduction has come (`biflow-bench progress`): for every quality ablation and seed, the variants whose
record of the current config is stored, the wall time they took, and a rough estimate of the time left.

A record counts only when its config hash is the current one (a record of an old preset is work still to do). The
estimate of a missing row is its wall time in a reference run of the same config when one is given (`--estimate-from
results`: the committed records estimate a reproduction measured anew elsewhere, from its first minute), else the
wall time of the same variant at another seed (recorded, else in the reference), else the median wall time of the
recorded rows (else of the reference's): rows that share a cached F or G take less, the first row of a new F more.
`run` prints the same estimate for the variants it is about to run (run_plan).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from .ablations import AblationSpec, load_registry
from .results import find_record, read_record
from .runner import RunOptions, identity


@dataclass(frozen=True)
class Row:
    ablation: str
    variant: str
    seed: int
    wall_s: float | None  # the record's wall time; None while missing
    reference_s: float | None = None  # the wall time of the same run in the reference records, if recorded there


def progress_rows(results_dir: Path, scale: str, seeds: list[int], registry: dict[str, AblationSpec] | None = None,
                  reference_dir: Path | None = None, opts: RunOptions | None = None) -> list[Row]:
    """One row per (ablation, variant, seed), in the registry's order: the quality ablations by default. `opts`
    (--set overrides, micro-batch) decide the config a row must be recorded at."""
    registry = registry if registry is not None else {n: s for n, s in load_registry().items() if s.kind == "quality"}
    opts = opts or RunOptions(results_dir=results_dir)

    def wall_time(directory: Path | None, spec: AblationSpec, name: str, seed: int, config_hash: str) -> float | None:
        path = find_record(directory, scale, spec.name, name, seed, config_hash) if directory else None
        return float(read_record(path).get("wall_time_s", 0.0)) if path else None

    rows = []
    for seed in seeds:
        for spec in registry.values():
            for name in spec.variants:
                key = identity(spec, name, scale, opts)[1].config_hash
                rows.append(Row(spec.name, name, seed, wall_time(results_dir, spec, name, seed, key),
                                wall_time(reference_dir, spec, name, seed, key)))
    return rows


def estimate_left(rows: list[Row], todo: list[Row] | None = None) -> float | None:
    """Seconds still to run (see the module docstring): the missing rows, or `todo`, rows of `rows` (a recorded one,
    run again, takes its own time); None when nothing is recorded to estimate from."""
    known = [r.wall_s for r in rows if r.wall_s is not None] or [r.reference_s for r in rows
                                                                  if r.reference_s is not None]
    if not known:
        return None
    typical = statistics.median(known)
    same = {(r.ablation, r.variant): r.reference_s for r in rows if r.reference_s is not None}
    same |= {(r.ablation, r.variant): r.wall_s for r in rows if r.wall_s is not None}
    todo = [r for r in rows if r.wall_s is None] if todo is None else todo
    return sum(r.wall_s if r.wall_s is not None else r.reference_s if r.reference_s is not None
               else same.get((r.ablation, r.variant), typical) for r in todo)


def format_progress(rows: list[Row], scale: str) -> str:
    """A table per (ablation, seed): recorded of all, minutes spent; then the total and the estimate."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.ablation, r.seed), []).append(r)
    lines = [f"reproduction at scale {scale}:",
             f"  {'ablation':20s} {'seed':>4s} {'recorded':>9s} {'minutes':>8s}  missing"]
    for (ablation, seed), group in groups.items():
        done = [r for r in group if r.wall_s is not None]
        missing = ", ".join(r.variant for r in group if r.wall_s is None) or "-"
        lines.append(f"  {ablation:20s} {seed:4d} {len(done):4d} of {len(group):<2d} "
                     f"{sum(r.wall_s for r in done) / 60:8.1f}  {missing}")
    done = [r for r in rows if r.wall_s is not None]
    spent = sum(r.wall_s for r in done) / 60
    seconds = estimate_left(rows)
    jobs = "; `make reproduce-small` runs two jobs at a time" if scale == "small" else ""  # its scale alone
    left = ("no estimate of the time left yet (nothing recorded to estimate from)" if seconds is None else
            f"about {seconds / 60:.0f} min of job time left (rough: from recorded wall times{jobs})")
    lines.append(f"  {len(done)} of {len(rows)} rows recorded, {spent:.1f} min spent; {left}")
    return "\n".join(lines) + "\n"


def run_plan(spec: AblationSpec, names: list[str], scale: str, seed: int, opts: RunOptions) -> str:
    """The line `run` prints before its first variant: how many it will run and about how long they take, estimated
    from the rows of every quality table at this scale recorded at the run's config, at its seed and the
    reproduction's (0, 1)."""
    quality = {n: s for n, s in load_registry().items() if s.kind == "quality"}
    rows = progress_rows(opts.results_dir, scale, sorted({seed, 0, 1}), quality | {spec.name: spec}, opts=opts)
    mine = [r for r in rows if r.ablation == spec.name and r.variant in names and r.seed == seed]
    todo = mine if opts.force else [r for r in mine if r.wall_s is None]
    seconds = estimate_left(rows, todo)
    when = ("nothing to run (--force runs them again)" if not todo else
            f"nothing recorded at scale {scale} to estimate their time from" if seconds is None else
            f"about {seconds / 60:.0f} min (rough: from recorded wall times)")
    return (f"{spec.name} at scale {scale}, seed {seed}: {len(todo)} of {len(names)} variants to run, "
            f"{len(names) - len(todo)} recorded; {when}")
