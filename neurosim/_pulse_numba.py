"""The CPU kernel of a training write to differential pairs (neurosim.device._program_pairs): one pass.

Imported lazily (after neurosim.random_streams has chosen numba's threading layer). Per pulsed cell of both
arrays of a pair: the row of the packed pulse table (``DeviceArray._pulse_table``), the pulse response of the
analytic card model (saturating log1p/expm1 curve, its linear and convex variants), the cycle-to-cycle draw
from the pair's Philox stream, the bounds, and the store into g and t_programmed. Why it looks like this:
- The torch path (``DeviceArray._pulse``) is the oracle; the kernel performs the same IEEE operations in the
  same order, in the arrays' dtype (no fastmath: no fused multiply-add, no reassociation). Only log1p and
  expm1 come from another library (numba's libm calls vs torch's vectorized ones) and differ in the last bit;
  docs/devices.md "Programming" gives the resulting bound, tests/test_pulse_kernel.py checks it on every cell.
- Noise: draw k of the pass is normal k of one stream call (``PhiloxStream.normal(total)`` in the torch path),
  the pairs' cells in the torch path's order (pair after pair, first array's cells, then second's).
- torch's CPU ``addcmul`` is one fused multiply-add, fma(value·t1, t2, self) (measured: equal bit for bit to
  LLVM's llvm.fma on torch 2.13, float32 and float64, any length); the kernel calls the same intrinsic where
  the torch pass calls addcmul/addcmul_, and plain IEEE operations elsewhere.
- Serial: a step pulses a few hundred to a few thousand cells; a parallel launch would cost more than it saves.
- Gather, compute, scatter: the cells are scattered over arrays of megabytes (conductances, the per-cell
  table, the read cache) that a training step's passes have pushed out of the caches, so the loads come first
  in a loop of their own (many misses in flight), then the arithmetic on sequential copies, then the stores.
  Measured inside a training step of 784-256-128-10: 133 -> 80 us a step.
- A float32 crossbar's read cache is patched here at the written cells when the crossbar asks
  (neurosim._cache_numba's cell formula, ``_patch_cell``): the kernel holds both new conductances of each cell,
  so the patch costs a loop, not a call of its own with its conversions.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from neurosim._cache_numba import _NONE16, _NONE32, _fma, _patch_cell
from neurosim._philox_numba import _fill_normal


@njit(cache=True)
def _pulse_pair(table, m, per_cell, idx, counts, g1, g2, t1, t2, now1, now2, stamp, drift1, drift2, nu1, nu2, t0,
                div_t0, lin_p, lin_d, convex, noise, scale, ctr, k0, k1, first, zero, one, out, patch, w, q, ql,
                denom, noisy, low):
    """Cells ``idx`` of both arrays of a pair (``counts`` pulses on the first, −counts on the second) into
    ``out`` (2n: first's, then second's new conductances) and into g1/g2 (and t1/t2 when ``stamp``).
    ``table``: the pair's shared table (the first's ``m`` rows, then the second's); ``first``: the index of this
    pair's first draw in the stream call that starts at block ``ctr``. A drifting array's pulse starts from
    G·exp(−ν·ln(max(now − t_prog, t0)/t0)) (``DeviceArray._now``'s operations; ``nu``: −ν, per cell or one).
    ``patch``: the crossbar's read cache (float32 ŵ, ΣG² when ``noisy``, its bfloat16 bits when ``low``) takes
    the new values of the written cells, as neurosim._cache_numba's patch computes them."""
    n = idx.size
    z = np.empty(2 * n, np.float32)
    if noise:
        _fill_normal(z, first, 2 * n, ctr, k0, k1)
    # Gather: the cells' conductances (and programming times, ν) into sequential arrays, in a loop of loads
    # alone, so that the processor has many of these scattered cache misses in flight at once. Inside the
    # long compute loop it had one or two: 0.5-1 us a cell measured inside a training step, where the arrays
    # (megabytes) have left the caches.
    gs = np.empty(2 * n, g1.dtype)
    ages = np.empty(2 * n if drift1 or drift2 else 0, g1.dtype)
    nus = np.empty(2 * n if drift1 or drift2 else 0, g1.dtype)
    rows = np.empty((2 * n, 9), table.dtype)
    for k in range(2 * n):
        second = k >= n
        j = k - n if second else k
        i = idx[j]
        gs[k] = g2[i] if second else g1[i]
        down = (counts[j] > zero) if second else (counts[j] < zero)
        row = (m if second else 0) + (2 * i if per_cell else 0) + (1 if down else 0)   # (cell, own polarity)
        for c in range(9):
            rows[k, c] = table[row, c]
    if drift1:
        for j in range(n):
            i = idx[j]
            ages[j] = now1 - t1[i]
            nus[j] = nu1[i if nu1.size > 1 else 0]
    if drift2:
        for j in range(n):
            i = idx[j]
            ages[n + j] = now2 - t2[i]
            nus[n + j] = nu2[i if nu2.size > 1 else 0]
    for k in range(2 * n):
        second = k >= n
        j = k - n if second else k
        ns = -counts[j] if second else counts[j]
        down = ns < zero
        c0 = rows[k, 0]
        c1 = rows[k, 1]
        per = rows[k, 2]
        neg_a = rows[k, 3]
        em = rows[k, 4]
        g = gs[k]
        if drift2 if second else drift1:
            age = ages[k]
            age = t0 if age < t0 else age
            if div_t0:
                age = age / t0
            g = np.exp(np.log(age) * nus[k]) * g
        pos = _fma(c1, g, c0)
        pos = zero if pos < zero else (one if pos > one else pos)
        step = ns * per
        if lin_d if down else lin_p:
            moved = pos + step
            moved = zero if moved < zero else (one if moved > one else moved)
        else:
            x = np.log1p(pos * em) * neg_a
            if convex and x > one:
                x = one
            x = x + step
            x = zero if x < zero else (one if x > one else x)
            moved = np.expm1(x / neg_a) / em
        gn = _fma(rows[k, 6], moved, rows[k, 5])
        if noise:
            gn = _fma(scale * (zero + z[k]), np.sqrt(np.abs(ns)), gn)   # (zero + z: the float32 draw, exactly)
        g_low = rows[k, 7]
        g_high = rows[k, 8]
        gn = g_low if gn < g_low else gn
        gn = g_high if gn > g_high else gn
        out[k] = gn
    # Scatter: the stores, again in loops of their own.
    for j in range(n):
        i = idx[j]
        g1[i] = out[j]
        g2[i] = out[n + j]
    if stamp:
        for j in range(n):
            i = idx[j]
            t1[i] = now1
            t2[i] = now2
    if patch:
        for j in range(n):
            _patch_cell(w, q, ql, idx[j], out[j], out[n + j], denom, noisy, low)


def pulse_pair(table: np.ndarray, m: int, idx: np.ndarray, counts: np.ndarray, g1: np.ndarray, g2: np.ndarray,
               t1: np.ndarray, t2: np.ndarray, now: tuple[float, float], stamp: bool,
               nu: tuple[np.ndarray | None, np.ndarray | None], t0: float, flags: tuple[bool, bool, bool],
               scale: float | None, counter: int, k0: int, k1: int, first: int, cache: tuple | None = None
               ) -> np.ndarray:
    """``_pulse_pair`` with the scalars in the arrays' dtype (as torch uses a Python scalar with a tensor);
    ``now``: each array's clock; ``nu``: each array's −ν (flat, or one value), None where it does not drift;
    ``scale`` None: no cycle-to-cycle noise; ``cache``: (ŵ, ΣG² or None, bfloat16 bits or None, k·w_max) of a
    float32 crossbar's read cache to patch at the written cells, flat numpy arrays. Returns the 2n new
    conductances."""
    t = g1.dtype.type
    out = np.empty(2 * idx.size, g1.dtype)
    none = np.zeros(1, g1.dtype)
    _pulse_pair(table, m, table.shape[0] != 4, idx, counts, g1, g2, t1, t2, t(now[0]), t(now[1]), stamp,
                nu[0] is not None, nu[1] is not None, none if nu[0] is None else nu[0],
                none if nu[1] is None else nu[1], t(t0), t0 != 1.0, flags[0], flags[1], flags[2], scale is not None,
                t(scale or 0.0), np.uint64(counter), np.uint32(k0), np.uint32(k1), first, t(0.0), t(1.0), out,
                cache is not None, *_cache_operands(cache))
    return out


def _cache_operands(cache: tuple | None) -> tuple:
    """(ŵ, ΣG², bfloat16 bits, k·w_max in float32, noisy, low) for ``_pulse_pair``; placeholders without."""
    if cache is None:
        return _NONE32, _NONE32, _NONE16, np.float32(1.0), False, False
    w, q, ql, denom = cache
    return (w, _NONE32 if q is None else q, _NONE16 if ql is None else ql, np.float32(denom), q is not None,
            ql is not None)
