"""Data sets, all available offline: scikit-learn's bundled handwritten digits (the default), MNIST IDX files
a user already has, and synthetic data made here. Splits are fixed by a seed, so runs are repeatable."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neurosim.config import ConfigError, setting


@dataclass(frozen=True)
class DataConfig:
    """Which data set, how it is shaped and split."""

    name: str = setting("digits", "'digits' (bundled 8×8 handwritten digits), 'mnist' (IDX files in `path`) or "
                        "'synthetic' (Gaussian clusters)", choices=("digits", "mnist", "synthetic"))
    size: int = setting(8, "image side after resizing (digits: 8 native, 28 for MNIST-sized networks)", ge=4)
    test_fraction: float = setting(0.2, "fraction held out for testing (digits, synthetic)", gt=0.0, lt=1.0)
    path: str = setting("", "folder with MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
    samples: int = setting(2000, "synthetic: number of samples", ge=10)
    classes: int = setting(10, "synthetic: number of classes", ge=2)
    limit: int = setting(0, "use at most this many training samples (0: all)", ge=0)


@dataclass
class Dataset:
    """Train and test tensors: images (N, 1, H, W) in [0, 1] and integer labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device) -> Dataset:
        return Dataset(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                       self.y_test.to(device), self.classes, self.name)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_test = max(1, round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_digits(config: DataConfig, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits (8×8, 16 grey levels), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    x = _resize(x, config.size)
    return Dataset(*_split(x, y, config.test_fraction, seed), classes=10, name="digits")


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (the MNIST format), plain or gzipped, as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError("data.path", str(path), "no such file") from None
    except OSError as e:
        raise ConfigError("data.path", str(path), f"cannot read: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError("data.path", str(path), "not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError("data.path", str(path), "truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ConfigError("data.path", str(path), f"IDX payload has {len(data) - header} bytes, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise ConfigError("data.path", str(folder), f"no {stem}[.gz] in this folder")


def load_mnist(config: DataConfig, seed: int = 0) -> Dataset:
    """MNIST from the four IDX files in ``config.path`` (nothing is downloaded)."""
    if not config.path:
        raise ConfigError("data.path", "", "the MNIST data set needs the folder of its IDX files")
    folder = Path(config.path)
    parts = {}
    for key, stem in (("x_train", "train-images-idx3-ubyte"), ("y_train", "train-labels-idx1-ubyte"),
                      ("x_test", "t10k-images-idx3-ubyte"), ("y_test", "t10k-labels-idx1-ubyte")):
        parts[key] = read_idx(_find(folder, stem))
    for split in ("train", "test"):
        if len(parts[f"x_{split}"]) != len(parts[f"y_{split}"]):
            raise ConfigError("data.path", str(folder), f"{split} images and labels differ in count")
    x_tr = _resize(torch.tensor(parts["x_train"], dtype=torch.float32).unsqueeze(1) / 255.0, config.size)
    x_te = _resize(torch.tensor(parts["x_test"], dtype=torch.float32).unsqueeze(1) / 255.0, config.size)
    return Dataset(x_tr, torch.tensor(parts["y_train"], dtype=torch.long), x_te,
                   torch.tensor(parts["y_test"], dtype=torch.long), classes=10, name="mnist")


def make_synthetic(config: DataConfig, seed: int = 0) -> Dataset:
    """Gaussian clusters rendered as images: a quick, separable stand-in with any image size."""
    g = torch.Generator().manual_seed(seed)
    d = config.size * config.size
    centres = torch.rand(config.classes, d, generator=g)
    y = torch.randint(0, config.classes, (config.samples,), generator=g)
    x = (centres[y] + 0.25 * torch.randn(config.samples, d, generator=g)).clamp(0, 1)
    x = x.reshape(-1, 1, config.size, config.size)
    return Dataset(*_split(x, y, config.test_fraction, seed), classes=config.classes, name="synthetic")


def load(config: DataConfig | None = None, seed: int = 0) -> Dataset:
    """The data set a configuration names, with its training set limited if asked."""
    config = config or DataConfig()
    loader = {"digits": load_digits, "mnist": load_mnist, "synthetic": make_synthetic}[config.name]
    data = loader(config, seed)
    if config.limit:
        data = Dataset(data.x_train[: config.limit], data.y_train[: config.limit], data.x_test, data.y_test,
                       data.classes, data.name)
    return data
