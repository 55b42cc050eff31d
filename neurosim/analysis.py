"""Runs and sweeps as pandas DataFrames, their export (CSV, Parquet) and their plots.

Why its own layer: a result is read long after the chip that made it, often on a laptop without torch. This
module reads run files through ``neurosim.store`` (numpy and h5py) and sweep summaries with h5py or pandas;
it never imports torch or the training code (tests/test_layering.py enforces it), and the scenario text is
parsed with ``tomllib``, not ``neurosim.scenario``.

- ``runs_frame(paths)``: tidy metrics, one row per run and epoch (a sweep folder: every point, with its swept
  values);
- ``events_frame(run)``: the engine's event trace, one row per operation, layer and step, with its epoch;
- ``traces_frame(run)``: the per-layer traces in long format, one row per recorded value;
- ``sweep_frame(folder)``: a sweep's summary, one row per point; ``summary_table(folder)``: mean and sample
  standard deviation over seeds per combination of swept values;
- ``export(path, out_dir, format)`` and ``plot(path, out)``: what ``neurosim export`` and ``neurosim plot`` do.

Figures are ``matplotlib.figure.Figure`` objects made without pyplot: no global backend or figure registry is
touched, so a library call never opens a window or leaks figures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import textwrap
import tomllib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from neurosim.config import ConfigError
from neurosim.store import RunFile

# The fixed columns of a sweep summary (the sweep's contract); every other column is a swept key.
SUMMARY_FIELDS = ("point", "seed", "final_test_accuracy", "best_test_accuracy", "final_train_loss", "sim_time_s",
                  "energy_j", "pulses", "perturbations", "epochs", "wall_time_s", "status")
# Summary columns averaged over seeds by summary_table, with units for tables and plots.
STATISTICS: dict[str, str] = {
    "final_test_accuracy": "1", "best_test_accuracy": "1", "final_train_loss": "1", "sim_time_s": "s",
    "energy_j": "J", "pulses": "pulses", "perturbations": "cycles", "epochs": "", "wall_time_s": "s",
}
# A point's status that means its numbers are final. Any other status (failed, pending, running, an unfinished
# run...) keeps the point out of the means: a partial run's accuracy is not a result of the grid.
DONE = frozenset({"complete", "completed", "done", "finished", "ok", "success"})
FORMATS = ("csv", "parquet")
FIGURES = (".png", ".svg", ".pdf")
EVENT_COLUMNS = ("epoch", "t_s", "duration_s", "op", "layer", "count", "energy_j")
TRACE_COLUMNS = ("layer", "series", "epoch", "array", "i", "j", "value", "units", "bin_low", "bin_high")


class InputError(ConfigError):
    """A path that cannot serve (not a run file, a folder without a summary, an unknown format): one line
    naming it, which the CLI prints before exiting with status 2."""

    def __init__(self, path: str | os.PathLike, reason: str, field: str = ""):
        super().__init__(field, None, reason, str(path))

    def __str__(self) -> str:
        what = f"{self.field}: " if self.field else ""
        return f"{self.source}: {what}{self.reason}"


# ---- helpers ------------------------------------------------------------------------------------------------

def _scenario(text: str) -> dict[str, Any]:
    """A scenario's TOML text as a dict ({} if it does not parse: a title is not worth a failure)."""
    try:
        return tomllib.loads(text or "")
    except tomllib.TOMLDecodeError:
        return {}


def _open(run: str | os.PathLike | RunFile) -> RunFile:
    return run if isinstance(run, RunFile) else RunFile(run)


