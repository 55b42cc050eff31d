"""Two-stage training (Chen and Liang, ISOCC 2020): stage 1 trains the weights with the stage-1 activations;
stage 2 switches every hidden neuron circuit to a Taylor polynomial with per-layer trainable coefficients
(initialized from the series of the stage-1 function) and trains the coefficients, and optionally the weights.
Both stages are recorded, each epoch row tagged with its stage.

The weights are trained by ``stage1_scheme`` in both stages; the coefficients by BP or by perturbation
(``coefficient_gradient``, see ``training.coefficients``), so a DGC chip without derivative circuits trains
them too. Every stage-2 step measures on one chip state: coefficient gradients first, then the weights'
gradients, then both are updated."""

from __future__ import annotations

from typing import Any

from neurosim.config import ConfigError
from neurosim.training.base import Trainer
from neurosim.training.bp import bp_gradients
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

    def bp_gradients(self, x, y, layers):
        """BP of the weights; the coefficients' gradients come along only when BP is their method."""
        params = [p for layer in taylor_layers(self.network) for p in layer.activation.trainable_parameters()]
        if self.stage == 1 or self.coefficient_method == "bp":
            return bp_gradients(self.network, x, y, self.config.cost, layers)
        for p in params:
            p.requires_grad_(False)
        try:
            return bp_gradients(self.network, x, y, self.config.cost, layers)
        finally:
            for p in params:
                p.requires_grad_(True)

    def step(self, x, y, schemes):
        if self.stage == 1:
            return (yield from super().step(x, y, schemes))
        ts, eng = self.config.two_stage, self.engine
        batch = len(x)
        all_layers, layers = self.network.analog_layers, taylor_layers(self.network)
        joint_bp = ts.train_weights and ts.stage1_scheme == "bp" and self.coefficient_method == "bp"
        loss = 0.0
        if not layers:
            pass  # a network without hidden neuron circuits: no coefficients to measure
        elif self.coefficient_method == "perturbation":
            grads, loss, passes = perturbation_gradients(self.network, x, y, self.config.cost,
                                                         ts.coefficient_perturbation, self.config.dgc.difference)
            for layer in layers:
                layer.activation.coefficients.grad = grads[layer.name]
            for _ in range(passes):  # each measurement: coefficients set, a forward pass of the batch, reset
                yield eng.forward(batch)
        elif not joint_bp:
            # A BP pass for the coefficients alone: forward, errors down to the lowest Taylor layer's output.
            loss = bp_gradients(self.network, x, y, self.config.cost, [])
            yield eng.forward(batch)
            lowest = min((all_layers.index(layer) for layer in layers), default=len(all_layers))
            above = [layer.name for layer in all_layers[lowest + 1:]]
            if above:
                yield eng.backward(batch, above, transposed=self.config.bp.backward != "digital_model")
            yield from self._bill_bp_coefficients(batch, layers)
        if ts.train_weights:
            # The weights' gradients on the same chip state, their update, then the coefficients' update.
            loss = yield from super().step(x, y, schemes)
            if joint_bp:  # the coefficients' gradients came with the weights' BP pass
                yield from self._bill_bp_coefficients(batch, layers)
            return loss
        self.update_activations()
        if eng.enabled:  # conductances keep drifting on the chip's clock
            for layer in all_layers:
                layer.crossbar.set_time(eng.env.now)
        return float(loss)

    def _bill_bp_coefficients(self, batch: int, layers):
        """g_k = Σ δ·u^k in the controller: a running power and a multiply-accumulate per term and neuron."""
        for layer in layers:
            yield self.engine.digital(layer.name, 2 * layer.activation.config.terms * batch
                                      * evaluations_per_sample(layer))

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
