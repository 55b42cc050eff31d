"""Sweeps: one scenario, a grid of settings and seeds; one run file per point and a summary table of all points.

``plan(scenario, grid=..., seeds=...)`` expands the grid (the scenario's ``[sweep]`` table, with command-line
axes added or replacing the table's) into points, each a full scenario: ``apply_sets(base, values | {"seed":
s})`` with the ``[sweep]`` table taken out, so a point is exactly the run ``neurosim run`` makes of it.
``run_sweep(plan, DIR)`` runs the points that are not finished yet and keeps the folder valid at every moment:

    DIR/sweep.toml          the resolved base scenario with the grid it ran (written first; a rerun compares)
    DIR/points/<name>.h5    one run file per point (neurosim.store); <name>.h5.partial while unfinished
    DIR/summary.h5, .csv    one row per finished point, rewritten atomically after every point

Executors: serial (this process), local processes (``concurrent.futures``, spawn) and Dask
(``dask.distributed``, which the issue asks for: a LocalCluster neurosim starts, or an existing cluster at a
scheduler address). Serial and processes run a point straight into DIR/points, where the runner's own atomic
commits make a killed point resume from its last epoch. Dask workers may share no file system with the client:
a worker runs its point into a scratch folder of its own machine and sends the finished file's bytes back, and
the client writes it atomically. A worker that dies costs its point only: Dask (or the process executor here)
runs it again, from the worker's scratch checkpoint where the retry lands on the same machine.

Every point is a full run of its own scenario, seeded from its own seed: the numbers do not depend on the
executor, the order or the number of workers (bit for bit on CPU; tested).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from neurosim import __version__
from neurosim.config import ConfigError, get_path, parse_literal, toml_value
from neurosim.scenario import Scenario, SweepConfig, apply_sets, load_scenario, loads_scenario
from neurosim.store import RunFile, RunFileError

#: Seconds to wait for a Dask scheduler to answer before giving up (``--scheduler``).
SCHEDULER_TIMEOUT_S = 10.0
#: Runs of one point whose worker died before the point is given up (processes; Dask has its own setting,
#: ``distributed.scheduler.allowed-failures``).
MAX_ATTEMPTS = 3
# Dask settings for the LocalCluster neurosim starts: a point is one long task, so the worker's statistical
# profiler (a stack sample every 10 ms, in the process that runs the point) and the frequent system monitor
# only take time from it; nobody looks at their output here.
LOCAL_WORKER_CONFIG = {"distributed.worker.profile.enabled": False,
                       "distributed.admin.system-monitor.interval": "2s"}
WORKER_STOP_S = 0.5   # grace before our own idle workers are killed at the end
EXECUTORS = ("dask", "processes")

POINTS = "points"
SUMMARY_H5 = "summary.h5"
SUMMARY_CSV = "summary.csv"
SWEEP_TOML = "sweep.toml"

#: The summary's columns after the axes and the seed: (name, numpy type, unit, meaning).
METRIC_COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("final_test_accuracy", "f8", "1", "test accuracy after the last epoch"),
    ("best_test_accuracy", "f8", "1", "highest test accuracy of any epoch"),
    ("final_train_loss", "f8", "", "mean training cost of the last epoch"),
    ("sim_time_s", "f8", "s", "the chip's clock at the end of training (NaN with training.clock = false)"),
    ("energy_j", "f8", "J", "the chip's energy over the whole training (NaN with training.clock = false)"),
    ("pulses", "f8", "pulses", "programming pulses over the whole training (NaN with training.clock = false)"),
    ("perturbations", "f8", "cycles", "DGC perturb-measure-restore cycles (NaN with training.clock = false)"),
    ("epochs", "i8", "", "epochs trained"),
    ("wall_time_s", "f8", "s", "wall-clock time of the point's epochs on the computer that ran it"),
)


class SweepError(ConfigError):
    """A sweep folder that cannot take this sweep (another sweep's, a file in the way): one line naming it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__("", None, reason, str(path))

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


# ---- the plan --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One run of the sweep: its file name (without .h5), the swept values as its scenario holds them, the
    seed, and the scenario itself."""

    name: str
    values: dict[str, Any]
    seed: int
    scenario: Scenario = field(repr=False, compare=False)


@dataclass(frozen=True)
class Plan:
    """A sweep before it runs: the resolved base scenario (its ``sweep`` table the grid that runs), the axes
    (grid keys, sorted) and the points in order (axes as nested loops, the first outermost, seeds innermost)."""

    base: Scenario
    axes: tuple[str, ...]
    points: tuple[Point, ...]
    source: str | None = None

    @property
    def identity(self) -> str:
        """What makes two sweeps the same: the base scenario with its grid and seeds (workers aside)."""
        return _without_workers(self.base).fingerprint()


def _without_workers(scenario: Scenario) -> Scenario:
    return dataclasses.replace(scenario, sweep=dataclasses.replace(scenario.sweep, workers=0))


def split_values(text: str) -> list[str]:
    """``0,0.1,[16, 8],"a,b"`` -> the TOML literals between the commas that are not inside brackets, braces
    or quotes."""
    out, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
        i += 1
    out.append(text[start:])
    return [p.strip() for p in out if p.strip()]


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["variation=0,0.1", "training.scheme=bp,dgc"]`` -> ``{"variation": [0, 0.1], ...}``; each value a
    TOML literal (a bare word is a string)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--grid", item, "must be KEY=V1,V2,... (e.g. variation=0,0.1,0.3)")
        if key in grid:
            raise ConfigError(f"--grid {key}", text, "given twice")
        grid[key] = [parse_literal(v) for v in split_values(text)]
    return grid


def _blame(e: ConfigError, cli: set[str], source: str | None) -> ConfigError:
    """An error in the sweep table named as the user wrote it: ``--grid KEY`` for a command-line axis."""
    for key in cli:
        if e.field == f"sweep.grid.{key}":
            return ConfigError(f"--grid {key}", e.value, e.reason)
    if e.field.startswith("sweep.seeds") and "seeds" in cli:
        return ConfigError("--seeds", e.value, e.reason)
    return e if e.source else e.within("", source)


def _value(scenario: Scenario, key: str) -> Any:
    """An axis' value as the scenario holds it (a link's value, else the field's: normalized, 0 -> 0.0)."""
    if key in scenario.links:
        return scenario.links[key].value
    return get_path(scenario, key)


def plan(scenario: Scenario | str | os.PathLike, *, grid: Mapping[str, Sequence[Any]] | None = None,
         seeds: int | None = None, sets: Mapping[str, Any] | None = None) -> Plan:
    """The points of a sweep. ``scenario``: a scenario file (its ``[sweep]`` table gives the default grid,
    linked keys and seeds) or a ``Scenario``. ``grid``: axes that replace the table's axis of the same key or
    are added to it. ``seeds``: replaces ``sweep.seeds``. ``sets``: overrides of the base scenario.

    Every point's scenario is built here, so a bad grid (an unknown key, an empty list, a value of the wrong
    type, a combination the scenario refuses) is a ConfigError before anything runs."""
    source, folder = None, None
    cli = set(grid or {})
    if isinstance(scenario, str | os.PathLike):
        source = str(scenario)
        folder = Path(scenario).expanduser().resolve().parent
        base = load_scenario(scenario, dict(sets) if sets else None)
    else:
        base = apply_sets(scenario, dict(sets)) if sets else scenario
    changes: dict[str, Any] = {}
    if grid:
        for key, values in grid.items():
            if not isinstance(values, list | tuple):
                raise ConfigError(f"--grid {key}", values, "must be a list of values")
        changes["sweep.grid"] = {**base.sweep.grid, **{k: list(v) for k, v in grid.items()}}
    if seeds is not None:
        changes["sweep.seeds"] = seeds
        cli.add("seeds")
    if changes:
        try:
            base = apply_sets(base, changes, base=folder, source=source)
        except ConfigError as e:
            raise _blame(e, cli, source) from None
    config = base.sweep
    if not config.grid and config.seeds == 1:
        raise ConfigError("sweep.grid", {}, "no axis to sweep: give --grid KEY=V1,V2,... or --seeds N, or a "
                          "[sweep] table with a grid", source)

    axes = tuple(config.grid)
    # groups of keys that advance together: each linked group, and every other key alone; in key order
    grouped = {k for g in config.linked for k in g}
    groups = sorted([tuple(sorted(g)) for g in config.linked] + [(k,) for k in axes if k not in grouped],
                    key=lambda g: axes.index(g[0]))
    bare = dataclasses.replace(base, sweep=SweepConfig())
    points, seen = [], {}
    for combo in itertools.product(*[range(len(config.grid[g[0]])) for g in groups]):
        written = {k: config.grid[k][i] for g, i in zip(groups, combo, strict=True) for k in g}
        for s in range(config.seeds):
            seed = base.seed + s
            try:
                scenario_s = apply_sets(bare, {**written, "seed": seed}, base=folder, source=source)
            except ConfigError as e:
                raise _point_error(e, written, cli, source) from None
            values = {k: _value(scenario_s, k) for k in axes}
            key = json.dumps([_jsonable(values[k]) for k in axes] + [seed])
            if key in seen:
                raise ConfigError("sweep.grid", {k: config.grid[k] for k in axes}, "gives the point "
                                  f"{_describe(values, seed)} twice (two values of an axis are the same setting)",
                                  source)
            seen[key] = True
            points.append((values, seed, scenario_s))
    names = _names(axes, [(v, s) for v, s, _ in points])
    return Plan(base, axes, tuple(Point(n, v, s, sc) for n, (v, s, sc) in zip(names, points, strict=True)), source)


def _point_error(e: ConfigError, written: dict[str, Any], cli: set[str], source: str | None) -> ConfigError:
    """A point the scenario refuses: named by the axis whose value is at fault where that is clear."""
    for key, value in written.items():
        if e.field in (key, f"links.{key}.value") or e.field.startswith(key + "."):
            where = f"--grid {key}" if key in cli else f"sweep.grid.{key}"
            reason = e.reason if e.field in (key, f"links.{key}.value") else f"{e.field} = {e.value!r}: {e.reason}"
            return ConfigError(where, value, reason, None if key in cli else source)
    point = ", ".join(f"{k}={toml_value(v)}" for k, v in written.items())
    return ConfigError(e.field, e.value, f"{e.reason} (in the point {point})", e.source or source)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _describe(values: Mapping[str, Any], seed: int) -> str:
    return ", ".join([f"{k}={toml_value(v)}" for k, v in values.items()] + [f"seed={seed}"])


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
MAX_NAME = 150   # characters of a point's file name before it is shortened (file systems allow 255 bytes)


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return toml_value(value)
    if isinstance(value, str):
        return value or "empty"
    if isinstance(value, tuple | list):
        return "-".join(_label(v) for v in value) if value else "empty"
    return toml_value(value)


def _names(axes: Sequence[str], points: Sequence[tuple[dict[str, Any], int]]) -> list[str]:
    """File names of the points (without .h5): ``<key>=<value>_..._seed=<s>``, a key shortened to its last
    part where that is unique among the axes; characters outside ``A-Za-z0-9._+=-`` become '-'. Names that
    still collide (also when told apart by case only: some file systems do not) or are too long get a hash of
    the exact values."""
    last = [a.rsplit(".", 1)[-1] for a in axes]
    short = {a: s if last.count(s) == 1 and s != "seed" else a for a, s in zip(axes, last, strict=True)}
    names = []
    for values, seed in points:
        parts = [f"{short[k]}={_label(values[k])}" for k in axes] + [f"seed={seed}"]
        names.append(_UNSAFE.sub("-", "_".join(parts)).strip("."))
    counts: dict[str, int] = {}
    for n in names:
        counts[n.lower()] = counts.get(n.lower(), 0) + 1
    out = []
    for n, (values, seed) in zip(names, points, strict=True):
        if counts[n.lower()] > 1 or len(n) > MAX_NAME:
            digest = hashlib.sha256(json.dumps([_jsonable([values[k] for k in axes]), seed]).encode()).hexdigest()
            n = f"{n[:MAX_NAME - 9]}-{digest[:8]}"
        out.append(n)
    return out


# ---- the folder ------------------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(path: Path) -> None:
    with contextlib.suppress(OSError):   # not every system opens folders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """Write ``path`` through ``PATH.tmp``: filled, flushed to disk, renamed over it (a crash leaves the old
    version whole)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fill(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync_folder(path.parent)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: data}


