"""Data loaders on real IDX files (written here in the real format), batches, noise, labels, image grids."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from biflow_bench.data import (DataError, add_noise, batch_iterator, class_balanced_labels, drop_labels,
                               load_dataset, load_digits, load_fashion_mnist, save_image_grid, to_uint8)


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(directory, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)


def test_digits_scaled_and_split():
    splits = load_digits()
    assert len(splits.train) + len(splits.test) == 1797 and len(splits.test) == 360
    assert splits.train.images.shape[1:] == (1, 8, 8) and splits.train.images.dtype == torch.float32
    assert splits.train.images.min() == -1 and splits.train.images.max() == 1
    assert set(splits.test.labels.tolist()) == set(range(10))


def test_fashion_mnist_from_idx_files(tmp_path):
    _fake_fashion(tmp_path)
    splits = load_fashion_mnist(tmp_path)
    assert splits.train.images.shape == (20, 1, 28, 28) and splits.test.images.shape == (10, 1, 28, 28)
    assert -1 <= splits.train.images.min() and splits.train.images.max() <= 1 and splits.train.levels == 256
    raw = np.frombuffer(gzip.open(tmp_path / "train-images-idx3-ubyte.gz").read()[16:], np.uint8)
    assert torch.allclose(splits.train.images.flatten(), torch.from_numpy(raw / 255 * 2 - 1).float(), atol=1e-6)


def test_fashion_mnist_env_var(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("BIFLOW_DATA", str(tmp_path))
    assert len(load_dataset("fashion-mnist").train) == 20


def test_missing_files_name_package_and_directory(tmp_path):
    with pytest.raises(DataError, match=f"not found in {tmp_path}.*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_truncated_file_is_an_error(tmp_path):
    _fake_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_wrong_magic_and_corrupt_gzip(tmp_path):
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(20), 2051)
    with pytest.raises(DataError, match="magic"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(DataError, match="cannot read"):
        load_fashion_mnist(tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match="valid datasets: digits, fashion-mnist"):
        load_dataset("cifar")


def test_batches_resume_mid_stream():
    data = load_digits().train
    full = [next(it)[1] for it in [batch_iterator(data, 64, seed=3)] for _ in range(1)]
    stream = batch_iterator(data, 64, seed=3)
    batches = [next(stream) for _ in range(30)]  # crosses an epoch boundary (1437 // 64 = 22 per epoch)
    resumed = batch_iterator(data, 64, seed=3, start_step=25)
    for b in batches[25:]:
        x, y = next(resumed)
        assert torch.equal(x, b[0]) and torch.equal(y, b[1])
    assert torch.equal(full[0], batches[0][1])
    assert not torch.equal(batches[0][1], batches[22][1])  # a new epoch is a new permutation


def test_noise_labels_and_uint8():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4000, 1, 2, 2)
    assert abs(add_noise(x, 0.5, gen).std().item() - 0.5) < 0.02
    # uniform dequantisation of the same std: u ~ U(0, 1) -> (2u - 1) sqrt(3) sigma, std sigma, within sqrt(3) sigma
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    uniform = add_noise(x, 0.5, torch.Generator().manual_seed(1), "uniform")
    torch.testing.assert_close(uniform, (2 * u - 1) * 3**0.5 * 0.5)
    assert abs(uniform.std().item() - 0.5) < 0.02 and uniform.abs().max() <= 3**0.5 * 0.5
    y = drop_labels(torch.zeros(10000, dtype=torch.long), 0.1, 10, gen)
    assert abs((y == 10).float().mean().item() - 0.1) < 0.02 and set(y.tolist()) == {0, 10}
    assert class_balanced_labels(25, 10).tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    u = to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4))
    assert u.shape == (1, 3, 1, 4) and u[0, 0, 0].tolist() == [0, 128, 255, 255]


def test_image_grid_is_a_png(tmp_path):
    path = save_image_grid(torch.rand(20, 1, 8, 8) * 2 - 1, tmp_path / "grid.png", nrow=5)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == ((5 * 9 + 1) * 2, (4 * 9 + 1) * 2)  # 5 x 4 cells, 1 px padding, 2x
