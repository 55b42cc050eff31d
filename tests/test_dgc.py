"""DGC as the chip does it: the batched measurements equal the sequential procedure (``dgc_sequential``) in
distribution for every layer, with every perturbation mode; one dropout mask per step; float64 measurements;
what the perturbations fire and read is billed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neurosim.activation import ActivationConfig
from neurosim.architectures import NetworkConfig, build_network
from neurosim.config import ConfigError, build
from neurosim.crossbar import CrossbarConfig
from neurosim.data import Dataset
from neurosim.training import TrainerConfig, make_trainer, noise_free
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import dgc_exact, dgc_measure, dgc_sequential
from tests.conftest import make_spec


def tiny_data(n=48, features=3, classes=3, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 1, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return Dataset(x, y, x[:16], y[:16], classes, "tiny")


def net_of(spec, hidden=(2,), features=3, act=None, crossbar=None, seed=0, dropout=0.0):
    cfg = NetworkConfig(hidden=hidden, activation=act or ActivationConfig(function="sigmoid"),
                        crossbar=crossbar or CrossbarConfig(), dropout=dropout)
    return build_network(cfg, spec, (1, 1, features), 3, seed=seed, derivative_circuits=False)


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def true_gradient(net, layer, x, y):
    """Autograd through the noise-free non-ideal chip, in float64."""
    w = layer.crossbar.weights().double().clone().requires_grad_(True)
    with noise_free(net):
        for other in net.analog_layers:
            other.crossbar.read_dtype = torch.float64
        try:
            out = net(x.double(), mode="linearized", weights={layer.name: w})
        finally:
            for other in net.analog_layers:
                other.crossbar.read_dtype = other.crossbar.dtype
        loss = nn.functional.cross_entropy(out.double(), y)
    return torch.autograd.grad(loss, w)[0]


def assert_same_distribution(batched: torch.Tensor, loop: torch.Tensor, runs: int) -> None:
    """Per weight: means within 5 standard errors, variances within 5 sigma of the log variance ratio."""
    se = torch.sqrt((batched.var(0) + loop.var(0)) / runs)
    assert bool(((batched.mean(0) - loop.mean(0)).abs() <= 5 * se + 1e-9).all())
    log_ratio = (batched.var(0) / loop.var(0)).log()
    assert bool((log_ratio.abs() < 5 * math.sqrt(4 / (runs - 1))).all()), log_ratio


@pytest.mark.parametrize("hidden", [(2,), (2, 2)], ids=["two_layers", "three_layers"])
def test_batched_dgc_equals_the_sequential_chip_in_distribution_for_every_layer(hidden):
    """Read noise and neuron noise on: every measurement of the batch sees fresh noise in every layer, as the
    chip's sequence does (with one shared read of the layers below, the spread of the upper layers' gradients
    collapses: the issue measured 200x less variance)."""
    spec = make_spec(states=65, read_noise=0.03)
    act = ActivationConfig(function="sigmoid", noise=0.02)
    data = tiny_data()
    x, y = data.x_train[:6], data.y_train[:6]
    cfg = build(DGCConfig, {"perturbation_dw": 0.05})
    runs = 120
    nets = [net_of(spec, hidden, act=act, seed=7), net_of(spec, hidden, act=act, seed=7)]
    for lb, ls in zip(nets[0].analog_layers, nets[1].analog_layers, strict=True):
        batched = torch.stack([dgc_exact(nets[0], lb, x, y, "cross_entropy", cfg)[0] for _ in range(runs)])
        loop = torch.stack([dgc_sequential(nets[1], ls, x, y, "cross_entropy", cfg)[0] for _ in range(runs)])
        assert_same_distribution(batched.double(), loop.double(), runs)


def test_one_shared_read_of_the_layers_below_is_an_approximation_that_hides_their_noise():
    """``lower_reads = "shared"`` reads the hidden layer once per step: its neuron noise cancels between the
    base and the perturbed measurements, and the output layer's gradient loses almost all its spread."""
    spec = make_spec(states=65)
    act = ActivationConfig(function="sigmoid", noise=0.02)
    data = tiny_data()
    x, y = data.x_train[:6], data.y_train[:6]
    net = net_of(spec, (2,), act=act, seed=7)
    top = net.analog_layers[1]
    runs = 60
    spread = {}
    for reads in ("fresh", "shared"):
        cfg = build(DGCConfig, {"perturbation_dw": 0.05, "lower_reads": reads})
        spread[reads] = float(torch.stack([dgc_exact(net, top, x, y, "cross_entropy", cfg)[0]
                                           for _ in range(runs)]).var(0).mean())
    assert spread["shared"] < 1e-2 * spread["fresh"]


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("mode", ["pulse", "pulse_verify"])
@pytest.mark.parametrize("difference", ["forward", "central"])
def test_pulse_perturbations_leave_the_same_restore_errors_as_the_sequence(mode, difference, chunk):
    """Without noise the chip's sequence is deterministic: on an asymmetric nonlinear device the batch gives
    the same gradients and leaves the same conductances as the one-by-one procedure, restore errors (which
    every later measurement sees) included."""
    spec = make_spec(states=33, nl_ltp=3.0, nl_ltd=-5.0, g_min_dtod=0.1, step_dtod=0.2)
    data = tiny_data()
    x, y = data.x_train[:8], data.y_train[:8]
    xb = CrossbarConfig(tile_rows=3, tile_cols=2)
    cfg = build(DGCConfig, {"perturbation": mode, "difference": difference, "perturbation_pulses": 2,
                            "verify_tolerance": 0.02, "chunk": chunk})   # 5: batches that end inside a cell
    nets = [net_of(spec, (3,), crossbar=xb, seed=1), net_of(spec, (3,), crossbar=xb, seed=1)]
    for lb, ls in zip(nets[0].analog_layers, nets[1].analog_layers, strict=True):
        before = lb.crossbar.plus.g.clone()
        m = dgc_measure(nets[0], lb, x, y, "cross_entropy", cfg)
        loop, c0 = dgc_sequential(nets[1], ls, x, y, "cross_entropy", cfg)
        assert m.cost == pytest.approx(c0, rel=1e-6)   # float32 conductances, float64 measurements
        torch.testing.assert_close(m.grad, loop, rtol=1e-4, atol=1e-4)
        for a, b in zip(lb.crossbar._arrays(), ls.crossbar._arrays(), strict=True):
            torch.testing.assert_close(a.g, b.g, rtol=1e-6, atol=0)
        moved = (lb.crossbar.plus.g - before).abs().max()
        if mode == "pulse":
            assert moved > 0  # the opposite pulse does not land where the cell was
        assert m.plan.pulses > 0 and m.plan.bias_changes == 0