def _differences(here: Scenario, there: Scenario) -> list[str]:
    a = _flatten(dataclasses.asdict(_without_workers(here)))
    b = _flatten(dataclasses.asdict(_without_workers(there)))
    keys = sorted(set(a) | set(b), key=lambda k: (not k.startswith("sweep."), k))
    return [f"{k} = {_short(a.get(k))} here, {_short(b.get(k))} there" for k in keys if a.get(k) != b.get(k)]


def _short(value: Any) -> str:
    text = "(none)" if value is None else toml_value(_jsonable(value)) if not isinstance(value, dict) else \
        json.dumps(_jsonable(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _check_folder(folder: Path, plan: Plan) -> None:
    """Whether ``folder`` can take this sweep: absent, empty, or a folder of this same sweep (its sweep.toml
    holds the same base scenario, grid and seeds). Anything else is refused, never mixed or overwritten."""
    stored = folder / SWEEP_TOML
    if stored.exists():
        try:
            there = loads_scenario(stored.read_text(encoding="utf-8"), source=str(stored))
        except ConfigError as e:
            raise SweepError(stored, f"cannot be read as a sweep ({e}); choose another folder (-o) or remove "
                             "it") from None
        if _without_workers(there).fingerprint() != plan.identity:
            diffs = _differences(plan.base, there)
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise SweepError(folder, f"holds another sweep ({shown or 'another scenario'}): a summary of two "
                             "sweeps would mix them; choose another folder (-o) or remove it")
        return
    if folder.exists() and not folder.is_dir():
        raise SweepError(folder, "is a file, not a sweep folder; choose another folder (-o)")
    if folder.exists() and any(p.name != ".lock" for p in folder.iterdir()):
        raise SweepError(folder, f"exists, is not empty and holds no {SWEEP_TOML}: not a sweep folder; choose "
                         "another folder (-o) or remove it")


def _claim(folder: Path, plan: Plan) -> None:
    """Make ``folder`` this sweep's (under the lock: checked again, then sweep.toml written first)."""
    _check_folder(folder, plan)
    (folder / POINTS).mkdir(parents=True, exist_ok=True)
    if not (folder / SWEEP_TOML).exists():
        _write_atomic(folder / SWEEP_TOML, lambda p: p.write_text(plan.base.to_toml(), encoding="utf-8"))


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """One sweep at a time writes a folder (an advisory lock, released by the system if the process dies)."""
    try:
        import fcntl
    except ImportError:   # Windows: no lock
        yield
        return
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(folder, "another neurosim sweep is writing to this folder now") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---- the summary -----------------------------------------------------------------------------------------------

def point_row(point: Point, path: Path) -> dict[str, Any]:
    """A finished point's summary row, read from its run file."""
    m = RunFile(path).metrics

    def last(key: str) -> float:
        column = m.get(key)
        return float(column[-1]) if column is not None and len(column) else math.nan

    acc = m.get("test_accuracy")
    wall = m.get("wall_time_s")
    row: dict[str, Any] = {"point": path.name, **point.values, "seed": point.seed}
    row.update(final_test_accuracy=last("test_accuracy"),
               best_test_accuracy=float(np.max(acc)) if acc is not None and len(acc) else math.nan,
               final_train_loss=last("train_loss"), sim_time_s=last("sim_time_s"), energy_j=last("energy_j"),
               pulses=last("pulses"), perturbations=last("perturbations"),
               epochs=len(m.get("epoch", ())),
               wall_time_s=float(np.sum(wall)) if wall is not None and len(wall) else math.nan, status="done")
    return row


def _axis_kind(values: Sequence[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "int"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "float"
    if all(isinstance(v, str) for v in values):
        return "str"
    return "toml"


def _axis_text(value: Any, kind: str) -> str:
    return value if kind == "str" else toml_value(value)


def summary_columns(plan: Plan) -> list[tuple[str, Any]]:
    """(column, numpy dtype) of the summary table: point, the axes, seed, the metrics, status. Text columns
    are fixed-length UTF-8 bytes as wide as the longest value any point of the plan gives them."""
    def width(texts: Sequence[str]) -> str:
        return f"S{max([1, *(len(t.encode()) for t in texts)])}"

    cols: list[tuple[str, Any]] = [("point", width([p.name + ".h5" for p in plan.points]))]
    for key in plan.axes:
        values = [p.values[key] for p in plan.points]
        kind = _axis_kind(values)
        dtype = {"bool": "?", "int": "i8", "float": "f8"}.get(kind) or width([_axis_text(v, kind) for v in values])
        cols.append((key, dtype))
    cols.append(("seed", "i8"))
    cols += [(name, dtype) for name, dtype, _, _ in METRIC_COLUMNS]
    cols.append(("status", "S8"))
    return cols


def _cell(value: Any, dtype: str, kind: str | None) -> Any:
    if kind is not None and kind not in ("bool", "int", "float"):
        return _axis_text(value, kind).encode()
    if isinstance(value, str):
        return value.encode()
    return value


def write_summary(folder: Path, plan: Plan, rows: Sequence[Mapping[str, Any]]) -> None:
    """summary.h5 (a compound dataset /summary and the sweep's settings as root attributes) and summary.csv
    (the same table), each written atomically."""
    cols = summary_columns(plan)
    kinds = {k: _axis_kind([p.values[k] for p in plan.points]) for k in plan.axes}
    table = np.zeros(len(rows), dtype=[(n, d) for n, d in cols])
    for i, row in enumerate(rows):
        table[i] = tuple(_cell(row[n], d, kinds.get(n)) for n, d in cols)
    config = plan.base.sweep
    grid = {k: [_jsonable(v) for v in _unique([p.values[k] for p in plan.points])] for k in plan.axes}
    attrs = {
        "neurosim_version": __version__, "format": 1, "base_scenario_toml": plan.base.to_toml(),
        "sweep_sha256": plan.identity, "grid_json": json.dumps(grid), "axes_json": json.dumps(list(plan.axes)),
        "linked_json": json.dumps([list(g) for g in config.linked]), "seeds": config.seeds,
        "seed_list": np.asarray(sorted({p.seed for p in plan.points}), dtype=np.int64),
        "points_total": len(plan.points), "points_done": len(rows), "complete": len(rows) == len(plan.points),
        "points_folder": POINTS,
    }
    units = {name: unit for name, _, unit, _ in METRIC_COLUMNS}
    docs = {name: doc for name, _, _, doc in METRIC_COLUMNS}

    def fill_h5(path: Path) -> None:
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("summary", data=table)
            ds.attrs["units_json"] = json.dumps(units)
            ds.attrs["doc_json"] = json.dumps(docs)
            for k, v in attrs.items():
                f.attrs[k] = v

    def fill_csv(path: Path) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([n for n, _ in cols])
        for row in rows:
            writer.writerow([_csv(row[n], kinds.get(n)) for n, _ in cols])
        path.write_text(buffer.getvalue(), encoding="utf-8")

    _write_atomic(folder / SUMMARY_H5, fill_h5)
    _write_atomic(folder / SUMMARY_CSV, fill_csv)


def _unique(values: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(type(v) is type(u) and v == u for u in out):
            out.append(v)
    return out


def _csv(value: Any, kind: str | None) -> str:
    if kind is not None and kind not in ("bool", "int", "float"):
        return _axis_text(value, kind)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def read_summary(folder: str | os.PathLike) -> np.ndarray:
    """The /summary table of a sweep folder (a structured array; text fields are bytes)."""
    with h5py.File(Path(folder) / SUMMARY_H5, "r") as f:
        return f["summary"][()]


# ---- running one point (in whatever process runs it) ----------------------------------------------------------

def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))


def run_point(task: Mapping[str, Any]) -> dict[str, Any]:
    """Run one point. ``task``: plain data (``name``, ``scenario_toml``, ``output`` or ``scratch``, ...), so
    that it travels to any worker. With ``output``, the point runs into that file (a shared file system);
    else into the worker's own scratch folder, resuming a checkpoint found there or the ``partial`` bytes the
    client sent, and the finished file's bytes are returned."""
    from neurosim.runner import run as run_scenario

    if task.get("tune"):   # a worker process neurosim started, and so owns (tune_allocator says why)
        from neurosim.backend import tune_allocator

        tune_allocator()
    if task.get("slots"):
        _set_threads(_cores() // max(1, _slots_here(task["slots"])))
    elif task.get("threads"):
        _set_threads(task["threads"])
    scenario = loads_scenario(task["scenario_toml"], source=f"sweep point {task['name']}")
    t0 = time.perf_counter()
    if task.get("output"):
        run_scenario(scenario, task["output"])
        return {"name": task["name"], "data": None, "seconds": time.perf_counter() - t0}
    scratch = Path(tempfile.gettempdir()) / "neurosim-sweep" / task["scratch"]
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"{task['name']}.h5"
    partial = out.with_name(out.name + ".partial")
    if task.get("partial") and not partial.exists() and not out.exists():
        _write_atomic(partial, lambda p: p.write_bytes(task["partial"]))
    try:
        run_scenario(scenario, out)
    except RunFileError:   # a scratch file left by another run of this name: start afresh
        for stale in (out, partial):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        run_scenario(scenario, out)
    data = out.read_bytes()
    out.unlink()
    return {"name": task["name"], "data": data, "seconds": time.perf_counter() - t0}


def _slots_here(slots: Mapping[str, int]) -> int:
    """Dask worker threads on this worker's machine (every worker there runs points at once)."""
    from urllib.parse import urlparse

    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return 1
    host = urlparse(worker.address).hostname or ""
    return int(slots.get(host, worker.state.nthreads))


def _init_process(threads: int) -> None:
    from neurosim.backend import tune_allocator

    tune_allocator()   # the process is ours
    _set_threads(threads)


# ---- executors -------------------------------------------------------------------------------------------------

class _Serial:
    """The points one after another in this process."""

    shared = True
    label = "in this process"

    def __init__(self) -> None:
        self.running = 0

    def run(self, tasks: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Any]]:
        for i, task in enumerate(tasks):
            self.running = 1
            try:
                result: Any = run_point(task)
            except Exception as e:   # the point fails, the sweep goes on
                result = e
            self.running = int(i + 1 < len(tasks))   # the next one starts as soon as this one is recorded
            yield task, result
        self.running = 0

    def close(self) -> None:
        pass


class _Processes:
    """Local worker processes (spawned: a fresh interpreter each), one point each at a time. A worker that
    dies breaks the pool: a new pool takes the points that were running, each up to MAX_ATTEMPTS times."""

    shared = True

    def __init__(self, workers: int):
        self.workers = workers
        self.threads = max(1, _cores() // workers)
        self.label = f"on {workers} local processes ({self.threads} torch thread{'s' * (self.threads > 1)} each)"
        self.running = 0
        self.pool = None

    def _pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_process, initargs=(self.threads,))

    def run(self, tasks: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Any]]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        todo = list(tasks)
        attempts: dict[str, int] = {}
        running: dict[Any, dict[str, Any]] = {}
        self.pool = self._pool()
        while todo or running:
            while todo and len(running) < self.workers:   # as many at once as there are workers
                try:
                    fut = self.pool.submit(run_point, todo[0])
                except BrokenProcessPool:   # a worker died since the last look: its futures say so below
                    break
                running[fut] = todo.pop(0)
            if not running:   # broken with nothing left running: a fresh pool
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = self._pool()
                continue
            self.running = len(running)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                done, _ = wait(running)   # a worker died: the pool is broken, every running point ends now
            broken = False
            for fut in done:
                task = running.pop(fut)
                error = fut.exception()
                if isinstance(error, BrokenProcessPool):
                    broken = True
                    attempts[task["name"]] = attempts.get(task["name"], 0) + 1
                    if attempts[task["name"]] < MAX_ATTEMPTS:
                        todo.insert(0, task)   # again, from its checkpoint
                        continue
                    error = RuntimeError(f"its worker process died {MAX_ATTEMPTS} times")
                self.running = min(self.workers, len(running) + len(todo))
                yield task, error if error is not None else fut.result()
            if broken:
                self.pool.shutdown(wait=True, cancel_futures=True)
                self.pool = self._pool()
        self.running = 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Dask:
    """Dask workers: a LocalCluster of ``workers`` processes started here, or the cluster at ``scheduler``
    (an address, or a ``distributed.Client``). Results travel back to this process (no shared file system
    needed); a worker that dies has its point run again by the scheduler."""

    shared = False

    def __init__(self, workers: int, scheduler: Any = None):
        import logging

        from distributed import Client, LocalCluster

        self.cluster, self.own_client = None, True
        if scheduler is not None and not isinstance(scheduler, str):
            self.client, self.own_client = scheduler, False
        elif scheduler is not None:
            try:
                _probe(scheduler, SCHEDULER_TIMEOUT_S)
                self.client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S, set_as_default=False)
            except (OSError, ValueError, TimeoutError) as e:
                reason = str(e) or f"no answer within {SCHEDULER_TIMEOUT_S:g} s"
                raise ConfigError("--scheduler", scheduler, f"no Dask scheduler answers there ({reason})") from None
        else:
            import dask

            with dask.config.set(LOCAL_WORKER_CONFIG):   # the nannies hand it to their workers
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, silence_logs=logging.ERROR)
            self.client = Client(self.cluster, set_as_default=False)
        info = self.client.scheduler_info()["workers"]
        self.slots: dict[str, int] = {}
        for w in info.values():
            self.slots[w["host"]] = self.slots.get(w["host"], 0) + int(w["nthreads"])
        total = sum(self.slots.values())
        where = f"{self.client.scheduler.address}" if scheduler is not None else "a local Dask cluster"
        self.label = f"on {len(info)} Dask worker{'s' * (len(info) != 1)} ({total} slot{'s' * (total != 1)}) " \
                     f"at {where}"
        self.capacity = max(1, total)
        self.running = 0

    def run(self, tasks: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Any]]:
        import uuid

        from distributed import as_completed

        futures = {}
        for task in tasks:
            task = {**task, "slots": self.slots, "tune": self.cluster is not None}
            fut = self.client.submit(run_point, task, key=f"neurosim-point-{task['name']}-{uuid.uuid4().hex[:8]}",
                                     pure=False)
            futures[fut] = task
        left = len(futures)
        self.running = min(left, self.capacity)
        try:
            for fut in as_completed(futures, loop=self.client.loop):
                task = futures[fut]
                try:
                    result: Any = fut.result()
                except Exception as e:   # the point's own error, or KilledWorker after repeated deaths
                    result = e
                left -= 1
                self.running = min(left, self.capacity)
                fut.release()
                yield task, result
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    def close(self) -> None:
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.sync(self._stop_workers)
        if self.own_client:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()

    async def _stop_workers(self) -> None:
        """Our own workers hold nothing once every result is here (or the sweep is abandoned): stop them with
        a short grace instead of Dask's polite close, which waits seconds for processes that have torch loaded."""
        import asyncio

        await asyncio.gather(*(w.close(timeout=WORKER_STOP_S) for w in self.cluster.workers.values()
                               if hasattr(w, "close")))


