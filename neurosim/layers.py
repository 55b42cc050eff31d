"""Analog layers: a crossbar followed by its neuron circuits, plus the digital glue (pooling, dropout, flatten).

A layer's forward runs in one of three modes, and the difference between them is the heart of the variation
studies, so it is explicit here:

- ``"inference"``: the chip as it is -- DAC, tiles, read noise, ADC, neuron circuit with its mismatch and noise.
- ``"bp"``: the same forward, with a backward that is the *chip's* backward path, not autograd of an ideal
  model: errors go through the derivative circuit (its own mismatch) and through a transposed read of the real
  conductances, or through the digital model of the weights the controller believes it programmed.
  With ideal devices and circuits this backward equals torch autograd's.
- ``"linearized"``: autograd through the non-ideal forward model of the real conductances (converters pass
  gradients straight through), used by DGC's fast approximation: DGC measures the real chip, derivative
  circuits play no part.

Weights are stored (in, out), rows = inputs; a bias is one more crossbar row driven at full-scale input.
Convolutions are mapped onto a crossbar through unfold: every output position is one read of the tile.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from neurosim.activation import ActivationConfig, ActivationUnit
from neurosim.backend import make_generator, no_grad
from neurosim.crossbar import Crossbar, CrossbarConfig
from neurosim.device import DeviceSpec

MODES = ("inference", "bp", "linearized")


class _HardwareRead(torch.autograd.Function):
    """Forward: the crossbar read. Backward: the chip's error path and the controller's outer product."""

    @staticmethod
    def forward(ctx, xrows, weight, layer):
        ctx.layer = layer
        ctx.save_for_backward(xrows)
        with torch.no_grad():
            return layer.read_rows(xrows)

    @staticmethod
    def backward(ctx, grad_out):
        (xrows,) = ctx.saved_tensors
        layer = ctx.layer
        grad_x = layer.input_errors(grad_out) if ctx.needs_input_grad[0] else None
        grad_w = layer.weight_gradient(xrows, grad_out) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def derivative_backward(unit: ActivationUnit, z: torch.Tensor, grad_out: torch.Tensor,
                        input_grad: bool = True) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """The error behind a neuron circuit: the derivative circuit's output times the incoming error, and the
    gradients of the unit's trainable coefficients (from the circuit's own function), keyed by id."""
    grad_z = unit.derivative_times(z, grad_out) if input_grad else None
    params = [p for p in unit.trainable_parameters() if p.requires_grad]
    if not params:
        return grad_z, {}
    with torch.enable_grad():
        out = unit.ideal(z.detach())
        grads = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    return grad_z, {id(p): g for p, g in zip(params, grads, strict=True)}


class _DerivativeCircuit(torch.autograd.Function):
    """Forward: the neuron circuit. Backward: the derivative circuit times the incoming error; trainable
    coefficients get their gradient from the circuit's own function."""

    @staticmethod
    def forward(ctx, z, unit, *params):
        ctx.unit = unit
        ctx.save_for_backward(z)
        with torch.no_grad():
            return unit(z)

    @staticmethod
    def backward(ctx, grad_out):
        (z,) = ctx.saved_tensors
        unit = ctx.unit
        grad_z, by_id = derivative_backward(unit, z, grad_out, ctx.needs_input_grad[0])
        return (grad_z, None, *[by_id.get(id(p)) for p in unit.trainable_parameters()])


