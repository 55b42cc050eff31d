"""Sparse stochastic rounding has the distribution of one uniform number per cell: the candidate search (torch
generators, CUDA) and the fused kernel of a CPU PhiloxStream alike; the kernel equals its torch oracle."""

import math

import numpy as np
import pytest
import torch

from neurosim.random_streams import PhiloxStream
from neurosim.sampling import rounding_blocks, rounding_uniforms, stochastic_round_dense, stochastic_round_sparse

KINDS = ["torch", "philox"]   # the candidate search; the fused per-cell kernel


def gen(kind, seed):
    return torch.Generator().manual_seed(seed) if kind == "torch" else PhiloxStream(seed, "cpu", "test")


def dense(idx, counts, n):
    return torch.zeros(n, dtype=counts.dtype).index_copy_(0, idx, counts)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_counts_are_floor_or_ceil_once_per_cell_and_zero_cells_never_fire(seed, kind):
    m = torch.rand(50_000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.01
    m[::7] = 0.0
    m[3::1000] = torch.linspace(1.0, 5.5, 50, dtype=torch.float64)
    m[::7] = 0.0
    idx, counts = stochastic_round_sparse(m, gen(kind, seed))
    assert idx.unique().numel() == idx.numel()                     # each cell once
    assert bool((counts > 0).all())
    c = dense(idx, counts, m.numel())
    assert bool(((c == m.floor()) | (c == m.floor() + 1)).all())
    assert not bool(c[::7].any())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [1e-4, 3e-3, 0.05, 0.3, 0.9])
def test_total_count_is_binomial(value, kind):
    # Every cell at the same m: the number of fired cells is Binomial(n, m); 5 standard deviations.
    n = 200_000
    _, counts = stochastic_round_sparse(torch.full((n,), value, dtype=torch.float64), gen(kind, 3))
    assert abs(float(counts.sum()) - n * value) < 5 * math.sqrt(n * value * (1 - value))


@pytest.mark.parametrize("kind", KINDS)
def test_each_cell_fires_with_its_own_probability_independently(kind):
    # 400 cells with probabilities spread over two decades plus a few above one pulse, 4000 repetitions.
    n, reps = 400, 4000
    g = gen(kind, 5)
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


@pytest.mark.parametrize("kind", [None, *KINDS])
def test_all_zero_and_empty_inputs(kind):
    for m in (torch.zeros(10), torch.zeros(0)):
        idx, counts = stochastic_round_sparse(m, None if kind is None else gen(kind, 0))
        assert idx.numel() == 0 and counts.numel() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_same_generator_state_same_draw(kind):
    m = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 0.02
    a = stochastic_round_sparse(m, gen(kind, 9))
    b = stochastic_round_sparse(m, gen(kind, 9))
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


@pytest.mark.parametrize("kind", KINDS)
def test_signed_input_and_factor_give_signed_counts_of_the_scaled_magnitude(kind):
    # x of both signs, a negative factor (an update: −learning rate / pulse size): each count is floor or ceil
    # of |factor·x| with the sign of factor·x, and each cell's mean count over repetitions is factor·x.
    n, reps, factor = 300, 3000, -40.0
    g = gen(kind, 11)
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


