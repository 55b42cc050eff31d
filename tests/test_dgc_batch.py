"""The batched measurement engine (``dgc_batch``) against the batch it replaced (``tests/dgc_reference.py``, the
same random stream: equal to rounding, and against the sequential chip where the chip is deterministic."""

from __future__ import annotations

import pytest
import torch

from neurosim.activation import ActivationConfig, ActivationUnit
from neurosim.config import build
from neurosim.crossbar import CrossbarConfig
from neurosim.training.config import DGCConfig
from neurosim.training.dgc import _measure, dgc_exact, dgc_sequential, measurement_precision, perturbation_plan
from neurosim.training.dgc_batch import measure_costs
from tests.conftest import make_spec
from tests.dgc_reference import measure_reference
from tests.test_dgc import assert_same_distribution, net_of, tiny_data

SIGMOID = ActivationConfig(function="sigmoid")
NOISY = ActivationConfig(function="sigmoid", noise=0.02)
# neuron noise, mismatch and an output clip that binds (sigmoid of the small outputs sits near 0.5)
CIRCUIT = ActivationConfig(function="sigmoid", noise=0.05, gain_dtod=0.1, offset_dtod=0.05, output_range=(0.0, 0.52))
TILES = CrossbarConfig(tile_rows=2, tile_cols=2)

# name: (card overrides, neuron circuits, hidden widths, crossbar, DGC settings, layers without read noise)
CASES = {
    "noise_free_single_column": ({"g_min_dtod": 0.1}, ActivationConfig(function="sigmoid", gain_dtod=0.1), (3, 2),
                                 TILES, {"perturbation_dw": 0.05, "difference": "central", "chunk": 7}, ()),
    "read_noise_above_only": ({"read_noise": 0.05}, SIGMOID, (3,), CrossbarConfig(tile_rows=2),
                              {"perturbation_dw": 0.05, "chunk": 4}, (0,)),
    "every_noise_fresh_reads": ({"read_noise": 0.03}, NOISY, (3, 2), TILES, {"perturbation_dw": 0.05}, ()),
    "pulse_read_noise_row_states": ({"nl_ltp": 2.0, "nl_ltd": -3.0, "read_noise": 0.05}, SIGMOID, (2,), None,
                                    {"perturbation": "pulse", "chunk": 4}, ()),
    "pulse_noise_free_row_states": ({"nl_ltp": 3.0, "nl_ltd": -5.0, "step_dtod": 0.2}, SIGMOID, (3,), TILES,
                                    {"perturbation": "pulse", "difference": "central", "chunk": 5}, ()),
    "pulse_verify_every_noise": ({"nl_ltp": 2.0, "nl_ltd": -3.0, "read_noise": 0.05, "c2c": 0.01}, NOISY, (3, 2),
                                 TILES, {"perturbation": "pulse_verify", "difference": "central", "chunk": 5}, ()),
    # converters: the cached products are in normalized units and pass the ADC through _convert_own
    "adc_every_noise_fresh_reads": ({"read_noise": 0.03}, NOISY, (3, 2),
                                    CrossbarConfig(tile_rows=2, tile_cols=2, adc_bits=7, adc_range=2.0, dac_bits=6),
                                    {"perturbation_dw": 0.05}, ()),
    "adc_noise_free_single_column": ({"g_min_dtod": 0.1}, SIGMOID, (3, 2),
                                     CrossbarConfig(tile_rows=2, tile_cols=2, adc_bits=7, adc_range=2.0),
                                     {"perturbation_dw": 0.05, "difference": "central", "chunk": 7}, ()),
    # neuron circuits without read noise: the row states' neuron outputs once, each measurement's own noise
    "neuron_noise_shared_inputs": ({}, CIRCUIT, (3, 2), TILES, {"perturbation_dw": 0.05, "chunk": 7}, ()),
    "pulse_neuron_noise_row_states": ({"nl_ltp": 2.0, "nl_ltd": -3.0}, CIRCUIT, (3,),
                                      CrossbarConfig(tile_rows=2, adc_bits=7, adc_range=2.0),
                                      {"perturbation": "pulse", "difference": "central", "chunk": 5}, ()),
    # converters and read noise with restore errors: row states per tile, in ADC steps, chunks across tiles
    "adc_pulse_every_noise_row_states": ({"nl_ltp": 2.0, "nl_ltd": -3.0, "read_noise": 0.05}, NOISY, (3, 2),
                                         CrossbarConfig(tile_rows=2, tile_cols=2, adc_bits=7, adc_range=2.0,
                                                        dac_bits=6),
                                         {"perturbation": "pulse", "difference": "central", "chunk": 9}, ()),
}


def _measured(method, case, layer_index):
    card, act, hidden, xb, settings, quiet = CASES[case]
    data = tiny_data()
    x, y = data.x_train[:6], data.y_train[:6]
    cfg = build(DGCConfig, settings)
    net = net_of(make_spec(states=33, **card), hidden, act=act, seed=7, crossbar=xb)
    for n in quiet:
        net.analog_layers[n].crossbar.noise = False
    layer = net.analog_layers[layer_index]
    plan = perturbation_plan(layer, cfg)
    with measurement_precision(net, torch.float64):
        return method(net, layer, x, y, "cross_entropy", cfg, plan)