class AnalogLayer(nn.Module):
    """Shared machinery of analog Linear and Conv2d: a crossbar, its neuron circuits, its training scheme."""

    kind = "layer"

    def __init__(self, name: str, rows: int, cols: int, bias: bool, spec: DeviceSpec,
                 crossbar: CrossbarConfig | None, activation: ActivationConfig | None, seed: int,
                 device: torch.device, derivative_circuit: bool = True, init_scale: float | None = None):
        super().__init__()
        self.name = name
        self.has_bias = bias
        self.crossbar = Crossbar(spec, rows + int(bias), cols, crossbar, seed=seed, name=name, device=device)
        g = make_generator(seed, device, name, "init")
        bound = init_scale if init_scale is not None else 1.0 / math.sqrt(rows)
        w0 = (torch.rand(rows + int(bias), cols, generator=g, device=device) * 2 - 1) * bound
        self.crossbar.set_weights(w0)
        # The controller's digital copy of the weights it believes it programmed, where gradients land: the
        # crossbar's own record (shared memory, so programming needs no copy back).
        self.weight = nn.Parameter(self.crossbar.believed)
        self.activation_config = activation or ActivationConfig(function="identity")
        self.activation = ActivationUnit(self.activation_config, cols, generator=make_generator(seed, device, name,
                                         "neurons"), device=device, derivative_circuit=derivative_circuit)
        self.scheme = "bp"                     # "bp" or "dgc", set by the trainer
        self.backward_path = "transposed_read"  # BP: "transposed_read" or "digital_model"
        self.reads_per_sample = 1

    # Subclasses say how inputs become crossbar rows (rows_of) and how column outputs come back (shape_output).

    def matrix_input(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, rows) matrix the crossbar reads: one row per sample (and output position), bias included."""
        return self._with_bias(self.rows_of(x))

    def read_rows(self, xrows: torch.Tensor) -> torch.Tensor:
        """The crossbar read of ``rows_of`` inputs (N, rows without the bias row): the bias row's full-scale
        input goes in with the read (``Crossbar.read``'s ``extra``), not by a concatenated copy of the inputs."""
        return self.crossbar.read(xrows, extra=self.crossbar.config.input_max if self.has_bias else None)

    def weight_gradient(self, xrows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The controller's outer product (rows, cols) from the read's inputs ``xrows`` (N, rows without the
        bias row) and the errors at the columns ``rows`` (N, cols): xrowsᵀ·rows, and for the bias row, whose
        input is input_max for every sample, input_max·Σ rows (one reduction instead of a concatenated copy of
        the inputs as a product operand)."""
        if not self.has_bias:
            return torch.mm(xrows.t(), rows)   # what xrows.T @ rows computes, without matmul's dispatch
        n = xrows.shape[1]
        g = torch.empty((n + 1, rows.shape[1]), dtype=torch.result_type(xrows, rows), device=rows.device)
        torch.mm(xrows.t(), rows, out=g[:n])
        bias = torch.sum(rows, 0, out=g[n])
        input_max = self.crossbar.config.input_max
        if input_max != 1.0:
            bias.mul_(input_max)
        return g

    def _with_bias(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, self._bias_column(rows)], dim=1)

    def _bias_column(self, rows: torch.Tensor) -> torch.Tensor:
        """The bias row's input, full scale, as a (N, 1) column for rows like ``rows``: kept between calls (a
        read-only operand of a concatenation), since every read of every step needs the same one."""
        key = (rows.shape[0], rows.dtype, rows.device, self.crossbar.config.input_max)
        cached = getattr(self, "_bias_cache", None)
        if cached is None or cached[0] != key:
            column = torch.full((rows.shape[0], 1), key[3], device=rows.device, dtype=rows.dtype)
            cached = self._bias_cache = (key, column)
        return cached[1]

    # -- forward ---------------------------------------------------------------------------------------------
    def preactivation(self, x: torch.Tensor, mode: str = "inference", weights: torch.Tensor | None = None):
        if mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "bp":
            z = _HardwareRead.apply(self.rows_of(x), self.weight, self)
        elif mode == "linearized":
            z = self.crossbar.read(self.matrix_input(x), w=weights)
        else:
            with torch.no_grad():
                z = self.read_rows(self.rows_of(x))
        return self.shape_output(z, tuple(x.shape))

    def activate(self, z: torch.Tensor, mode: str = "inference") -> torch.Tensor:
        if mode == "bp":
            return _DerivativeCircuit.apply(z, self.activation, *self.activation.trainable_parameters())
        if mode == "linearized":
            return self.activation(z)
        with torch.no_grad():
            return self.activation(z)

    def forward(self, x: torch.Tensor, mode: str = "inference", weights: torch.Tensor | None = None):
        return self.activate(self.preactivation(x, mode, weights), mode)

    # -- the chip's backward pass ------------------------------------------------------------------------------
    def error_rows(self, grad_rows: torch.Tensor) -> torch.Tensor:
        """Errors (N, cols) at the crossbar's columns → errors at its rows (N, rows), bias row included, by the
        chip's backward path."""
        if self.backward_path == "transposed_read":
            return self.crossbar.read_transposed(grad_rows)
        if self.backward_path == "digital_model":
            return grad_rows @ self.crossbar.believed.T
        raise ValueError(f"{self.name}: backward path {self.backward_path!r} is not a chip's error path "
                         "('true_gradient' is computed by neurosim.training.bp.true_gradients)")

    def input_errors(self, grad_rows: torch.Tensor) -> torch.Tensor:
        """``error_rows`` without the bias row's error (its input is a constant: nothing below needs it)."""
        grad_x = self.error_rows(grad_rows)
        return grad_x[:, : grad_x.shape[1] - int(self.has_bias)]

    def forward_bp(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The forward of mode "bp" without autograd, returning what ``backward_bp`` needs. Hardware BP runs
        these two instead of autograd: the arithmetic and the random draws are the same (so are the
        gradients, bit for bit), and a training step is spared the graph's bookkeeping, which on a CPU costs
        as much as the arithmetic of a small layer."""
        with no_grad():
            xrows = self.rows_of(x)
            z = self.shape_output(self.read_rows(xrows), tuple(x.shape))
            return self._modules["activation"](z), (xrows, z, tuple(x.shape))

    def backward_bp(self, saved: tuple, grad_out: torch.Tensor, weight_grad: bool, input_grad: bool
                    ) -> torch.Tensor | None:
        """Errors back through the derivative circuit and the chip's backward path. ``weight_grad``: the
        controller's outer product lands in ``weight.grad``; trainable coefficients of the neuron circuit get
        theirs in ``p.grad``. Returns the error at the layer's input when ``input_grad``."""
        xrows, z, x_shape = saved
        # (submodules and parameters from their dicts: nn.Module's __getattr__ is a Python call each time, a
        # dozen a training step here)
        unit, weight = self._modules["activation"], self._parameters["weight"]
        with no_grad():
            grad_z, by_id = derivative_backward(unit, z, grad_out)
            if by_id:
                for p in unit.trainable_parameters():
                    g = by_id.get(id(p))
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            rows = self.output_rows(grad_z)
            grad_x = self.input_errors(rows) if input_grad else None
            if weight_grad:
                g = self.weight_gradient(xrows, rows)
                weight.grad = g if weight.grad is None else weight.grad + g
            return None if grad_x is None else self.input_from_rows(grad_x, x_shape)

    # -- programming -----------------------------------------------------------------------------------------
    def sync_believed(self) -> None:
        """After programming, the digital copy is what the controller believes it wrote."""
        weight = self._parameters["weight"]
        if weight.data_ptr() != self.crossbar.believed.data_ptr():  # no longer shared (e.g. after .to())
            with torch.no_grad():
                weight.copy_(self.crossbar.believed)

    def footprint(self) -> dict:
        return {"name": self.name, **self.crossbar.footprint(), "reads_per_sample": self.reads_per_sample}


class AnalogLinear(AnalogLayer):
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, *, name: str, spec: DeviceSpec, bias: bool = True,
                 crossbar: CrossbarConfig | None = None, activation: ActivationConfig | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", derivative_circuit: bool = True,
                 init_scale: float | None = None):
        super().__init__(name, in_features, out_features, bias, spec, crossbar, activation, seed,
                         torch.device(device), derivative_circuit, init_scale)
        self.in_features, self.out_features = in_features, out_features

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 else x.reshape(x.shape[0], -1)   # (a reshape to its own shape is a call)

    def shape_output(self, z: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        return z

    def output_rows(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def input_from_rows(self, grad_rows: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        return grad_rows if grad_rows.shape == x_shape else grad_rows.reshape(x_shape)


class AnalogConv2d(AnalogLayer):
    """A convolution as a crossbar of (in·k·k [+1]) rows and out columns, read once per output position."""

    kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, name: str, spec: DeviceSpec,
                 stride: int = 1, padding: int = 0, bias: bool = True, crossbar: CrossbarConfig | None = None,
                 activation: ActivationConfig | None = None, seed: int = 0, device: torch.device | str = "cpu",
                 derivative_circuit: bool = True, input_size: int | None = None, init_scale: float | None = None):
        super().__init__(name, in_channels * kernel_size * kernel_size, out_channels, bias, spec, crossbar,
                         activation, seed, torch.device(device), derivative_circuit, init_scale)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        if input_size is not None:
            side = (input_size + 2 * padding - kernel_size) // stride + 1
            self.reads_per_sample = side * side

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        cols = nn.functional.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, ckk, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def output_side(self, side: int) -> int:
        return (side + 2 * self.padding - self.kernel_size) // self.stride + 1

    def shape_output(self, z: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        b, h, w = x_shape[0], self.output_side(x_shape[2]), self.output_side(x_shape[3])
        return z.reshape(b, h * w, -1).transpose(1, 2).reshape(b, -1, h, w)

    def output_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """The inverse of ``shape_output``: (B, out, h, w) → one row per sample and output position."""
        return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2).reshape(-1, grad.shape[1])

    def input_from_rows(self, grad_rows: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
        """The adjoint of ``rows_of``: each row's error goes back to the input pixels it read (fold)."""
        b = x_shape[0]
        cols = grad_rows.reshape(b, -1, grad_rows.shape[1]).transpose(1, 2)
        return nn.functional.fold(cols, x_shape[2:], self.kernel_size, padding=self.padding, stride=self.stride)


class StepDropout(nn.Module):
    """Dropout as the chip's controller applies it: one mask per training step, from the network's own seeded
    stream (runs repeat bit for bit; torch's global generator is not used).

    Inside ``AnalogNetwork.one_mask_per_step()`` the first training-mode call of a step draws the mask for a
    batch of N samples and every later call of the step reuses it: the base measurement of DGC, each of its
    perturbations (inputs of k·N samples, k replicas of the batch, get the mask tiled k times) and the BP
    pass of a hybrid step all see the same dropped units, as on the chip. Outside that context every call
    draws afresh, like ``nn.Dropout``. ``channels``: drop whole feature maps (``nn.Dropout2d``)."""

    def __init__(self, p: float, channels: bool = False, seed: int = 0, name: str = "dropout",
                 device: torch.device | str = "cpu"):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name}: dropout probability must be in [0, 1), got {p}")
        self.p, self.channels, self.name = float(p), bool(channels), name
        self.generator = make_generator(seed, torch.device(device), name, "dropout")
        self.hold = False            # set by one_mask_per_step
        self.mask: torch.Tensor | None = None

    def _draw(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], x.shape[1], *([1] * (x.dim() - 2))) if self.channels else x.shape
        if self.generator.device != x.device:
            self.generator = make_generator(0, x.device, self.name, "dropout")
        keep = torch.rand(shape, generator=self.generator, device=x.device) >= self.p
        return keep.to(x.dtype) / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.hold:
            return x * self._draw(x)
        if self.mask is None:
            self.mask = self._draw(x)
        n = self.mask.shape[0]
        if x.shape[0] == n:
            return x * self.mask
        if x.shape[0] % n:
            raise RuntimeError(f"{self.name}: a batch of {x.shape[0]} inside a step whose mask has {n} samples")
        return x * self.mask.repeat(x.shape[0] // n, *([1] * (x.dim() - 1)))

    def extra_repr(self) -> str:
        return f"p={self.p}, channels={self.channels}"


class AnalogNetwork(nn.Module):
    """A sequence of analog layers and digital stages; ``forward(x, mode)`` threads the mode through."""

    def __init__(self, stages: list[nn.Module], name: str = "network"):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.name = name

    @property
    def analog_layers(self) -> list[AnalogLayer]:
        """The analog layers in order (a new list each time; remembered for the stages, which a training step
        asks for several times)."""
        stages = list(self._modules["stages"]._modules.values())
        memo = self.__dict__.get("_analog_memo")
        if memo is None or memo[0] != stages:   # (modules compare by identity)
            memo = self.__dict__["_analog_memo"] = (stages, [s for s in stages if isinstance(s, AnalogLayer)])
        return list(memo[1])

    def forward(self, x: torch.Tensor, mode: str = "inference", weights: dict[str, torch.Tensor] | None = None,
                start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stages ``start`` up to (not including) ``stop``: DGC re-runs only the part above a layer."""
        for stage in self.stages[start:stop]:
            if isinstance(stage, AnalogLayer):
                x = stage(x, mode, (weights or {}).get(stage.name))
            else:
                x = stage(x)
        return x

    @contextlib.contextmanager
    def one_mask_per_step(self) -> Iterator[None]:
        """One dropout mask for everything measured in a training step (see ``StepDropout``)."""
        drops = [s for s in self.stages if isinstance(s, StepDropout)]
        for d in drops:
            d.hold, d.mask = True, None
        try:
            yield
        finally:
            for d in drops:
                d.hold, d.mask = False, None

    def parameter_count(self) -> int:
        return sum(layer.crossbar.in_features * layer.crossbar.out_features for layer in self.analog_layers)
