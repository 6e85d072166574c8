"""Image diagnostics: `box_blur` and `median_filter` (3x3, edges replicated) and `residual_noise`, the mean squared
difference between images and their median-filtered copy (the noise left in samples, beside real images' value).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
