"""Datasets, image batches and the small image utilities every stage shares.

    tiny           scikit-learn's bundled digits: 1,797 images, 8x8, 17 grey levels, 10 classes; no set-up
    fashion-mnist  Fashion-MNIST from IDX .gz files (Debian package `dataset-fashion-mnist`, or BIFLOW_DATA)
    latents        VAE posterior moments written by `latents.prepare_latents` (ImageNet 256 -> 32x32x4 at paper
                   scale); each draw is a fresh posterior sample (`LatentDataset`)

Images are float32 in [-1, 1], shape (N, C, H, W); labels are int64. Each dataset has a fixed held-out split for
evaluation (reference statistics, NLL) that training never sees; `dataset_splits` loads a dataset once per process.
Training reads rows through `get_batch`, which an `ImageDataset` answers with its images and a `LatentDataset` with
posterior samples.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .files import atomic_write_bytes

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_MAGIC = {1: 2049, 3: 2051}  # labels, images (unsigned byte)


class DataError(ValueError):
    """A dataset is missing or malformed; the message says which file and how to fix it."""


@dataclass(frozen=True)
class ImageDataset:
    name: str
    images: Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: Tensor  # (N,) int64
    num_classes: int
    levels: int  # grey levels of the source data (bits/dim accounts for the quantisation)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor | slice) -> ImageDataset:
        return ImageDataset(self.name, self.images[index], self.labels[index], self.num_classes, self.levels)


@dataclass(frozen=True)
class DataSplits:
    train: ImageDataset
    test: ImageDataset


def _to_unit(pixels: np.ndarray, levels: int) -> Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / (levels - 1) * 2 - 1)


def load_digits() -> DataSplits:
    """8x8 digits; a fixed, class-stratified 20% held out for evaluation."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = _to_unit(d.images.reshape(-1, 1, 8, 8), 17)
    labels = torch.from_numpy(d.target.astype(np.int64))
    test = torch.zeros(len(labels), dtype=torch.bool)
    test[torch.arange(len(labels)) % 5 == 0] = True
    full = ImageDataset("digits", images, labels, 10, 17)
    return DataSplits(full.subset(~test), full.subset(test))


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes with `ndim` dimensions; checks magic number and size."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); re-install the dataset") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; re-install the dataset")
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path}: IDX magic number {magic} != {_IDX_MAGIC[ndim]}; not a {ndim}-d unsigned-byte IDX file")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: {len(raw) - header} data bytes for shape {tuple(dims)} (expected {expected}); "
                        "the file is truncated or corrupt, re-install the dataset")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"Fashion-MNIST file {stem}.gz not found in {directory}; install the Debian package "
                    "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or point BIFLOW_DATA / --data-dir "
                    "at a directory holding the IDX files")


def load_fashion_mnist(directory: Path | str | None = None) -> DataSplits:
    directory = Path(directory or os.environ.get("BIFLOW_DATA") or FASHION_MNIST_DIR)
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"), 3)
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"), 1)
        if len(images) != len(labels):
            raise DataError(f"{directory}: {split} split has {len(images)} images but {len(labels)} labels")
        parts[split] = ImageDataset("fashion-mnist", _to_unit(images[:, None], 256),
                                    torch.from_numpy(labels.astype(np.int64)), 10, 256)
    return DataSplits(parts["train"], parts["test"])


LATENT_FORMAT = 1
LATENT_LEVELS = 3  # latents are continuous: levels = 3 makes bits/dim's log((levels - 1) / 2) offset zero


class _LatentMeans:
    """`LatentDataset.images`: the scaled posterior means, read on indexing (what evaluation uses as "the data")."""

    def __init__(self, data: LatentDataset) -> None:
        self.data = data

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.data), *self.data.latent_shape)

    def __getitem__(self, rows: Tensor | slice | int) -> Tensor:
        rows = torch.arange(len(self.data))[rows].reshape(-1)
        return self.data.scale * self.data.moments(rows)[:, 0, 0]