def _probe(address: str, timeout: float) -> None:
    """Connect to a Dask scheduler and wait for its handshake, ``timeout`` seconds at most: Client's own
    timeout covers the TCP connection only, and an endpoint that accepts and never speaks would hang it."""
    import asyncio
    import threading

    from distributed.comm import connect

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout), timeout)
        await comm.close()

    outcome: list[BaseException | None] = []

    def attempt() -> None:   # a thread of its own: the caller may be inside an event loop (a notebook)
        try:
            asyncio.run(handshake())
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if not outcome:
        raise TimeoutError(f"no answer within {timeout:g} s")
    if outcome[0] is not None:
        if isinstance(outcome[0], asyncio.TimeoutError | TimeoutError):
            raise TimeoutError(f"no answer within {timeout:g} s")
        raise outcome[0]


def _executor(workers: int, scheduler: Any, executor: str) -> Any:
    if executor not in EXECUTORS:
        raise ConfigError("--executor", executor, f"must be one of {', '.join(EXECUTORS)}")
    if scheduler is not None:
        if executor != "dask":
            raise ConfigError("--scheduler", scheduler, "needs the dask executor")
        return _Dask(0, scheduler)
    if workers < 0:
        raise ConfigError("--workers", workers, "must be >= 0 (0: one point after another in this process)")
    if workers == 0:
        return _Serial()
    if executor == "processes":
        return _Processes(workers)
    return _Dask(workers)


