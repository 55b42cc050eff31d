"""The Trainer every scheme shares: batches, gradients per layer by that layer's scheme, updates as pulses,
and the hardware operations issued to the engine (one grouped event per operation, layer and step).

A scheme decides which layers get BP gradients and which get DGC gradients in an epoch
(``layer_schemes``); everything else -- the cost, momentum, programming through the device model, the clock,
the per-epoch metrics -- is here, once.
"""

from __future__ import annotations

import abc
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from neurosim.backend import make_generator
from neurosim.config import ConfigError
from neurosim.crossbar import program_deltas
from neurosim.data import Dataset
from neurosim.engine import Engine, HardwareTable, LayerFootprint
from neurosim.layers import AnalogLayer, AnalogNetwork
from neurosim.training.bp import bp_gradients, true_gradients
from neurosim.training.coefficients import coefficient_update
from neurosim.training.config import TrainerConfig
from neurosim.training.cost import accuracy
from neurosim.training.dgc import check_dgc, commit, dgc_linearized_layers, dgc_measure, perturbation_plan
from neurosim.training.dgc_envelope import check_linearized_validity

# An epoch whose weight updates fire fewer device pulses than this per weight and step programs (almost)
# nothing: the chip stays as initialized, whatever the card (NoProgrammingWarning).
MIN_PULSE_RATE = 1e-3


class NoProgrammingWarning(UserWarning):
    """An epoch's weight updates fired (almost) no programming pulses: the network is not being trained."""


def hardware_for(network: AnalogNetwork, hardware: HardwareTable | None = None) -> HardwareTable:
    """The hardware table with its unset pulse fields taken from the network's device card (pulse width,
    pulse voltages, conductance window; ``HardwareTable.resolve``). Layers on cards that would bill a pulse
    differently need the table to set the pulse fields: one engine bills one pulse."""
    table = hardware or HardwareTable()
    tables = []
    for layer in network.analog_layers:
        spec = layer.crossbar.spec
        resolved = table.resolve(spec.pulse_width, spec.pulse_voltage_ltp, spec.pulse_voltage_ltd, spec.g_min,
                                 spec.g_max)
        if tables and resolved != tables[0]:
            raise ConfigError("hardware.pulse_s", table.pulse_s, f"layer '{layer.name}' is on a card whose pulses "
                              "take another time or energy than the first layer's: set hardware.pulse_s and "
                              "hardware.pulse_j")
        tables.append(resolved)
    return tables[0] if tables else table.resolve()


def drifts(network: AnalogNetwork) -> bool:
    """Whether any device of the network drifts, so that its conductances depend on the chip's clock."""
    return any(layer.crossbar.spec.drift_nu > 0 for layer in network.analog_layers)


def make_engine(network: AnalogNetwork, hardware: HardwareTable | None = None, enabled: bool = True) -> Engine:
    """The engine of a network: pulse timing and energy from its card unless ``hardware`` sets them; the clock
    runs whenever a device drifts, recorded or not (``enabled``), so drift does not depend on the recording."""
    layers = [LayerFootprint(**layer.footprint()) for layer in network.analog_layers]
    return Engine(hardware_for(network, hardware), layers, enabled=enabled, keep_time=drifts(network))


