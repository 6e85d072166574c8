"""Frechet distance between Gaussian fits of feature sets, its bootstrap standard deviation, and k-NN precision /
recall (Kynkaanniemi et al., 2019; torch-fidelity's implementation) in the same features.

The `*_std` keys of a record are bootstrap standard deviations of the Frechet distance over resamples of the
generated set: the run-to-run noise a report prints next to the score.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy import linalg
from torch_fidelity.metric_prc import calculate_precision_recall_full

PRC_NEIGHBORHOOD = 3  # the k of precision / recall's k-NN balls (torch-fidelity's default)


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
