"""Data sets, all read offline: scikit-learn's bundled handwritten digits (the default), MNIST and Fashion-MNIST
IDX files, CIFAR-10 binary batches and npz arrays that a user already has, and synthetic data made here.
Nothing is downloaded. Splits are fixed by a seed, so runs are repeatable. A missing or malformed file is a
``ConfigError`` naming the file, so the CLI prints one line and exits 2 (docs/data.md)."""

from __future__ import annotations

import gzip
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neurosim.config import ConfigError, check, setting

NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "npz", "synthetic")
_FIXED_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}
_NEEDS_PATH = {"mnist": "the folder of its IDX files", "fashion_mnist": "the folder of its IDX files",
               "cifar10": "the folder of its binary batches (data_batch_1.bin, ..., test_batch.bin)",
               "npz": "the .npz file"}
# ITU-R BT.601 luma weights: the usual colour-to-grey conversion (it is what PIL's convert("L") uses).
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class DataConfig:
    """Which data set, where its files are, how its images are shaped and how it is split."""

    name: str = setting("digits", "'digits' (bundled 8×8 handwritten digits), 'mnist' or 'fashion_mnist' (IDX files "
                        "in `path`), 'cifar10' (binary batches in `path`), 'npz' (arrays in the file `path`) or "
                        "'synthetic' (Gaussian clusters)", choices=NAMES)
    path: str = setting("", "mnist, fashion_mnist, cifar10: the folder of the files; npz: the file")
    size: int = setting(0, "image side after resizing to size×size (0: as stored; digits 8, MNIST 28, CIFAR 32, "
                        "synthetic 8)", ge=0)
    channels: int = setting(0, "0: as stored; 1: grey (colour converted by BT.601 luma); 3: colour (grey repeated)",
                            choices=(0, 1, 3))
    test_fraction: float = setting(0.2, "fraction held out for testing (digits, synthetic, npz with `x`, `y`)",
                                   gt=0.0, lt=1.0)
    classes: int = setting(0, "number of classes (0: the data set's own; npz: largest label + 1; synthetic: 10)",
                           ge=0)
    samples: int = setting(2000, "synthetic: number of samples", ge=10)
    limit: int = setting(0, "use at most this many training samples, the first ones in order (0: all)", ge=0)

    def validate(self) -> None:
        """Cross-field checks that ``build`` runs; ``load`` runs them too for a config made directly."""
        if 0 < self.size < 4:
            raise ConfigError("size", self.size, "must be 0 (as stored) or >= 4")
        if self.classes == 1:
            raise ConfigError("classes", self.classes, "must be 0 (the data set's own) or >= 2")
        own = _FIXED_CLASSES.get(self.name)
        if own is not None and self.classes not in (0, own):
            raise ConfigError("classes", self.classes, f"{self.name} has {own} classes (leave classes = 0)")
        if self.name in _NEEDS_PATH and not self.path:
            raise ConfigError("path", self.path, f"the {self.name} data set needs {_NEEDS_PATH[self.name]}")


@dataclass
class Dataset:
    """Train and test tensors: float32 images (N, C, H, W) in [0, 1] and int64 labels in [0, classes)."""

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


def _bad(path: Path | str, reason: str) -> ConfigError:
    """The one error every file problem becomes: the field is data.path, the value the file's path."""
    return ConfigError("data.path", str(path), reason)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resizing; shrinking low-pass filters first (antialias) so that it averages rather than aliases."""
    if size == 0 or tuple(x.shape[-2:]) == (size, size):
        return x
    shrink = size < x.shape[-2] or size < x.shape[-1]
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=shrink).clamp(0, 1)


def _channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey from colour by BT.601 luma, or colour from grey by repetition; other conversions are refused."""
    c = x.shape[1]
    if channels in (0, c):
        return x
    if channels == 1 and c == 3:
        grey = x[:, 0:1] * LUMA[0]
        return grey.add_(x[:, 1:2], alpha=LUMA[1]).add_(x[:, 2:3], alpha=LUMA[2]).clamp_(0, 1)
    if channels == 3 and c == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise ConfigError("data.channels", channels, f"cannot convert images with {c} channels (only 3 -> 1 and 1 -> 3)")