class Trainer(abc.ABC):
    """Train an analog network on-chip. Subclasses choose the scheme of each layer per epoch."""

    scheme = "base"

    def __init__(self, network: AnalogNetwork, data: Dataset, config: TrainerConfig | None = None,
                 engine: Engine | None = None, hardware: HardwareTable | None = None, seed: int = 0,
                 log: Any = None):
        self.network = network
        self.data = data
        self.config = config or TrainerConfig()
        self.engine = engine or make_engine(network, hardware, self.config.clock)
        if not self.engine.timed and drifts(network):
            raise ConfigError("engine.keep_time", False, "the devices drift, so the chip's clock must run: "
                              "give the engine keep_time=True (or enabled=True), or use make_engine")
        self.seed = seed
        self.log = log
        device = network.analog_layers[0].crossbar.device
        self.generator = make_generator(seed, device, "trainer")
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.velocity: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.activation_lr = 0.0
        self._plans: dict = {}  # the DGC perturbation cycles of the current step, per layer (for the engine)
        if self.config.scheme != "bp":  # a scheme that may measure by DGC: refuse what cannot be measured
            check_dgc(network, self.config.dgc)
        self._programmed = [0, 0]   # this epoch: device pulses fired by weight updates, weights updated
        # Weight-update pulses per layer since the start (a run file's per-layer pulse trace).
        self.layer_pulses = {layer.name: 0 for layer in network.analog_layers}
        # Hooks of whoever drives the training (the runner: checkpoints, progress): called after every epoch
        # with its metrics row, and after every step with (steps done in the epoch, steps in the epoch).
        self.epoch_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self.step_callbacks: list[Callable[[int, int], None]] = []
        for layer in network.analog_layers:
            if self.config.bp.backward != "true_gradient":
                layer.backward_path = self.config.bp.backward

    # -- what a scheme decides ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def layer_schemes(self, epoch: int) -> dict[str, str]:
        """'bp' or 'dgc' for every analog layer in this epoch."""

    # -- gradients -------------------------------------------------------------------------------------------
    def bp_gradients(self, x: torch.Tensor, y: torch.Tensor, layers: list[AnalogLayer]) -> float:
        """Hardware BP for ``layers``: gradients land in each layer's ``weight.grad``; returns the cost."""
        if self.config.bp.backward == "true_gradient":
            return true_gradients(self.network, x, y, self.config.cost, layers)
        return bp_gradients(self.network, x, y, self.config.cost, layers)

    def dgc_gradients(self, layers: list[AnalogLayer], x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[dict[str, torch.Tensor], float]:
        """DGC gradients of ``layers`` and the measured base cost."""
        cfg = self.config
        if cfg.dgc.mode == "linearized":
            # The chip's perturbation cycles happen all the same: their real perturbations scale the gradients,
            # the engine bills them, and the pulse modes' restore errors stay in the devices.
            plans = {layer.name: perturbation_plan(layer, cfg.dgc) for layer in layers}
            grads, c0 = dgc_linearized_layers(self.network, layers, x, y, cfg.cost, cfg.dgc, self.generator, plans)
            for layer in layers:
                commit(layer, plans[layer.name])
            self._plans.update(plans)
            return grads, c0
        grads, c0 = {}, 0.0
        for layer in layers:  # in network order: each layer's measurements see what the ones below left
            m = dgc_measure(self.network, layer, x, y, cfg.cost, cfg.dgc)
            grads[layer.name], c0 = m.grad, m.cost
            self._plans[layer.name] = m.plan
        return grads, c0

    # -- one step ----------------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, schemes: dict[str, str]):
        """Gradients, updates and the hardware operations of one batch (a generator for the engine)."""
        eng, cfg = self.engine, self.config
        layers = self.network.analog_layers
        bp_layers = [layer for layer in layers if schemes[layer.name] == "bp"]
        dgc_layers = [layer for layer in layers if schemes[layer.name] == "dgc"]
        batch = len(x)
        grads: dict[str, torch.Tensor] = {}
        self._plans = {}
        with self.network.one_mask_per_step():  # the step's one dropout mask, whatever measures what
            if bp_layers:
                loss = self.bp_gradients(x, y, bp_layers)
                grads.update({layer.name: layer.weight.grad for layer in bp_layers})
            if dgc_layers:
                dgc_grads, c0 = self.dgc_gradients(dgc_layers, x, y)
                grads.update(dgc_grads)
                if not bp_layers:
                    loss = c0
        if not layers:
            return 0.0
        cost = float(loss)
        if not math.isfinite(cost):   # before any pulse: a diverged step would ask for unbounded pulse counts
            raise ConfigError("training.learning_rate", cfg.learning_rate,
                              f"training diverged: the cost of a batch is {cost} (epoch {self.epoch}); lower "
                              "the learning rate (or the momentum, or the initial weights' range)")
        # The hardware timeline of this step.
        yield eng.forward(batch)
        if bp_layers:
            # Errors travel down to the lowest BP layer; its own input error is needed by no one.
            lowest = min([layers.index(layer) for layer in bp_layers])
            names = [layer.name for layer in layers[lowest + 1:]]
            if names:
                yield eng.backward(batch, names, transposed=cfg.bp.backward == "transposed_read")
            ops = sum([batch * layer.reads_per_sample * layer.crossbar.in_features * layer.crossbar.out_features
                       for layer in bp_layers])
            yield eng.digital("outer_product", ops)
        for layer in dgc_layers:
            plan = self._plans[layer.name]
            yield eng.perturb(layer.name, plan.cycles, batch, plan.pulses, plan.pulse_slots, plan.cell_reads,
                              plan.bias_changes)
        stats = self.update_layers(layers, [grads[layer.name] for layer in layers])
        yield eng.parallel(*[eng.program(layer.name, s["pulses"], s["pulse_slots"])
                             for layer, s in zip(layers, stats, strict=True)])
        if eng.timed:  # conductances drift on the chip's own clock, recorded or not
            for layer in layers:
                layer.crossbar.set_time(eng.env.now)
        self.update_activations()
        return cost

    def update_layers(self, layers: list[AnalogLayer], grads: list[torch.Tensor]) -> list[dict[str, int]]:
        """Momentum in the controller, then the weight changes become pulses through the device model, all
        layers in one pass (``program_deltas``). Returns each layer's pulses and pulse slots."""
        m = self.config.momentum
        if m > 0:
            grads = [self._momentum(layer.name, grad, m) for layer, grad in zip(layers, grads, strict=True)]
        dws = [g.detach() if g.requires_grad else g for g in grads]
        stats = program_deltas([layer.crossbar for layer in layers], dws, scale=-self.config.learning_rate)
        self._programmed[0] += sum([s["pulses"] for s in stats])
        self._programmed[1] += sum([layer.crossbar.in_features * layer.crossbar.out_features for layer in layers])
        for layer, s in zip(layers, stats, strict=True):
            self.layer_pulses[layer.name] += s["pulses"]
        for layer in layers:
            layer.sync_believed()
            layer.weight.grad = None
        return stats

    def _momentum(self, name: str, grad: torch.Tensor, m: float) -> torch.Tensor:
        v = self.velocity.get(name)
        self.velocity[name] = v = grad if v is None else m * v + grad
        return v

    def update_activations(self) -> None:
        """Trainable neuron-circuit parameters, digitally: Taylor coefficients by the normalized step of
        ``training.coefficients`` (SGD in the circuit's units, averaged over the neurons sharing them), other
        parameters (PReLU slopes) by plain SGD."""
        lr = self.activation_lr or self.config.learning_rate
        for layer in self.network.analog_layers:
            unit = layer.activation
            for p in unit.trainable_parameters():
                if p.grad is not None and p.requires_grad:
                    taylor = unit.config.mode == "taylor" and p is unit.coefficients
                    with torch.no_grad():
                        p += coefficient_update(layer, p.grad, lr) if taylor else -lr * p.grad
                    p.grad = None

    # -- epochs --------------------------------------------------------------------------------------------------
    def check_linearized(self, epochs: int) -> None:
        """Linearized DGC is refused outside its measured validity envelope, before the run starts, for every
        layer that DGC trains in these epochs (on the first training batch; the random streams are left as
        they were, so a checked run equals an unchecked one)."""
        if self.config.dgc.mode != "linearized" or getattr(self, "_linearized_checked", False):
            return
        names = {name for e in range(self.epoch + 1, self.epoch + epochs + 1)
                 for name, s in self.layer_schemes(e).items() if s == "dgc"}
        layers = [layer for layer in self.network.analog_layers if layer.name in names]
        if layers:
            n = self.config.batch_size
            check_linearized_validity(self.network, layers, self.data.x_train[:n], self.data.y_train[:n],
                                      self.config.cost, self.config.dgc)
            self._linearized_checked = True

    def run_epochs(self, epochs: int, stage: str = "") -> list[dict[str, Any]]:
        """Train for ``epochs`` epochs; returns one metrics row per epoch."""
        data, cfg = self.data, self.config
        self.check_linearized(epochs)

        def process():
            for _ in range(epochs):
                self.epoch += 1
                start = time.perf_counter()
                schemes = self.layer_schemes(self.epoch)
                order = torch.randperm(len(data.x_train), generator=self.shuffle_generator)
                losses = []
                steps = -(-len(order) // cfg.batch_size)
                for i in range(0, len(order), cfg.batch_size):
                    idx = order[i:i + cfg.batch_size]
                    loss = yield from self.step(data.x_train[idx], data.y_train[idx], schemes)
                    losses.append(loss)
                    for callback in self.step_callbacks:
                        callback(len(losses), steps)
                wall = time.perf_counter() - start
                row = self.engine.mark_epoch(self.epoch)
                row.update({"epoch": self.epoch, "stage": stage, "train_loss": sum(losses) / max(1, len(losses)),
                            "test_accuracy": accuracy(self.network, data.x_test, data.y_test, cfg.eval_batch_size),
                            "wall_time_s": wall, "schemes": dict(schemes), "pulse_rate": self._pulse_rate()})
                self.history.append(row)
                if self.log:
                    self.log(row)
                for callback in self.epoch_callbacks:
                    callback(row)

        start_len = len(self.history)
        self.engine.start(process())
        return self.history[start_len:]

    def _pulse_rate(self) -> float:
        """Device pulses the epoch's weight updates fired per weight and step (NaN: no weight was updated);
        warns (NoProgrammingWarning) below MIN_PULSE_RATE. Counted here, so the clock need not run."""
        (pulses, updates), self._programmed = self._programmed, [0, 0]
        if not updates:
            return math.nan
        rate = pulses / updates
        if rate < MIN_PULSE_RATE:
            deterministic = any(layer.crossbar.config.rounding != "stochastic"
                                for layer in self.network.analog_layers)
            why = ("An update smaller than half a pulse's weight step (w_max·(1/P_ltp + 1/P_ltd) for a pair) "
                   "rounds to no pulse with crossbar.rounding = 'deterministic'; use 'stochastic' rounding, a "
                   "larger learning_rate or a smaller crossbar.w_max") if deterministic else (
                   "With stochastic rounding a weight fires with the probability of its update over one pulse's "
                   "weight step, so the updates are far below a step: use a larger learning_rate or a smaller "
                   "crossbar.w_max")
            warnings.warn(NoProgrammingWarning(
                f"epoch {self.epoch}: the weight updates fired {pulses} pulses, {rate:.1e} per weight and step "
                f"(below {MIN_PULSE_RATE:g}): the chip is barely trained. {why}"), stacklevel=3)
        return rate

    def fit(self) -> list[dict[str, Any]]:
        return self.run_epochs(self.config.epochs)
