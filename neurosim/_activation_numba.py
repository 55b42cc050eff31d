"""Fused CPU passes of the neuron circuits (float32): the PWL lookup, and the circuit around any realization
(gain, offset, noise, clip, and for BP the ideal sigmoid/tanh derivative and the product with the error).
Imported on first use.

A PWL lookup in torch is four passes and two temporaries (the cell coordinate, its clip, a gather of the
rows, a multiply-add); here it is three straight loops over one buffer (each vectorizes): 17 µs instead of
46 for 64 × 256 neurons. torch's CPU kernels compute ``add(a, b, alpha)`` and ``addcmul`` with fused
multiply-adds (measured: bit-equal only so), and so does this pass (llvm.fma, ties included): the outputs
equal torch's bit for bit (tested against the torch path, which stays the realization on other devices and
dtypes). No fastmath. (A Taylor polynomial gained nothing
this way: torch's Horner passes are already vectorized and few.)
"""

from __future__ import annotations

import numpy as np
from numba import float32, njit, prange, uint64

from neurosim._cache_numba import _fma  # llvm.fma: what torch's CPU addcmul and add(alpha=) compute
from neurosim._philox_numba import _fill_normal


@njit(cache=True)
def _coordinates(x, shift, scale, top, u):
    """u = clip(shift + scale·x, 0, top) (NaN → 0 here: the callers put NaN back or read padding cell 0).
    Three straight loops, so that each vectorizes."""
    zero = float32(0.0)
    for k in range(x.size):
        u[k] = _fma(scale, x[k], shift)
    for k in range(x.size):
        v = u[k]
        u[k] = zero if not v >= zero else (top if v > top else v)


@njit(cache=True)
def pwl(x, table, col, shift, scale, top, out):
    """out = table[i, col] + table[i, col + 1]·u, u = clip(shift + scale·x, 0, top), i = ⌊u⌋ (NaN stays NaN:
    the torch path reads the padding cell, whose 0 slope keeps it)."""
    _coordinates(x, shift, scale, top, out)
    for k in range(x.size):
        u = out[k]
        i = int(u)
        out[k] = _fma(table[i, col + 1], u, table[i, col])
    for k in range(x.size):
        if x[k] != x[k]:
            out[k] = x[k]


@njit(cache=True)
def pwl_slope(x, table, shift, scale, top, out):
    """out = table[i, 1]·scale (the PWL derivative 'slope'), i as in ``pwl``; a NaN input reads the padding
    cell 0, as the torch path does (its slope, 0)."""
    _coordinates(x, shift, scale, top, out)
    for k in range(x.size):
        out[k] = table[int(out[k]), 1] * scale


# --- the circuit around the realization (ActivationUnit._circuit, derivative_times) ----------------------------
#
# Every operation is the one torch's CPU kernels perform on that path, in its order: addcmul(offset, y, gain)
# and add(y, z, alpha=sigma) are single fused multiply-adds there (measured, torch 2.13, any shape), so here
# they are llvm.fma: equal bit for bit, ties included. Absent steps take neutral operands instead of branches,
# so the element loop stays one straight vector loop: gain 1 (v·1 = v), offset -0 (v + -0 = v, signed zeros
# kept), no noise: z = -0 with sigma 1, no clip: ±inf. Rows (samples: neurons × positions) are taken in spans
# of about SPAN elements; a span draws its normals in one fill at its own offset of the stream call, so the
# numbers do not depend on how spans are shared among threads.

SPAN = 4096   # elements of a span (whole rows, at least one): its draws stay in the L1/L2 cache




@njit(inline="always")
def _element(v, pre, g, o, sigma, z, lo, hi):
    """One element of the circuit: the ideal derivative from the realization's output where asked (pre 1:
    sigmoid s -> (1 - s)·s, as rsub then mul; pre 2: tanh t -> 1 - t·t), fma(v, g, o), fma(sigma, z, v), clip
    (written so that NaN passes, as torch.clamp)."""
    one = float32(1.0)
    if pre == 1:
        v = (one - v) * v
    elif pre == 2:
        v = one - v * v
    v = _fma(v, g, o)
    v = _fma(sigma, z, v)
    return lo if v < lo else (hi if v > hi else v)


@njit(inline="always")
def _span(y, out, gain, offset, pre, sigma, noise, lo, hi, grad, gstride, has_grad, ctr, k0, k1, b0, b1, z):
    """Rows b0 .. b1 - 1 of y (2-d, rows of gain.size) into out; ``grad``: the error, 1-d, row b at
    b·gstride (a column slice of a wider matrix keeps its row stride)."""
    r = gain.size
    if noise:
        _fill_normal(z, b0 * r, (b1 - b0) * r, ctr, k0, k1)
    inplace = out.ctypes.data == y.ctypes.data
    sigma, lo, hi = float32(sigma), float32(lo), float32(hi)
    # Row views, one straight loop per case: 2-d indexing, an array chosen by a condition (grad or a stand-in)
    # or out a second view of y (an overlap test that fails) each kept the loop from vectorizing (3x slower).
    for b in range(b0, b1):
        zb = z[(b - b0) * r:(b - b0 + 1) * r]
        yb = y[b]
        if has_grad:
            gb = grad[b * gstride:b * gstride + r]
            if inplace:
                _row_times(yb, yb, gain, offset, pre, sigma, zb, lo, hi, gb)
            else:
                _row_times(yb, out[b], gain, offset, pre, sigma, zb, lo, hi, gb)
        elif inplace:
            _row(yb, yb, gain, offset, pre, sigma, zb, lo, hi)
        else:
            _row(yb, out[b], gain, offset, pre, sigma, zb, lo, hi)


