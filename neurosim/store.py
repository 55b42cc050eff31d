"""HDF5 run files: one file per run, readable with plain h5py or HDFView (no pickles, no Python objects).

Layout (docs/runs.md gives every group, dataset and attribute with its unit):

- root attributes: ``neurosim_version``, ``format``, ``scenario_toml`` (resolved), ``scenario_sha256``, ``seed``,
  ``created_utc``, ``complete`` (true only once the run finished), versions of torch, numpy, h5py, Python and
  the platform, and a few copies of key settings for ``neurosim show``;
- ``/metrics``: 1-D datasets, one entry per epoch, ``units`` and ``doc`` attributes;
- ``/events``: the engine's grouped trace, a compound dataset (``neurosim.engine.EVENT_DTYPE``);
- ``/traces/<layer>/<series>``: ``epoch`` and ``values`` with one row per recorded epoch (histograms of the
  conductances, weight snapshots, neuron-circuit coefficients, pulse counts);
- ``/chip``: the checkpoint of the chip and its trainer after the last complete epoch.

Writing is atomic (``RunWriter``): every commit copies the file under a temporary name, adds to the copy,
flushes it to disk and renames it over the previous version. A crash at any moment leaves the last committed
version whole; an unfinished run lives under ``OUT.h5.partial`` and only a finished one under ``OUT.h5``.

This module is numpy and h5py only: analysis and ``neurosim show`` read run files without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neurosim.config import ConfigError

FORMAT = 1                    # layout version; a reader refuses files of a newer format
PARTIAL = ".partial"          # an unfinished run: OUT.h5.partial
TEMPORARY = ".tmp"            # a commit in progress: OUT.h5.tmp (removed or replaced when the commit ends)
GZIP = {"compression": "gzip", "compression_opts": 4, "shuffle": True}

# Units and one-line meanings of the per-epoch metrics (/metrics/<name> attributes). delta_<name> is the
# epoch's own share of a cumulative <name>, in the same unit.
METRICS: dict[str, tuple[str, str]] = {
    "epoch": ("", "epoch number, from 1"),
    "stage": ("", "stage of a multi-stage scheme ('stage1', 'stage2'), empty otherwise"),
    "train_loss": ("", "mean cost over the epoch's steps (the scheme's cost function)"),
    "test_accuracy": ("1", "fraction of the test set classified right by the chip as it is, every non-ideality on"),
    "sim_time_s": ("s", "the chip's clock at the end of the epoch (cumulative)"),
    "energy_j": ("J", "energy of the chip since the start (cumulative)"),
    "pulses": ("pulses", "programming pulses since the start (cumulative)"),
    "perturbations": ("cycles", "DGC perturb-measure-restore cycles since the start (cumulative)"),
    "reads": ("reads", "analog tile reads since the start (cumulative)"),
    "adc_conversions": ("conversions", "ADC conversions since the start (cumulative)"),
    "neuron_evals": ("evaluations", "neuron and derivative circuit evaluations since the start (cumulative)"),
    "digital_ops": ("operations", "operations of the digital controller since the start (cumulative)"),
    "wall_time_s": ("s", "wall-clock time the simulation of the epoch took on this computer"),
    "pulse_rate": ("pulses/(weight*step)", "weight-update pulses per weight and step in the epoch"),
    "schemes": ("", "gradient method of each layer in the epoch, 'layer=scheme;...'"),
}


class RunFileError(ConfigError):
    """A file that cannot serve as a run file (missing, not HDF5, corrupt, not neurosim's, another run):
    one line naming the file, which the CLI prints before exiting with status 2."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__("", None, reason, str(path))

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


# ---- plain values <-> HDF5 ----------------------------------------------------------------------------------

def _attr(value: Any) -> Any:
    """An attribute value as HDF5 stores it natively (str, numbers, bools, numeric arrays)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | Path):   # str subclasses too (torch.__version__ is one)
        return str(value)
    if value is None:
        return ""
    return value


def _plain(value: Any) -> Any:
    """An attribute as read back: Python scalars and str (h5py gives numpy scalars and bytes in places)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return [_plain(v) for v in value.tolist()]
    return value


def _set_attr(obj: h5py.HLObject, name: str, value: Any) -> None:
    """Set an attribute unless it holds that value already: a rewritten text attribute takes new space in
    the file's global heap, and a checkpoint rewrites the same text every epoch."""
    value = _attr(value)
    if name in obj.attrs:
        old = _plain(obj.attrs[name])
        if type(old) is type(value) and (old == value if not isinstance(value, np.ndarray)
                                         else np.array_equal(old, value)):
            return
    obj.attrs[name] = value


def write_tree(group: h5py.Group, tree: Mapping[str, Any], compress: bool = False, keep: bool = False) -> None:
    """Write a nested dict: a dict is a group, an array a dataset, a key starting with '@' an attribute of the
    group. A dataset that exists with the same shape and type is overwritten in place (the file does not grow);
    otherwise it is replaced. ``keep``: leave existing datasets as they are (parameters written once)."""
    for key, value in tree.items():
        if key.startswith("@"):
            _set_attr(group, key[1:], value)
            continue
        if isinstance(value, Mapping):
            write_tree(group.require_group(key), value, compress, keep)
            continue
        array = np.asarray(value)
        if array.dtype.kind in "OUM":
            raise TypeError(f"{group.name}/{key}: {array.dtype} cannot go into a run file (numbers and bytes only)")
        if key in group:
            old = group[key]
            if keep:
                continue
            if isinstance(old, h5py.Dataset) and old.shape == array.shape and old.dtype == array.dtype:
                old[...] = array
                continue
            del group[key]
        options = GZIP if compress and array.size > 1 else {}
        group.create_dataset(key, data=array, **options)


def read_tree(group: h5py.Group) -> dict[str, Any]:
    """The inverse of ``write_tree``: datasets as numpy arrays, attributes under '@' keys."""
    out: dict[str, Any] = {f"@{k}": _plain(v) for k, v in group.attrs.items()}
    for key, item in group.items():
        out[key] = read_tree(item) if isinstance(item, h5py.Group) else item[()]
    return out


def _append(group: h5py.Group, name: str, rows: np.ndarray, compress: bool = True) -> None:
    """Append rows along the first axis of a resizable dataset (created on first use)."""
    if name not in group:
        # Chunks of about 64 kB: appending rewrites the last chunk only, so what a commit leaves unused in
        # the file stays below one chunk.
        row_bytes = rows.dtype.itemsize * int(np.prod(rows.shape[1:], dtype=np.int64))
        chunk = (max(1, min(1024, 65536 // max(1, row_bytes))), *rows.shape[1:])
        group.create_dataset(name, data=rows, maxshape=(None, *rows.shape[1:]), chunks=chunk,
                             **(GZIP if compress else {}))
        return
    ds = group[name]
    if ds.shape[1:] != rows.shape[1:] or ds.dtype != rows.dtype:
        raise ValueError(f"{ds.name}: rows of shape {rows.shape[1:]} {rows.dtype} do not fit {ds.shape[1:]} {ds.dtype}")
    n = ds.shape[0]
    ds.resize(n + len(rows), axis=0)
    ds[n:] = rows


def _put_column(group: h5py.Group, key: str, column: np.ndarray) -> None:
    """A metrics column, resizable, extended by the epochs it lacks: past epochs never change, and a replaced
    dataset's space is not reclaimed by HDF5 (a file rewritten per epoch would grow with the square of the
    epochs). Text is fixed-width bytes; a wider entry replaces the column once."""
    ds = group.get(key)
    n = 0 if ds is None else ds.shape[0]
    if ds is not None and (ds.maxshape != (None,) or ds.dtype.kind != column.dtype.kind or n > len(column)
                           or (column.dtype.kind == "S" and column.dtype.itemsize > ds.dtype.itemsize)
                           or (column.dtype.kind != "S" and ds.dtype != column.dtype)):
        del group[key]
        ds, n = None, 0
    if ds is None:
        dtype = np.dtype(f"S{max(16, column.dtype.itemsize)}") if column.dtype.kind == "S" else column.dtype
        ds = group.create_dataset(key, shape=(0,), maxshape=(None,), chunks=(256,), dtype=dtype)
    if len(column) > n:
        ds.resize(len(column), axis=0)
        ds[n:] = column[n:]


# ---- per-epoch metrics <-> columns --------------------------------------------------------------------------

def _mapping_text(mapping: Mapping[str, Any]) -> str:
    return ";".join(f"{k}={v}" for k, v in mapping.items())


def _mapping_of(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";") if part)


class MetricColumns(dict):
    """Column name -> 1-D array, plus the names of the columns that hold mappings as 'key=value;...' text."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.mappings: list[str] = []


def metric_columns(rows: list[Mapping[str, Any]]) -> MetricColumns:
    """Metrics rows (one dict per epoch) as 1-D columns: integers int64, other numbers float64 (None: NaN),
    text UTF-8 bytes, a mapping 'key=value;...' text (their names in the result's ``mappings``). Every row
    must have the same keys."""
    if not rows:
        return MetricColumns()
    keys = list(rows[0])
    for row in rows:
        if list(row) != keys:
            raise ValueError(f"epoch {row.get('epoch')}: metrics keys {list(row)} differ from {keys}")
    out = MetricColumns()
    for key in keys:
        values = [row[key] for row in rows]
        if all(isinstance(v, Mapping) for v in values):
            out[key] = np.array([_mapping_text(v).encode() for v in values], dtype=np.bytes_)
            out.mappings.append(key)
        elif all(isinstance(v, str) for v in values):
            out[key] = np.array([v.encode() for v in values], dtype=np.bytes_)
        elif all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
            out[key] = np.array(values, dtype=np.int64)
        elif all(isinstance(v, bool | np.bool_) for v in values):
            out[key] = np.array(values, dtype=np.bool_)
        else:
            out[key] = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return out


def metric_rows(columns: Mapping[str, np.ndarray], mappings: Iterable[str] = ()) -> list[dict[str, Any]]:
    """The inverse of ``metric_columns``: Python ints, floats, str, and dicts for the ``mappings`` columns.
    Exact: a float64 comes back as the same float."""
    mappings = set(mappings)
    n = len(next(iter(columns.values()))) if columns else 0
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, column in columns.items():
        values = column.tolist()
        for row, v in zip(rows, values, strict=True):
            if isinstance(v, bytes):
                v = v.decode("utf-8")
                if key in mappings:
                    v = _mapping_of(v)
            row[key] = v
    return rows


def _metric_meta(key: str) -> tuple[str, str]:
    base = key.removeprefix("delta_")
    units, doc = METRICS.get(base, ("", ""))
    if key != base:
        doc = f"this epoch's share of {base}" + (f" ({doc})" if doc else "")
    return units, doc


# ---- writing ------------------------------------------------------------------------------------------------

@dataclass
class Commit:
    """What one commit adds to a run file. Metrics replace the table; events and trace rows are appended;
    the checkpoint replaces the previous one (``static`` parts are written once)."""

    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    events: np.ndarray | None = None
    traces: list[tuple[str, int, np.ndarray, dict[str, Any], bool]] = field(default_factory=list)
    fixed: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)
    chip: dict[str, Any] | None = None
    chip_static: dict[str, Any] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems (and Windows) cannot sync a folder; renames stay atomic
        _fsync(path)


class RunWriter:
    """Atomic commits to a run file: ``commit`` makes a complete new version of ``OUT.h5.partial`` (or, with
    ``final``, of ``OUT.h5``) under ``OUT.h5.tmp`` and renames it into place.

    Why a copy and not writes in place: HDF5 is not transactional, so a process killed inside a write can
    leave a file that does not open at all, losing every epoch before it. A copy costs one sequential read
    and write of the file per epoch (a few MB for the networks of the examples; docs/runs.md gives figures),
    small beside an epoch of training."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL)
        self.temporary = self.path.with_name(self.path.name + TEMPORARY)

    def start(self, attrs: Mapping[str, Any]) -> None:
        """Begin a new run: a fresh partial file with the root attributes (any earlier partial is replaced)."""
        self._clean()
        self._write(None, self.partial, lambda f: write_tree(f, {f"@{k}": v for k, v in attrs.items()}))

    def commit(self, commit: Commit, final: bool = False) -> Path:
        """Add ``commit`` to the run. ``final``: the run is complete; the file becomes ``OUT.h5`` (with
        ``complete = True``) and the partial file goes. Returns the path written."""
        if not self.partial.exists():
            raise FileNotFoundError(f"{self.partial}: start() the run first")
        target = self.path if final else self.partial
        self._write(self.partial, target, lambda f: self._add(f, commit, final))
        if final:
            self.partial.unlink()
            _fsync_folder(self.path.parent)
        return target

    def _clean(self) -> None:
        if self.temporary.exists():   # a commit that was interrupted: never renamed, so never part of the run
            self.temporary.unlink()

    def _write(self, source: Path | None, target: Path, fill) -> None:
        self._clean()
        if source is not None:
            shutil.copyfile(source, self.temporary)
        try:
            with h5py.File(self.temporary, "a" if source is not None else "w") as f:
                fill(f)
            _fsync(self.temporary)
            os.replace(self.temporary, target)
        finally:
            if self.temporary.exists():
                self.temporary.unlink()
        _fsync_folder(target.parent)

    @staticmethod
    def _add(f: h5py.File, commit: Commit, final: bool) -> None:
        if commit.metrics:
            group = f.require_group("metrics")
            for key in list(group):
                if key not in commit.metrics:
                    del group[key]
            for key, column in commit.metrics.items():
                _put_column(group, key, column)
                units, doc = _metric_meta(key)
                _set_attr(group[key], "units", units)
                _set_attr(group[key], "doc", doc)
            _set_attr(group, "epochs", len(next(iter(commit.metrics.values()))))
            _set_attr(group, "columns", ",".join(commit.metrics))   # the trainer's order (HDF5 lists by name)
            _set_attr(group, "mappings", ",".join(getattr(commit.metrics, "mappings", ())))
        if commit.events is not None:
            _append(f, "events", commit.events)
            _set_attr(f["events"], "units", "t_s, duration_s: s; energy_j: J; count: operations of the kind 'op'")
        if commit.fixed or commit.traces:
            traces = f.require_group("traces")
            for path, (array, attrs) in commit.fixed.items():
                if path not in traces:
                    traces.create_dataset(path, data=array)
                    for k, v in attrs.items():
                        _set_attr(traces[path], k, v)
            for path, epoch, values, attrs, compress in commit.traces:
                series = traces.require_group(path)
                _append(series, "epoch", np.array([epoch], dtype=np.int64), compress=False)
                _append(series, "values", np.asarray(values)[None], compress=compress)
                for k, v in attrs.items():
                    _set_attr(series, k, v)
        if commit.chip_static is not None:
            write_tree(f.require_group("chip"), commit.chip_static, compress=True, keep=True)
        if commit.chip is not None:
            write_tree(f.require_group("chip"), commit.chip)
        for k, v in commit.attrs.items():
            _set_attr(f, k, v)
        _set_attr(f, "complete", bool(final))


# ---- reading ------------------------------------------------------------------------------------------------

class RunFile:
    """A run file, read on demand (the file is opened for each access and never held open or locked).

    Opening checks that the file exists, is HDF5, opens, and is a neurosim run file of a format this version
    reads; anything else is a ``RunFileError`` naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.attrs = self._check(self.path)

    @staticmethod
    def _check(path: Path) -> dict[str, Any]:
        if path.is_dir():
            raise RunFileError(path, "is a folder, not a run file")
        if not path.exists():
            partial = path.with_name(path.name + PARTIAL)
            hint = f" (an unfinished run is in {partial.name}: rerun it to finish)" if partial.exists() else ""
            raise RunFileError(path, "no such file" + hint)
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: _plain(v) for k, v in f.attrs.items()}
        except OSError as e:
            what = "not an HDF5 file" if not h5py.is_hdf5(path) else f"corrupt HDF5 file ({e})"
            raise RunFileError(path, f"{what}: not a neurosim run file") from None
        if "neurosim_version" not in attrs or "format" not in attrs:
            raise RunFileError(path, "an HDF5 file, but not a neurosim run file (no 'neurosim_version' attribute)")
        if not isinstance(attrs["format"], int) or attrs["format"] > FORMAT:
            raise RunFileError(path, f"run file format {attrs['format']!r} is newer than this neurosim reads "
                               f"({FORMAT}); upgrade neurosim")
        return attrs

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as e:
            raise RunFileError(self.path, f"cannot read: {e}") from None

    # -- root -------------------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def scenario_toml(self) -> str:
        return str(self.attrs.get("scenario_toml", ""))

    @property
    def seed(self) -> int:
        return int(self.attrs.get("seed", 0))

    # -- metrics ----------------------------------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """Per-epoch columns; text columns as numpy str arrays."""
        with self._open() as f:
            if "metrics" not in f:
                return {}
            group = f["metrics"]
            order = [c for c in str(_plain(group.attrs.get("columns", ""))).split(",") if c in group]
            out = {}
            for key in order + [k for k in group if k not in order]:
                a = group[key][()]
                out[key] = a.astype(str) if a.dtype.kind == "S" else a
            return out

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch rows as the trainer made them (Python numbers, str, and the layer schemes as a dict)."""
        with self._open() as f:
            if "metrics" not in f:
                return []
            group = f["metrics"]
            mappings = [m for m in str(_plain(group.attrs.get("mappings", ""))).split(",") if m]
            order = [c for c in str(_plain(group.attrs.get("columns", ""))).split(",") if c in group]
            order += [k for k in group if k not in order]
            return metric_rows({k: group[k][()] for k in order}, mappings)

    @property
    def epochs(self) -> int:
        """Epochs recorded (complete ones: a commit holds whole epochs)."""
        with self._open() as f:
            return int(f["metrics"].attrs.get("epochs", 0)) if "metrics" in f else 0

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's metrics row ({} before the first epoch)."""
        rows = self.history
        return rows[-1] if rows else {}

    # -- events and traces ------------------------------------------------------------------------------------
    @property
    def events(self) -> np.ndarray:
        """The engine's event trace (structured array: t_s, duration_s, op, layer, count, energy_j)."""
        with self._open() as f:
            return f["events"][()] if "events" in f else np.empty(0)

    @property
    def event_count(self) -> int:
        with self._open() as f:
            return int(f["events"].shape[0]) if "events" in f else 0

    def trace_layers(self) -> list[str]:
        with self._open() as f:
            return [k for k, v in f["traces"].items() if isinstance(v, h5py.Group)] if "traces" in f else []

    def trace(self, layer: str, series: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(epochs, values, attributes) of one trace series of a layer, e.g. ``trace("fc1", "histogram")``."""
        with self._open() as f:
            path = f"traces/{layer}/{series}"
            if path not in f:
                raise KeyError(f"{self.path}: no trace {layer}/{series}")
            g = f[path]
            return g["epoch"][()], g["values"][()], {k: _plain(v) for k, v in g.attrs.items()}

    def trace_fixed(self, layer: str, name: str) -> np.ndarray:
        with self._open() as f:
            return f[f"traces/{layer}/{name}"][()]

    # -- checkpoint -------------------------------------------------------------------------------------------
    @property
    def has_checkpoint(self) -> bool:
        with self._open() as f:
            return "chip" in f and "epoch" in f["chip"].attrs

    def checkpoint(self) -> dict[str, Any]:
        """The /chip group as a nested dict (arrays, '@' attributes); a RunFileError if there is none."""
        with self._open() as f:
            if "chip" not in f:
                raise RunFileError(self.path, "holds no chip checkpoint (a run with output.checkpoint = false "
                                   "keeps the chip in the finished file only)")
            return read_tree(f["chip"])

    def summary(self) -> dict[str, Any]:
        """Root attributes, JSON-ready (for tools that list runs)."""
        return json.loads(json.dumps(self.attrs, default=str))

    def __repr__(self) -> str:
        state = "complete" if self.complete else "unfinished"
        return f"RunFile({str(self.path)!r}, {state}, {self.epochs} epochs)"


def open_run(path: str | os.PathLike) -> RunFile:
    """Open a run file for reading (``neurosim.open_run``)."""
    return RunFile(path)


__all__ = ["FORMAT", "METRICS", "Commit", "RunFile", "RunFileError", "RunWriter", "metric_columns",
           "metric_rows", "open_run", "read_tree", "write_tree"]