def _paths(path_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(path_or_paths, str | os.PathLike):
        return [Path(path_or_paths)]
    paths = [Path(p) for p in path_or_paths]
    if not paths:
        raise InputError("(none)", "no run file or sweep folder given")
    return paths


def _decoded(array: np.ndarray) -> np.ndarray:
    """Fixed-length bytes as str (HDF5 text), anything else unchanged."""
    return np.char.decode(array, "utf-8") if array.dtype.kind == "S" else array


def _point_files(folder: Path) -> list[Path]:
    """Finished run files of a sweep's points (an unfinished point is ``NAME.h5.partial`` and is left out)."""
    return sorted((folder / "points").glob("*.h5"))


# ---- runs ---------------------------------------------------------------------------------------------------

def _run_frame(f: RunFile) -> pd.DataFrame:
    metrics = {k: _decoded(v) for k, v in f.metrics.items()}
    frame = pd.DataFrame(metrics)
    head = {"run": f.path.name, "name": str(f.attrs.get("name", "")), "seed": f.seed, "complete": f.complete}
    for i, (key, value) in enumerate(head.items()):
        frame.insert(i, key, [value] * len(frame))
    return frame


def runs_frame(path_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Per-epoch metrics of one or more run files, or of every point of sweep folders: one row per run and
    epoch. Leading columns: ``run`` (file name), ``name`` (the scenario's), ``seed``, ``complete``; a sweep's
    rows also carry ``point`` and the point's swept values; then every /metrics column (docs/runs.md gives their
    units), ``schemes`` as its 'layer=scheme;...' text. Runs with other columns leave NaN where they have none."""
    frames = []
    for path in _paths(path_or_paths):
        frames.append(_sweep_runs(path) if path.is_dir() else _run_frame(RunFile(path)))
    frames = [f for f in frames if len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _sweep_runs(folder: Path) -> pd.DataFrame:
    summary = sweep_frame(folder)
    keys = swept_keys(summary)
    by_point: dict[str, dict[str, Any]] = {}
    for row in summary.to_dict("records"):
        point = Path(str(row.get("point", "")))
        by_point[point.name] = row   # the contract names the file; accept a path, or the name without .h5
        by_point.setdefault(point.stem, row)
    frames = []
    for path in _point_files(folder):
        frame = _run_frame(RunFile(path))
        row = by_point.get(path.name) or by_point.get(path.stem) or {}
        frame.insert(0, "point", [path.name] * len(frame))
        for i, key in enumerate(keys):
            frame.insert(1 + i, key, [row.get(key, np.nan)] * len(frame))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["point", *keys, "run", "name", "seed", "complete"])
    return pd.concat(frames, ignore_index=True)


def events_frame(run: str | os.PathLike | RunFile) -> pd.DataFrame:
    """The engine's event trace of a run (docs/engine.md): one row per operation, layer and step, in the order
    the operations started, with ``t_s`` and ``duration_s`` (s), ``op``, ``layer``, ``count`` and
    ``energy_j`` (J). ``epoch`` is the epoch whose clock interval holds the operation's start; it is checked
    against the file's per-epoch energy (each epoch's events must add up to its ``delta_energy_j`` to 1e-9)
    and left empty (<NA>) with a warning if they do not, rather than guessed."""
    f = _open(run)
    events = f.events
    if not events.dtype.names:
        return pd.DataFrame({c: pd.Series(dtype="Int64" if c in ("epoch", "count") else
                                          "float64" if c.endswith("_s") or c == "energy_j" else object)
                             for c in EVENT_COLUMNS})
    frame = pd.DataFrame({name: _decoded(events[name]) for name in events.dtype.names})
    frame.insert(0, "epoch", pd.array(_event_epochs(f, events), dtype="Int64"))
    return frame


def _event_epochs(f: RunFile, events: np.ndarray) -> np.ndarray | list:
    """Each event's epoch from the clock at the epochs' ends, verified against each epoch's energy."""
    metrics = f.metrics
    ends = np.asarray(metrics.get("sim_time_s", []), dtype=np.float64)
    unknown = [pd.NA] * len(events)
    if not len(ends) or not np.all(np.isfinite(ends)) or np.any(np.diff(ends) < 0):
        return unknown
    # An operation starting exactly at an epoch's end belongs to the next epoch: the epoch ended when its last
    # operation finished, and every operation lasts longer than zero.
    index = np.searchsorted(ends, events["t_s"], side="right")
    if np.any(index >= len(ends)):
        return unknown
    energy = np.asarray(metrics["energy_j"], dtype=np.float64)
    per_epoch = np.bincount(index, weights=events["energy_j"], minlength=len(ends))
    expected = np.diff(energy, prepend=0.0)
    if not np.allclose(per_epoch, expected, rtol=1e-9, atol=1e-9 * max(float(energy[-1]), 0.0)):
        warnings.warn(f"{f.path}: the events do not add up to the per-epoch energy; their epoch is left empty",
                      stacklevel=3)
        return unknown
    return np.asarray(metrics["epoch"])[index]


def traces_frame(run: str | os.PathLike | RunFile, series: Sequence[str] | None = None) -> pd.DataFrame:
    """The /traces of a run file in long format: one row per recorded value, with ``layer``, ``series``
    (histogram, weights, pulses, coefficients, prelu_slope), ``epoch`` (0: the chip as initialized),
    ``array`` (histograms: the device array, 'plus' or 'minus'), ``i`` and ``j`` (histogram: bin and 0; weights:
    input row, bias last, and output column; coefficients: term, lowest order first; pulses: 0 and 0),
    ``value`` (float64), ``units`` (the series' units) and, for histogram rows, the bin's edges ``bin_low`` and
    ``bin_high`` in S. ``series``: only those series (weights can be large: a long table of every snapshot)."""
    f = _open(run)
    frames = []
    with h5py.File(f.path, "r") as h5:
        traces = h5.get("traces")
        for layer in (traces if traces is not None else {}):
            group = traces[layer]
            if not isinstance(group, h5py.Group):
                continue
            for name, item in group.items():
                if not (isinstance(item, h5py.Group) and "epoch" in item and "values" in item):
                    continue
                if series is not None and name not in series:
                    continue
                edges = group.get(f"{name}_edges")
                frames.append(_series_frame(layer, name, item, None if edges is None else edges[()]))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in TRACE_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _series_frame(layer: str, name: str, group: h5py.Group, edges: np.ndarray | None) -> pd.DataFrame:
    epochs, values = group["epoch"][()], group["values"][()]
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in group.attrs.items()}
    rows = len(epochs)
    histogram = edges is not None and values.ndim == 3
    shape = values.reshape(rows, -1).shape if values.ndim > 1 else (rows, 1)
    per_row = shape[1]
    if histogram:            # (rows, arrays, bins)
        arrays_n, bins = values.shape[1:]
        names = str(attrs.get("arrays", "")).split(",")
        names = names if len(names) == arrays_n else [str(a) for a in range(arrays_n)]
        array = np.tile(np.repeat(np.asarray(names, dtype=object), bins), rows)
        i = np.tile(np.arange(bins), rows * arrays_n)
        j = np.zeros(rows * per_row, dtype=np.int64)
        low = np.tile(edges[:-1], rows * arrays_n)
        high = np.tile(edges[1:], rows * arrays_n)
    else:                    # (rows,), (rows, terms), (rows, in, out) or more: i the first axis, j the rest flat
        first = values.shape[1] if values.ndim > 1 else 1
        rest = per_row // first
        array = np.full(rows * per_row, "", dtype=object)
        i = np.tile(np.repeat(np.arange(first), rest), rows)
        j = np.tile(np.arange(rest), rows * first)
        low = high = np.full(rows * per_row, np.nan)
    return pd.DataFrame({
        "layer": layer, "series": name, "epoch": np.repeat(epochs, per_row), "array": array, "i": i, "j": j,
        "value": values.reshape(-1).astype(np.float64), "units": str(attrs.get("units", "")),
        "bin_low": low, "bin_high": high,
    })


