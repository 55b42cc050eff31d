"""Hardware back-propagation: the forward through the non-ideal chip, errors back through derivative circuits
and a transposed read (or the controller's digital model of the weights), updates as pulses."""

from __future__ import annotations

import torch

from neurosim.layers import AnalogLayer, AnalogNetwork
from neurosim.training.cost import cost_per_sample, mean_cost_and_gradient, noise_free


def bp_gradients(network: AnalogNetwork, x: torch.Tensor, y: torch.Tensor, cost: str,
                 layers: list[AnalogLayer]) -> float:
    """Gradients of the mean cost for ``layers`` (into ``weight.grad``; trainable neuron-circuit coefficients
    into theirs); other layers are left alone and the error stops below the lowest layer that needs it, as the
    chip's backward pass would.

    The chip's backward pass is run stage by stage (``AnalogLayer.forward_bp``/``backward_bp``), not by
    autograd: the same arithmetic and random draws as ``network(x, mode="bp")`` followed by
    ``loss.backward()`` -- the same gradients, bit for bit (tested) -- at a fraction of the bookkeeping.
    Digital stages (pooling, dropout, flatten) are differentiated by autograd, each on its own."""
    chosen = {id(layer) for layer in layers}
    stages = list(network.stages)
    for layer in network.analog_layers:
        layer.weight.grad = None
    # The lowest stage whose error anyone needs: a chosen layer, or a neuron circuit with trainable coefficients.
    wants = [i for i, s in enumerate(stages) if isinstance(s, AnalogLayer)
             and (id(s) in chosen or any(p.requires_grad for p in s.activation.trainable_parameters()))]
    lowest = min(wants, default=len(stages))
    with torch.no_grad():   # the stages' own no_grad() then costs nothing; digital ones enable_grad themselves
        return _stages(stages, chosen, lowest, x, y, cost)


def _stages(stages: list, chosen: set[int], lowest: int, x: torch.Tensor, y: torch.Tensor, cost: str) -> float:
    """``bp_gradients``' forward, cost and backward through the stages (under no_grad)."""
    saved: list = []
    h = x
    for i, stage in enumerate(stages):
        if isinstance(stage, AnalogLayer):
            h, keep = stage.forward_bp(h)
        elif i > lowest:  # errors must pass back through this digital stage: keep its graph
            inp = h.detach().requires_grad_(True)
            with torch.enable_grad():
                h = stage(inp)
            keep = (inp, h)
        else:
            with torch.no_grad():
                h = stage(h)
            keep = None
        saved.append(keep)
    loss, grad = mean_cost_and_gradient(h.detach(), y, cost)
    for i in range(len(stages) - 1, lowest - 1, -1):
        stage, keep = stages[i], saved[i]
        if isinstance(stage, AnalogLayer):
            grad = stage.backward_bp(keep, grad, weight_grad=id(stage) in chosen, input_grad=i > lowest)
        else:
            inp, h = keep
            (grad,) = torch.autograd.grad(h, inp, grad)
    return loss


def true_gradients(network: AnalogNetwork, x: torch.Tensor, y: torch.Tensor, cost: str,
                   layers: list[AnalogLayer]) -> float:
    """The true gradient of the non-ideal chip: autograd through its noise-free forward (the conductances it
    really holds, drift, converters passed straight through, neuron circuits with their gain and offset
    mismatch), into ``weight.grad`` of ``layers`` and ``p.grad`` of trainable neuron-circuit coefficients.
    Not what any chip computes: the reference that hardware BP and DGC are compared against."""
    for layer in network.analog_layers:
        layer.weight.grad = None
    leaves = {layer.name: layer.crossbar.weights().detach().clone().requires_grad_(True) for layer in layers}
    params = [p for layer in network.analog_layers for p in layer.activation.trainable_parameters()
              if p.requires_grad]
    with noise_free(network), torch.enable_grad():
        loss = cost_per_sample(network(x, mode="linearized", weights=leaves), y, cost).mean()
        grads = torch.autograd.grad(loss, [*leaves.values(), *params], allow_unused=True)
    for layer, g in zip(layers, grads, strict=False):
        layer.weight.grad = g
    for p, g in zip(params, grads[len(leaves):], strict=True):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    return float(loss.detach())
