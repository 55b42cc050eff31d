"""The CPU kernels of neurosim.random_streams (Philox4x32-10, Box-Muller, the crossbar read's epilogue).

Imported lazily on the first draw, so ``import neurosim`` neither imports numba nor compiles anything.

Why the code looks like this:
- No ``fastmath``: every float operation is the IEEE one the torch reference in random_streams performs in the
  same order (no fused multiply-add, no reassociation), so the two agree bit for bit. Nothing here needs
  fastmath to vectorize: the loops carry no reduction across elements.
- The log and the sine/cosine are branch-free float32 polynomials (Cephes' logf, sinf and cosf coefficients)
  instead of math.log/cos/sin, which LLVM can only call one element at a time; selects instead of branches,
  exponent and mantissa by bit views, so the whole block loop becomes vector code.
- Work is split into pieces of whole blocks; element i of a call always comes from block i // 4, word i % 4,
  so the numbers do not depend on how many threads share the work.
"""

from __future__ import annotations

import numpy as np
from numba import float32, int64, njit, prange, uint32, uint64

# Philox4x32 multipliers and Weyl key increments (Salmon et al., SC'11).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_S8 = np.uint64(8)

# float32 constants (numba types a Python float literal as float64, which would change the arithmetic)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_TWO = np.float32(2.0)
_SQRT2 = np.float32(1.4142135623730951)
_LN2_HI = np.float32(0.693359375)        # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI with 9 significant bits
_LN2_LO = np.float32(-2.12194440e-4)
_L0 = np.float32(7.0376836292e-2)        # Cephes logf: ln(1+f) = f - f^2/2 + f^3 P(f)
_L1 = np.float32(-1.1514610310e-1)
_L2 = np.float32(1.1676998740e-1)
_L3 = np.float32(-1.2420140846e-1)
_L4 = np.float32(1.4249322787e-1)
_L5 = np.float32(-1.6668057665e-1)
_L6 = np.float32(2.0000714765e-1)
_L7 = np.float32(-2.4999993993e-1)
_L8 = np.float32(3.3333331174e-1)
_S0 = np.float32(-1.9515295891e-4)       # Cephes sinf on [-pi/4, pi/4]
_S1 = np.float32(8.3321608736e-3)
_S2 = np.float32(-1.6666654611e-1)
_C0 = np.float32(2.443315711809948e-5)   # Cephes cosf on [-pi/4, pi/4]
_C1 = np.float32(-1.388731625493765e-3)
_C2 = np.float32(4.166664568298827e-2)
_TWO_PI_24 = np.float32(2 * np.pi / 2**24)   # = float32(2 pi) * 2^-24 exactly
_U24 = np.float32(2.0**-24)

PIECE = 2048   # blocks a parallel task handles (8192 numbers)


@njit(inline="always")
def _block(ctr, k0, k1):
    """Philox4x32-10 of the counter (ctr low word, ctr high word, 0, 0) under key (k0, k1).

    Words travel in 64-bit lanes (values below 2^32): 32-bit lanes widened for every product vectorize to
    shuffles and ran at half the speed."""
    c0 = ctr & _LO
    c1 = ctr >> _S32
    c2 = uint64(0)
    c3 = uint64(0)
    k0 = uint64(k0)
    k1 = uint64(k1)
    for _ in range(10):
        p0 = c0 * _M0
        p1 = c2 * _M1
        n0 = (p1 >> _S32) ^ c1 ^ k0
        n2 = (p0 >> _S32) ^ c3 ^ k1
        c1 = p1 & _LO
        c3 = p0 & _LO
        c0 = n0
        c2 = n2
        k0 = (k0 + _W0) & _LO
        k1 = (k1 + _W1) & _LO
    return c0, c1, c2, c3


@njit(inline="always")
def _radius(w):
    """sqrt(-2 ln u) with u = (w + 1) 2^-32 rounded to float32, in (0, 1]."""
    b = np.float32(int64(w) + 1).view(np.int32)
    e = ((b >> 23) & 0xFF) - 159          # exponent of u = v 2^-32
    m = np.int32((b & 0x007FFFFF) | 0x3F800000).view(np.float32)   # in [1, 2)
    big = m > _SQRT2
    m = m * _HALF if big else m
    e = e + 1 if big else e
    f = m - _ONE                          # exact, in [sqrt(1/2) - 1, sqrt(2) - 1]
    z = f * f
    y = ((((((((_L0 * f + _L1) * f + _L2) * f + _L3) * f + _L4) * f + _L5) * f + _L6) * f + _L7) * f + _L8)
    y = y * f * z
    ef = float32(e)
    y = y + _LN2_LO * ef
    y = y - _HALF * z
    lg = f + y
    lg = lg + _LN2_HI * ef
    return np.sqrt((_ZERO - lg) * _TWO)   # 0 - lg: +0, not -0, where u = 1


