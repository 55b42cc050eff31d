"""The temporaries of a crossbar's fused CPU reads, made once per read shape and reused (issue 14).

A fused read on the CPU (``Crossbar.read`` / ``read_transposed`` with the numba prologue and epilogue) needs
the same half-dozen temporaries at every call: the prologue's converted inputs and their squares, the tiles'
partial sums and variances, and, to hand them to the products and the kernels, per-tile views of each and
numpy views for numba. Made anew, that is about twenty torch operations a read (an allocation, a slice or a
``.numpy()`` costs ~1-2 µs each here, more inside a training step whose passes have evicted the
interpreter's data from the caches); a hardware-BP step makes five reads. Why it is safe to reuse them:
- Nothing of them leaves the read: the epilogue writes its result into a fresh array, so a caller never holds
  a temporary, and the next read of the same shape may overwrite them. A read holds ``SCRATCH_LOCK`` (taken
  without waiting) while it uses them: a read that starts while another thread's holds it takes fresh
  temporaries instead.
- The numpy views alias the torch buffers only in the process and object that made them: a scratch records
  the ``id`` of the crossbar that owns it, so a copied or unpickled crossbar (whose copies of the views would
  no longer alias its copies of the buffers) makes its own.
- Kept only up to ``MAX_BYTES`` a read shape (small and medium layers and batches, where the operations
  matter); larger reads make fresh temporaries, so a network's peak memory does not grow by them.
- The same operations on the same operand layouts as the fresh temporaries: the reads' numbers are equal bit
  for bit (tests/test_read_kernels.py).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from neurosim.random_streams import NUMBA

# Held by a read while it uses its crossbar's temporaries (one for all crossbars: atomic, cheap, and a lock
# on the crossbar itself would make it impossible to copy).
SCRATCH_LOCK = threading.Lock()

# The most a read shape's kept temporaries may take. Above it a read's arithmetic outweighs its twenty-odd
# operations many times over, and temporaries kept per layer would add up to memory that the next layer's
# read reuses when they are freed (a wide conv layer's partial sums take tens of megabytes): such reads make
# fresh ones, as before.
MAX_BYTES = 4 << 20


def forward_bytes(batch: int, rows: int, tile_rows: int, tiles: int, cols: int, low: bool) -> int:
    """What ``ForwardScratch`` of these dimensions takes (x̂, squares, partial sums, variances)."""
    w = 2 if low else 4
    return batch * (4 * rows + w * (tiles * tile_rows if low else rows) + (4 + w) * tiles * cols)


def transposed_bytes(batch: int, rows: int, tile_cols: int, tiles: int, low: bool) -> int:
    """What ``TransposedScratch`` of these dimensions takes."""
    w = 2 if low else 4
    return batch * ((4 + w) * tiles * tile_cols + 4 + (4 + w) * tiles * rows)


# Empty arrays for a prologue's unused squares argument, by number of dimensions (1: forward, 3: transposed;
# float32, bfloat16 bits).
EMPTY = {1: (np.empty(0, np.float32), np.empty(0, np.uint16)),
         3: (np.empty((0, 0, 0), np.float32), np.empty((0, 0, 0), np.uint16))}


def _bits16(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's memory as uint16 (numpy has no bfloat16)."""
    return t.view(torch.int16).numpy().view(np.uint16)


