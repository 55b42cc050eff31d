"""Two-stage training (Chen and Liang, ISOCC 2020): stage 1 trains the weights with the stage-1 activations;
stage 2 switches every hidden neuron circuit to a Taylor polynomial with per-layer trainable coefficients
(initialized from the series of the stage-1 function) and trains the coefficients, and optionally the weights.
Both stages are recorded, each epoch row tagged with its stage."""

from __future__ import annotations

from typing import Any

from neurosim.training.base import Trainer
from neurosim.training.bp import bp_gradients


class TwoStageTrainer(Trainer):
    scheme = "two_stage"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = 1

    def layer_schemes(self, epoch: int) -> dict[str, str]:
        return {layer.name: self.config.two_stage.stage1_scheme for layer in self.network.analog_layers}

    def bp_gradients(self, x, y, layers):
        if self.stage == 2 and not self.config.two_stage.train_weights:
            layers = []  # coefficients only: the error still flows, weights are left alone
        return bp_gradients(self.network, x, y, self.config.cost, layers)

    def update_layers(self, layers, grads):
        if self.stage == 2 and not self.config.two_stage.train_weights:
            for layer in layers:
                layer.weight.grad = None
            return [{"pulses": 0, "pulse_slots": 0} for _ in layers]
        return super().update_layers(layers, grads)

    def step(self, x, y, schemes):
        if self.stage == 2 and not self.config.two_stage.train_weights:
            # Coefficients are trained by BP through the derivative circuits even if stage 1 used DGC.
            schemes = {name: "bp" for name in schemes}
        return super().step(x, y, schemes)

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
