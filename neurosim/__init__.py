"""neurosim: a simulator of neuromorphic analog hardware trained on-chip.

``neurosim.run(scenario)`` runs an experiment into one HDF5 run file, ``neurosim.open_run(path)`` reads one,
``neurosim.load_chip(path)`` rebuilds the trained chip from one (docs/runs.md). They are imported on first
use, so that ``import neurosim.store`` (numpy and h5py only) does not pull in torch.
"""

__version__ = "0.1.0"

_LAZY = {"run": "neurosim.runner", "load_chip": "neurosim.runner", "open_run": "neurosim.store"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neurosim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["__version__", "load_chip", "open_run", "run"]
