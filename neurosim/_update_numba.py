"""The CPU kernel of stochastic rounding from a Philox stream (neurosim.sampling): one pass, sparse output.

Imported lazily (through neurosim.sampling, after neurosim.random_streams has chosen numba's threading layer).

Cell i of a request of N cells takes the uniform u_i = (h_i·2^16 + l_i)·2^-24 (24 bits, as the stream's
uniforms), m = |x_i|·size in x's dtype, n = floor(m + u_i) in x's dtype; cells with n >= 1 are written, with
the sign of x_i (flipped for a negative factor) and clamped to the limits. h_i is byte i % 4 (low byte first)
of word i // 4 of a first call of 4·ceil(N/16) words, l_i half i % 2 (low half first) of word i // 2 of a
second call of 4·ceil(N/8) words (``sampling.rounding_uniforms`` composes them with torch). Why:
- Only the high byte is drawn for every cell. m + u_i can reach 1 only if m + (h_i·2^16 + 2^16 − 1)·2^-24
  does (a rounded sum does not decrease as an operand grows), which for the small updates of a training step
  (m ~ 10^-4) leaves one cell in 256: only those compute their block of low halves. A step's rounding so
  evaluates Philox for 1/16 of the cells instead of 1/4 (its uniforms were three quarters of the pass), and
  every cell still gets the number floor(m + u_i) of the full 24-bit uniform: the same bits as the torch
  composition, the same distribution as one uniform per cell.
- The cells are cut into pieces of ``CELLS`` (whole blocks of both calls). A piece fills its bytes with the
  vectorized word filler of neurosim._philox_numba, then rounds and writes its non-zero results at its own
  offset of a scratch buffer; afterwards the pieces' results are copied out in piece order (count, then
  write). So the output -- flat indices ascending -- does not depend on how many threads ran the pieces.
- No fastmath: the product and the sum are the IEEE float operations torch performs in the same order (no
  fused multiply-add), so the kernel equals the torch reference ``sampling.stochastic_round_dense`` bit for bit.
- n >= 1 rather than n != 0 decides a write: a NaN request fires nothing (as the candidates path), an
  infinite one fires up to the limits.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from neurosim._philox_numba import PIECE, _block, _fill_words

CELLS = 4 * PIECE   # cells a parallel task rounds (8192: whole blocks of both calls; its bytes stay in L1)
GROUP = 32          # cells tested together (measured: 32 takes 1/3 of the time of a branch per cell)
_U24 = np.float32(2.0**-24)


@njit(inline="always")
def _emit(v, xi, i, flip, low, high, clamp, idx, val, at):
    """Write cell i's count floor(v) (v >= 1) with its sign and limits at position ``at``."""
    n = np.floor(v)
    if (xi < 0) != flip:
        n = -n
    if clamp:
        n = low if n < low else (high if n > high else n)
    idx[at] = i
    val[at] = n


@njit(inline="always")
def _uniform(h, low):
    """(h·2^16 + low)·2^-24 as float32 (exact: an integer below 2^24); low = 0xFFFF gives the largest uniform
    a cell with high byte h can have."""
    return np.float32(np.int32(h) * 65536 + np.int32(low)) * _U24


@njit(inline="always")
def _low_half(i, ctr2, k0, k1):
    """l_i: half i % 2 of word (i // 2) % 4 of block ctr2 + i // 8 of the low halves' call."""
    w = _block(ctr2 + uint64(i >> 3), k0, k1)
    q = (i >> 1) & 3
    word = w[0] if q == 0 else (w[1] if q == 1 else (w[2] if q == 2 else w[3]))
    return (word >> uint64(16 * (i & 1))) & uint64(0xFFFF)


