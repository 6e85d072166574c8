"""The editing table (ablations/editing.toml, a spec of kind "editing"): for one variant's trained F and G, every
mask of EDIT_MASKS decoded by each of editing.DECODERS (as decoded, and with the known pixels pasted back), class
edits to every other class, round trips and edit speed, on held-out test images that the metrics' reference set does
not hold. One record per (variant, seed): results/<scale>/editing/<variant>__seed<N>.json, rows of
{edit, mask, decoder, pasted, kept_fraction, kept_mse, kept_psnr, metrics}, with two grids.

A seed draws its own source images (test images [num_real + seed * n, num_real + (seed + 1) * n)), its own noise and
its own random masks. Realism is scored against the first num_real test images, as every table's samples are, with
KID beside the Frechet distances (biased at this n); the distance to the source is the ImageNet EfficientNet-Lite1
LPIPS-style stand-in on whole images."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .data import image_grid_png
from .editing import (DECODERS, compose, decode, encode, kept_error, paste, pixel_keep, round_trips, timed,
                      token_keep, tokens_to_pixels)
from .evaluation import image_metrics
from .latent_eval import unit_range
from .measure import Trained
from .training.perceptual import build_perceptual

EDIT_MASKS = ("centre", "left", "right", "top", "bottom", "random-25", "random-50", "random-75")
GRID_IMAGES = 4  # source images per mask in the inpainting grid
TIMED_BATCHES = (1, 64)


def sources(t: Trained, seed: int) -> tuple[Tensor, Tensor | None, int]:
    """This seed's held-out source images, their labels and n: a quarter of the table's sample count (at least the
    largest timed batch), past the metrics' reference images."""
    n = max(TIMED_BATCHES[-1], t.cfg.sample.num_samples // 4)
    start = t.cfg.eval.num_real + seed * n
    test = t.splits.test
    if start + n > len(test):
        raise ValueError(f"seed {seed}: the test split has {len(test)} images, too few for sources "
                         f"[{start}, {start + n}); use a lower seed")
    y = test.labels[start : start + n] if t.cfg.flow.num_classes else None
    return test.images[start : start + n], y, n


def measure_edits(t: Trained, seed: int, cache_dir, data_dir=None, progress: bool = True
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The record body ({rows, round_trip, timing, n}) and the grids ({name: png}) of one variant and seed."""
    cfg, flow, g = t.cfg, t.flow, t.g
    sigma, size, patch = cfg.stage1.noise_sigma, cfg.flow.image_size, cfg.flow.patch_size
    decoders = [d for d in DECODERS if d != "G" or g is not None]
    x, y, n = sources(t, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    eps = torch.randn(x.shape, generator=gen)
    z = encode(flow, x, y)
    lpips = build_perceptual("lpips", "effnet-lite1", size=max(32, size), crop_min=1.0)  # offline: ImageNet weights

    def scored(images: Tensor, labels: Tensor | None) -> dict[str, float]:
        m = image_metrics(cfg, images, labels, data_dir, cache_dir, kid=True)
        with torch.no_grad():
            m["lpips_to_source"] = float(lpips(images, x).mean())  # the whole image (crop_min 1)
        return m

    rows, grid_rows = [], []
    for mask in EDIT_MASKS:
        keep = tokens_to_pixels(token_keep(pixel_keep(mask, size, patch, gen), patch), patch, size)
        zc = compose(z, eps, keep)
        shown = [x[:GRID_IMAGES], torch.where(keep, x[:GRID_IMAGES], torch.full_like(x[:GRID_IMAGES], -1.0))]
        for decoder in decoders:
            out = decode(decoder, flow, g, zc, y, sigma)
            shown.append(out[:GRID_IMAGES])
            for pasted in (False, True):
                images = paste(x, out, keep) if pasted else out
                mse, psnr = kept_error(out, x, keep)  # the decoder's own kept pixels, before any paste
                rows.append({"edit": "inpaint", "mask": mask, "decoder": decoder, "pasted": pasted,
                             "kept_fraction": float(keep.float().mean()), "kept_mse": mse, "kept_psnr": psnr,
                             "metrics": scored(images, y)})
            if progress:
                print(f"[editing] {mask:10s} {decoder:12s} kept PSNR {psnr:6.2f} dB", flush=True)
        grid_rows.append(torch.cat(shown))
    grids = {"inpaint": image_grid_png(unit_range(torch.cat(grid_rows)), nrow=GRID_IMAGES)}

    if y is not None:  # class edits: every source to every other class
        k = cfg.flow.num_classes
        for decoder in decoders:
            edited, targets = [], []
            for shift in range(1, k):
                target = (y + shift) % k
                edited.append(decode(decoder, flow, g, z, target, sigma))
                targets.append(target)
            images, labels = torch.cat(edited), torch.cat(targets)
            m = image_metrics(cfg, images, labels, data_dir, cache_dir, kid=True)
            with torch.no_grad():
                m["lpips_to_source"] = float(torch.cat([lpips(e, x) for e in edited]).mean())
            mse, psnr = kept_error(images, x.repeat(k - 1, 1, 1, 1), torch.ones(size, size, dtype=torch.bool))
            rows.append({"edit": "class", "mask": "", "decoder": decoder, "pasted": False, "kept_fraction": 1.0,
                         "kept_mse": mse, "kept_psnr": psnr, "metrics": m})  # z kept whole, the class changed
        # one row per source, column j edited to class j (the source's own class: its plain re-decoding)
        decoder = "G" if g is not None else "exact"
        cols = [decode(decoder, flow, g, z[:10], torch.full((min(10, n),), j, dtype=torch.long), sigma)
                for j in range(k)]
        grids["class"] = image_grid_png(unit_range(torch.stack(cols, 1).flatten(0, 1)), nrow=k)

    trips = round_trips(flow, g, x, y, torch.Generator().manual_seed(20_000 + seed)) if g is not None else {
        "exact_after_f": float((flow.reverse(z, y) - x).pow(2).mean())}
    timing = {}
    for batch in TIMED_BATCHES:
        xb, yb = x[:batch], None if y is None else y[:batch]
        keep = tokens_to_pixels(token_keep(pixel_keep("centre", size, patch, gen), patch), patch, size)
        for decoder in decoders:
            sec = timed(lambda: decode(decoder, flow, g, compose(encode(flow, xb, yb), eps[:batch], keep), yb, sigma))
            timing[f"{decoder}_ms_batch{batch}"] = sec / len(xb) * 1e3
    return {"n": n, "rows": rows, "round_trip": trips, "timing": timing,
            "masks": list(EDIT_MASKS), "decoders": decoders}, grids

