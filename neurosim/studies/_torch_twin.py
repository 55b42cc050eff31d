"""A plain-torch twin of an analog network: the same layers, initial weights, data order, dropout masks and
update rule, with none of the chip (no conductances, converters, input or weight clipping, pulses).

Why: the activation study (hue2019_activations) sets the chip beside "the same network in plain torch"; only
a twin that starts where the chip starts and sees the same batches tells the chip's own effect apart from
seed-to-seed spread. The twin trains as the chip's controller does: momentum v = m·v + g, w -= lr·v on the
batch-mean cost, and a PReLU slope by plain SGD (``Trainer.update_activations``)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from neurosim.activation import exact
from neurosim.layers import AnalogConv2d, AnalogLayer, AnalogLinear, AnalogNetwork, StepDropout
from neurosim.training.cost import cost_per_sample


class Activation(nn.Module):
    """The exact function of a neuron circuit; PReLU keeps its one trainable slope per layer, as the chip does."""

    def __init__(self, function: str, alpha: float):
        super().__init__()
        self.function, self.alpha = function, float(alpha)
        self.slope = nn.Parameter(torch.tensor([alpha])) if function == "prelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return exact(self.function, x, self.slope if self.slope is not None else self.alpha)


class _StraightThroughClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low, high):
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class InputClip(nn.Module):
    """The chip's input driver (DAC) saturating at its full scale: inputs beyond [low, high] are clipped.
    ``backward='straight_through'`` passes the error unchanged, as the chip's BP does (its outer product and
    transposed read know nothing of the clip); ``'true'`` zeroes it where the input was clipped (autograd)."""

    def __init__(self, low: float, high: float, backward: str):
        super().__init__()
        if backward not in ("straight_through", "true"):
            raise ValueError(f"backward must be 'straight_through' or 'true', got {backward!r}")
        self.low, self.high, self.backward = float(low), float(high), backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backward == "true":
            return x.clamp(self.low, self.high)
        return _StraightThroughClamp.apply(x, self.low, self.high)


def _linear_of(layer: AnalogLayer) -> nn.Module:
    """The torch layer holding what the chip's conductances hold now (bias row times the bias input)."""
    w = layer.crossbar.weights().detach().to(torch.float32).cpu()
    bias = w[-1] * layer.crossbar.config.input_max if layer.has_bias else None
    w = w[:-1] if layer.has_bias else w
    if isinstance(layer, AnalogConv2d):
        m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                      padding=layer.padding, bias=layer.has_bias)
        m.weight.data.copy_(w.T.reshape(m.weight.shape))
    elif isinstance(layer, AnalogLinear):
        m = nn.Linear(w.shape[0], w.shape[1], bias=layer.has_bias)
        m.weight.data.copy_(w.T)
    else:  # pragma: no cover - every analog layer is one of the two
        raise TypeError(f"{layer.name}: no torch twin for {type(layer).__name__}")
    if bias is not None:
        m.bias.data.copy_(bias)
    return m


def twin(network: AnalogNetwork, input_clip: str = "none") -> nn.Sequential:
    """The analog network as plain torch modules, weights as the chip holds them now. Dropout stages are
    copies of the chip's, their generators at the same state: the same masks, step by step. ``input_clip``:
    'none' (plain torch), or the chip's input saturation before every layer (``InputClip``) with the error
    passed 'straight_through' (as the chip's BP) or by the 'true' gradient: a diagnostic of what the clip
    alone does."""
    if input_clip not in ("none", "straight_through", "true"):
        raise ValueError(f"input_clip must be 'none', 'straight_through' or 'true', got {input_clip!r}")
    stages: list[nn.Module] = []
    for stage in network.stages:
        if isinstance(stage, AnalogLayer):
            if input_clip != "none":
                c = stage.crossbar.config
                stages.append(InputClip(0.0 if c.input_range == "unipolar" else -c.input_max, c.input_max,
                                        input_clip))
            stages.append(_linear_of(stage))
            unit = stage.activation
            stages.append(Activation(unit.config.function, unit.config.alpha))
        elif isinstance(stage, StepDropout):
            copy = StepDropout(stage.p, stage.channels, name=stage.name)
            copy.generator.set_state(stage.generator.get_state())
            stages.append(copy)
        else:
            stages.append(stage)
    return nn.Sequential(*stages)


def _parameters(model: nn.Sequential) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    slopes = [m.slope for m in model if isinstance(m, Activation) and m.slope is not None]
    ids = {id(p) for p in slopes}
    return [p for p in model.parameters() if id(p) not in ids], slopes


def evaluate(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Test accuracy (eval mode: no dropout)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / max(1, len(x))


def train(model: nn.Sequential, data: Any, shuffle: torch.Generator, epochs: int, *, batch_size: int,
          learning_rate: float, momentum: float, cost: str = "cross_entropy", eval_batch_size: int = 512,
          on_epoch=None) -> list[dict[str, Any]]:
    """Train the twin as the chip's controller trains the chip: the batches of ``shuffle`` (the trainer's
    shuffle generator, at the state the chip's training starts from), the batch-mean cost, momentum in the
    update. Returns one row per epoch (train loss, test accuracy, wall time of the epoch's training)."""
    weights, slopes = _parameters(model)
    velocity: dict[int, torch.Tensor] = {}
    rows = []
    model.train()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(data.x_train), generator=shuffle)
        losses = []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = cost_per_sample(model(data.x_train[idx]), data.y_train[idx], cost).mean()
            grads = torch.autograd.grad(loss, weights + slopes)
            with torch.no_grad():
                for p, g in zip(weights, grads[: len(weights)], strict=True):
                    v = velocity.get(id(p))
                    v = g if v is None or momentum == 0 else momentum * v + g
                    velocity[id(p)] = v
                    p -= learning_rate * v
                for p, g in zip(slopes, grads[len(weights):], strict=True):
                    p -= learning_rate * g
            losses.append(float(loss.detach()))
        wall = time.perf_counter() - start
        row = {"epoch": epoch, "train_loss": sum(losses) / max(1, len(losses)),
               "test_accuracy": evaluate(model, data.x_test, data.y_test, eval_batch_size), "wall_time_s": wall}
        rows.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return rows
