"""The label <-> A mapping against NeuroSim's published table, and the closed-form pulse response."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize_scalar

from neurosim.nonlinearity import (
    LABEL_GAP,
    MAX_LABEL,
    a_from_label,
    a_from_label_tensor,
    label_from_a,
    max_gap,
    pulse_response,
    pulses_for_response,
)

# (label, normalized A) printed with six decimals in MLP_NeuroSim_V3.0, formula.cpp, getParamA().
NEUROSIM_SIX_DIGITS = [(0.01, 126.268958), (0.02, 63.134314), (0.10, 12.625807), (0.50, 2.519877),
                       (1.00, 1.251653), (2.40, 0.499181), (4.88, 0.200303), (8.95, 0.024129), (9.00, 0.022810)]
# (label, normalized A) printed with four decimals in MLP_NeuroSim_V3.0, documents/Nonlinearity-NormA.htm.
NEUROSIM_FOUR_DIGITS = [(1.51, 0.8195), (3.01, 0.3853), (4.51, 0.2266), (6.01, 0.1351), (6.18, 0.1267),
                        (7.51, 0.0702), (7.60, 0.0668)]


def _g(x, a):
    return (1.0 - np.exp(-x / a)) / (1.0 - np.exp(-1.0 / a))


@pytest.mark.parametrize(("label", "a"), NEUROSIM_SIX_DIGITS)
def test_reproduces_neurosim_table_to_printed_digits(label, a):
    # Printed to 6 decimals: the true value is within 5e-7 of the print.
    assert a_from_label(label) == pytest.approx(a, abs=5e-7)
    assert a_from_label(-label) == a_from_label(label)


@pytest.mark.parametrize(("label", "a"), NEUROSIM_FOUR_DIGITS)
def test_reproduces_neurosim_htm_table(label, a):
    assert a_from_label(label) == pytest.approx(a, abs=5e-5 + 1e-12)


def test_ag_asi_fit_maps_to_its_labels():
    # nonlinear_fit.m fits Ag:a-Si with normalized A = 0.5 (LTP) and -0.2 (LTD); NeuroSim labels them 2.40/-4.88.
    assert round(label_from_a(0.5), 2) == 2.40
    assert round(label_from_a(-0.2), 2) == -4.88


@pytest.mark.parametrize("a", [0.01, 0.05, 0.3, 1.0, 4.0, 30.0, 200.0])
def test_max_gap_is_the_maximum_of_the_curve_minus_the_line(a):
    res = minimize_scalar(lambda x: -(_g(x, a) - x), bounds=(0.0, 1.0), method="bounded",
                          options={"xatol": 1e-12})
    assert max_gap(a) == pytest.approx(-res.fun, rel=1e-9, abs=1e-14)


def test_max_gap_series_branch_matches_asymptote_and_closed_form():
    # Closed form and series agree where both are accurate (u = 1/a around the switch point 0.05).
    for a in (15.0, 19.99, 20.01, 25.0):
        u = 1.0 / a
        e = -math.expm1(-u)
        closed = 1.0 / e - a + a * math.log(a * e)
        assert max_gap(a) == pytest.approx(closed, rel=1e-12)
    # Far in the linear regime the gap is 1/(8a) - 1/(576 a^3) + O(a^-5).
    for a in (1e3, 1e6, 1e12):
        assert max_gap(a) == pytest.approx(1 / (8 * a) - 1 / (576 * a**3), rel=1e-12)
    assert max_gap(np.inf) == 0.0


@pytest.mark.parametrize("label", [1e-6, 0.003, 0.37, 2.4, 5.0, 9.5, 10.09])
def test_a_from_label_solves_the_criterion_like_brentq(label):
    target = LABEL_GAP * label
    ref = brentq(lambda la: max_gap(math.exp(la)) - target, -20.0, 30.0, xtol=1e-14, rtol=1e-15)
    assert a_from_label(label) == pytest.approx(math.exp(ref), rel=1e-10)
    assert max_gap(a_from_label(label)) == pytest.approx(target, rel=1e-12)


def test_monotonic_and_round_trip():
    labels = np.concatenate([np.geomspace(1e-9, 1.0, 60), np.linspace(1.01, MAX_LABEL * (1 - 1e-9), 200)])
    a = a_from_label(labels)
    assert np.all(np.diff(a) < 0)
    assert np.allclose(label_from_a(a), labels, rtol=1e-10, atol=0)
    a_grid = np.geomspace(1e-4, 1e9, 300)
    lab = label_from_a(a_grid)
    assert np.all(np.diff(lab) < 0)
    assert np.allclose(a_from_label(lab), a_grid, rtol=1e-9)


def test_tensor_solver_matches_the_bisection_and_keeps_the_sign():
    """Newton on logit(D) (one A per cell) against the 200-halving bisection: 1e-11 relative over the range of
    labels, widening near the step response as the bisection's own gap (computed as 1/E − a + a·ln(aE) ≈ 1)
    loses the digits of 1 − D (a few 1e-16 absolute, so a relative error of ~1e-16/(1 − D) in a). Closer than
    1e-7 to the step the Newton solution is the more accurate one: its residual in 1 − D is checked instead."""
    labels = np.concatenate([np.geomspace(1e-12, 1.0, 300), np.linspace(1.0, MAX_LABEL * (1 - 1e-7), 3000)])
    got = a_from_label_tensor(torch.tensor(labels)).numpy()
    rel = np.abs(got / a_from_label(labels) - 1)
    assert np.all(rel <= 1e-11 + 1e-15 / (1 - LABEL_GAP * labels))
    top = MAX_LABEL * (1 - np.geomspace(1e-7, 1e-15, 20))
    a = a_from_label_tensor(torch.tensor(top)).numpy()
    rest = a * (1 - np.log(a * -np.expm1(-1 / a))) - np.exp(-1 / a) / -np.expm1(-1 / a)   # 1 − D(a), closed form
    np.testing.assert_allclose(rest, 1 - LABEL_GAP * top, rtol=1e-6)
    signed = a_from_label_tensor(torch.tensor([-2.4, 0.0, 2.4, -1e-300], dtype=torch.float64))
    assert signed[0] == -signed[2] and signed[1] == math.inf and signed[3] < -1e200
    assert signed[2].item() == pytest.approx(0.499181, abs=5e-7)


def test_limits_and_refusals():
    assert a_from_label(0.0) == math.inf
    assert label_from_a(math.inf) == 0.0
    # Near-linear asymptote: gap ≈ 1/(8a), so a ≈ 1/(8·K·label).
    assert a_from_label(1e-7) == pytest.approx(1 / (8 * LABEL_GAP * 1e-7), rel=1e-9)
    assert label_from_a(1e-12) == pytest.approx(MAX_LABEL, rel=1e-9)
    with pytest.raises(ValueError, match="label"):
        a_from_label(MAX_LABEL)
    with pytest.raises(ValueError):
        a_from_label(float("nan"))
    with pytest.raises(ValueError):
        label_from_a(0.0)
    out = a_from_label(np.array([0.0, -2.4, 2.4]))
    assert out[0] == math.inf and out[1] == out[2]


def test_pulse_response_closed_form_numpy():
    p = np.arange(0, 98)
    for a in (0.2, 0.5, 2.0, 50.0):
        g = pulse_response(p, 97, a)
        assert np.allclose(g, _g(p / 97, a), rtol=1e-13, atol=1e-15)
        assert g[0] == 0.0 and g[-1] == pytest.approx(1.0, abs=1e-15)
        assert np.all(np.diff(g) > 0) and np.all(np.diff(g, 2) < 0)  # rising and concave (saturating)
    assert np.array_equal(pulse_response(p, 97, math.inf), p / 97)
    assert pulse_response(-3, 97, 0.5) == 0.0 and pulse_response(200, 97, 0.5) == 1.0


def test_negative_a_is_the_point_reflection():
    x = np.linspace(0.0, 1.0, 41)
    for a in (0.2, 1.3):
        neg = pulse_response(x, 1.0, -a)
        assert np.allclose(neg, 1.0 - pulse_response(1.0 - x, 1.0, a), atol=1e-15)
        # and equals NeuroSim's direct formula with a negative A where that does not overflow
        assert np.allclose(neg, _g(x, -a), rtol=1e-12, atol=1e-14)
    assert np.all(np.isfinite(pulse_response(x, 1.0, -1e-3)))


def test_torch_matches_numpy_and_keeps_dtype():
    p = torch.arange(0, 33, dtype=torch.float64)
    a = torch.tensor([0.3, 2.0, -0.7, math.inf], dtype=torch.float64)[:, None]
    g = pulse_response(p, 32, a)
    assert g.dtype == torch.float64 and g.shape == (4, 33)
    ref = np.stack([pulse_response(p.numpy(), 32, float(ai)) for ai in a[:, 0]])
    assert np.allclose(g.numpy(), ref, rtol=1e-13, atol=1e-15)
    g32 = pulse_response(p.float(), 32, 0.5)
    assert g32.dtype == torch.float32


def test_torch_gradient_is_the_analytic_slope():
    a, p_max = 0.4, 50.0
    p = torch.linspace(0.5, 49.5, 20, dtype=torch.float64, requires_grad=True)
    pulse_response(p, p_max, a).sum().backward()
    x = p.detach().numpy() / p_max
    slope = np.exp(-x / a) / (a * (1 - np.exp(-1 / a))) / p_max
    assert np.allclose(p.grad.numpy(), slope, rtol=1e-12)
    # A linear cell: no NaN leaks from the unused branch into the gradient.
    q = torch.linspace(0.0, 10.0, 5, dtype=torch.float64, requires_grad=True)
    pulse_response(q, 10.0, torch.tensor(math.inf, dtype=torch.float64)).sum().backward()
    assert torch.allclose(q.grad, torch.full_like(q, 0.1))


@pytest.mark.parametrize("a", [0.15, 0.9, 7.0, -0.4, math.inf])
def test_inverse_round_trip(a):
    p = np.linspace(0.0, 64.0, 65)
    back = pulses_for_response(pulse_response(p, 64, a), 64, a)
    assert np.allclose(back, p, atol=1e-9)
    pt = torch.tensor(p)
    assert torch.allclose(pulses_for_response(pulse_response(pt, 64, a), 64, a), pt, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    p = torch.arange(0, 101, dtype=torch.float32)
    a = torch.tensor(0.37)
    cpu = pulse_response(p, 100, a)
    gpu = pulse_response(p.cuda(), 100, a.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-6, atol=1e-7)
