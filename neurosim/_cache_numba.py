"""The CPU kernels of a crossbar's read cache (neurosim.crossbar ``_read_tensors`` / ``_refresh_cells``), float32.

Imported lazily (after neurosim.random_streams has chosen numba's threading layer). The cache holds, per padded
cell, ŵ = (G⁺ − G⁻)/(k·w_max) (or (G − G_mid)/(k·w_max) against a reference column), ΣG² for the read noise and,
where the variance product runs in bfloat16, ΣG² rounded to bfloat16. In torch a rebuild of a drifting pair is
a dozen passes and as many buffers (the drift's rsub, clamp, div, log, mul, exp, mul per array, the sub and div
of ŵ, the mul and addcmul of ΣG², the bfloat16 copy); here it is one pass writing straight into the cache's
buffers. Why it looks like this:
- The torch composition (``Crossbar._read_values`` over ``pair_conductances``) stays the oracle and the path
  of float64 arrays, CUDA and machines without numba. The kernel performs the same IEEE float32 operations in
  the same order (no fastmath): the drift factor exp(−ν·ln(max(now − t, t0)/t0)) times G; ŵ as a subtraction
  then a division by k·w_max rounded to float32 (as torch casts a Python scalar); ΣG² as G₁·G₁ then one fused
  multiply-add with G₂·G₂ (torch's CPU ``addcmul_`` is llvm.fma: see neurosim._pulse_numba). Only the
  float32 ln and exp differ: libm's scalar calls cost 20 ns each and do not vectorize, so the kernel has its
  own (``_logf``, ``_expf``: float64 arithmetic, branch-free, rounded once to float32, so correctly rounded
  but for ties within 1e-15; none in 3·10⁶ samples), while torch's vectorized Sleef functions are within
  1 ulp (they differ from the correctly rounded result on 4 % of ln's and 1 % of exp's samples). So a
  drifting cell's values may differ from the torch rebuild's in the last bits: docs/crossbar.md gives the
  measured bound, and tests/test_cache_kernels.py checks it on every cell. Without drift, and for a cell at
  age ≤ t0 (factor exactly 1: ln 1 = 0, exp 0 = 1 in both), they are equal bit for bit.
- bfloat16: round to nearest, ties to even, on the float32 bits (NaN → 0xFFFF), which is what torch's
  ``.to(torch.bfloat16)`` does; written through an int16 view of the bfloat16 buffer (numpy has no bfloat16).
- The patch after a sparse write computes the same cell formula without drift (a written cell is at age 0,
  factor exactly 1), so a patched cell holds exactly what a rebuild at that clock would compute for it. A
  pair's write patches inside the pulse kernel (neurosim._pulse_numba calls ``_patch_cell``); ``patch`` here
  serves single devices and the torch pulse pass.
- Rows: only the first ``n`` cells (the unpadded rows, flat); the padded rows are zeroed once when the buffers
  are allocated and never written. The parallel entry cuts the cells into pieces of ``PIECE`` cells: each cell's
  value depends on that cell only, so any thread count gives the same bits.
"""

from __future__ import annotations

import numpy as np
from numba import float32, float64, int16, njit, prange, uint32
from numba.core import types
from numba.extending import intrinsic

PIECE = 16384   # cells a parallel task handles
CHUNK = 512     # cells a straight loop handles (its scratch stays in L1)


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (llvm.fma): what torch's CPU addcmul computes (neurosim._pulse_numba uses it too)."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, b, c), codegen


@intrinsic
def _bits(typingctx, x):
    """The IEEE bits of a float32 as a uint32 (a bit cast, no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(x), codegen


@intrinsic
def _bits64(typingctx, x):
    """The IEEE bits of a float64 as an int64."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))
    return types.int64(x), codegen


