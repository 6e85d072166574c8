"""Perceptual distances for stage 2's output term (BiFlow sec. 3.4, Table 5): LPIPS (VGG) and ConvNeXt V2 features.

Each distance maps two batches of [-1, 1] images (B, C, H, W) to per-sample distances (B,). Grey images are repeated
to RGB and resized to `size` so the networks' pooling pyramids have room. Pretrained backbones load from local files
through `weights.resolve_weights`; `weights="random"` builds a randomly initialised backbone, allowed only when a
config asks for it by name (the run record then says so).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import resolve_weights

WEIGHT_MODES = ("pretrained", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def adaptive_weight(d: Tensor, p: float = 1.0, eps: float = 1e-3) -> Tensor:
    """Adaptive re-weighting D / sg((D + eps)^p) (BiFlow sec. 3.4): every term contributes a gradient of comparable
    scale whatever its magnitude; p = 0 is the plain distance."""
    return d / (d.detach() + eps).pow(p)


def _rgb(x: Tensor, size: int) -> Tensor:
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if x.shape[-1] != size else x


def _check_mode(weights: str) -> None:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"perceptual weights {weights!r}: use one of {', '.join(WEIGHT_MODES)}")


class LPIPSDistance(nn.Module):
    """LPIPS with a VGG-16 trunk (the lpips package; its linear calibration layers ship inside the package)."""

    def __init__(self, weights: str = "pretrained", size: int = 64, path: str | None = None):
        super().__init__()
        _check_mode(weights)
        import lpips
        from torchvision.models import vgg16

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # lpips prints and warns
            warnings.simplefilter("ignore")
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False)
        if weights == "pretrained":
            vgg = vgg16()
            vgg.load_state_dict(torch.load(resolve_weights("vgg16", path), map_location="cpu", weights_only=True))
            for slice_ in (self.net.net.slice1, self.net.net.slice2, self.net.net.slice3, self.net.net.slice4,
                           self.net.net.slice5):
                for index, layer in slice_.named_children():
                    layer.load_state_dict(vgg.features[int(index)].state_dict())
        self.size = size
        self.weights = weights
        self.requires_grad_(False).eval()

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.net(_rgb(x, self.size), _rgb(target, self.size), normalize=False).flatten()


class ConvNeXtDistance(nn.Module):
    """Distance between channel-normalised ConvNeXt V2 stage features (timm), averaged over stages."""

    def __init__(self, weights: str = "pretrained", size: int = 64, model: str = "convnextv2_atto",
                 path: str | None = None):
        super().__init__()
        _check_mode(weights)
        import timm

        self.net = timm.create_model(model, pretrained=False, num_classes=0)
        if weights == "pretrained":
            state = torch.load(resolve_weights("convnextv2", path), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}  # classifier unused
            self.net.load_state_dict(state)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.size = size
        self.weights = weights
        self.requires_grad_(False).eval()

    def _features(self, x: Tensor) -> list[Tensor]:
        x = (_rgb(x, self.size) * 0.5 + 0.5 - self.mean) / self.std
        return self.net.forward_intermediates(x, intermediates_only=True)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        d = [
            (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean((1, 2))
            for a, b in zip(self._features(x), self._features(target), strict=True)
        ]
        return torch.stack(d).mean(0)


PERCEPTUAL: dict[str, type[nn.Module]] = {"lpips": LPIPSDistance, "convnext": ConvNeXtDistance}


def build_perceptual(name: str, weights: str = "pretrained", size: int = 64) -> nn.Module:
    if name not in PERCEPTUAL:
        raise ValueError(f"unknown perceptual distance {name!r}; valid: {', '.join(PERCEPTUAL)}")
    return PERCEPTUAL[name](weights=weights, size=size)
