"""Neuron circuits: an activation function realized exactly, as a Taylor polynomial or as piecewise-linear
(PWL) segments, with the mismatch and noise of a real circuit, and a separate derivative circuit for BP.

Why three realizations: hardware replaces exponentials by polynomials (Chen and Liang, ISOCC 2020: trainable
per-layer Taylor activations) or by PWL segments (Electronics 12(2):267, 2023: least-squares PWL of activations
and their derivatives under a bounded error), and pays in accuracy. A layer picks its realization in its
``ActivationConfig``; ``ActivationUnit`` evaluates it on a batch with neurons along dim 1.

Numerics:
- Taylor coefficients are computed, not typed in: the function is evaluated in truncated power-series
  ("jet") arithmetic in float64, where exp, log, division and erf of a series follow exact recurrences
  (e.g. b = exp(a): b_k = (1/k) sum_j j a_j b_{k-j}). A function with no series at the centre (a kink of
  relu, leaky_relu, prelu, elu, selu at 0) falls back to the least-squares polynomial on the clipping range.
- PWL segments are chosen once, at construction, in numpy float64 on a uniform grid of ``fit_points`` nodes
  (a kink at 0 is put on a node when the grid allows). Both segmenters are greedy: from the left end each
  segment reaches as far right as its line (chord through the end points, or least-squares line through
  all nodes) keeps the max error below the target.
- PWL evaluation is batched torch: every grid cell lies inside one segment, so the segment of x is found by
  arithmetic (cell = floor((x - a)/h)) and a single gather fetches the cell's packed (intercept, slope)
  row; ``torch.bucketize`` on CPU is ten times slower than this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from neurosim.backend import no_grad
from neurosim.config import ConfigError, check, setting
from neurosim.random_streams import NUMBA, PhiloxStream, _numba_kernels, _run, flat_numpy

FUNCTIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "selu", "softplus", "gelu", "silu",
             "identity")
MODES = ("exact", "taylor", "pwl")
SEGMENTERS = ("chord", "least_squares")
DERIVATIVES = ("slope", "fit")
TAYLOR_FITS = ("auto", "series", "least_squares")

# Points where the function is not analytic (no Taylor series there; PWL puts a breakpoint there).
KINKS: dict[str, tuple[float, ...]] = {name: (0.0,) for name in ("relu", "leaky_relu", "prelu", "elu", "selu")}

# Exact functions whose derivative follows in a few operations from their output, so the fused derivative
# circuit computes it in its pass (neurosim._activation_numba._element): 1 sigmoid, 2 tanh.
_PROLOGUES = {"sigmoid": 1, "tanh": 2}

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


# --------------------------------------------------------------------------------------------------------
# Exact functions and their closed-form derivatives (torch, any dtype/device)
# --------------------------------------------------------------------------------------------------------

def exact(name: str, x: torch.Tensor, alpha: float | torch.Tensor = 0.01) -> torch.Tensor:
    """f(x). ``alpha``: leaky_relu slope, elu alpha, prelu slope (a tensor keeps it trainable)."""
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, float(alpha))
    if name == "prelu":
        w = alpha if isinstance(alpha, torch.Tensor) else torch.tensor([alpha], dtype=x.dtype, device=x.device)
        return F.prelu(x, w.reshape(1).to(x.dtype))
    if name == "elu":
        return F.elu(x, float(alpha))
    if name == "selu":
        return F.selu(x)
    if name == "softplus":
        return F.softplus(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    if name == "identity":
        return x
    raise ConfigError("function", name, "must be one of " + ", ".join(FUNCTIONS))


def exact_derivative(name: str, x: torch.Tensor, alpha: float | torch.Tensor = 0.01) -> torch.Tensor:
    """f'(x) in closed form, with torch's own choice at kinks (relu'(0) = 0, leaky_relu'(0) = alpha)."""
    a = alpha.detach().reshape(()).to(x) if isinstance(alpha, torch.Tensor) else alpha
    if name == "sigmoid":
        s = torch.sigmoid(x)
        return torch.rsub(s, 1).mul_(s)  # s·(1 − s), one temporary less
    if name == "tanh":
        return 1 - torch.tanh(x) ** 2
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name in ("leaky_relu", "prelu"):
        return torch.where(x > 0, torch.ones_like(x), a * torch.ones_like(x))
    if name == "elu":
        return torch.where(x > 0, torch.ones_like(x), a * torch.exp(torch.clamp(x, max=0)))
    if name == "selu":
        return SELU_SCALE * torch.where(x > 0, torch.ones_like(x), SELU_ALPHA * torch.exp(torch.clamp(x, max=0)))
    if name == "softplus":
        return torch.sigmoid(x)
    if name == "gelu":
        cdf = 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))
        return cdf + x * torch.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
    if name == "silu":
        s = torch.sigmoid(x)
        return s + x * s * (1 - s)
    if name == "identity":
        return torch.ones_like(x)
    raise ConfigError("function", name, "must be one of " + ", ".join(FUNCTIONS))


def numpy_function(name: str, alpha: float = 0.01, derivative: bool = False):
    """f or f' as a numpy float64 function (set-up only: segment fitting, reports)."""
    def fn(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
        return (exact_derivative if derivative else exact)(name, t, alpha).numpy()
    return fn


# --------------------------------------------------------------------------------------------------------
# Taylor coefficients by truncated power-series (jet) arithmetic, float64
# --------------------------------------------------------------------------------------------------------

def _jmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.convolve(a, b)[: len(a)]


def _jexp(a: np.ndarray) -> np.ndarray:
    b = np.zeros_like(a)
    b[0] = math.exp(a[0])
    j = np.arange(len(a))
    for k in range(1, len(a)):  # b' = a' b
        b[k] = np.dot(j[1:k + 1] * a[1:k + 1], b[k - 1::-1][:k]) / k
    return b


def _jlog(a: np.ndarray) -> np.ndarray:
    b = np.zeros_like(a)
    b[0] = math.log(a[0])
    j = np.arange(len(a))
    for k in range(1, len(a)):  # a b' = a'
        b[k] = (a[k] - np.dot(j[1:k] * b[1:k], a[k - 1:0:-1]) / k) / a[0]
    return b


def _jdiv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    c = np.zeros_like(a)
    for k in range(len(a)):  # a = b c
        c[k] = (a[k] - np.dot(b[1:k + 1], c[k - 1::-1][:k])) / b[0]
    return c


def _jerf(a: np.ndarray) -> np.ndarray:
    g = (2 / math.sqrt(math.pi)) * _jexp(-_jmul(a, a))
    b = np.zeros_like(a)
    b[0] = math.erf(a[0])
    j = np.arange(len(a))
    for k in range(1, len(a)):  # b' = g a'
        b[k] = np.dot(j[1:k + 1] * a[1:k + 1], g[k - 1::-1][:k]) / k
    return b


def _const(v: float, n: int) -> np.ndarray:
    c = np.zeros(n)
    c[0] = v
    return c


def _jsigmoid(x: np.ndarray) -> np.ndarray:
    one = _const(1.0, len(x))
    if x[0] >= 0:
        return _jdiv(one, one + _jexp(-x))
    e = _jexp(x)
    return _jdiv(e, one + e)


def analytic_at(name: str, x0: float) -> bool:
    """Whether f has a Taylor series at x0 (false only at a kink)."""
    return not any(abs(x0 - k) < 1e-12 for k in KINKS.get(name, ()))


def taylor_coefficients(name: str, terms: int, center: float = 0.0, alpha: float = 0.01) -> np.ndarray:
    """The first ``terms`` Taylor coefficients c_k of f around ``center``: f(x0+u) ~ sum_k c_k u^k.

    Computed by jet arithmetic in float64 (exact recurrences, no typed-in series); raises ValueError at a kink.
    """
    if name not in FUNCTIONS:
        raise ConfigError("function", name, "must be one of " + ", ".join(FUNCTIONS))
    if not analytic_at(name, center):
        raise ValueError(f"{name} has no Taylor series at {center}")
    n = int(terms)
    x = np.zeros(n)
    x[0] = center
    if n > 1:
        x[1] = 1.0
    one = _const(1.0, n)
    if name == "sigmoid":
        return _jsigmoid(x)
    if name == "tanh":  # tanh(x) = 2 sigmoid(2x) - 1
        return 2 * _jsigmoid(2 * x) - one
    if name == "softplus":  # log(1 + e^x) = x + log(1 + e^-x): the form whose exp does not overflow
        return _jlog(one + _jexp(x)) if center <= 0 else x + _jlog(one + _jexp(-x))
    if name == "silu":
        return _jmul(x, _jsigmoid(x))
    if name == "gelu":
        return _jmul(x, 0.5 * (one + _jerf(x / math.sqrt(2))))
    if name == "identity":
        return x.copy()
    negative = center < 0
    if name == "relu":
        return np.zeros(n) if negative else x.copy()
    if name in ("leaky_relu", "prelu"):
        return alpha * x if negative else x.copy()
    if name == "elu":
        return alpha * (_jexp(x) - one) if negative else x.copy()
    if name == "selu":
        return SELU_SCALE * (SELU_ALPHA * (_jexp(x) - one) if negative else x)
    raise AssertionError(name)


def least_squares_polynomial(name: str, terms: int, center: float, input_range: tuple[float, float],
                             alpha: float = 0.01, points: int = 20001) -> np.ndarray:
    """Coefficients (in powers of x - center) of the degree terms-1 polynomial closest to f in the least-squares
    sense on ``points`` uniform nodes of the range: the Taylor fallback where f has no series."""
    x = np.linspace(input_range[0], input_range[1], points)
    y = numpy_function(name, alpha)(x)
    poly = np.polynomial.Polynomial.fit(x - center, y, terms - 1).convert()
    coef = np.zeros(terms)
    coef[: len(poly.coef)] = poly.coef
    return coef


# --------------------------------------------------------------------------------------------------------
# Piecewise-linear segmentation (numpy float64, set-up time)
# --------------------------------------------------------------------------------------------------------

@dataclass
class PWLTable:
    """Segments k = 0..K-1 on [breakpoints[k], breakpoints[k+1]]: y = slope[k]·x + intercept[k]; saturation
    outside [breakpoints[0], breakpoints[-1]]. A point on an inner breakpoint takes the right segment."""

    breakpoints: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray

    @property
    def segments(self) -> int:
        return len(self.slope)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.float64), self.breakpoints[0], self.breakpoints[-1])
        k = np.clip(np.searchsorted(self.breakpoints, x, side="right") - 1, 0, self.segments - 1)
        return self.slope[k] * x + self.intercept[k]