class ForwardScratch:
    """A forward read's temporaries for ``batch`` samples, variance in bfloat16 (``low``) or float32: x̂ (B, in)
    and its squares (per row tile (nr, B, R) in bfloat16, else (B, in)), partial sums and variances (nr, B,
    padded cols), their views for the full row tiles' batched product and the ragged tile's, and the kernels'
    numpy views."""

    __slots__ = ("buffers", "mode", "owner", "part", "part_head", "part_tail", "sq16", "sq32", "sq_head", "sq_tail",
                 "var", "var_head", "var_tail", "x_head", "x_tail", "xn")

    def __init__(self, owner: int, batch: int, rows: int, tile_rows: int, tiles: int, cols: int, low: bool):
        B, R, f32 = batch, tile_rows, torch.float32
        full, ragged = rows // R, rows - (rows // R) * R
        read = NUMBA.read
        xn = torch.empty((B, rows), dtype=f32)
        sq = torch.empty((tiles, B, R) if low else (B, rows), dtype=torch.bfloat16 if low else f32)
        part = torch.empty((tiles, B, cols), dtype=f32)
        var = torch.empty((tiles, B, cols), dtype=sq.dtype)
        self.owner, self.buffers = owner, (xn, sq, part, var)
        self.xn = xn.view(-1).numpy()
        if low:
            self.mode, self.sq32, self.sq16 = read.SQUARES_BF16, EMPTY[1][0], _bits16(sq.view(-1))
            self.sq_head = sq[:full] if full else None
            self.sq_tail = sq[full, :, :ragged] if ragged else None
        else:
            self.mode, self.sq32, self.sq16 = read.SQUARES_F32, sq.view(-1).numpy(), EMPTY[1][1]
            self.sq_head, self.sq_tail = _row_tiles(sq, B, rows, R, full, ragged)
        self.x_head, self.x_tail = _row_tiles(xn, B, rows, R, full, ragged)
        self.part_head, self.part_tail = (part[:full] if full else None), (part[full] if ragged else None)
        self.var_head, self.var_tail = (var[:full] if full else None), (var[full] if ragged else None)
        self.part = part.numpy()
        self.var = _bits16(var) if low else var.numpy()


def _row_tiles(t: torch.Tensor, B: int, rows: int, R: int, full: int, ragged: int):
    """(B, rows) → its full row tiles (full, B, R) and its ragged tile (B, ragged), as strided views (what
    ``Crossbar._tile_products`` takes of a contiguous operand)."""
    return (t.as_strided((full, B, R), (R, rows, 1), 0) if full else None,
            t.as_strided((B, ragged), (rows, 1), full * R) if ragged else None)


class TransposedScratch:
    """A transposed read's temporaries for ``batch`` error vectors: the errors in the column-tile layout
    (nc, B, C) and their squares (bfloat16 or float32), the digital scale (B, 1), the row partial sums and
    their variances (nc, B, rows), per-column-tile views of the squares and variances (the bfloat16 product
    runs one column tile at a time), and the kernels' numpy views."""

    __slots__ = ("buffers", "dt", "dt_np", "factor", "factor_np", "mode", "owner", "part", "part_np", "sq", "sq16",
                 "sq32", "sq_tiles", "var", "var_np", "var_tiles")

    def __init__(self, owner: int, batch: int, rows: int, tile_cols: int, tiles: int, low: bool):
        B, C, f32 = batch, tile_cols, torch.float32
        read = NUMBA.read
        dt = torch.empty((tiles, B, C), dtype=f32)
        sq = torch.empty((tiles, B, C), dtype=torch.bfloat16 if low else f32)
        factor = torch.empty((B, 1), dtype=f32)
        part = torch.empty((tiles, B, rows), dtype=f32)
        var = torch.empty((tiles, B, rows), dtype=sq.dtype)
        self.owner, self.buffers = owner, (dt, sq, factor, part, var)
        self.dt, self.dt_np, self.sq, self.factor, self.part, self.var = dt, dt.numpy(), sq, factor, part, var
        if low:
            self.mode, self.sq32, self.sq16 = read.SQUARES_BF16, EMPTY[3][0], _bits16(sq)
        else:
            self.mode, self.sq32, self.sq16 = read.SQUARES_F32, sq.numpy(), EMPTY[3][1]
        self.sq_tiles = list(sq.unbind(0))
        self.var_tiles = list(var.unbind(0))
        self.factor_np = factor.view(-1).numpy()
        self.part_np = part.numpy()
        self.var_np = _bits16(var) if low else var.numpy()