# ---- the sweep -------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """What a sweep did: its folder, the rows of its finished points, the points it ran now and those that
    failed (name -> one line)."""

    folder: Path
    plan: Plan
    rows: list[dict[str, Any]]
    ran: list[str]
    failed: dict[str, str]

    @property
    def complete(self) -> bool:
        return len(self.rows) == len(self.plan.points)


def _finished(point: Point, path: Path) -> bool:
    """Whether the point's file is there, finished; a file of another run there is refused."""
    from neurosim.runner import identity

    if not path.exists():
        return False
    try:
        file = RunFile(path)
    except RunFileError as e:
        raise SweepError(path, f"is in the way of a point of this sweep ({e.reason}); remove it") from None
    if not file.complete or file.attrs.get("scenario_sha256") != identity(point.scenario):
        raise SweepError(path, "holds another run than this sweep's point of that name; remove it")
    return True


def _deliver(folder: Path, task: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    """A result that travelled back: written to DIR/points atomically, after checking it is this point's
    finished run file; the client's unfinished partial of the point, if any, is removed."""
    from neurosim.runner import identity

    path = folder / POINTS / f"{task['name']}.h5"
    tmp = path.with_name(path.name + ".tmp")

    def fill(p: Path) -> None:
        p.write_bytes(result["data"])
        file = RunFile(p)
        if not file.complete or file.attrs.get("scenario_sha256") != identity(task["_point"].scenario):
            raise RunFileError(p, "the file a worker sent back is not this point's finished run")

    try:
        _write_atomic(path, fill)
    except RunFileError:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".partial").unlink()