# ---- sweeps -------------------------------------------------------------------------------------------------

def sweep_frame(folder: str | os.PathLike) -> pd.DataFrame:
    """A sweep's summary, one row per point (the contract's columns: ``point``, the swept keys, ``seed``,
    ``final_test_accuracy``, ..., ``status``), from ``summary.h5``, else ``summary.csv``. The frame's
    ``attrs`` hold ``grid`` (swept key -> values, when known), ``seeds``, ``base_scenario_toml`` and
    ``neurosim_version`` as far as the folder records them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder (a sweep is a folder with summary.h5 or summary.csv)")
    problems = []
    h5, csv = folder / "summary.h5", folder / "summary.csv"
    frame = None
    if h5.exists():
        try:
            frame = _summary_h5(h5)
        except (OSError, KeyError, ValueError, TypeError) as e:
            problems.append(f"summary.h5 unreadable ({e})")
    if frame is None and csv.exists():
        try:
            frame = pd.read_csv(csv)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            problems.append(f"summary.csv unreadable ({e})")
        else:
            frame.attrs.update(_sweep_file_attrs(folder))
    if frame is None:
        reason = "; ".join(problems) if problems else "no summary.h5 or summary.csv: not a sweep folder, or " \
                                                       "its sweep has not written a summary yet"
        raise InputError(folder, reason)
    if "point" not in frame.columns:
        raise InputError(folder, "the summary has no 'point' column: not a neurosim sweep summary")
    if "status" in frame.columns:
        frame["status"] = frame["status"].fillna("").astype(str)
    return frame


def _summary_h5(path: Path) -> pd.DataFrame:
    with h5py.File(path, "r") as f:
        table = f["summary"][()]
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
    if not table.dtype.names:
        raise ValueError("/summary is not a compound dataset")
    frame = pd.DataFrame({name: _decoded(table[name]) for name in table.dtype.names})
    info: dict[str, Any] = {}
    grid = _grid(attrs.get("grid_json"))
    if grid is not None:
        info["grid"] = grid
    if "seeds" in attrs:
        seeds = attrs["seeds"]
        info["seeds"] = np.asarray(seeds).tolist() if not isinstance(seeds, str) else seeds
    for key in ("base_scenario_toml", "neurosim_version"):
        if key in attrs:
            info[key] = str(attrs[key])
    frame.attrs.update(info)
    return frame


def _grid(text: Any) -> dict[str, list] | None:
    """The grid as swept key -> values from ``grid_json`` (a JSON object, or a list of [key, values] pairs)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        grid = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(grid, dict):
        return {str(k): v for k, v in grid.items()}
    if isinstance(grid, list) and all(isinstance(p, list | tuple) and len(p) == 2 for p in grid):
        return {str(k): v for k, v in grid}
    return None


def _sweep_file_attrs(folder: Path) -> dict[str, Any]:
    """What sweep.toml says about the grid and the base scenario, for a summary read from CSV."""
    path = folder / "sweep.toml"
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    table = _scenario(text)
    sweep = table.get("sweep", {}) if isinstance(table.get("sweep"), dict) else {}
    info: dict[str, Any] = {"base_scenario_toml": text}
    if isinstance(sweep.get("grid"), dict):
        info["grid"] = dict(sweep["grid"])
    if "seeds" in sweep:
        info["seeds"] = sweep["seeds"]
    return info


def swept_keys(frame: pd.DataFrame) -> list[str]:
    """The swept keys of a summary: the grid's keys where the summary records the grid and has a column for
    each, else every column outside the contract's fixed list. ``seed`` is never one: it is what the
    statistics run over."""
    grid = frame.attrs.get("grid")
    if isinstance(grid, dict) and all(k in frame.columns for k in grid):
        return [k for k in grid if k != "seed"]
    return [c for c in frame.columns if c not in SUMMARY_FIELDS]