@njit(inline="always")
def _sincos(w):
    """(sin, cos) of 2 pi t, t = (w >> 8) 2^-24: reduced exactly to a quarter turn, then polynomials."""
    t = int64(w >> _S8)
    q = (t + (1 << 21)) >> 22             # nearest quarter turn, 0..4
    x = float32(t - (q << 22)) * _TWO_PI_24   # in [-pi/4, pi/4)
    z = x * x
    s = ((_S0 * z + _S1) * z + _S2) * z * x
    s = s + x
    c = ((_C0 * z + _C1) * z + _C2) * z * z
    c = c - _HALF * z
    c = c + _ONE
    k = q & 3
    odd = (k & 1) != 0
    sn = c if odd else s
    cs = s if odd else c
    sn = -sn if (k & 2) != 0 else sn
    cs = -cs if ((k + 1) & 2) != 0 else cs
    return sn, cs


@njit(inline="always")
def _normals(ctr, k0, k1):
    w0, w1, w2, w3 = _block(ctr, k0, k1)
    r0 = _radius(w0)
    s0, c0 = _sincos(w1)
    r1 = _radius(w2)
    s1, c1 = _sincos(w3)
    return r0 * c0, r0 * s0, r1 * c1, r1 * s1


@njit(inline="always")
def _uniforms(ctr, k0, k1):
    w0, w1, w2, w3 = _block(ctr, k0, k1)
    return (float32(w0 >> _S8) * _U24, float32(w1 >> _S8) * _U24,
            float32(w2 >> _S8) * _U24, float32(w3 >> _S8) * _U24)


# --- serial range fillers: out[0:n] = draws first .. first + n - 1 of a call starting at block `ctr` ---------
# One function per kind (words, normals, uniforms) so that every inner loop is straight.

@njit
def _fill_normal(out, first, n, ctr, k0, k1):
    i = 0
    j = first
    # head: up to the next block boundary
    while i < n and (j & 3) != 0:
        v = _normals(ctr + uint64(j >> 2), k0, k1)
        out[i] = v[j & 3]
        i += 1
        j += 1
    nfull = (n - i) >> 2
    base = ctr + uint64(j >> 2)
    for b in range(nfull):
        a0, a1, a2, a3 = _normals(base + uint64(b), k0, k1)
        o = i + 4 * b
        out[o] = a0
        out[o + 1] = a1
        out[o + 2] = a2
        out[o + 3] = a3
    i += 4 * nfull
    j += 4 * nfull
    if i < n:
        v = _normals(ctr + uint64(j >> 2), k0, k1)
        for w in range(n - i):
            out[i + w] = v[w]


@njit
def _fill_uniform(out, first, n, ctr, k0, k1):
    i = 0
    j = first
    while i < n and (j & 3) != 0:
        v = _uniforms(ctr + uint64(j >> 2), k0, k1)
        out[i] = v[j & 3]
        i += 1
        j += 1
    nfull = (n - i) >> 2
    base = ctr + uint64(j >> 2)
    for b in range(nfull):
        a0, a1, a2, a3 = _uniforms(base + uint64(b), k0, k1)
        o = i + 4 * b
        out[o] = a0
        out[o + 1] = a1
        out[o + 2] = a2
        out[o + 3] = a3
    i += 4 * nfull
    j += 4 * nfull
    if i < n:
        v = _uniforms(ctr + uint64(j >> 2), k0, k1)
        for w in range(n - i):
            out[i + w] = v[w]


@njit
def _fill_words(out, first, n, ctr, k0, k1):
    i = 0
    j = first
    while i < n and (j & 3) != 0:
        v = _block(ctr + uint64(j >> 2), k0, k1)
        out[i] = v[j & 3]
        i += 1
        j += 1
    nfull = (n - i) >> 2
    base = ctr + uint64(j >> 2)
    for b in range(nfull):
        a0, a1, a2, a3 = _block(base + uint64(b), k0, k1)
        o = i + 4 * b
        out[o] = a0
        out[o + 1] = a1
        out[o + 2] = a2
        out[o + 3] = a3
    i += 4 * nfull
    j += 4 * nfull
    if i < n:
        v = _block(ctr + uint64(j >> 2), k0, k1)
        for w in range(n - i):
            out[i + w] = v[w]


# One entry point per kind and mode, so the first draw compiles only what it uses.

