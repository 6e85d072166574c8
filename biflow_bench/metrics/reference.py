"""Reference statistics: the real side of every Frechet distance. (mu, sigma) float64 or features of real images on
an extractor's Frechet layer, saved and loaded as .npz (keys mu, sigma: ADM's VIRTUAL_imagenet256_labeled.npz has
them), and the FID reference of the paper scale (an .npz, or an image folder whose statistics are computed once
and cached under <cache>/reference/, keyed by the folder's file list).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_write_bytes
from ..latents import ImageFiles, list_images
from ..paths import default_cache_dir
from ..weights import WeightsError
from .extractors import EFFNET_NAME, default_layers, extract_features
from .frechet import feature_stats

ADM_REFERENCE = ("VIRTUAL_imagenet256_labeled.npz (https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
                 "ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz)")


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


def load_reference(path: str | Path | None, image_size: int = 256, extractor: str = "inception-v3-compat",
                   cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 of the FID reference: an .npz (keys mu, sigma; e.g. ADM's), or an image folder whose
    statistics are computed once (center crop `image_size`, `extractor` features) and cached under
    `cache_dir`/reference, keyed by the folder's file list. Missing or unreadable: a one-line WeightsError."""
    if path is not None and Path(path).is_dir():
        return _folder_reference(Path(path), image_size, extractor, cache_dir)
    if path is None or not Path(path).is_file():
        where = f"{path} does not exist" if path else "no --ref-stats given"
        raise WeightsError(f"FID reference statistics: {where}; pass --ref-stats PATH to an .npz with mu and sigma "
                           f"(for ImageNet 256 ADM's {ADM_REFERENCE}) or to a folder of reference images")
    try:
        return load_reference_stats(path)
    except (OSError, ValueError) as e:
        raise WeightsError(f"FID reference statistics: {str(e).splitlines()[0]}") from None


def _folder_reference(folder: Path, image_size: int, extractor: str, cache_dir: Path | None,
                      chunk: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of an image folder, computed in chunks (memory stays bounded) and cached as an .npz."""
    _, files = list_images(folder)
    listing = [f"{f.relative_to(folder)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f, _ in files]
    key = hashlib.sha256(json.dumps([str(folder.resolve()), image_size, extractor, listing]).encode()).hexdigest()
    cached = (cache_dir or default_cache_dir()) / "reference" / f"{key[:16]}.npz"
    if cached.is_file():
        try:
            return load_reference_stats(cached)
        except (OSError, ValueError):
            print(f"{cached}: unreadable cached reference statistics; recomputing", file=sys.stderr)
    layer = default_layers(extractor)[0]
    images = ImageFiles(files, image_size)
    feats = [extract_features(torch.stack([images[i] for i in range(lo, min(lo + chunk, len(images)))]), extractor,
                              layers=[layer])[layer]  # (Inception resizes to 299 itself)
             for lo in range(0, len(images), chunk)]
    mu, sigma = feature_stats(np.concatenate(feats))
    save_reference_stats(cached, mu, sigma)
    return mu, sigma
