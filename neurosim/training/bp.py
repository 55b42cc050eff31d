"""Hardware back-propagation: the forward through the non-ideal chip, errors back through derivative circuits
and a transposed read (or the controller's digital model of the weights), updates as pulses."""

from __future__ import annotations

import torch

from neurosim.layers import AnalogLayer, AnalogNetwork
from neurosim.training.base import Trainer, cost_per_sample


def bp_gradients(network: AnalogNetwork, x: torch.Tensor, y: torch.Tensor, cost: str,
                 layers: list[AnalogLayer]) -> float:
    """Gradients of the mean cost for ``layers`` (into ``weight.grad``); other layers are left alone and the
    error stops below the lowest of ``layers``, as the chip's backward pass would."""
    chosen = {id(layer) for layer in layers}
    for layer in network.analog_layers:
        layer.weight.requires_grad_(id(layer) in chosen)
        layer.weight.grad = None
    loss = cost_per_sample(network(x, mode="bp"), y, cost).mean()
    loss.backward()
    return float(loss.detach())


class BPTrainer(Trainer):
    """Every layer trained by hardware BP."""

    scheme = "bp"

    def layer_schemes(self, epoch: int) -> dict[str, str]:
        return {layer.name: "bp" for layer in self.network.analog_layers}
