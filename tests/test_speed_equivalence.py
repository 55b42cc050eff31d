"""The BP speed work (issue 14) against references that keep the old arithmetic: drift, the read cache, reads in
ADC steps, neuron circuits in place. Exact where the arithmetic is the same, to float tolerance where it is
reordered, in distribution where the noise is concerned (tolerances from the sample size)."""

from __future__ import annotations

import math

import pytest
import torch

from neurosim.activation import ActivationConfig, ActivationUnit
from neurosim.crossbar import Crossbar, CrossbarConfig, quantize
from neurosim.device import DeviceArray, pair_conductances
from neurosim.random_streams import PhiloxStream
from tests.conftest import make_spec


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def drifting_spec(**extra):
    return make_spec(drift_nu=0.05, drift_nu_dtod=0.3, drift_t0=2.5, stuck_at_gmin=0.02, stuck_at_gmax=0.02,
                     g_min_dtod=0.1, read_noise=0.05, **extra)


def aged_array(seed: int, spec=None, dtype=torch.float32) -> DeviceArray:
    a = DeviceArray(spec or drifting_spec(), (40, 30), gen(seed), dtype=dtype)
    a.set_conductance(torch.rand((40, 30), generator=gen(seed + 100), dtype=dtype) * 9e-6 + 1e-6)
    a.advance(3.0)
    a.program(torch.where(torch.rand((40, 30), generator=gen(seed + 200)) < 0.3, 2.0, 0.0).to(dtype))
    a.advance(40.0)  # cells written at t = 0 and at t = 3, read at t = 43; some not older than t0 = 2.5
    return a


# ------------------------------------------------------------------------------------------------- drift
@pytest.mark.parametrize("t0", [1.0, 2.5])
def test_drift_equals_the_power_law(t0):
    # The reference: G·(max(t − t_prog, t0)/t0)^−ν in float64 with pow, as it was computed before.
    a = aged_array(0, drifting_spec() if t0 == 2.5 else make_spec(drift_nu=0.05, drift_nu_dtod=0.3))
    assert a.drifting
    age = (a.time_s - a.t_programmed.double()).clamp(min=a.spec.drift_t0)
    ref = a.g.double() * (age / a.spec.drift_t0).pow(-a.drift_nu.double())
    got = a.conductance()
    torch.testing.assert_close(got.double(), ref, rtol=4e-7, atol=0.0)   # a few float32 roundings
    assert not torch.equal(got, a.g)                                         # drift acted


def test_drift_paths_agree_bit_for_bit():
    # conductance(rows), _now(idx) and pair_conductances share one arithmetic: a pulse starts from the
    # conductance a read sees, and the read cache of a pair equals its arrays' conductances.
    a, b = aged_array(1), aged_array(2)
    full = a.conductance()
    assert torch.equal(a.conductance(25), full[:25])
    idx = torch.tensor([0, 7, 31, 599, 1199])
    assert torch.equal(a._now(idx), full.view(-1)[idx])
    # Different programming times: each array on its own.
    p, q = pair_conductances(a, b, 33)
    assert torch.equal(p, full[:33]) and torch.equal(q, b.conductance()[:33])
    # Equal programming times (the usual pair): the age's logarithm shared, the same bits.
    b.t_programmed = a.t_programmed.clone()
    p, q = pair_conductances(a, b)
    assert torch.equal(p, full) and torch.equal(q, b.conductance())


