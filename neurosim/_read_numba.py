"""Fused CPU prologues of the crossbar read (neurosim.crossbar), float32, imported on first use.

A read's inputs pass half a dozen small torch operations before the products (scale, clip, round to the DAC
grid, division by the ADC step, the squares of the variance operand in its dtype; for the transposed read also
each error vector's largest magnitude, the division by it and the tile layout): a few µs each at a training
step's sizes, where the whole read takes 70-360 µs. Here they are one pass that writes the two product
operands. Why it looks like this:
- No fastmath: every float operation is the IEEE float32 one the torch composition performs, in its order
  (a division is a division, not a multiplication by a reciprocal: torch divides by a scalar too), so the
  operands equal torch's bit for bit (tested against the torch path, which stays the realization for other
  dtypes, autograd and CUDA).
- Rounding is half to even (np.rint, as torch.round); clipping passes NaN through (as torch.clamp).
- bfloat16 squares: the float32 square rounded to nearest even in its upper 16 bits (c10::BFloat16's rule;
  NaN becomes the quiet NaN 0x7FC0), stored as the bit pattern.
- Serial: B·n inputs (a few 10⁴ at most in a training step) take a few µs, less than a parallel launch.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint16, uint32

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@njit(inline="always")
def _bf16_bits(s):
    """The bfloat16 bit pattern of float32 s, rounded to nearest even (quiet NaN for NaN); a select, not a
    branch, so that the loops calling it vectorize."""
    u = np.float32(s).view(np.uint32)
    r = (u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))) >> uint32(16)
    return uint16(uint32(0x7FC0) if s != s else r)


@njit(inline="always")
def _convert(v, lower, upper, dac_step, rounded, adc_inv):
    """clip to [lower, upper] (NaN passes), round to the DAC grid (v / step, half to even, × step), × 1/ADC step."""
    v = lower if v < lower else (upper if v > upper else v)
    if rounded:
        v = np.rint(v / dac_step) * dac_step
    return v * adc_inv


# What the squares go to: none (no read noise), float32, or bfloat16 bits.
NO_SQUARES, SQUARES_F32, SQUARES_BF16 = 0, 1, 2


@njit(cache=True)
def forward(x, xn, sq, sq16, mode, divide, input_max, lower, dac_step, rounded, adc_inv, B, R, extra, has_extra):
    """xn = DAC(x) / ADC step and its squares, x and xn flat: x / input_max (when ``divide``), clipped to
    [lower, 1], rounded to the DAC grid (when ``rounded``), times 1/ADC step; then xn² into sq (float32, xn's
    layout) or its bfloat16 bits into sq16, as ``mode`` says. ``has_extra``: x is (B, n − 1) and each row of
    xn (B, n) ends with the converted ``extra`` (a layer's bias row at full scale, which the torch path
    concatenates first). The bfloat16 squares are written per row tile of R rows, (tiles, B, R) flat (the rows
    of a ragged last tile past n left as they are): the layout the tiles' product takes without a copy (torch's
    bfloat16 bmm copies a strided operand)."""
    n = xn.size
    cols = n // B if B else 0
    given = cols - 1 if has_extra else cols
    e = _convert(extra / input_max if divide else extra, lower, _ONE, dac_step, rounded, adc_inv)
    for b in range(B):
        src = x[b * given:(b + 1) * given]   # slices: the inner loop vectorizes
        dst = xn[b * cols:b * cols + given]
        for k in range(given):
            v = src[k]
            if divide:
                v = v / input_max
            dst[k] = _convert(v, lower, _ONE, dac_step, rounded, adc_inv)
        if has_extra:
            xn[b * cols + given] = e
    if mode == SQUARES_BF16:
        for b in range(B):
            for t in range((cols + R - 1) // R):
                m = min(R, cols - t * R)
                src = xn[b * cols + t * R:b * cols + t * R + m]     # slices: the inner loop vectorizes (with
                dst = sq16[(t * B + b) * R:(t * B + b) * R + m]      # computed indices it did not: 12x slower)
                for r in range(m):
                    dst[r] = _bf16_bits(src[r] * src[r])
    elif mode == SQUARES_F32:
        for k in range(n):
            sq[k] = xn[k] * xn[k]


@njit(cache=True)
def transposed(d, dt, sq, sq16, mode, factor, manage, input_max, dac_step, rounded, adc_inv, step, w_max):
    """The transposed read's operands: per error vector d[b] (B, out) its scale s = max |d[b]| clamped to
    >= 1e-30 (``manage``; NaN propagates, as torch.amax) or input_max; d/s clipped to ±1, rounded to the DAC
    grid (``rounded``), times 1/ADC step, written in the column-tile layout dt (nc, B, C) with zeros in the
    padded columns; its squares into sq (float32) or sq16 (bfloat16 bits), as ``mode`` says; and
    factor[b] = step·(s·w_max), the digital scale back after the ADC."""
    B, out = d.shape
    nc, _, C = dt.shape
    tiny = np.float32(1e-30)
    for b in range(B):
        if manage:
            m = _ZERO
            nan = False
            row = d[b]
            for j in range(out):
                a = np.abs(row[j])
                nan = nan or a != a
                m = a if a > m else m
            s = np.float32(np.nan) if nan else (m if m > tiny else tiny)
        else:
            s = input_max
        row = d[b]
        for t in range(nc):
            hi = max(min(C, out - t * C), 0)
            src = row[t * C:t * C + hi]
            dst = dt[t, b]
            for c in range(hi):
                dst[c] = _convert(src[c] / s, -_ONE, _ONE, dac_step, rounded, adc_inv)
            for c in range(hi, C):
                dst[c] = _ZERO
            if mode == SQUARES_BF16:
                sq_row = sq16[t, b]
                for c in range(C):
                    sq_row[c] = _bf16_bits(dst[c] * dst[c])
            elif mode == SQUARES_F32:
                sq_row32 = sq[t, b]
                for c in range(C):
                    sq_row32[c] = dst[c] * dst[c]
        factor[b] = step * (s * w_max)
