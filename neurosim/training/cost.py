"""What the controller measures: the cost of a batch from the chip's outputs, the chip without its
per-evaluation noise (for references and linearized models), and the test accuracy. Shared by every gradient
method and scheme, so none of them needs the others."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn

from neurosim.layers import AnalogNetwork
from neurosim.random_streams import NUMBA, _numba_kernels


def cost_per_sample(out: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The cost the controller computes digitally from the output ADC values, one value per sample.
    Cross-entropy as logsumexp − the target's output: the same value as torch's ``cross_entropy`` (to 1e-15 in
    float64), a quarter of its time on the (perturbations × batch, classes) outputs DGC's measurements hold."""
    if kind == "cross_entropy":
        return torch.logsumexp(out, 1) - out.gather(1, y[:, None]).squeeze(1)
    target = nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
    return 0.5 * ((out - target) ** 2).sum(1)


def mean_cost_and_gradient(out: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[float, torch.Tensor]:
    """The batch's mean cost (``cost_per_sample(out, y, kind).mean()``, as a float) and its gradient with
    respect to ``out``, in closed form, without autograd's graph.

    On the CPU (numba present, float32/float64 outputs) one kernel pass computes both in float64 and rounds
    once (neurosim._cost_numba: a dozen small torch operations cost 110-190 us inside a training step); its
    values are within the bound tests/test_training.py states of autograd's, the half squared error's gradient
    bit for bit. Elsewhere, and for outputs that are not finite, the torch operations below compute exactly
    autograd's numbers (tested bit for bit); they are also the kernel's oracle."""
    kernel = _cost_kernel(out, y)
    if kernel is not None:
        grad = torch.empty_like(out)
        o, labels, g = out.numpy(), y.numpy(), grad.numpy()
        if kind == "cross_entropy":
            loss = kernel.cross_entropy(o, labels, g)
        else:
            t = o.dtype.type
            loss = kernel.half_squared_error(o, labels, g, t(1.0), t(1.0) / t(len(o)))
        if math.isfinite(loss):
            return loss, grad
    loss, grad = _mean_cost_and_gradient_torch(out, y, kind)
    return loss.item(), grad


def _cost_kernel(out: torch.Tensor, y: torch.Tensor):
    """neurosim._cost_numba where it applies (contiguous float32/float64 (B, C) outputs and int64 labels on the
    CPU, outside autograd, numba present), else None."""
    if (out.device.type != "cpu" or out.dtype not in (torch.float32, torch.float64) or out.dim() != 2
            or not out.is_contiguous() or len(out) == 0 or y.dtype != torch.long or y.device.type != "cpu"
            or not y.is_contiguous() or (out.requires_grad and torch.is_grad_enabled()) or _numba_kernels() is None):
        return None
    return NUMBA.cost


def _mean_cost_and_gradient_torch(out: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_cost_and_gradient`` by torch operations, autograd's numbers bit for bit. Cross-entropy:
    g·softmax(out) − g at the target (g = 1/B, as the mean's backward rounds it); the half squared error:
    g·(out − target)."""
    g = torch.ones((), dtype=out.dtype, device=out.device) / out.shape[0]   # the mean's backward: 1/B rounded once
    if kind == "cross_entropy":
        lse = torch.logsumexp(out, 1)
        target = out.gather(1, y[:, None])
        loss = (lse - target.squeeze(1)).mean()
        grad = torch.sub(out, lse[:, None]).exp_().mul_(g)
        return loss, grad.scatter_add_(1, y[:, None], (-g).expand(out.shape[0], 1))
    diff = out - nn.functional.one_hot(y, out.shape[1]).to(out.dtype)
    loss = (0.5 * (diff ** 2).sum(1)).mean()
    return loss, diff.mul_(g)


@contextlib.contextmanager
def noise_free(network: AnalogNetwork) -> Iterator[None]:
    """Reads and neuron circuits without their per-evaluation noise (mismatch and devices unchanged)."""
    layers = network.analog_layers
    saved = [(layer.crossbar.noise, layer.activation.config) for layer in layers]
    try:
        for layer in layers:
            layer.crossbar.noise = False
            layer.activation.config = dataclasses.replace(layer.activation.config, noise=0.0, derivative_noise=0.0)
        yield
    finally:
        for layer, (cb, act) in zip(layers, saved, strict=True):
            layer.crossbar.noise = cb
            layer.activation.config = act


def accuracy(network: AnalogNetwork, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Test accuracy of the chip as it is (inference mode, every non-ideality on)."""
    network.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((network(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    network.train()
    return correct / max(1, len(x))