@njit(inline="always")
def _row(yb, ob, gain, offset, pre, sigma, zb, lo, hi):
    for j in range(yb.size):
        ob[j] = _element(yb[j], pre, gain[j], offset[j], sigma, zb[j], lo, hi)


@njit(inline="always")
def _row_times(yb, ob, gain, offset, pre, sigma, zb, lo, hi, gb):
    for j in range(yb.size):
        ob[j] = _element(yb[j], pre, gain[j], offset[j], sigma, zb[j], lo, hi) * gb[j]


@njit(inline="always")
def _scratch(rows, r, noise):
    z = np.empty(rows * r, np.float32)
    if not noise:
        z[:] = float32(-0.0)
    return z


@njit(cache=True)
def _circuit_serial(y, out, gain, offset, pre, sigma, noise, lo, hi, grad, gstride, has_grad, ctr, k0, k1):
    rows, r = y.shape
    per = max(1, SPAN // max(r, 1))
    z = _scratch(min(per, rows), r, noise)
    for b0 in range(0, rows, per):
        _span(y, out, gain, offset, pre, sigma, noise, lo, hi, grad, gstride, has_grad, uint64(ctr), uint64(k0),
              uint64(k1), b0, min(rows, b0 + per), z)


@njit(parallel=True, cache=True)
def _circuit_parallel(y, out, gain, offset, pre, sigma, noise, lo, hi, grad, gstride, has_grad, ctr, k0, k1):
    rows, r = y.shape
    per = max(1, SPAN // max(r, 1))
    for p in prange((rows + per - 1) // per):
        b0 = p * per
        z = _scratch(per, r, noise)
        _span(y, out, gain, offset, pre, sigma, noise, lo, hi, grad, gstride, has_grad, uint64(ctr), uint64(k0),
              uint64(k1), b0, min(rows, b0 + per), z)


def circuit(y, out, gain, offset, pre, sigma, noise, lo, hi, grad, gstride, has_grad, counter, k0, k1, parallel):
    """out = clip(fma(sigma, z, fma(d(y), gain, offset)), lo, hi) [· grad] over 2-d float32 ``y`` (rows of
    gain.size; out may be y), z the normals of the stream call that starts at block ``counter`` (when
    ``noise``), d the derivative prologue ``pre`` (0: none). Python numbers go in as they are (a numpy scalar
    per argument costs more than the arithmetic of a small layer); the counter as the int64 of its bits."""
    if counter >= 1 << 63:
        counter -= 1 << 64
    (_circuit_parallel if parallel else _circuit_serial)(y, out, gain, offset, pre, sigma, noise, lo, hi, grad,
                                                          gstride, has_grad, counter, k0, k1)


# --- the Taylor polynomial (ActivationUnit.ideal / ideal_derivative, mode 'taylor') ---------------------------
#
# torch's passes (activation._Taylor, _horner, _clip_mask), in their order: u = clamp(x, a, b) (- x0), then
# y = u·c[n-1] and y + c[n-2] as two roundings (mul, add_), then fma(y, u, c[k]) per lower term (addcmul); one
# term: 0 + c[0]. The derivative: the same on k·c[k] (computed by torch: ``dcoeffs``), then 0 where x is not
# strictly inside (a, b) (hardtanh_backward: a NaN x gives 0 too). Chunks of CHUNK elements keep u in the L1
# cache; each chunk is a slice, so every index comes from range() alone (no wraparound test, vector loops).

CHUNK = 2048


@njit(cache=True)
def taylor(x, coeffs, low, high, center, shift, mask, out):
    """out = p(clamp(x, low, high) - center) over 1-d float32 x (``shift`` False: no subtraction), coefficients
    ascending; ``mask``: then 0 where not low < x < high (the derivative of the clipping)."""
    n = coeffs.size
    u = np.empty(CHUNK, np.float32)
    zero = float32(0.0)
    for c0 in range(0, x.size, CHUNK):
        c1 = min(x.size, c0 + CHUNK)
        xs = x[c0:c1]
        ys = out[c0:c1]
        us = u[:c1 - c0]
        for i in range(xs.size):
            v = xs[i]
            v = low if v < low else (high if v > high else v)
            us[i] = v - center if shift else v
        if n == 1:
            for i in range(xs.size):
                ys[i] = zero + coeffs[0]
        else:
            top = coeffs[n - 1]
            nxt = coeffs[n - 2]
            for i in range(xs.size):
                ys[i] = us[i] * top + nxt
            for k in range(n - 3, -1, -1):
                ck = coeffs[k]
                for i in range(xs.size):
                    ys[i] = _fma(ys[i], us[i], ck)
        if mask:
            for i in range(xs.size):
                v = xs[i]
                ys[i] = ys[i] if (v > low and v < high) else zero