def fit_grid(input_range: tuple[float, float], points: int, kinks: tuple[float, ...] = ()) -> np.ndarray:
    """Uniform nodes from a to b; the count is raised (up to 2x) until every kink inside falls on a node."""
    a, b = input_range
    n = points - 1
    inside = [k for k in kinks if a < k < b]
    if inside:
        cand = np.arange(n, 2 * n + 1)
        ok = np.ones(len(cand), dtype=bool)
        for k in inside:
            pos = (k - a) / (b - a) * cand
            ok &= np.abs(pos - np.round(pos)) < 1e-9 * cand
        if ok.any():
            n = int(cand[np.argmax(ok)])
    x = a + (b - a) * np.arange(n + 1) / n
    x[-1] = b
    for k in inside:  # exact kink value on its node (avoids a rounding-level step)
        i = round((k - a) / (b - a) * n)
        if abs(x[i] - k) < 1e-9 * (b - a):
            x[i] = k
    return x


@dataclass
class _Samples:
    """f on the fit grid. A segment that starts (ends) on a kink node uses f's right (left) limit there, so
    a discontinuous f' is fitted on each side of its jump; segments never straddle a kink (``pieces``)."""

    x: np.ndarray
    y: np.ndarray
    y_start: np.ndarray
    y_end: np.ndarray
    pieces: list[tuple[int, int]]


def _samples(fn, x: np.ndarray, kinks: tuple[float, ...]) -> _Samples:
    y = np.asarray(fn(x), dtype=np.float64)
    y_start, y_end = y.copy(), y.copy()
    cuts = {0, len(x) - 1}
    delta = 1e-9 * (x[-1] - x[0])
    for k in kinks:
        hits = np.flatnonzero(x[1:-1] == k) + 1
        if len(hits):
            i = int(hits[0])
            v = np.asarray(fn(np.array([k - 2 * delta, k - delta, k + delta, k + 2 * delta])), dtype=np.float64)
            y_end[i], y_start[i] = 2 * v[1] - v[0], 2 * v[2] - v[3]  # limits, extrapolated linearly
            cuts.add(i)
    return _Samples(x, y, y_start, y_end, list(itertools.pairwise(sorted(cuts))))


def _line(s: _Samples, i: int, j: int, segmenter: str) -> tuple[float, float, float]:
    """(slope, intercept, max |error| on the nodes) of the segmenter's line through nodes i..j."""
    xs, ys = s.x[i:j + 1], s.y[i:j + 1]
    if s.y_start[i] != s.y[i] or s.y_end[j] != s.y[j]:
        ys = ys.copy()
        ys[0], ys[-1] = s.y_start[i], s.y_end[j]
    if segmenter == "chord":
        slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
        intercept = ys[0] - slope * xs[0]
    else:
        dx = xs - xs.mean()
        slope = float(np.dot(dx, ys - ys.mean()) / np.dot(dx, dx))
        intercept = ys.mean() - slope * xs.mean()
    return slope, intercept, float(np.max(np.abs(ys - (slope * xs + intercept))))


def _greedy(s: _Samples, target: float, segmenter: str, max_segments: int | None = None) -> list[int] | None:
    """Node indices of the breakpoints (first and last node included). Each segment reaches as far right as
    the target allows (exponential, then binary search; two nodes are always exact). None when more than
    ``max_segments`` would be needed."""
    nodes = [0]
    for start, end in s.pieces:
        i = start
        while i < end:
            if max_segments is not None and len(nodes) > max_segments:
                return None
            lo, probe = i + 1, min(i + 2, end)  # lo: reachable; probe: next candidate, doubling the reach
            while probe > lo and _line(s, i, probe, segmenter)[2] <= target:
                lo, probe = probe, min(i + 2 * (probe - i), end)
            hi = probe  # unreachable, unless lo == end
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if _line(s, i, mid, segmenter)[2] <= target else (lo, mid)
            j = lo
            nodes.append(j)
            i = j
    if max_segments is not None and len(nodes) - 1 > max_segments:
        return None
    return nodes


