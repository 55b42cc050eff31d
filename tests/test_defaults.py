"""Defaults that use the device: a network trains on every shipped card as it comes, an epoch that programs
nothing says so, pulse timing and energy are the card's, and drift does not depend on the recording."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from neurosim.architectures import NetworkConfig, build_network, default_init_scale
from neurosim.config import ConfigError, build
from neurosim.crossbar import CrossbarConfig
from neurosim.data import DataConfig, Dataset, load
from neurosim.device import load_card, shipped_cards
from neurosim.engine import Engine, HardwareTable, LayerFootprint
from neurosim.layers import AnalogLinear, AnalogNetwork
from neurosim.training import TrainerConfig, make_engine, make_trainer
from neurosim.training.base import MIN_PULSE_RATE, NoProgrammingWarning
from tests.conftest import make_spec


@pytest.fixture(scope="module")
def digits():
    return load(build(DataConfig, {}), seed=0)


def small_data(digits: Dataset, n: int = 320) -> Dataset:
    return Dataset(digits.x_train[:n], digits.y_train[:n], digits.x_test[:160], digits.y_test[:160], 10, "digits")


def test_the_default_initial_weights_span_a_sensible_part_of_the_window():
    assert CrossbarConfig().rounding == "stochastic"
    assert default_init_scale(64, 1.0) == 0.75            # 6/sqrt(64)
    assert default_init_scale(16, 1.0) == 1.0             # never past the window
    assert default_init_scale(64, 0.5) == 0.5
    net = build_network(NetworkConfig(hidden=(100,)), load_card("ag_asi"), (1, 8, 8), 10, seed=0)
    fc1, fc2 = net.analog_layers
    for layer, bound in ((fc1, 0.75), (fc2, 0.6)):
        w = layer.crossbar.believed
        # uniform in ±bound, then snapped to reachable levels (each device by at most half a step): the largest
        # of thousands of draws lies within 1 % of the bound, give or take the snap
        snap = layer.crossbar.dw_pulse
        assert 0.99 * bound - snap < float(w.abs().max()) <= bound + snap
    # on Ag:a-Si (96 potentiation and 99 depression pulses across the window, a pair pulse moving the weight
    # by 1/96 + 1/99 of w_max) the first layer starts up to 36.6 pair pulses from mid-window
    assert 0.75 / fc1.crossbar.dw_pulse == pytest.approx(0.75 / (1 / 96 + 1 / 99))
    explicit = build_network(NetworkConfig(hidden=(100,), init_scale=0.1), load_card("ag_asi"), (1, 8, 8), 10)
    assert all(float(layer.crossbar.believed.abs().max()) <= 0.1 for layer in explicit.analog_layers)


def test_a_64_100_10_mlp_trains_on_every_shipped_card_with_the_defaults(digits):
    """The measurement of docs/devices.md ("Defaults"), one seed and 3 epochs: every card learns (chance is
    0.1; the old defaults left every card between 0.05 and 0.35) and no epoch warns."""
    accuracy = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoProgrammingWarning)
        for name, spec in shipped_cards().items():
            net = build_network(NetworkConfig(hidden=(100,)), spec, digits.image_shape, digits.classes, seed=0)
            rows = make_trainer(net, digits, build(TrainerConfig, {"epochs": 3, "clock": False}), seed=0).fit()
            accuracy[name] = rows[-1]["test_accuracy"]
            assert all(row["pulse_rate"] > 5 * MIN_PULSE_RATE for row in rows), name
    assert min(accuracy.values()) > 0.6, accuracy


def test_an_epoch_that_programs_nothing_warns_and_says_so_in_its_row(digits):
    data = small_data(digits)
    spec = load_card("gst_pcm")                       # 16 states: a pulse is 2/15 of w_max
    quiet = NetworkConfig(hidden=(16,), crossbar=CrossbarConfig(rounding="deterministic"))
    net = build_network(quiet, spec, data.image_shape, data.classes, seed=0)
    cfg = build(TrainerConfig, {"epochs": 1, "learning_rate": 1e-3, "clock": False})
    with pytest.warns(NoProgrammingWarning, match="epoch 1: the weight updates fired 0 pulses.*use 'stochastic'"):
        rows = make_trainer(net, data, cfg).fit()
    assert rows[0]["pulse_rate"] == 0.0 and math.isnan(rows[0]["sim_time_s"])
    # The same updates with stochastic rounding fire pulses in proportion: no warning.
    net = build_network(NetworkConfig(hidden=(16,)), spec, data.image_shape, data.classes, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoProgrammingWarning)
        rows = make_trainer(net, data, build(TrainerConfig, {"epochs": 1, "learning_rate": 0.1})).fit()
    # the rate the engine counted, device pulses per weight and step
    steps, weights = math.ceil(320 / 32), 65 * 16 + 17 * 10
    assert rows[0]["pulse_rate"] == pytest.approx(rows[0]["delta_pulses"] / (steps * weights), rel=1e-12)
    # Stochastic rounding at a tiny learning rate fires too few pulses: the advice is not to switch to it.
    net = build_network(NetworkConfig(hidden=(16,)), spec, data.image_shape, data.classes, seed=0)
    with pytest.warns(NoProgrammingWarning, match="With stochastic rounding") as caught:
        make_trainer(net, data, build(TrainerConfig, {"epochs": 1, "learning_rate": 1e-6, "clock": False})).fit()
    assert all("use 'stochastic'" not in str(w.message) for w in caught)


def test_pulse_timing_and_energy_come_from_the_card(digits):
    data = small_data(digits, 64)
    pcmo = load_card("pcmo")                          # 1 ms pulses at ±2 V (Jerry et al. 2017)
    net = build_network(NetworkConfig(hidden=(8,)), pcmo, data.image_shape, data.classes, seed=0)
    trainer = make_trainer(net, data, build(TrainerConfig, {"epochs": 1}))
    hw = trainer.engine.hardware
    g_mid = 0.5 * (pcmo.g_min + pcmo.g_max)
    assert hw.pulse_s == 1e-3
    assert hw.pulse_j == pytest.approx(4.0 * g_mid * 1e-3, rel=1e-12)
    trainer.fit()
    ev = trainer.engine.events()
    program = ev[ev["op"] == b"program"]
    slots = program["duration_s"] / 1e-3              # each program event lasts its slots x 1 ms
    assert len(program) and np.all(slots >= 1) and np.allclose(slots, np.round(slots), rtol=0, atol=1e-9)
    np.testing.assert_allclose(program["energy_j"], program["count"] * hw.pulse_j, rtol=1e-12)
    # A table that sets the pulse width moves what is derived from it (the energy).
    hw = make_engine(net, HardwareTable(pulse_s=1e-6)).hardware
    assert hw.pulse_s == 1e-6
    assert hw.pulse_j == pytest.approx(4.0 * g_mid * 1e-6, rel=1e-12)


def test_layers_on_cards_that_bill_pulses_differently_need_the_table_to_say_how():
    layers = [AnalogLinear(4, 3, name="a", spec=load_card("pcmo")),
              AnalogLinear(3, 2, name="b", spec=load_card("ag_asi"))]
    net = AnalogNetwork([torch.nn.Flatten(), *layers])
    with pytest.raises(ConfigError, match=r"hardware\.pulse_s"):
        make_engine(net)
    hw = make_engine(net, HardwareTable(pulse_s=1e-6, pulse_j=1e-12)).hardware
    assert (hw.pulse_s, hw.pulse_j) == (1e-6, 1e-12)


def test_drift_is_the_same_whether_the_clock_records_or_not(digits):
    """The device ages on the chip's clock; turning off the recording (clock = false) must not stop it."""
    data = small_data(digits, 128)
    spec = make_spec(states=33, drift_nu=0.1, drift_t0=1e-6)
    chips = {}
    for clock in (True, False):
        net = build_network(NetworkConfig(hidden=(8,)), spec, data.image_shape, data.classes, seed=3)
        trainer = make_trainer(net, data, build(TrainerConfig, {"epochs": 2, "clock": clock}), seed=3)
        rows = trainer.fit()
        assert trainer.engine.timed and trainer.engine.enabled == clock
        chips[clock] = [layer.crossbar for layer in net.analog_layers]
        assert math.isnan(rows[-1]["sim_time_s"]) != clock
    for on, off in zip(chips[True], chips[False], strict=True):
        for a, b in ((on.plus, off.plus), (on.minus, off.minus)):
            assert a.time_s == b.time_s > 10 * spec.drift_t0    # drifting: the clock passed t0
            assert torch.equal(a.g, b.g) and torch.equal(a.t_programmed, b.t_programmed)
            assert torch.equal(a.conductance(), b.conductance())
            assert not torch.equal(a.conductance(), a.g)           # drift changed what the chip reads


def test_a_trainer_refuses_an_engine_that_stops_the_clock_of_drifting_devices(digits):
    spec = make_spec(drift_nu=0.1)
    net = build_network(NetworkConfig(hidden=(4,)), spec, (1, 8, 8), 10)
    engine = Engine(HardwareTable(), [LayerFootprint(**layer.footprint()) for layer in net.analog_layers],
                    enabled=False)
    with pytest.raises(ConfigError, match="keep_time"):
        make_trainer(net, small_data(digits, 32), build(TrainerConfig, {"epochs": 1}), engine=engine)
    # Without drift the clock may stay off entirely (the fast path of clock = false).
    assert not make_engine(build_network(NetworkConfig(hidden=(4,)), make_spec(), (1, 8, 8), 10),
                           enabled=False).timed
