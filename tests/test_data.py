"""Data sets: every loader on small files written here (IDX plain and gzipped, CIFAR-10 binary batches, npz in
both layouts), every kind of bad file refused with one ConfigError naming the file, and repeatable splits."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from neurosim.config import ConfigError, build
from neurosim.data import CIFAR_RECORD, LUMA, DataConfig, _resize, load, read_idx

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path, array: np.ndarray, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(data)


def write_idx_set(folder: Path, n_train=20, n_test=5, compress=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_train + n_test, 28, 28))
    labels = rng.integers(0, 10, n_train + n_test)
    suffix = ".gz" if compress else ""
    for name, arr in zip(IDX_NAMES, (images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]),
                         strict=True):
        write_idx(folder / (name + suffix), arr, compress)
    return images, labels


def write_cifar(folder: Path, per_batch=2, n_test=3, seed=0):
    """Five training batches and a test batch of random records: (label, R plane, G plane, B plane)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = {}
    for name, n in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        rec = rng.integers(0, 256, (n, CIFAR_RECORD), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        (folder / name).write_bytes(rec.tobytes())
        records[name] = rec
    return records


def refused(path, fn, *match):
    """``fn`` raises one ConfigError, on one line, naming ``path`` (and each of ``match``)."""
    with pytest.raises(ConfigError) as info:
        fn()
    text = str(info.value)
    assert str(path) in text and "\n" not in text, text
    for m in match:
        assert m in text, text
    return info.value


def cfg(**kw) -> DataConfig:
    return build(DataConfig, {k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})


# --- bundled and synthetic -------------------------------------------------------------------------------------

def test_digits_split_is_fixed_by_seed_and_resizes():
    a, b, c = load(DataConfig(), seed=0), load(DataConfig(), seed=0), load(DataConfig(), seed=1)
    assert len(a.x_train) + len(a.x_test) == 1797 and len(a.x_test) == 359
    assert a.image_shape == (1, 8, 8) and a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, c.y_train)
    assert float(a.x_train.min()) >= 0 and float(a.x_train.max()) <= 1
    # the split is a partition: the test images of two seeds come from the same 1,797
    assert sorted(torch.cat([a.y_train, a.y_test]).tolist()) == sorted(torch.cat([c.y_train, c.y_test]).tolist())
    big = load(cfg(size=28))
    assert big.image_shape == (1, 28, 28)
    colour = load(cfg(channels=3))
    assert colour.image_shape == (3, 8, 8) and torch.equal(colour.x_train[:, 2], a.x_train[:, 0])


def test_limit_takes_the_first_training_samples_of_the_seeded_split():
    full, lim = load(DataConfig(), seed=3), load(cfg(limit=100), seed=3)
    assert torch.equal(lim.x_train, full.x_train[:100]) and torch.equal(lim.y_train, full.y_train[:100])
    assert torch.equal(lim.x_test, full.x_test)


def test_synthetic_data_split_and_limit():
    data = load(cfg(name="synthetic", size=6, samples=100, classes=4, limit=30))
    assert data.x_train.shape == (30, 1, 6, 6) and data.classes == 4 and len(data.x_test) == 20
    a, b, c = (load(cfg(name="synthetic", samples=50), seed=s) for s in (5, 5, 6))
    assert a.image_shape == (1, 8, 8) and a.classes == 10
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train[:10], c.x_train[:10])
    # a test fraction near 1 still leaves one training sample
    tiny = load(cfg(name="synthetic", samples=10, test_fraction=0.99))
    assert len(tiny.x_train) == 1 and len(tiny.x_test) == 9


def test_shrinking_averages_instead_of_aliasing():
    """A 16-wide image with one bright column in four, shrunk to 4 wide: plain bilinear samples the dark columns
    only (all 0); the antialiased resize keeps the mean, 1/4, exactly in the interior columns."""
    x = torch.zeros(1, 1, 16, 16)
    x[..., ::4] = 1.0
    y = _resize(x, 4)
    torch.testing.assert_close(y[..., 1:3], torch.full((1, 1, 4, 2), 0.25), rtol=0, atol=1e-6)
    assert _resize(torch.full((1, 1, 16, 16), 0.3), 4).sub(0.3).abs().max() < 1e-6