def run_sweep(sweep: Plan | Scenario | str | os.PathLike, output: str | os.PathLike | None = None, *,
              grid: Mapping[str, Sequence[Any]] | None = None, seeds: int | None = None,
              sets: Mapping[str, Any] | None = None, workers: int | None = None, scheduler: Any = None,
              executor: str = "dask", progress: bool = False,
              log: Callable[[str], None] | None = None) -> SweepResult:
    """Run a sweep into the folder ``output`` (default: the scenario file's name, in the current folder).

    ``sweep``: a ``Plan``, or a scenario (file) with ``grid``, ``seeds``, ``sets`` as for ``plan``. Finished
    points are skipped (their files are not touched), unfinished ones resume from their checkpoints; a folder
    of another sweep is refused (``SweepError``). ``workers``: 0 runs the points here one after another, N runs
    them on N local Dask workers (``executor="processes"``: N local processes); default: the scenario's
    ``sweep.workers``. ``scheduler``: a Dask scheduler's address (or a ``distributed.Client``) to run on an
    existing cluster. ``progress``: a bar of points on stderr. A point that fails is reported in the result
    (``failed``); the others run on."""
    the_plan = sweep if isinstance(sweep, Plan) else plan(sweep, grid=grid, seeds=seeds, sets=sets)
    if output is None:
        stem = Path(the_plan.source).stem if the_plan.source else (the_plan.base.name or "sweep")
        output = Path(stem)
    folder = Path(output)
    say = log or (lambda line: None)
    workers = the_plan.base.sweep.workers if workers is None else workers
    _check_folder(folder, the_plan)   # read only: a refused folder or grid leaves nothing written
    run = _executor(workers, scheduler, executor)   # so does a scheduler that does not answer
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _lock(folder):
            _claim(folder, the_plan)
            return _run(folder, the_plan, run, progress, say)
    finally:
        run.close()