def _shape(x: torch.Tensor, config: DataConfig) -> torch.Tensor:
    return _resize(_channels(x, config.channels), config.size)


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    """A seeded random split; at least one sample on each side."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_test = min(max(1, round(test_fraction * len(x))), len(x) - 1)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _read_bytes(path: Path) -> bytes:
    """A whole file, gunzipped when it starts with the gzip magic (whatever its name says)."""
    if path.is_dir():
        raise _bad(path, "is a folder, not a file")
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gz else open)(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated gzip stream
        raise _bad(path, f"cannot read: {e}") from None


def _folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise _bad(folder, "no such folder")
    if not folder.is_dir():
        raise _bad(folder, "is a file, not a folder (give the folder that holds the data set's files)")
    return folder


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (the MNIST format: magic 0, 0, 0x08 = unsigned bytes, the number of dimensions, then each
    dimension as a big-endian uint32, then the bytes), plain or gzipped, as a uint8 array."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise _bad(path, f"not an IDX file of unsigned bytes (bad magic number {data[:4].hex() or 'none'}, "
                         "expected 000008 then the number of dimensions)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _bad(path, f"truncated IDX header ({len(data)} bytes, {header} expected for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise _bad(path, f"IDX payload has {len(data) - header} bytes, its header {shape} says {expected} "
                         "(truncated or not this file)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stems: tuple[str, ...], what: str) -> Path:
    """The first of a few customary names (plain or .gz) present in the folder."""
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (folder / name).exists():
                return folder / name
    raise _bad(folder, f"no {what} in this folder (looked for {', '.join(s + '[.gz]' for s in stems)})")


def _labels_in_range(y: np.ndarray, classes: int, path: Path) -> None:
    if len(y) and int(y.max()) >= classes:
        i = int(np.argmax(y >= classes))
        raise _bad(path, f"label {int(y[i])} at index {i} is out of range (this data set has {classes} classes)")


def _uint8_images(x: np.ndarray) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1]: p / 255, correctly rounded."""
    return torch.tensor(x).to(torch.float32).div_(255.0)  # copies: the file's buffer is read-only


