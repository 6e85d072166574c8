"""Sample quality against the dataset's held-out real images, the metrics step of the pipeline as the runner applies
it: the extractor's Frechet distance / score / precision / recall (metrics/fidelity.py), the domain classifier's
acc_cls / conf_cls / fd_cls (metrics/classifier.py) and the noise left in the images, with the real side (features,
the classifier) computed once per process. Calibration rows apply the same code to real images (as they are, with
the training noise, blurred), so every number has a floor; `ensure_calibration` keeps them in
results/<scale>/calibration.json, computed once per calibration key.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, config_hash
from .data import add_noise, dataset_splits, to_uint8
from .files import atomic_write_json, dir_lock
from .metrics.classifier import (DomainClassifier, classifier_config, classifier_key, classifier_metrics,
                                 get_classifier, reference_features_stats)
from .metrics.fidelity import compute_fidelity
from .metrics.images import box_blur, residual_noise
from .metrics.reference import reference_features
from .paths import default_cache_dir
from .results import CALIBRATION


@cache
def _reference_features(dataset: str, data_dir: str | None, num_real: int, extractor: str, resize: int):
    """Features of the held-out real images (for the Frechet distance, precision and recall), once per process."""
    real = dataset_splits(dataset, data_dir).test.images[:num_real]
    return reference_features(to_uint8(real), extractor=extractor, resize=resize)


_CLASSIFIERS: dict[tuple[str, str | None, str], tuple[DomainClassifier, dict[str, Any]]] = {}


def domain_classifier(dataset: str, data_dir: str | None, cache_dir: Path) -> tuple[DomainClassifier, dict[str, Any]]:
    """The dataset's classifier (cached artifact), kept in memory per process: it is a function of its key."""
    splits = dataset_splits(dataset, data_dir)
    memo = (dataset, data_dir, classifier_key(dataset, classifier_config(splits)))
    if memo not in _CLASSIFIERS:
        _CLASSIFIERS[memo] = get_classifier(dataset, splits, cache_dir)
    return _CLASSIFIERS[memo]


@cache
def _classifier_reference(dataset: str, data_dir: str | None, num_real: int, cache_dir: Path):
    model, _ = domain_classifier(dataset, data_dir, cache_dir)
    return reference_features_stats(model, dataset_splits(dataset, data_dir).test.images[:num_real])


def image_metrics(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor | None, data_dir: Path | None = None,
                  cache_dir: Path | None = None, kid: bool = False) -> dict[str, float]:
    """Every sample-quality metric of a set of [-1, 1] images against the held-out real images: the extractor's
    Frechet distance / score / precision / recall, the domain classifier's acc_cls / conf_cls (with labels) and
    fd_cls, its test accuracy (cls_test_acc), and the noise left in the images (noise_residual); `kid`: also the
    kernel distance (small sets: the editing table)."""
    dd, cache_dir = (str(data_dir) if data_dir else None), cache_dir or default_cache_dir()
    ev = cfg.eval
    real = _reference_features(cfg.dataset, dd, ev.num_real, ev.extractor, ev.resize)
    metrics = compute_fidelity(to_uint8(images), real, extractor=ev.extractor, resize=ev.resize, kid=kid)
    model, meta = domain_classifier(cfg.dataset, dd, cache_dir)
    metrics.update(classifier_metrics(model, images, labels, _classifier_reference(cfg.dataset, dd, ev.num_real,
                                                                                    cache_dir)))
    metrics["cls_test_acc"] = float(meta["test_accuracy"])
    metrics["noise_residual"] = residual_noise(images)
    return metrics


# ----------------------------------------------------------------------------------------------------- calibration

CALIBRATION_ROWS = {  # name -> label; the same metric code on the same number of real images
    "real": "real data: training images (the floor)",
    "real+noise": "real data: training images + training noise",
    "real+blur": "real data: training images, 3x3 box blur",
}


def calibration_key(cfg: RunConfig, data_dir: Path | None = None) -> str:
    """What determines the calibration rows: dataset, eval config, number of images, noise, classifier."""
    splits = dataset_splits(cfg.dataset, str(data_dir) if data_dir else None)
    return config_hash({"dataset": cfg.dataset, "eval": cfg.eval, "num_images": cfg.sample.num_samples,
                        "noise_sigma": cfg.stage1.noise_sigma,
                        "classifier": classifier_key(cfg.dataset, classifier_config(splits))})


def calibration_rows(cfg: RunConfig, data_dir: Path | None = None,
                     cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """`image_metrics` of num_samples training images (a fixed random subset, their own labels) as they are, with
    Gaussian noise of the training sigma, and blurred by a 3x3 box: where real data lands on every metric."""
    train = dataset_splits(cfg.dataset, str(data_dir) if data_dir else None).train
    n = min(cfg.sample.num_samples, len(train))
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    images, labels = train.images[rows], train.labels[rows] if cfg.flow.num_classes else None
    noisy = add_noise(images, cfg.stage1.noise_sigma, torch.Generator().manual_seed(1)).clamp(-1, 1)
    out = []
    for name, x in (("real", images), ("real+noise", noisy), ("real+blur", box_blur(images))):
        out.append({"name": name, "label": CALIBRATION_ROWS[name],
                    "metrics": image_metrics(cfg, x, labels, data_dir, cache_dir)})
    return out


def ensure_calibration(cfg: RunConfig, results_dir: Path, data_dir: Path | None = None,
                       cache_dir: Path | None = None) -> str:
    """The calibration entry of `cfg` in results/<scale>/calibration.json, computed and added (atomically) when
    missing or unreadable; returns its key (which each record names). Tables of one scale may run side by side
    (each holds its own lock): the scale's lock makes one of them compute a missing entry and the others find it."""
    key, cache_dir = calibration_key(cfg, data_dir), cache_dir or default_cache_dir()
    path = results_dir / cfg.scale / CALIBRATION
    if key in _calibration_entries(path, warn=False):
        return key
    with dir_lock(path.parent, wait=True):
        entries = _calibration_entries(path, warn=True)
        if key not in entries:
            _log(f"[calibration] real-data rows for {cfg.dataset}, {cfg.sample.num_samples} images")
            model_meta = domain_classifier(cfg.dataset, str(data_dir) if data_dir else None, cache_dir)[1]
            entries[key] = {"key": key, "dataset": cfg.dataset, "eval": dataclasses.asdict(cfg.eval),
                            "num_images": cfg.sample.num_samples, "noise_sigma": cfg.stage1.noise_sigma,
                            "classifier": {"key": model_meta["key"], "test_accuracy": model_meta["test_accuracy"]},
                            "rows": calibration_rows(cfg, data_dir, cache_dir)}
            atomic_write_json(path, {"schema": 1, "entries": entries})
    return key


def _calibration_entries(path: Path, warn: bool) -> dict[str, Any]:
    """calibration.json's entries; {} when it is missing or unreadable (with a warning when `warn`)."""
    try:
        entries = json.loads(path.read_text())["entries"] if path.exists() else {}
        if not isinstance(entries, dict):
            raise ValueError("entries is not an object")
        return entries
    except (OSError, ValueError, KeyError, TypeError) as e:
        if warn:
            _log(f"warning: {path} unreadable ({e}); computing the calibration rows again")
        return {}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
