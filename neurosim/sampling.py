"""Stochastic rounding that draws random numbers for the cells likely to fire, not for every cell.

A training update asks for m = |Δw| / Δw_pulse pulses per cell, mostly a small fraction of one pulse; an unbiased
pulse train fires floor(m) + Bernoulli(frac m) pulses. Drawing one uniform number per cell per step costs more
than the matrix products of the step on a CPU, while only a fraction of a percent of the cells fire. So:

- cells with m > τ (few) draw their own uniform number: floor(m + u);
- every cell is a candidate with probability τ, drawn as geometric gaps between candidates (about N·τ numbers),
  and a candidate with m ≤ τ fires with probability m/τ.

A cell with m ≤ τ therefore fires with probability τ·m/τ = m, independently of every other cell: the same
distribution as one uniform number per cell, for far fewer numbers. τ adapts to the step (a few times the mean
of m), which only changes how many numbers are drawn.
"""

from __future__ import annotations

import math

import torch


def stochastic_round_sparse(m: torch.Tensor, generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """floor(m + u) with u ~ U[0, 1) independent per element, for m ≥ 0 (flat), returned sparsely:
    (sorted flat indices of the non-zero results, their values). Same distribution as the dense rounding."""
    n = m.numel()
    empty = (torch.zeros(0, dtype=torch.long, device=m.device), m.new_zeros(0))
    if n == 0:
        return empty
    mean = float(m.mean())
    if mean == 0.0:
        return empty
    tau = min(0.5, max(4.0 * mean, 1.0 / n))

    def uniform(k: int) -> torch.Tensor:
        return torch.rand(k, generator=generator, device=m.device, dtype=m.dtype)

    big = (m > tau).nonzero().squeeze(1)
    big_counts = (m.index_select(0, big) + uniform(big.numel())).floor_()

    # Candidates: an independent Bernoulli(τ) per cell, as geometric gaps G ≥ 1 with P(G = g) = (1 − τ)^(g−1) τ.
    log_q = math.log1p(-tau)
    expected = n * tau
    chunk = int(expected + 6.0 * math.sqrt(expected) + 16)
    pieces, last = [], -1
    while last < n - 1:
        gaps = (torch.log1p(-uniform(chunk)) / log_q).floor_().long() + 1
        positions = gaps.cumsum_(0).add_(last)
        last = int(positions[-1])
        pieces.append(positions[positions < n])
    candidates = torch.cat(pieces)
    m_c = m.index_select(0, candidates)
    fire = (m_c <= tau) & (uniform(candidates.numel()) * tau < m_c)
    small = candidates[fire]

    keep = big_counts > 0
    idx = torch.cat([big[keep], small])
    counts = torch.cat([big_counts[keep], torch.ones(small.numel(), device=m.device, dtype=m.dtype)])
    idx, order = idx.sort()
    return idx, counts.index_select(0, order)
