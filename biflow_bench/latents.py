"""The latent pipeline of the paper scale: ImageNet 256 -> 32x32x4 VAE latents and back (BiFlow sec. 4: "models run
in the latent space of a pre-trained VAE"; the VAE is sd-vae-ft-ema, scaling factor 0.18215, as in DiT).

    load_vae(path)              diffusers AutoencoderKL from a local directory only (never downloaded)
    prepare_latents(...)        image folder -> sharded posterior moments (image and its flip), resumable, split
                                over ranks; read back by `data.LatentDataset`
    decode_latents(vae, z)      scaled latents -> images in [-1, 1]
    load_images(...)            the same preprocessing, as uint8 (reference images; metrics/reference.py reads folders)
    save_random_vae / make_tiny_vae   a random AutoencoderKL saved like a real one, marked as random (rehearsals,
                                the `tiny-latent` scale, tests)
    tiny_latent_inputs(cache)   the tiny-latent scale's digits images, tiny VAE and latents, built on first use
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data import LATENT_FORMAT, DataError, shard_name
from .distributed import DistEnv, barrier
from .files import atomic_torch_save, atomic_write_text, dir_lock
from .weights import KNOWN_WEIGHTS, WeightsError, resolve_weights

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}
HF_VAE_REPO = "stabilityai/sd-vae-ft-ema"


# ----------------------------------------------------------------------------------------------------------------------
# The VAE


def load_vae(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """AutoencoderKL from `path`, else BIFLOW_VAE, else the local caches (resolve_weights, then the Hugging Face hub
    cache of stabilityai/sd-vae-ft-ema); `local_files_only` always. Missing: a one-line WeightsError."""
    from diffusers import AutoencoderKL

    try:
        directory = resolve_weights("vae", path)
    except WeightsError:
        if path or os.environ.get(KNOWN_WEIGHTS["vae"].env):
            raise
        directory = _hub_snapshot()
        if directory is None:
            raise
    if not (directory / "config.json").exists():
        raise WeightsError(f"{directory}: not a diffusers AutoencoderKL directory (no config.json); point --vae / "
                           f"BIFLOW_VAE at a copy of {KNOWN_WEIGHTS['vae'].url}")
    try:
        vae = AutoencoderKL.from_pretrained(directory, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"{directory}: cannot load the AutoencoderKL ({reason})") from None
    return vae.to(device).eval().requires_grad_(False)


def _hub_snapshot() -> Path | None:
    """The newest local snapshot of stabilityai/sd-vae-ft-ema in the Hugging Face cache, read at call time."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
               / "hub")
    snapshots = hub / f"models--{HF_VAE_REPO.replace('/', '--')}" / "snapshots"
    found = sorted((p for p in snapshots.glob("*") if (p / "config.json").exists()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", None) or 0.18215)  # sd-vae-ft-ema's (LDM, DiT)


def latent_shape(vae, image_size: int) -> tuple[int, int, int]:
    side = image_size // 2 ** (len(vae.config.block_out_channels) - 1)  # one downsampling per block but the last
    return vae.config.latent_channels, side, side


@torch.no_grad()
def decode_latents(vae, z: Tensor, batch_size: int = 64) -> Tensor:
    """Scaled latents (what F and G model) -> images in [-1, 1], on z's device."""
    p = next(vae.parameters())
    out = [vae.decode(c.to(p.device, p.dtype) / scaling_factor(vae)).sample.clamp(-1, 1).to(z.device)
           for c in z.split(batch_size)]
    return torch.cat(out)


def differentiable_decoder(vae):
    """Scaled latents -> images, with gradients (no clamp): stage 2's perceptual terms act on decoded images."""
    return lambda z: vae.decode(z / scaling_factor(vae)).sample


# sd-vae-ft-ema's architecture (its config.json): 256x256 RGB <-> 32x32x4, four blocks of 128-512 channels
SD_VAE_ARCH = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256,
                   scaling_factor=0.18215)
# the same layout in miniature: 32x32 RGB <-> 16x16x4 (the tiny-latent scale)
TINY_VAE_ARCH = dict(block_out_channels=(32, 32), layers_per_block=1, sample_size=32, scaling_factor=1.0)


def random_vae(arch: dict, seed: int = 0):
    """A randomly initialised AutoencoderKL in sd-vae's layout with `arch`'s sizes (timing the decoder needs no
    weights; tests need a VAE that goes through the real loading path)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(arch["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, norm_num_groups=32, **arch)


RANDOM_WEIGHTS_MARK = "random-weights.json"  # beside config.json: a VAE the suite made, never a trained one


def save_random_vae(path: Path | str, arch: dict, seed: int = 0) -> Path:
    """`random_vae` written with save_pretrained, so it is loaded back through `load_vae` like the real one, and
    marked (RANDOM_WEIGHTS_MARK) so every record that decodes with it says its weights are random."""
    random_vae(arch, seed).save_pretrained(path)
    mark = {"weights": "random", "seed": seed, "arch": {k: list(v) if isinstance(v, tuple) else v
                                                        for k, v in arch.items()}}
    atomic_write_text(Path(path) / RANDOM_WEIGHTS_MARK, json.dumps(mark) + "\n")
    return Path(path)


def make_tiny_vae(path: Path | str, seed: int = 0) -> Path:
    """A random TINY_VAE_ARCH AutoencoderKL (save_random_vae). Its posterior samples have a standard deviation of
    about 1, hence scaling factor 1 (sd-vae's 0.18215 plays the same role)."""
    return save_random_vae(path, TINY_VAE_ARCH, seed)


def vae_weights_note(directory: Path | str | None) -> str | None:
    """What a record says of a VAE with random weights (None: a VAE the suite did not make)."""
    mark = Path(directory) / RANDOM_WEIGHTS_MARK if directory else None
    if mark is None or not mark.is_file():
        return None
    seed = json.loads(mark.read_text()).get("seed")
    return f"random weights (seed {seed}), made by the suite: tests the pipeline, not a trained autoencoder"


TINY_LATENT_SIDE = 32  # digits upsampled to 32x32 RGB -> 16x16x4 latents of the tiny VAE


def tiny_latent_inputs(cache_dir: Path, env: DistEnv | None = None) -> tuple[Path, Path, Path]:
    """The tiny-latent scale's own inputs, built under <cache>/tiny-latent on first use so that the scale runs from a
    clone: scikit-learn's digits as 32x32 RGB images in class folders (the reference images of FD / IS), a tiny
    random VAE (make_tiny_vae) and its latents of those images. Returns (latents, vae, images); under torchrun
    rank 0 builds while the others wait."""
    env = env or DistEnv()
    root = cache_dir / "tiny-latent"
    done = root / "latents" / "meta.json"
    if env.is_main and not done.exists():
        with dir_lock(root):
            if not done.exists():
                _build_tiny_latent_inputs(root)
    barrier(env)
    return root / "latents", root / "vae", root / "images"


def latent_inputs(scale: str, data_dir: Path | None, vae: Path | None, ref_stats: Path | None, cache_dir: Path,
                  env: DistEnv | None = None) -> tuple[Path | None, Path | None, Path | None]:
    """(--data-dir, --vae, --ref-stats) as given, or at the tiny-latent scale with none given, its own inputs
    (`tiny_latent_inputs`); the paper scales always need theirs."""
    if scale == "tiny-latent" and data_dir is None and vae is None and ref_stats is None:
        return tiny_latent_inputs(cache_dir, env)
    return data_dir, vae, ref_stats


def _build_tiny_latent_inputs(root: Path) -> None:
    from .data import load_digits

    print(f"[tiny-latent] building its digits images, tiny random VAE and latents in {root} (once)", file=sys.stderr)
    for name in ("images", "vae", "latents"):  # a build killed half-way starts again
        shutil.rmtree(root / name, ignore_errors=True)
    splits = load_digits()
    images = torch.cat([splits.train.images, splits.test.images])  # [-1, 1], (N, 1, 8, 8)
    labels = torch.cat([splits.train.labels, splits.test.labels])
    big = torch.nn.functional.interpolate(images, size=TINY_LATENT_SIDE, mode="bilinear", align_corners=False)
    pixels = ((big.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    for i, (image, label) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        folder = root / "images" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    make_tiny_vae(root / "vae")
    prepare_latents(root / "images", root / "latents", load_vae(root / "vae"), image_size=TINY_LATENT_SIDE,
                    progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Images


def list_images(data_dir: Path | str) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageNet-style folder: one subfolder per class (sorted names -> labels 0..K-1), images sorted inside each."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: image folder not found (expected one subfolder of images per class)")
    classes = sorted(d.name for d in data_dir.iterdir() if d.is_dir())
    files = [(f, label) for label, c in enumerate(classes)
             for f in sorted((data_dir / c).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise DataError(f"{data_dir}: no images found (expected <class>/<image>.{{jpg,png,...}})")
    return classes, files


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr (Dhariwal & Nichol 2021, used by DiT and its successors for ImageNet 256): halve with a
    box filter while the short side is >= 2 * size, bicubic-resize the short side to `size`, crop the centre."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: list[tuple[Path, int]], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        path = self.files[i][0]
        try:
            with Image.open(path) as im:
                arr = center_crop(im.convert("RGB"), self.size)
        except OSError as e:
            raise DataError(f"{path}: cannot read the image ({e})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # uint8 (3, size, size)


def load_images(data_dir: Path | str, image_size: int) -> tuple[Tensor, Tensor]:
    """uint8 (N, 3, S, S) images and labels of an image folder, preprocessed exactly as for `prepare_latents`."""
    _, files = list_images(data_dir)
    images = ImageFiles(files, image_size)
    return torch.stack([images[i] for i in range(len(images))]), torch.tensor([label for _, label in files])


# ----------------------------------------------------------------------------------------------------------------------
# Preparing latents


def prepare_latents(data_dir: Path | str, out_dir: Path | str, vae, image_size: int = 256, batch_size: int = 64,
                    rank: int = 0, world_size: int = 1, shard_size: int = 5000, num_workers: int = 0,
                    progress: bool = True) -> list[Path]:
    """Encode an image folder into `out_dir`: meta.json and shards of `shard_size` images holding the posterior mean
    and std of each image and of its horizontal flip (see data.LatentDataset). Shards are written atomically and
    finished ones are skipped, so a killed run resumes; rank r of world_size encodes shards r, r + W, ... (no process
    group needed). Returns the shards this rank wrote."""
    out_dir = Path(out_dir)
    classes, files = list_images(data_dir)
    num_shards = -(-len(files) // shard_size)
    meta = {"format": LATENT_FORMAT, "source": str(Path(data_dir).resolve()), "classes": classes,
            "num_images": len(files), "num_shards": num_shards, "shard_size": shard_size, "image_size": image_size,
            "latent_shape": list(latent_shape(vae, image_size)), "scaling_factor": scaling_factor(vae),
            "vae": str(getattr(vae.config, "_name_or_path", ""))}
    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if {k: v for k, v in old.items() if k != "vae"} != {k: v for k, v in meta.items() if k != "vae"}:
            raise DataError(f"{out_dir} holds latents of another image folder, size or VAE; use a new output directory")
    elif rank == 0:
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    device = next(vae.parameters()).device
    written = []
    for k in range(rank, num_shards, world_size):
        path = out_dir / shard_name(k)
        if Path(str(path) + ".sha256").exists():
            continue
        part = files[k * shard_size : (k + 1) * shard_size]
        loader = torch.utils.data.DataLoader(ImageFiles(part, image_size), batch_size=batch_size, num_workers=num_workers)
        moments = []
        for i, batch in enumerate(loader):
            if progress:
                print(f"\r[rank {rank}] shard {k + 1}/{num_shards} batch {i + 1}/{len(loader)}", end="",
                      file=sys.stderr)
            x = batch.to(device, torch.float32) / 127.5 - 1
            with torch.no_grad():
                post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
            b = len(x)  # (2b, C, h, w) -> (b, flip, {mean, std}, C, h, w)
            moments.append(torch.stack([post.mean, post.std], 1).view(2, b, 2, *post.mean.shape[1:])
                           .transpose(0, 1).float().cpu())
        labels = torch.tensor([label for _, label in part])
        atomic_torch_save({"moments": torch.cat(moments), "labels": labels}, path)
        written.append(path)
    if progress and written:
        print(file=sys.stderr)
    return written


def sample_postprocess(vae) -> Callable[[Tensor], Tensor]:
    """Per-batch post-processing of sampled latents for `sample.generate`: decode and convert to uint8."""
    from .data import to_uint8

    return lambda z: to_uint8(decode_latents(vae, z))
