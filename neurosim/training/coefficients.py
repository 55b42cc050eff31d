"""Trainable Taylor coefficients of two-stage training: how their gradient is obtained, and the step.

Two ways to get the gradient (``two_stage.coefficient_gradient``):

- ``"bp"``: the error at each neuron's output arrives by the chip's backward pass (derivative circuits and
  transposed reads of the layers above), and the controller forms g_k = Σ δ·u^k digitally from the
  pre-activations it converted. Needs derivative circuits.
- ``"perturbation"``: the DGC principle applied to the coefficients, which are digital settings of the
  polynomial circuit: set coefficient k of a layer to a_k + δ, measure the cost through the chip, set it
  back; g = ΔC/δ. A handful per layer, so it costs a few forward passes of the batch per step, and it needs
  no derivative circuit and no transposed read. Here every measured chip state is one block of a single
  batched evaluation (``ActivationUnit.coefficient_sets``); each block draws its own noise in every layer.

The step works in the circuit's units: the polynomial circuit sees u/s in [-1, 1] (s: half-width of the
clipping range around x0) and coefficient k as a_k = c_k s^k. In those units every term changes a neuron's
output by at most |a_k|, so one learning rate means the same for every k; in the units of c_k the gradient
of term k is multiplied by up to s^k (64 for the cubic term on [-4, 4]) and its curvature by s^2k, which is
why plain SGD on c diverged. The gradient is also averaged over the neuron evaluations that share the
coefficient (one layer's neurons, and a convolution's output positions) rather than summed, so the step does
not grow with the layer's width, and divided by the number of terms N, so that one step changes a neuron's
output by at most lr·mean|δ| (Σ_k |Δa_k| ≤ lr·mean|δ|, δ the error at the neuron output) whatever N; in the
Gauss-Newton picture the largest curvature along a is at most N times the curvature along a_0, since
|(u/s)^k| ≤ 1 = (u/s)^0, so the stable learning rate does not shrink as terms are added. Hence
Δc_k = −lr · g_k / (N · n · s^2k), g_k = ∂C/∂c_k, n evaluations per sample.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from neurosim.activation import taylor_scale
from neurosim.config import ConfigError
from neurosim.layers import AnalogLayer, AnalogNetwork, StepDropout
from neurosim.training.config import TrainerConfig
from neurosim.training.cost import cost_per_sample

METHODS = ("auto", "bp", "perturbation")
_MAX_SAMPLES = 8192  # replicated samples per batched evaluation (bounds memory; blocks beyond go in chunks)


def needs_derivative_circuits(config: TrainerConfig) -> bool:
    """Whether training with ``config`` reads derivative circuits. Networks are built before the trainer:
    pass the answer to ``build_network(derivative_circuits=...)``; a DGC-only chip carries none."""
    if config.scheme == "dgc":
        return False
    bp_reads_them = config.bp.backward != "true_gradient"  # the software reference uses autograd instead
    if config.scheme == "hybrid":
        h = config.hybrid
        return bp_reads_them and (h.bp_epochs > 0 or not h.layer_schemes or "bp" in h.layer_schemes)
    if config.scheme == "two_stage":
        ts = config.two_stage
        return bp_reads_them and (ts.stage1_scheme == "bp" or ts.coefficient_gradient == "bp")
    return bp_reads_them


def coefficient_method(config: TrainerConfig) -> str:
    """``two_stage.coefficient_gradient`` resolved: 'auto' is BP where the weights are trained by BP (their
    backward pass is there anyway), perturbation where they are trained by DGC (no derivative circuits)."""
    ts = config.two_stage
    if ts.coefficient_gradient != "auto":
        return ts.coefficient_gradient
    return "bp" if ts.stage1_scheme == "bp" else "perturbation"


def check_derivative_circuits(network: AnalogNetwork, config: TrainerConfig) -> None:
    """Refuse a scheme that reads derivative circuits on a network built without them."""
    missing = [layer.name for layer in network.analog_layers if not layer.activation.has_derivative_circuit]
    if not missing or not needs_derivative_circuits(config):
        return
    if config.scheme == "two_stage":
        field, value = ("trainer.two_stage.stage1_scheme", "bp") if config.two_stage.stage1_scheme == "bp" else \
            ("trainer.two_stage.coefficient_gradient", "bp")
    else:
        field, value = "trainer.scheme", config.scheme
    raise ConfigError(field, value, f"needs derivative circuits, and layers {', '.join(missing)} were built "
                      "without them (build the network with derivative_circuits="
                      "neurosim.training.needs_derivative_circuits(config))")


def taylor_layers(network: AnalogNetwork) -> list[AnalogLayer]:
    """The layers whose neuron circuits carry trainable Taylor coefficients."""
    return [layer for layer in network.analog_layers if layer.activation.config.mode == "taylor"
            and layer.activation.config.train_coefficients]


def basis_scale(layer: AnalogLayer) -> torch.Tensor:
    """s^k, k = 0..terms-1: a_k = c_k s^k (float64)."""
    cfg = layer.activation.config
    return taylor_scale(cfg) ** torch.arange(cfg.terms, dtype=torch.float64)


def evaluations_per_sample(layer: AnalogLayer) -> int:
    """Neuron evaluations that share a layer's coefficients, per sample (neurons × output positions)."""
    return layer.activation.num_neurons * layer.reads_per_sample


