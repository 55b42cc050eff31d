"""Comparisons of HDF5 run files that the run and sweep tests share: bit for bit, timestamps aside."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np

from neurosim.store import read_tree

# What differs between two runs of the same scenario by design: when, how often resumed, how long on the wall.
VARIES = {"created_utc", "finished_utc", "resumed", "wall_time_s"}


def tree(path: Path) -> dict:
    with h5py.File(path) as f:
        return read_tree(f)


def differences(a, b, where: str = "") -> list[str]:
    """Every dataset and attribute that is not bit for bit the same (NaN equals NaN), besides VARIES."""
    if isinstance(a, dict):
        out = [f"{where}/{k}: in one file only" for k in set(a) ^ set(b) if k.lstrip("@") not in VARIES]
        for k in set(a) & set(b):
            if k.lstrip("@") not in VARIES:
                out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, float) and isinstance(b, float):
        same = a == b or (math.isnan(a) and math.isnan(b))
    else:
        same = a == b
    return [] if same else [where]
