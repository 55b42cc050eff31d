"""What the three activation studies (chen2020_taylor, pwl2023, hue2019_activations) share: where their
scenario files are, the size a run asks for, and writing a table as markdown and CSV side by side."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from neurosim.config import ConfigError

SIZES = ("ci", "default", "full")


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ConfigError("size", size, "must be one of " + ", ".join(SIZES))
    return size


def scenario_path(name: str) -> Path:
    """A study's scenario file, shipped in scenarios/studies/ (installed as neurosim.scenarios)."""
    path = Path(str(resources.files("neurosim.scenarios").joinpath("studies", name)))
    if not path.exists():
        raise ConfigError("scenario", name, f"not found at {path}: is neurosim installed with its scenarios?")
    return path


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
    """The table as ``stem.csv`` (the numbers) and ``stem.md`` (a markdown table, with a title and notes)."""
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{stem}.csv", out / f"{stem}.md"
    frame.to_csv(csv, index=False)
    header = [str(c) for c in frame.columns]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_text(v) for v in row) + " |")
    if notes:
        lines.append("")
        lines += list(notes)
    md.write_text("\n".join(lines) + "\n")
    return [md, csv]


def _text(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def say(log: Callable[[str], None] | None) -> Callable[[str], None]:
    return log if log is not None else (lambda line: None)
