"""On-chip training schemes sharing one Trainer: BP, DGC, hybrid and two-stage."""

from __future__ import annotations

from neurosim.training.base import Trainer, make_engine
from neurosim.training.coefficients import check_derivative_circuits, needs_derivative_circuits
from neurosim.training.config import BPConfig, DGCConfig, HybridConfig, TrainerConfig, TwoStageConfig
from neurosim.training.cost import accuracy, cost_per_sample, noise_free
from neurosim.training.schemes import BPTrainer, DGCTrainer, HybridTrainer
from neurosim.training.two_stage import TwoStageTrainer

TRAINERS = {"bp": BPTrainer, "dgc": DGCTrainer, "hybrid": HybridTrainer, "two_stage": TwoStageTrainer}


def make_trainer(network, data, config: TrainerConfig, **kwargs) -> Trainer:
    """The trainer of ``config.scheme``. Refuses (ConfigError) a scheme that reads derivative circuits on a
    network built without them; build networks with ``needs_derivative_circuits(config)``."""
    check_derivative_circuits(network, config)
    return TRAINERS[config.scheme](network, data, config, **kwargs)


__all__ = ["TRAINERS", "BPConfig", "BPTrainer", "DGCConfig", "DGCTrainer", "HybridConfig", "HybridTrainer",
           "Trainer", "TrainerConfig", "TwoStageConfig", "TwoStageTrainer", "accuracy", "cost_per_sample",
           "make_engine", "make_trainer", "needs_derivative_circuits", "noise_free"]
