"""`make reproduce-small`'s job list (Makefile): one job per quality table of the registry and seed, each table's
later seed after its earlier one, the norm-control table at the variants the reproduction runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from biflow_bench.ablations import load_registry

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def planned(*goals: str, seeds: str = "0 1", **variables: str) -> str:
    """The commands `make -n` would run (recursive makes included), one per line."""
    return subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", *goals, f"SEEDS={seeds}",
                           *(f"{k}={v}" for k, v in variables.items())],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout


def planned_runs(*goals: str, seeds: str = "0 1") -> list[tuple[str, int, str]]:
    """(table, seed, extra arguments) of every `biflow-bench run` that `make -n` would start, in order."""
    runs = re.findall(r"biflow-bench run (\S+) --scale small --seed (\d+) --results-dir results ?(.*)",
                      planned(*goals, seeds=seeds).replace("&&", "\n"))
    return [(table, int(seed), extra.strip()) for table, seed, extra in runs]


def test_reproduction_runs_every_quality_table_at_every_seed():
    """Every quality table but the 1-NFE comparison and TARFlow's, which have their own targets (make
    reproduce-one-nfe, make reproduce-tarflow)."""
    runs = planned_runs("repro-jobs", seeds="0 1 2")
    quality = {name for name, spec in load_registry().items() if spec.kind == "quality"
               and name != "one-nfe" and not name.startswith("tarflow-")}
    assert sorted((t, s) for t, s, _ in runs) == sorted((t, s) for t in quality for s in (0, 1, 2))
    assert all(s == 0 for _, s, _ in runs[:len(quality)]), "seed 0 of every table comes first"
    assert {t: extra for t, _, extra in runs}["norm-control"] == "--variants none,clip"


def test_tarflow_reproduction_runs_every_tarflow_table_in_two_jobs_that_meet():
    """Both jobs go through every table, one first to last, the other last to first, table by table and row by row
    (`--reverse`): they share the rows, meeting where the work splits evenly."""
    forward, backward = planned_runs("tarflow.forward"), planned_runs("tarflow.backward")
    tarflow = [name for name, spec in load_registry().items() if name.startswith("tarflow-")]
    assert sorted(t for t, _, _ in forward) == sorted(tarflow) and all(s == 0 for _, s, _ in forward + backward)
    assert [t for t, _, _ in backward] == [t for t, _, _ in reversed(forward)]
    assert {extra for _, _, extra in forward} == {""} and {extra for _, _, extra in backward} == {"--reverse"}
    assert "-j2 tarflow.forward tarflow.backward" in planned("reproduce-tarflow")


def test_a_later_seed_of_a_table_waits_for_its_earlier_seed():
    assert [(t, s) for t, s, _ in planned_runs("repro.denoise.1")] == [("denoise", 0), ("denoise", 1)]
    assert [(t, s) for t, s, _ in planned_runs("repro.main.2", seeds="0 1 2")] == [("main", 0), ("main", 1),
                                                                                    ("main", 2)]


def test_results_variable_moves_every_record_and_the_report():
    """`make reproduce-small RESULTS=DIR` reads and writes records in DIR alone: the committed ones are untouched."""
    commands = [line for line in planned("reproduce-small", RESULTS="runs/anew", REPORT_OUT="runs/anew/reports")
                .splitlines() if "biflow-bench " in line]
    kinds = {re.search(r"biflow-bench (run|progress|bench speed|report)", c).group(1) for c in commands}
    assert kinds == {"run", "progress", "bench speed", "report"}
    assert all("--results-dir runs/anew " in c for c in commands), commands
    assert any("--out runs/anew/reports" in c for c in commands)


def test_demo_says_what_it_will_run_before_it_starts():
    """`make demo` first prints `progress` at the tiny scale: every table's variants and, from the records of an
    earlier demo, about how long they take."""
    commands = [line for line in planned("demo", SEED="0").splitlines() if "biflow-bench " in line]
    assert commands[0] == ".venv/bin/biflow-bench progress --scale tiny --seeds 0 --results-dir results " \
                          "--estimate-from results"
    assert "biflow-bench run " in commands[1]
