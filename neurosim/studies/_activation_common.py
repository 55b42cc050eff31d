"""What the three activation studies (chen2020_taylor, pwl2023, hue2019_activations) share: where their
scenario files are, the size a run asks for, and writing a table as markdown and CSV side by side."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurosim.studies import SIZES, check_size, scenario_path, sweep_folder
from neurosim.studies import write_table as _write_table

__all__ = ["SIZES", "begin", "cell", "check_size", "mean_std", "run_points", "say", "scenario_path", "write_table"]


def mean_std(values: Sequence[float] | np.ndarray | pd.Series) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof 1; NaN for one value) and count of the finite values."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan, len(x)


def cell(mean: float, std: float, fmt: str = ".3f") -> str:
    """'mean ± std' (or just the mean with one value, '-' with none)."""
    if not math.isfinite(mean):
        return "-"
    return format(mean, fmt) + ("" if not math.isfinite(std) else " ± " + format(std, fmt))


def write_table(frame: pd.DataFrame, out: Path, stem: str, title: str = "", notes: Sequence[str] = ()
                ) -> list[Path]:
    """``neurosim.studies.write_table`` with the title and notes as positional arguments."""
    return _write_table(frame, out, stem, title=title, notes=notes)


def say(log: Callable[[str], None] | None) -> Callable[[str], None]:
    return log if log is not None else (lambda line: None)


def run_points(out: Path, name: str, scenario: str, size: str, sets: Any, grid: Any, seeds: int | None,
               workers: int | None, progress: bool, log: Callable[[str], None]) -> tuple[Any, Path, Any]:
    """A study's sweep of ``scenario`` at ``size`` into ``sweep_folder(out, name, size)`` (sizes never share a
    folder; a rerun resumes). Failed points are logged, not raised: a diverged run is a result these studies
    tabulate. Size 'ci' runs in this process unless ``workers`` says otherwise. Returns (plan, folder, result)."""
    from neurosim.sweep import plan, run_sweep

    if size == "ci" and workers is None:
        workers = 0
    folder = sweep_folder(out, name, size)
    the_plan = plan(scenario_path(scenario), grid=grid or None, seeds=seeds, sets=sets)
    result = run_sweep(the_plan, folder, workers=workers, progress=progress, log=log)
    if result.failed:
        log(f"{len(result.failed)} point(s) failed: " + "; ".join(f"{k}: {v}" for k, v in result.failed.items()))
    return the_plan, folder, result


def begin(out: str | Path, size: str, log: Callable[[str], None] | None) -> tuple[Path, Callable[[str], None]]:
    """What every activation study's ``run`` does first: check the size, make the output folder, and a
    logger that is silent for ``log=None``."""
    check_size(size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, say(log)