def test_settings_are_checked_before_any_file_is_read():
    with pytest.raises(ConfigError, match="path"):
        build(DataConfig, {"name": "mnist"})
    with pytest.raises(ConfigError, match="classes"):
        build(DataConfig, {"name": "digits", "classes": 5})
    with pytest.raises(ConfigError, match="size"):
        build(DataConfig, {"size": 2})
    with pytest.raises(ConfigError, match="channels"):
        build(DataConfig, {"channels": 2})
    with pytest.raises(ConfigError, match=r"data\.path"):  # a config made directly is checked by load
        load(DataConfig(name="npz"))


# --- MNIST and Fashion-MNIST -----------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_loader_reads_files_written_here(tmp_path, compress, name):
    images, labels = write_idx_set(tmp_path, compress=compress)
    data = load(cfg(name=name, path=tmp_path))
    assert data.name == name and data.classes == 10
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_test.shape == (5, 1, 28, 28)
    assert torch.equal(data.x_train[:, 0], torch.tensor(images[:20], dtype=torch.float32) / 255)
    assert torch.equal(data.x_test[:, 0], torch.tensor(images[20:], dtype=torch.float32) / 255)
    assert data.y_train.tolist() == labels[:20].tolist() and data.y_test.dtype == torch.int64
    # the published split does not depend on the seed; limit takes the first in file order
    other = load(cfg(name=name, path=tmp_path, limit=7, size=14, channels=3), seed=9)
    assert torch.equal(other.y_train, data.y_train[:7]) and other.image_shape == (3, 14, 14)


def test_corrupt_and_missing_idx_files_are_named(tmp_path):
    bad = tmp_path / "x.idx"
    bad.write_bytes(b"\x00\x00\x09\x01\x00\x00\x00\x02ab")
    refused(bad, lambda: read_idx(bad), "magic")
    short = tmp_path / "y.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    refused(short, lambda: read_idx(short), "payload")
    header = tmp_path / "h.idx"
    header.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    refused(header, lambda: read_idx(header), "header")
    refused(tmp_path / "missing", lambda: read_idx(tmp_path / "missing"), "no such file")
    refused(tmp_path, lambda: read_idx(tmp_path), "folder")
    refused(tmp_path, lambda: load(cfg(name="mnist", path=tmp_path)), "train images")
    refused(tmp_path / "nowhere", lambda: load(cfg(name="mnist", path=tmp_path / "nowhere")), "no such folder")
    refused(bad, lambda: load(cfg(name="mnist", path=bad)), "not a folder")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_idx_file_is_named(tmp_path, compress):
    write_idx_set(tmp_path, compress=compress)
    name = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))
    name.write_bytes(name.read_bytes()[:-40])
    refused(name, lambda: load(cfg(name="fashion_mnist", path=tmp_path)))


def test_idx_set_inconsistencies_are_named(tmp_path):
    write_idx_set(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(19))
    refused(labels, lambda: load(cfg(name="mnist", path=tmp_path)), "19 labels for 20 images")
    write_idx(labels, np.r_[np.zeros(19), 10])
    refused(labels, lambda: load(cfg(name="mnist", path=tmp_path)), "label 10 at index 19")
    write_idx(labels, np.zeros((20, 1)))
    refused(labels, lambda: load(cfg(name="mnist", path=tmp_path)), "1-D", "(20, 1)")
    write_idx(labels, np.zeros(20))
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.unlink()
    images.mkdir()  # a folder where the file should be
    refused(images, lambda: load(cfg(name="mnist", path=tmp_path)), "folder")


# --- CIFAR-10 ------------------------------------------------------------------------------------------------------

