"""The nonlinearity label of a device's pulse response, and the closed-form response itself.

Pulse model (NeuroSim and most device benchmarks): with x = p / p_max the fraction of the pulses that take a
cell across its range and a = A / p_max the normalized constant, the normalized conductance is

    g(x) = (1 − exp(−x/a)) / (1 − exp(−1/a)),         g(0) = 0, g(1) = 1, g → x as a → ∞.

Papers and NeuroSim quote a *label* instead of a (Ag:a-Si 2.40 / −4.88). NeuroSim turns a label into a through
a lookup table (``getParamA``, labels 0.01 … 9 in steps of 0.01) without stating how the table was made. The
table is reproduced, to all six printed digits, by one criterion, which this module takes as the definition:

    the largest vertical gap between g and the straight line, max_x (g(x) − x), equals K · |label|,
    K = 0.07·√2 ≈ 0.0990,

i.e. the largest perpendicular distance between the normalized curve and the diagonal of the unit square is
0.07 · |label|. The gap has a closed form (below); the label runs from 0 (linear) to 1/K ≈ 10.10 (a step).
The sign of a label only says which curve it describes (negative for depression in NeuroSim's convention);
here |label| is used.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Gap per unit label: max_x (g(x) − x) = LABEL_GAP · |label|.
LABEL_GAP = 0.07 * math.sqrt(2.0)
#: Largest label: the gap tends to 1 as a → 0 (a step response).
MAX_LABEL = 1.0 / LABEL_GAP

# Below this u = 1/a the closed form of the gap loses digits to cancellation; the odd series is used instead
# (its first omitted term, u⁹/43545600, is < 1e-20 of the gap there).
_SERIES_U = 0.05


def max_gap(a_norm: float | np.ndarray) -> float | np.ndarray:
    """max over x in [0, 1] of g(x) − x for normalized A ``a_norm`` (> 0; inf gives 0).

    The maximum sits where g'(x) = 1, x* = −a·ln(a·E) with E = 1 − exp(−1/a), and equals 1/E − a + a·ln(a·E).
    """
    a = np.asarray(a_norm, dtype=float)
    if np.any(~(a > 0)):
        raise ValueError(f"a_norm must be > 0, got {a_norm!r}")
    u = np.where(np.isinf(a), 0.0, 1.0 / np.where(np.isinf(a), 1.0, a))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        e = -np.expm1(-u)
        closed = 1.0 / e - a + a * np.log(a * e)
    us = np.minimum(u, _SERIES_U)
    series = us / 8 - us**3 / 576 + us**5 / 25920 - us**7 / 1075200
    gap = np.where(u < _SERIES_U, series, closed)
    return float(gap) if gap.ndim == 0 else gap


def label_from_a(a: float | np.ndarray) -> float | np.ndarray:
    """The nonlinearity label of normalized A ``a`` (inf → 0). A negative ``a`` (NeuroSim's depression
    convention) gives the negative of the label of |a|."""
    arr = np.asarray(a, dtype=float)
    if np.any(arr == 0) or np.any(np.isnan(arr)):
        raise ValueError(f"a must be nonzero and not NaN, got {a!r}")
    label = np.sign(arr) * np.asarray(max_gap(np.abs(arr))) / LABEL_GAP
    return float(label) if label.ndim == 0 else label


def a_from_label(label: float | np.ndarray) -> float | np.ndarray:
    """Normalized A (A / number of pulses) of a nonlinearity label; |label| is used, 0 → inf (linear).

    Solves max_gap(a) = LABEL_GAP·|label| by bisection on log(1/a), all elements at once: the gap rises
    monotonically with 1/a, is below 1/(8a), and tends to 1 as a → 0, so log(1/a) lies in
    [log(8·LABEL_GAP·|label|), 700]. 200 halvings of that bracket reach double precision.
    """
    lab = np.abs(np.asarray(label, dtype=float))
    if np.any(np.isnan(lab)) or np.any(lab >= MAX_LABEL):
        raise ValueError(f"|label| must be < {MAX_LABEL:.4f} (the step response), got {label!r}")
    target = LABEL_GAP * lab
    zero = lab == 0
    safe = np.where(zero, 1.0, target)
    lo = np.log(8.0 * safe)  # gap(u) <= u/8, so u >= 8·target
    hi = np.full_like(lo, 700.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = np.asarray(max_gap(np.exp(-mid))) > safe
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    a = np.where(zero, np.inf, np.exp(-0.5 * (lo + hi)))
    return float(a) if a.ndim == 0 else a


def _gap_terms(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, 1 − D, dD/dv) at v = ln(1/a), each without cancellation: the odd series below u = 1/a = 0.05,
    the closed forms above (1 − D from its own closed form once D is large, u > 2)."""
    u = torch.exp(v)
    small = u < _SERIES_U
    us = torch.where(small, u, torch.zeros_like(u))
    u2 = us * us
    d_series = us * (1 / 8 - u2 * (1 / 576 - u2 * (1 / 25920 - u2 / 1075200)))
    slope_series = 1 / 8 - u2 * (1 / 192 - u2 * (1 / 5184 - u2 * 7 / 1075200))
    ub = torch.where(small, torch.ones_like(u), u)
    vb = torch.where(small, torch.zeros_like(v), v)
    e = -torch.expm1(-ub)                       # E = 1 − exp(−u)
    inv_u = torch.exp(-vb)
    ln_ratio = torch.log(e) - vb                # ln(E/u)
    tail = torch.exp(-ub) / e
    d_closed = 1 / e - inv_u + inv_u * ln_ratio
    rest_closed = inv_u * (1 - ln_ratio) - tail
    slope_closed = tail * (inv_u - 1 / e) - ln_ratio * inv_u * inv_u
    d = torch.where(small, d_series, d_closed)
    rest = torch.where(u > 2, rest_closed, 1 - d)
    return d, rest, u * torch.where(small, slope_series, slope_closed)


