"""Sparse stochastic rounding has the distribution of one uniform number per cell."""

import math

import pytest
import torch

from neurosim.sampling import stochastic_round_sparse


def dense(idx, counts, n):
    return torch.zeros(n, dtype=counts.dtype).index_copy_(0, idx, counts)


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_are_floor_or_ceil_once_per_cell_and_zero_cells_never_fire(seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(50_000, generator=g, dtype=torch.float64) * 0.01
    m[::7] = 0.0
    m[3::1000] = torch.linspace(1.0, 5.5, 50, dtype=torch.float64)
    m[::7] = 0.0
    idx, counts = stochastic_round_sparse(m, g)
    assert idx.unique().numel() == idx.numel()                     # each cell once
    assert bool((counts > 0).all())
    c = dense(idx, counts, m.numel())
    assert bool(((c == m.floor()) | (c == m.floor() + 1)).all())
    assert not bool(c[::7].any())


@pytest.mark.parametrize("value", [1e-4, 3e-3, 0.05, 0.3, 0.9])
def test_total_count_is_binomial(value):
    # Every cell at the same m: the number of fired cells is Binomial(n, m); 5 standard deviations.
    n = 200_000
    _, counts = stochastic_round_sparse(torch.full((n,), value, dtype=torch.float64),
                                          torch.Generator().manual_seed(3))
    assert abs(float(counts.sum()) - n * value) < 5 * math.sqrt(n * value * (1 - value))


def test_each_cell_fires_with_its_own_probability_independently():
    # 400 cells with probabilities spread over two decades plus a few above one pulse, 4000 repetitions.
    n, reps = 400, 4000
    g = torch.Generator().manual_seed(5)
    m = torch.logspace(-3, -1, n, dtype=torch.float64)
    m[::50] += 2.0                                                # the direct path (m > τ)
    frac = m - m.floor()
    sums = torch.zeros(n, dtype=torch.float64)
    totals = []
    for _ in range(reps):
        idx, counts = stochastic_round_sparse(m, g)
        c = dense(idx, counts, n)
        sums += c
        totals.append(float((c - m.floor()).sum()))
    # Per cell: mean count m, binomial spread; 5 standard deviations each (400 cells: a false alarm ~ 1e-4).
    sd = (frac * (1 - frac) / reps).sqrt()
    assert bool(((sums / reps - m).abs() < 5 * sd + 1e-12).all())
    # Independence: the variance of the number of extra pulses per draw is Σ f(1 − f); correlated sampling
    # would move it. Sample variance of 4000 draws has relative sd sqrt(2/(reps − 1)) ≈ 2.2 %; allow 5 of them.
    var = torch.tensor(totals, dtype=torch.float64).var()
    expected = float((frac * (1 - frac)).sum())
    assert abs(float(var) / expected - 1) < 5 * math.sqrt(2 / (reps - 1))


def test_all_zero_and_empty_inputs():
    for m in (torch.zeros(10), torch.zeros(0)):
        idx, counts = stochastic_round_sparse(m)
        assert idx.numel() == 0 and counts.numel() == 0


def test_same_generator_state_same_draw():
    m = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 0.02
    a = stochastic_round_sparse(m, torch.Generator().manual_seed(9))
    b = stochastic_round_sparse(m, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("hot_rows", [3, 300])
def test_matrix_search_gives_the_same_draw_as_the_flat_one(hot_rows):
    # A matrix is searched row by row for its large elements; the result must be the flat search's, draw for
    # draw (few hot rows: the row path; many: the plain path).
    g = torch.Generator().manual_seed(4)
    m = torch.rand(400, 64, generator=g) * 1e-3
    rows = torch.randperm(400, generator=g)[:hot_rows]
    m[rows, torch.randint(0, 64, (hot_rows,), generator=g)] = 1.7
    a = stochastic_round_sparse(m, torch.Generator().manual_seed(8))
    b = stochastic_round_sparse(m.reshape(-1), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int((a[1] >= 1).sum()) >= hot_rows           # every large element fires at least once


def test_signed_input_and_factor_give_signed_counts_of_the_scaled_magnitude():
    # x of both signs, a negative factor (an update: −learning rate / pulse size): each count is floor or ceil
    # of |factor·x| with the sign of factor·x, and each cell's mean count over repetitions is factor·x.
    n, reps, factor = 300, 3000, -40.0
    g = torch.Generator().manual_seed(11)
    x = torch.logspace(-5, -3, n, dtype=torch.float64) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    x[::60] *= 200.0                                              # a few above τ: the direct path
    target = factor * x
    sums = torch.zeros(n, dtype=torch.float64)
    for _ in range(reps):
        idx, counts = stochastic_round_sparse(x, g, factor)
        c = dense(idx, counts, n)
        assert bool((c * target >= 0).all())                      # the sign of factor·x, or zero
        assert bool(((c.abs() == target.abs().floor()) | (c.abs() == target.abs().floor() + 1)).all())
        sums += c
    frac = target.abs() - target.abs().floor()
    sd = (frac * (1 - frac) / reps).sqrt()
    assert bool(((sums / reps - target).abs() < 5 * sd + 1e-12).all())


def test_factor_draws_as_a_prescaled_input():
    # factor·x and x·factor given as the input are the same request: the same cells fire for the same stream
    # (up to the rounding of the products, which these powers of two avoid).
    x = torch.rand(20_000, generator=torch.Generator().manual_seed(2)) * 0.01 - 0.005
    a = stochastic_round_sparse(x, torch.Generator().manual_seed(6), factor=-4.0)
    b = stochastic_round_sparse(x * -4.0, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].numel() > 0