@pytest.mark.parametrize("kind", KINDS)
def test_factor_draws_as_a_prescaled_input(kind):
    # factor·x and x·factor given as the input are the same request: the same cells fire for the same stream
    # (up to the rounding of the products, which these powers of two avoid).
    x = torch.rand(20_000, generator=torch.Generator().manual_seed(2)) * 0.01 - 0.005
    a = stochastic_round_sparse(x, gen(kind, 6), factor=-4.0)
    b = stochastic_round_sparse(x * -4.0, gen(kind, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].numel() > 0


# --- the fused kernel of a CPU PhiloxStream against its torch oracle -------------------------------------------

def _request(n, dtype, seed):
    """Gradient-like values of both signs, a few large ones (counts clamped by the limits), zeros, -0.0."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) - 0.5).mul_(0.02).to(dtype)
    x[::97] *= 150.0
    x[5::1000] = 1e4
    x[6::1000] = -1e4
    x[::13] = 0.0
    x[7::1000] = -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (4,), (7, 3), (785, 37), (3, 40_001)])
@pytest.mark.parametrize("factor,limits", [(1.0, None), (-30.0, (-7, 9)), (0.37, (-1000, 1000))])
def test_kernel_equals_the_torch_oracle_bit_for_bit(dtype, shape, factor, limits):
    # Sizes not multiples of 4 or of the kernel's pieces (8192 cells) and groups (32), several pieces, the
    # parallel path (>= 2^14 cells): the same cells, counts and stream position as the torch composition.
    x = _request(math.prod(shape), dtype, sum(shape)).reshape(shape)
    fast = PhiloxStream(3, "cpu", "k")
    slow = PhiloxStream(3, "cpu", "k", kernel="torch")
    assert fast.kernel == "numba"
    for _ in range(2):   # the second call starts mid-stream
        a = stochastic_round_sparse(x, fast, factor, limits)
        b = stochastic_round_dense(x, slow, factor, limits)
        assert a[0].dtype == torch.long and a[1].dtype == dtype
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert fast.counter == slow.counter
    assert fast.counter == 2 * sum(rounding_blocks(x.numel()))  # exactly ceil(N/16) + ceil(N/8) blocks a call
    if limits is not None:
        assert bool((a[1] >= limits[0]).all() and (a[1] <= limits[1]).all())
    assert bool((a[0][1:] > a[0][:-1]).all())                   # ascending


def test_kernel_oracle_is_the_rule_it_states():
    # The oracle itself, element by element in plain Python from the same uniforms.
    x = _request(1001, torch.float32, 4)
    u = rounding_uniforms(PhiloxStream(8, "cpu", "o"), 1001)
    idx, counts = stochastic_round_dense(x, PhiloxStream(8, "cpu", "o"), -3.0, (-5, 6))
    want = {}
    for i, (xi, ui) in enumerate(zip(x.tolist(), u.tolist(), strict=True)):
        v = float(np.float32(np.float32(abs(xi)) * np.float32(3.0)) + np.float32(ui))
        if v >= 1.0:
            want[i] = min(6.0, max(-5.0, math.copysign(math.floor(v), -xi)))
    assert dict(zip(idx.tolist(), counts.tolist(), strict=True)) == want and len(want) > 20


def test_rounding_uniforms_are_the_words_they_state_and_uniform():
    """u_i = (byte i % 4 of word i // 4 of the first call · 2^16 + half i % 2 of word i // 2 of the second)
    · 2^-24, read in plain Python from the stream's words; the stream ends where both calls end; and the
    numbers are uniform on [0, 1): mean and variance within 5 standard errors of 1/2 and 1/12 (n = 200,003)."""
    n = 200_003
    u = rounding_uniforms(PhiloxStream(9, "cpu", "u"), n)
    stream = PhiloxStream(9, "cpu", "u")
    high, low = rounding_blocks(n)
    hi, lo = stream.words(4 * high).tolist(), stream.words(4 * low).tolist()
    for i in [*range(40), *range(n - 40, n), 12_345, 77_777]:
        want = (((hi[i // 4] >> (8 * (i % 4))) & 0xFF) * 65536 + ((lo[i // 2] >> (16 * (i % 2))) & 0xFFFF)) / 2**24
        assert u[i].item() == want
    first = PhiloxStream(9, "cpu", "u")
    rounding_uniforms(first, n)
    assert first.counter == stream.counter == high + low
    assert u.dtype == torch.float32 and bool((u >= 0).all() and (u < 1).all())
    assert bool(torch.equal(u * 2**24, (u * 2**24).round()))          # the 2^24 grid
    ud = u.double()
    assert abs(ud.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(ud.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)   # Var of (u − 1/2)² is 1/180


def test_kernel_same_numbers_at_one_and_two_threads():
    from neurosim import _update_numba
    x = _request(100_003, torch.float32, 5).numpy()
    key = PhiloxStream(1, "cpu", "t").key
    second = rounding_blocks(x.size)[0]   # the low halves' call starts after the high bytes'
    serial = _update_numba.round_sparse(x, 0.8, True, (-4.0, 4.0), 0, second, key & 0xFFFFFFFF, key >> 32, False)
    parallel = _update_numba.round_sparse(x, 0.8, True, (-4.0, 4.0), 0, second, key & 0xFFFFFFFF, key >> 32, True)
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])
    saved = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(stochastic_round_sparse(torch.from_numpy(x), PhiloxStream(1, "cpu", "t"), -0.8, (-4, 4)))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert np.array_equal(out[0][0].numpy(), serial[0]) and np.array_equal(out[0][1].numpy(), serial[1])


def test_kernel_nan_fires_nothing_and_infinity_fires_the_limit():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5, 2.0])
    idx, counts = stochastic_round_sparse(x, PhiloxStream(0, "cpu", "n"), 1.0, (-3, 5))
    got = dict(zip(idx.tolist(), counts.tolist(), strict=True))
    assert 0 not in got and got[1] == 5.0 and got[2] == -3.0 and got[4] in (2.0, 3.0)


def test_kernel_zero_factor_and_empty_requests_still_take_their_blocks():
    s = PhiloxStream(0, "cpu", "z")
    idx, _ = stochastic_round_sparse(torch.ones(10), s, 0.0)
    assert idx.numel() == 0 and s.counter == 3
    idx, _ = stochastic_round_sparse(torch.zeros(0), s)
    assert idx.numel() == 0 and s.counter == 3


def test_many_requests_mix_the_two_paths_in_order():
    # A network's layers: PhiloxStreams round per cell, a torch generator by candidates; each as a lone call.
    from neurosim.sampling import stochastic_round_sparse_many
    xs = [_request(n, torch.float32, n) for n in (5000, 300, 70)]
    gens = [PhiloxStream(1, "cpu", "a"), torch.Generator().manual_seed(2), PhiloxStream(1, "cpu", "c")]
    many = stochastic_round_sparse_many(xs, gens, [-2.0, 3.0, 0.5], [(-9, 9), None, (-2, 2)])
    alone = [stochastic_round_sparse(xs[0], PhiloxStream(1, "cpu", "a"), -2.0, (-9, 9)),
             stochastic_round_sparse(xs[1], torch.Generator().manual_seed(2), 3.0),
             stochastic_round_sparse(xs[2], PhiloxStream(1, "cpu", "c"), 0.5, (-2, 2))]
    for (a, b), (c, d) in zip(many, alone, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_requests_round_in_float32(dtype):
    # Zero cells never fire (a bfloat16 uniform of 0.999 would round to 1), the rest as the float32 request.
    x = _request(50_000, torch.float32, 9).to(dtype)
    a = stochastic_round_sparse(x, PhiloxStream(2, "cpu", "h"), -5.0, (-8, 8))
    b = stochastic_round_sparse(x.float(), PhiloxStream(2, "cpu", "h"), -5.0, (-8, 8))
    c = stochastic_round_dense(x, PhiloxStream(2, "cpu", "h", kernel="torch"), -5.0, (-8, 8))
    assert a[1].dtype == dtype and torch.equal(a[0], b[0]) and torch.equal(a[1].float(), b[1])
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert not bool((x.index_select(0, a[0]) == 0).any())
