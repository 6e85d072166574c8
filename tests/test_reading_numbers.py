"""The readings' numbers (each table's COMMENTARY.md, shown on its page) checked against the records they quote: the
1-NFE peers' learning-rate searches and TARFlow's tables."""

from __future__ import annotations

import json
from typing import Callable

import pytest

from record_claims import ACC, FDC, FDE, REC, RESULTS, ROOT, beyond, check, f0, f1, f2, f3, recs, val, within, z


def claims_peer_searches() -> dict[str, list[tuple[str, list[str]]]]:
    """The peers' learning-rate searches' readings (their COMMENTARY.md, shown on their study pages)."""
    def fde(v: str, table: str) -> str:
        return f0(val(v, FDE, table))

    def best_w(v: str, table: str) -> str:
        return f"{recs(v, table)[0]['guidance']['best_w']:g}"

    def gap(a: str, b: str, table: str) -> list[str]:
        return [f0(val(b, FDE, table) - val(a, FDE, table)), f1(z(a, b, "fd_effnet", table))]

    mf, fm = "meanflow-lr", "flow-matching-lr"
    return {mf: [
        ("its one-step samples reach fd_effnet {} (best w = {}) against {} at 3e-3 and {} at 3e-2 (whose best w lay "
         "past the sweep's edge, at {}), and {} at 1e-3",
         [fde("lr-1e-2", mf), best_w("lr-1e-2", mf), fde("lr-3e-3", mf), fde("lr-3e-2", mf), best_w("lr-3e-2", mf),
          fde("centre", mf)]),
        ("(acc_cls {}, fd_cls {})", [f3(val("lr-1e-2", ACC, mf)), f0(val("lr-1e-2", FDC, mf))]),
        ("the gap of {} to 3e-3 is {} times", gap("lr-1e-2", "lr-3e-3", mf)),
    ], fm: [
        ("its 8 Euler steps reach fd_effnet {} (best w = {}) against {} at 3e-3 and {} at 3e-2, and {} at 1e-3",
         [fde("lr-1e-2", fm), best_w("lr-1e-2", fm), fde("lr-3e-3", fm), fde("lr-3e-2", fm), fde("centre", fm)]),
        ("(acc_cls {}, fd_cls {})", [f2(val("lr-1e-2", ACC, fm)), f0(val("lr-1e-2", FDC, fm))]),
        ("the gap of {} to 3e-3 is {} times", gap("lr-1e-2", "lr-3e-3", fm)),
    ]}


@pytest.mark.parametrize("table", ["meanflow-lr", "flow-matching-lr"])
def test_peer_search_readings_quote_their_records(table: str):
    check(RESULTS / "small" / table / "COMMENTARY.md", claims_peer_searches()[table])


