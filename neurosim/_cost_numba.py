"""The CPU kernel of BP's cost and its gradient (neurosim.training.cost.mean_cost_and_gradient): one pass.

Imported lazily (after neurosim.random_streams has chosen numba's threading layer). Why it exists: the cost of
a (batch, classes) output is a dozen small torch operations, and in a training step, between the layers'
large passes, each of them runs from cold caches: measured 110-190 us for a (64, 10) cost on the benchmark
machine, against 30 us for the same calls in a loop of their own. One call does it in a few microseconds.

Precision: every value is computed in float64 and rounded once to the output's dtype, so the kernel is at least
as exact as torch's float32 operations; it is not bit for bit torch's (whose exp, log and sum order are its
own). tests/test_training.py states the bound against autograd and against float64 autograd. Serial: a
batch's cost is a few thousand operations.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def cross_entropy(out, y, grad):
    """Mean over the batch of logsumexp(out_b) − out_b[y_b]; its gradient g·softmax(out_b) − g at y_b
    (g = 1/B) into ``grad``. Returns the mean, or NaN/inf as torch's would be (the caller then takes the torch
    path, whose exact non-finite semantics are the divergence check's)."""
    B, C = out.shape
    g = 1.0 / B
    total = 0.0
    for b in range(B):
        m = np.float64(out[b, 0])
        for c in range(1, C):
            v = np.float64(out[b, c])
            if v > m:
                m = v
        s = 0.0
        for c in range(C):
            s += np.exp(np.float64(out[b, c]) - m)
        lse = np.log(s) + m
        t = y[b]
        total += lse - np.float64(out[b, t])
        for c in range(C):
            p = np.exp(np.float64(out[b, c]) - lse)
            grad[b, c] = g * (p - 1.0) if c == t else g * p
    return total / B


@njit(cache=True)
def half_squared_error(out, y, grad, one, g):
    """Mean over the batch of ½·Σ(out_b − onehot(y_b))²; the gradient (out − onehot)·g into ``grad``, where
    ``one`` and ``g`` (1/B rounded once) are in the output's dtype: the gradient's subtraction and
    multiplication are torch's, bit for bit."""
    B, C = out.shape
    total = 0.0
    for b in range(B):
        t = y[b]
        for c in range(C):
            d = out[b, c] - one if c == t else out[b, c]
            e = np.float64(out[b, c]) - 1.0 if c == t else np.float64(out[b, c])   # exact, unlike d
            total += 0.5 * e * e
            grad[b, c] = d * g
    return total / B
