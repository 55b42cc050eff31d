"""Stochastic rounding that draws random numbers for the cells likely to fire, not for every cell.

A training update asks for m = |Δw| / Δw_pulse pulses per cell, mostly a small fraction of one pulse; an unbiased
pulse train fires floor(m) + Bernoulli(frac m) pulses. Drawing one uniform number per cell per step costs more
than the matrix products of the step on a CPU, while only a fraction of a percent of the cells fire. So:

- cells with m > τ (few) draw their own uniform number: floor(m + u);
- every cell is a candidate with probability τ, drawn as geometric gaps between candidates (about N·τ numbers),
  and a candidate with m ≤ τ fires with probability m/τ.

A cell with m ≤ τ therefore fires with probability τ·m/τ = m, independently of every other cell: the same
distribution as one uniform number per cell, for far fewer numbers. τ adapts to the step (16 times the mean
of m: few cells lie above it, and N·τ stays a small multiple of the expected pulses), which only changes
how many numbers are drawn.

On the CPU with a ``PhiloxStream`` none of that is needed: a uniform number per cell costs 0.17 ns there, less
than the few dozen torch operations of the search. So every cell has its own 24-bit uniform, flat cell i the
u_i of ``rounding_uniforms`` (its high byte from a first call of the stream, its low 16 bits from a second:
exactly ceil(N/16) + ceil(N/8) blocks a request), in one fused pass of a numba kernel (neurosim._update_numba)
that writes the non-zero results sparsely and evaluates the low bits only where the high byte lets the cell
fire; ``stochastic_round_dense`` is the same rounding as torch operations, the kernel's test oracle (and the
path when the kernel is not available). Other generators and other devices (CUDA) keep the candidate search
above: the same distribution, other numbers.
"""

from __future__ import annotations

import math

import torch

from neurosim import random_streams
from neurosim.random_streams import PhiloxStream


