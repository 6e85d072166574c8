"""Quoting records in prose: a page's sentence, with {} for each number, checked against the numbers recomputed from
the records it quotes (results/), seeds averaged; a gap called within (or beyond) noise only where it is within (or
beyond) 2σ, σ the two rows' noises in quadrature (the report's rule: the std across seeds floored at the bootstrap
std)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from biflow_bench.report.doc_tables import cell, variant_records
from biflow_bench.report.stats import table_noise

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
SIGMAS = 2.0  # a gap within this many σ is "within noise" (the report's verdicts use the same line)


def flat(path: Path) -> str:
    return " ".join(path.read_text(encoding="utf-8").split())


def recs(variant: str, ablation: str = "g-training") -> list[dict[str, Any]]:
    found = variant_records(RESULTS, "small", ablation, variant)
    assert found, f"no records of {ablation}/{variant}"
    return found


def val(variant: str, key: str, ablation: str = "g-training") -> float:
    """A record field ("metrics.fd_cls", "diagnostics.inverse_mse_clean", "timing.stage2_s"), seeds averaged."""
    section, field = key.split(".")
    values = [float(r[section][field]) for r in recs(variant, ablation)]
    return sum(values) / len(values)


def archived(ablation: str, variant: str, config_hash: str, key: str, seed: str = "*") -> float:
    """An archived record's field, the seeds of one config averaged."""
    paths = sorted((RESULTS / "archive" / "small" / ablation).glob(f"{variant}__seed{seed}__{config_hash}.json"))
    assert paths, (ablation, variant, config_hash)
    section, field = key.split(".")
    return sum(float(json.loads(p.read_text())[section][field]) for p in paths) / len(paths)


def pm(variant: str, metric: str, ablation: str = "g-training") -> str:
    """mean ± noise, as the docs' tables and the report write it."""
    return cell(recs(variant, ablation), metric)


def z(a: str, b: str, metric: str, ablation: str = "g-training") -> float:
    """|gap| in σ between two rows' seed means, σ their noises in quadrature, each the report's rule (`table_noise`:
    the std across seeds floored at the mean bootstrap std; one seed: its bootstrap std)."""
    def mean_noise(variant: str) -> tuple[float, float]:
        ms = pd.DataFrame([r["metrics"] for r in recs(variant, ablation)])
        return float(ms[metric].mean()), table_noise(ms[metric], ms[f"{metric}_std"])
    (ma, na), (mb, nb) = mean_noise(a), mean_noise(b)
    return abs(ma - mb) / math.hypot(na, nb)


def within(a: str, b: str, metric: str, ablation: str = "g-training") -> str:
    """The σ of a gap a page calls within noise; fails where the gap is beyond it."""
    gap = z(a, b, metric, ablation)
    assert gap <= SIGMAS, f"{a} against {b} in {metric}: {gap:.1f}σ is called within noise"
    return f"{gap:.1f}"


def beyond(a: str, b: str, metric: str, ablation: str = "g-training") -> str:
    gap = z(a, b, metric, ablation)
    assert gap > SIGMAS, f"{a} against {b} in {metric}: {gap:.1f}σ is called beyond noise"
    return f"{gap:.1f}"


def quiet(number: str, *checks: Any) -> str:
    """A number of a sentence whose checks (within, beyond, same) ran for a claim its words make."""
    return number


def same(a: str, b: str) -> str:
    assert a == b, (a, b)
    return a


def f(digits: int) -> Callable[[float], str]:
    return lambda x: f"{x:.{digits}f}"


f0, f1, f2, f3, f4 = (f(d) for d in range(5))
IMSE, NS, FDE, FDC, ACC, REC = ("diagnostics.inverse_mse_clean", "diagnostics.noise_sensitivity", "metrics.fd_effnet",
                                "metrics.fd_cls", "metrics.acc_cls", "metrics.recall_effnet")


def check(path: Path, claims: list[tuple[str, list[str]]]) -> None:
    text = flat(path)
    wrong = []
    for template, numbers in claims:
        assert template.count("{}") == len(numbers), template
        sentence = template.format(*numbers)
        if sentence not in text:
            pattern = re.escape(template).replace(r"\{\}", r"([^\s,;()]+?)")
            found = re.search(pattern, text)
            wrong.append(f"{path.name}: {sentence!r}" + (f"; the page has {found.groups()}" if found else
                                                         "; the sentence itself is not on the page"))
    assert not wrong, "\n".join(wrong)
