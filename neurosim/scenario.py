"""The root settings object of an experiment: one TOML file describes a whole run (seed, runtime, data, device,
network, training, hardware table, traces, output), and one ``Scenario`` carries all of it.

This module is the one place that reads a scenario file: ``load_scenario(path, sets)`` parses it, applies
dotted ``--set`` overrides and named links, resolves the device card, checks across tables and returns a
validated, frozen ``Scenario``. ``Scenario.to_toml()`` writes the resolved scenario back (card contents
included), and loading that text gives an equal object. docs/scenarios.md documents every field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurosim.architectures import NetworkConfig
from neurosim.backend import derive_seed
from neurosim.config import ConfigError, build, load_toml, setting
from neurosim.data import DataConfig
from neurosim.device import DeviceSpec, load_card
from neurosim.engine import HardwareTable
from neurosim.training.config import TrainerConfig


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the numerics run (not part of the physics: results do not depend on it on CPU)."""

    device: str = setting("auto", "torch device: 'auto' (CUDA where present), 'cpu' or 'cuda[:N]'")
    threads: int = setting(0, "torch CPU threads (0: torch's default)", ge=0)


@dataclass(frozen=True)
class DeviceConfig:
    """Which synaptic device: a shipped card by name or a card file, plus field overrides."""

    card: str = setting("ideal", "a shipped card's name (`neurosim devices` lists them) or a card file's path "
                        "(relative to the scenario file)")
    overrides: dict = setting(default_factory=dict, doc="card fields set here instead of in the card "
                              "(e.g. {step_dtod = 0.05})")


@dataclass(frozen=True)
class TracesConfig:
    """What a run records besides its per-epoch metrics (the /traces group of the run file)."""

    histogram_bins: int = setting(64, "bins of each device array's conductance histogram per epoch (0: none)",
                                  ge=0)
    weight_epochs: tuple[int, ...] = setting((), "epochs whose weights are stored whole (compressed); -1: the "
                                             "last")
    coefficients: bool = setting(True, "store the neuron circuits' trainable coefficients per epoch")
    pulses: bool = setting(True, "store each layer's pulse count per epoch")


@dataclass(frozen=True)
class OutputConfig:
    """Where the run file goes and how often the chip is checkpointed."""

    path: str = setting("", "run file (default: the scenario file's name with .h5, in the current folder)")
    checkpoint: bool = setting(True, "keep the chip's state after every epoch, so an interrupted run resumes")


@dataclass(frozen=True)
class Scenario:
    """One experiment. Every table is a validated settings class; ``links`` name several fields set as one."""

    name: str = setting("", "a short name (titles of plots, summaries)")
    description: str = setting("", "one sentence on the experiment")
    seed: int = setting(0, "the one seed: the chip, the data split, the shuffle and the noise derive their own "
                        "independent streams from it", ge=0)
    runtime: RuntimeConfig = setting(default_factory=RuntimeConfig, doc="where the numerics run")
    data: DataConfig = setting(default_factory=DataConfig, doc="the data set")
    device: DeviceConfig = setting(default_factory=DeviceConfig, doc="the synaptic device")
    network: NetworkConfig = setting(default_factory=NetworkConfig, doc="the network on the chip")
    training: TrainerConfig = setting(default_factory=TrainerConfig, doc="on-chip training")
    hardware: HardwareTable = setting(default_factory=HardwareTable, doc="durations and energies of operations")
    traces: TracesConfig = setting(default_factory=TracesConfig, doc="what is recorded per epoch")
    output: OutputConfig = setting(default_factory=OutputConfig, doc="the run file")
    links: dict = setting(default_factory=dict, doc="named links: one key that sets several fields "
                          "(name = {fields = [...], value = ...})")

    def card(self) -> DeviceSpec:
        """The device card with the scenario's overrides applied (validated)."""
        from neurosim.config import with_overrides

        spec = load_card(self.device.card)
        return with_overrides(spec, self.device.overrides) if self.device.overrides else spec

    def stream(self, name: str) -> int:
        """The seed of one named stream ('chip', 'data', 'shuffle', 'noise', ...), derived from ``seed``."""
        return derive_seed(self.seed, name)


def load_scenario(path: str | Path, sets: dict[str, Any] | None = None) -> Scenario:
    """A scenario file as a validated Scenario; ``sets``: dotted overrides (``{"device.overrides.c2c": 0.02}``)."""
    data = load_toml(path)
    scenario = build(Scenario, data, source=str(path))
    if sets:
        from neurosim.config import with_overrides

        scenario = with_overrides(scenario, sets, source=str(path))
    try:
        scenario.card()
    except ConfigError as e:
        raise ConfigError(f"device.{e.field}" if e.field else "device.card", e.value, e.reason, str(path)) from None
    return scenario
