"""Every scheme on every layer type with both differences: one step runs, the gradients are finite, and the
engine's counters add up to what the step did (update pulses plus the perturbations' own pulses)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from neurosim.activation import ActivationConfig
from neurosim.config import build
from neurosim.data import Dataset
from neurosim.layers import AnalogConv2d, AnalogLinear, AnalogNetwork
from neurosim.training import TrainerConfig, make_trainer
from tests.conftest import make_spec

SCHEMES = {
    "bp_transposed_read": {"scheme": "bp", "bp": {"backward": "transposed_read"}},
    "bp_digital_model": {"scheme": "bp", "bp": {"backward": "digital_model"}},
    "bp_true_gradient": {"scheme": "bp", "bp": {"backward": "true_gradient"}},
    "dgc_exact": {"scheme": "dgc", "dgc": {"mode": "exact"}},
    "dgc_exact_pulse": {"scheme": "dgc", "dgc": {"mode": "exact", "perturbation": "pulse"}},
    "dgc_linearized": {"scheme": "dgc", "dgc": {"mode": "linearized"}},
    "hybrid": {"scheme": "hybrid"},
    "two_stage": {"scheme": "two_stage", "two_stage": {"stage1_epochs": 1, "stage2_epochs": 1}},
}


def network(kind: str, spec) -> tuple[AnalogNetwork, Dataset]:
    act = ActivationConfig(function="sigmoid", gain_dtod=0.1, noise=0.01)
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        x = torch.rand(16, 1, 1, 5, generator=g)
        stages = [nn.Flatten(), AnalogLinear(5, 4, name="fc1", spec=spec, activation=act),
                  AnalogLinear(4, 3, name="fc2", spec=spec)]
    else:
        x = torch.rand(16, 1, 5, 5, generator=g)
        stages = [AnalogConv2d(1, 2, 3, name="conv1", spec=spec, activation=act, input_size=5), nn.Flatten(),
                  AnalogLinear(18, 3, name="fc1", spec=spec)]
    y = torch.randint(0, 3, (16,), generator=g)
    return AnalogNetwork(stages), Dataset(x, y, x[:8], y[:8], 3, kind)


def table_card(spec):
    """The card with its exponential curves replaced by the tables they imply (a table-driven device)."""
    tables = {p: tuple(spec.curve(torch.arange(n + 1, dtype=torch.float64), p).tolist())
              for p, n in (("ltp", spec.pulses_ltp), ("ltd", spec.pulses_ltd))}
    return dataclasses.replace(spec, nl_ltp=0.0, nl_ltd=0.0, a_ltp=None, a_ltd=None, nl_dtod=0.0,
                               table_ltp=tables["ltp"], table_ltd=tables["ltd"])


@pytest.mark.parametrize("model", ["exponential", "table"])
@pytest.mark.parametrize("difference", ["forward", "central"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_a_step_of_every_scheme_runs_finite_and_its_counters_add_up(scheme, kind, difference, model):
    spec = make_spec(states=33, nl_ltp=2.0, nl_ltd=-2.0, c2c=0.01, read_noise=0.01, g_min_dtod=0.1)
    if model == "table":
        spec = table_card(spec)
    net, data = network(kind, spec)
    settings = {"epochs": 1, "batch_size": 16, "learning_rate": 0.5, **SCHEMES[scheme]}
    settings["dgc"] = {**settings.get("dgc", {}), "difference": difference}
    trainer = make_trainer(net, data, build(TrainerConfig, settings))
    seen = {"cycles": 0, "pulses": 0, "grads": []}
    update = trainer.update_layers

    def spy(layers, grads):
        seen["grads"] += [g.detach().clone() for g in grads if g is not None]
        for plan in trainer._plans.values():
            seen["cycles"] += plan.cycles
            seen["pulses"] += plan.pulses
        return update(layers, grads)

    trainer.update_layers = spy
    rows = trainer.fit()
    assert seen["grads"] and all(bool(torch.isfinite(g).all()) for g in seen["grads"])
    last = rows[-1]
    assert math.isfinite(last["train_loss"]) and 0.0 <= last["test_accuracy"] <= 1.0
    ev = trainer.engine.events()
    program = int(ev[ev["op"] == b"program"]["count"].sum())
    assert last["pulses"] == program + seen["pulses"]
    assert last["perturbations"] == seen["cycles"] == int(ev[ev["op"] == b"perturb"]["count"].sum())
    per_weight = 2 if difference == "central" else 1
    if scheme.startswith("dgc"):
        weights = sum(layer.crossbar.in_features * layer.crossbar.out_features for layer in net.analog_layers)
        assert seen["cycles"] == per_weight * weights
    if scheme.startswith("bp"):
        assert seen["cycles"] == 0
    for layer in net.analog_layers:
        w = layer.crossbar.weights()
        assert bool(torch.isfinite(w).all()) and float(w.abs().max()) <= layer.crossbar.config.w_max * 1.0001