def stochastic_round_sparse(x: torch.Tensor, generator: torch.Generator | PhiloxStream | None = None,
                            factor: float = 1.0, limits: tuple[float, float] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """floor(m + u) with u ~ U[0, 1) independent per element, for m = |factor·x| (x any shape and sign),
    returned sparsely with the sign of factor·x: (flat indices of the non-zero results, in no particular
    order -- ascending from a CPU PhiloxStream, which rounds by ``stochastic_round_dense``'s rule in one kernel
    pass --, and their signed values). Same distribution as the dense rounding; a few dozen operations whatever
    the size, since this runs for every layer at every step. ``factor`` spares the caller a scaled copy of x
    (a training update passes the gradient and −learning rate / pulse size): one pass over x finds its
    mean and largest magnitude, and only the gathered elements are scaled. A matrix is searched for its few
    large elements row by row (a row maximum, then only the rows that have one), which is much cheaper than
    a full comparison and index search. ``limits`` (low, high): the results are clamped to them, a pass that
    is skipped when the largest |x| shows that no result can reach them."""
    return stochastic_round_sparse_many([x], [generator], [factor], [limits])[0]


def stochastic_round_sparse_many(xs: list[torch.Tensor], generators: list[torch.Generator | PhiloxStream | None],
                                 factors: list[float], limits: list[tuple[float, float] | None]
                                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``stochastic_round_sparse`` of several requests (a network's layers at one step), each with its own
    stream, in order: the same numbers as separate calls, with the magnitudes' sums and maxima of all of them
    read in one synchronisation."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(xs)
    for i, (x, g, factor, lim) in enumerate(zip(xs, generators, factors, limits, strict=True)):
        if _per_cell(x, g):
            out[i] = _round_per_cell(x, g, factor, lim)
    rest = [i for i, o in enumerate(out) if o is None]
    flats = {i: xs[i].reshape(-1) for i in rest}
    mags = {i: flats[i].abs() for i in rest}
    wanted = [i for i in rest if xs[i].numel() and factors[i]]
    values = torch.stack([t for i in wanted for t in (mags[i].sum(), mags[i].amax())]).tolist() if wanted else []
    stats = dict.fromkeys(rest, (0.0, 0.0))
    for k, i in enumerate(wanted):
        stats[i] = (values[2 * k], values[2 * k + 1])
    for i in rest:
        out[i] = _round_sparse(xs[i], flats[i], mags[i], *stats[i], generators[i], factors[i], limits[i])
    return out


def _per_cell(x: torch.Tensor, generator: torch.Generator | PhiloxStream | None) -> bool:
    """Whether a request rounds with one uniform per cell: from a PhiloxStream on the CPU."""
    return isinstance(generator, PhiloxStream) and generator._device.type == "cpu" and x.device.type == "cpu"


def _round_per_cell(x: torch.Tensor, stream: PhiloxStream, factor: float, limits: tuple[float, float] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``stochastic_round_dense`` by the fused kernel where numba is available, else by torch."""
    if x.dtype not in (torch.float32, torch.float64):
        idx, counts = _round_per_cell(x.float(), stream, factor, limits)
        return idx, counts.to(x.dtype)
    if stream.kernel != "numba":
        return stochastic_round_dense(x, stream, factor, limits)
    n = x.numel()
    high, low = rounding_blocks(n)
    first = stream._take(4 * (high + low))
    if n == 0 or factor == 0:
        return torch.zeros(0, dtype=torch.long), x.new_zeros(0)
    arr = random_streams.flat_numpy(x if x.is_contiguous() and not x.requires_grad else x.detach().contiguous())
    key = stream._key
    idx, counts = random_streams._run(random_streams.NUMBA.update.round_sparse, n, arr, abs(factor), factor < 0,
                                      limits, first, (first + high) % 2**64, key & 0xFFFFFFFF, key >> 32)
    return torch.from_numpy(idx), torch.from_numpy(counts)


def rounding_blocks(n: int) -> tuple[int, int]:
    """Blocks of a PhiloxStream the rounding of n cells takes: (high bytes' call, low halves' call)."""
    return (n + 15) // 16, (n + 7) // 8


_BYTE_SHIFTS = (0, 8, 16, 24)
_HALF_SHIFTS = (0, 16)


def rounding_uniforms(stream: PhiloxStream, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The uniforms of a stochastic rounding of n cells, as the stream's next two calls give them: u_i =
    (h_i·2^16 + l_i)·2^-24, h_i byte i % 4 (low byte first) of word i // 4 of 4·ceil(n/16) words, l_i half
    i % 2 (low half first) of word i // 2 of the next 4·ceil(n/8) words. Uniform on the 2^24 grid, as the
    stream's own uniforms; the split lets the CPU kernel draw the low bits only for cells that may fire."""
    high, low = rounding_blocks(n)
    hi, lo = stream.words(4 * high), stream.words(4 * low)
    shifts = torch.tensor(_BYTE_SHIFTS, device=hi.device)
    h = ((hi[:, None] >> shifts) & 0xFF).reshape(-1)[:n]
    shifts = torch.tensor(_HALF_SHIFTS, device=lo.device)
    l16 = ((lo[:, None] >> shifts) & 0xFFFF).reshape(-1)[:n]
    return ((h * 65536 + l16).to(torch.float32) * 2.0**-24).to(dtype)   # integers < 2^24: exact


def stochastic_round_dense(x: torch.Tensor, stream: PhiloxStream, factor: float = 1.0,
                           limits: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounding of a PhiloxStream request as torch operations (any device; the kernel's oracle): flat cell
    i takes u_i of ``rounding_uniforms`` (in x's dtype), m = |x|·|factor| and n = floor(m + u) in x's dtype;
    cells with n >= 1 (so never a NaN request) are returned, ascending, with the sign of factor·x and clamped
    to ``limits``. A half-precision x rounds in float32 (a uniform near 1 would round up to 1 in bfloat16 and
    fire a zero cell), its counts converted back."""
    if x.dtype not in (torch.float32, torch.float64):
        idx, counts = stochastic_round_dense(x.float(), stream, factor, limits)
        return idx, counts.to(x.dtype)
    flat = x.detach().reshape(-1)
    u = rounding_uniforms(stream, flat.numel(), x.dtype).to(flat.device)
    n = flat.abs().mul_(abs(factor)).add_(u).floor_()
    idx = (n >= 1).nonzero().squeeze(1)
    counts = n.index_select(0, idx)
    negative = flat.index_select(0, idx) < 0
    if factor < 0:
        negative = ~negative
    counts = torch.where(negative, -counts, counts)
    if limits is not None:
        counts = counts.clamp_(limits[0], limits[1])
    return idx, counts


def _round_sparse(x: torch.Tensor, flat: torch.Tensor, a: torch.Tensor, total: float, largest: float,
                  generator: torch.Generator | PhiloxStream | None, factor: float, limits: tuple[float, float] | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``stochastic_round_sparse`` given x flat, its magnitudes ``a`` and their sum and maximum."""
    n = x.numel()
    size = abs(factor)
    if largest == 0.0:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0)
    tau = min(0.5, max(16.0 * total / n * size, 1.0 / n))
    limit = tau / size  # |x| above it: m > τ

    def uniform(k: int) -> torch.Tensor:
        if isinstance(generator, PhiloxStream):
            return generator.uniform(k, dtype=x.dtype)
        return torch.rand(k, generator=generator, device=x.device, dtype=x.dtype)

    big = big_counts = None
    if largest > limit:
        big = _above(a.view(x.shape), limit)
        big_counts = a.index_select(0, big).mul_(size).add_(uniform(big.numel())).floor_()
        keep = big_counts.nonzero().squeeze(1)   # floor(m + u) >= 0, and finite x here (largest is)
        big = big.index_select(0, keep)
        big_counts = big_counts.index_select(0, keep).copysign_(flat.index_select(0, big))

    # Candidates: an independent Bernoulli(τ) per cell, as geometric gaps G ≥ 1 with P(G = g) = (1 − τ)^(g−1) τ.
    log_q = math.log1p(-tau)
    expected = n * tau
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    pieces, last = [], -1
    while last < n - 1:
        gaps = torch.log1p(uniform(chunk).neg_()).div_(log_q).floor_().long().add_(1)
        positions = gaps.cumsum_(0).add_(last)
        inside = int(torch.searchsorted(positions, n))
        pieces.append(positions[:inside])
        # Positions rise strictly: one at or past n ends the search, and only a chunk wholly inside needs its
        # last position read (one synchronisation a chunk instead of two).
        last = n if inside < chunk else int(positions[-1])
    candidates = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    a_c = a.index_select(0, candidates)
    fire = uniform(candidates.numel()).mul_(limit) < a_c  # u·τ < m: probability m/τ
    if big is not None:
        fire &= a_c <= limit  # those above τ were drawn on their own
    chosen = fire.nonzero().squeeze(1)
    small = candidates.index_select(0, chosen)
    signs = flat.index_select(0, small).sign_()
    idx, counts = (small, signs) if big is None else (torch.cat([big, small]), torch.cat([big_counts, signs]))
    counts = counts.neg_() if factor < 0 else counts
    # The largest result is floor(m + u) <= m + 1 (m rounded up by a part in 10^6 at most in float32).
    if limits is not None and largest * size * (1.0 + 1e-6) + 1.0 >= min(-limits[0], limits[1]):
        counts = counts.clamp_(limits[0], limits[1])
    return idx, counts


def _above(m: torch.Tensor, tau: float) -> torch.Tensor:
    """Flat indices of the elements of m above tau, ascending."""
    if m.dim() != 2 or m.shape[1] < 8:
        return (m.reshape(-1) > tau).nonzero().squeeze(1)
    rows = (m.amax(1) > tau).nonzero().squeeze(1)
    if rows.numel() * 2 > m.shape[0]:  # most rows have one: the plain search is as cheap
        return (m.reshape(-1) > tau).nonzero().squeeze(1)
    hit = (m.index_select(0, rows) > tau).nonzero()
    return rows.index_select(0, hit[:, 0]).mul_(m.shape[1]).add_(hit[:, 1])