def test_pulse_restore_errors_match_the_sequence_in_distribution_with_cycle_noise():
    spec = make_spec(states=33, nl_ltp=2.0, nl_ltd=-2.0, c2c=0.01)
    data = tiny_data()
    x, y = data.x_train[:8], data.y_train[:8]
    cfg = build(DGCConfig, {"perturbation": "pulse"})
    runs = 150
    nets = [net_of(spec, (2,), seed=3), net_of(spec, (2,), seed=3)]
    start = [[a.g.clone() for a in n.analog_layers[0].crossbar._arrays()] for n in nets]
    methods = (dgc_exact, dgc_sequential)
    grads, finals = [[], []], [[], []]
    for r in range(runs):
        for k, (net, method) in enumerate(zip(nets, methods, strict=True)):
            layer = net.analog_layers[0]
            for a, g in zip(layer.crossbar._arrays(), start[k], strict=True):  # the same chip every run
                a.g = g.clone()
                a.version += 1
            layer.crossbar.noise_generator.manual_seed(1000 * k + r)
            grads[k].append(method(net, layer, x, y, "cross_entropy", cfg)[0])
            finals[k].append(layer.crossbar.weights().clone())
    assert_same_distribution(torch.stack(grads[0]).double(), torch.stack(grads[1]).double(), runs)
    assert_same_distribution(torch.stack(finals[0]).double(), torch.stack(finals[1]).double(), runs)


def test_temporary_perturbation_leaves_the_stored_state_untouched_and_fires_no_pulse():
    spec = make_spec(states=33, nl_ltp=2.0, c2c=0.02, read_noise=0.01)
    net = net_of(spec, (3,), seed=2)
    data = tiny_data()
    layer = net.analog_layers[0]
    before = [a.g.clone() for a in layer.crossbar._arrays()]
    m = dgc_measure(net, layer, data.x_train[:8], data.y_train[:8], "cross_entropy", build(DGCConfig, {}))
    for a, g in zip(layer.crossbar._arrays(), before, strict=True):
        assert torch.equal(a.g, g)
    cells = layer.crossbar.in_features * layer.crossbar.out_features
    assert (m.plan.pulses, m.plan.cycles, m.plan.bias_changes) == (0, cells, 2 * cells)


