"""The readings' numbers (each table's COMMENTARY.md, shown on its page) checked against the records they quote: the
1-NFE peers' learning-rate searches and TARFlow's tables."""

from __future__ import annotations

import json
from typing import Callable

import pytest

from biflow_bench.ablations import load_registry
from record_claims import ACC, FDC, FDE, REC, RESULTS, ROOT, beyond, check, f0, f1, f2, f3, recs, same, val, within, z


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
    """TARFlow's tables' readings (their COMMENTARY.md, shown on their pages): two Fs a row (seeds 0 and 1)."""
    def v(table: str, variant: str, key: str, fmt: Callable[[float], str] = f0) -> str:
        return fmt(val(variant, key, table))

    def gap(table: str, a: str, b: str) -> str:  # a gap the reading calls beyond noise
        return beyond(a, b, "fd_effnet", table)

    vp, cp, dp, gd, BPD = "tarflow-vp", "tarflow-coupling", "tarflow-depth", "tarflow-guidance", "metrics.bpd"

    nz = "tarflow-noise"

    def n(sigma: str, denoise: str, key: str = FDE, fmt: Callable[[float], str] = f0) -> str:
        return v(nz, f"sigma-{sigma}-{denoise}", key, fmt)

    def fdes(sigmas: list[str], denoise: str) -> list[float]:
        return [val(f"sigma-{sigma}-{denoise}", FDE, nz) for sigma in sigmas]

    def span(sigmas: list[str], denoise: str) -> list[str]:  # the curve's worst and best, over these levels
        return [f0(max(fdes(sigmas, denoise))), f0(min(fdes(sigmas, denoise)))]

    def spread(sigmas: list[str], denoise: str) -> float:
        return max(fdes(sigmas, denoise)) / min(fdes(sigmas, denoise))

    SIGMAS = ["0p01", "0p025", "0p05", "0p1", "0p2"]

    def best(variant: str) -> str:
        return f"{recs(variant, gd)[0]['guidance']['best_w']:g}"

    return {vp: [
        ("with it F scores fd_effnet {} against {} without (paper: FID 5.7 against 51.0), acc_cls {} against {}, and "
         "held-out bits/dim {} against {}, seed means of two Fs a row",
         [v(vp, "nvp", FDE), v(vp, "vp", FDE), v(vp, "nvp", ACC, f2), v(vp, "vp", ACC, f2), v(vp, "nvp", BPD, f2),
          v(vp, "vp", BPD, f2)]),
        ("no recall ({})", [v(vp, "vp", REC, f2)]),
        ("guidance helps it only up to w = {} of a sweep extended to {}, at both seeds",
         [same(*(f"{r['guidance']['best_w']:g}" for r in recs("vp", vp))),
          same(*(f"{max(r['guidance']['extended']):g}" for r in recs("vp", vp)))]),
        ("The gap is {} times", [f0(float(beyond("nvp", "vp", "fd_effnet", vp)))]),
    ], cp: [
        ("fd_effnet {} against {}, seed means of two Fs a row (paper: FID 5.7 against 20.4), {} times the two rows' "
         "noise in quadrature (each row's std across seeds, floored at its bootstrap std), with acc_cls {} against {} "
         "and fd_cls {} against {}",
         [v(cp, "autoregressive", FDE), v(cp, "channel", FDE), gap(cp, "autoregressive", "channel"),
          v(cp, "autoregressive", ACC, f2), v(cp, "channel", ACC, f2), v(cp, "autoregressive", FDC),
          v(cp, "channel", FDC)]),
        ("(held-out bits/dim {} against {})", [v(cp, "autoregressive", BPD, f2), v(cp, "channel", BPD, f2)]),
    ], dp: [
        ("T = 1 x K = 4 scores fd_effnet {} (acc_cls {}, bits/dim {}) against {} for T = K = 2 and {} for T = 4 x K = 1, "
         "seed means of two Fs a row",
         [v(dp, "t1-k4", FDE), v(dp, "t1-k4", ACC, f2), v(dp, "t1-k4", BPD, f2), v(dp, "t2-k2", FDE),
          v(dp, "t4-k1", FDE)]),
        ("four blocks of one layer beat two of two by {} times the rows' noise in quadrature (each row's std across "
         "seeds, floored at its bootstrap std), with acc_cls {} against {} and bits/dim {} against {}",
         [gap(dp, "t4-k1", "t2-k2"), v(dp, "t4-k1", ACC, f2), v(dp, "t2-k2", ACC, f2), v(dp, "t4-k1", BPD, f2),
          v(dp, "t2-k2", BPD, f2)]),
    ], gd: [
        ("fd_effnet {} at its best w = {} against {} unguided, acc_cls {} against {}",
         [v(gd, "cfg", FDE), best("cfg"), v(gd, "conditional", FDE), v(gd, "cfg", ACC, f2),
          v(gd, "conditional", ACC, f2)]),
        ("(tau = 2): {} at w = {} against {} unguided; sharpening it (tau = 0.5) makes every w > 0 worse, so that "
         "row's best is the unguided w = {}",
         [v(gd, "temperature-2", FDE), best("temperature-2"), v(gd, "unconditional", FDE), best("temperature-0p5")]),
        ("on fd_effnet by {} times the rows' noise in quadrature (each row's std across seeds, floored at its "
         "bootstrap std) but trails it on the domain classifier's fd_cls ({} against {}, {} times)",
         [beyond("cfg", "temperature-2", "fd_effnet", gd), v(gd, "temperature-2", FDC), v(gd, "cfg", FDC),
          beyond("cfg", "temperature-2", "fd_cls", gd)]),
        ("On fd_cls tau = 2 does not even beat no guidance ({} against {} unguided, {} times, its seeds far apart at {} "
         "and {})",
         [v(gd, "temperature-2", FDC), v(gd, "unconditional", FDC),
          within("temperature-2", "unconditional", "fd_cls", gd),
          *(f0(r["metrics"]["fd_cls"]) for r in sorted(recs("temperature-2", gd), key=lambda r: r["seed"]))]),
    ], nz: [
        ("tie for best after denoising: fd_effnet {} against {}, seed means of two Fs a row, {} times the rows' noise "
         "in quadrature (each row's std across seeds, floored at its bootstrap std), and 0.1 beats 0.05 on the domain "
         "classifier (fd_cls {} against {}, {} times; acc_cls {} against {})",
         [n("0p05", "score"), n("0p1", "score"), within("sigma-0p05-score", "sigma-0p1-score", "fd_effnet", nz),
          n("0p1", "score", FDC), n("0p05", "score", FDC), beyond("sigma-0p05-score", "sigma-0p1-score", "fd_cls", nz),
          n("0p1", "score", ACC, f2), n("0p05", "score", ACC, f2)]),
        ("fd_effnet {}, which the score step cannot mend ({} raw), though its bits/dim is the lowest ({})",
         [v(nz, "uniform-score", FDE), v(nz, "uniform-none", FDE), v(nz, "uniform-score", BPD, f2)]),
        ("(sigma = 0.01: {} against {} raw; sigma = 0.2: {} against {})",
         [n("0p01", "score"), n("0p01", "none"), n("0p2", "score"), n("0p2", "none")]),
        ("({} to {} against {} to {}); over all five Gaussian levels the two move alike (worst / best {} against {})",
         [*span(SIGMAS[1:], "score"), *span(SIGMAS[1:], "none"),
          f2(spread(SIGMAS, "score")), f2(spread(SIGMAS, "none"))]),
    ]}