def _sorted(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows sorted by the swept axes: numbers by value (0.5 before 10), anything else by its text."""
    if not keys or table.empty:
        return table.reset_index(drop=True)

    def order(column: pd.Series) -> pd.Series:
        if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
            return column
        return column.astype(str)

    return table.sort_values(keys, key=order, kind="stable", na_position="last").reset_index(drop=True)


def summary_table(folder: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof = 1) over seeds for each combination of swept values, sorted
    by the swept axes. Columns: the swept keys, ``n`` (points averaged: those whose status is done),
    ``points`` (all points of the combination), ``<stat>_mean`` and ``<stat>_std`` for every statistic of the
    summary (final_test_accuracy, ..., wall_time_s; std is NaN with fewer than two values), and ``status``
    ('3 complete, 1 failed'). A point that is not done (failed, pending, unfinished) is counted, never
    averaged."""
    frame = folder if isinstance(folder, pd.DataFrame) else sweep_frame(folder)
    keys = swept_keys(frame)
    stats = [c for c in STATISTICS if c in frame.columns]
    done = (frame["status"].astype(str).str.strip().str.lower().isin(DONE) if "status" in frame.columns
            else pd.Series(True, index=frame.index))
    groups = frame.groupby(keys, dropna=False, sort=False) if keys else [((), frame)]
    rows = []
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        row: dict[str, Any] = dict(zip(keys, values, strict=True))
        ok = group[done.loc[group.index]]
        row["n"] = len(ok)
        row["points"] = len(group)
        for stat in stats:
            x = pd.to_numeric(ok[stat], errors="coerce").astype(np.float64)
            row[f"{stat}_mean"] = x.mean()
            row[f"{stat}_std"] = x.std(ddof=1)
        if "status" in group.columns:
            counts = group["status"].replace("", "(none)").value_counts(sort=False)
            row["status"] = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        rows.append(row)
    columns = [*keys, "n", "points", *(f"{s}_{m}" for s in stats for m in ("mean", "std"))]
    columns += ["status"] if "status" in frame.columns else []
    table = pd.DataFrame(rows, columns=columns)
    # groupby turned integer keys into floats where NaN was possible; keep the summary's own types
    for key in keys:
        if frame[key].dtype.kind in "iub" and table[key].notna().all():
            table[key] = table[key].astype(frame[key].dtype)
    return _sorted(table, keys)


def _sweep_title(frame: pd.DataFrame, folder: Path) -> str:
    scenario = _scenario(str(frame.attrs.get("base_scenario_toml", "")))
    name = scenario.get("name") or folder.name
    description = scenario.get("description") or ""
    seeds = frame["seed"].nunique() if "seed" in frame.columns else "?"
    head = f"{name}: {description}" if description else str(name)
    return _wrap(head) + f"\nsweep {folder.name}: {len(frame)} points, {seeds} seed{'' if seeds == 1 else 's'}"


def _wrap(text: str, width: int = 90) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _plain_cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:g}"
    return str(value)


def _stat_cell(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "-"
    return format(mean, fmt) + ("" if math.isnan(std) else " ± " + format(std, fmt))


# (statistic, header, format) of the table neurosim show prints for a sweep
SHOW_COLUMNS = (("final_test_accuracy", "final test acc", ".3f"), ("best_test_accuracy", "best test acc", ".3f"),
                ("final_train_loss", "final train loss", ".4f"), ("sim_time_s", "chip time (s)", ".3g"),
                ("energy_j", "energy (J)", ".3g"), ("pulses", "pulses", ".4g"),
                ("wall_time_s", "wall (s)", ".3g"))


def summary_lines(folder: str | os.PathLike) -> list[str]:
    """The lines ``neurosim show DIR`` prints: what the sweep is, then ``summary_table`` as text, mean ± std
    over seeds per combination of swept values, sorted by the swept axes."""
    folder = Path(folder)
    frame = sweep_frame(folder)
    table = summary_table(frame)
    keys = swept_keys(frame)
    scenario = _scenario(str(frame.attrs.get("base_scenario_toml", "")))
    status = frame["status"].value_counts(sort=False) if "status" in frame.columns else pd.Series(dtype=int)
    seeds = sorted(frame["seed"].dropna().unique().tolist()) if "seed" in frame.columns else []
    grid = ", ".join(f"{k} = {' | '.join(_plain_cell(v) for v in table[k].drop_duplicates())}" for k in keys)
    head = [("sweep", f"{folder} ({len(frame)} points" + (": " + ", ".join(
                f"{n} {s or '(none)'}" for s, n in sorted(status.items())) if len(status) else "") + ")"),
            ("scenario", " - ".join(str(x) for x in (scenario.get("name"), scenario.get("description")) if x)
             or "-"),
            ("grid", grid or "(no swept key)"),
            ("seeds", f"{len(seeds)}: " + ", ".join(_plain_cell(s) for s in seeds) if seeds else "-")]
    width = max(len(k) for k, _ in head)
    lines = [f"{k:<{width}}  {v}" for k, v in head]
    cols = [(k, k, None) for k in keys] + [("n", "seeds", None)]
    cols += [(s, h, fmt) for s, h, fmt in SHOW_COLUMNS if f"{s}_mean" in table.columns]
    cols += [("status", "status", None)] if "status" in table.columns else []
    cells = []
    for row in table.to_dict("records"):
        cells.append([_stat_cell(row[f"{c}_mean"], row[f"{c}_std"], fmt) if fmt else _plain_cell(row[c])
                      for c, _, fmt in cols])
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, (_, h, _) in enumerate(cols)]
    lines.append("")
    lines.append("  ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths, strict=True)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.append("")
    lines.append("mean ± sample std (ddof 1) over the seeds whose point is done; a point that is not done is "
                 "counted in status only")
    return lines


# ---- export -------------------------------------------------------------------------------------------------

def _writer(fmt: str, where: Path):
    fmt = str(fmt).lower()
    if fmt not in FORMATS:
        raise InputError(where, f"unknown format {fmt!r}: use {' or '.join(FORMATS)}", field="format")
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise InputError(where, "format 'parquet' needs pyarrow, which is not installed (pip install pyarrow); "
                         "use --format csv", field="format")
    return fmt


def _write(frame: pd.DataFrame, out: Path, fmt: str) -> Path:
    path = out.with_suffix(f".{fmt}")
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False, engine="pyarrow")
    return path