@pytest.mark.parametrize("dw", [1e-3, 1e-4, 1e-5])
def test_noise_free_dgc_matches_the_true_gradient_at_every_perturbation_size(dw):
    """float64 measurements: the cost difference of a tiny perturbation survives (float32 gave cosine 0.76 at
    1e-4 on the hidden layer)."""
    spec = make_spec(states=257, nl_ltp=2.0, nl_ltd=-3.0, g_min_dtod=0.2, step_dtod=0.2)
    act = ActivationConfig(function="sigmoid", gain_dtod=0.2, offset_dtod=0.1)
    net = net_of(spec, (6,), features=6, act=act, seed=3)
    data = tiny_data(features=6)
    x, y = data.x_train[:24], data.y_train[:24]
    cfg = build(DGCConfig, {"perturbation_dw": dw, "difference": "central"})
    for layer in net.analog_layers:
        g, _ = dgc_exact(net, layer, x, y, "cross_entropy", cfg)
        assert cosine(g.double(), true_gradient(net, layer, x, y)) > 0.999, layer.name


def test_one_dropout_mask_per_step_is_shared_by_every_measurement():
    """With dropout the batched gradient of a step is deterministic given the step's mask and equals the
    sequential chip's with the same mask (noise off); a new mask per perturbation made the fc1 gradient a
    thousand times noisier than the gradient itself."""
    spec = make_spec(states=257)
    data = tiny_data(features=4)
    x, y = data.x_train[:16], data.y_train[:16]
    cfg = build(DGCConfig, {"perturbation_dw": 0.01})
    nets = [net_of(spec, (6,), features=4, seed=5, dropout=0.3) for _ in range(2)]
    with nets[0].one_mask_per_step(), nets[1].one_mask_per_step():
        for lb, ls in zip(nets[0].analog_layers, nets[1].analog_layers, strict=True):
            first, _ = dgc_exact(nets[0], lb, x, y, "cross_entropy", cfg)
            again, _ = dgc_exact(nets[0], lb, x, y, "cross_entropy", cfg)
            loop, _ = dgc_sequential(nets[1], ls, x, y, "cross_entropy", cfg)
            assert torch.equal(first, again)
            torch.testing.assert_close(first, loop, rtol=1e-5, atol=1e-6)


def test_lenet_honours_dropout_zero():
    spec = make_spec(states=65)
    cfg = NetworkConfig(architecture="lenet", dropout=0.0)
    net = build_network(cfg, spec, (1, 28, 28), 10)
    assert not any("Dropout" in type(s).__name__ for s in net.stages)
    net = build_network(NetworkConfig(architecture="lenet"), spec, (1, 28, 28), 10)
    assert sum("Dropout" in type(s).__name__ for s in net.stages) == 2


@pytest.mark.parametrize("mode", ["temporary", "pulse", "pulse_verify"])
def test_the_engine_bills_what_the_perturbations_did(mode):
    spec = make_spec(states=65, read_noise=0.01)
    data = tiny_data(n=16)
    net = net_of(spec, (2,), seed=0)
    cfg = build(TrainerConfig, {"scheme": "dgc", "epochs": 1, "batch_size": 16,
                                "dgc": {"perturbation": mode, "difference": "central"}})
    trainer = make_trainer(net, data, cfg)
    plans = []
    original = trainer.dgc_gradients

    def spy(layers, x, y):
        out = original(layers, x, y)
        plans.append({k: (p.cycles, p.pulses, p.cell_reads, p.bias_changes) for k, p in trainer._plans.items()})
        return out

    trainer.dgc_gradients = spy
    trainer.fit()
    row = trainer.history[0]
    cycles = sum(p[0] for step in plans for p in step.values())
    assert row["perturbations"] == cycles == 2 * (4 * 2 + 3 * 3)
    perturb_pulses = sum(p[1] for step in plans for p in step.values())
    ev = trainer.engine.events()
    program = int(ev[ev["op"] == b"program"]["count"].sum())
    assert row["pulses"] == program + perturb_pulses
    if mode == "temporary":
        assert perturb_pulses == 0
    else:
        assert perturb_pulses >= 2 * cycles * (1 if mode == "pulse_verify" else 2)


def test_pulse_sizes_and_exact_changes_are_not_mixed():
    with pytest.raises(ConfigError, match="perturbation_dw"):
        build(DGCConfig, {"perturbation": "pulse", "perturbation_dw": 0.01})


