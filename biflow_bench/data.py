"""Datasets, image batches and the small image utilities every stage shares.

    tiny           scikit-learn's bundled digits: 1,797 images, 8x8, 17 grey levels, 10 classes; no set-up
    fashion-mnist  Fashion-MNIST from IDX .gz files (Debian package `dataset-fashion-mnist`, or BIFLOW_DATA)

Images are float32 in [-1, 1], shape (N, C, H, W); labels are int64. Each dataset has a fixed held-out split for
evaluation (reference statistics, NLL) that training never sees.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .io import atomic_write_bytes

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


DATASETS: dict[str, Callable[..., DataSplits]] = {"digits": load_digits, "fashion-mnist": load_fashion_mnist}


def load_dataset(name: str, data_dir: Path | str | None = None) -> DataSplits:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name](data_dir) if data_dir is not None and name != "digits" else DATASETS[name]()


def batch_iterator(dataset: ImageDataset, batch_size: int, seed: int, start_step: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless shuffled batches; epoch e is permuted by (seed, e), so a resumed run sees exactly the same stream."""
    n = len(dataset)
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        idx = perm[offset * batch_size : (offset + 1) * batch_size]
        yield dataset.images[idx], dataset.labels[idx]
        step += 1


def add_noise(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise augmentation x~ = x + sigma * eps (TARFlow sec. 2.4)."""
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


def save_image_grid(images: Tensor, path: Path, nrow: int = 10) -> Path:
    """A PNG grid of [-1, 1] images, written atomically."""
    from torchvision.utils import make_grid

    grid = make_grid(to_uint8(images[: nrow * nrow]), nrow=nrow, padding=1, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image = image.resize((image.width * 2, image.height * 2), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
