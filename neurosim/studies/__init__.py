"""The source studies neurosim was designed from, each one command that regenerates its tables and figures.

A study is a module ``neurosim/studies/<name>.py``, found here by ``pkgutil`` (no hand-kept list; a module whose
name starts with ``_`` is a helper, not a study). It defines:

- ``NAME: str``: the command's name for it (``neurosim study NAME``), e.g. ``"kim2021_dgc"``;
- ``TITLE: str``: one line;
- ``PAPER: str``: the citation, with its DOI;
- ``SCENARIOS: list[str]``: the files under ``scenarios/studies/`` it uses (the tests validate each scenario
  and check every file, data files included, is installed);
- ``RUNTIME: dict[str, str]`` (optional): size -> measured wall time on 2 cores, e.g. ``{"default": "9 min"}``;
- ``run(out: Path, *, size: str = "default", workers: int | None = None, progress: bool = False, log=print)
  -> list[Path]``: writes its tables (markdown ``.md`` and ``.csv``) and figures (PNG) into ``out`` and returns
  their paths. ``size``: ``"ci"`` (a few steps, for the tests), ``"default"`` (about 10 minutes on 2 cores) or
  ``"full"``. Its sweeps run through ``neurosim.sweep.run_sweep`` into subfolders of ``out``
  (``sweep_folder``), so a rerun skips finished points and resumes unfinished ones.

The helpers below are what every study needs, so that the studies look alike: the installed scenario files
(``scenario_path``), a sweep folder per size, a sweep that fails loudly when a point failed (``sweep``), tables
written as markdown and CSV (``write_table``) and figures saved reproducibly (``save_figure``).
"""

from __future__ import annotations

import importlib
import math
import os
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from neurosim.config import ConfigError

SIZES = ("ci", "default", "full")
#: The attributes every study module defines (``RUNTIME`` is optional).
REQUIRED = ("NAME", "TITLE", "PAPER", "SCENARIOS", "run")


class StudyError(RuntimeError):
    """A study that could not finish (a point of its sweep failed): the points and their one-line reasons."""


def discover() -> dict[str, ModuleType]:
    """NAME -> module of every study in this package, sorted by name. A module that lacks one of the required
    attributes is an error of the package (a TypeError naming it), not a study to skip silently."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [a for a in REQUIRED if not hasattr(module, a)]
        if missing:
            raise TypeError(f"{module.__name__} is not a study: it lacks {', '.join(missing)}")
        if module.NAME in found:
            raise TypeError(f"{module.__name__}: study name {module.NAME!r} is taken by {found[module.NAME].__name__}")
        found[module.NAME] = module
    return dict(sorted(found.items()))


def get(name: str) -> ModuleType:
    """The study called ``name``; an unknown name is a ConfigError listing the studies."""
    studies = discover()
    if name not in studies:
        raise ConfigError("study", name, f"no such study; the studies are: {', '.join(studies) or '(none)'}")
    return studies[name]


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ConfigError("size", size, f"must be one of {', '.join(SIZES)}")
    return size


def runtime(module: ModuleType, size: str = "default") -> str:
    """The study's measured run time at ``size`` as it documents it, or '?'."""
    return str(getattr(module, "RUNTIME", {}).get(size, "?"))


def scenario_path(file: str) -> Path:
    """The installed ``scenarios/studies/<file>`` (package data of ``neurosim.scenarios``)."""
    from importlib import resources

    path = Path(str(resources.files("neurosim.scenarios") / "studies" / file))
    if not path.exists():
        raise ConfigError("scenario", file, f"not found in {path.parent}")
    return path


def sweep_folder(out: str | os.PathLike, name: str, size: str) -> Path:
    """Where a study's sweep ``name`` runs at ``size``: ``out/name`` for the default size, ``out/name.SIZE``
    otherwise, so that sizes never share (and refuse) a folder, and a rerun of one size resumes it."""
    check_size(size)
    return Path(out) / (name if size == "default" else f"{name}.{size}")


def sweep(scenario: str | os.PathLike, folder: str | os.PathLike, *, grid: Mapping[str, Sequence[Any]] | None = None,
          seeds: int | None = None, sets: Mapping[str, Any] | None = None, workers: int | None = None,
          progress: bool = False, log: Callable[[str], None] = print):
    """Run (or finish) one sweep of a study and return its summary frame (``neurosim.analysis.sweep_frame``).
    A point that failed is a StudyError after the others ran: a table of a study never silently lacks a point
    (rerun the study to try it again)."""
    from neurosim.analysis import sweep_frame
    from neurosim.sweep import run_sweep

    result = run_sweep(scenario, folder, grid=grid, seeds=seeds, sets=sets, workers=workers, progress=progress,
                       log=lambda line: log(f"{Path(folder).name}: {line}"))
    if result.failed:
        lines = "; ".join(f"{k}: {v}" for k, v in result.failed.items())
        raise StudyError(f"{folder}: {len(result.failed)} point(s) failed ({lines}); rerun to try them again")
    log(f"{Path(folder).name}: {len(result.rows)} points done ({len(result.ran)} run now)")
    return sweep_frame(folder)


# ---- tables -----------------------------------------------------------------------------------------------------

def mean_std(mean: float, std: float, fmt: str = ".3f", scale: float = 1.0) -> str:
    """``0.912 ± 0.011`` (``-`` for NaN; no ``±`` where the spread is unknown, e.g. one seed)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = format(mean * scale, fmt)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += " ± " + format(std * scale, fmt)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:g}"
    return str(value).replace("|", "\\|")


def markdown_table(frame) -> str:
    """A DataFrame as a GitHub markdown table (numbers right-aligned), without pandas' optional tabulate."""
    import pandas as pd

    columns = [str(c) for c in frame.columns]
    align = ["---:" if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
             else "---" for c in frame.columns]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |", "|" + "|".join(align) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def write_table(frame, out: str | os.PathLike, stem: str, *, title: str = "", notes: Sequence[str] = (),
                csv_frame=None) -> list[Path]:
    """``out/stem.md`` (a title, the table, notes below it) and ``out/stem.csv`` (``csv_frame`` where given,
    e.g. the unformatted numbers behind a table of ``mean ± std`` texts; else ``frame``). Returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / f"{stem}.md", out / f"{stem}.csv"
    text = (f"### {title}\n\n" if title else "") + markdown_table(frame) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    md.write_text(text, encoding="utf-8")
    (frame if csv_frame is None else csv_frame).to_csv(csv, index=False)
    return [md, csv]


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib Figure as PNG (the studies' figures), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


__all__ = ["REQUIRED", "SIZES", "StudyError", "check_size", "discover", "get", "markdown_table", "mean_std",
           "runtime", "save_figure", "scenario_path", "sweep", "sweep_folder", "write_table"]
