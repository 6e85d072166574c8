"""What `run` adds at the latent scales (tiny-latent, paper, paper-xl): F and G model VAE latents, so every rank
decodes its share of the samples with the VAE (--vae) and rank 0 scores the decoded images against FID reference
statistics (--ref-stats: an .npz with mu and sigma such as ADM's, or a folder of reference images) in the scale's
extractor, as `sample-dist` does. The pixel scales' domain classifier and calibration rows have no latent
counterpart: they need labelled real images in the space the models sample.

Samples stay uint8 here (50,000 decoded 256 px images are 9.8 GB so, four times that as floats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import RunConfig
from .data import DataError
from .distributed import DistEnv, broadcast_object
from .weights import WeightsError


@dataclass(frozen=True)
class LatentEval:
    vae: Any  # diffusers AutoencoderKL on the run's device
    reference: tuple[np.ndarray, np.ndarray] | None  # (mu, sigma) on rank 0, which alone evaluates; else None
    source: dict[str, str]  # the VAE directory and the reference, as the record names them

    def postprocess(self) -> Callable[[Tensor], Tensor]:
        from .latents import sample_postprocess

        return sample_postprocess(self.vae)


_LOADED: dict[tuple[str, ...], LatentEval] = {}


def decoded_size(vae: Any, cfg: RunConfig) -> int:
    """The side of the images the VAE decodes F's latents to (one upsampling per block but the last)."""
    return cfg.flow.image_size * 2 ** (len(vae.config.block_out_channels) - 1)


def latent_eval(cfg: RunConfig, vae: str | Path | None, ref_stats: str | Path | None, env: DistEnv,
                cache_dir: Path) -> LatentEval:
    """The VAE and reference statistics of a latent-scale run, loaded once per process. A missing or unreadable one,
    or statistics of another extractor, is the same one-line error on every rank before any training."""
    from .latents import load_vae, vae_weights_note
    from .metrics.reference import load_reference

    key = (str(vae), str(ref_stats), cfg.eval.extractor, str(cfg.flow.image_size), str(env.device))
    if key not in _LOADED:
        model = load_vae(vae, env.device)
        error, reference = None, None
        if env.is_main:  # a folder's statistics are computed (and cached) by the rank that evaluates
            try:
                reference = load_reference(ref_stats, decoded_size(model, cfg), cfg.eval.extractor, cache_dir)
                _check_dimension(reference, cfg.eval.extractor, ref_stats)
            except (WeightsError, DataError) as e:
                error = e
        if (error := broadcast_object(error, env)) is not None:
            raise error
        source = {"vae": str(getattr(model.config, "_name_or_path", "") or vae), "ref_stats": str(ref_stats)}
        if note := vae_weights_note(source["vae"]):  # a VAE the suite made (tiny-latent, rehearsals) says so
            source["vae_weights"] = note
        _LOADED[key] = LatentEval(model, reference, source)
    return _LOADED[key]


def _check_dimension(reference: tuple[np.ndarray, np.ndarray], extractor: str, ref_stats: str | Path | None) -> None:
    """Statistics of another extractor than the scale's would fail only after training: one image tells."""
    from .metrics.extractors import extract_features

    dim = next(iter(extract_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), extractor).values())).shape[1]
    if reference[0].shape != (dim,):
        raise WeightsError(f"--ref-stats {ref_stats}: statistics of dimension {reference[0].shape[0]}, but "
                           f"{extractor} (eval.extractor) gives {dim} features; pass statistics of {extractor}")


def latent_metrics(cfg: RunConfig, images: Tensor, latent: LatentEval) -> dict[str, float]:
    """Frechet distance and score of decoded uint8 samples against the reference statistics, at the extractor's
    default input side, which the reference statistics were computed at (statistics hold no features, so no
    precision / recall)."""
    from .metrics.fidelity import compute_fidelity

    assert latent.reference is not None, "rank 0 alone evaluates"
    return compute_fidelity(images, latent.reference, extractor=cfg.eval.extractor)


def unit_range(images: Tensor) -> Tensor:
    """Images as the pixel scales hold them, in [-1, 1] (uint8 decoded samples converted; others unchanged)."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