def _fixed_count(s: _Samples, segments: int, segmenter: str) -> list[int]:
    """Exactly ``segments`` segments: the smallest error target whose greedy cover needs no more (bisection
    on a log scale), then the widest segments split in halves until the count is met."""
    if segments < len(s.pieces):
        raise ConfigError("segments", segments, f"must be at least {len(s.pieces)}: one segment on each side of "
                                                "a kink")
    hi = max(_line(s, i, j, segmenter)[2] for i, j in s.pieces)
    # a least-squares line may fit a whole piece better than a part of it, so the greedy cover at that
    # error can need more segments: raise the target until it does not
    while (nodes := _greedy(s, hi, segmenter, segments)) is None:
        hi *= 2.0
    if segments > len(nodes) - 1 and hi > 0:
        lo = hi / 4.0 / segments**2
        while lo > 1e-300 and _greedy(s, lo, segmenter, segments) is not None:
            lo /= 4.0
        for _ in range(60):
            if hi <= lo * (1 + 1e-4):
                break
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if _greedy(s, mid, segmenter, segments) is not None else (mid, hi)
        nodes = _greedy(s, hi, segmenter, segments)
    while len(nodes) - 1 < segments:
        widths = np.diff(nodes)
        k = int(np.argmax(widths))
        if widths[k] < 2:
            break
        nodes.insert(k + 1, nodes[k] + int(widths[k]) // 2)
    return nodes


def _table(s: _Samples, nodes: list[int], segmenter: str) -> PWLTable:
    lines = [_line(s, i, j, segmenter) for i, j in itertools.pairwise(nodes)]
    return PWLTable(breakpoints=s.x[nodes].copy(), slope=np.array([ln[0] for ln in lines]),
                    intercept=np.array([ln[1] for ln in lines]))


def grid_margin(x: np.ndarray, y: np.ndarray, kinks: tuple[float, ...] = ()) -> float:
    """How far |f - line| may rise between two nodes above its value on them: twice the h^2 max|f''|/8 of
    linear interpolation, estimated from second differences away from kinks, plus rounding."""
    d2 = np.abs(y[2:] - 2 * y[1:-1] + y[:-2])
    for k in kinks:
        d2[np.abs(x[1:-1] - k) <= 1.5 * np.max(np.diff(x))] = 0.0
    return float(d2.max(initial=0.0)) / 4 + 64 * np.finfo(np.float64).eps * float(np.max(np.abs(y)) + 1)


def fit_pwl(fn, input_range: tuple[float, float], epsilon: float | None = None, segments: int | None = None,
            segmenter: str = "least_squares", points: int = 20001, kinks: tuple[float, ...] = (),
            grid: np.ndarray | None = None) -> tuple[PWLTable, np.ndarray]:
    """PWL segments of ``fn`` (numpy float64 -> float64) on [a, b]: at most ``epsilon`` max |error| (checked on
    the nodes against epsilon minus the between-node margin), or exactly ``segments`` segments (which wins
    when both are given). Returns the table and the grid index of each breakpoint."""
    if segmenter not in SEGMENTERS:
        raise ConfigError("segmenter", segmenter, "must be one of " + ", ".join(map(repr, SEGMENTERS)))
    x = fit_grid(input_range, points, kinks) if grid is None else grid
    s = _samples(fn, x, kinks)
    if segments is not None:
        nodes = _fixed_count(s, int(segments), segmenter)
    elif epsilon is not None:
        target = epsilon - grid_margin(x, s.y, kinks)
        if target <= 0:
            raise ConfigError("epsilon", epsilon, f"is finer than a grid of {len(x)} fit points can guarantee "
                                                  "(raise fit_points)")
        nodes = _greedy(s, target, segmenter)
    else:
        raise ConfigError("epsilon", None, "pwl needs epsilon or segments")
    return _table(s, nodes, segmenter), np.asarray(nodes)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationConfig:
    """One layer's neuron circuit: which function, how it is realized, and how far the circuit strays."""

    function: str = setting("sigmoid", "activation function", choices=FUNCTIONS)
    mode: str = setting("exact", "realization: exact, taylor (polynomial) or pwl (piecewise linear)", choices=MODES)
    terms: int = setting(4, "taylor: number of polynomial terms N (degree N-1)", ge=1, le=32)
    center: float = setting(0.0, "taylor: expansion centre x0")
    input_range: tuple[float, float] = setting((-4.0, 4.0), "taylor: input clipping range; pwl: segment range [a, b]")
    train_coefficients: bool = setting(False, "taylor: coefficients are trainable parameters (else frozen)")
    taylor_fit: str = setting("auto", "taylor: 'series', 'least_squares' on the range, or 'auto' (series where "
                                      "the function has one at x0, else least squares)", choices=TAYLOR_FITS)
    epsilon: float | None = setting(0.01, "pwl: max |error| on the range", gt=0.0)
    segments: int | None = setting(None, "pwl: fixed number of segments (overrides epsilon when set)", ge=1)
    segmenter: str = setting("least_squares", "pwl: 'chord' (end points on f) or 'least_squares' lines",
                             choices=SEGMENTERS)
    derivative: str = setting("fit", "pwl: BP derivative is the PWL 'slope' or a separate PWL 'fit' of f'",
                              choices=DERIVATIVES)
    fit_points: int = setting(20001, "pwl/taylor fallback: uniform nodes on the range used for fitting",
                              ge=101, le=2_000_001)
    alpha: float = setting(0.01, "leaky_relu slope, elu alpha, prelu initial slope")
    gain_dtod: float = setting(0.0, "forward circuit: relative sigma of each neuron's gain (lognormal, mean 1)",
                               ge=0.0)
    offset_dtod: float = setting(0.0, "forward circuit: sigma of each neuron's output offset", ge=0.0)
    noise: float = setting(0.0, "forward circuit: sigma of output noise, drawn on every evaluation", ge=0.0)
    output_range: tuple[float, float] | None = setting(None, "forward circuit: output clipping range")
    derivative_gain_dtod: float = setting(0.0, "derivative circuit: relative sigma of each neuron's gain "
                                          "(lognormal, mean 1)", ge=0.0)
    derivative_offset_dtod: float = setting(0.0, "derivative circuit: sigma of each neuron's offset", ge=0.0)
    derivative_noise: float = setting(0.0, "derivative circuit: sigma of output noise per evaluation", ge=0.0)

    def __post_init__(self) -> None:
        check(self)  # types first, so the conversions below cannot fail on a wrong type
        object.__setattr__(self, "center", float(self.center))
        object.__setattr__(self, "alpha", float(self.alpha))
        for name in ("input_range", "output_range"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 2:
                    raise ConfigError(name, value, "must be two numbers [low, high]")
                object.__setattr__(self, name, (float(value[0]), float(value[1])))
        if self.epsilon is not None:
            object.__setattr__(self, "epsilon", float(self.epsilon))
        self.validate()

    def validate(self) -> None:
        a, b = self.input_range
        if not (math.isfinite(a) and math.isfinite(b) and a < b):
            raise ConfigError("input_range", self.input_range, "needs low < high, both finite")
        if self.output_range is not None:
            lo, hi = self.output_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError("output_range", self.output_range, "needs low < high, both finite")
        if self.mode == "taylor":
            if not a <= self.center <= b:
                raise ConfigError("center", self.center, f"must lie in input_range {self.input_range}")
            if self.taylor_fit == "series" and not analytic_at(self.function, self.center):
                raise ConfigError("center", self.center, f"{self.function} has no Taylor series there "
                                                         "(use taylor_fit = 'auto' or 'least_squares')")
        if self.mode == "pwl":
            if self.epsilon is None and self.segments is None:
                raise ConfigError("epsilon", None, "pwl needs epsilon or segments")
            if self.segments is not None and self.segments > self.fit_points - 1:
                raise ConfigError("segments", self.segments, f"must be <= fit_points - 1 ({self.fit_points - 1})")

    @property
    def has_variation(self) -> bool:
        return bool(self.gain_dtod or self.offset_dtod or self.noise or self.output_range)


# --------------------------------------------------------------------------------------------------------
# Batched evaluation kernels (custom autograd: the derivative is produced in the forward pass, the way a
# derivative circuit runs beside the neuron, so backward is one multiply)
# --------------------------------------------------------------------------------------------------------

_WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def _pack_rows(table: torch.Tensor) -> torch.Tensor:
    """A (L, C) table as L single wide elements where a dtype that wide exists, so one gather fetches a row."""
    table = table.contiguous()
    wide = _WIDE.get(table.shape[1] * table.element_size())
    return table.view(wide).reshape(-1) if wide is not None else table


def _parallel_gather(device: torch.device) -> bool:
    """On a multi-threaded CPU, gather from an expanded 2-D view: torch's 1-D index_select is a serial loop
    while gather over rows is split across threads (same result, bit for bit)."""
    return device.type == "cpu" and torch.get_num_threads() > 1


def _gather_rows(packed: torch.Tensor, index: torch.Tensor, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``packed[index]`` as (*index.shape, columns) values of ``dtype``."""
    if packed.dim() == 1 and index.dim() >= 1 and _parallel_gather(index.device):
        flat = index.reshape(-1, index.shape[-1]).long()
        rows = torch.gather(packed.expand(flat.shape[0], -1), 1, flat)
    else:
        rows = torch.index_select(packed, 0, index.reshape(-1))
    if packed.dim() == 1:
        rows = rows.view(dtype)
    return rows.reshape(*index.shape, columns)


def _horner(coeffs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """sum_k c_k u^k. Written as mul, add_, then addcmul with one 0-dim operand: on CPU a 0-dim tensor acts as
    a scalar there, while addcmul with two 0-dim operands falls off the vectorized path (3x slower)."""
    n = coeffs.shape[0]
    if n == 1:
        return torch.zeros_like(u).add_(coeffs[0])
    y = (u * coeffs[n - 1]).add_(coeffs[n - 2])
    for k in range(n - 3, -1, -1):
        torch.addcmul(coeffs[k], y, u, out=y)  # in place: one buffer for the whole polynomial
    return y


def _poly_derivative(coeffs: torch.Tensor) -> torch.Tensor:
    n = coeffs.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=coeffs.dtype, device=coeffs.device)
    return coeffs[1:] * torch.arange(1, n, dtype=coeffs.dtype, device=coeffs.device)


def _clip_mask(d: torch.Tensor, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """d where low < x < high, else 0: the derivative of input clipping. hardtanh_backward is that product in
    one vectorized kernel (a bool mask costs 8x more on CPU)."""
    return torch.ops.aten.hardtanh_backward.grad_input(d, x, low, high, grad_input=d)


class _Taylor(torch.autograd.Function):
    """p(clip(x, a, b) - x0); gradient p'(u) strictly inside the range, 0 elsewhere; coefficients get sum g·u^k."""

    @staticmethod
    def forward(ctx, x, coeffs, low, high, center):
        xc = torch.clamp(x, low, high)
        u = xc - center if center != 0.0 else xc
        y = _horner(coeffs, u)
        need_x, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d = None
        if need_x:
            d = _clip_mask(_horner(_poly_derivative(coeffs), u), x, low, high)
        ctx.n_terms = coeffs.shape[0]
        ctx.save_for_backward(d if need_x else None, u if need_c else None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        d, u = ctx.saved_tensors
        gx = grad * d if d is not None else None
        gc = None
        if u is not None:
            parts, p = [grad.sum()], grad
            for _ in range(ctx.n_terms - 1):
                p = p * u
                parts.append(p.sum())
            gc = torch.stack(parts)
        return gx, gc, None, None, None


def taylor_scale(config: ActivationConfig) -> float:
    """s = max |u| over the clipping range (u = x - x0): the input the polynomial circuit sees is u/s in
    [-1, 1], and a_k = c_k s^k is coefficient k in the circuit's own units (term k adds at most |a_k|)."""
    a, b = config.input_range
    return max(abs(a - config.center), abs(b - config.center))


def _taylor_sets(x: torch.Tensor, sets: torch.Tensor, low: float, high: float, center: float) -> torch.Tensor:
    """p_m(clip(x, a, b) - x0) where the batch of x is M equal blocks and block m uses coefficient row m of
    ``sets`` (M, terms): M chip states measured in one evaluation (coefficient perturbation)."""
    m = sets.shape[0]
    if x.shape[0] % m:
        raise ValueError(f"a batch of {x.shape[0]} is not {m} equal blocks, one per coefficient set")
    xc = torch.clamp(x, low, high)
    u = (xc - center if center != 0.0 else xc).reshape(m, -1)
    c = sets.to(dtype=x.dtype, device=x.device)
    n = c.shape[1]
    y = c[:, n - 1:n].expand(m, u.shape[1]).clone()
    for k in range(n - 2, -1, -1):
        y = torch.addcmul(c[:, k:k + 1], y, u)
    return y.reshape(x.shape)


def _cell_coordinate(x: torch.Tensor, lookup: dict[str, float]) -> torch.Tensor:
    """u = (x - a)/h + 1 clipped to the padded table: floor(u) is the cell (0 and last are padding), and the
    tables hold each line in u, so u alone gives the output (±inf saturate, NaN stays NaN)."""
    wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # half types cannot count cells
    shift = lookup.get(wide.dtype)
    if shift is None:  # the 0-dim CPU tensor (a scalar to torch) is made once per dtype
        shift = lookup[wide.dtype] = torch.tensor(lookup["shift"], dtype=wide.dtype)
    u = torch.add(shift, wide, alpha=lookup["scale"])
    return u.clamp_(0.0, lookup["top"])


def _rows(packed: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gathered (intercept, slope) rows of each u's cell. A NaN input gives an out-of-range index (CPU) or
    would trip a device assert (CUDA); there the index is taken from a NaN-free copy of u, and the padding
    cell's 0 slope times NaN keeps the output NaN."""
    if u.device.type == "cpu":
        try:
            index = u.to(torch.int64 if _parallel_gather(u.device) else torch.int32)
            return _gather_rows(packed, index, 2, u.dtype)
        except (IndexError, RuntimeError):
            if not torch.isnan(u).any():
                raise
    return _gather_rows(packed, torch.nan_to_num(u, nan=0.0).to(torch.int32), 2, u.dtype)


class _PWL(torch.autograd.Function):
    """Lookup of packed per-cell rows (intercept, slope in cell coordinates) of f and of the BP derivative;
    0 slopes in the two padding cells give saturation and a zero derivative outside [a, b]."""

    @staticmethod
    def forward(ctx, x, lut_f, lut_d, lookup, derivative_is_slope):
        u = _cell_coordinate(x, lookup)
        rows = _rows(lut_f, u)
        if ctx.needs_input_grad[0]:  # the derivative, made now as one contiguous tensor: backward is a multiply
            if derivative_is_slope:
                d = rows[..., 1] * lookup["scale"]  # dy/dx = (dy/du)·(du/dx)
            else:
                drows = _rows(lut_d, u)
                d = torch.addcmul(drows[..., 0], drows[..., 1], u)
            ctx.save_for_backward(d)
        return torch.addcmul(rows[..., 0], rows[..., 1], u, out=u).to(x.dtype)  # u's buffer is free now

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return (grad * d).to(grad.dtype), None, None, None, None


# --------------------------------------------------------------------------------------------------------
# The neuron circuit
# --------------------------------------------------------------------------------------------------------

def _sub_seed(base: int, name: str) -> int:
    digest = hashlib.sha256(f"{base}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ActivationUnit(torch.nn.Module):
    """A layer's neuron circuits: ``forward`` is the non-ideal forward circuit (autograd-differentiable),
    ``derivative`` the separate derivative circuit BP reads, ``ideal`` the realization without circuit effects.

    Per-neuron gain and offset are sampled once (seeded); noise is drawn on every evaluation from the unit's
    own generators, so the forward chip is the same whether or not a derivative circuit is built, and reading
    the derivative circuit does not shift the forward noise.
    """

    def __init__(self, config: ActivationConfig, num_neurons: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 derivative_circuit: bool = True):
        super().__init__()
        check(config)
        config.validate()
        if num_neurons < 1:
            raise ConfigError("num_neurons", num_neurons, "must be >= 1")
        self.config = config
        self.num_neurons = int(num_neurons)
        self.has_derivative_circuit = bool(derivative_circuit)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._dtype = dtype
        if generator is None:
            base = 0
        else:
            base = int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device).item())
        self._seeds = {name: _sub_seed(base, name) for name in ("gain", "offset", "noise", "d_gain", "d_offset",
                                                                  "d_noise")}
        self._noise_gens: dict[tuple[str, str], PhiloxStream] = {}
        self._pack_cache: dict[int, tuple] = {}
        self._view_cache: dict[int, tuple] = {}   # see _per_neuron
        self._row_cache: dict[str, tuple] = {}     # see _row_operands
        self.register_buffer("gain", self._sample("gain", config.gain_dtod, 1.0, lognormal=True))
        self.register_buffer("offset", self._sample("offset", config.offset_dtod, 0.0))
        if self.has_derivative_circuit:
            self.register_buffer("derivative_gain", self._sample("d_gain", config.derivative_gain_dtod, 1.0,
                                                                 lognormal=True))
            self.register_buffer("derivative_offset", self._sample("d_offset", config.derivative_offset_dtod, 0.0))
        self.prelu_slope: torch.nn.Parameter | None = None
        if config.function == "prelu":
            self.prelu_slope = torch.nn.Parameter(torch.tensor([config.alpha], dtype=dtype, device=self._device))
        self.info: dict[str, Any] = {}
        self._coefficient_sets: torch.Tensor | None = None
        self._build()

    # -- set-up -------------------------------------------------------------------------------------------
    def _sample(self, name: str, sigma: float, mean: float, lognormal: bool = False) -> torch.Tensor:
        """Mismatch of one circuit parameter, once per neuron (float64 draw, so all dtypes share the chip).

        Offsets are Gaussian of sigma ``sigma``. A gain (``lognormal``) cannot change sign: it is lognormal with
        mean ``mean`` and relative sigma exactly ``sigma`` at any value (log-sigma² = ln(1 + sigma²)), which is
        the Gaussian to first order for small sigma and stays positive for large sigma."""
        g = torch.Generator().manual_seed(self._seeds[name])
        z = torch.randn(self.num_neurons, generator=g, dtype=torch.float64)
        if lognormal:
            s2 = math.log1p(sigma * sigma)
            return (mean * torch.exp(z * math.sqrt(s2) - 0.5 * s2)).to(device=self._device, dtype=self._dtype)
        return (mean + sigma * z).to(device=self._device, dtype=self._dtype)

    def _alpha(self) -> float:
        return float(self.prelu_slope.detach()) if self.prelu_slope is not None else self.config.alpha

    def _set(self, name: str, value: torch.Tensor | None, parameter: bool = False) -> None:
        for store in (self._parameters, self._buffers):
            store.pop(name, None)
        if value is None:
            return
        if parameter:
            self.register_parameter(name, torch.nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def _build(self) -> None:
        """(Re)build the realization from the config: coefficients or lookup tables."""
        cfg = self.config
        self._device, self._dtype = self.gain.device, self.gain.dtype  # follow .to() since construction
        kw = {"device": self._device, "dtype": self._dtype}
        self._set("coefficients", None)
        self._pack_cache = {}
        for name in ("lut_f", "lut_d"):
            self._set(name, None)
        self._pwl: PWLTable | None = None
        self._pwl_derivative: PWLTable | None = None
        if self.prelu_slope is not None:
            self.prelu_slope.requires_grad_(cfg.mode == "exact")
        alpha = self._alpha()
        self.info = {"function": cfg.function, "mode": cfg.mode}
        if cfg.mode == "taylor":
            method = cfg.taylor_fit
            if method == "auto":
                method = "series" if analytic_at(cfg.function, cfg.center) else "least_squares"
            if method == "series":
                coef = taylor_coefficients(cfg.function, cfg.terms, cfg.center, alpha)
            else:
                coef = least_squares_polynomial(cfg.function, cfg.terms, cfg.center, cfg.input_range, alpha,
                                                cfg.fit_points)
            self.info.update(terms=cfg.terms, taylor_method=method,
                             taylor_fallback=(cfg.taylor_fit == "auto" and method == "least_squares"))
            self._set("coefficients", torch.tensor(coef, **kw), parameter=cfg.train_coefficients)
        elif cfg.mode == "pwl":
            self._build_pwl(alpha)

    def _build_pwl(self, alpha: float) -> None:
        cfg = self.config
        kinks = KINKS.get(cfg.function, ())
        grid = fit_grid(cfg.input_range, cfg.fit_points, kinks)
        f_tab, f_nodes = fit_pwl(numpy_function(cfg.function, alpha), cfg.input_range, cfg.epsilon, cfg.segments,
                                 cfg.segmenter, cfg.fit_points, kinks, grid)
        if cfg.derivative == "fit":
            d_tab, d_nodes = fit_pwl(numpy_function(cfg.function, alpha, derivative=True), cfg.input_range,
                                     cfg.epsilon, cfg.segments, cfg.segmenter, cfg.fit_points, kinks, grid)
        else:
            d_tab = PWLTable(f_tab.breakpoints.copy(), np.zeros(f_tab.segments), f_tab.slope.copy())
            d_nodes = f_nodes
        self._pwl, self._pwl_derivative = f_tab, d_tab
        self.info.update(segments=f_tab.segments, derivative_segments=d_tab.segments)

        # Per-cell rows; every cell of the uniform grid lies inside one segment of each table. Lines are
        # stored in the cell coordinate u = (x - a)/h + 1, i.e. x = a + h(u - 1): y = (c + s(a - h)) + (s h) u.
        cells = len(grid) - 1
        a, b = cfg.input_range
        h = (b - a) / cells
        seg_f = np.repeat(np.arange(f_tab.segments), np.diff(f_nodes))
        seg_d = np.repeat(np.arange(d_tab.segments), np.diff(d_nodes))
        rows = np.zeros((cells + 2, 4))
        for col, tab, seg in ((0, f_tab, seg_f), (2, d_tab, seg_d)):
            rows[1:-1, col] = tab.intercept[seg] + tab.slope[seg] * (a - h)
            rows[1:-1, col + 1] = tab.slope[seg] * h
        rows[0, 0] = f_tab.slope[0] * a + f_tab.intercept[0]     # saturation values; derivative 0 outside
        rows[-1, 0] = f_tab.slope[-1] * b + f_tab.intercept[-1]
        self._lookup = {"scale": 1.0 / h, "shift": 1.0 - a / h, "top": cells + 1.5}
        table = torch.tensor(rows, device=self._device, dtype=self._dtype)
        self._set("lut_f", table[:, :2].contiguous())   # plain float buffers, so Module.to() converts them;
        self._set("lut_d", table[:, 2:].contiguous())   # packed (a free view) at each call

    # -- the interface the trainers call --------------------------------------------------------------------
    def set_mode(self, mode: str | None = None, **changes: Any) -> ActivationUnit:
        """Switch the realization in place (two-stage training: stage 1 exact or fixed, stage 2 a Taylor
        polynomial with ``train_coefficients=True``). The sampled mismatch and the noise streams are kept;
        new parameters are created, so rebuild the optimizer afterwards."""
        if mode is not None:
            changes["mode"] = mode
        self.config = dataclasses.replace(self.config, **changes)
        self._build()
        return self

    @contextlib.contextmanager
    def coefficient_sets(self, sets: torch.Tensor) -> Iterator[None]:
        """Taylor mode: evaluate M coefficient sets at once (sets: (M, terms)); the batch is read as M equal
        blocks, block m computed with row m. The circuit around the polynomial (mismatch, noise, clipping) is
        the same chip for every block; each block draws its own noise, as M sequential evaluations would."""
        if self.config.mode != "taylor":
            raise RuntimeError(f"coefficient_sets() needs mode 'taylor' (this unit is '{self.config.mode}')")
        if sets.dim() != 2 or sets.shape[1] != self.config.terms:
            raise ValueError(f"coefficient sets must be (M, {self.config.terms}), got {tuple(sets.shape)}")
        saved = self._coefficient_sets
        self._coefficient_sets = sets.detach()
        try:
            yield
        finally:
            self._coefficient_sets = saved

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        out = []
        if self.config.mode == "taylor" and self.config.train_coefficients:
            out.append(self.coefficients)
        if self.prelu_slope is not None and self.config.mode == "exact":
            out.append(self.prelu_slope)
        return out

    def _kernels(self, x: torch.Tensor):
        """The fused CPU pass of the PWL lookup or the Taylor polynomial (neurosim._activation_numba) where it
        applies: float32 on the CPU outside autograd, numba present; else None (torch operations)."""
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                                   for p in self.trainable_parameters()))
        if (self.config.mode not in ("pwl", "taylor") or x.device.type != "cpu" or x.dtype != torch.float32 or grad
                or self._dtype != torch.float32 or not x.is_contiguous() or _numba_kernels() is None
                or self._coefficient_sets is not None):
            return None
        return NUMBA.activation

    def ideal(self, x: torch.Tensor) -> torch.Tensor:
        """The realization (exact, Taylor or PWL) without circuit non-idealities; differentiable."""
        cfg = self.config
        kernels = self._kernels(x) if cfg.mode == "pwl" else None
        if kernels is not None:
            lk, out = self._lookup, torch.empty_like(x)
            kernels.pwl(flat_numpy(x), self.lut_f.numpy(), 0, np.float32(lk["shift"]), np.float32(lk["scale"]),
                        np.float32(lk["top"]), flat_numpy(out))
            return out
        if cfg.mode == "exact":
            alpha = self.prelu_slope if self.prelu_slope is not None else cfg.alpha
            return exact(cfg.function, x, alpha)
        if cfg.mode == "taylor":
            a, b = cfg.input_range
            if self._coefficient_sets is not None:
                return _taylor_sets(x, self._coefficient_sets, a, b, cfg.center)
            kernels = self._kernels(x)
            if kernels is not None:
                return self._taylor_kernel(kernels, x, False)
            coeffs = self.coefficients.to(x.dtype)
            return _Taylor.apply(x, coeffs, a, b, cfg.center)
        return _PWL.apply(x, self._packed(self.lut_f, x), self._packed(self.lut_d, x), self._lookup,
                          cfg.derivative == "slope")

    def ideal_derivative(self, x: torch.Tensor) -> torch.Tensor:
        """The derivative of the realization that BP uses (PWL: its slope or the separate fit of f')."""
        cfg = self.config
        with torch.no_grad():
            if cfg.mode == "exact":
                return exact_derivative(cfg.function, x, self.prelu_slope if self.prelu_slope is not None
                                        else cfg.alpha)
            if cfg.mode == "taylor":
                a, b = cfg.input_range
                kernels = self._kernels(x)
                if kernels is not None:
                    return self._taylor_kernel(kernels, x, True)
                xc = torch.clamp(x, a, b)
                d = _horner(_poly_derivative(self.coefficients.detach().to(x.dtype)),
                            xc - cfg.center if cfg.center else xc)
                return _clip_mask(d, x, a, b)
            kernels = self._kernels(x)
            if kernels is not None:
                lk, out = self._lookup, torch.empty_like(x)
                args = (np.float32(lk["shift"]), np.float32(lk["scale"]), np.float32(lk["top"]))
                if cfg.derivative == "slope":
                    kernels.pwl_slope(flat_numpy(x), self.lut_f.numpy(), *args, flat_numpy(out))
                else:
                    kernels.pwl(flat_numpy(x), self.lut_d.numpy(), 0, *args, flat_numpy(out))
                return out
            u = _cell_coordinate(x, self._lookup)
            if cfg.derivative == "slope":  # the same arithmetic as the autograd path, so both agree bit for bit
                return (_rows(self._packed(self.lut_f, x), u)[..., 1] * self._lookup["scale"]).to(x.dtype)
            rows = _rows(self._packed(self.lut_d, x), u)
            return torch.addcmul(rows[..., 0], rows[..., 1], u).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward circuit: clip(gain·f(x) + offset + noise) per neuron (neurons along dim 1)."""
        self._check_shape(x)
        cfg = self.config
        y = self.ideal(x)
        return self._circuit(y, self.gain, self.offset, cfg.gain_dtod, cfg.offset_dtod, cfg.noise,
                             "noise", cfg.output_range, fresh=y is not x)

    def noiseless(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` before its per-evaluation noise and output clip: gain·f(x) + offset (no autograd). Exact
        DGC evaluates it once for the outputs many measurements share; ``finish`` adds each one's noise."""
        self._check_shape(x)
        cfg = self.config
        with torch.no_grad():
            y = self.ideal(x)
            return self._circuit(y, self.gain, self.offset, cfg.gain_dtod, cfg.offset_dtod, 0.0, "noise", None,
                                 fresh=y is not x)

    def finish(self, y: torch.Tensor, copies: int | None = None, clip: bool = True) -> torch.Tensor:
        """The rest of ``forward`` on ``noiseless`` outputs y (the caller's temporary, changed in place): this
        evaluation's noise, drawn from the unit's stream as ``forward`` draws it, then the output clip.
        ``finish(noiseless(x))`` equals ``forward(x)`` bit for bit. ``copies``: y (B, neurons) is the output
        of ``copies`` evaluations alike but for their noise; the result (copies·B, neurons) is written into
        the draws (one pass instead of a copy and an addition). ``clip=False`` leaves the clip to the caller
        (``clip_output``), who may still change some outputs."""
        self._check_shape(y)
        cfg = self.config
        with torch.no_grad():
            if copies is not None:
                shape = (copies * y.shape[0], *y.shape[1:])
                if not cfg.noise:
                    y = y.repeat((copies,) + (1,) * (y.dim() - 1))
                else:
                    z = self._generator("noise", y.device).normal(shape, dtype=y.dtype)
                    zv = z.view(copies, *y.shape)
                    torch.add(y, zv, alpha=cfg.noise, out=zv)
                    y = z
            elif cfg.noise:
                y = y.add_(self._generator("noise", y.device).normal(y.shape, dtype=y.dtype), alpha=cfg.noise)
            return self.clip_output(y) if clip else y

    def clip_output(self, y: torch.Tensor) -> torch.Tensor:
        """The forward circuit's output clip (``output_range``), in place on the caller's temporary."""
        r = self.config.output_range
        return y.clamp_(r[0], r[1]) if r is not None else y

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """The derivative circuit's output f'(x) with its own mismatch and noise (no autograd)."""
        if not self.has_derivative_circuit:
            raise RuntimeError("this ActivationUnit was built with derivative_circuit=False (a scheme such as "
                               "DGC that needs no derivative circuit); build it with derivative_circuit=True")
        self._check_shape(x)
        cfg = self.config
        with torch.no_grad():
            return self._circuit(self.ideal_derivative(x), self.derivative_gain, self.derivative_offset,
                                 cfg.derivative_gain_dtod, cfg.derivative_offset_dtod, cfg.derivative_noise,
                                 "d_noise", None, fresh=True)

    def derivative_times(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``derivative(x) * grad``, the error behind the neuron circuit, as a fresh tensor -- or ``grad``
        itself where the derivative circuit outputs exactly 1 everywhere (an exact identity without mismatch
        or noise: 1·g is g, bit for bit), which spares a layer without neurons two operations a step."""
        cfg = self.config
        if (cfg.function == "identity" and cfg.mode == "exact" and self.has_derivative_circuit
                and not (cfg.derivative_gain_dtod or cfg.derivative_offset_dtod or cfg.derivative_noise)
                and grad.shape == x.shape and grad.dtype == x.dtype):
            self._check_shape(x)
            return grad
        pre = _PROLOGUES.get(cfg.function, 0) if cfg.mode == "exact" else 0
        steps = bool(cfg.derivative_gain_dtod or cfg.derivative_offset_dtod) + 1 + (2 if pre else 0)
        if (self.has_derivative_circuit and grad.shape == x.shape and x.is_contiguous()
                and self._fusable(x, cfg.derivative_noise, "d_noise", steps)):
            self._check_shape(x)
            with no_grad():
                # the ideal derivative's last steps (sigmoid: (1 - s)·s; tanh: 1 - t²) move into the pass
                y = torch.sigmoid(x) if pre == 1 else torch.tanh(x) if pre == 2 else self.ideal_derivative(x)
                return self._fused(y.contiguous(), self.derivative_gain if cfg.derivative_gain_dtod else None,
                                   self.derivative_offset if cfg.derivative_offset_dtod else None,
                                   cfg.derivative_noise, "d_noise", None, True, pre, grad)
        return self.derivative(x).mul_(grad)

    def pwl_table(self, which: str = "function") -> PWLTable:
        """The segments (breakpoints, slope, intercept) of the PWL function, or of the derivative BP uses."""
        if self.config.mode != "pwl":
            raise RuntimeError(f"pwl_table() needs mode 'pwl' (this unit is '{self.config.mode}')")
        if which not in ("function", "derivative"):
            raise ValueError("which must be 'function' or 'derivative'")
        table = self._pwl if which == "function" else self._pwl_derivative
        return dataclasses.replace(table, breakpoints=table.breakpoints.copy(), slope=table.slope.copy(),
                                   intercept=table.intercept.copy())

    @property
    def taylor_fallback(self) -> bool:
        """True when a Taylor unit uses the least-squares polynomial because f has no series at x0."""
        return bool(self.info.get("taylor_fallback", False))

    def describe(self) -> str:
        """One line on the realization, for reports and logs."""
        cfg, info = self.config, self.info
        if cfg.mode == "exact":
            return f"{cfg.function}: exact"
        if cfg.mode == "taylor":
            how = ("least-squares polynomial (fallback: no series at x0)" if self.taylor_fallback else
                   "least-squares polynomial" if info["taylor_method"] == "least_squares" else "Taylor series")
            return (f"{cfg.function}: {how}, {cfg.terms} terms, x0={cfg.center:g}, clip "
                    f"[{cfg.input_range[0]:g}, {cfg.input_range[1]:g}]")
        target = f"{cfg.segments} segments" if cfg.segments is not None else f"eps={cfg.epsilon:g}"
        return (f"{cfg.function}: PWL {cfg.segmenter}, {info['segments']} segments ({target}) on "
                f"[{cfg.input_range[0]:g}, {cfg.input_range[1]:g}], derivative {cfg.derivative}")

    def extra_repr(self) -> str:
        return f"{self.describe()}, neurons={self.num_neurons}"

    # -- internals ------------------------------------------------------------------------------------------
    def _taylor_kernel(self, kernels, x: torch.Tensor, derivative: bool) -> torch.Tensor:
        """The Taylor polynomial (``derivative``: its derivative, 0 outside the clipping range) as one CPU pass,
        bit for bit the torch operations of ``_Taylor``/``ideal_derivative`` (tested)."""
        coeffs, dcoeffs, a, b, center, shift = self._taylor_operands()
        out = torch.empty_like(x)
        kernels.taylor(flat_numpy(x), dcoeffs if derivative else coeffs, a, b, center, shift, derivative,
                       flat_numpy(out))
        return out

    def _taylor_operands(self) -> tuple:
        """The kernel's operands: the float32 coefficients and k·c_k (``_poly_derivative``) as numpy arrays, the
        clipping range and the center as float32; kept while the coefficients (their version) and the config
        are the same: a BP step evaluates each polynomial and its derivative with the same ones."""
        c, cfg = self.coefficients, self.config
        memo = getattr(self, "_taylor_memo", None)
        if memo is None or memo[0] != (c._version, c.data_ptr()) or memo[1] is not cfg:
            f32 = c.detach().to(torch.float32).contiguous()   # (the coefficients themselves when float32)
            a, b = cfg.input_range
            memo = self._taylor_memo = ((c._version, c.data_ptr()), cfg, (
                f32.numpy(), _poly_derivative(f32).contiguous().numpy(), np.float32(a), np.float32(b),
                np.float32(cfg.center), cfg.center != 0.0))
        return memo[2]

    def _packed(self, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The table packed for x's device and dtype, cached (keyed by the buffer, so Module.to() refreshes)."""
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        key = (table.data_ptr(), table._version, table.dtype, x.device, dtype)
        cached = self._pack_cache.get(id(table))
        if cached is None or cached[0] != key:
            cached = self._pack_cache[id(table)] = (key, _pack_rows(table.to(device=x.device, dtype=dtype)))
        return cached[1]

    def _per_neuron(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A per-neuron buffer (gain, offset) in y's dtype and device, shaped to broadcast along dim 1 of y:
        made once and kept while the buffer is the same tensor, unmodified (its version), because a conversion
        and a view at every evaluation were a sixth of a neuron circuit's operations in a BP step."""
        key = (t._version, y.dtype, y.device, y.dim())
        cached = self._view_cache.get(id(t))
        if cached is None or cached[0] is not t or cached[1] != key:
            shape = (1, self.num_neurons) + (1,) * (y.dim() - 2)
            cached = self._view_cache[id(t)] = (t, key, t.to(device=y.device, dtype=y.dtype).view(shape))
        return cached[2]

    def _check_shape(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_neurons:
            raise ValueError(f"expected neurons along dim 1: shape (B, {self.num_neurons}, ...), got "
                             f"{tuple(x.shape)}")

    def _generator(self, stream: str, device: torch.device) -> PhiloxStream:
        """The per-evaluation noise stream ('noise', 'd_noise') on ``device``, made on first use: counter-based
        (docs/random.md), so a batch's B·neurons draws fill on every core, the same at any thread count."""
        key = (stream, str(device))
        if key not in self._noise_gens:
            self._noise_gens[key] = PhiloxStream(self._seeds[stream], device)
        return self._noise_gens[key]

    def _fusable(self, t: torch.Tensor, noise: float, stream: str, steps: int) -> bool:
        """Whether the circuit on t runs as the fused CPU pass: float32 on the CPU outside autograd, numba
        present (and the noise stream drawing with it), and worth a kernel call (a few µs of Python and
        dispatch): it draws noise (a kernel call anyway) or replaces at least two torch operations."""
        if (t.dtype is not torch.float32 or not (noise or steps >= 2) or t.device.type != "cpu"
                or (t.requires_grad and torch.is_grad_enabled()) or _numba_kernels() is None):
            return False
        return not noise or self._generator(stream, t.device).kernel == "numba"

    def _row_operands(self, gain: torch.Tensor | None, offset: torch.Tensor | None, row: int, stream: str
                      ) -> tuple[np.ndarray, np.ndarray]:
        """The circuit's per-neuron gain and offset as one float32 value per element of a row of ``row``
        elements (neurons × positions), the neutral 1 and -0 where it has no such mismatch; kept while the
        buffers are the same, unchanged (a BP step evaluates each circuit with the same ones)."""
        c = self._row_cache.get(stream)
        versions = (-1 if gain is None else gain._version, -1 if offset is None else offset._version)
        if c is None or c[0] is not gain or c[1] is not offset or c[2] != row or c[3] != versions:
            per = row // self.num_neurons
            rows = [torch.full((row,), neutral, dtype=torch.float32).numpy() if t is None else
                    t.detach().to(device="cpu", dtype=torch.float32).repeat_interleave(per).numpy()
                    for t, neutral in ((gain, 1.0), (offset, -0.0))]
            c = self._row_cache[stream] = (gain, offset, row, versions, *rows)
        return c[4], c[5]

    def _fused(self, y: torch.Tensor, gain: torch.Tensor | None, offset: torch.Tensor | None, noise: float,
               stream: str, clip: tuple[float, float] | None, fresh: bool, pre: int = 0,
               grad: torch.Tensor | None = None) -> torch.Tensor:
        """The circuit (and for BP the derivative prologue ``pre`` and the product with ``grad``) as one pass
        over contiguous float32 y (in place when ``fresh``), where ``_fusable`` said so. Its noise is the draw
        ``normal(y.shape)`` of the unit's stream, which advances as that call would."""
        n = y.numel()
        first = key = 0
        if noise:
            gen = self._generator(stream, y.device)
            first, key = gen._take(n), gen._key
        out = y if fresh else torch.empty_like(y)
        if n == 0:
            return out
        rows = y.shape[0]
        g_row, o_row = self._row_operands(gain, offset, n // rows, stream)
        y2, out2 = (y, out) if y.dim() == 2 else (y.view(rows, -1), out.view(rows, -1))
        if grad is None:
            g, gstride = g_row, 0
        else:
            if grad.dtype is not torch.float32 or grad.device.type != "cpu":
                grad = grad.to(device="cpu", dtype=torch.float32)
            if grad.is_contiguous():
                g, gstride = flat_numpy(grad.detach()), g_row.size
            elif grad.dim() == 2 and grad.stride(1) == 1:   # a column slice: its rows keep their stride
                gstride = grad.stride(0)
                g = grad.detach().as_strided(((rows - 1) * gstride + g_row.size,), (1,)).numpy()
            else:
                g, gstride = flat_numpy(grad.detach().contiguous()), g_row.size
        lo, hi = clip if clip is not None else (-math.inf, math.inf)
        # without noise the pass is a few arithmetic operations an element: parallel only for larger sizes
        _run(NUMBA.activation.circuit, n if noise else n // 8, y2.numpy(), out2.numpy(), g_row, o_row, pre,
             noise or 1.0, bool(noise), lo, hi, g, gstride, grad is not None, first, key & 0xFFFFFFFF, key >> 32)
        return out

    def _circuit(self, y: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor, gain_sigma: float,
                 offset_sigma: float, noise: float, stream: str, clip: tuple[float, float] | None,
                 fresh: bool = False) -> torch.Tensor:
        """Apply per-neuron gain and offset, per-evaluation noise and output clipping (skipped where zero, so a
        circuit without variation returns its ideal output bit for bit). ``fresh``: y is this evaluation's own
        temporary, so outside autograd every step works in its buffer (one pass each, no new tensor). Float32
        on the CPU outside autograd, a circuit with noise or with both mismatch and a clip is one fused pass
        (neurosim._activation_numba.circuit, equal bit for bit); the torch operations below are its oracle."""
        steps = bool(gain_sigma or offset_sigma) + (clip is not None)
        if self._fusable(y, noise, stream, steps) and y.is_contiguous():
            return self._fused(y, gain if gain_sigma else None, offset if offset_sigma else None, noise, stream,
                               clip, fresh)
        inplace = fresh and not (torch.is_grad_enabled() and y.requires_grad)
        if gain_sigma:
            g = self._per_neuron(gain, y)
            if offset_sigma:
                off = self._per_neuron(offset, y)
                y = torch.addcmul(off, y, g, out=y) if inplace else torch.addcmul(off, y, g)
            else:
                y = y.mul_(g) if inplace else y * g
        elif offset_sigma:
            off = self._per_neuron(offset, y)
            y = y.add_(off) if inplace else y + off
        if noise:
            z = self._generator(stream, y.device).normal(y.shape, dtype=y.dtype)
            y = y + noise * z if torch.is_grad_enabled() and y.requires_grad else torch.add(y, z, alpha=noise, out=z)
        if clip is not None:
            y = y.clamp_(clip[0], clip[1]) if (inplace or noise) and not y.requires_grad else \
                torch.clamp(y, clip[0], clip[1])
        return y
