"""Neuron circuits: Taylor coefficients against closed forms, PWL error bounds and segment counts, gradients
against finite differences, circuit variation statistics, refusal of bad settings, and the report."""

from __future__ import annotations

import argparse
import itertools
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from neurosim.activation import (
    FUNCTIONS,
    KINKS,
    ActivationConfig,
    ActivationUnit,
    PWLTable,
    _gather_rows,
    _pack_rows,
    exact,
    exact_derivative,
    fit_pwl,
    least_squares_polynomial,
    numpy_function,
    taylor_coefficients,
)
from neurosim.commands import activations as activation_report
from neurosim.config import ConfigError, build

F64 = torch.float64


def unit64(n: int = 1, **kw) -> ActivationUnit:
    return ActivationUnit(ActivationConfig(**kw), n, dtype=F64)


def column(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64).reshape(-1, 1)


# ---------------------------------------------------------------------------------------------------------
# Taylor coefficients
# ---------------------------------------------------------------------------------------------------------

def bernoulli(m: int) -> list[Fraction]:
    """B_0..B_m exactly, from sum_{k<=j} C(j+1, k) B_k = 0."""
    b = [Fraction(1)]
    for j in range(1, m + 1):
        b.append(-sum(math.comb(j + 1, k) * b[k] for k in range(j)) / (j + 1))
    return b


