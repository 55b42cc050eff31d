"""Named networks (mlp, lenet, vgg11) built from analog layers, and ``convert`` for a user's torch model."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from neurosim.activation import ActivationConfig
from neurosim.config import ConfigError, setting
from neurosim.crossbar import CrossbarConfig
from neurosim.device import DeviceSpec
from neurosim.layers import AnalogConv2d, AnalogLinear, AnalogNetwork, StepDropout


@dataclass(frozen=True)
class NetworkConfig:
    """Which network, with which neuron circuits, on which crossbars."""

    architecture: str = setting("mlp", "'mlp', 'lenet' (21,840 weights, 28×28 inputs) or 'vgg11' (32×32 inputs)",
                                choices=("mlp", "lenet", "vgg11"))
    hidden: tuple[int, ...] = setting((32,), "mlp: widths of the hidden layers")
    bias: bool = setting(True, "each layer has a bias row (driven at full-scale input)")
    dropout: float | None = setting(None, "dropout probability after hidden layers (none: 0 for mlp and vgg11, "
                                    "0.5 for lenet, as published; 0 switches it off)", ge=0.0, lt=1.0)
    activation: ActivationConfig = setting(default_factory=lambda: ActivationConfig(function="sigmoid"),
                                           doc="neuron circuit of the hidden layers")
    output_activation: ActivationConfig = setting(default_factory=lambda: ActivationConfig(function="identity"),
                                                  doc="neuron circuit of the output layer")
    crossbar: CrossbarConfig = setting(default_factory=CrossbarConfig, doc="crossbar of every layer")
    init_scale: float | None = setting(None, "initial weights uniform in ±init_scale (none: "
                                       "±min(w_max, 6/sqrt(fan-in)) per layer, see default_init_scale)", gt=0.0)

    def validate(self) -> None:
        if any(w < 1 for w in self.hidden):
            raise ConfigError("hidden", list(self.hidden), "every width must be >= 1")


# Gain of the default initial weights over 1/sqrt(fan-in): measured best of 1, 2, 3, 4, 6 on the digits
# (docs/devices.md, "Defaults"); about 3.5 times a LeCun/Kaiming-uniform bound sqrt(3/fan-in), in line with
# the factor 4 commonly used for the logistic sigmoid (the default neuron circuit; slope 1/4 at 0).
INIT_GAIN = 6.0


def default_init_scale(fan_in: int, w_max: float) -> float:
    """Bound of a layer's uniform initial weights: INIT_GAIN/sqrt(fan-in), at most w_max. 1/sqrt(fan-in) used
    ±12 % of the window of a 64-input layer (6 pulses either side on Ag:a-Si), where sigmoid neurons see
    almost no signal and few updates reach a pulse; this uses ±75 % there."""
    return min(w_max, INIT_GAIN / math.sqrt(fan_in))


def build_network(config: NetworkConfig, spec: DeviceSpec, input_shape: tuple[int, int, int], classes: int,
                  seed: int = 0, device: torch.device | str = "cpu", derivative_circuits: bool = True
                  ) -> AnalogNetwork:
    """The named architecture on analog hardware. ``derivative_circuits=False`` builds none (DGC-only chips)."""
    common = {"spec": spec, "crossbar": config.crossbar, "seed": seed, "device": device, "bias": config.bias,
              "derivative_circuit": derivative_circuits}

    def init(fan_in: int) -> dict[str, float]:
        scale = config.init_scale
        return {"init_scale": default_init_scale(fan_in, config.crossbar.w_max) if scale is None else scale}

    hidden_act, out_act = config.activation, config.output_activation
    c, h, w = input_shape
    stages: list[nn.Module] = []
    if config.architecture == "mlp":
        widths = [c * h * w, *config.hidden, classes]
        stages.append(nn.Flatten())
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            last = i == len(widths) - 2
            stages.append(AnalogLinear(a, b, name=f"fc{i + 1}", activation=out_act if last else hidden_act,
                                       **common, **init(a)))
            if not last and config.dropout:
                stages.append(StepDropout(config.dropout, seed=seed, name=f"dropout{i + 1}", device=device))
    elif config.architecture == "lenet":
        if (h, w) != (28, 28):
            raise ConfigError("data.size", h, "lenet expects 28×28 inputs (set data.size = 28)")
        p = 0.5 if config.dropout is None else config.dropout

        def drop(name: str, channels: bool = False) -> list[nn.Module]:
            return [StepDropout(p, channels, seed=seed, name=name, device=device)] if p else []

        stages += [AnalogConv2d(c, 10, 5, name="conv1", activation=hidden_act, input_size=28, **common,
                                **init(c * 25)),
                   nn.MaxPool2d(2),
                   AnalogConv2d(10, 20, 5, name="conv2", activation=hidden_act, input_size=12, **common,
                                **init(250)),
                   *drop("dropout1", channels=True), nn.MaxPool2d(2), nn.Flatten(),
                   AnalogLinear(320, 50, name="fc1", activation=hidden_act, **common, **init(320)),
                   *drop("dropout2"),
                   AnalogLinear(50, classes, name="fc2", activation=out_act, **common, **init(50))]
    else:  # vgg11, CIFAR-sized
        if (h, w) != (32, 32):
            raise ConfigError("data.size", h, "vgg11 expects 32×32 inputs")
        side, channels, n = 32, c, 0
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                stages.append(nn.MaxPool2d(2))
                side //= 2
                continue
            n += 1
            stages.append(AnalogConv2d(channels, v, 3, padding=1, name=f"conv{n}", activation=hidden_act,
                                       input_size=side, **common, **init(channels * 9)))
            channels = v
        stages += [nn.Flatten(), AnalogLinear(512, classes, name="fc1", activation=out_act, **common, **init(512))]
    # Neuron circuits sit right after their crossbar; max pooling after a monotone activation equals pooling
    # before it, so conv -> neuron -> pool is the order here.
    return AnalogNetwork(stages, name=config.architecture)


_ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu",
                nn.ELU: "elu", nn.SELU: "selu", nn.Softplus: "softplus", nn.GELU: "gelu", nn.SiLU: "silu",
                nn.PReLU: "prelu", nn.Identity: "identity"}


def convert(model: nn.Module, spec: DeviceSpec, crossbar: CrossbarConfig | None = None,
            activation: ActivationConfig | None = None, seed: int = 0, device: torch.device | str = "cpu",
            input_size: int | None = None, program: str = "exact") -> AnalogNetwork:
    """Map a plain torch model (a Sequential of Linear, Conv2d, activations, pooling, dropout, flatten) onto
    analog layers. Its weights are written to the crossbars (``program='exact'`` places them, ``'verify'``
    writes them by write-and-verify); an activation module that follows a layer becomes that layer's neuron
    circuit, with the realization and variation of ``activation`` (its ``function`` is taken from the model)."""
    modules = list(model.children()) if not isinstance(model, nn.Sequential) else list(model)
    if not modules:
        modules = [model]
    base = activation or ActivationConfig()
    stages: list[nn.Module] = []
    side = input_size
    n = 0
    i = 0
    while i < len(modules):
        m = modules[i]
        nxt = modules[i + 1] if i + 1 < len(modules) else None
        act_name = _ACTIVATIONS.get(type(nxt)) if nxt is not None else None
        act = dataclasses.replace(base, function=act_name) if act_name else ActivationConfig(function="identity")
        if isinstance(nxt, nn.LeakyReLU):
            act = dataclasses.replace(act, alpha=float(nxt.negative_slope))
        if isinstance(m, nn.Linear | nn.Conv2d):
            n += 1
            common = {"spec": spec, "crossbar": crossbar, "seed": seed, "device": device, "bias": m.bias is not None,
                      "activation": act}
            if isinstance(m, nn.Linear):
                layer = AnalogLinear(m.in_features, m.out_features, name=f"layer{n}", **common)
                w = m.weight.detach().T
            else:
                if m.groups != 1 or m.dilation != (1, 1) or m.kernel_size[0] != m.kernel_size[1]:
                    raise ConfigError("model", type(m).__name__, "only square, ungrouped, undilated convolutions")
                layer = AnalogConv2d(m.in_channels, m.out_channels, m.kernel_size[0], name=f"layer{n}",
                                     stride=m.stride[0], padding=m.padding[0], input_size=side, **common)
                w = m.weight.detach().reshape(m.out_channels, -1).T
                if side is not None:
                    side = layer.output_side(side)
            if m.bias is not None:
                w = torch.cat([w, m.bias.detach()[None, :] / layer.crossbar.config.input_max], dim=0)
            w = w.to(device=layer.crossbar.device, dtype=layer.crossbar.dtype)
            if program == "verify":
                layer.crossbar.write_verify(w)
            else:
                layer.crossbar.set_weights(w)
            layer.sync_believed()
            stages.append(layer)
            i += 2 if act_name else 1
            continue
        if type(m) in _ACTIVATIONS:
            raise ConfigError("model", type(m).__name__, "an activation must follow a Linear or Conv2d layer")
        if isinstance(m, nn.MaxPool2d | nn.AvgPool2d) and side is not None:
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            side = side // k
        if not isinstance(m, nn.MaxPool2d | nn.AvgPool2d | nn.Dropout | nn.Dropout2d | nn.Flatten):
            raise ConfigError("model", type(m).__name__, "cannot be mapped onto analog hardware")
        if isinstance(m, nn.Dropout | nn.Dropout2d):  # the controller's dropout: one mask per step, seeded
            m = StepDropout(m.p, isinstance(m, nn.Dropout2d), seed=seed, name=f"dropout{i + 1}", device=device)
        stages.append(m)
        i += 1
    return AnalogNetwork(stages, name="converted")