def load_idx_set(config: DataConfig, name: str) -> Dataset:
    """MNIST or Fashion-MNIST (the same four IDX files) from ``config.path``; the published split is kept."""
    folder = _folder(config.path)
    parts, paths = {}, {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, ndim in (("images", 3), ("labels", 1)):
            stems = (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte")
            path = _find(folder, stems, f"{split} {kind} file")
            arr = read_idx(path)
            if arr.ndim != ndim:
                raise _bad(path, f"{split} {kind} must be a {ndim}-D IDX array, this one has shape {arr.shape}")
            parts[split, kind], paths[split, kind] = arr, path
        n_x, n_y = len(parts[split, "images"]), len(parts[split, "labels"])
        if n_x != n_y:
            raise _bad(paths[split, "labels"], f"{n_y} labels for {n_x} images in {paths[split, 'images']}")
        if n_x == 0:
            raise _bad(paths[split, "images"], "holds no images")
        _labels_in_range(parts[split, "labels"], 10, paths[split, "labels"])
    x = {s: _shape(_uint8_images(parts[s, "images"][:, None]), config) for s in ("train", "test")}
    y = {s: torch.from_numpy(parts[s, "labels"].astype(np.int64)) for s in ("train", "test")}
    return Dataset(x["train"], y["train"], x["test"], y["test"], classes=10, name=name)


def load_mnist(config: DataConfig, seed: int = 0) -> Dataset:
    """MNIST from its four IDX files in ``config.path`` (nothing is downloaded)."""
    return load_idx_set(config, "mnist")


def load_fashion_mnist(config: DataConfig, seed: int = 0) -> Dataset:
    """Fashion-MNIST: MNIST's file format and names, ten kinds of clothing instead of digits."""
    return load_idx_set(config, "fashion_mnist")


CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes of 32×32, row by row


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: uint8 images (n, 3, 32, 32) and labels (n,), labels checked to be < 10."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) == 0 or len(data) % CIFAR_RECORD:
        raise _bad(path, f"{len(data)} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records "
                         "(truncated, or not a binary-version batch)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0]
    _labels_in_range(labels, 10, path)
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(config: DataConfig, seed: int = 0) -> Dataset:
    """CIFAR-10 from the binary version: data_batch_1..5.bin (50,000 training images) and test_batch.bin."""
    folder = _folder(config.path)
    if not (folder / "data_batch_1.bin").exists() and (folder / "cifar-10-batches-bin").is_dir():
        folder = folder / "cifar-10-batches-bin"  # the folder the published archive unpacks to
    train = [read_cifar_batch(_find(folder, (f"data_batch_{i}.bin",), f"training batch {i}")) for i in range(1, 6)]
    test = read_cifar_batch(_find(folder, ("test_batch.bin",), "test batch"))
    x_train = _shape(_uint8_images(np.concatenate([b[0] for b in train])), config)
    y_train = torch.from_numpy(np.concatenate([b[1] for b in train]).astype(np.int64))
    x_test = _shape(_uint8_images(test[0]), config)
    return Dataset(x_train, y_train, x_test, torch.from_numpy(test[1].astype(np.int64)), classes=10, name="cifar10")


NPZ_LAYOUTS = (("x_train", "y_train", "x_test", "y_test"), ("x", "y"))


def _npz_images(a: np.ndarray, key: str, path: Path) -> torch.Tensor:
    """(N, H, W) or (N, C, H, W); uint8 scaled by 1/255, floats taken as they are and required in [0, 1]."""
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4:
        raise _bad(path, f"'{key}' has shape {a.shape}: images must be (N, H, W) or (N, C, H, W)")
    n, c, h, w = a.shape
    if min(n, c, h, w) == 0:
        raise _bad(path, f"'{key}' has shape {a.shape}: no images")
    if c > min(h, w):
        raise _bad(path, f"'{key}' has shape {a.shape}: more channels ({c}) than pixels on its shorter side "
                         f"({min(h, w)}); channels-last? store images as (N, C, H, W)")
    if a.dtype == np.uint8:
        return _uint8_images(a)
    if a.dtype.kind != "f":
        raise _bad(path, f"'{key}' has dtype {a.dtype}: images must be uint8 (0..255) or float in [0, 1]")
    x = torch.from_numpy(np.asarray(a, dtype=np.float32))
    bad = ~torch.isfinite(x)
    if bad.any():
        at = tuple(int(i) for i in bad.nonzero()[0])
        raise _bad(path, f"'{key}' holds {float(x[at])} at (image, channel, row, column) = {at}: images must be "
                         "finite")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise _bad(path, f"'{key}' spans [{lo:g}, {hi:g}]: float images must lie in [0, 1] (uint8 ones are "
                         "divided by 255 here; scale floats yourself)")
    return x


def _npz_labels(a: np.ndarray, key: str, n: int, path: Path) -> torch.Tensor:
    if a.dtype.kind not in "iu":
        raise _bad(path, f"'{key}' has dtype {a.dtype}: labels must be integers 0, 1, ..., classes - 1")
    if a.shape != (n,):
        raise _bad(path, f"'{key}' has shape {a.shape}: labels must be one per image, shape ({n},)")
    if a.dtype.kind == "i" and n and int(a.min()) < 0:
        i = int(np.argmax(a < 0))
        raise _bad(path, f"'{key}' holds label {int(a[i])} at index {i}: labels must be >= 0")
    if a.dtype == np.uint64 and n and int(a.max()) > np.iinfo(np.int64).max:
        raise _bad(path, f"'{key}' holds label {int(a.max())}: too large")
    return torch.from_numpy(a.astype(np.int64))


def load_npz(config: DataConfig, seed: int = 0) -> Dataset:
    """Arrays a user saved with ``numpy.savez``: x_train, y_train, x_test, y_test (split kept), or x, y (split here
    by the seed). Pickled (object) arrays are refused: loading them could run code."""
    path = Path(config.path).expanduser()
    if path.is_dir():
        raise _bad(path, "is a folder, not an .npz file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise _bad(path, "no such file") from None
    except OSError as e:
        raise _bad(path, f"cannot read: {e}") from None
    if magic == b"\x93NUMPY":
        raise _bad(path, "is a single .npy array, not an .npz archive of named arrays (numpy.savez)")
    if magic[:2] != b"PK":
        raise _bad(path, "not an .npz archive (no zip signature; write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            layout = next((lay for lay in NPZ_LAYOUTS if keys >= set(lay)), None)
            found = ", ".join(sorted(keys)) or "none"
            if layout is None:
                raise _bad(path, f"needs arrays x_train, y_train, x_test, y_test or x, y; arrays found: {found}")
            if keys >= set(NPZ_LAYOUTS[0]) and keys >= set(NPZ_LAYOUTS[1]):
                raise _bad(path, "holds both x_train, y_train, x_test, y_test and x, y: which split is meant is "
                                 "unclear; keep one layout")
            arrays = {k: f[k] for k in layout}
    except ConfigError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise _bad(path, "holds a pickled (object) array, which is refused (it could run code): save plain "
                             "numeric arrays") from None
        raise _bad(path, f"not a readable .npz archive: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated or corrupt
        raise _bad(path, f"not a readable .npz archive: {e}") from None
    pairs = (("x_train", "y_train"), ("x_test", "y_test")) if len(layout) == 4 else (("x", "y"),)
    xs, ys = [], []
    for kx, ky in pairs:
        xs.append(_npz_images(arrays[kx], kx, path))
        ys.append(_npz_labels(arrays[ky], ky, len(xs[-1]), path))
    if len(xs) == 2 and xs[0].shape[1:] != xs[1].shape[1:]:
        raise _bad(path, f"train images {tuple(xs[0].shape[1:])} and test images {tuple(xs[1].shape[1:])} differ "
                         "in shape")
    if len(xs) == 1 and len(xs[0]) < 2:
        raise _bad(path, "'x' holds one image: a split needs at least two")
    top = max(int(y.max()) for y in ys)
    classes = config.classes or max(top + 1, 2)
    if top >= classes:
        key = next(k for (_, k), y in zip(pairs, ys, strict=True) if int(y.max()) == top)
        raise _bad(path, f"'{key}' holds label {top}, out of range for classes = {classes}")
    xs = [_shape(x, config) for x in xs]
    parts = (xs[0], ys[0], xs[1], ys[1]) if len(xs) == 2 else _split(xs[0], ys[0], config.test_fraction, seed)
    return Dataset(*parts, classes=classes, name="npz")


def load_digits(config: DataConfig, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits (8×8, 16 grey levels), scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = _shape(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, config)
    y = torch.tensor(d.target, dtype=torch.long)
    return Dataset(*_split(x, y, config.test_fraction, seed), classes=10, name="digits")


def make_synthetic(config: DataConfig, seed: int = 0) -> Dataset:
    """Gaussian clusters rendered as images: a quick, separable stand-in with any image size."""
    g = torch.Generator().manual_seed(seed)
    side, classes = config.size or 8, config.classes or 10
    d = side * side
    centres = torch.rand(classes, d, generator=g)
    y = torch.randint(0, classes, (config.samples,), generator=g)
    x = (centres[y] + 0.25 * torch.randn(config.samples, d, generator=g)).clamp(0, 1)
    x = _channels(x.reshape(-1, 1, side, side), config.channels)
    return Dataset(*_split(x, y, config.test_fraction, seed), classes=classes, name="synthetic")


LOADERS = {"digits": load_digits, "mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10,
           "npz": load_npz, "synthetic": make_synthetic}


def load(config: DataConfig | None = None, seed: int = 0) -> Dataset:
    """The data set a configuration names, with its training set limited if asked."""
    config = config or DataConfig()
    try:
        check(config)
        config.validate()
    except ConfigError as e:
        raise e.within("data") from None
    data = LOADERS[config.name](config, seed)
    if config.limit:
        data = Dataset(data.x_train[: config.limit], data.y_train[: config.limit], data.x_test, data.y_test,
                       data.classes, data.name)
    return data