@njit(inline="always")
def _round_piece(x, lo, hi, size, flip, low, high, clamp, ctr, ctr2, k0, k1, words, m, idx, val):
    """Cells lo .. hi - 1: their non-zero results into idx/val from offset lo; returns how many.

    Groups of GROUP cells compute the largest sum their high bytes allow and count the cells at or above 1
    without a branch (vector code); only a group with one is scanned, and its candidates draw their low
    halves."""
    k = hi - lo
    _fill_words(words, lo >> 2, (k + 3) >> 2, ctr, k0, k1)   # lo is a multiple of 16: whole blocks
    h = words.view(np.uint8)
    # The piece's own view: indices from range() alone are known non-negative, so numba emits no wraparound
    # test per element (x[lo + j] with an argument lo kept the group loop scalar: 7x slower).
    xs = x[lo:hi]
    count = 0
    for g in range(k // GROUP):
        b = g * GROUP
        hit = 0
        for j in range(GROUP):
            v = np.abs(xs[b + j]) * size + _uniform(h[b + j], 0xFFFF)
            m[j] = v
            hit += np.int32(v >= 1.0)
        if hit:
            for j in range(GROUP):
                if m[j] >= 1.0:
                    count += _exact(xs, b + j, lo, h, size, flip, low, high, clamp, ctr2, k0, k1, idx, val,
                                    lo + count)
    for j in range(k - k % GROUP, k):
        if np.abs(xs[j]) * size + _uniform(h[j], 0xFFFF) >= 1.0:
            count += _exact(xs, j, lo, h, size, flip, low, high, clamp, ctr2, k0, k1, idx, val, lo + count)
    return count


@njit(inline="always")
def _exact(xs, j, lo, h, size, flip, low, high, clamp, ctr2, k0, k1, idx, val, at):
    """A candidate (its high byte lets m + u reach 1): its full uniform, and its result at ``at`` if it
    fires; returns 1 if it did, else 0. (A float32 uniform in a float64 sum is converted exactly.)"""
    i = lo + j
    v = np.abs(xs[j]) * size + _uniform(h[j], _low_half(i, ctr2, k0, k1))
    if v >= 1.0:
        _emit(v, xs[j], i, flip, low, high, clamp, idx, val, at)
        return 1
    return 0


@njit(inline="always")
def _gather(idx, val, counts, cells):
    total = 0
    for p in range(counts.size):
        total += counts[p]
    out_i = np.empty(total, np.int64)
    out_v = np.empty(total, val.dtype)
    o = 0
    for p in range(counts.size):
        lo = p * cells
        for j in range(counts[p]):
            out_i[o + j] = idx[lo + j]
            out_v[o + j] = val[lo + j]
        o += counts[p]
    return out_i, out_v


@njit(cache=True)
def _round_serial(x, size, flip, low, high, clamp, ctr, ctr2, k0, k1):
    n = x.size
    pieces = (n + CELLS - 1) // CELLS
    idx = np.empty(n, np.int64)
    val = np.empty(n, x.dtype)
    counts = np.zeros(pieces, np.int64)
    words = np.empty(CELLS // 4, np.uint32)
    m = np.empty(GROUP, x.dtype)
    for p in range(pieces):
        lo = p * CELLS
        counts[p] = _round_piece(x, lo, min(n, lo + CELLS), size, flip, low, high, clamp, ctr, ctr2, k0, k1,
                                 words, m, idx, val)
    return _gather(idx, val, counts, CELLS)


@njit(parallel=True, cache=True)
def _round_parallel(x, size, flip, low, high, clamp, ctr, ctr2, k0, k1):
    n = x.size
    pieces = (n + CELLS - 1) // CELLS
    idx = np.empty(n, np.int64)
    val = np.empty(n, x.dtype)
    counts = np.zeros(pieces, np.int64)
    for p in prange(pieces):
        words = np.empty(CELLS // 4, np.uint32)
        m = np.empty(GROUP, x.dtype)
        lo = p * CELLS
        counts[p] = _round_piece(x, lo, min(n, lo + CELLS), size, flip, low, high, clamp, ctr, ctr2, k0, k1,
                                 words, m, idx, val)
    return _gather(idx, val, counts, CELLS)


def round_sparse(x: np.ndarray, size: float, flip: bool, limits: tuple[float, float] | None, counter: int,
                 counter2: int, k0: int, k1: int, parallel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices ascending, signed counts in x's dtype) of floor(|x|·size + u) for a 1-d contiguous
    float32/float64 ``x`` whose high bytes are the call starting at block ``counter`` and whose low halves the
    call starting at block ``counter2`` (``sampling.rounding_blocks``: ceil(n/16) blocks, then ceil(n/8))."""
    t = x.dtype.type
    low, high = (0.0, 0.0) if limits is None else limits
    f = _round_parallel if parallel else _round_serial
    return f(x, t(size), bool(flip), t(low), t(high), limits is not None, np.uint64(counter),
             np.uint64(counter2), np.uint32(k0), np.uint32(k1))


# --- a crossbar's bookkeeping after a sparse write (Crossbar._written) ------------------------------------------

@njit(cache=True)
def _bookkeeping(believed, idx, counts, dw_up, dw_down, w_max, out_features, tile_cols, n_col_tiles, tile_rows,
                 n_row_tiles):
    """The controller's belief at the pulsed cells moves by each count's step, clamped to ±w_max (in place, the
    torch path's float operations in its order: count × step, then the sum, then the clamp); returns (pulses,
    pulse slots): the sum of |count|, and the largest over tiles of the sum over a tile's rows of the row's
    largest |count| in that tile. Counts are whole numbers, so the sums are exact in float64."""
    lo = -w_max
    per_row = np.zeros(n_row_tiles * tile_rows * n_col_tiles, np.float64)
    total = 0.0
    for k in range(idx.size):
        i = idx[k]
        c = counts[k]
        b = believed[i] + (c * dw_up if c > 0 else c * dw_down)
        believed[i] = w_max if b > w_max else (lo if b < lo else b)
        m = np.abs(c)
        total += m
        w = (i // out_features) * n_col_tiles + (i % out_features) // tile_cols
        if m > per_row[w]:
            per_row[w] = m
    slots = 0.0
    for rt in range(n_row_tiles):
        for ct in range(n_col_tiles):
            s = 0.0
            for r in range(rt * tile_rows, (rt + 1) * tile_rows):
                s += per_row[r * n_col_tiles + ct]
            if s > slots:
                slots = s
    return total, slots


def bookkeeping(believed: np.ndarray, idx: np.ndarray, counts: np.ndarray, dw_up: float, dw_down: float,
                w_max: float, out_features: int, tile_cols: int, n_col_tiles: int, tile_rows: int, n_row_tiles: int
                ) -> tuple[float, float]:
    """``_bookkeeping`` with the scalars in the arrays' dtype (as torch uses a Python scalar with a tensor)."""
    t = believed.dtype.type
    return _bookkeeping(believed, idx, counts, t(dw_up), t(dw_down), t(w_max), out_features, tile_cols,
                        n_col_tiles, tile_rows, n_row_tiles)