def test_drift_is_the_same_at_any_thread_count():
    a = aged_array(3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = a.conductance()
        torch.set_num_threads(2)
        two = a.conductance()
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


# -------------------------------------------------------------------------------------------- read cache
def test_padded_rows_of_the_read_cache_are_zero_and_the_rest_as_computed():
    spec = drifting_spec()
    bar = Crossbar(spec, 300, 40, CrossbarConfig(tile_rows=128), seed=0)      # 300 rows in 3 tiles: 84 padded
    bar.set_weights(torch.rand((300, 40), generator=gen(5)) - 0.5)
    bar.advance(50.0)
    bar._cache_kernel = lambda: False   # the torch rebuild: the numba one is within ulps of it (test_cache_kernels)
    w_hat, gsq = bar._read_tensors()
    assert w_hat.shape == gsq.shape == bar.padded_shape
    assert not w_hat[300:].any() and not gsq[300:].any()
    gp, gm = bar.plus.conductance()[:300], bar.minus.conductance()[:300]
    assert torch.equal(w_hat[:300], (gp - gm) / (bar.k * bar.config.w_max))
    assert torch.equal(gsq[:300], torch.addcmul(gp * gp, gm, gm))


# ------------------------------------------------------------------------------------------ reads in steps
def reference_read(bar: Crossbar, x: torch.Tensor, noise: PhiloxStream | None) -> torch.Tensor:
    """The forward read as it was computed before: partial sums in normalized units, noise, the ADC as
    ``quantize`` (clip, divide, round, multiply by the step) per tile, the sum, the scaling."""
    c = bar.config
    xn = bar.dac(x)
    w_hat, gsq = bar._read_tensors()
    part = bar._tile_products(xn, w_hat)
    if noise is not None:
        z = noise.normal(part.shape, dtype=part.dtype)
        part = part + (bar.spec.read_noise / (bar.k * c.w_max)) * bar._tile_products(xn * xn, gsq).sqrt() * z
    part = quantize(part, c.adc_bits, c.adc_range)
    return part.sum(0)[:, : bar.out_features] * (c.input_max * c.w_max)


def reference_transposed(bar: Crossbar, d: torch.Tensor, noise: PhiloxStream | None) -> torch.Tensor:
    c = bar.config
    w_hat, gsq = bar._read_tensors()
    rows = bar.in_features
    scale = d.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    dn = torch.nn.functional.pad(quantize(d / scale, c.dac_bits, 1.0), (0, bar.padded_shape[1] - bar.out_features))
    dt = dn.reshape(dn.shape[0], bar.n_col_tiles, bar.tile_cols).transpose(0, 1)
    w = w_hat[:rows].reshape(rows, bar.n_col_tiles, bar.tile_cols).permute(1, 2, 0)
    part = torch.bmm(dt, w)
    if noise is not None:
        g2 = gsq[:rows].reshape(rows, bar.n_col_tiles, bar.tile_cols).permute(1, 2, 0)
        z = noise.normal(part.shape, dtype=part.dtype)
        part = part + (bar.spec.read_noise / (bar.k * c.w_max)) * torch.bmm(dt * dt, g2).sqrt() * z
    part = quantize(part, c.adc_bits, c.adc_range)
    return part.sum(0) * (scale * c.w_max)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("input_max", [1.0, 2.0])
def test_reads_in_adc_steps_equal_the_reference(noisy, input_max):
    # float64: a rounding tie moved by the rescaling is then out of reach, and the codes must agree exactly.
    spec = drifting_spec()
    cfg = CrossbarConfig(tile_rows=64, tile_cols=16, dac_bits=6, adc_bits=5, adc_range=3.0, read_noise=noisy,
                         input_max=input_max)
    bar = Crossbar(spec, 150, 40, cfg, seed=1, dtype=torch.float64)
    bar.set_weights((torch.rand((150, 40), generator=gen(6), dtype=torch.float64) - 0.5) * 1.6)
    bar.advance(20.0)
    x = (torch.rand((32, 150), generator=gen(7), dtype=torch.float64) * 2 - 1) * input_max
    d = torch.randn((32, 40), generator=gen(8), dtype=torch.float64)
    ref_gen = bar.read_stream.clone()          # the read noise's stream, at the reads' position
    got_f, got_t = bar.read(x), bar.read_transposed(d)
    ref_f = reference_read(bar, x, ref_gen if noisy else None)
    ref_t = reference_transposed(bar, d, ref_gen if noisy else None)
    step_f = cfg.adc_range / 15 * input_max
    assert ((got_f - ref_f).abs() / step_f).max() < 1e-9                  # the same codes
    assert ((got_t - ref_t).abs() / (d.abs().amax(1, keepdim=True) * cfg.adc_range / 15)).max() < 1e-9
    # The ADC saturates at full scale and the codes are whole: the output is a multiple of one step.
    codes = got_f / step_f
    assert torch.allclose(codes, codes.round(), atol=1e-9) and codes.abs().max() <= 15 * bar.n_row_tiles


def test_read_noise_in_adc_steps_has_the_card_s_distribution():
    # Ideal ADC (no rounding): read − noise-free read is Gaussian with the variance Σ x̂²(σG)² of each tile
    # column, summed over the row tiles. n standardized residuals: mean within 5/√n, variance within 5·√(2/n).
    spec = make_spec(read_noise=0.08)
    bar = Crossbar(spec, 200, 30, CrossbarConfig(tile_rows=64, dac_bits=8), seed=2)
    bar.set_weights(torch.rand((200, 30), generator=gen(9)) - 0.5)
    x = torch.rand((400, 200), generator=gen(10))
    noisy = bar.read(x)
    bar.noise = False
    clean = bar.read(x)
    bar.noise = True
    xn = bar.dac(x)
    gsq = bar._read_tensors()[1]
    var = bar._tile_products(xn * xn, gsq).sum(0) * (spec.read_noise / (bar.k * bar.config.w_max)) ** 2
    r = ((noisy - clean) / var.sqrt()).double().reshape(-1)
    n = r.numel()
    assert abs(float(r.mean())) < 5 / math.sqrt(n)
    assert abs(float(r.var()) - 1.0) < 5 * math.sqrt(2 / n)


# ------------------------------------------------------------------------------------------ neuron circuits
@pytest.mark.parametrize("function", ["sigmoid", "identity"])
def test_neuron_circuit_in_place_equals_the_closed_form_and_leaves_its_input(function):
    cfg = ActivationConfig(function=function, gain_dtod=0.1, offset_dtod=0.05, noise=0.02, output_range=(-0.5, 0.9),
                           derivative_gain_dtod=0.1, derivative_offset_dtod=0.03, derivative_noise=0.02)
    unit = ActivationUnit(cfg, 12, generator=gen(11))
    x = torch.randn((50, 12), generator=gen(12)) * 3
    kept = x.clone()
    gens = {s: unit._generator(s, x.device).clone() for s in ("noise", "d_noise")}
    y, d = unit(x), unit.derivative(x)
    assert torch.equal(x, kept)                                   # the identity's input is not overwritten
    f = torch.sigmoid(x) if function == "sigmoid" else x
    fd = torch.sigmoid(x) * (1 - torch.sigmoid(x)) if function == "sigmoid" else torch.ones_like(x)
    z = gens["noise"].normal(x.shape)
    ref = (unit.gain * f + unit.offset + cfg.noise * z).clamp(*cfg.output_range)
    zd = gens["d_noise"].normal(x.shape)
    ref_d = unit.derivative_gain * fd + unit.derivative_offset + cfg.derivative_noise * zd
    torch.testing.assert_close(y, ref, rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(d, ref_d, rtol=2e-6, atol=2e-7)


def test_neuron_circuit_keeps_autograd():
    cfg = ActivationConfig(function="sigmoid", gain_dtod=0.1, offset_dtod=0.05, noise=0.02, output_range=(0.0, 0.8))
    unit = ActivationUnit(cfg, 6, generator=gen(13))
    x = torch.randn((20, 6), generator=gen(14), requires_grad=True)
    y = unit(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    inside = (y > 0) & (y < 0.8)
    s = torch.sigmoid(x.detach())
    torch.testing.assert_close(g, torch.where(inside, unit.gain * s * (1 - s), torch.zeros_like(s)))
