"""The paper scale: B/2 and XL/2 presets sized like the paper's models, the VAE latent pipeline end to end on a tiny
random AutoencoderKL (prepare -> train both stages -> sample -> decode -> metrics), `run` at the tiny-latent scale
under torchrun (the paper scale's path), and the one-line errors for a missing VAE, Inception weights or FID
reference statistics."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biflow_bench.ablations import load_registry
from biflow_bench.config import SCALES, apply_delta, scale_config
from biflow_bench.data import DataError, LatentDataset, data_generator, get_batch, load_dataset, shard_name
from biflow_bench.latents import (decode_latents, latent_inputs, load_images, load_vae, make_tiny_vae,
                                  prepare_latents, sample_postprocess, tiny_latent_inputs, vae_weights_note)
from biflow_bench.metrics.fidelity import compute_fidelity
from biflow_bench.metrics.likelihood import count_params
from biflow_bench.metrics.reference import load_reference, reference_stats, save_reference_stats
from biflow_bench.models import PRESETS, build_models
from biflow_bench.models.presets import PAPER_PARAMS
from biflow_bench.sample import Sampler, generate
from biflow_bench.training.stages import train_backward, train_flow
from biflow_bench.weights import WeightsError


@pytest.mark.parametrize("preset", ["paper-B/2", "paper-XL/2"])
def test_paper_presets_match_the_papers_parameter_counts(preset):
    with torch.device("meta"):  # sized without allocating 690M parameters
        flow, g = build_models(preset)
    f_cfg, g_cfg = flow.config, g.config
    assert (f_cfg.in_channels, f_cfg.image_size, f_cfg.patch_size) == (4, 32, 2)  # 32x32x4 latents, patch 2
    assert f_cfg.num_tokens == g_cfg.num_tokens == 256 and f_cfg.token_dim == 16 and f_cfg.num_classes == 1000
    assert g_cfg.num_groups == f_cfg.num_blocks  # one stage of G per flow block
    for model, paper in zip((flow, g), PAPER_PARAMS[preset], strict=True):
        if paper is not None:
            assert abs(count_params(model) / paper - 1) < 0.05, (type(model).__name__, count_params(model), paper)
    if preset == "paper-XL/2":  # BiFlow-XL/2's count is not in our sources: an XL/2 backbone, larger than B/2's G
        assert 500e6 < count_params(g) < 800e6


def test_paper_scales_resolve_every_ablation():
    assert (SCALES["paper"].flow, SCALES["paper"].backward) == PRESETS["paper-B/2"]
    assert SCALES["paper-xl"].backward.width == 1152
    assert SCALES["paper"].eval.extractor == "inception-v3-compat" and SCALES["paper"].sample.num_samples == 50_000
    for spec in load_registry().values():
        for variant in spec.variants:
            for scale in ("tiny-latent", "paper", "paper-xl"):
                assert spec.resolve(variant, scale).dataset == "latents"


# ----------------------------------------------------------------------------------------------------------------------
# The latent pipeline



@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    """20 PNGs in 2 class folders (40x48: the crop matters), a tiny random VAE saved like sd-vae-ft-ema, and its
    latents prepared by two 'ranks' in turn."""
    root = tmp_path_factory.mktemp("latent")
    rng = np.random.default_rng(0)
    for c, red in (("cat", 220), ("dog", 20)):
        (root / "images" / c).mkdir(parents=True)
        for i in range(10):
            arr = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
            arr[..., 0] = red
            Image.fromarray(arr).save(root / "images" / c / f"{i:02d}.png")
    vae_dir = make_tiny_vae(root / "vae")
    vae = load_vae(vae_dir)
    written = [prepare_latents(root / "images", root / "latents", vae, image_size=32, batch_size=8, rank=r,
                               world_size=2, shard_size=6, progress=False) for r in range(2)]
    return root, vae, written


def test_prepare_latents_shards_ranks_resume_and_flips(latent_setup):
    root, vae, written = latent_setup
    assert [[p.name for p in w] for w in written] == [[shard_name(0), shard_name(2)], [shard_name(1), shard_name(3)]]
    out = root / "latents"
    # resumable: finished shards are skipped, a missing one is redone
    before = (out / shard_name(0)).stat().st_mtime_ns
    (out / shard_name(3)).unlink()
    (out / (shard_name(3) + ".sha256")).unlink()
    with pytest.raises(DataError, match="shard 3 of 4 is missing"):
        LatentDataset(out)
    redo = prepare_latents(root / "images", out, vae, image_size=32, batch_size=8, rank=1, world_size=2,
                           shard_size=6, progress=False)
    assert [p.name for p in redo] == [shard_name(3)] and (out / shard_name(0)).stat().st_mtime_ns == before
    with pytest.raises(DataError, match="another image folder, size or VAE"):
        prepare_latents(root / "images", out, vae, image_size=64, shard_size=6, progress=False)

    data = LatentDataset(out)
    assert len(data) == 20 and data.labels.tolist() == [0] * 10 + [1] * 10 and data.latent_shape == (4, 16, 16)
    images, labels = load_images(root / "images", 32)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and torch.equal(labels, data.labels)
    x = images[[3, 14]].float() / 127.5 - 1
    with torch.no_grad():
        mean, flip_mean = (vae.encode(v).latent_dist.mean for v in (x, x.flip(-1)))
    m = data.moments(torch.tensor([3, 14]))
    torch.testing.assert_close(m[:, 0, 0], mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m[:, 1, 0], flip_mean, atol=1e-5, rtol=1e-5)
    assert (m[:, :, 1] > 0).all()  # std
    torch.testing.assert_close(data.images[[3, 14]], data.scale * mean, atol=1e-5, rtol=1e-5)

    # posterior samples: scale * (mean + std * eps), reproducible from the generator, never just the mean
    a, ya = get_batch(data, torch.tensor([3, 14]), data_generator(0, 5))
    b, _ = get_batch(data, torch.tensor([3, 14]), data_generator(0, 5))
    c, _ = get_batch(data, torch.tensor([3, 14]), data_generator(0, 6))
    assert torch.equal(a, b) and not torch.equal(a, c) and ya.tolist() == [0, 1]
    assert not torch.allclose(a, data.images[[3, 14]], atol=1e-3)
    # decoding returns images in [-1, 1] of the input size
    img = decode_latents(vae, data.images[[0, 1]])
    assert img.shape == (2, 3, 32, 32) and img.min() >= -1 and img.max() <= 1


@pytest.mark.slow
def test_latent_pipeline_trains_samples_decodes_and_scores(latent_setup):
    root, vae, _ = latent_setup
    splits = load_dataset("latents", root / "latents")
    assert len(splits.train) == 19 and len(splits.test) == 1  # 1 in 20 held out
    cfg = apply_delta(scale_config("tiny-latent"), {"stage1.steps": 8, "stage2.steps": 8, "stage1.batch_size": 8,
                                                    "stage2.batch_size": 8, "stage1.warmup": 2, "stage2.warmup": 2})
    flow, r1 = train_flow(cfg, splits.train, progress=False)
    g, r2 = train_backward(cfg, flow, splits.train, seed=0, progress=False)
    assert r1.steps == r2.steps == 8 and r1.skipped_steps == r2.skipped_steps == 0
    assert np.isfinite(r1.terms["nll"]) and np.isfinite(r2.terms["mse"])
    labels = torch.arange(20) % 2
    images = generate(Sampler.from_config(cfg), flow, g, labels, range(20), 8, 0, postprocess=sample_postprocess(vae))
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    reference, _ = load_images(root / "images", 32)
    metrics = compute_fidelity(images, reference, resize=64, bootstrap=2)
    assert set(metrics) == {"fd_effnet", "is_effnet", "fd_effnet_std", "precision_effnet", "recall_effnet"}
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())


# ----------------------------------------------------------------------------------------------------------------------
# Missing VAE, Inception weights, reference statistics: one line each


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    for var in ("BIFLOW_VAE", "BIFLOW_INCEPTION_WEIGHTS", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_missing_or_foreign_vae_is_a_weights_error(no_caches):
    with pytest.raises(WeightsError, match=r"AutoencoderKL directory .* not found: put sd-vae-ft-ema .*BIFLOW_VAE"):
        load_vae()
    with pytest.raises(WeightsError, match="does not exist"):
        load_vae(no_caches / "nope")
    (no_caches / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        load_vae(no_caches / "empty")


def test_reference_statistics(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    got = load_reference(save_reference_stats(tmp_path / "ref.npz", mu, sigma))
    assert got[0].dtype == np.float64 and np.array_equal(got[0], mu) and np.array_equal(got[1], sigma)
    with pytest.raises(WeightsError, match="VIRTUAL_imagenet256_labeled.npz"):
        load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(WeightsError, match="need keys mu and sigma"):
        load_reference(tmp_path / "bad.npz")


def test_reference_statistics_of_a_folder_are_computed_once(latent_setup, tmp_path):
    root, _, _ = latent_setup
    folder = tmp_path / "ref"
    shutil.copytree(root / "images", folder)
    mu, sigma = load_reference(folder, 32, extractor="effnet-lite0", cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache" / "reference").glob("*.npz"))
    assert len(cached) == 1 and mu.shape == (1280,) and sigma.shape == (1280, 1280)
    images, _ = load_images(folder, 32)
    assert np.allclose(mu, reference_stats(images, extractor="effnet-lite0")[0], atol=1e-5)
    cached[0].write_bytes(b"truncated")  # a corrupted cache entry is recomputed, not trusted
    again = load_reference(folder, 32, extractor="effnet-lite0", cache_dir=tmp_path / "cache")
    assert np.array_equal(again[0], mu) and np.array_equal(again[1], sigma)
    (folder / "cat" / "00.png").unlink()  # another file list: other statistics
    other = load_reference(folder, 32, extractor="effnet-lite0", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "reference").glob("*.npz"))) == 2 and not np.array_equal(other[0], mu)


def _cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """`biflow-bench ARGS` in this process (the entry point's error handling included): exit code and stderr."""
    from biflow_bench import cli

    monkeypatch.setattr(sys, "argv", ["biflow-bench", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr().err


def test_cli_names_what_is_missing(no_caches, capsys, monkeypatch):
    ref = no_caches / "missing.npz"
    fake_inception = no_caches / "inception.pth"
    fake_inception.write_bytes(b"")
    cases = [
        (["sample-dist", "main", "biflow", "--scale", "paper"], "sd-vae-ft-ema"),
        (["prepare-latents", str(no_caches), str(no_caches / "out")], "BIFLOW_VAE"),
        (["sample-dist", "main", "biflow", "--ref-stats", str(ref)], "weights-inception-2015-12-05-6726825d.pth"),
        (["sample-dist", "main", "biflow", "--ref-stats", str(ref)], "VIRTUAL_imagenet256_labeled.npz"),
        (["sample-dist", "main", "biflow", "--set", "stage1.steps=3"], "no trained model"),
        (["run", "denoise", "--scale", "tiny", "--vae", str(no_caches)], "are for the latent scales"),
        (["train", "main", "biflow", "--scale", "paper"], "`run ABLATION --scale paper --vae DIR --ref-stats"),
        (["run", "denoise", "--scale", "paper", "--results-dir", str(no_caches / "r")], "sd-vae-ft-ema"),
    ]
    for i, (args, message) in enumerate(cases):
        if i == 3:
            monkeypatch.setenv("BIFLOW_INCEPTION_WEIGHTS", str(fake_inception))
        code, err = _cli(capsys, monkeypatch, *args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, (message, err)


# ----------------------------------------------------------------------------------------------------------------------
# `run` at a latent scale: the table's records under torchrun

# A few steps of everything: this checks the path (DDP training, sharded sampling and decoding, rank-0 scoring)
QUICK_LATENT = {"stage1.steps": 2, "stage2.steps": 2, "stage1.batch_size": 8, "stage2.batch_size": 8,
                "stage1.warmup": 1, "stage2.warmup": 1, "sample.num_samples": 20, "sample.batch_size": 10,
                "eval.nll_samples": 8}


def _latent_run_args(root: Path, results: Path, *extra: str) -> list[str]:
    sets = [a for k, v in QUICK_LATENT.items() for a in ("--set", f"{k}={v}")]
    return ["run", "denoise", "--variants", "learned,none", "--scale", "tiny-latent", "--data-dir",
            str(root / "latents"), "--vae", str(root / "vae"), "--results-dir", str(results), *sets, *extra]


@pytest.mark.slow
def test_run_at_tiny_latent_under_torchrun_writes_the_tables_records_and_resumes(latent_setup, tmp_path):
    """`torchrun ... run denoise --scale tiny-latent` (the paper scale's command in miniature): one record per variant
    asked, scored in decoded-image features against the reference folder; run again, it skips both."""
    root, _, _ = latent_setup
    args = _latent_run_args(root, tmp_path / "results", "--ref-stats", str(root / "images"))
    env = {**os.environ, "BIFLOW_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}

    def torchrun() -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "biflow_bench", *args], capture_output=True, text=True, timeout=300, env=env,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    first = torchrun()
    paths = [Path(line) for line in first.stdout.splitlines()]  # rank 0 alone prints
    assert [p.name.split("__")[0] for p in paths] == ["learned", "none"]
    assert all(p.parent == tmp_path / "results" / "tiny-latent" / "denoise" for p in paths)
    for path in paths:
        rec = json.loads(path.read_text())
        assert rec["metric"] == "fd_effnet" and set(rec["metrics"]) == {"fd_effnet", "fd_effnet_std", "is_effnet", "bpd"}
        assert all(math.isfinite(v) and v > 0 for v in rec["metrics"].values())
        assert rec["train"]["stage2"]["world_size"] == 2 and rec["overrides"]["micro_batch"] == 4
        assert rec["latent"]["ref_stats"] == str(root / "images") and rec["calibration"] is None
        assert (tmp_path / "results" / "tiny-latent" / rec["samples_png"]).is_file()
    written = [p.stat().st_mtime_ns for p in paths]

    second = torchrun()
    assert second.stdout == first.stdout and [p.stat().st_mtime_ns for p in paths] == written
    assert second.stderr.count("already recorded") == 2 and "stage 1 (F)" not in second.stderr


def test_run_at_a_latent_scale_checks_the_reference_before_training(latent_setup, tmp_path, capsys, monkeypatch):
    root, _, _ = latent_setup
    monkeypatch.setenv("BIFLOW_VAE", str(root / "vae"))  # `run --vae` sets it for stage 2; restored after the test
    other = save_reference_stats(tmp_path / "other.npz", np.zeros(3), np.eye(3))
    for extra, message in (((), "no --ref-stats given"), (("--ref-stats", str(other)), "statistics of dimension 3")):
        code, err = _cli(capsys, monkeypatch, *_latent_run_args(root, tmp_path / "results", *extra))
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "cache" / "stage1").exists()  # nothing trained


@pytest.mark.slow
def test_tiny_latent_runs_under_torchrun_from_a_clone_with_nothing_given(tmp_path):
    """`torchrun ... run --scale tiny-latent` with no --data-dir, --vae or --ref-stats: rank 0 builds the scale's
    own inputs once (digits at 32x32 RGB, a tiny random VAE, its latents) while rank 1 waits; every record says the
    VAE's weights are random. A second call finds them built."""
    cache = tmp_path / "cache"
    sets = [a for k, v in QUICK_LATENT.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "BIFLOW_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("BIFLOW_VAE", None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "biflow_bench", "run", "denoise", "--variants", "learned", "--scale", "tiny-latent",
                          "--results-dir", str(tmp_path / "results"), *sets], capture_output=True, text=True,
                         timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("building its digits images") == 1
    rec = json.loads(Path(out.stdout.strip()).read_text())
    assert rec["latent"]["vae"] == str(cache / "tiny-latent" / "vae") and "random weights" in rec["latent"]["vae_weights"]
    assert rec["latent"]["ref_stats"] == str(cache / "tiny-latent" / "images")
    assert math.isfinite(rec["metrics"]["fd_effnet"]) and rec["overrides"]["micro_batch"] == 4

    data = LatentDataset(cache / "tiny-latent" / "latents")
    assert len(data) == 1797 and data.num_classes == 10 and data.latent_shape == (4, 16, 16)
    assert sorted(p.name for p in (cache / "tiny-latent" / "images").iterdir()) == [str(c) for c in range(10)]
    built = (cache / "tiny-latent" / "latents" / "meta.json").stat().st_mtime_ns
    assert tiny_latent_inputs(cache) == (cache / "tiny-latent" / "latents", cache / "tiny-latent" / "vae",
                                         cache / "tiny-latent" / "images")
    assert (cache / "tiny-latent" / "latents" / "meta.json").stat().st_mtime_ns == built  # not rebuilt


def test_latent_inputs_default_only_tiny_latent_with_nothing_given(tmp_path):
    given = (tmp_path / "latents", tmp_path / "vae", tmp_path / "ref.npz")
    assert latent_inputs("tiny-latent", *given, tmp_path) == given
    assert latent_inputs("paper", None, None, None, tmp_path) == (None, None, None)  # the paper needs its own
    assert not (tmp_path / "tiny-latent").exists()
    assert vae_weights_note(tmp_path) is None  # a VAE the suite did not make carries no note
    assert "random weights (seed 3)" in vae_weights_note(make_tiny_vae(tmp_path / "made", seed=3))