def a_from_label_tensor(label: torch.Tensor, iterations: int = 4) -> torch.Tensor:
    """``a_from_label`` for a tensor of labels (one per cell), in float64 on the tensor's device, keeping the
    sign: a negative label gives a negative a (the point-reflected curve, as in ``pulse_response``); 0 → inf.

    Newton's method on logit(D) as a function of v = ln(1/a): that function rises from ≈ v − ln 8 (linear
    end) to ≈ v − ln(1 + v) (step end), nearly a straight line of slope 1, so Newton started at
    logit(K·|label|) + ln 8 converges in three steps to double precision over the whole range
    (tests/test_nonlinearity.py compares it with the bisection of ``a_from_label``). It costs ~30 element-wise
    operations per step instead of the bisection's 200 halvings, which matters when every cell has its own label.
    """
    lab = label.to(torch.float64)
    target = (LABEL_GAP * lab.abs()).clamp(min=1e-300)
    c = torch.log(target) - torch.log1p(-target)
    v = c + math.log(8.0)
    for _ in range(iterations):
        d, rest, slope = _gap_terms(v)
        v = v - (torch.log(d) - torch.log(rest) - c) * d * rest / slope
    a = torch.exp(-v)
    a = torch.where(lab == 0, torch.full_like(a, math.inf), a)
    return torch.where(lab < 0, -a, a)


