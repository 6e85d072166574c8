"""Training-free editing (editing.py, BiFlow eq. 6): the noise-space composition, the pixel-to-token mask, the
layout of z for both block directions, the exact round trip, kept-region PSNR, KID, and the command's bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from biflow_bench.config import ConfigError
from biflow_bench.editing import (compose, kept_error, parse_mask, paste, pixel_keep, round_trips, token_keep,
                                  tokens_to_pixels)
from biflow_bench.metrics.fidelity import compute_fidelity
from biflow_bench.models.tarflow import TARFlow, TARFlowConfig
from biflow_bench.speed.harness import unzero

from cli_helpers import invoke, one_line_error


def test_compose_is_eq_6_by_hand():
    z = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    eps = torch.tensor([[[[10.0, 20.0], [30.0, 40.0]]]])
    keep = torch.tensor([[True, False], [False, True]])
    # z' = M z + (1 - M) eps: kept where M = 1, the prior's noise elsewhere
    assert compose(z, eps, keep).tolist() == [[[[1.0, 20.0], [30.0, 4.0]]]]
    assert paste(z, eps, keep).tolist() == [[[[1.0, 20.0], [30.0, 4.0]]]]  # the same mix, in pixel space


def test_a_token_is_kept_only_when_its_whole_patch_is():
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 0] = False  # one pixel of the top-left patch hidden: that token goes
    keep[2:, 2:] = False  # the bottom-right patch hidden
    assert token_keep(keep, 2).tolist() == [False, True, True, False]
    assert tokens_to_pixels(token_keep(keep, 2), 2, 4).tolist() == [[False, False, True, True],
                                                                     [False, False, True, True],
                                                                     [True, True, False, False],
                                                                     [True, True, False, False]]


@pytest.mark.parametrize("name,hidden", [("centre", 0.25), ("left", 0.5), ("top", 0.5), ("random-25", 0.25),
                                         ("random-75", 0.75)])
def test_masks_hide_their_share(name, hidden):
    keep = pixel_keep(name, 8, 2, torch.Generator().manual_seed(0))
    assert float((~keep).float().mean()) == pytest.approx(hidden)
    if name == "left":
        assert not keep[:, :4].any() and keep[:, 4:].all()


@pytest.mark.parametrize("name,message", [("random-0", "inside (0, 100)"), ("random-100", "inside (0, 100)"),
                                          ("random-x", "must be a number"), ("random", "unknown mask"),
                                          ("diagonal", "unknown mask"), ("left-25", "unknown mask")])
def test_bad_masks_are_refused(name, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_mask(name)


@pytest.mark.parametrize("flip", [False, True])
def test_z_keeps_the_images_token_layout_in_both_block_directions(flip):
    """One flow block: z's token j depends on x's tokens up to j in the block's own order (raster order, or its
    reverse when flipped), so a mask on z's tokens is a mask on the image's patches whatever the direction."""
    flow = unzero(TARFlow(TARFlowConfig(image_size=4, patch_size=2, num_blocks=1, num_classes=0)), 0).double()
    block = flow.blocks[0]
    block.flip = flip
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v).z, x).reshape(16, 16)
    tokens = lambda i: (i // 4 // 2) * 2 + (i % 4) // 2  # noqa: E731  pixel index -> token index (raster)
    depends = torch.zeros(4, 4, dtype=torch.bool)
    for out in range(16):
        for inp in range(16):
            if jac[out, inp].abs() > 0:
                depends[tokens(out), tokens(inp)] = True
    expected = torch.tril(torch.ones(4, 4, dtype=torch.bool)) if not flip else torch.triu(torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(depends, expected)


def test_exact_round_trip_is_zero_and_g_round_trips_are_measured():
    flow = unzero(TARFlow(TARFlowConfig(image_size=4, patch_size=2, num_classes=3)), 0).double().eval()
    x, y = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])

    class Shift(torch.nn.Module):  # a stand-in G: the exact inverse plus a known offset
        def sample(self, z, y):
            return flow.reverse(z, y) + 0.1

    out = round_trips(flow, Shift(), x, y, torch.Generator().manual_seed(0))
    assert out["exact_after_f"] < 1e-20
    assert out["g_after_f"] == pytest.approx(0.01, rel=1e-6)  # (0.1)^2 per value


def test_kept_error_is_mse_and_psnr_of_the_kept_pixels():
    source, edited = torch.zeros(1, 1, 2, 2), torch.tensor([[[[0.5, 9.0], [9.0, 0.5]]]])
    keep = torch.tensor([[True, False], [False, True]])
    mse, psnr = kept_error(edited, source, keep)
    assert mse == 0.25 and psnr == pytest.approx(10 * math.log10(4 / 0.25))  # peak-to-peak 2 on [-1, 1]


def _plain_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (the KID of Binkowski et al.)."""
    d, m = a.shape[1], len(a)
    k = lambda u, v: (u @ v.T / d + 1) ** 3  # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                 - 2 * kab.mean())