def tanh_series(n: int) -> np.ndarray:
    """tanh x = sum_{k>=1} B_2k 4^k (4^k - 1) x^(2k-1) / (2k)!, in exact rationals, then rounded once."""
    b = bernoulli(n + 2)
    c = [Fraction(0)] * n
    for k in range(1, n // 2 + 2):
        if 2 * k - 1 < n:
            c[2 * k - 1] = b[2 * k] * 4**k * (4**k - 1) / math.factorial(2 * k)
    return np.array([float(v) for v in c])


def test_taylor_sigmoid_first_terms_are_the_textbook_ones():
    np.testing.assert_allclose(taylor_coefficients("sigmoid", 4), [0.5, 0.25, 0.0, -1 / 48], rtol=0, atol=1e-17)


@pytest.mark.parametrize("n", [1, 2, 7, 14])
def test_taylor_matches_closed_form_series_at_zero(n):
    t = tanh_series(n)
    # float precision: a few ulp of the coefficient, or of 1 where the series has a zero
    np.testing.assert_allclose(taylor_coefficients("tanh", n), t, rtol=1e-14, atol=1e-15)
    # sigmoid(x) = 1/2 + tanh(x/2)/2
    s = t / 2.0 ** (np.arange(n) + 1)
    s[0] = 0.5
    np.testing.assert_allclose(taylor_coefficients("sigmoid", n), s, rtol=1e-14, atol=1e-15)
    # softplus(x) = log 2 + integral of sigmoid: c_k = s_{k-1}/k
    sp = np.concatenate([[math.log(2.0)], s[: n - 1] / np.arange(1, n)])
    np.testing.assert_allclose(taylor_coefficients("softplus", n), sp, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("x0", [-2.3, -0.4, 0.7, 3.1])
def test_taylor_matches_closed_form_derivatives_off_zero(x0):
    s = 1 / (1 + math.exp(-x0))
    sig = [s, s * (1 - s), s * (1 - s) * (1 - 2 * s), s * (1 - s) * (1 - 6 * s + 6 * s * s)]
    t = math.tanh(x0)
    tanh = [t, 1 - t * t, -2 * t * (1 - t * t), -2 * (1 - t * t) * (1 - 3 * t * t)]
    soft = [math.log1p(math.exp(x0)), *sig[:3]]
    for name, derivs in (("sigmoid", sig), ("tanh", tanh), ("softplus", soft)):
        want = [d / math.factorial(k) for k, d in enumerate(derivs)]
        np.testing.assert_allclose(taylor_coefficients(name, 4, x0), want, rtol=1e-13, atol=1e-16)


def _autograd_derivatives(name: str, x0: float, order: int, alpha: float) -> list[float]:
    x = torch.tensor(x0, dtype=F64, requires_grad=True)
    y = exact(name, x.reshape(1, 1), alpha).reshape(())
    out = [y.item()]
    for _ in range(order):
        if not y.requires_grad:  # a linear piece: its higher derivatives are 0
            y = torch.zeros((), dtype=F64)
        else:
            (y,) = torch.autograd.grad(y, x, create_graph=True)
        out.append(y.item())
    return out


@pytest.mark.parametrize("name,x0", [("gelu", 0.0), ("gelu", -1.2), ("silu", 0.0), ("silu", 1.5),
                                      ("elu", -0.6), ("elu", 0.6), ("selu", -0.9), ("selu", 0.4),
                                      ("leaky_relu", -1.0), ("relu", -1.0), ("relu", 2.0), ("prelu", -0.5),
                                      ("identity", 0.3), ("softplus", -5.0), ("sigmoid", -8.0)])
def test_taylor_coefficients_are_derivatives_over_factorials(name, x0):
    """Jet arithmetic against nested torch autograd (an independent route) up to the 4th derivative."""
    alpha = 0.3
    got = taylor_coefficients(name, 5, x0, alpha)
    want = [d / math.factorial(k) for k, d in enumerate(_autograd_derivatives(name, x0, 4, alpha))]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu", "selu", "prelu"])
def test_taylor_falls_back_to_least_squares_at_a_kink(name):
    u = unit64(function=name, mode="taylor", terms=5, input_range=(-3.0, 2.0), alpha=0.2)
    assert u.taylor_fallback and "fallback" in u.describe()
    with pytest.raises(ValueError):
        taylor_coefficients(name, 5, 0.0)
    # least squares: the residual is orthogonal to every basis function (normal equations)
    x = np.linspace(-3.0, 2.0, u.config.fit_points)
    v = np.vander(x, 5, increasing=True)
    c = u.coefficients.detach().numpy()
    resid = v @ c - numpy_function(name, 0.2)(x)
    assert np.max(np.abs(v.T @ resid)) < 1e-8 * np.linalg.norm(v, axis=0).max() * np.linalg.norm(resid)
    # and it really is better than, e.g., the least-squares fit of one term fewer
    worse = least_squares_polynomial(name, 4, 0.0, (-3.0, 2.0), 0.2, u.config.fit_points)
    assert np.sum(resid**2) < np.sum((np.vander(x, 4, increasing=True) @ worse - numpy_function(name, 0.2)(x)) ** 2)


def test_taylor_series_required_at_a_kink_is_refused_and_off_kink_used():
    with pytest.raises(ConfigError) as e:
        ActivationConfig(function="relu", mode="taylor", taylor_fit="series")
    assert e.value.field == "center"
    u = unit64(function="relu", mode="taylor", center=1.0, terms=3)
    assert not u.taylor_fallback
    np.testing.assert_array_equal(u.coefficients.numpy(), [1.0, 1.0, 0.0])
    forced = unit64(function="sigmoid", mode="taylor", taylor_fit="least_squares")
    assert forced.info["taylor_method"] == "least_squares" and not forced.taylor_fallback


def test_taylor_realization_clips_input_and_zeroes_derivative_outside():
    u = unit64(function="sigmoid", mode="taylor", terms=4, center=0.5, input_range=(-2.0, 3.0))
    c = taylor_coefficients("sigmoid", 4, 0.5)
    x = torch.tensor([[-9.0], [-2.0], [0.1], [3.0], [7.5]], dtype=F64)
    p = np.polynomial.Polynomial(c)
    want = p(np.clip(x.numpy().ravel(), -2.0, 3.0) - 0.5)
    np.testing.assert_allclose(u.ideal(x).detach().numpy().ravel(), want, rtol=1e-14)
    d = u.ideal_derivative(x).numpy().ravel()
    assert d[0] == 0 and d[-1] == 0
    assert d[2] == pytest.approx(p.deriv()(0.1 - 0.5), rel=1e-14)


# ---------------------------------------------------------------------------------------------------------
# PWL segmentation
# ---------------------------------------------------------------------------------------------------------

DENSE = np.linspace(-4.0, 4.0, 400_003)  # not aligned with the 20001-node fit grid


@pytest.mark.parametrize("segmenter", ["chord", "least_squares"])
@pytest.mark.parametrize("name,eps", [("sigmoid", 1e-3), ("tanh", 1e-3), ("sigmoid", 3e-2), ("gelu", 1e-2),
                                      ("silu", 1e-2), ("softplus", 1e-2), ("elu", 1e-2), ("selu", 1e-2),
                                      ("relu", 1e-2), ("identity", 1e-2)])
def test_pwl_max_error_on_a_dense_grid_is_within_epsilon(name, eps, segmenter):
    u = unit64(function=name, mode="pwl", epsilon=eps, segmenter=segmenter, alpha=1.0)
    x = column(DENSE)
    err = (u.ideal(x) - exact(name, x, 1.0)).abs().max().item()
    assert err <= eps
    assert err > 0.5 * eps or name in ("relu", "identity")  # the budget is used, not wasted
    # the separate fit of f' keeps its own bound (inside the range, off the kink where f' is undefined; at
    # the clip ends the derivative circuit gives one side's value)
    inner = DENSE[1:-1]
    off = column(inner[np.abs(inner - KINKS.get(name, (9.0,))[0]) > 1e-9])
    derr = (u.ideal_derivative(off) - exact_derivative(name, off, 1.0)).abs().max().item()
    assert derr <= eps


def _fit_stats(fn, eps, segmenter):
    table, _ = fit_pwl(fn, (-4.0, 4.0), epsilon=eps, segmenter=segmenter)
    err = np.abs(table(DENSE) - fn(DENSE))
    return table.segments, err.max(), err.mean()


@pytest.mark.parametrize("name,derivative", [("sigmoid", False), ("tanh", False), ("sigmoid", True),
                                             ("tanh", True)])
def test_least_squares_segmenter_beats_chord(name, derivative):
    fn = numpy_function(name, derivative=derivative)
    for eps in (1e-2, 1e-3, 1e-4):
        k_chord, max_chord, mean_chord = _fit_stats(fn, eps, "chord")
        k_ls, max_ls, mean_ls = _fit_stats(fn, eps, "least_squares")
        assert max(max_chord, max_ls) <= eps
        assert k_ls <= k_chord, (eps, k_ls, k_chord)
        assert mean_ls < mean_chord, (eps, mean_ls, mean_chord)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
@pytest.mark.parametrize("segmenter", ["chord", "least_squares"])
def test_segment_count_grows_as_inverse_square_root_of_epsilon(name, segmenter):
    """A line on a segment of length L misses a smooth f by ~ L^2 |f''| / 8, so K ~ eps^(-1/2)."""
    eps = np.array([1e-3, 1e-4, 1e-5])
    counts = [fit_pwl(numpy_function(name), (-4.0, 4.0), epsilon=e, segmenter=segmenter)[0].segments for e in eps]
    slope = np.polyfit(np.log(eps), np.log(counts), 1)[0]
    assert -0.58 < slope < -0.42, (counts, slope)


@pytest.mark.parametrize("segmenter", ["chord", "least_squares"])
def test_fixed_segment_count_is_met_and_error_falls_with_it(segmenter):
    errors = []
    for k in (2, 5, 12, 30):
        u = unit64(function="tanh", mode="pwl", segments=k, segmenter=segmenter, derivative="slope")
        assert u.pwl_table().segments == k
        x = column(DENSE[::7])
        errors.append((u.ideal(x) - torch.tanh(x)).abs().max().item())
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    # with both given, segments wins (documented); a kinked function needs one segment per side
    assert unit64(function="tanh", mode="pwl", segments=3, epsilon=1e-6).pwl_table().segments == 3
    with pytest.raises(ConfigError) as e:
        unit64(function="relu", mode="pwl", segments=1)
    assert e.value.field == "segments"


def test_pwl_table_export_describes_the_realization():
    u = unit64(function="sigmoid", mode="pwl", epsilon=5e-3, input_range=(-3.0, 5.0), derivative="slope")
    t = u.pwl_table()
    assert isinstance(t, PWLTable) and t.breakpoints[0] == -3.0 and t.breakpoints[-1] == 5.0
    assert np.all(np.diff(t.breakpoints) > 0) and len(t.slope) == len(t.intercept) == len(t.breakpoints) - 1
    x = np.linspace(-6.0, 8.0, 50_001)
    np.testing.assert_allclose(u.ideal(column(x)).detach().numpy().ravel(), t(x), rtol=0, atol=1e-13)
    # saturation outside [a, b]: the end segments' values, and a zero derivative
    y = u.ideal(column([-100.0, -3.0, 5.0, 100.0])).detach().numpy().ravel()
    assert y[0] == pytest.approx(t.slope[0] * -3.0 + t.intercept[0], abs=1e-15)
    assert y[3] == pytest.approx(t.slope[-1] * 5.0 + t.intercept[-1], abs=1e-15)
    d = u.ideal_derivative(column([-100.0, 100.0])).numpy().ravel()
    np.testing.assert_array_equal(d, [0.0, 0.0])
    # "slope" derivative table: piecewise constant, the function's slopes
    dt = u.pwl_table("derivative")
    np.testing.assert_array_equal(dt.intercept, t.slope)
    np.testing.assert_array_equal(dt.slope, np.zeros_like(t.slope))


def test_packed_row_gather_is_bit_exact():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.float16):
        table = torch.randn(97, 2, generator=g).to(dtype)
        table[5] = torch.tensor([float("inf"), -0.0])
        idx = torch.randint(0, 97, (13, 7), generator=g, dtype=torch.int32)
        rows = _gather_rows(_pack_rows(table), idx, 2, dtype)
        assert torch.equal(rows, table[idx.long()])


def test_pwl_serial_and_threaded_gathers_agree():
    u = ActivationUnit(ActivationConfig(function="gelu", mode="pwl", derivative="fit"), 64)
    x = 3 * torch.randn(32, 64, 2, generator=torch.Generator().manual_seed(8))
    x[0, 0, 0] = float("nan")
    threads = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xr = x.clone().requires_grad_(True)
            y = u(xr)
            out[n] = (y, torch.autograd.grad(y.sum(), xr)[0], u.derivative(x))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(out[1], out[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out[1][0][0, 0, 0]) and torch.isfinite(out[1][0][1:]).all()


def test_pwl_handles_non_finite_inputs_like_a_saturating_circuit():
    u = ActivationUnit(ActivationConfig(function="tanh", mode="pwl"), 3)
    x = torch.tensor([[float("nan"), float("inf"), -float("inf")]])
    y = u(x)
    assert torch.isnan(y[0, 0]) and y[0, 1] == u.ideal(torch.full((1, 3), 9.0))[0, 1]
    assert y[0, 2] == u.ideal(torch.full((1, 3), -9.0))[0, 2]


def test_pwl_float32_close_to_float64():
    u32 = ActivationUnit(ActivationConfig(function="sigmoid", mode="pwl", epsilon=1e-3), 1)
    u64 = unit64(function="sigmoid", mode="pwl", epsilon=1e-3)
    x = column(DENSE[::13])
    diff = (u32.ideal(x.float()).double() - u64.ideal(x)).abs().max().item()
    assert diff < 1e-5  # float32 rounding near a breakpoint may pick the neighbouring line: |slope|·1e-6


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------

def _away_from(x: torch.Tensor, points: np.ndarray, gap: float) -> torch.Tensor:
    keep = np.min(np.abs(x.numpy()[..., None] - points), axis=-1) > gap
    return x[torch.as_tensor(keep)]


def test_taylor_gradients_match_finite_differences():
    u = unit64(3, function="tanh", mode="taylor", terms=5, center=0.3, input_range=(-2.0, 2.5),
               train_coefficients=True, gain_dtod=0.1, offset_dtod=0.05)
    g = torch.Generator().manual_seed(1)
    x = _away_from(4 * torch.randn(40, generator=g, dtype=F64), np.array([-2.0, 2.5]), 1e-3)[:36]
    x = x.reshape(12, 3).requires_grad_(True)
    coeffs = u.coefficients
    assert torch.autograd.gradcheck(lambda xx: u(xx), (x,))
    # coefficient gradients: d y / d c_k = gain * u^k, against finite differences of the whole unit
    (gc,) = torch.autograd.grad(u(x).sum(), coeffs)
    eps = 1e-6
    fd = []
    for k in range(5):
        with torch.no_grad():
            coeffs[k] += eps
            up = u(x).sum()
            coeffs[k] -= 2 * eps
            down = u(x).sum()
            coeffs[k] += eps
        fd.append((up - down) / (2 * eps))
    np.testing.assert_allclose(gc.numpy(), torch.stack(fd).numpy(), rtol=1e-7, atol=1e-9)
    assert u.trainable_parameters() == [coeffs]


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu", "relu"])
def test_pwl_slope_gradient_matches_finite_differences(name):
    u = unit64(2, function=name, mode="pwl", epsilon=1e-3, derivative="slope", gain_dtod=0.2)
    g = torch.Generator().manual_seed(2)
    x = _away_from(5 * torch.randn(60, generator=g, dtype=F64), u.pwl_table().breakpoints, 1e-4)[:40]
    assert torch.autograd.gradcheck(lambda xx: u(xx), (x.reshape(20, 2).requires_grad_(True),))


def test_pwl_fit_gradient_is_the_fitted_derivative():
    u = unit64(function="sigmoid", mode="pwl", epsilon=1e-3, derivative="fit")
    x = column(np.linspace(-5, 5, 10_001)).requires_grad_(True)
    (grad,) = torch.autograd.grad(u.ideal(x).sum(), x)
    xs, gs = x.detach().numpy().ravel(), grad.numpy().ravel()
    inside = np.abs(xs) < 4
    np.testing.assert_allclose(gs[inside], u.pwl_table("derivative")(xs[inside]), rtol=1e-13, atol=1e-16)
    assert np.all(gs[np.abs(xs) > 4] == 0)
    inside = torch.as_tensor(inside).reshape(-1, 1)
    assert (grad - exact_derivative("sigmoid", x.detach())).abs()[inside].max() <= 1e-3


@pytest.mark.parametrize("name", FUNCTIONS)
def test_exact_derivative_closed_forms_match_autograd(name):
    x = column(np.linspace(-6, 6, 1201) + 1e-3).requires_grad_(True)  # off the kink at 0
    alpha = 0.3
    (grad,) = torch.autograd.grad(exact(name, x, alpha).sum(), x)
    np.testing.assert_allclose(exact_derivative(name, x.detach(), alpha).numpy(), grad.numpy(), rtol=1e-12,
                               atol=1e-14)


def test_prelu_slope_is_trainable_in_exact_mode_and_frozen_into_pwl():
    u = unit64(2, function="prelu", alpha=0.25)
    assert u.trainable_parameters() == [u.prelu_slope]
    x = torch.tensor([[-2.0, 1.0], [-0.5, -3.0]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda xx, a: exact("prelu", xx, a), (x, u.prelu_slope))
    with torch.no_grad():
        u.prelu_slope.fill_(0.4)
    u.set_mode("pwl", epsilon=1e-3)
    assert u.trainable_parameters() == []
    assert u.ideal(x).detach()[1, 1].item() == pytest.approx(-1.2, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Circuit variation
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,derivative", [("exact", "fit"), ("taylor", "fit"), ("pwl", "fit"), ("pwl", "slope")])
def test_zero_variation_equals_ideal_realization(mode, derivative):
    u = ActivationUnit(ActivationConfig(function="tanh", mode=mode, derivative=derivative), 5,
                       generator=torch.Generator().manual_seed(0))
    x = torch.randn(7, 5, 3, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(u(x), u.ideal(x))
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(u(xr).sum(), xr)
    d = u.derivative(x)
    if mode == "exact":
        torch.testing.assert_close(d, grad)
    else:
        assert torch.equal(d, grad)


def test_gain_and_offset_spreads_match_sigma():
    """n neurons: the sample std of n N(0, s^2) draws has standard error s/sqrt(2n); the mean, s/sqrt(n);
    the correlation of two independent samples, 1/sqrt(n). Tolerances are 5 standard errors."""
    n = 40_000
    cfg = ActivationConfig(function="relu", gain_dtod=0.1, offset_dtod=0.05, derivative_gain_dtod=0.2,
                           derivative_offset_dtod=0.03)
    u = ActivationUnit(cfg, n, generator=torch.Generator().manual_seed(7), dtype=F64)
    one, zero, minus = (torch.full((1, n), v, dtype=F64) for v in (1.0, 0.0, -1.0))
    offset = u(zero)[0]
    gain = u(one)[0] - offset
    d_offset = u.derivative(minus)[0]          # relu'(-1) = 0
    d_gain = u.derivative(one)[0] - d_offset   # relu'(1) = 1
    for sample, mean, sigma in ((gain, 1.0, 0.1), (offset, 0.0, 0.05), (d_gain, 1.0, 0.2), (d_offset, 0.0, 0.03)):
        assert abs(sample.mean().item() - mean) < 5 * sigma / math.sqrt(n)
        assert abs(sample.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n)
    r = np.corrcoef(gain.numpy(), d_gain.numpy())[0, 1]
    assert abs(r) < 5 / math.sqrt(n)  # the derivative circuit's mismatch is independent of the forward one


def test_gain_applies_per_neuron_along_dim_1():
    u = ActivationUnit(ActivationConfig(function="identity", gain_dtod=0.3), 4,
                       generator=torch.Generator().manual_seed(3), dtype=F64)
    x = torch.ones(2, 4, 3, 5, dtype=F64)
    torch.testing.assert_close(u(x), u.gain.view(1, 4, 1, 1).expand(2, 4, 3, 5))
    with pytest.raises(ValueError):
        u(torch.ones(2, 3, dtype=F64))


def test_noise_has_configured_sigma_and_is_reproducible():
    """Output noise std over m draws: standard error sigma/sqrt(2m); tolerance 5 standard errors."""
    cfg = ActivationConfig(function="sigmoid", noise=0.02, derivative_noise=0.05)
    x = torch.zeros(500, 200)

    def make(seed, derivative_circuit=True):
        return ActivationUnit(cfg, 200, generator=torch.Generator().manual_seed(seed),
                              derivative_circuit=derivative_circuit)

    a, b, c = make(11), make(11), make(11, derivative_circuit=False)
    ya = a(x)
    m = ya.numel()
    assert abs((ya - 0.5).std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * m)
    assert abs((a.derivative(x) - 0.25).std().item() - 0.05) < 5 * 0.05 / math.sqrt(2 * m)
    assert torch.equal(b(x), ya)  # same seed, same tensors bit for bit
    assert torch.equal(c(x), ya)  # building no derivative circuit leaves the forward noise alone
    second = a(x)                 # a has read its derivative circuit in between, b has not
    assert torch.equal(second, b(x)) and torch.equal(second, c(x))
    assert not torch.equal(second, ya)  # fresh noise on every evaluation
    assert not torch.equal(make(12)(x), ya)


def test_no_derivative_circuit_refuses_derivative_but_keeps_the_same_chip():
    cfg = ActivationConfig(function="tanh", gain_dtod=0.1, offset_dtod=0.1)
    with_d = ActivationUnit(cfg, 6, generator=torch.Generator().manual_seed(5))
    without = ActivationUnit(cfg, 6, generator=torch.Generator().manual_seed(5), derivative_circuit=False)
    assert with_d.has_derivative_circuit and not without.has_derivative_circuit
    assert torch.equal(with_d.gain, without.gain) and torch.equal(with_d.offset, without.offset)
    with pytest.raises(RuntimeError, match="derivative_circuit=False"):
        without.derivative(torch.zeros(1, 6))


def test_module_to_and_state_dict_keep_the_circuit():
    cfg = ActivationConfig(function="tanh", mode="pwl", gain_dtod=0.1, offset_dtod=0.02)
    u = ActivationUnit(cfg, 3, generator=torch.Generator().manual_seed(4))
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(5))
    y = u(x)
    v = ActivationUnit(cfg, 3, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(v(x), y)
    v.load_state_dict(u.state_dict())
    assert torch.equal(v(x), y)
    u.to(torch.float64)  # tables are plain float buffers, converted with the module
    assert (u(x.double()) - y.double()).abs().max().item() < 1e-5


def test_output_range_clips_and_stops_gradient():
    u = ActivationUnit(ActivationConfig(function="identity", output_range=(-0.5, 1.0)), 3, dtype=F64)
    x = torch.tensor([[-2.0, 0.3, 4.0]], dtype=F64, requires_grad=True)
    y = u(x)
    assert y.tolist() == [[-0.5, 0.3, 1.0]]
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert grad.tolist() == [[0.0, 1.0, 0.0]]


def test_two_stage_switch_to_trainable_taylor_keeps_the_chip_and_trains():
    """Stage 1 exact sigmoid, stage 2 a 4-term Taylor polynomial whose coefficients are trained to follow the
    sigmoid on the clipping range (Chen and Liang's two-stage scheme in miniature)."""
    u = ActivationUnit(ActivationConfig(function="sigmoid", gain_dtod=0.05, input_range=(-3.0, 3.0)), 8,
                       generator=torch.Generator().manual_seed(2), dtype=F64)
    gain = u.gain.clone()
    assert u.trainable_parameters() == []
    u.set_mode("taylor", terms=4, train_coefficients=True)
    assert torch.equal(u.gain, gain) and u.trainable_parameters() == [u.coefficients]
    x = torch.linspace(-3, 3, 200, dtype=F64).reshape(25, 8)
    target = torch.sigmoid(x)
    opt = torch.optim.Adam(u.trainable_parameters(), lr=0.02)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = ((u.ideal(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"mode": "pwl", "epsilon": 0.0}, "epsilon"),
    ({"mode": "pwl", "epsilon": -0.01}, "epsilon"),
    ({"mode": "pwl", "epsilon": None, "segments": None}, "epsilon"),
    ({"mode": "pwl", "segments": 0}, "segments"),
    ({"mode": "taylor", "terms": 0}, "terms"),
    ({"input_range": (1.0, 1.0)}, "input_range"),
    ({"input_range": (2.0, -1.0)}, "input_range"),
    ({"input_range": (1.0,)}, "input_range"),
    ({"input_range": "wide"}, "input_range"),
    ({"function": "swish2"}, "function"),
    ({"mode": "cubic"}, "mode"),
    ({"segmenter": "greedy"}, "segmenter"),
    ({"derivative": "exact"}, "derivative"),
    ({"output_range": (1.0, 0.0)}, "output_range"),
    ({"gain_dtod": -0.1}, "gain_dtod"),
    ({"mode": "taylor", "center": 9.0}, "center"),
    ({"noise": float("nan")}, "noise"),
])
def test_bad_settings_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ActivationConfig(**kwargs)
    assert e.value.field == field
    if None in kwargs.values():
        return  # TOML has no null
    with pytest.raises(ConfigError) as e:  # the TOML route names it too
        build(ActivationConfig, {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    assert e.value.field == field


def test_toml_style_dict_builds():
    cfg = build(ActivationConfig, {"function": "tanh", "mode": "pwl", "input_range": [-3, 3], "segments": 8})
    assert cfg.input_range == (-3.0, 3.0) and cfg.segments == 8
    with pytest.raises(ConfigError) as e:
        build(ActivationConfig, {"functon": "tanh"})
    assert e.value.field == "functon"


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    activation_report.add_arguments(parser)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    return parser.parse_args(argv)


def test_report_table_and_plot(tmp_path, capsys):
    fig = tmp_path / "act.png"
    rc = activation_report.run(_args(functions="sigmoid,relu", terms="4", epsilon="0.02", segmenter="chord",
                                     eval_points=20001, plot=str(fig)))
    out = capsys.readouterr().out
    assert rc == 0
    lines = [ln for ln in out.splitlines() if ln.startswith(("sigmoid", "relu"))]
    assert len(lines) == 6
    relu_taylor = next(ln for ln in lines if ln.startswith("relu") and "taylor" in ln)
    assert "fallback" in relu_taylor and "LS poly" in relu_taylor
    sig_pwl = next(ln for ln in lines if ln.startswith("sigmoid") and " pwl " in ln)
    max_err = float(re.search(r"K=\d+\s+(\S+)", sig_pwl).group(1))
    assert 0.01 < max_err <= 0.02
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kw,field", [({"epsilon": "0"}, "epsilon"), ({"terms": "0"}, "terms"),
                                      ({"ranges": "3,-3"}, "input_range"), ({"ranges": "a,b"}, "input_range"),
                                      ({"functions": "sigmoid,softsign"}, "function"),
                                      ({"modes": "exact,spline"}, "mode"), ({"terms": "4,x"}, "terms")])
def test_report_refuses_bad_values(kw, field):
    args = _args()
    for k, v in kw.items():
        setattr(args, k, [v] if k == "ranges" else v)
    with pytest.raises(ConfigError) as e:
        activation_report.run(args)
    assert e.value.field == field


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["exact", "taylor", "pwl"])
def test_cuda_matches_cpu(mode):
    cfg = ActivationConfig(function="tanh", mode=mode, gain_dtod=0.1, offset_dtod=0.1)
    cpu = ActivationUnit(cfg, 16, generator=torch.Generator().manual_seed(0))
    gpu = ActivationUnit(cfg, 16, generator=torch.Generator().manual_seed(0), device="cuda")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu.derivative(x.cuda()).cpu(), cpu.derivative(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("derivative", ["fit", "slope"])
def test_pwl_kernel_equals_the_torch_lookup(derivative):
    """The fused CPU lookup (neurosim._activation_numba) against the torch path it stands in for (kept for other
    devices, dtypes and autograd): the same outputs and derivatives bit for bit over a dense sweep of inputs,
    the table's ends, ±inf and NaN (a float32 multiply-add rounded once in float64 equals torch's fused one
    except in a double-rounding tie, none of which occurs here)."""
    unit = ActivationUnit(ActivationConfig(function="tanh", mode="pwl", epsilon=0.01, derivative=derivative), 7)
    x = torch.cat([torch.linspace(-6, 6, 70_000), torch.tensor([-4.0, 4.0, float("inf"), -float("inf"),
                                                                float("nan"), -0.0, 0.0])])
    x = x[: x.numel() // 7 * 7].reshape(-1, 7)
    assert unit._kernels(x) is not None
    with torch.no_grad():
        fast = unit.ideal(x), unit.ideal_derivative(x)
        unit._kernels = lambda x: None
        slow = unit.ideal(x), unit.ideal_derivative(x)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