def _runs_table(files: list[Path]) -> pd.DataFrame:
    """One row per run file: its root attributes (the scenario's TOML text aside: that is a file of its own)."""
    rows = []
    for path in files:
        attrs = RunFile(path).attrs
        row = {"run": path.name}
        for k, v in attrs.items():
            if k == "scenario_toml":
                continue
            row[k] = " ".join(str(x) for x in np.ravel(v)) if isinstance(v, np.ndarray | list) else v
        rows.append(row)
    return pd.DataFrame(rows)


def export(path: str | os.PathLike, out_dir: str | os.PathLike, format: str = "csv",
           series: Sequence[str] | None = None) -> list[Path]:
    """Write a run file or a sweep folder as tables into ``out_dir``: ``runs`` (root attributes, one row per
    run file), ``metrics`` (``runs_frame``), ``events`` (``events_frame``), ``traces`` (``traces_frame``,
    only ``series`` if given; ``()`` for none) and, for a sweep, ``summary`` (``sweep_frame``) and
    ``summary_table``. A sweep's events and traces carry a leading ``point`` column. ``format``: 'csv', or
    'parquet' where pyarrow is installed. Returns the files written."""
    path, out = Path(path), Path(out_dir)
    fmt = _writer(format, path)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if path.is_dir():
        summary = sweep_frame(path)
        files = _point_files(path)
        tables = {"summary": summary, "summary_table": summary_table(summary)}
    else:
        RunFile(path)   # a clear error for a file that is not a run file
        files = [path]
        tables = {}
    labelled = path.is_dir()

    def gathered(make) -> pd.DataFrame:
        frames = []
        for f in files:
            frame = make(f)
            if labelled:
                frame.insert(0, "point", [f.name] * len(frame))
            frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    tables["runs"] = _runs_table(files)
    tables["metrics"] = runs_frame(path) if path.is_dir() else runs_frame(files)
    tables["events"] = gathered(events_frame)
    if series is None or len(series):
        tables["traces"] = gathered(lambda f: traces_frame(f, series))
    out.mkdir(parents=True, exist_ok=True)
    return [_write(frame, out / name, fmt) for name, frame in tables.items()]


# ---- plots --------------------------------------------------------------------------------------------------

def _figure_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.suffix.lower() not in FIGURES:
        raise InputError(out, f"unknown figure format {out.suffix or '(no suffix)'!r}: name the file "
                         f"{', '.join('*' + s for s in FIGURES)}")
    return out


def plot(path: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *,
         second: str = "time"):
    """The figure of ``neurosim plot``, returned as a ``matplotlib.figure.Figure`` and saved to ``out``
    (.png, .svg or .pdf) if given.

    A run file (or several, one line each): learning curves (test accuracy, train loss) and the chip's time and
    energy, per epoch. A sweep folder: final test accuracy against the swept numeric axis, one line per
    combination of the other swept keys, mean ± sample std over seeds as error bars; a second panel of the
    chip's time (s, log scale; ``second='time'``) or energy (J, ``second='energy'``)."""
    if second not in ("time", "energy"):
        raise InputError(path, f"second panel {second!r}: use 'time' or 'energy'", field="second")
    target = _figure_path(out) if out is not None else None
    paths = _paths(path)
    if any(p.is_dir() for p in paths):
        if len(paths) != 1:
            raise InputError(", ".join(map(str, paths)), "plot takes one sweep folder, or run files only")
        fig = _plot_sweep(paths[0], second)
    else:
        fig = _plot_runs(paths)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"Date": None} if target.suffix.lower() in (".svg", ".pdf") else None   # same bytes each time
        fig.savefig(target, dpi=120, metadata=metadata)
    return fig