@intrinsic
def _double(typingctx, x):
    """The float64 of IEEE bits (an int64)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))
    return types.float64(x), codegen


_LN2 = 0.6931471805599453
_LN2_HI = 0.6931471803691238   # 33 significant bits: n·_LN2_HI is exact for |n| < 2^20
_LN2_LO = 1.9082149292705877e-10
_SQRT2 = 1.4142135623730951
_INV_LN2 = 1.4426950408889634


@njit(inline="always", error_model="numpy")
def _logf(x):
    """ln x of a float32 x ≥ 1 (+inf included), as float32: computed in float64 (series of atanh, relative
    error < 1e-15) and rounded once, so correctly rounded but for ties closer than that. Branch-free (a loop
    of it vectorizes)."""
    xd = float64(x)
    b = _bits64(xd)
    e = float64((b >> 52) - 1023)
    m = _double((b & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)   # in [1, 2)
    big = m > _SQRT2
    m = m * 0.5 if big else m
    e = e + 1.0 if big else e
    s = (m - 1.0) / (m + 1.0)                                     # |s| ≤ 0.1716
    z = s * s
    r = 1.0 / 17.0
    r = _fma(r, z, 1.0 / 15.0)
    r = _fma(r, z, 1.0 / 13.0)
    r = _fma(r, z, 1.0 / 11.0)
    r = _fma(r, z, 1.0 / 9.0)
    r = _fma(r, z, 1.0 / 7.0)
    r = _fma(r, z, 1.0 / 5.0)
    r = _fma(r, z, 1.0 / 3.0)
    r = _fma(r, z, 1.0)
    y = _fma(e, _LN2, 2.0 * s * r)
    return float32(np.inf) if x == float32(np.inf) else float32(y)


@njit(inline="always", error_model="numpy")
def _expf(p):
    """e^p of a float32 p ≤ 0 (NaN stays NaN), as float32: computed in float64 (range reduction by ln 2 and a
    degree-12 Taylor polynomial by fused multiply-adds, relative error < 1e-15) and rounded once. Branch-free."""
    nan = p != p
    pd = 0.0 if nan else float64(p)
    pd = -150.0 if pd < -150.0 else pd                           # e^-150 rounds to 0 in float32 anyway
    n = np.floor(pd * _INV_LN2 + 0.5)
    r = _fma(-n, _LN2_LO, pd - n * _LN2_HI)                      # |r| ≤ 0.35 (n·_LN2_HI exact)
    c = 1.0 / 479001600.0
    c = _fma(c, r, 1.0 / 39916800.0)
    c = _fma(c, r, 1.0 / 3628800.0)
    c = _fma(c, r, 1.0 / 362880.0)
    c = _fma(c, r, 1.0 / 40320.0)
    c = _fma(c, r, 1.0 / 5040.0)
    c = _fma(c, r, 1.0 / 720.0)
    c = _fma(c, r, 1.0 / 120.0)
    c = _fma(c, r, 1.0 / 24.0)
    c = _fma(c, r, 1.0 / 6.0)
    c = _fma(c, r, 0.5)
    c = _fma(c, r, 1.0)
    c = _fma(c, r, 1.0)
    scale = _double((np.int64(n) + 1023) << 52)                  # 2^n, n in [-217, 0]
    return p if nan else float32(c * scale)


@njit(inline="always", error_model="numpy")
def _bfloat16(v):
    """float32 → bfloat16 bits (as int16), round to nearest even: torch's conversion."""
    u = _bits(v)
    u = (u + (uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1)))) >> uint32(16)
    return int16(-1) if v != v else int16(u)   # the low 16 bits; NaN: 0xFFFF, as torch 2.13 writes it (measured)


@njit(inline="always", error_model="numpy")
def _drifted(g, t, now, nu, scalar_nu, t0, div_t0, la, out, m):
    """out[:m] = G·exp(−ν·ln(max(now − t, t0)/t0)) (``nu`` = −ν, per cell or ``scalar_nu``), with the
    logarithms left in ``la``: ``DeviceArray._drifted``'s float32 operations. Straight loops (they vectorize)."""
    for j in range(m):
        a = now - t[j]
        a = t0 if a < t0 else a
        la[j] = _logf(a / t0 if div_t0 else a)
    if scalar_nu:
        v = nu[0]
        for j in range(m):
            out[j] = _expf(la[j] * v) * g[j]
    else:
        for j in range(m):
            out[j] = _expf(la[j] * nu[j]) * g[j]


@njit(inline="always", error_model="numpy")
def _piece(lo, hi, g1, g2, t1, t2, now1, now2, nu1, nu2, d1, d2, pair, t0, div_t0, g_mid, denom, noisy, low,
           w, q, ql, a, b, la):
    """Cells lo … hi−1 of the rebuild, in chunks of the scratch buffers' length."""
    size = a.size
    for c0 in range(lo, hi, size):
        c1 = min(hi, c0 + size)
        m = c1 - c0
        if d1:
            _drifted(g1[c0:c1], t1[c0:c1], now1, nu1 if nu1.size == 1 else nu1[c0:c1], nu1.size == 1, t0,
                     div_t0, la, a, m)
        else:
            a[:m] = g1[c0:c1]
        wc = w[c0:c1]
        if pair:
            if d2:
                same = d1 and now1 == now2 and np.array_equal(t1[c0:c1], t2[c0:c1])
                if same:   # written together: the logarithm of the age once (pair_conductances)
                    n2 = nu2 if nu2.size == 1 else nu2[c0:c1]
                    g2c = g2[c0:c1]
                    if nu2.size == 1:
                        for j in range(m):
                            b[j] = _expf(la[j] * n2[0]) * g2c[j]
                    else:
                        for j in range(m):
                            b[j] = _expf(la[j] * n2[j]) * g2c[j]
                else:
                    _drifted(g2[c0:c1], t2[c0:c1], now2, nu2 if nu2.size == 1 else nu2[c0:c1], nu2.size == 1,
                             t0, div_t0, la, b, m)
            else:
                b[:m] = g2[c0:c1]
            for j in range(m):
                wc[j] = (a[j] - b[j]) / denom
            if noisy:
                qc = q[c0:c1]
                for j in range(m):
                    qc[j] = _fma(b[j], b[j], a[j] * a[j])
        else:
            for j in range(m):
                wc[j] = (a[j] - g_mid) / denom
            if noisy:
                qc = q[c0:c1]
                for j in range(m):
                    qc[j] = a[j] * a[j]
        if low:
            qc = q[c0:c1]
            lc = ql[c0:c1]
            for j in range(m):
                lc[j] = _bfloat16(qc[j])