@njit(cache=True)
def _words_serial(out, ctr, k0, k1):
    _fill_words(out, 0, out.size, ctr, k0, k1)


@njit(cache=True)
def _normal_serial(out, ctr, k0, k1):
    _fill_normal(out, 0, out.size, ctr, k0, k1)


@njit(cache=True)
def _uniform_serial(out, ctr, k0, k1):
    _fill_uniform(out, 0, out.size, ctr, k0, k1)


@njit(parallel=True, cache=True)
def _words_parallel(out, ctr, k0, k1):
    n = out.size
    for p in prange((n + 4 * PIECE - 1) // (4 * PIECE)):
        lo = p * 4 * PIECE
        hi = min(n, lo + 4 * PIECE)
        _fill_words(out[lo:hi], lo, hi - lo, ctr, k0, k1)


@njit(parallel=True, cache=True)
def _normal_parallel(out, ctr, k0, k1):
    n = out.size
    for p in prange((n + 4 * PIECE - 1) // (4 * PIECE)):
        lo = p * 4 * PIECE
        hi = min(n, lo + 4 * PIECE)
        _fill_normal(out[lo:hi], lo, hi - lo, ctr, k0, k1)


@njit(parallel=True, cache=True)
def _uniform_parallel(out, ctr, k0, k1):
    n = out.size
    for p in prange((n + 4 * PIECE - 1) // (4 * PIECE)):
        lo = p * 4 * PIECE
        hi = min(n, lo + 4 * PIECE)
        _fill_uniform(out[lo:hi], lo, hi - lo, ctr, k0, k1)


_ENTRIES = {("words", False): _words_serial, ("normal", False): _normal_serial,
            ("uniform", False): _uniform_serial, ("words", True): _words_parallel,
            ("normal", True): _normal_parallel, ("uniform", True): _uniform_parallel}


def fill(out: np.ndarray, kind: str, counter: int, k0: int, k1: int, parallel: bool) -> None:
    """Draws 0 .. out.size - 1 of a call whose first block is ``counter`` into the 1-d array ``out``
    (uint32 for 'words', float32 for 'normal' and 'uniform')."""
    _ENTRIES[kind, parallel](out, np.uint64(counter), np.uint32(k0), np.uint32(k1))


# --- the crossbar read's epilogue ------------------------------------------------------------------------------
# Element (t, b, c) of a read's partial sums takes normal (t·B + b)·C + c of one call of T·B·C numbers. The
# normals are drawn as whole blocks covering the elements needed (one straight, vectorized loop; the unused
# words of the first and last block are computed and left): a long row draws its own blocks a tile at a time
# into a row accumulator; short rows (a 10-column layer) draw the blocks of all the piece's rows of a tile at
# once. Before, each row filled exactly its numbers with the scalar partial-block code at both ends, which on
# small or unaligned rows was most of the time (129 columns: 2.1 ns a number against 0.98 on aligned rows).

CHUNK = 2048        # numbers a piece of short rows draws at once for one tile (8 KiB: stays in the L1 cache)
ROW_BLOCKS = 64     # rows of fewer numbers are drawn together


@njit(inline="always")
def _normals_covering(z, e0, e1, ctr, k0, k1):
    """The normals of the whole blocks covering elements e0 .. e1 - 1 of a call into z; returns the element
    whose normal is z[0] (e0 rounded down to a block)."""
    b0 = e0 >> 2
    base = ctr + uint64(b0)
    for b in range(((e1 + 3) >> 2) - b0):
        a0, a1, a2, a3 = _normals(base + uint64(b), k0, k1)
        o = 4 * b
        z[o] = a0
        z[o + 1] = a1
        z[o + 2] = a2
        z[o + 3] = a3
    return 4 * b0


@njit(inline="always")
def _quantize(x, levels, clamp):
    if clamp:
        # comparisons written so that NaN passes through, as torch.clamp does
        x = levels if x > levels else (-levels if x < -levels else x)
        x = np.rint(x)
    return x


@njit(inline="always")
def _epilogue_rows(out, part, var, bf16, sigma, levels, clamp, keep, ctr, k0, k1, factor, per_row, b0, b1, z,
                   acc):
    """Rows b0 .. b1 - 1 of the output: out[b, c] = (sum over t ascending of q(part + sigma·sqrt(var)·z))·factor.

    Short rows (C < ROW_BLOCKS numbers) draw each tile's numbers of all the piece's rows at once; long rows
    draw their own, a row and tile at a time (the partial blocks at its ends are then a small part)."""
    T, B, C = part.shape
    together = keep == C and C < ROW_BLOCKS
    if together:
        for b in range(b0, b1):
            for c in range(keep):
                out[b, c] = float32(0.0)
        for t in range(T):
            first = _normals_covering(z, (t * B + b0) * C, (t * B + b1) * C, ctr, k0, k1)
            for b in range(b0, b1):
                o = (t * B + b) * C - first
                _accumulate(out[b], part[t, b], var[t, b], bf16, sigma, levels, clamp, keep, z[o:])
        for b in range(b0, b1):
            f = factor[b if per_row else 0]
            for c in range(keep):
                out[b, c] = out[b, c] * f
        return
    for b in range(b0, b1):
        for c in range(keep):
            acc[c] = float32(0.0)
        for t in range(T):
            e = (t * B + b) * C
            o = e - _normals_covering(z, e, e + keep, ctr, k0, k1)
            _accumulate(acc, part[t, b], var[t, b], bf16, sigma, levels, clamp, keep, z[o:])
        f = factor[b if per_row else 0]
        for c in range(keep):
            out[b, c] = acc[c] * f


@njit(inline="always")
def _accumulate(acc, part, var, bf16, sigma, levels, clamp, keep, z):
    """acc[c] += q(part[c] + sigma·sqrt(var[c])·z[c]) for c < keep (one row of one tile)."""
    if bf16:
        for c in range(keep):
            v = np.uint32(uint32(var[c]) << uint32(16)).view(np.float32)
            acc[c] = acc[c] + _quantize(part[c] + sigma * np.sqrt(v) * z[c], levels, clamp)
    else:
        for c in range(keep):
            acc[c] = acc[c] + _quantize(part[c] + sigma * np.sqrt(var[c]) * z[c], levels, clamp)


@njit(inline="always")
def _epilogue_args(sigma, levels, lo, hi, k0, k1):
    """float64 and int64 arguments (cheap for numba's dispatcher) → the kernel's float32 and uint64 values."""
    return float32(sigma), float32(levels), uint64(lo) | (uint64(hi) << _S32), uint64(k0), uint64(k1)


@njit(inline="always")
def _piece_rows(C):
    """Rows of a piece: short rows as many as CHUNK numbers hold, long ones 8 (a parallel task's share)."""
    return max(1, CHUNK // C) if C < ROW_BLOCKS else 8


@njit(cache=True)
def _epilogue_serial(out, part, var, bf16, sigma, levels, clamp, keep, lo, hi, k0, k1, factor, per_row):
    sigma, levels, ctr, k0, k1 = _epilogue_args(sigma, levels, lo, hi, k0, k1)
    C = part.shape[2]
    z = np.empty(max(CHUNK, C) + 8, np.float32)
    acc = np.empty(keep, np.float32)
    rows = _piece_rows(C)
    B = part.shape[1]
    for p in range((B + rows - 1) // rows):
        _epilogue_rows(out, part, var, bf16, sigma, levels, clamp, keep, ctr, k0, k1, factor, per_row,
                       p * rows, min(B, (p + 1) * rows), z, acc)


@njit(parallel=True, cache=True)
def _epilogue_parallel(out, part, var, bf16, sigma, levels, clamp, keep, lo, hi, k0, k1, factor, per_row):
    sigma, levels, ctr, k0, k1 = _epilogue_args(sigma, levels, lo, hi, k0, k1)
    C = part.shape[2]
    rows = _piece_rows(C)
    B = part.shape[1]
    for p in prange((B + rows - 1) // rows):
        z = np.empty(max(CHUNK, C) + 8, np.float32)
        acc = np.empty(keep, np.float32)
        _epilogue_rows(out, part, var, bf16, sigma, levels, clamp, keep, ctr, k0, k1, factor, per_row,
                       p * rows, min(B, (p + 1) * rows), z, acc)


def epilogue(out: np.ndarray, part: np.ndarray, var: np.ndarray, sigma: float, levels: float | None, keep: int,
             counter: int, k0: int, k1: int, factor: np.ndarray, parallel: bool) -> None:
    """out[b, c] = (sum_t q(part[t,b,c] + sigma sqrt(var[t,b,c]) z[t,b,c]))·factor[b or 0] for c < keep;
    ``var`` float32, or bfloat16 as its uint16 bit pattern; ``factor`` float32, (B,) or (1,)."""
    f = _epilogue_parallel if parallel else _epilogue_serial
    f(out, part, var, var.dtype == np.uint16, sigma, 0.0 if levels is None else levels, levels is not None, keep,
      counter & 0xFFFFFFFF, counter >> 32, k0, k1, factor, factor.shape[0] != 1)
