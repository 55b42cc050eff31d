"""Fingerprints of whole hardware-BP training epochs: every conductance, programming time, belief, neuron-circuit
parameter, momentum buffer, metrics row and random stream's state after one epoch, hashed. Pinned in
``bp_fingerprints.json`` from the code before the BP step's operation-count work (issue 14), so that work is
shown to leave every number as it was, bit for bit.

The pinned hashes hold for the machine and torch they were made with (``environment``); the test that always
runs compares against the old functions themselves, in the same process (``tests/bp_reference.py``). A change
that is *meant* to change the numbers of a BP step (e.g. new read-path arithmetic) regenerates the file
(``python -m tests.bp_fingerprint``) and says so in its commit message.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from neurosim.activation import ActivationConfig
from neurosim.backend import fast_bfloat16
from neurosim.config import build
from neurosim.crossbar import CrossbarConfig
from neurosim.data import DataConfig, load
from neurosim.device import DeviceSpec
from neurosim.layers import AnalogConv2d, AnalogLinear, AnalogNetwork, StepDropout
from neurosim.training import TrainerConfig, make_trainer

PINNED = Path(__file__).with_name("bp_fingerprints.json")

NOISY = ActivationConfig(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02, noise=0.01,
                         derivative_gain_dtod=0.05, derivative_offset_dtod=0.02, derivative_noise=0.01)


def _spec(**fields) -> DeviceSpec:
    base = {"name": "fp", "g_min": 1e-6, "g_max": 1e-5, "states": 65}
    base.update(fields)
    return build(DeviceSpec, base)


def _pair_mlp(data):
    """Differential pairs, every device non-ideality (drift on the clock), ragged tiles, converters,
    stochastic rounding, momentum, noisy neuron and derivative circuits, the transposed read."""
    spec = _spec(nl_ltp=2.0, nl_ltd=-3.0, c2c=0.01, read_noise=0.02, g_min_dtod=0.05, g_max_dtod=0.05, nl_dtod=0.3,
                 step_dtod=0.05, stuck_at_gmin=0.01, stuck_at_gmax=0.01, drift_nu=0.02, drift_nu_dtod=0.2,
                 drift_t0=1e-6)
    xb = CrossbarConfig(tile_rows=16, tile_cols=8, dac_bits=6, adc_bits=7, adc_range=6.0, rounding="stochastic")
    widths = (64, 24, 16, 10)
    stages = [nn.Flatten()]
    for i in range(3):
        stages.append(AnalogLinear(widths[i], widths[i + 1], name=f"fc{i + 1}", spec=spec, crossbar=xb,
                                   activation=NOISY if i < 2 else None, seed=3))
    cfg = build(TrainerConfig, {"scheme": "bp", "epochs": 1, "batch_size": 16, "learning_rate": 0.2,
                                "momentum": 0.5, "clock": True})
    return AnalogNetwork(stages), cfg


def _reference_conv(data):
    """Single devices against a reference, a table card with unequal pulse counts (Δw up ≠ down), a conv layer,
    pooling and dropout, trainable Taylor coefficients and a PReLU slope, deterministic rounding, the
    digital model as the error path, MSE."""
    ltp = tuple(1e-6 + 9e-6 * (1 - math.exp(-k / 12)) / (1 - math.exp(-32 / 12)) for k in range(33))
    ltd = tuple(1e-5 - 9e-6 * k / 24 for k in range(25))
    spec = _spec(states=33, states_ltd=25, table_ltp=ltp, table_ltd=ltd, c2c=0.005, read_noise=0.01,
                 g_min_dtod=0.03)
    xb = CrossbarConfig(mapping="reference", rounding="deterministic", dac_bits=8, adc_bits=8, tile_rows=20)
    taylor = ActivationConfig(function="tanh", mode="taylor", terms=4, train_coefficients=True, gain_dtod=0.03,
                              noise=0.005, derivative_offset_dtod=0.01)
    prelu = ActivationConfig(function="prelu", alpha=0.1, offset_dtod=0.01, derivative_gain_dtod=0.02)
    stages = [AnalogConv2d(1, 4, 3, name="conv1", spec=spec, crossbar=xb, activation=taylor, seed=5, input_size=8),
              nn.MaxPool2d(2), StepDropout(0.2, channels=True, seed=5, name="drop1"), nn.Flatten(),
              AnalogLinear(36, 12, name="fc1", spec=spec, crossbar=xb, activation=prelu, seed=5),
              StepDropout(0.1, seed=5, name="drop2"),
              AnalogLinear(12, 10, name="fc2", spec=spec, crossbar=xb, seed=5)]
    cfg = build(TrainerConfig, {"scheme": "bp", "epochs": 1, "batch_size": 20, "learning_rate": 0.5, "cost": "mse",
                                "clock": False, "bp": {"backward": "digital_model"}})
    return AnalogNetwork(stages), cfg


def _hybrid_pwl(data):
    """BP on the upper layers only (the error stops above the DGC layer), PWL neurons with their slope as the
    derivative, an unrecorded run without drift."""
    spec = _spec(nl_ltp=1.0, nl_ltd=1.0, c2c=0.01, read_noise=0.01)
    xb = CrossbarConfig(dac_bits=5, adc_bits=6, rounding="stochastic")
    pwl = ActivationConfig(function="sigmoid", mode="pwl", epsilon=0.02, derivative="slope", noise=0.01,
                           derivative_noise=0.01, gain_dtod=0.02)
    stages = [nn.Flatten(), AnalogLinear(64, 12, name="fc1", spec=spec, crossbar=xb, activation=pwl, seed=7),
              AnalogLinear(12, 10, name="fc2", spec=spec, crossbar=xb, seed=7)]
    cfg = build(TrainerConfig, {"scheme": "hybrid", "epochs": 1, "batch_size": 32, "learning_rate": 0.3,
                                "clock": False, "hybrid": {"layer_schemes": ["dgc", "bp"]}})
    return AnalogNetwork(stages), cfg


CASES = {"pair_mlp": _pair_mlp, "reference_conv": _reference_conv, "hybrid_pwl": _hybrid_pwl}


def _digest(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.cpu().numpy().tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _digest(h, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _digest(h, v)
    else:
        h.update(repr(value).encode())


def epoch_fingerprint(case: str, epochs: int = 2) -> dict[str, str]:
    """Train ``epochs`` epochs of a case; hashes of what they leave, by part."""
    torch.set_num_threads(1)
    data = load(DataConfig(name="synthetic", size=8, samples=240, test_fraction=0.25), seed=1)
    network, cfg = CASES[case](data)
    trainer = make_trainer(network, data, cfg, seed=11)
    trainer.run_epochs(epochs)
    parts: dict[str, object] = {}
    for layer in network.analog_layers:
        cb = layer.crossbar
        parts[f"{layer.name}.devices"] = [(a.g, a.t_programmed, a.version, a.time_s) for a in cb._arrays()]
        parts[f"{layer.name}.believed"] = [cb.believed, layer.weight]
        parts[f"{layer.name}.neurons"] = dict(layer.activation.state_dict())
        parts[f"{layer.name}.streams"] = [cb.noise_generator.get_state()] + [
            g.get_state() for _, g in sorted(layer.activation._noise_gens.items())]
    parts["velocity"] = trainer.velocity
    parts["history"] = [{k: v for k, v in row.items() if k != "wall_time_s"} for row in trainer.history]
    parts["pulses"] = trainer.layer_pulses
    parts["trainer_streams"] = [trainer.generator.get_state(), trainer.shuffle_generator.get_state()] + [
        s.generator.get_state() for s in network.stages if isinstance(s, StepDropout)]
    out = {}
    for key, value in parts.items():
        h = hashlib.sha256()
        _digest(h, value)
        out[key] = h.hexdigest()[:32]
    return out


def environment() -> dict[str, str]:
    """What the bits of a CPU run depend on besides the code: torch's version and the vector instructions its
    kernels use (another machine may round a transcendental function or a product differently)."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "fast_bfloat16": str(fast_bfloat16("cpu"))}   # crossbar.noise_variance_precision = 'auto' follows it


if __name__ == "__main__":
    pinned = {case: epoch_fingerprint(case) for case in CASES}
    pinned["environment"] = environment()
    PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    print(PINNED.read_text())