def _new_figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _loss_label(scenario: dict[str, Any]) -> str:
    cost = scenario.get("training", {}).get("cost", "") if isinstance(scenario.get("training"), dict) else ""
    if cost == "cross_entropy":
        return "train loss (cross-entropy, nats)"
    if cost == "mse":
        return "train loss (½‖output − one-hot‖², 1)"
    return "train loss (1)"


def _not_measured(ax, values: Iterable[float]) -> None:
    if not np.any(np.isfinite(np.asarray(list(values), dtype=np.float64))):
        ax.text(0.5, 0.5, "not measured\n(training.clock = false)", transform=ax.transAxes, ha="center",
                va="center", color="0.4")


def _plot_runs(paths: list[Path]):
    files = [RunFile(p) for p in paths]
    frames = [_run_frame(f) for f in files]
    scenarios = [_scenario(f.scenario_toml) for f in files]
    fig, axes = _new_figure(2, 2, (10, 7))
    panels = ((axes[0, 0], "test_accuracy", "test accuracy (fraction)"),
              (axes[0, 1], "train_loss", _loss_label(scenarios[0])),
              (axes[1, 0], "sim_time_s", "chip time, cumulative (s)"),
              (axes[1, 1], "energy_j", "chip energy, cumulative (J)"))
    labels = [p.stem if [q.stem for q in paths].count(p.stem) == 1 else str(p) for p in paths]
    for frame, label in zip(frames, labels, strict=True):
        for ax, column, _ in panels:
            y = frame[column].astype(np.float64) if column in frame.columns else np.full(len(frame), np.nan)
            ax.plot(frame["epoch"] if "epoch" in frame.columns else [], y, marker="o", label=label)
    for ax, column, ylabel in panels:
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if column in ("sim_time_s", "energy_j"):
            _not_measured(ax, np.concatenate([np.asarray(f.get(column, []), dtype=np.float64) for f in frames]))
    for ax in axes.flat:
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0, 0].legend(title="run")
    fig.suptitle(_runs_title(files, scenarios))
    return fig


def _runs_title(files: list[RunFile], scenarios: list[dict[str, Any]]) -> str:
    if len(files) > 1:
        names = sorted({str(s.get("name") or f.path.stem) for f, s in zip(files, scenarios, strict=True)})
        return _wrap(f"{len(files)} runs: " + ", ".join(names))
    f, s = files[0], scenarios[0]
    name = s.get("name") or f.path.stem
    head = f"{name}: {s['description']}" if s.get("description") else str(name)
    a = f.attrs
    details = ", ".join(str(x) for x in (a.get("card"), a.get("scheme"), a.get("architecture"),
                                          f"hidden {a['hidden']}" if a.get("hidden") else None, a.get("data"),
                                          f"seed {f.seed}") if x)
    return _wrap(head) + "\n" + details


def _is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def sweep_axes(frame: pd.DataFrame) -> tuple[str | None, list[str]]:
    """(x axis, line keys) of a sweep plot: the first numeric swept key is the x axis and the other swept
    keys label the lines; with no numeric key the first swept key is a categorical x axis."""
    keys = swept_keys(frame)
    numeric = [k for k in keys if _is_number(frame[k])]
    x = numeric[0] if numeric else (keys[0] if keys else None)
    return x, [k for k in keys if k != x]


def _plot_sweep(folder: Path, second: str):
    frame = sweep_frame(folder)
    table = summary_table(frame)
    x, lines = sweep_axes(frame)
    numeric = x is not None and _is_number(frame[x])
    if x is None:
        positions = np.zeros(len(table))
        ticks = ["base scenario"]
    elif numeric:
        positions = table[x].to_numpy(dtype=np.float64)
        ticks = None
    else:
        ticks = [str(v) for v in table[x].drop_duplicates()]
        positions = np.array([ticks.index(str(v)) for v in table[x]], dtype=np.float64)
    stat2, label2 = (("sim_time_s", "chip time (s)") if second == "time" else ("energy_j", "chip energy (J)"))
    fig, axes = _new_figure(1, 2, (11, 4.8))
    acc_ax, other_ax = axes[0]
    groups = table.groupby(lines, dropna=False, sort=False) if lines else [((), table)]
    for values, group in groups:
        values = values if isinstance(values, tuple) else (values,)
        label = " / ".join(_plain_cell(v) for v in values) if lines else "mean over seeds"
        order = np.argsort(positions[group.index], kind="stable")
        index = group.index[order]
        xs = positions[index]
        for ax, stat in ((acc_ax, "final_test_accuracy"), (other_ax, stat2)):
            mean = table.loc[index, f"{stat}_mean"].to_numpy(np.float64) if f"{stat}_mean" in table else \
                np.full(len(index), np.nan)
            std = table.loc[index, f"{stat}_std"].to_numpy(np.float64) if f"{stat}_std" in table else \
                np.full(len(index), np.nan)
            # one seed has no spread: no bar (a zero-length bar), never a made-up one
            ax.errorbar(xs, mean, yerr=np.nan_to_num(std, nan=0.0), marker="o", capsize=3, label=label)
    xlabel = x if x is not None else ""
    for ax in (acc_ax, other_ax):
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
        elif numeric and len(positions) and np.all(positions > 0) and positions.max() >= 100 * positions.min():
            ax.set_xscale("log")
    acc_ax.set_ylabel("final test accuracy (fraction)")
    other_ax.set_ylabel(label2)
    values2 = table.get(f"{stat2}_mean", pd.Series(dtype=float)).to_numpy(np.float64)
    if np.any(np.isfinite(values2)) and np.all(values2[np.isfinite(values2)] > 0) and second == "time":
        other_ax.set_yscale("log")
    _not_measured(other_ax, values2)
    acc_ax.legend(title=" / ".join(lines) if lines else None)
    acc_ax.set_title("final test accuracy, mean ± sample std over seeds", fontsize="medium")
    other_ax.set_title(f"{'time' if second == 'time' else 'energy'} of the chip for the whole run", fontsize="medium")
    fig.suptitle(_sweep_title(frame, folder))
    return fig


