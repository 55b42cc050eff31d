"""Data sets: the bundled digits with a fixed split, MNIST IDX files (written here), synthetic data."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from neurosim.config import ConfigError, build
from neurosim.data import DataConfig, load, read_idx


def write_idx(path, array: np.ndarray, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_digits_split_is_fixed_by_seed_and_resizes():
    a, b, c = load(DataConfig(), seed=0), load(DataConfig(), seed=0), load(DataConfig(), seed=1)
    assert len(a.x_train) + len(a.x_test) == 1797 and len(a.x_test) == 359
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, c.y_train)
    assert float(a.x_train.min()) >= 0 and float(a.x_train.max()) <= 1
    big = load(build(DataConfig, {"size": 28}))
    assert big.image_shape == (1, 28, 28)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_loader_reads_files_written_here(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28))
    labels = rng.integers(0, 10, 20)
    suffix = ".gz" if compress else ""
    for name, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                      ("t10k-images-idx3-ubyte", images[:5]), ("t10k-labels-idx1-ubyte", labels[:5])):
        write_idx(tmp_path / (name + suffix), arr, compress)
    data = load(build(DataConfig, {"name": "mnist", "path": str(tmp_path), "size": 28}))
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    torch.testing.assert_close(data.x_train[:, 0], torch.tensor(images / 255.0, dtype=torch.float32))
    assert data.y_train.tolist() == labels.tolist()


def test_corrupt_and_missing_idx_files_are_named(tmp_path):
    bad = tmp_path / "x.idx"
    bad.write_bytes(b"\x00\x00\x09\x01\x00\x00\x00\x02ab")
    with pytest.raises(ConfigError, match="magic"):
        read_idx(bad)
    short = tmp_path / "y.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ConfigError, match="payload"):
        read_idx(short)
    with pytest.raises(ConfigError, match="no such file"):
        read_idx(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"data\.path"):
        load(build(DataConfig, {"name": "mnist", "path": str(tmp_path)}))


def test_synthetic_data_and_limit():
    data = load(build(DataConfig, {"name": "synthetic", "size": 6, "samples": 100, "classes": 4, "limit": 30}))
    assert data.x_train.shape == (30, 1, 6, 6) and data.classes == 4
