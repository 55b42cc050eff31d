"""neurosim: a simulator of neuromorphic analog hardware trained on-chip."""

__version__ = "0.1.0"
