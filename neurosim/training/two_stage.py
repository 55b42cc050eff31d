"""Two-stage training (Chen and Liang, ISOCC 2020): stage 1 trains the weights with the stage-1 activations;
stage 2 switches every hidden neuron circuit to a Taylor polynomial with per-layer trainable coefficients
(initialized from the series of the stage-1 function) and trains the coefficients, and optionally the weights.
Both stages are recorded, each epoch row tagged with its stage.

The weights are trained by ``stage1_scheme`` in both stages; the coefficients by BP or by perturbation
(``coefficient_gradient``, see ``training.coefficients``), so a DGC chip without derivative circuits trains
them too. Every stage-2 step measures on one chip state and under one dropout mask: coefficient gradients
first, then the weights' gradients, then both are updated."""

from __future__ import annotations

from typing import Any

from neurosim.config import ConfigError
from neurosim.training.base import Trainer
from neurosim.training.coefficients import (
    check_derivative_circuits,
    coefficient_method,
    evaluations_per_sample,
    perturbation_gradients,
    taylor_layers,
)


class TwoStageTrainer(Trainer):
    scheme = "two_stage"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            self.config.two_stage.validate()  # a config made in code, not by build, is refused here
        except ConfigError as e:
            raise e.within("trainer.two_stage") from None
        check_derivative_circuits(self.network, self.config)
        self.stage = 1
        self.coefficient_method = coefficient_method(self.config)

    def layer_schemes(self, epoch: int) -> dict[str, str]:
        return {layer.name: self.config.two_stage.stage1_scheme for layer in self.network.analog_layers}

    # -- stage 2: coefficient gradients, measured on the step's chip state and under its one dropout mask ------
    def _joint_bp(self) -> bool:
        """BP weights with BP coefficients: one backward pass serves both."""
        ts = self.config.two_stage
        return ts.train_weights and ts.stage1_scheme == "bp" and self.coefficient_method == "bp"

    def _coefficient_gradients(self, x, y) -> float:
        """The coefficients' gradients into ``p.grad`` (not in the joint BP pass); returns the cost measured."""
        layers = taylor_layers(self.network)
        if not layers or self._joint_bp():
            return 0.0
        if self.coefficient_method == "perturbation":
            ts = self.config.two_stage
            grads, cost, _ = perturbation_gradients(self.network, x, y, self.config.cost,
                                                    ts.coefficient_perturbation, self.config.dgc.difference)
            for layer in layers:
                layer.activation.coefficients.grad = grads[layer.name]
            return cost
        return super().bp_gradients(x, y, [])  # a BP pass for the coefficients alone

    def bp_gradients(self, x, y, layers):
        """Stage 2: the coefficients first (unless they come with this pass), then BP of the weights."""
        if self.stage == 1 or self._joint_bp():
            return super().bp_gradients(x, y, layers)
        self._coefficient_gradients(x, y)
        params = [p for layer in taylor_layers(self.network) for p in layer.activation.trainable_parameters()]
        for p in params:  # their gradients are in hand: the weights' pass must not add BP's to them
            p.requires_grad_(False)
        try:
            return super().bp_gradients(x, y, layers)
        finally:
            for p in params:
                p.requires_grad_(True)

    def dgc_gradients(self, layers, x, y):
        """Stage 2: the coefficients first, on the chip state before any weight is perturbed, then DGC."""
        if self.stage == 2:
            self._coefficient_gradients(x, y)
        return super().dgc_gradients(layers, x, y)

    def step(self, x, y, schemes):
        if self.stage == 1:
            return (yield from super().step(x, y, schemes))
        eng = self.engine
        batch = len(x)
        all_layers, layers = self.network.analog_layers, taylor_layers(self.network)
        # The coefficients' operations, booked first (their count does not depend on what they measure); the
        # measurement itself runs inside the weights' step, under the step's one dropout mask.
        if layers and self.coefficient_method == "perturbation":
            for _ in range(self._measurements()):  # coefficients set, a forward pass of the batch, reset
                yield eng.forward(batch)
        elif layers and not self._joint_bp():
            yield eng.forward(batch)
            lowest = min(all_layers.index(layer) for layer in layers)
            above = [layer.name for layer in all_layers[lowest + 1:]]
            if above:  # errors down to the lowest Taylor layer's output
                yield eng.backward(batch, above, transposed=self.config.bp.backward == "transposed_read")
        if layers and self.coefficient_method == "bp":
            # g_k = Σ δ·u^k in the controller: a running power and a multiply-accumulate per term and neuron
            for layer in layers:
                yield eng.digital(layer.name, 2 * layer.activation.config.terms * batch
                                  * evaluations_per_sample(layer))
        if self.config.two_stage.train_weights:
            return (yield from super().step(x, y, schemes))  # coefficients measured, weights, then both updated
        with self.network.one_mask_per_step():
            loss = self._coefficient_gradients(x, y)
        self.update_activations()
        if eng.enabled:  # conductances keep drifting on the chip's clock
            for layer in all_layers:
                layer.crossbar.set_time(eng.env.now)
        return float(loss)

    def _measurements(self) -> int:
        """Cost measurements of one perturbation step: the base, then each coefficient (twice if central)."""
        signs = 2 if self.config.dgc.difference == "central" else 1
        return 1 + signs * sum(layer.activation.config.terms for layer in taylor_layers(self.network))

    def switch_to_taylor(self) -> None:
        """Stage 2: hidden neuron circuits become trainable Taylor polynomials of the stage-1 function."""
        ts = self.config.two_stage
        layers = self.network.analog_layers
        for layer in layers[:-1]:
            # The same circuits (mismatch kept), now realizing a Taylor polynomial of the stage-1 function.
            layer.activation.set_mode("taylor", terms=ts.terms, train_coefficients=True)
            layer.activation_config = layer.activation.config
        self.activation_lr = ts.coefficient_lr

    def fit(self) -> list[dict[str, Any]]:
        ts = self.config.two_stage
        self.stage = 1
        rows = self.run_epochs(ts.stage1_epochs, stage="stage1")
        self.switch_to_taylor()
        self.stage = 2
        rows += self.run_epochs(ts.stage2_epochs, stage="stage2")
        return rows