@njit(cache=True, error_model="numpy")
def _rebuild_serial(n, g1, g2, t1, t2, now1, now2, nu1, nu2, d1, d2, pair, t0, div_t0, g_mid, denom, noisy, low,
                    w, q, ql):
    a = np.empty(CHUNK, np.float32)
    b = np.empty(CHUNK, np.float32)
    la = np.empty(CHUNK, np.float32)
    _piece(0, n, g1, g2, t1, t2, now1, now2, nu1, nu2, d1, d2, pair, t0, div_t0, g_mid, denom, noisy, low, w, q,
           ql, a, b, la)


@njit(parallel=True, cache=True, error_model="numpy")
def _rebuild_parallel(n, g1, g2, t1, t2, now1, now2, nu1, nu2, d1, d2, pair, t0, div_t0, g_mid, denom, noisy,
                      low, w, q, ql):
    for p in prange((n + PIECE - 1) // PIECE):
        a = np.empty(CHUNK, np.float32)
        b = np.empty(CHUNK, np.float32)
        la = np.empty(CHUNK, np.float32)
        _piece(p * PIECE, min(n, (p + 1) * PIECE), g1, g2, t1, t2, now1, now2, nu1, nu2, d1, d2, pair, t0,
               div_t0, g_mid, denom, noisy, low, w, q, ql, a, b, la)


def rebuild(n: int, g: tuple, t: tuple, now: tuple[float, float], nu: tuple, t0: float, g_mid: float,
            denom: float, out: tuple, parallel: bool) -> None:
    """The read cache of the first ``n`` flat cells into ``out`` = (ŵ, ΣG² or None, ΣG² as int16 bits of
    bfloat16 or None), all flat float32 numpy arrays (int16 for the last). ``g``, ``t``: each array's flat
    conductances and programming times (second None: a single device against ``g_mid``); ``nu``: each array's
    −ν (flat, or one value), None where it does not drift; ``denom``: k·w_max (rounded to float32 here)."""
    f32 = np.float32
    pair = g[1] is not None
    dummy = _NONE32
    w, q, ql = out
    noisy, low = q is not None, ql is not None
    f = _rebuild_parallel if parallel else _rebuild_serial
    f(n, g[0], g[1] if pair else dummy, t[0] if t[0] is not None else dummy,
      t[1] if pair and t[1] is not None else dummy, f32(now[0]), f32(now[1]),
      dummy if nu[0] is None else nu[0], dummy if nu[1] is None else nu[1], nu[0] is not None,
      nu[1] is not None, pair, f32(t0), t0 != 1.0, f32(g_mid), f32(denom), noisy, low, w,
      q if noisy else dummy, ql if low else _NONE16)


@njit(inline="always", error_model="numpy")
def _patch_cell(w, q, ql, c, a, b, denom, noisy, low):
    """Cell c of the cache from a pair's new conductances a, b (age 0: no drift); also the pulse kernel's."""
    w[c] = (a - b) / denom
    if noisy:
        s = float32(_fma(b, b, a * a))   # (float32 operands: a no-op; the cast only types a float64 pulse pass)
        q[c] = s
        if low:
            ql[c] = _bfloat16(s)


@njit(cache=True, error_model="numpy")
def _patch(cells, g1, g2, gather, pair, g_mid, denom, noisy, low, w, q, ql):
    """Cells ``cells`` (flat) of the cache from their new conductances: ``g1``/``g2`` hold them in the cells'
    order, or (``gather``) are the whole flat arrays, indexed by the cells."""
    for j in range(cells.size):
        c = cells[j]
        i = c if gather else j
        a = g1[i]
        if pair:
            _patch_cell(w, q, ql, c, a, g2[i], denom, noisy, low)
        else:
            w[c] = (a - g_mid) / denom
            if noisy:
                s = a * a
                q[c] = s
                if low:
                    ql[c] = _bfloat16(s)


def patch(cells: np.ndarray, g1: np.ndarray, g2: np.ndarray | None, gather: bool, g_mid: float, denom: float,
          out: tuple) -> None:
    """``_patch`` with the scalars in float32; ``out`` as in ``rebuild``; ``g2`` None: a single device."""
    w, q, ql = out
    _patch(cells, g1, _NONE32 if g2 is None else g2, gather, g2 is not None, np.float32(g_mid), np.float32(denom),
           q is not None, ql is not None, w, _NONE32 if q is None else q, _NONE16 if ql is None else ql)


_NONE32 = np.zeros(1, np.float32)   # placeholders of absent operands (never written: their flags are off)
_NONE16 = np.zeros(1, np.int16)
