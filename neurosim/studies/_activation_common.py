"""What the three activation studies (chen2020_taylor, pwl2023, hue2019_activations) share: where their
scenario files are, the size a run asks for, and writing a table as markdown and CSV side by side."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neurosim.studies import SIZES, check_size, scenario_path
from neurosim.studies import write_table as _write_table

__all__ = ["SIZES", "cell", "check_size", "mean_std", "say", "scenario_path", "write_table"]


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