def test_cifar10_binary_batches_written_here(tmp_path):
    rec = write_cifar(tmp_path / "cifar-10-batches-bin")
    # the folder the archive unpacks to, or its parent
    for path in (tmp_path / "cifar-10-batches-bin", tmp_path):
        data = load(cfg(name="cifar10", path=path))
        assert data.x_train.shape == (10, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
        assert data.name == "cifar10" and data.classes == 10 and data.y_train.dtype == torch.int64
    train = np.concatenate([rec[f"data_batch_{i}.bin"] for i in range(1, 6)])
    assert data.y_train.tolist() == train[:, 0].tolist()
    assert data.y_test.tolist() == rec["test_batch.bin"][:, 0].tolist()
    # record layout: label, then the red plane row by row, then green, then blue
    r, g, b = (torch.tensor(train[:, 1 + 1024 * k: 1 + 1024 * (k + 1)], dtype=torch.float32).view(-1, 32, 32) / 255
               for k in range(3))
    assert torch.equal(data.x_train[:, 0], r) and torch.equal(data.x_train[:, 1], g)
    assert torch.equal(data.x_train[:, 2], b)
    grey = load(cfg(name="cifar10", path=tmp_path, channels=1))
    # float32 rounding of three products and two sums: a few ulp of values <= 1, well inside 1e-6
    torch.testing.assert_close(grey.x_train[:, 0], LUMA[0] * r + LUMA[1] * g + LUMA[2] * b, rtol=0, atol=1e-6)
    lenet_sized = load(cfg(name="cifar10", path=tmp_path, channels=1, size=28))
    assert lenet_sized.image_shape == (1, 28, 28)
    assert float(lenet_sized.x_train.min()) >= 0 and float(lenet_sized.x_train.max()) <= 1


def test_cifar10_bad_batches_are_named(tmp_path):
    write_cifar(tmp_path)
    batch = tmp_path / "data_batch_3.bin"
    data = batch.read_bytes()
    batch.write_bytes(data[:-100])
    refused(batch, lambda: load(cfg(name="cifar10", path=tmp_path)), "truncated")
    bad = bytearray(data)
    bad[CIFAR_RECORD] = 10  # the second record's label
    batch.write_bytes(bytes(bad))
    refused(batch, lambda: load(cfg(name="cifar10", path=tmp_path)), "label 10 at index 1")
    batch.write_bytes(b"")
    refused(batch, lambda: load(cfg(name="cifar10", path=tmp_path)))
    batch.unlink()
    refused(tmp_path, lambda: load(cfg(name="cifar10", path=tmp_path)), "data_batch_3.bin")
    batch.mkdir()
    refused(batch, lambda: load(cfg(name="cifar10", path=tmp_path)), "folder")


# --- npz -----------------------------------------------------------------------------------------------------------

def test_npz_with_its_own_split(tmp_path):
    rng = np.random.default_rng(1)
    x_tr, x_te = rng.integers(0, 256, (12, 9, 7), dtype=np.uint8), rng.integers(0, 256, (4, 9, 7), dtype=np.uint8)
    y_tr, y_te = rng.integers(0, 3, 12), rng.integers(0, 3, 4).astype(np.uint8)
    y_tr[0] = 4
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, notes=np.zeros(1))
    data = load(cfg(name="npz", path=path))
    assert data.name == "npz" and data.classes == 5 and data.image_shape == (1, 9, 7)
    assert torch.equal(data.x_train[:, 0], torch.tensor(x_tr, dtype=torch.float32) / 255)
    assert data.y_train.tolist() == y_tr.tolist() and data.y_test.dtype == torch.int64
    assert load(cfg(name="npz", path=path, classes=8)).classes == 8
    refused(path, lambda: load(cfg(name="npz", path=path, classes=4)), "label 4")


