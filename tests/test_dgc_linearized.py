"""Linearized DGC's validity envelope: the expected exact measurement it is checked against, the refusal of
the issue's case (Ag:a-Si, 6-bit ADC), acceptance where it agrees with exact DGC, and a check that leaves the
run's random numbers alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.config import ConfigError, build
from neurosim.crossbar import CrossbarConfig
from neurosim.data import load
from neurosim.device import load_card
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import dgc_exact, dgc_linearized
from neurosim.training.dgc_envelope import (
    MIN_COSINE,
    _converters,
    check_linearized_validity,
    expected_differences,
    linearized_agreement,
    real_perturbations,
)
from tests.conftest import make_spec
from tests.test_training import cosine, mlp, noisy_cnn, tiny_data


def digits_mlp(bits, read_noise=0.0, neuron_noise=0.0, c2c=None):
    """The issue's setting: the 64-16-10 digits MLP on the Ag:a-Si card."""
    spec = load_card("ag_asi")
    spec = dataclasses.replace(spec, read_noise=read_noise, **({} if c2c is None else {"c2c": c2c}))
    cfg = NetworkConfig(hidden=(16,), activation=ActivationConfig(function="sigmoid", noise=neuron_noise),
                        crossbar=CrossbarConfig(adc_bits=bits))
    return build_network(cfg, spec, (1, 8, 8), 10, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run many small forward passes, which a second thread only slows down on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch():
    data = load()
    return data.x_train[:32], data.y_train[:32]


LINEARIZED = build(DGCConfig, {"mode": "linearized", "perturbation_pulses": 1})


def test_refuses_the_issues_case_ag_asi_with_a_6_bit_adc(batch):
    x, y = batch
    net = digits_mlp(6)
    with pytest.raises(ConfigError) as err:
        check_linearized_validity(net, net.analog_layers, x, y, "cross_entropy", LINEARIZED, sample=48)
    assert err.value.field == "training.dgc.mode"
    assert "layer fc1" in str(err.value) and "ADC step 0.387" in str(err.value)
    assert "\n" not in str(err.value)


def test_exact_mode_is_not_checked(batch):
    x, y = batch
    net = digits_mlp(6)
    assert check_linearized_validity(net, net.analog_layers, x, y, "cross_entropy", build(DGCConfig, {})) == []


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_expected_differences_without_noise_are_exact_dgc(difference):
    """Noise-free, the measurement the check compares with is exact DGC's, through tiles, DAC and ADCs."""
    spec = make_spec(states=65, nl_ltp=3.0, nl_ltd=-2.0, g_min_dtod=0.1, nl_dtod=0.1)
    net = mlp(spec, hidden=(4,), crossbar=CrossbarConfig(tile_rows=4, tile_cols=3, adc_bits=6, adc_range=4.0,
                                                         dac_bits=6))
    data = tiny_data()
    x, y = data.x_train[:8], data.y_train[:8]
    cfg = build(DGCConfig, {"difference": difference, "perturbation_pulses": 2})
    for layer in net.analog_layers:
        exact, _ = dgc_exact(net, layer, x, y, "cross_entropy", cfg)
        cells = torch.arange(exact.numel())
        measured = expected_differences(net, layer, x, y, "cross_entropy", cells, real_perturbations(net, layer, cfg),
                                        draws=1)
        dw = 2 * cfg.perturbation_pulses * layer.crossbar.dw_pulse if difference == "central" else \
            cfg.perturbation_pulses * layer.crossbar.dw_pulse
        torch.testing.assert_close(measured[:, 0].float(), exact.reshape(-1) * dw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("read_noise", [0.05, 0.2])
def test_expected_differences_are_the_mean_of_independent_exact_measurements(read_noise):
    """With read noise, neuron noise and a coarse ADC, the common-random-number average equals the mean of
    exact DGC's own noisy measurements: every weight within 5 standard errors of the two means. At 25 % read
    noise the ADCs count as dithered and are replaced by their expectation; at 5 % they are not."""
    spec = make_spec(states=65, read_noise=read_noise)
    act = ActivationConfig(function="sigmoid", noise=0.02)
    net = mlp(spec, hidden=(3,), act=act, crossbar=CrossbarConfig(adc_bits=5, adc_range=4.0), seed=1)
    data = tiny_data()
    x, y = data.x_train[:16], data.y_train[:16]
    assert _converters(net, x)["fc2"].adc_dithered == (read_noise > 0.1)
    cfg = build(DGCConfig, {"perturbation_dw": 0.3})
    layer = net.analog_layers[1]
    runs = 200
    exact = torch.stack([dgc_exact(net, layer, x, y, "cross_entropy", cfg)[0].reshape(-1) for _ in range(runs)])
    exact = exact.double() * cfg.perturbation_dw
    cells = torch.arange(exact.shape[1])
    crn = expected_differences(net, layer, x, y, "cross_entropy", cells, real_perturbations(net, layer, cfg),
                               draws=256)
    se = (exact.var(0) / runs + crn.var(1) / crn.shape[1]).sqrt()
    assert bool(((exact.mean(0) - crn.mean(1)).abs() < 5 * se).all())
    assert float(exact.mean(0).abs().max()) > 3 * float(se.max())  # the comparison can tell the means apart
    assert float(crn.std(1).mean()) < 0.75 * float(exact.std(0).mean())  # and the averaged difference is quieter


def test_accepted_noise_free_cases_agree_with_exact_dgc(batch):
    """Where the check accepts (ideal or 16-bit ADCs), linearized DGC's own gradient has a cosine above the
    threshold with exact DGC's, layer by layer (noise-free and without cycle-to-cycle noise: deterministic)."""
    x, y = batch
    for bits in (None, 16):
        net = digits_mlp(bits, c2c=0.0)
        found = check_linearized_validity(net, net.analog_layers, x, y, "cross_entropy", LINEARIZED, sample=48)
        assert [a.layer for a in found] == ["fc1", "fc2"]
        for layer in net.analog_layers:
            exact, _ = dgc_exact(net, layer, x, y, "cross_entropy", LINEARIZED)
            lin, _ = dgc_linearized(net, layer, x, y, "cross_entropy", LINEARIZED)
            assert cosine(exact, lin) > MIN_COSINE, (bits, layer.name)


def test_read_noise_that_dithers_the_adc_makes_the_6_bit_case_valid(batch):
    """Read noise of sigma ≈ the ADC step smooths the staircase: accepted at 10 %, refused at 1 % read noise."""
    x, y = batch
    net = digits_mlp(6, read_noise=0.1)
    found = check_linearized_validity(net, net.analog_layers, x, y, "cross_entropy", LINEARIZED, sample=32)
    assert all(a.cosine > MIN_COSINE and a.draws >= 16 for a in found)
    net = digits_mlp(6, read_noise=0.01)
    fc1 = linearized_agreement(net, net.analog_layers[0], x, y, "cross_entropy", LINEARIZED, sample=32)
    assert fc1.cosine < MIN_COSINE


def test_the_check_leaves_the_runs_random_numbers_alone():
    """Same seed, same numbers: after the check, a network gives an unchecked twin's linearized gradients and
    outputs bit for bit, with read noise, neuron noise, cycle-to-cycle noise and dropout (a CNN with tiles,
    DAC and ADC)."""
    spec = make_spec(states=65, nl_ltp=2.0, nl_ltd=-2.0, read_noise=0.05, c2c=0.02)
    nets = [noisy_cnn(spec, seed=4) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 2, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    results = []
    for checked, net in zip((True, False), nets, strict=True):
        torch.manual_seed(5)
        if checked:
            for layer in net.analog_layers:
                linearized_agreement(net, layer, x, y, "cross_entropy", LINEARIZED, sample=6, draws=2, max_draws=4)
        results.append([dgc_linearized(net, layer, x, y, "cross_entropy", LINEARIZED)[0]
                        for layer in net.analog_layers] + [net(x)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_the_trainer_refuses_linearized_dgc_outside_its_envelope_before_training(batch):
    from neurosim.config import build
    from neurosim.data import Dataset
    from neurosim.training import TrainerConfig, make_trainer

    x, y = batch
    net = digits_mlp(6)
    before = [layer.crossbar.plus.g.clone() for layer in net.analog_layers]
    cfg = build(TrainerConfig, {"scheme": "dgc", "epochs": 1, "dgc": {"mode": "linearized"}})
    trainer = make_trainer(net, Dataset(x, y, x, y, 10, "digits"), cfg)
    with pytest.raises(ConfigError, match=r"training\.dgc\.mode"):
        trainer.fit()
    assert trainer.epoch == 0
    assert all(torch.equal(layer.crossbar.plus.g, g) for layer, g in zip(net.analog_layers, before, strict=True))
