"""The fidelity report of a set of generated images against real ones: Frechet distance (with its bootstrap std) and
Inception-style score on an extractor's features (metrics/extractors.py) and, given the real images' features (not
only their statistics), k-NN precision and recall (k = 3) in the same features: precision_effnet / recall_effnet
(precision / recall with Inception).
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from .extractors import (EFFNET_NAME, MIN_PER_ISC_SPLIT, PRC_KEYS, RESULT_KEYS, check_extractor, default_layers,
                         feature_extractor, run_extractor)
from .frechet import feature_stats, frechet_bootstrap_std, frechet_distance_to, precision_recall


def compute_fidelity(generated_uint8: Tensor, reference_uint8: Tensor | np.ndarray | tuple[np.ndarray, np.ndarray],
                     extractor: str = EFFNET_NAME, resize: int = 224, batch_size: int = 100, bootstrap: int = 10,
                     isc_splits: int = 10, seed: int = 0, kid: bool = False) -> dict[str, float]:
    """Frechet distance and score of generated images against reference images, their features (N, D) from
    `reference_features`, or cached (mu, sigma). With images or features, also precision and recall (PRC_KEYS).

    One pass of the extractor over the generated set yields both the Frechet features and the logits; the score is
    torch-fidelity's own `isc_features_to_metric` (unshuffled), the distance `frechet_distance_to` (the value of
    `frechet_distance` on the float64 statistics),
    so both match `torch_fidelity.calculate_metrics` on the same extractor (the tests pin this). Score splits:
    `isc_splits`, reduced so each split has at least MIN_PER_ISC_SPLIT images. `resize` is the EfficientNet input side
    (Inception always uses 299). The std key is `frechet_bootstrap_std` with `bootstrap` resamples (NaN if < 2).
    `kid` (with reference images or features): also the kernel distance, unbiased at small N where the Frechet
    distance is not, by torch-fidelity's own kid_features_to_metric (100 subsets of up to 1,000): kid_<name> and
    kid_<name>_std.
    """
    check_extractor(extractor)
    fd_key, is_key, std_key = RESULT_KEYS[extractor]
    fd_layer, is_layer = default_layers(extractor)
    model = feature_extractor(extractor, [fd_layer, is_layer], resize)
    gen = run_extractor(model, generated_uint8, batch_size)
    real = None
    if isinstance(reference_uint8, Tensor):
        real = run_extractor(model, reference_uint8, batch_size)[fd_layer].numpy()
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
    if kid and real is not None:
        kid_key = f"kid_{fd_key.split('_', 1)[1]}" if "_" in fd_key else "kid"
        subset = min(1000, len(gen_fd), len(real))
        k = kid_features_to_metric(torch.from_numpy(gen_fd), torch.from_numpy(np.asarray(real)),
                                   kid_subset_size=subset, rng_seed=seed, verbose=False)
        out[kid_key], out[f"{kid_key}_std"] = k["kernel_inception_distance_mean"], k["kernel_inception_distance_std"]
    return out