class LatentDataset:
    """Prepared VAE latents (`latents.prepare_latents`), in the `ImageDataset` interface.

    <dir>/meta.json and <dir>/shard-NNNNN.pt, each shard {"moments": (n, 2, 2, C, h, w) float32, "labels": (n,)}:
    moments[:, f, 0] is the posterior mean and moments[:, f, 1] its std, of the image (f = 0) and of its horizontal
    flip (f = 1). Shards are memory-mapped, so ImageNet's moments need not fit in RAM. `sample` draws
    scale * (mean + std * eps) of the image or, with probability 1/2, of its flip (the usual latent-diffusion
    recipe, scale = the VAE's scaling factor 0.18215 for sd-vae-ft-ema).
    """

    def __init__(self, directory: Path | str, verify: bool = True) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{meta_path}: no prepared latents here ({e.__class__.__name__}); run "
                            "`biflow-bench prepare-latents IMAGE_DIR OUT_DIR --vae PATH` first") from None
        if self.meta.get("format") != LATENT_FORMAT:
            raise DataError(f"{meta_path}: latent format {self.meta.get('format')!r} is not {LATENT_FORMAT}; "
                            "prepare the latents again")
        self.shards, labels = [], []
        for k in range(self.meta["num_shards"]):
            path = self.directory / shard_name(k)
            if not Path(str(path) + ".sha256").exists():
                raise DataError(f"{path}: shard {k} of {self.meta['num_shards']} is missing or unfinished; re-run "
                                "prepare-latents with the same arguments (it resumes)")
            if verify:
                _check_digest(path)
            shard = torch.load(path, mmap=True, weights_only=True)
            self.shards.append(shard["moments"])
            labels.append(shard["labels"])
        sizes = torch.tensor([len(m) for m in self.shards])
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.all_labels = torch.cat(labels)
        self.index = torch.arange(len(self.all_labels))  # rows of this (sub)set in the shards
        self.name = "latents"
        self.num_classes = len(self.meta["classes"])
        self.levels = LATENT_LEVELS
        self.scale = float(self.meta["scaling_factor"])
        self.latent_shape = tuple(self.meta["latent_shape"])

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> Tensor:
        return self.all_labels[self.index]

    @property
    def images(self) -> _LatentMeans:
        return _LatentMeans(self)

    def subset(self, index: Tensor | slice) -> LatentDataset:
        out = object.__new__(LatentDataset)
        out.__dict__.update(self.__dict__, index=self.index[index])
        return out

    def moments(self, rows: Tensor) -> Tensor:
        """(len(rows), 2, 2, C, h, w) moments of rows (positions in this dataset), gathered from the shards."""
        ids = self.index[rows]
        shard = torch.searchsorted(self.starts, ids, right=True) - 1
        out = torch.empty(len(ids), 2, 2, *self.latent_shape)
        for k in shard.unique().tolist():
            hit = shard == k
            out[hit] = self.shards[k][ids[hit] - self.starts[k]]
        return out

    def sample(self, rows: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        m = self.moments(rows)
        flip = (torch.rand(len(rows), generator=generator) < 0.5).long()
        m = m[torch.arange(len(rows)), flip]  # (n, 2, C, h, w)
        eps = torch.randn(m[:, 0].shape, generator=generator)
        return self.scale * (m[:, 0] + m[:, 1] * eps), self.all_labels[self.index[rows]]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.pt"


def _check_digest(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != Path(str(path) + ".sha256").read_text().strip():
        raise DataError(f"{path}: checksum mismatch (truncated or corrupted); delete it and its .sha256 and re-run "
                        "prepare-latents (it redoes only missing shards)")


def load_latents(directory: Path | str | None = None) -> DataSplits:
    """Prepared latents: <dir>/train and <dir>/val when both exist, else one prepared directory with a fixed 1 in 20
    of its images held out (as for digits)."""
    directory = Path(directory or os.environ.get("BIFLOW_DATA") or "latents")
    if (directory / "train" / "meta.json").exists() and (directory / "val" / "meta.json").exists():
        return DataSplits(LatentDataset(directory / "train"), LatentDataset(directory / "val"))
    full = LatentDataset(directory)
    test = torch.arange(len(full)) % 20 == 0
    return DataSplits(full.subset(~test), full.subset(test))


def get_batch(dataset: ImageDataset | LatentDataset, rows: Tensor,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Rows of a dataset: an ImageDataset's images, or a LatentDataset's posterior samples (drawn with `generator`)."""
    if isinstance(dataset, LatentDataset):
        return dataset.sample(rows, generator or torch.Generator().manual_seed(0))
    return dataset.images[rows], dataset.labels[rows]


def data_generator(seed: int, step: int, chunk: int = 0) -> torch.Generator:
    """The CPU generator of a batch's data randomness (latent posterior samples), per (seed, step, micro-batch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + chunk + 0x5EED)


DATASETS: dict[str, Callable[..., DataSplits]] = {"digits": load_digits, "fashion-mnist": load_fashion_mnist,
                                                   "latents": load_latents}


def load_dataset(name: str, data_dir: Path | str | None = None) -> DataSplits:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name](data_dir) if data_dir is not None and name != "digits" else DATASETS[name]()


@cache
def dataset_splits(name: str, data_dir: str | None) -> DataSplits:
    """The dataset, loaded once per process (training, evaluation and calibration share it)."""
    return load_dataset(name, data_dir)


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Tensor]:
    """Endless shuffled global batches of row indices; epoch e is permuted by (seed, e), so a resumed run (on any
    number of processes) sees exactly the same stream."""
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        yield perm[offset * batch_size : (offset + 1) * batch_size]
        step += 1


def batch_iterator(dataset: ImageDataset | LatentDataset, batch_size: int, seed: int,
                   start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled batches (x, y) of `batch_indices`."""
    for step, idx in enumerate(batch_indices(len(dataset), batch_size, seed, start_step), start_step):
        yield get_batch(dataset, idx, data_generator(seed, step))


def add_noise(x: Tensor, sigma: float, generator: torch.Generator, kind: str = "gaussian") -> Tensor:
    """Noise augmentation of standard deviation sigma: Gaussian, x~ = x + sigma * eps (TARFlow sec. 2.4), or
    "uniform" on (-sqrt(3) sigma, sqrt(3) sigma), the classic dequantisation TARFlow compares it with (one grey level
    of [-1, 1] data, 2 / 255 wide, is sigma = 2 / 255 / sqrt(12) = 0.0023)."""
    if kind == "uniform":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + (2 * u - 1) * (math.sqrt(3) * sigma)
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def drop_labels(y: Tensor, p: float, null_class: int, generator: torch.Generator) -> Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def class_balanced_labels(n: int, num_classes: int) -> Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ...: image i always gets class i mod K (50 per class for 50K)."""
    return torch.arange(n) % num_classes


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float -> [0, 255] uint8 with 3 channels (what feature extractors take)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def image_grid_png(images: Tensor, nrow: int = 10, rows: int | None = None) -> bytes:
    """The PNG bytes of a grid of [-1, 1] images, nrow to a row and shown at twice their size: the first `rows` rows
    (default nrow: the square preview of a record), the last row partly filled (blank cells) when images run out."""
    from torchvision.utils import make_grid

    rows = nrow if rows is None else rows
    grid = make_grid(to_uint8(images[: nrow * rows]), nrow=nrow, padding=1, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image = image.resize((image.width * 2, image.height * 2), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def grid_columns(n: int) -> int:
    """Columns of a near-square grid of n images: ceil(sqrt(n)), so no image is left out."""
    return math.isqrt(max(n, 1) - 1) + 1


def save_image_grid(images: Tensor, path: Path, nrow: int | None = None) -> Path:
    """A PNG grid of every one of the [-1, 1] images (nrow to a row, default near-square), written atomically."""
    nrow = nrow or grid_columns(len(images))
    return atomic_write_bytes(path, image_grid_png(images, nrow, rows=-(-len(images) // nrow)))
