"""A rehearsal of a latent scale's whole path at its real shapes, for minutes on the CPU instead of a GPU hour lost
to a shape, dtype, memory or collective bug: `biflow-bench rehearse --scale paper` under torchrun.

    inputs      a few random images at the VAE's input side, encoded by every rank's share (prepare_latents)
    train       F and G of main/biflow-mse (training-time CFG, learned denoising) for a few DDP steps each
    sample      a few images through every decoder: the exact inverse serial, serial + score step, Jacobi and
                compiled (all with CFG), and G in one pass; decoded by the VAE on every rank, gathered on rank 0
    score       rank 0: FD / IS of each decoder's images against the inputs in the scale's extractor
    record      one JSON file marked `"rehearsal": true`: what ran, its shapes, seconds, peak memory and scores

Pretrained weights are the real ones unless `random_weights` names a network ("vae", "inception"): then a randomly
initialised one of the real architecture is built here, and the record says so. Nowhere else are random weights a
fallback. The numbers measure the path, not the models.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .ablations import get_spec
from .config import ConfigError, RunConfig, apply_delta
from .data import LatentDataset, class_balanced_labels
from .distributed import DistEnv, barrier
from .files import atomic_torch_save, atomic_write_text, dir_lock
from .latents import (SD_VAE_ARCH, TINY_VAE_ARCH, load_vae, prepare_latents, sample_postprocess, save_random_vae,
                      vae_weights_note)
from .metrics.extractors import INCEPTION_NAME
from .sample import Sampler, generate
from .training.cache import train_stages

RANDOM_NETWORKS = ("vae", "inception")
# A few steps of both stages at a global batch every process shares (2 rows each on 2 processes)
STEPS = {"stage1.steps": 2, "stage2.steps": 2, "stage1.warmup": 1, "stage2.warmup": 1, "stage1.batch_size": 4,
         "stage2.batch_size": 4}
# Every decoder of the exact inverse and G, guided (w = 1) as the paper's rows are: (name, sampler settings)
DECODERS = (
    ("exact-serial", {"inverse": "exact", "backward.denoise": "none"}),
    ("exact-serial+score", {"inverse": "exact", "backward.denoise": "score"}),
    ("exact-jacobi", {"inverse": "exact", "backward.denoise": "none", "sample.decoder": "jacobi"}),
    ("exact-compiled", {"inverse": "exact", "backward.denoise": "none", "sample.decoder": "compiled"}),
    ("learned", {}),
)
VAE_ARCH = {"paper": SD_VAE_ARCH, "paper-xl": SD_VAE_ARCH, "tiny-latent": TINY_VAE_ARCH}


def rehearsal_config(scale: str) -> RunConfig:
    """main/biflow-mse at `scale`, shortened to a few steps, sampled at w = 1."""
    if scale not in VAE_ARCH:
        raise ConfigError(f"rehearse: scale {scale!r} has no latent path; choose one of {', '.join(VAE_ARCH)}")
    return get_spec("main").resolve("biflow-mse", scale, {**STEPS, "sample.cfg_scale": 1.0, "sample.cfg_sweep": []})


def check_random_weights(names: list[str]) -> None:
    for name in names:
        if name not in RANDOM_NETWORKS:
            raise ConfigError(f"--random-weights {name!r}: random weights can stand in for "
                              f"{', '.join(RANDOM_NETWORKS)} only")


def random_inception(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-V3 (FID / IS) with its default random initialisation, saved where its real weights
    would be read from (BIFLOW_INCEPTION_WEIGHTS), so the real loading path runs."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    empty = path.with_suffix(".empty.pt")
    torch.save({}, empty)
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        model = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(empty))
    empty.unlink()
    atomic_torch_save(model.state_dict(), path)
    return path


def _inputs(root: Path, cfg: RunConfig, vae_path: Path | None, random_weights: list[str], env: DistEnv,
            num_images: int) -> tuple[Path, Any, Path, Path]:
    """(latents, the VAE, its directory, the image folder) under `root`: rank 0 writes the images and any random
    networks, every rank encodes its shards."""
    side = cfg.flow.image_size * 2 ** (len(VAE_ARCH[cfg.scale]["block_out_channels"]) - 1)
    images, vae_dir = root / "images" / f"{num_images}-{side}px", vae_path or root / "vae"
    if env.is_main:
        with dir_lock(root):
            rng = np.random.default_rng(0)
            for i in range(num_images if not images.exists() else 0):  # smooth random colour fields to encode
                folder = images / f"class{i % 2}"
                folder.mkdir(parents=True, exist_ok=True)
                low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(low).resize((side, side), Image.BICUBIC).save(folder / f"{i:03d}.png")
            if "vae" in random_weights and not (vae_dir / "config.json").exists():
                save_random_vae(vae_dir, VAE_ARCH[cfg.scale])
            if "inception" in random_weights and not (root / "inception-random.pth").exists():
                random_inception(root / "inception-random.pth")
    barrier(env)
    if "inception" in random_weights:  # named random weights, for this process alone
        os.environ["BIFLOW_INCEPTION_WEIGHTS"] = str(root / "inception-random.pth")
    vae = load_vae(vae_dir, env.device)
    latents = root / "latents" / images.name
    prepare_latents(images, latents, vae, image_size=side, batch_size=2, rank=env.rank, world_size=env.world_size,
                    shard_size=max(1, num_images // env.world_size), progress=False)
    barrier(env)
    return latents, vae, vae_dir, images


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rehearse(scale: str, root: Path, env: DistEnv, *, vae: Path | None = None, random_weights: list[str] = (),
             num_images: int = 4, seed: int = 0) -> dict[str, Any] | None:
    """Run the rehearsal in `root` (inputs, cache); returns the record on rank 0 (the other ranks None)."""
    from .metrics.fidelity import compute_fidelity
    from .metrics.reference import load_reference

    start = time.perf_counter()
    random_weights = list(random_weights)
    check_random_weights(random_weights)
    cfg = rehearsal_config(scale)
    if "vae" in random_weights and vae is not None:
        raise ConfigError("rehearse: --vae and --random-weights vae both name the VAE; give one")
    latents, decoder, vae_dir, images = _inputs(root, cfg, vae, random_weights, env, num_images)
    dataset = LatentDataset(latents)
    t0 = time.perf_counter()
    flow, g, train = train_stages(cfg, seed, dataset, root / "cache", env, progress=False)
    timings = {"inputs_s": t0 - start, "train_s": time.perf_counter() - t0}
    labels = class_balanced_labels(num_images, cfg.flow.num_classes)
    reference = load_reference(images, decoder.config.sample_size, cfg.eval.extractor, root / "cache") \
        if env.is_main else None
    decoded: dict[str, Any] = {}
    serial_images = None
    for name, settings in DECODERS:
        sampler = Sampler.from_config(apply_delta(cfg, settings, "rehearsal"))
        t0 = time.perf_counter()
        x = generate(sampler, flow, g, labels, range(num_images), num_images, seed, env, sample_postprocess(decoder))
        seconds = time.perf_counter() - t0
        if x is not None:  # rank 0 scores what every rank decoded
            scores = compute_fidelity(x, reference, extractor=cfg.eval.extractor, bootstrap=0)
            decoded[name] = {"seconds": seconds, "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
                             "nfe": sampler.nfe(flow, g)[1], **{k: v for k, v in scores.items() if "std" not in k}}
            if name.startswith("exact") and "exact-serial" in decoded:  # Jacobi and compiled solve the serial
                # decoder's inverse (a grey level or so apart); the score step moves the images on purpose
                serial = serial_images if name != "exact-serial" else x
                decoded[name]["max_levels_from_serial"] = int((x.int() - serial.int()).abs().max())
                serial_images = serial
    peak = torch.tensor([_peak_rss_gib(), torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda"
                         else 0.0], device=env.device)
    if env.distributed:
        torch.distributed.all_reduce(peak, torch.distributed.ReduceOp.MAX)
    if not env.is_main:
        return None
    weights = {"vae": vae_weights_note(vae_dir) or str(vae_dir),
               "inception": "random weights (seed 0), made by the suite" if "inception" in random_weights
               else "pretrained"}
    return {
        "rehearsal": True, "scale": scale, "config": cfg.to_dict(), "world_size": env.world_size,
        "device": env.device.type, "host": platform.node(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "num_images": num_images, "weights": weights,
        "params": {"flow": sum(p.numel() for p in flow.parameters()), "g": sum(p.numel() for p in g.parameters())},
        "latent_shape": list(dataset.latent_shape), "image_side": decoder.config.sample_size, "train": train,
        "decoders": decoded, "seconds": {**timings, "total_s": time.perf_counter() - start},
        "peak_rss_gib_per_process": float(peak[0]), "peak_cuda_gib_per_process": float(peak[1]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_rehearsal(record: dict[str, Any], out: Path) -> Path:
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"[rehearse] {record['scale']}: {record['seconds']['total_s'] / 60:.1f} min on {record['world_size']} "
          f"{record['device']} process(es) -> {out}", file=sys.stderr)
    return out
