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
"""

from __future__ import annotations

import math

import torch


def stochastic_round_sparse(m: torch.Tensor, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """floor(m + u) with u ~ U[0, 1) independent per element, for m ≥ 0 (any shape), returned sparsely: (flat
    indices of the non-zero results, in no particular order, and their values). Same distribution as the
    dense rounding; a few dozen operations whatever the size, since this runs for every layer at every step.
    A matrix is searched for its few large elements row by row (a row maximum, then only the rows that
    have one), which is much cheaper than a full comparison and index search."""
    n = m.numel()
    mean, largest = torch.stack([m.mean(), m.max()]).tolist() if n else (0.0, 0.0)
    if largest == 0.0:
        return torch.zeros(0, dtype=torch.long, device=m.device), m.new_zeros(0)
    tau = min(0.5, max(16.0 * mean, 1.0 / n))

    def uniform(k: int) -> torch.Tensor:
        return torch.rand(k, generator=generator, device=m.device, dtype=m.dtype)

    flat = m.reshape(-1)
    big = big_counts = None
    if largest > tau:
        big = _above(m, tau)
        big_counts = flat.index_select(0, big).add_(uniform(big.numel())).floor_()
        keep = big_counts > 0
        big, big_counts = big[keep], big_counts[keep]

    # Candidates: an independent Bernoulli(τ) per cell, as geometric gaps G ≥ 1 with P(G = g) = (1 − τ)^(g−1) τ.
    log_q = math.log1p(-tau)
    expected = n * tau
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    pieces, last = [], -1
    while last < n - 1:
        gaps = torch.log1p(uniform(chunk).neg_()).div_(log_q).floor_().long().add_(1)
        positions = gaps.cumsum_(0).add_(last)
        last = int(positions[-1])
        pieces.append(positions[: int(torch.searchsorted(positions, n))])
    candidates = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    m_c = flat.index_select(0, candidates)
    fire = uniform(candidates.numel()).mul_(tau) < m_c
    if big is not None:
        fire &= m_c <= tau  # those above τ were drawn on their own
    small = candidates[fire]
    ones = m.new_ones(small.numel())
    if big is None:
        return small, ones
    return torch.cat([big, small]), torch.cat([big_counts, ones])


def _above(m: torch.Tensor, tau: float) -> torch.Tensor:
    """Flat indices of the elements of m above tau, ascending."""
    if m.dim() != 2 or m.shape[1] < 8:
        return (m.reshape(-1) > tau).nonzero().squeeze(1)
    rows = (m.amax(1) > tau).nonzero().squeeze(1)
    if rows.numel() * 2 > m.shape[0]:  # most rows have one: the plain search is as cheap
        return (m.reshape(-1) > tau).nonzero().squeeze(1)
    hit = (m.index_select(0, rows) > tau).nonzero()
    return rows.index_select(0, hit[:, 0]).mul_(m.shape[1]).add_(hit[:, 1])