# ---- figures of tables (studies) ------------------------------------------------------------------------------

def _mean_std(table: pd.DataFrame, stat: str, index) -> tuple[np.ndarray, np.ndarray]:
    mean = table.loc[index, f"{stat}_mean"].to_numpy(np.float64)
    std = table.loc[index, f"{stat}_std"].to_numpy(np.float64) if f"{stat}_std" in table else \
        np.full(len(index), np.nan)
    return mean, np.nan_to_num(std, nan=0.0)   # one seed has no spread: no bar, never a made-up one


def _save(fig, out: str | os.PathLike | None):
    if out is not None:
        target = _figure_path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"Date": None} if target.suffix.lower() in (".svg", ".pdf") else None
        fig.savefig(target, dpi=120, metadata=metadata)
    return fig


def plot_means(table: pd.DataFrame, x: str, stats: Sequence[str], *, lines: str | None = None,
               panels: str | None = None, ylabels: Sequence[str] | None = None, logy: Sequence[str] = (),
               title: str = "", out: str | os.PathLike | None = None):
    """Means ± standard deviations of a ``summary_table``-like frame (``<stat>_mean``, ``<stat>_std``) against
    the numeric column ``x``: one row of panels per statistic, one column per value of ``panels`` (e.g. the
    kind of variation), one line per value of ``lines`` (e.g. the method), in the order they appear. Returns
    the Figure, saved to ``out`` if given. For studies whose comparison is not one sweep's axes (``plot``)."""
    panel_values = list(dict.fromkeys(table[panels])) if panels else [None]
    line_values = list(dict.fromkeys(table[lines])) if lines else [None]
    fig, axes = _new_figure(len(stats), len(panel_values), (4.6 * len(panel_values) + 1, 3.4 * len(stats)))
    for r, stat in enumerate(stats):
        for c, pv in enumerate(panel_values):
            ax = axes[r, c]
            part = table if pv is None else table[table[panels] == pv]
            for lv in line_values:
                group = part if lv is None else part[part[lines] == lv]
                if group.empty:
                    continue
                group = group.sort_values(x, kind="stable")
                mean, std = _mean_std(table, stat, group.index)
                ax.errorbar(group[x].to_numpy(np.float64), mean, yerr=std, marker="o", capsize=3,
                            label=None if lv is None else str(lv))
            ax.set_xlabel(x)
            ax.set_ylabel(ylabels[r] if ylabels else stat)
            ax.grid(True, alpha=0.3)
            if stat in logy:
                ax.set_yscale("log")
            if pv is not None and r == 0:
                ax.set_title(f"{panels} = {pv}", fontsize="medium")
    if lines:
        axes[0, 0].legend(fontsize="small")
    if title:
        fig.suptitle(_wrap(title))
    return _save(fig, out)


def plot_bars(table: pd.DataFrame, x: str, stats: Sequence[str], *, ylabels: Sequence[str] | None = None,
              logy: Sequence[str] = (), title: str = "", out: str | os.PathLike | None = None):
    """One panel of bars per statistic of a ``summary_table``-like frame: a bar per row (labelled by ``x``,
    in the frame's order) at ``<stat>_mean`` with ``<stat>_std`` as its error bar. Returns the Figure, saved to
    ``out`` if given."""
    labels = [str(v) for v in table[x]]
    fig, axes = _new_figure(len(stats), 1, (max(6.0, 0.7 * len(labels) + 2), 2.8 * len(stats) + 0.6))
    positions = np.arange(len(labels))
    for r, stat in enumerate(stats):
        ax = axes[r, 0]
        mean, std = _mean_std(table, stat, table.index)
        ax.bar(positions, mean, yerr=std, capsize=3, color="C0", alpha=0.8)
        ax.set_ylabel(ylabels[r] if ylabels else stat)
        ax.grid(True, axis="y", alpha=0.3)
        if stat in logy:
            ax.set_yscale("log")
        ax.set_xticks(positions, labels if r == len(stats) - 1 else [""] * len(labels),
                      rotation=30 if r == len(stats) - 1 else 0, ha="right")
    if title:
        fig.suptitle(_wrap(title))
    return _save(fig, out)