def _response_torch(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    linear = torch.isinf(a)
    neg = a < 0
    # Evaluate only well-defined branches: a placeholder A where the branch is not used keeps NaN out of
    # values and gradients.
    a_pos = torch.where(linear, torch.ones_like(a), a.abs())
    xr = torch.where(neg, 1.0 - x, x)
    g = torch.expm1(-xr / a_pos) / torch.expm1(-1.0 / a_pos)
    g = torch.where(neg, 1.0 - g, g)
    return torch.where(linear, x, g)


def _response_numpy(x: np.ndarray, a: np.ndarray) -> np.ndarray:
    linear = np.isinf(a)
    neg = a < 0
    a_pos = np.where(linear, 1.0, np.abs(a))
    xr = np.where(neg, 1.0 - x, x)
    g = np.expm1(-xr / a_pos) / np.expm1(-1.0 / a_pos)
    g = np.where(neg, 1.0 - g, g)
    return np.where(linear, x, g)


def pulse_response(p, p_max, a_norm):
    """Normalized conductance in [0, 1] after ``p`` of ``p_max`` pulses: (1 − e^(−x/a)) / (1 − e^(−1/a)),
    x = p/p_max clipped to [0, 1]; linear when ``a_norm`` is ±inf.

    ``a_norm`` > 0 is the saturating (concave) curve; ``a_norm`` < 0 is NeuroSim's depression frame, the
    point reflection 1 − g_|a|(1 − x) (convex), evaluated that way to avoid overflow. ``a_norm`` must be
    nonzero. Takes torch tensors (returned on their device and dtype, differentiable) or numpy/scalars.
    """
    if any(isinstance(v, torch.Tensor) for v in (p, p_max, a_norm)):
        ref = next(v for v in (p, p_max, a_norm) if isinstance(v, torch.Tensor))
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        p, p_max, a_norm = (torch.as_tensor(v, dtype=dtype, device=ref.device) for v in (p, p_max, a_norm))
        x = (p / p_max).clamp(0.0, 1.0)
        return _response_torch(x, torch.broadcast_to(a_norm, torch.broadcast_shapes(x.shape, a_norm.shape)))
    a = np.asarray(a_norm, dtype=float)
    if np.any(a == 0) or np.any(np.isnan(a)):
        raise ValueError(f"a_norm must be nonzero and not NaN, got {a_norm!r}")
    x = np.clip(np.asarray(p, dtype=float) / np.asarray(p_max, dtype=float), 0.0, 1.0)
    x, a = np.broadcast_arrays(x, a)
    g = _response_numpy(x, a)
    return float(g) if g.ndim == 0 else g


def pulses_for_response(g, p_max, a_norm):
    """Inverse of ``pulse_response``: the (fractional) pulse number whose response is ``g`` in [0, 1]."""
    if any(isinstance(v, torch.Tensor) for v in (g, p_max, a_norm)):
        ref = next(v for v in (g, p_max, a_norm) if isinstance(v, torch.Tensor))
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        g, p_max, a = (torch.as_tensor(v, dtype=dtype, device=ref.device) for v in (g, p_max, a_norm))
        g = g.clamp(0.0, 1.0)
        a = torch.broadcast_to(a, torch.broadcast_shapes(g.shape, a.shape))
        linear, neg = torch.isinf(a), a < 0
        a_pos = torch.where(linear, torch.ones_like(a), a.abs())
        gr = torch.where(neg, 1.0 - g, g)
        x = -a_pos * torch.log1p(gr * torch.expm1(-1.0 / a_pos))
        x = torch.where(neg, 1.0 - x, x).clamp(0.0, 1.0)
        return torch.where(linear, g, x) * p_max
    a = np.asarray(a_norm, dtype=float)
    if np.any(a == 0) or np.any(np.isnan(a)):
        raise ValueError(f"a_norm must be nonzero and not NaN, got {a_norm!r}")
    gg, a = np.broadcast_arrays(np.clip(np.asarray(g, dtype=float), 0.0, 1.0), a)
    linear, neg = np.isinf(a), a < 0
    a_pos = np.where(linear, 1.0, np.abs(a))
    gr = np.where(neg, 1.0 - gg, gg)
    with np.errstate(divide="ignore"):
        x = -a_pos * np.log1p(gr * np.expm1(-1.0 / a_pos))
    x = np.clip(np.where(neg, 1.0 - x, x), 0.0, 1.0)
    out = np.where(linear, gg, x) * np.asarray(p_max, dtype=float)
    return float(out) if out.ndim == 0 else out