def test_npz_x_y_is_split_by_the_seed(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((40, 3, 6, 6)).astype(np.float64)
    y = np.arange(40) % 4
    path = tmp_path / "xy.npz"
    np.savez_compressed(path, x=x, y=y)
    a, b, c = (load(cfg(name="npz", path=path, test_fraction=0.25), seed=s) for s in (0, 0, 1))
    assert a.image_shape == (3, 6, 6) and len(a.x_test) == 10 and a.classes == 4
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    # floats are taken as they are (to float32); the split is a partition of the rows
    rows = torch.cat([a.x_train, a.x_test]).flatten(1)
    want = torch.tensor(x, dtype=torch.float32).flatten(1)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, want.tolist()))
    grey = load(cfg(name="npz", path=path, channels=1, size=4))
    assert grey.image_shape == (1, 4, 4)


def bad_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays, words", [
    ({"x": np.array([[[0.5, np.nan]]] * 3), "y": np.zeros(3, int)},
     ("'x'", "nan at (image, channel, row, column) = (0, 0, 0, 1)")),
    ({"x": np.full((3, 2, 2), 2.0), "y": np.zeros(3, int)}, ("[0, 1]",)),
    ({"x": np.zeros((3, 2, 2), np.int64), "y": np.zeros(3, int)}, ("int64", "uint8")),
    ({"x": np.zeros((3, 4)), "y": np.zeros(3, int)}, ("(N, H, W)",)),
    ({"x": np.zeros((3, 32, 32, 3)), "y": np.zeros(3, int)}, ("channels-last",)),
    ({"x": np.zeros((3, 2, 2)), "y": np.zeros(3)}, ("'y'", "float64", "integers")),
    ({"x": np.zeros((3, 2, 2)), "y": np.zeros(4, int)}, ("'y'", "(3,)")),
    ({"x": np.zeros((3, 2, 2)), "y": np.array([0, -1, 0])}, ("label -1 at index 1",)),
    ({"x": np.zeros((1, 2, 2)), "y": np.zeros(1, int)}, ("two",)),
    ({"x_train": np.zeros((3, 2, 2)), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 3, 3)),
      "y_test": np.zeros(2, int)}, ("differ",)),
    ({"x_train": np.zeros((3, 2, 2)), "y_train": np.zeros(3, int), "x_test": np.zeros((2, 2, 2))},
     ("arrays found: x_test, x_train, y_train",)),
    ({"x": np.zeros((3, 2, 2)), "y": np.zeros(3, int), "x_train": np.zeros((3, 2, 2)), "y_train": np.zeros(3, int),
      "x_test": np.zeros((3, 2, 2)), "y_test": np.zeros(3, int)}, ("both",)),
    ({"x": np.array([np.zeros(2), "a"], dtype=object), "y": np.zeros(2, int)}, ("pickled",)),
])
def test_bad_npz_contents_are_named(tmp_path, arrays, words):
    path = bad_npz(tmp_path, **arrays)
    refused(path, lambda: load(cfg(name="npz", path=path)), *words)


def test_bad_npz_files_are_named(tmp_path):
    path = bad_npz(tmp_path, x=np.zeros((3, 2, 2)), y=np.zeros(3, int))
    path.write_bytes(path.read_bytes()[:-60])
    refused(path, lambda: load(cfg(name="npz", path=path)), "not a readable .npz")
    path.write_bytes(b"hello, not an archive")
    refused(path, lambda: load(cfg(name="npz", path=path)), "zip")
    np.save(tmp_path / "one.npy", np.zeros(3))
    refused(tmp_path / "one.npy", lambda: load(cfg(name="npz", path=tmp_path / "one.npy")), ".npy")
    refused(tmp_path / "no.npz", lambda: load(cfg(name="npz", path=tmp_path / "no.npz")), "no such file")
    refused(tmp_path, lambda: load(cfg(name="npz", path=tmp_path)), "folder")


def test_every_setting_is_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    table = text.split("## Settings (`DataConfig`)", 1)[1].split("\n## ", 1)[0]
    for f in dataclasses.fields(DataConfig):
        assert f"| `{f.name}` |" in table, f.name
