"""Two-stage training: the coefficient step against autograd, coefficient gradients by perturbation on a chip
without derivative circuits, the library's choice of derivative circuits, and the digits MLP setting that
used to diverge."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from neurosim.activation import ActivationConfig, ActivationUnit
from neurosim.architectures import NetworkConfig, build_network
from neurosim.config import ConfigError, build
from neurosim.crossbar import CrossbarConfig
from neurosim.data import Dataset, load
from neurosim.device import load_card
from neurosim.layers import AnalogLinear, AnalogNetwork
from neurosim.training import TrainerConfig, TwoStageConfig, make_trainer, needs_derivative_circuits, noise_free
from neurosim.training.coefficients import coefficient_method, perturbation_gradients
from tests.conftest import make_spec

F64 = torch.float64


def tiny_data(n=32, features=6, classes=3, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y, x[:16], y[:16], classes, "tiny")


def mlp(spec, hidden=(5,), features=6, classes=3, act=None, seed=0, derivative=True, input_max=1.0):
    cfg = NetworkConfig(hidden=hidden, activation=act or ActivationConfig(function="sigmoid"),
                        crossbar=CrossbarConfig(input_max=input_max))
    return build_network(cfg, spec, (1, 1, features), classes, seed=seed, derivative_circuits=derivative)


def two_stage(clock=False, **ts) -> TrainerConfig:
    return build(TrainerConfig, {"scheme": "two_stage", "batch_size": 32, "clock": clock,
                                 "two_stage": {"stage1_epochs": 0, "stage2_epochs": 1, **ts}})


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def reference_coefficient_gradients(net, x, y, masks=None):
    """∂C/∂c of every hidden layer by autograd of a plain torch model of the chip (the weights the conductances
    hold, inputs clipped by the DAC, each neuron's gain and offset, the clipped Taylor polynomial, the given
    dropout masks after hidden layers), float64."""
    h = x.reshape(len(x), -1).to(F64)
    leaves = []
    for i, layer in enumerate(net.analog_layers):
        m = layer.crossbar.config.input_max   # the DAC clips at ±input_max; the bias row is driven at input_max
        h = torch.cat([h.clamp(-m, m), torch.full((len(h), 1), m, dtype=F64)], 1) @ layer.crossbar.weights().to(F64)
        unit = layer.activation
        if unit.config.mode != "taylor":
            continue
        c = unit.coefficients.detach().to(F64).clone().requires_grad_(True)
        leaves.append(c)
        a, b = unit.config.input_range
        u = torch.clamp(h, a, b) - unit.config.center
        p = sum(c[k] * u ** k for k in range(len(c)))
        h = p * unit.gain.to(F64) + unit.offset.to(F64)
        if masks is not None:
            h = h * masks[i].to(F64)
    loss = nn.functional.cross_entropy(h, y)
    return torch.autograd.grad(loss, leaves)


def assert_smooth(net, x, margin=0.1):
    """The premise of comparing finite differences with autograd: above the first Taylor layer, no measured
    state sits near a kink of the chip that a coefficient perturbation could cross (a DAC clipping an input, a
    Taylor circuit clipping its pre-activation)."""
    above = False
    with noise_free(net), torch.no_grad():
        h = net.stages[0](x)
        for stage in net.stages[1:]:
            if not isinstance(stage, AnalogLinear):
                h = stage(h)
                continue
            assert not above or float(h.abs().max()) < stage.crossbar.config.input_max - margin
            z = stage.preactivation(h)
            taylor = stage.activation.config.mode == "taylor"
            if above and taylor:
                a, b = stage.activation.config.input_range
                assert a + margin < float(z.min()) and float(z.max()) < b - margin
            above = above or taylor
            h = stage.activate(z)


def scales(unit):
    return 4.0 ** torch.arange(unit.config.terms, dtype=F64)  # input_range (-4, 4) around 0: s = 4


@pytest.mark.parametrize("weights,method", [("bp", "auto"), ("dgc", "bp"), ("bp", "perturbation")])
def test_coefficient_step_is_the_normalized_sgd_step_of_the_autograd_gradient(weights, method):
    """Δc_k = −lr·g_k/(N·n·s^2k): SGD on a_k = c_k s^k, averaged over the n neurons sharing the coefficient and
    divided by the N terms, whichever way the chip gets g (BP exactly; perturbation to its finite-difference
    error)."""
    spec = make_spec(states=4097)
    data = tiny_data()
    net = mlp(spec, hidden=(5,))
    trainer = make_trainer(net, data, two_stage(terms=4, coefficient_lr=0.7, stage1_scheme=weights,
                                                coefficient_gradient=method))
    trainer.switch_to_taylor()
    trainer.stage = 2
    unit = net.analog_layers[0].activation
    before = unit.coefficients.detach().clone().to(F64)
    (g,) = reference_coefficient_gradients(net, data.x_train, data.y_train)
    trainer.run_epochs(1)    # one batch: one step, the weights untouched
    expected = -0.7 * g / (4 * 5 * scales(unit) ** 2)
    change = unit.coefficients.detach().to(F64) - before
    if trainer.coefficient_method == "bp":
        torch.testing.assert_close(change, expected, rtol=2e-4, atol=1e-9)
    else:
        s = scales(unit)
        assert cosine(change * s, expected * s) > 0.99
        torch.testing.assert_close(change * s, expected * s, rtol=0.05, atol=0.02 * float((expected * s).abs().max()))
    assert trainer.coefficient_method == ("perturbation" if method == "perturbation" else "bp")


def test_two_stage_records_both_stages_and_leaves_the_weights_alone_by_default():
    spec = make_spec(states=257)
    data = tiny_data(n=48)
    net = mlp(spec, hidden=(5,))
    cfg = build(TrainerConfig, {"scheme": "two_stage", "batch_size": 16,
                                "two_stage": {"stage1_epochs": 1, "stage2_epochs": 2, "terms": 4}})
    trainer = make_trainer(net, data, cfg)
    rows = trainer.fit()
    assert [r["stage"] for r in rows] == ["stage1", "stage2", "stage2"]
    assert net.analog_layers[0].activation.config.mode == "taylor"
    assert net.analog_layers[1].activation.config.mode == "exact"   # the output layer keeps its circuit
    assert rows[1]["pulses"] == rows[0]["pulses"] and rows[2]["delta_pulses"] == 0
    # Stage 2, coefficients by BP: a forward pass, the output layer's transposed read, no outer product.
    steps = 3
    assert rows[2]["delta_reads"] == steps * 16 * 2 + steps * 16 * 1
    assert rows[2]["delta_digital_ops"] == steps * 2 * 4 * 16 * 5


@pytest.mark.parametrize("difference", ["forward", "central"])
def test_perturbation_gradient_matches_autograd_of_the_noise_free_chip(difference):
    """Every coefficient of two Taylor layers measured in one batched evaluation, on a chip with neuron gain
    and offset mismatch (which BP's coefficient gradient does not see, and a measurement does)."""
    spec = make_spec(states=4097, read_noise=0.05)
    act = ActivationConfig(function="sigmoid", mode="taylor", terms=5, train_coefficients=True, gain_dtod=0.2,
                           offset_dtod=0.1, noise=0.05)
    net = mlp(spec, hidden=(7, 5), act=act, derivative=False, input_max=2.0)
    data = tiny_data()
    assert_smooth(net, data.x_train)
    with noise_free(net):
        grads, c0, passes = perturbation_gradients(net, data.x_train, data.y_train, "cross_entropy", 1e-2,
                                                   difference)
        plain = float(nn.functional.cross_entropy(net(data.x_train), data.y_train))
    assert passes == 1 + (2 if difference == "central" else 1) * 10
    assert c0 == pytest.approx(plain, rel=1e-6)          # block 0 is the unperturbed chip
    refs = reference_coefficient_gradients(net, data.x_train, data.y_train)
    for layer, ref in zip(net.analog_layers[:2], refs, strict=True):
        s = scales(layer.activation)
        got = grads[layer.name].to(F64) / s      # in the circuit's units, where every term weighs alike
        assert cosine(got, ref / s) > 0.99
        torch.testing.assert_close(got, ref / s, rtol=0.05, atol=0.02 * float((ref / s).abs().max()))


@pytest.mark.parametrize("dropout", ["step", "torch"])
def test_perturbation_measures_every_coefficient_under_one_dropout_mask(dropout):
    """The chip keeps its dropout mask while it measures: every block of the evaluation shares the step's mask,
    so the differences see the coefficients alone (a mask per block would swamp them). ``step``: the library's
    StepDropout (the step's mask, tiled); ``torch``: a plain nn.Dropout in a hand-built network."""
    act = ActivationConfig(function="sigmoid", mode="taylor", terms=4, train_coefficients=True)
    spec = make_spec(states=4097)
    data = tiny_data()
    x, y = data.x_train, data.y_train
    wide = CrossbarConfig(input_max=2.0)   # kept outputs doubled: at most 2 x 0.83 (the polynomial), no DAC clip
    if dropout == "step":
        net = build_network(NetworkConfig(hidden=(12,), dropout=0.5, activation=act, crossbar=wide), spec,
                            (1, 1, 6), 3, derivative_circuits=False)
        with net.one_mask_per_step():
            grads, _, _ = perturbation_gradients(net, x, y, "cross_entropy", 1e-2, "central")
            mask = net.stages[2].mask
    else:
        net = AnalogNetwork([nn.Flatten(), AnalogLinear(6, 12, name="fc1", spec=spec, activation=act, crossbar=wide),
                             nn.Dropout(0.5), AnalogLinear(12, 3, name="fc2", spec=spec, crossbar=wide)])
        torch.manual_seed(5)
        grads, _, _ = perturbation_gradients(net, x, y, "cross_entropy", 1e-2, "central")
        torch.manual_seed(5)
        mask = nn.Dropout(0.5)(torch.ones(32, 12))      # the first draw of the measurement
    assert mask is not None and 0 < int((mask == 0).sum()) < mask.numel()
    net.eval()
    assert_smooth(net, x, margin=0.5)
    (ref,) = reference_coefficient_gradients(net, x, y, masks=[mask])
    s = scales(net.analog_layers[0].activation)
    assert cosine(grads["fc1"].to(F64) / s, ref / s) > 0.999


def test_coefficient_sets_evaluate_like_separate_units():
    unit = ActivationUnit(ActivationConfig(function="tanh", mode="taylor", terms=5, gain_dtod=0.1,
                                           input_range=(-3.0, 2.0), center=0.5), 4,
                          generator=torch.Generator().manual_seed(1), dtype=F64)
    x = torch.linspace(-5, 5, 24, dtype=F64).reshape(6, 4)
    sets = unit.coefficients.detach() + torch.tensor([[0.0], [0.1], [-0.3]], dtype=F64)
    with unit.coefficient_sets(sets):
        together = unit(x.repeat(3, 1))
    for m in range(3):
        with torch.no_grad():
            unit.coefficients.copy_(sets[m])
        torch.testing.assert_close(together[6 * m:6 * (m + 1)], unit(x), rtol=1e-12, atol=1e-12)


def test_dgc_two_stage_trains_coefficients_on_a_chip_without_derivative_circuits():
    spec = make_spec(states=4097)
    data = tiny_data()
    cfg = two_stage(clock=True, terms=3, stage1_scheme="dgc", train_weights=True, coefficient_lr=2.0)
    assert not needs_derivative_circuits(cfg) and coefficient_method(cfg) == "perturbation"
    net = mlp(spec, hidden=(5,), derivative=needs_derivative_circuits(cfg))
    trainer = make_trainer(net, data, cfg)
    trainer.switch_to_taylor()
    trainer.stage = 2
    unit = net.analog_layers[0].activation
    before = unit.coefficients.detach().clone().to(F64)
    (g,) = reference_coefficient_gradients(net, data.x_train, data.y_train)
    row = trainer.run_epochs(1)[0]
    change = unit.coefficients.detach().to(F64) - before
    expected = -2.0 * g / (3 * 5 * scales(unit) ** 2)  # the measured step is the BP step, to perturbation error
    assert cosine(change * scales(unit), expected * scales(unit)) > 0.99
    torch.testing.assert_close(change, expected, rtol=0.05, atol=0.01 * float(expected.abs().max()))
    assert row["delta_pulses"] > 0                    # the weights were trained too, by DGC
    # 1 + 3 coefficient measurements and the DGC step's own pass, each a forward pass of the batch (2 reads)
    assert row["delta_reads"] == (1 + 3) * 32 * 2 + 32 * 2 + (6 + 1) * 5 * 32 * 2 + (5 + 1) * 3 * 32 * 2
    with pytest.raises(RuntimeError, match="derivative_circuit=False"):
        unit.derivative(torch.zeros(1, 5))


@pytest.mark.parametrize("settings,field", [
    ({"scheme": "bp"}, "trainer.scheme"),
    ({"scheme": "hybrid"}, "trainer.scheme"),
    ({"scheme": "two_stage"}, "trainer.two_stage.stage1_scheme"),
    ({"scheme": "two_stage", "two_stage": {"stage1_scheme": "dgc", "coefficient_gradient": "bp"}},
     "trainer.two_stage.coefficient_gradient"),
])
def test_schemes_that_read_derivative_circuits_are_refused_on_a_chip_without_them(settings, field):
    cfg = build(TrainerConfig, settings)
    assert needs_derivative_circuits(cfg)
    net = mlp(make_spec(), derivative=False)
    with pytest.raises(ConfigError) as e:
        make_trainer(net, tiny_data(), cfg)
    assert e.value.field == field and "derivative circuits" in str(e.value)


@pytest.mark.parametrize("settings", [
    {"scheme": "dgc"},
    {"scheme": "hybrid", "hybrid": {"layer_schemes": ["dgc", "dgc"]}},
    {"scheme": "two_stage", "two_stage": {"stage1_scheme": "dgc"}},
    {"scheme": "two_stage", "two_stage": {"stage1_scheme": "dgc", "coefficient_gradient": "perturbation"}},
])
def test_dgc_only_settings_need_no_derivative_circuits(settings):
    cfg = build(TrainerConfig, settings)
    assert not needs_derivative_circuits(cfg)
    make_trainer(mlp(make_spec(), derivative=False), tiny_data(), cfg)


def test_a_coefficient_lr_beyond_the_measured_stable_envelope_is_refused():
    build(TrainerConfig, {"two_stage": {"coefficient_lr": 10.0}})
    with pytest.raises(ConfigError) as e:
        build(TrainerConfig, {"two_stage": {"coefficient_lr": 10.5}})
    assert e.value.field == "two_stage.coefficient_lr" and "diverged" in e.value.reason
    made_in_code = dataclasses.replace(TrainerConfig(scheme="two_stage"),
                                       two_stage=TwoStageConfig(coefficient_lr=100.0))
    with pytest.raises(ConfigError) as e:
        make_trainer(mlp(make_spec()), tiny_data(), made_in_code)
    assert e.value.field == "trainer.two_stage.coefficient_lr"


@pytest.fixture
def one_thread():
    """Matrices this small run fastest on one thread (two threads on a busy 2-core machine: 15x the CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("terms,lr", [(4, 1.0), (4, 10.0), (9, 10.0), (3, 0.1)])
def test_joint_training_on_the_digits_mlp_stays_finite_and_learns(terms, lr, one_thread):
    """The setting that diverged (loss ~6,000, every hidden unit clipped): digits MLP 64-32-10, stage 1 BP
    2 epochs, stage 2 weights and coefficients together 3 epochs, weights lr 1 with momentum 0.5."""
    data = load()
    net = build_network(NetworkConfig(hidden=(32,)), load_card("ideal"), data.image_shape, data.classes, seed=1)
    cfg = build(TrainerConfig, {"scheme": "two_stage", "clock": False, "learning_rate": 1.0, "momentum": 0.5,
                                "two_stage": {"stage1_epochs": 2, "stage2_epochs": 3, "terms": terms,
                                              "train_weights": True, "coefficient_lr": lr}})
    rows = make_trainer(net, data, cfg, seed=1).fit()
    losses = [r["train_loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[1]                      # stage 2 lowers the cost further
    assert rows[-1]["test_accuracy"] > 0.85            # chance: 0.1
    coefficients = net.analog_layers[0].activation.coefficients.detach()
    assert coefficients[0] != 0.5                      # the coefficients were trained


@pytest.mark.parametrize("weights,method,train_weights", [
    ("bp", "perturbation", True), ("dgc", "perturbation", True), ("dgc", "bp", True), ("bp", "bp", False),
    ("dgc", "perturbation", False)])
def test_a_stage_two_step_draws_one_dropout_mask(weights, method, train_weights, monkeypatch):
    """Coefficient and weight measurements of a step share the step's one dropout mask."""
    cfg = NetworkConfig(hidden=(6,), dropout=0.3)
    net = build_network(cfg, make_spec(states=257), (1, 1, 6), 3)
    trainer = make_trainer(net, tiny_data(), two_stage(terms=3, stage1_scheme=weights, coefficient_gradient=method,
                                                       train_weights=train_weights))
    trainer.switch_to_taylor()
    trainer.stage = 2
    drop = net.stages[2]
    draws = []
    original = type(drop)._draw
    monkeypatch.setattr(drop, "_draw", lambda x: draws.append(tuple(x.shape)) or original(drop, x))
    before = net.analog_layers[0].activation.coefficients.detach().clone()
    row = trainer.run_epochs(1)[0]           # one batch of 32: one step
    assert draws == [(32, 6)]
    assert math.isfinite(row["train_loss"])
    assert not torch.equal(net.analog_layers[0].activation.coefficients.detach(), before)