@pytest.mark.parametrize("wires", ["nodal", "approximate"])
@pytest.mark.parametrize("difference", ["forward", "central"])
def test_dgc_measures_through_the_same_wired_read_as_the_chip(wires, difference):
    """r_wire = 50 Ω, noise off: the batched measurements go through the wired read (rank-one updates of the
    tile's network) and equal the sequential chip's."""
    spec = make_spec(states=129, g_min=1e-6, g_max=1e-4)
    xb = CrossbarConfig(tile_rows=4, tile_cols=3, wire_resistance=wires, r_wire=50.0)
    data = tiny_data(features=4)
    x, y = data.x_train[:8], data.y_train[:8]
    cfg = build(DGCConfig, {"perturbation_dw": 0.02, "difference": difference})
    nets = [net_of(spec, (3,), features=4, crossbar=xb, seed=4) for _ in range(2)]
    ideal = net_of(spec, (3,), features=4, crossbar=CrossbarConfig(tile_rows=4, tile_cols=3), seed=4)
    tol = 1e-6 if wires == "nodal" else 1e-4
    for lb, ls, li in zip(nets[0].analog_layers, nets[1].analog_layers, ideal.analog_layers, strict=True):
        batched, c0 = dgc_exact(nets[0], lb, x, y, "cross_entropy", cfg)
        loop, c0_loop = dgc_sequential(nets[1], ls, x, y, "cross_entropy", cfg)
        assert c0 == pytest.approx(c0_loop, rel=1e-6)
        torch.testing.assert_close(batched, loop, rtol=tol, atol=tol * float(loop.abs().max()))
        unwired, _ = dgc_exact(ideal, li, x, y, "cross_entropy", cfg)
        assert float((unwired - batched).abs().max()) > 0.01 * float(batched.abs().max())  # the wires matter


def test_pulse_perturbations_with_wire_resistance_are_refused_before_the_run():
    spec = make_spec(states=65)
    net = net_of(spec, (2,), crossbar=CrossbarConfig(wire_resistance="nodal", r_wire=1.0))
    cfg = build(TrainerConfig, {"scheme": "dgc", "dgc": {"perturbation": "pulse"}})
    with pytest.raises(ConfigError, match="wire resistance"):
        make_trainer(net, tiny_data(), cfg)


def test_wired_dgc_with_noise_below_matches_the_sequential_chip_in_distribution():
    spec = make_spec(states=129, g_min=1e-6, g_max=1e-4, read_noise=0.02)
    act = ActivationConfig(function="sigmoid", noise=0.02)
    xb = CrossbarConfig(tile_rows=4, tile_cols=3, wire_resistance="nodal", r_wire=20.0)
    data = tiny_data(features=3)
    x, y = data.x_train[:6], data.y_train[:6]
    cfg = build(DGCConfig, {"perturbation_dw": 0.05})
    nets = [net_of(spec, (2,), act=act, crossbar=xb, seed=6) for _ in range(2)]
    runs = 80
    top_b, top_s = nets[0].analog_layers[1], nets[1].analog_layers[1]
    batched = torch.stack([dgc_exact(nets[0], top_b, x, y, "cross_entropy", cfg)[0] for _ in range(runs)])
    loop = torch.stack([dgc_sequential(nets[1], top_s, x, y, "cross_entropy", cfg)[0] for _ in range(runs)])
    assert_same_distribution(batched.double(), loop.double(), runs)


def test_pulse_perturbations_with_read_noise_everywhere_match_the_sequence_in_distribution():
    """Restore errors, fresh reads of the layer below and the read noise of the changed cells (Σ G²) together:
    the output layer's gradients and the conductances left behind have the sequence's distribution."""
    spec = make_spec(states=33, nl_ltp=2.0, nl_ltd=-3.0, read_noise=0.05)
    data = tiny_data()
    x, y = data.x_train[:6], data.y_train[:6]
    cfg = build(DGCConfig, {"perturbation": "pulse", "chunk": 4})
    runs = 100
    nets = [net_of(spec, (2,), seed=8), net_of(spec, (2,), seed=8)]
    tops = [n.analog_layers[1] for n in nets]
    start = [[a.g.clone() for a in top.crossbar._arrays()] for top in tops]
    grads = [[], []]
    for _ in range(runs):
        for k, (net, top, method) in enumerate(zip(nets, tops, (dgc_exact, dgc_sequential), strict=True)):
            for a, g in zip(top.crossbar._arrays(), start[k], strict=True):
                a.g = g.clone()
                a.version += 1
            grads[k].append(method(net, top, x, y, "cross_entropy", cfg)[0])
    assert_same_distribution(torch.stack(grads[0]).double(), torch.stack(grads[1]).double(), runs)