def test_kid_is_the_plain_unbiased_mmd(monkeypatch):
    # with one subset of every image, KID is the MMD of the whole sets (std 0)
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(12, 5)), rng.normal(0.3, 1.0, size=(12, 5))
    import biflow_bench.metrics.fidelity as fidelity

    monkeypatch.setattr(fidelity, "feature_extractor", lambda *a, **k: None)
    monkeypatch.setattr(fidelity, "default_layers", lambda e: ("fd", "is"))
    monkeypatch.setattr(fidelity, "run_extractor", lambda m, x, b: {"fd": torch.from_numpy(gen).float(),
                                                                     "is": torch.randn(12, 7)})
    out = compute_fidelity(torch.zeros(12, 1, 2, 2, dtype=torch.uint8), real, kid=True, bootstrap=0)
    expected = _plain_kid(gen.astype(np.float32).astype(np.float64), real)
    assert out["kid_effnet"] == pytest.approx(expected, rel=1e-4) and out["kid_effnet_std"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--mask", "random-150"], "the fraction hidden must be inside (0, 100) percent"),
    (["--mask", "diagonal"], "unknown mask 'diagonal'"),
    (["--target-class", "12"], "--target-class 12: the data's classes are 0 to 9"),
    (["--decoder", "sideways"], "--decoder 'sideways': use one of G, exact, exact+score"),
])
def test_edit_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "edit.png"
    code, _, err = invoke(["edit", "main", "biflow-mse", "--scale", "tiny", *args, "--out", str(out)], monkeypatch,
                          capsys)
    assert code == 2 and message in one_line_error(err)
    assert not out.exists()


def test_edit_by_g_needs_a_learned_inverse(tmp_path, monkeypatch, capsys):
    code, _, err = invoke(["edit", "inverse-strategy", "exact", "--scale", "tiny", "--out", str(tmp_path / "e.png")],
                          monkeypatch, capsys)
    assert code == 2 and "has no learned inverse" in one_line_error(err)


@pytest.mark.slow
def test_editing_table_at_tiny_records_every_mask_decoder_and_renders(tmp_path):
    from biflow_bench import runner
    from biflow_bench.edit_table import EDIT_MASKS
    from biflow_bench.report.render import render_report
    from biflow_bench.results import read_record

    quick = {"stage1.steps": 30, "stage2.steps": 12, "sample.num_samples": 60, "eval.num_real": 60,
             "eval.resize": 32}
    opts = runner.RunOptions(results_dir=tmp_path / "results", cache_dir=tmp_path / "cache", overrides=quick,
                             progress=False)
    (path,) = runner.run("editing", ["biflow-mse"], scale="tiny", seed=0, opts=opts)
    rec = read_record(path)
    assert rec["kind"] == "editing" and rec["n"] == 64
    inpaint = [(r["mask"], r["decoder"], r["pasted"]) for r in rec["rows"] if r["edit"] == "inpaint"]
    assert inpaint == [(m, d, p) for m in EDIT_MASKS for d in ("G", "exact", "exact+score") for p in (False, True)]
    assert {r["decoder"] for r in rec["rows"] if r["edit"] == "class"} == {"G", "exact", "exact+score"}
    assert all({"fd_effnet", "kid_effnet", "kid_effnet_std", "acc_cls", "lpips_to_source"} <= set(r["metrics"])
               for r in rec["rows"])
    assert rec["round_trip"]["exact_after_f"] < 1e-8  # F's exact inverse undoes F
    assert {"G_ms_batch1", "G_ms_batch64", "exact_ms_batch64"} <= set(rec["timing"])
    assert all((tmp_path / "results" / "tiny" / png).is_file() for png in rec["grids"].values())
    assert runner.run("editing", ["biflow-mse"], scale="tiny", seed=0, opts=opts) == [path]  # recorded: skipped
    render_report(tmp_path / "results", tmp_path / "report", registry=None)
    page = (tmp_path / "report" / "tiny" / "editing.md").read_text()
    assert "### Inpainting (eq. 6)" in page and "| centre | G + paste |" in page and "### Class edits" in page