@pytest.mark.parametrize("table", ["tarflow-vp", "tarflow-coupling", "tarflow-depth", "tarflow-guidance",
                                   "tarflow-noise"])
def test_tarflow_readings_quote_their_records(table: str):
    check(RESULTS / "small" / table / "COMMENTARY.md", claims_tarflow()[table])


def tarflow_job_minutes(seed: int) -> tuple[float, int]:
    """The wall times of TARFlow's tables' records of one seed summed (minutes, rows): an F resumed from a checkpoint
    adds its training before the resume, pro rata of its steps."""
    total, rows = 0.0, 0
    for path in sorted(RESULTS.glob(f"small/tarflow-*/*__seed{seed}.json")):
        rec = json.loads(path.read_text())
        s1 = rec["train"]["stage1"]
        earlier = s1["seconds"] * s1["resumed_from"] / s1["steps"] if not s1["cached"] and s1["resumed_from"] else 0.0
        total, rows = total + rec["wall_time_s"] + earlier, rows + 1
    return total / 60, rows


def test_tarflow_time_quotes_its_records():
    """The cold run of `make reproduce-tarflow` (results/small/reproductions.json) as the pages give it, and its
    records' job-minutes: two one-thread jobs cannot fill more than two job-minutes a minute."""
    run = json.loads((RESULTS / "small" / "reproductions.json").read_text())["reproduce-tarflow"]
    minutes, (job_minutes, rows) = run["wall_s"] / 60, tarflow_job_minutes(run["seed"])
    assert run["cold_cache"] and run["exit_code"] == 0 and rows == 24, run
    assert job_minutes <= 2 * minutes, (job_minutes, minutes)
    check(ROOT / "docs" / "tarflow.md", [
        ("`make reproduce-tarflow SEED={}` took {} minutes from a cold cache", [str(run["seed"]), f0(minutes)]),
        ("Its records took {} job-minutes over their {} rows, {}% of the two cores' time",
         [f0(job_minutes), str(rows), f0(100 * job_minutes / (2 * minutes))]),
        ("Seed 0's records, measured table by table, took {} job-minutes", [f0(tarflow_job_minutes(0)[0])])])
    check(ROOT / "README.md", [("`make reproduce-tarflow` ({} minutes from a cold cache on 2 cores", [f0(minutes)])])
    nz, dp = "tarflow-noise", "tarflow-depth"
    check(ROOT / "docs" / "history.md", [
        ("ran from an empty `BIFLOW_CACHE` at commit {}, {}-{} UTC, {} s",
         [run["commit"][:7], run["started"][11:19], run["ended"][11:19], f"{run['wall_s']:,}"]),
        ("turns the other way ({} against {}, {}σ)", [f0(val("sigma-0p05-score", FDE, nz)),
                                                      f0(val("sigma-0p1-score", FDE, nz)),
                                                      within("sigma-0p05-score", "sigma-0p1-score", "fd_effnet", nz)]),
        ("T = 4 x K = 1 over T = K = 2 ({} against {})", [f0(val("t4-k1", FDE, dp)), f0(val("t2-k2", FDE, dp))])])


def test_tarflow_tables_have_two_seeds_a_row():
    """The readings speak of seed means of two Fs a row."""
    for spec in load_registry().values():
        if spec.name.startswith("tarflow-"):
            for variant in spec.variants:
                assert sorted(r["seed"] for r in recs(variant, spec.name)) == [0, 1], (spec.name, variant)