def claims_tarflow() -> dict[str, list[tuple[str, list[str]]]]:
    """TARFlow's tables' readings (their COMMENTARY.md, shown on their pages): one F per row, one seed."""
    def v(table: str, variant: str, key: str, fmt: Callable[[float], str] = f0) -> str:
        return fmt(val(variant, key, table))

    def gap(table: str, a: str, b: str) -> str:  # a gap the reading calls beyond noise
        return beyond(a, b, "fd_effnet", table)

    vp, cp, dp, gd, BPD = "tarflow-vp", "tarflow-coupling", "tarflow-depth", "tarflow-guidance", "metrics.bpd"

    nz = "tarflow-noise"

    def n(sigma: str, denoise: str, key: str = FDE, fmt: Callable[[float], str] = f0) -> str:
        return v(nz, f"sigma-{sigma}-{denoise}", key, fmt)

    def best(variant: str) -> str:
        return f"{recs(variant, gd)[0]['guidance']['best_w']:g}"

    return {vp: [
        ("with it F scores fd_effnet {} against {} without (paper: FID 5.7 against 51.0), acc_cls {} against {}, and "
         "held-out bits/dim {} against {}",
         [v(vp, "nvp", FDE), v(vp, "vp", FDE), v(vp, "nvp", ACC, f2), v(vp, "vp", ACC, f2), v(vp, "nvp", BPD, f2),
          v(vp, "vp", BPD, f2)]),
        ("no recall ({})", [v(vp, "vp", REC, f2)]),
        ("guidance helps it only up to w = {} of a sweep extended to {}",
         [f"{recs('vp', vp)[0]['guidance']['best_w']:g}", f"{max(recs('vp', vp)[0]['guidance']['extended']):g}"]),
        ("The gap is {} times", [f0(float(beyond("nvp", "vp", "fd_effnet", vp)))]),
    ], cp: [
        ("fd_effnet {} against {} (paper: FID 5.7 against 20.4), {} times the two rows' bootstrap std in quadrature, "
         "with acc_cls {} against {} and fd_cls {} against {}",
         [v(cp, "autoregressive", FDE), v(cp, "channel", FDE), gap(cp, "autoregressive", "channel"),
          v(cp, "autoregressive", ACC, f2), v(cp, "channel", ACC, f2), v(cp, "autoregressive", FDC),
          v(cp, "channel", FDC)]),
        ("(held-out bits/dim {} against {})", [v(cp, "autoregressive", BPD, f2), v(cp, "channel", BPD, f2)]),
    ], dp: [
        ("T = 1 x K = 4 scores fd_effnet {} (acc_cls {}, bits/dim {}) against {} for T = K = 2 and {} for T = 4 x K = 1",
         [v(dp, "t1-k4", FDE), v(dp, "t1-k4", ACC, f2), v(dp, "t1-k4", BPD, f2), v(dp, "t2-k2", FDE),
          v(dp, "t4-k1", FDE)]),
        ("four blocks of one layer beat two of two by {} times the rows' bootstrap std in quadrature, with acc_cls {} "
         "against {} and bits/dim {} against {}",
         [gap(dp, "t4-k1", "t2-k2"), v(dp, "t4-k1", ACC, f2), v(dp, "t2-k2", ACC, f2), v(dp, "t4-k1", BPD, f2),
          v(dp, "t2-k2", BPD, f2)]),
    ], gd: [
        ("fd_effnet {} at its best w = {} against {} unguided, acc_cls {} against {}",
         [v(gd, "cfg", FDE), best("cfg"), v(gd, "conditional", FDE), v(gd, "cfg", ACC, f2),
          v(gd, "conditional", ACC, f2)]),
        ("(tau = 2): {} at w = {} against {} unguided; sharpening it (tau = 0.5) makes every w > 0 worse, so that "
         "row's best is the unguided w = {}",
         [v(gd, "temperature-2", FDE), best("temperature-2"), v(gd, "unconditional", FDE), best("temperature-0p5")]),
        ("on fd_effnet by {} times the rows' bootstrap std in quadrature but trails it on the domain classifier's "
         "fd_cls ({} against {}, {} times)",
         [beyond("cfg", "temperature-2", "fd_effnet", gd), v(gd, "temperature-2", FDC), v(gd, "cfg", FDC),
          beyond("cfg", "temperature-2", "fd_cls", gd)]),
    ], nz: [
        ("ties it in fd_effnet ({} against {}, {} times the rows' bootstrap std in quadrature) and beats it on the "
         "domain classifier (fd_cls {} against {}, {} times; acc_cls {} against {})",
         [n("0p05", "score"), n("0p1", "score"), within("sigma-0p05-score", "sigma-0p1-score", "fd_effnet", nz),
          n("0p1", "score", FDC), n("0p05", "score", FDC), beyond("sigma-0p05-score", "sigma-0p1-score", "fd_cls", nz),
          n("0p1", "score", ACC, f2), n("0p05", "score", ACC, f2)]),
        ("fd_effnet {}, which the score step cannot mend ({} raw), though its bits/dim is the lowest ({})",
         [v(nz, "uniform-score", FDE), v(nz, "uniform-none", FDE), v(nz, "uniform-score", BPD, f2)]),
        ("(sigma = 0.01: {} against {} raw; sigma = 0.2: {} against {})",
         [n("0p01", "score"), n("0p01", "none"), n("0p2", "score"), n("0p2", "none")]),
        ("({} to {} against {} to {}); over all five Gaussian levels the two move alike (worst / best {} against {})",
         [n("0p025", "score"), n("0p05", "score"), n("0p2", "none"), n("0p05", "none"),
          f2(val("sigma-0p01-score", FDE, nz) / val("sigma-0p05-score", FDE, nz)),
          f2(val("sigma-0p2-none", FDE, nz) / val("sigma-0p05-none", FDE, nz))]),
    ]}


@pytest.mark.parametrize("table", ["tarflow-vp", "tarflow-coupling", "tarflow-depth", "tarflow-guidance",
                                   "tarflow-noise"])
def test_tarflow_readings_quote_their_records(table: str):
    check(RESULTS / "small" / table / "COMMENTARY.md", claims_tarflow()[table])


def tarflow_job_minutes() -> tuple[float, int]:
    """The wall times of TARFlow's tables' seed-0 records summed (minutes, rows): an F resumed from a checkpoint adds
    its training before the resume, pro rata of its steps."""
    total, rows = 0.0, 0
    for path in sorted(RESULTS.glob("small/tarflow-*/*__seed0.json")):
        rec = json.loads(path.read_text())
        s1 = rec["train"]["stage1"]
        earlier = s1["seconds"] * s1["resumed_from"] / s1["steps"] if not s1["cached"] and s1["resumed_from"] else 0.0
        total, rows = total + rec["wall_time_s"] + earlier, rows + 1
    return total / 60, rows


def test_tarflow_time_quotes_its_records():
    minutes, rows = tarflow_job_minutes()
    check(ROOT / "docs" / "tarflow.md", [
        ("At seed 0 the records of these tables took {} job-minutes over their {} rows", [f0(minutes), str(rows)]),
        ("about {} minutes on 2 cores", [f0(minutes / 2)])])