def coefficient_update(layer: AnalogLayer, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Δc = −lr·g/(N·n·s^2k): SGD on the circuit's coefficients a_k = c_k s^k, averaged over the n neuron
    evaluations of a sample, divided by the N terms (see the module docstring). Refuses a non-finite gradient."""
    if not bool(torch.isfinite(grad).all()):
        raise FloatingPointError(f"{layer.name}: the Taylor coefficient gradient is not finite ({grad.tolist()}); "
                                 "lower trainer.two_stage.coefficient_lr or trainer.learning_rate")
    s2 = basis_scale(layer).to(device=grad.device) ** 2
    step = grad.double() / (len(s2) * evaluations_per_sample(layer) * s2)
    return (-lr * step).to(grad.dtype)


def _blocks_forward(network: AnalogNetwork, x: torch.Tensor, blocks: int,
                    sets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The chip's output for ``blocks`` chip states at once: the batch repeated, block m with coefficient row m
    in every Taylor layer of ``sets``. Dropout keeps one mask for all blocks (``StepDropout`` tiles the step's
    mask; a plain torch dropout draws one here), so the blocks differ only by coefficients and noise."""
    batch = x.shape[0]
    h = x.repeat((blocks,) + (1,) * (x.dim() - 1))
    for stage in network.stages:
        if isinstance(stage, AnalogLayer):
            s = sets.get(stage.name)
            if s is None:
                h = stage(h)
            else:
                with stage.activation.coefficient_sets(s):
                    h = stage(h)
        elif isinstance(stage, StepDropout):
            if stage.hold and stage.mask is None:
                stage(h[:batch])  # the step's mask is one of its N samples, whoever measures first
            h = stage(h)
        elif isinstance(stage, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d) and stage.training:
            mask = stage(torch.ones_like(h[:batch]))
            h = h * mask.repeat((blocks,) + (1,) * (h.dim() - 1))
        else:
            h = stage(h)
    return h


def perturbation_gradients(network: AnalogNetwork, x: torch.Tensor, y: torch.Tensor, cost: str, delta: float,
                           difference: str = "forward") -> tuple[dict[str, torch.Tensor], float, int]:
    """∂C/∂c of every trainable Taylor layer by perturbing each coefficient in the circuit's units (a_k by
    ±δ, i.e. c_k by ±δ/s^k) and measuring the cost through the chip. Returns the gradients (in c units, as
    BP gives them), the measured base cost, and the number of cost measurements (forward passes of the
    batch: 1 + terms per layer, twice that for central differences)."""

    layers = taylor_layers(network)
    signs = (1.0, -1.0) if difference == "central" else (1.0,)
    per_sign = sum(layer.activation.config.terms for layer in layers)
    total = 1 + len(signs) * per_sign  # block 0: the unperturbed chip; then (sign, layer, k) in that order
    base, shifts = {}, {}
    first = 1
    for layer in layers:
        c = layer.activation.coefficients.detach()
        n = c.shape[0]
        step = (delta / basis_scale(layer)).to(c)
        shift = torch.zeros(total, n, device=c.device, dtype=c.dtype)
        k = torch.arange(n, device=c.device)
        for i, sign in enumerate(signs):
            shift[first + i * per_sign + k, k] = sign * step
        base[layer.name], shifts[layer.name] = c, shift
        first += n
    costs = torch.empty(total, dtype=torch.float64)
    per_pass = max(1, _MAX_SAMPLES // max(1, x.shape[0]))
    drops = [s for s in network.stages if isinstance(s, StepDropout)]
    held = all(d.hold for d in drops)  # inside a training step: its mask; else one mask for this measurement
    with torch.no_grad(), contextlib.nullcontext() if held else network.one_mask_per_step():
        for start in range(0, total, per_pass):
            stop = min(total, start + per_pass)
            sets = {name: c + shifts[name][start:stop] for name, c in base.items()}
            out = _blocks_forward(network, x, stop - start, sets)
            reps = cost_per_sample(out, y.repeat(stop - start), cost).reshape(stop - start, -1)
            costs[start:stop] = reps.double().mean(1).cpu()
    grads: dict[str, torch.Tensor] = {}
    i = 1
    for layer in layers:
        n = layer.activation.config.terms
        up = costs[i:i + n]
        g = (up - costs[i + per_sign:i + per_sign + n]) / (2 * delta) if len(signs) == 2 else (up - costs[0]) / delta
        i += n
        c = layer.activation.coefficients  # g is ∂C/∂a_k; ∂C/∂c_k = s^k ∂C/∂a_k
        grads[layer.name] = (g * basis_scale(layer)).to(device=c.device, dtype=c.dtype)
    return grads, float(costs[0]), total
