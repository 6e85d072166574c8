"""Training-free editing through an explicit inverse pair (BiFlow eq. 6): encode a held-out image with F, change its
noise z, decode with G (one pass) or with F's exact inverse (serial, with or without its score step).

    inpainting   z' = M * z + (1 - M) * eps, eps from F's prior N(0, I), M the kept region: a pixel-space mask
                 (MASKS) mapped onto z's tokens, a token kept only when its whole patch is (z is in the image's
                 layout whatever the direction of F's blocks: each block reorders its sequence and puts it back).
                 Each decoder's output as it is and with the known pixels pasted back, x' = M * x + (1 - M) * decode
    class edit   z = F(x | c), decoded with another class c'
    round trips  |G(F(x)) - x| and |F(G(z)) - z| per value on held-out images and prior noise: how well G inverts F
                 away from its training pairs

After alternating-direction blocks every token of z depends on every pixel of x, so the kept region of z does not
promise the kept pixels: `kept_error` measures how much of them survives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .config import ConfigError
from .models.biflow import BiFlow
from .models.tarflow import TARFlow

SHAPES = ("centre", "left", "right", "top", "bottom", "random")
DECODERS = ("G", "exact", "exact+score")  # G's one pass; F's serial inverse, raw and with its Tweedie step


def parse_mask(name: str) -> tuple[str, float | None]:
    """"centre", "left", ..., or "random-<percent>" (patches hidden at random, 0 < percent < 100) -> (shape,
    fraction hidden or None)."""
    shape, _, percent = name.partition("-")
    if shape not in SHAPES or (shape == "random") != bool(percent):
        raise ConfigError(f"unknown mask {name!r}: use one of centre, left, right, top, bottom, random-<percent> "
                          "(e.g. random-25)")
    if shape != "random":
        return shape, None
    try:
        fraction = float(percent) / 100
    except ValueError:
        raise ConfigError(f"mask {name!r}: the percent after random- must be a number, e.g. random-25") from None
    if not 0 < fraction < 1:
        raise ConfigError(f"mask {name!r}: the fraction hidden must be inside (0, 100) percent")
    return shape, fraction


def pixel_keep(name: str, size: int, patch: int, generator: torch.Generator) -> Tensor:
    """The kept pixels (size, size) of mask `name` (True: known): a centre box of half the side, a half of the image
    or `random-<percent>`: that share of the patches hidden at random."""
    shape, fraction = parse_mask(name)
    keep = torch.ones(size, size, dtype=torch.bool)
    half, quarter = size // 2, size // 4
    if shape == "centre":
        keep[quarter : quarter + half, quarter : quarter + half] = False
    elif shape in ("left", "right"):
        keep[:, :half] = shape != "left"
        keep[:, half:] = shape == "left"
    elif shape in ("top", "bottom"):
        keep[:half] = shape != "top"
        keep[half:] = shape == "top"
    else:
        grid = size // patch
        hidden = torch.randperm(grid * grid, generator=generator)[: max(1, round(fraction * grid * grid))]
        tokens = torch.ones(grid * grid, dtype=torch.bool)
        tokens[hidden] = False
        keep = tokens_to_pixels(tokens, patch, size)
    return keep


def token_keep(keep: Tensor, patch: int) -> Tensor:
    """(size, size) kept pixels -> (N,) kept tokens in raster order: a token is kept only when its whole patch is."""
    grid = keep.shape[0] // patch
    return keep.view(grid, patch, grid, patch).all(dim=3).all(dim=1).flatten()


def tokens_to_pixels(tokens: Tensor, patch: int, size: int) -> Tensor:
    """(N,) kept tokens -> (size, size) kept pixels: the region eq. 6 actually keeps."""
    grid = size // patch
    return tokens.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)


def compose(z: Tensor, eps: Tensor, keep: Tensor) -> Tensor:
    """BiFlow eq. 6: z' = M * z + (1 - M) * eps, with M (H, W) the kept pixels of z's image layout."""
    m = keep.to(z.dtype)
    return m * z + (1 - m) * eps


def decode(decoder: str, flow: TARFlow, g: BiFlow | None, z: Tensor, y: Tensor | None, sigma: float) -> Tensor:
    """Images from noise by one of DECODERS, clamped to [-1, 1]."""
    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    if decoder == "G":
        if g is None:
            raise ConfigError("decoder G needs a variant with a learned inverse (this one decodes by F's exact inverse)")
        with torch.no_grad():
            x = g.sample(z, y)
        if g.config.denoise == "score":  # a G trained to F's noisy samples leaves the Tweedie step to F
            x = flow.denoise(x, y, sigma)
        return x.clamp(-1, 1)
    x = flow.reverse(z, y)
    return (flow.denoise(x, y, sigma) if decoder == "exact+score" else x).clamp(-1, 1)


def encode(flow: TARFlow, x: Tensor, y: Tensor | None) -> Tensor:
    with torch.no_grad():
        return flow(x, y).z


def paste(x: Tensor, decoded: Tensor, keep: Tensor) -> Tensor:
    """The known pixels put back: x' = M * x + (1 - M) * decoded."""
    m = keep.to(x.dtype)
    return m * x + (1 - m) * decoded


def kept_error(edited: Tensor, source: Tensor, keep: Tensor) -> tuple[float, float]:
    """(MSE, PSNR in dB for [-1, 1] images: peak-to-peak 2) of the kept pixels against the source."""
    m = keep.expand_as(source)
    mse = float((edited - source)[m].pow(2).mean())
    return mse, 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


def round_trips(flow: TARFlow, g: BiFlow, x: Tensor, y: Tensor | None, generator: torch.Generator
                ) -> dict[str, float]:
    """|G(F(x)) - x| and |F(G(z)) - z| per value (mean squared) on held-out x and prior noise z, and the exact
    inverse's own |F^-1(F(x)) - x| (zero up to float error) for scale."""
    z = encode(flow, x, y)
    with torch.no_grad():
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return {"g_after_f": float((g.sample(z, y) - x).pow(2).mean()),
                "f_after_g": float((encode(flow, g.sample(noise, y), y) - noise).pow(2).mean()),
                "exact_after_f": float((flow.reverse(z, y) - x).pow(2).mean())}


def timed(call: Callable[[], Tensor], repeats: int = 3) -> float:
    """Median seconds of `repeats` calls after one untimed call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
