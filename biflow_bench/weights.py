"""Pretrained weights, resolved in one place and never downloaded behind the user's back.

Order: an explicit path -> the weight's environment variable -> the usual local caches (TORCH_HOME's
hub/checkpoints, the Hugging Face cache) -> a one-line `WeightsError` naming the file and where to put it. A random-
weight network is never a fallback: only a config that says `perceptual_weights = "random"` gets one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class WeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says which file and where to put it."""


@dataclass(frozen=True)
class KnownWeights:
    env: str  # environment variable holding a path
    filename: str  # name in TORCH_HOME/hub/checkpoints (or directory name for a VAE)
    what: str
    url: str  # where to fetch it on a machine with internet


KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "vgg16": KnownWeights("BIFLOW_VGG16_WEIGHTS", "vgg16-397923af.pth", "torchvision VGG-16 (LPIPS backbone)",
                          "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "convnextv2": KnownWeights("BIFLOW_CONVNEXTV2_WEIGHTS", "convnextv2_base.fcmae_ft_in22k_in1k.pth",
                               "timm convnextv2_base ImageNet-22k fine-tuned state dict (ConvNeXt V2 feature distance)",
                               "timm: convnextv2_base.fcmae_ft_in22k_in1k (save its state_dict)"),
    "inception-v3-compat": KnownWeights("BIFLOW_INCEPTION_WEIGHTS", "weights-inception-2015-12-05-6726825d.pth",
                                        "torch-fidelity inception-v3-compat (FID / IS)",
                                        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                                        "weights-inception-2015-12-05-6726825d.pth"),
    "vae": KnownWeights("BIFLOW_VAE", "sd-vae-ft-ema", "diffusers AutoencoderKL directory (config.json + weights)",
                        "https://huggingface.co/stabilityai/sd-vae-ft-ema"),
}


def _cache_dirs() -> list[Path]:
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [torch_home / "hub" / "checkpoints", hf_home / "hub", Path.home() / ".cache" / "biflow-bench"]


def resolve_weights(name: str, path: str | Path | None = None) -> Path:
    """The local file (or directory) holding weights `name`; WeightsError when it is nowhere on this machine."""
    if name not in KNOWN_WEIGHTS:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(KNOWN_WEIGHTS)}")
    known = KNOWN_WEIGHTS[name]
    explicit = path or os.environ.get(known.env)
    if explicit:
        p = Path(explicit).expanduser()
        if not p.exists():
            raise WeightsError(f"{known.what}: {p} does not exist (from {'the given path' if path else known.env})")
        return p
    for directory in _cache_dirs():
        if (directory / known.filename).exists():
            return directory / known.filename
    where = ", ".join(str(d) for d in _cache_dirs())
    raise WeightsError(f"{known.what} not found: put {known.filename} (from {known.url}) in {where.split(', ')[0]} "
                       f"or set {known.env}=/path/to/it (searched: {where})")