def _run(folder: Path, the_plan: Plan, run: Any, progress: bool, say: Callable[[str], None]) -> SweepResult:
    points_dir = folder / POINTS
    points_dir.mkdir(exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for point in the_plan.points:
        path = points_dir / f"{point.name}.h5"
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + ".tmp").unlink()   # a delivery that a kill interrupted
        if _finished(point, path):
            rows[point.name] = point_row(point, path)
        else:
            todo.append(point)
    order = {p.name: i for i, p in enumerate(the_plan.points)}

    def ordered() -> list[dict[str, Any]]:
        return [rows[n] for n in sorted(rows, key=order.__getitem__)]

    write_summary(folder, the_plan, ordered())
    total = len(the_plan.points)
    if rows:
        say(f"{folder}: {len(rows)} of {total} points done before, {len(todo)} to run")
    if todo:
        say(f"running {len(todo)} point{'s' * (len(todo) != 1)} {run.label}")
    # a worker's scratch files are this sweep's into this folder: a rerun finds them, another sweep does not
    scratch = hashlib.sha256(f"{the_plan.identity}\n{folder.resolve()}".encode()).hexdigest()[:16]
    tasks = []
    for point in todo:
        path = points_dir / f"{point.name}.h5"
        task: dict[str, Any] = {"name": point.name, "scenario_toml": point.scenario.to_toml(),
                                "scratch": scratch}
        if run.shared:
            task["output"] = str(path.resolve())
        else:
            partial = path.with_name(path.name + ".partial")
            if partial.exists():   # a checkpoint left here by an earlier run: the worker resumes from it
                task["partial"] = partial.read_bytes()
        tasks.append(task)
    by_name = {p.name: p for p in todo}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=len(rows), unit="point", desc="sweep", file=sys.stderr,
                   dynamic_ncols=True)
    failed: dict[str, str] = {}
    ran: list[str] = []

    def show(done: int = 0) -> None:
        if bar is not None:
            running = run.running if len(rows) + len(failed) < total else 0
            left = total - len(rows) - len(failed) - running
            postfix = {"running": running, "left": max(left, 0)}
            if failed:
                postfix["failed"] = len(failed)
            bar.set_postfix(postfix, refresh=not done)
            if done:
                bar.update(done)

    try:
        run.running = min(len(tasks), getattr(run, "capacity", getattr(run, "workers", 1)))
        show()
        for task, result in run.run(tasks):
            point = by_name[task["name"]]
            path = points_dir / f"{point.name}.h5"
            if not isinstance(result, BaseException):
                try:
                    if result.get("data") is not None:
                        _deliver(folder, {**task, "_point": point}, result)
                    rows[point.name] = point_row(point, path)
                except (ConfigError, OSError) as e:
                    result = e
            if isinstance(result, BaseException):
                failed[point.name] = _one_line(result)
                (bar.write if bar is not None else say)(f"point {point.name} failed: {failed[point.name]}")
            else:
                ran.append(point.name)
                write_summary(folder, the_plan, ordered())
            show(1)
    finally:
        if bar is not None:
            bar.close()
    return SweepResult(folder, the_plan, ordered(), ran, failed)


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


__all__ = ["EXECUTORS", "METRIC_COLUMNS", "Plan", "Point", "SweepError", "SweepResult", "parse_grid", "plan",
           "point_row", "read_summary", "run_point", "run_sweep", "split_values", "summary_columns",
           "write_summary"]