@pytest.mark.parametrize("case", list(CASES))
def test_the_engine_equals_the_batch_it_replaced_on_the_same_random_stream(case):
    """Both draw the same numbers in the same order (the lower layers' noise, the perturbed layer's read noise,
    every layer above), so the gradients agree to rounding: shared products, row states and rank-one updates
    change only the order of additions."""
    for n in range(len(CASES[case][2]) + 1):
        new, c_new = _measured(_measure, case, n)
        old, c_old = _measured(measure_reference, case, n)
        assert c_new == c_old
        assert float(old.abs().max()) > 0   # a gradient to compare (coarse converters can zero it)
        torch.testing.assert_close(new, old, rtol=1e-9, atol=1e-9 * float(old.abs().max()))


def test_a_neuron_circuit_finished_apart_equals_its_forward_bit_for_bit():
    """``finish(noiseless(x))`` is ``forward(x)``, also for copies of the same outputs: the same draws from the
    same stream, the same arithmetic."""
    torch.manual_seed(3)
    x = torch.randn(5, 4, dtype=torch.float64)
    units = [ActivationUnit(CIRCUIT, 4, generator=torch.Generator().manual_seed(1)) for _ in range(3)]
    for _ in range(2):   # the streams advance alike
        ref = units[0](x.repeat(3, 1))
        assert torch.equal(units[1].finish(units[1].noiseless(x.repeat(3, 1))), ref)
        # three evaluations of the same outputs, written into their draws
        assert torch.equal(units[2].finish(units[2].noiseless(x), copies=3), ref)
    assert bool((ref == 0.52).any()) and bool((ref < 0.52).any())   # the clip binds somewhere, not everywhere


def test_single_column_measurements_equal_the_sequential_chip():
    """Noise-free chip, three layers in 2x2 tiles: each measurement changes one column, its neuron is evaluated
    alone and the layer above is updated by a rank-one term; the chip's one-by-one procedure agrees."""
    spec = make_spec(states=65, g_min_dtod=0.1, nl_ltp=2.0)
    act = ActivationConfig(function="sigmoid", gain_dtod=0.1, offset_dtod=0.05)
    data = tiny_data()
    x, y = data.x_train[:8], data.y_train[:8]
    for difference in ("forward", "central"):
        cfg = build(DGCConfig, {"perturbation_dw": 0.02, "difference": difference, "chunk": 5})
        nets = [net_of(spec, (3, 2), act=act, crossbar=TILES, seed=2) for _ in range(2)]
        for lb, ls in zip(nets[0].analog_layers, nets[1].analog_layers, strict=True):
            batched, c0 = dgc_exact(nets[0], lb, x, y, "cross_entropy", cfg)
            loop, c0_loop = dgc_sequential(nets[1], ls, x, y, "cross_entropy", cfg)
            assert c0 == pytest.approx(c0_loop, rel=1e-12)
            torch.testing.assert_close(batched, loop, rtol=1e-6, atol=1e-6 * float(loop.abs().max()))


def test_a_limited_measurement_is_the_start_of_the_full_one():
    """``limit`` (benchmarks) measures the first cycles, with the same draws as the full run; the rest is NaN."""
    costs = []
    for limit in (None, 6):   # a whole number of batches: the same draws batch by batch
        card, act, hidden, xb, settings, _ = CASES["every_noise_fresh_reads"]
        data = tiny_data()
        net = net_of(make_spec(states=33, **card), hidden, act=act, seed=7, crossbar=xb)
        layer = net.analog_layers[1]
        cfg = build(DGCConfig, {**settings, "chunk": 2})
        with measurement_precision(net, torch.float64):
            costs.append(measure_costs(net, layer, data.x_train[:6], data.y_train[:6], "cross_entropy", cfg,
                                       perturbation_plan(layer, cfg), limit=limit)[0].reshape(-1))
    assert torch.equal(costs[1][:6], costs[0][:6])
    assert bool(costs[1][6:].isnan().all()) and not bool(costs[0].isnan().any())


@pytest.mark.parametrize("mode", ["pulse", "pulse_verify"])
def test_row_states_with_read_noise_match_the_sequence_in_distribution(mode):
    """The first layer (shared inputs): the restore errors as row states, the read noise of the changed cells
    (Σ G²) and fresh neuron noise above, in 2-row tiles (a batch spans rows of two tiles); the gradients and
    the conductances left behind have the sequential chip's distribution."""
    spec = make_spec(states=33, nl_ltp=2.0, nl_ltd=-3.0, read_noise=0.05, c2c=0.01)
    data = tiny_data()
    x, y = data.x_train[:6], data.y_train[:6]
    cfg = build(DGCConfig, {"perturbation": mode, "chunk": 4, "verify_tolerance": 0.05})
    runs = 100
    nets = [net_of(spec, (2,), act=NOISY, crossbar=CrossbarConfig(tile_rows=2), seed=8) for _ in range(2)]
    firsts = [n.analog_layers[0] for n in nets]
    start = [[a.g.clone() for a in f.crossbar._arrays()] for f in firsts]
    grads, finals = [[], []], [[], []]
    for _ in range(runs):
        for k, (net, first, method) in enumerate(zip(nets, firsts, (dgc_exact, dgc_sequential), strict=True)):
            for a, g in zip(first.crossbar._arrays(), start[k], strict=True):
                a.g = g.clone()
                a.version += 1
            grads[k].append(method(net, first, x, y, "cross_entropy", cfg)[0])
            finals[k].append(first.crossbar.weights().clone())
    assert_same_distribution(torch.stack(grads[0]).double(), torch.stack(grads[1]).double(), runs)
    assert_same_distribution(torch.stack(finals[0]).double(), torch.stack(finals[1]).double(), runs)