__all__ = ["DONE", "FORMATS", "STATISTICS", "SUMMARY_FIELDS", "InputError", "events_frame", "export", "plot",
           "plot_bars", "plot_means", "runs_frame", "summary_lines", "summary_table", "sweep_axes", "sweep_frame",
           "swept_keys", "traces_frame"]


# ---- general figures the studies draw (docs/studies/) ---------------------------------------------------------

def plot_lines(frame: pd.DataFrame, x: str, y: str, *, group: str | None = None, std: str | None = None,
               panel: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
               title: str | None = None, logx: bool = False, logy: bool = False,
               hlines: dict[str, float] | None = None, columns: int | None = None,
               out: str | os.PathLike | None = None):
    """Lines of ``y`` against ``x`` from a table of means, one line per value of ``group`` (the same colour in
    every panel), error bars from the column ``std`` (NaN: no bar), one panel per value of ``panel``, at most
    ``columns`` panels a row. ``hlines``: labelled horizontal reference lines drawn in every panel (a paper's
    figure, a target). Returns the figure; saves it to ``out`` (.png, .svg, .pdf) if given. A table without
    the columns is an InputError naming them."""
    missing = [c for c in (x, y, group, std, panel) if c is not None and c not in frame.columns]
    if missing:
        raise InputError(title or "table", f"no column {', '.join(map(repr, missing))}", field="columns")
    panels = list(dict.fromkeys(frame[panel])) if panel else [None]
    cols = min(len(panels), columns or len(panels))
    rows_n = -(-len(panels) // cols)
    fig, grid = _new_figure(rows_n, cols, (4.6 * cols + 0.8, 4.2 * rows_n))
    axes = list(grid.flat)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    every = list(dict.fromkeys(frame[group])) if group else [None]
    colours = {g: f"C{i % 10}" for i, g in enumerate(every)}
    for ax, value in zip(axes, panels, strict=False):
        part = frame if value is None else frame[frame[panel] == value]
        groups = list(dict.fromkeys(part[group])) if group else [None]
        for g in groups:
            rows = part if g is None else part[part[group] == g]
            rows = rows.sort_values(x, kind="stable")
            yerr = None
            if std is not None:
                yerr = np.nan_to_num(rows[std].to_numpy(np.float64), nan=0.0)
            ax.errorbar(rows[x].to_numpy(), rows[y].to_numpy(np.float64), yerr=yerr, marker="o", capsize=3,
                        color=colours[g], label=None if g is None else _plain_cell(g))
        for label, level in (hlines or {}).items():
            ax.axhline(level, color="0.4", linestyle="--", linewidth=1)
            ax.annotate(label, (0.01, level), xycoords=("axes fraction", "data"), fontsize="small", color="0.3",
                        va="bottom")
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
        ax.grid(True, alpha=0.3)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if value is not None:
            ax.set_title(f"{panel} = {_plain_cell(value)}", fontsize="medium")
        if group:
            ax.legend(title=group, fontsize="small")
    if title:
        fig.suptitle(_wrap(title))
    return _save(fig, out)


def plot_histogram_curves(panels: Sequence[dict[str, Any]], *, xlabel: str = "x", curve_label: str = "curve",
                          logy: bool = True, title: str | None = None, out: str | os.PathLike | None = None):
    """One panel per entry: a histogram (``edges``, ``counts``: a distribution, drawn as a density) and, on a
    second y axis, curves over the same x (``curves``: label -> (x, y)); ``title`` of the panel. Shows where a
    distribution lies against a function of x, e.g. the inputs neurons see against an approximation's
    error there."""
    if not panels:
        raise InputError(title or "figure", "no panel to draw", field="panels")
    fig, axes = _new_figure(1, len(panels), (4.6 * len(panels) + 0.8, 4.2))
    for ax, p in zip(axes[0], panels, strict=True):
        edges = np.asarray(p["edges"], dtype=np.float64)
        counts = np.asarray(p["counts"], dtype=np.float64)
        widths = np.diff(edges)
        density = counts / max(counts.sum(), 1.0) / widths
        ax.bar(edges[:-1], density, width=widths, align="edge", color="0.8", edgecolor="0.6", linewidth=0.3,
               label="distribution")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        twin = ax.twinx()
        for label, (cx, cy) in p.get("curves", {}).items():
            twin.plot(np.asarray(cx), np.asarray(cy), label=label)
        twin.set_ylabel(curve_label)
        if logy:
            twin.set_yscale("log")
        if p.get("title"):
            ax.set_title(str(p["title"]), fontsize="medium")
        if p.get("curves"):
            twin.legend(fontsize="x-small", loc="upper right")
    if title:
        fig.suptitle(_wrap(title))
    return _save(fig, out)


__all__ = ["DONE", "FORMATS", "STATISTICS", "SUMMARY_FIELDS", "InputError", "events_frame", "export", "plot",
           "plot_histogram_curves", "plot_means", "runs_frame", "summary_lines", "summary_table", "sweep_axes",
           "sweep_frame", "swept_keys", "traces_frame"]
