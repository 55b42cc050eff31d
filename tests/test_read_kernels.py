"""The crossbar read's fused CPU passes (neurosim._read_numba prologues, the noisy_adc_sum epilogue) against
the torch operations they replace: equal bit for bit, at any thread count, for both variance precisions and odd
shapes; and the path without them."""

from __future__ import annotations

import pytest
import torch

from neurosim.backend import make_generator
from neurosim.crossbar import Crossbar, CrossbarConfig
from neurosim.read_scratch import SCRATCH_LOCK


def rand(shape, seed, lo=-1.0, hi=1.0):
    g = make_generator(seed, "cpu", "read-kernels")
    return torch.rand(shape, generator=g, dtype=torch.float32) * (hi - lo) + lo


def awkward(shape, seed, scale):
    """Inputs that probe every branch: uniform over ±1.5·scale, values on the DAC's rounding midpoints and
    its clipping edges, ±0, ±inf, NaN, huge and subnormal numbers."""
    x = rand(shape, seed, -1.5 * scale, 1.5 * scale)
    flat = x.view(-1)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, scale, -scale, 0.5 / 127 * scale, -1.5 / 127 * scale,
                            2.5 / 255 * scale, float("inf"), -float("inf"), float("nan"), 3e38, -1e-40, 1e-45])
    k = min(flat.numel() // 3, special.numel())
    flat[:k] = special[:k]
    mid = torch.arange(-127, 128, dtype=torch.float32) + 0.5            # half-way between DAC codes
    m = min(flat.numel() - k, mid.numel())
    flat[k:k + m] = mid[:m] / 127 * scale
    return x


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal values, NaN where NaN (bit patterns of zero's sign and of NaN payloads are not values)."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.float(), b.float()
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


def torch_path(monkeypatch):
    monkeypatch.setattr(Crossbar, "_read_kernel", lambda self, x: None)


def bar(spec_factory, rows, cols, precision="bfloat16", read_noise=0.05, **cfg):
    spec = spec_factory(g_min_dtod=0.1, g_max_dtod=0.1, read_noise=read_noise)
    cb = Crossbar(spec, rows, cols, CrossbarConfig(noise_variance_precision=precision, **cfg), seed=3)
    cb.set_weights(rand((rows, cols), 1))
    return cb


CONVERTERS = [dict(dac_bits=8, adc_bits=8, adc_range=12.0), dict(dac_bits=None, adc_bits=6, adc_range=4.0),
              dict(dac_bits=3, adc_bits=None), dict(dac_bits=5, adc_bits=7, input_range="unipolar", input_max=2.5),
              dict(dac_bits=1, adc_bits=4, input_range="unipolar", backward_dac_bits=6, input_max=0.3),
              dict(dac_bits=None, adc_bits=None, input_max=3.0, noise_management=False)]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("conv", range(len(CONVERTERS)))
def test_prologue_operands_equal_the_torch_operations(spec_factory, monkeypatch, precision, conv):
    """x̂ in ADC steps and x̂² (forward), the errors' scale, DAC, layout and squares (transposed): the kernel's
    operands equal the torch composition's, value for value, on inputs that probe rounding midpoints,
    clipping, infinities and NaN."""
    cfg = CONVERTERS[conv]
    cb = bar(spec_factory, 70, 45, precision, tile_rows=32, tile_cols=16, **cfg)   # ragged both ways
    scale = cfg.get("input_max", 1.0)
    x, d = awkward((9, 70), 2, scale), awkward((9, 45), 3, 1e-3)
    d[4] = 0.0                                          # an all-zero error vector: scale clamped to 1e-30
    d[5, :3] = float("nan")
    gsq = cb._variance_operand(9)
    assert cb._read_kernel(x) is not None
    fused = cb._read_operands(x.clone(), gsq), cb._transposed_operands(d.clone(), gsq)
    torch_path(monkeypatch)
    plain = cb._read_operands(x.clone(), gsq), cb._transposed_operands(d.clone(), gsq)
    (xn, sq), (dt, sqt, scale_t, step_t) = fused
    (xn0, sq0), (dt0, sqt0, scale0, step0) = plain
    if precision == "bfloat16":                         # the kernel's bfloat16 squares come per row tile
        assert sq.shape == (cb.n_row_tiles, 9, cb.tile_rows)
        sq = sq.transpose(0, 1).reshape(9, -1)[:, :70]
        assert same(cb._tile_products(fused[0][1], gsq), cb._tile_products(sq0, gsq))   # the same products
    assert same(xn, xn0) and same(sq, sq0) and same(dt, dt0.contiguous()) and same(sqt, sqt0.contiguous())
    assert same(scale_t, step0 * scale0 if step0 != 1.0 else scale0) and step_t == 1.0
    assert sq.dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)


@pytest.mark.parametrize("precision,read_noise", [("float32", 0.05), ("bfloat16", 0.05), ("bfloat16", 0.0)])
@pytest.mark.parametrize("shape", [(785, 256, 256, 256), (129, 10, 256, 256), (300, 70, 128, 32), (7, 5, 3, 2)])
def test_reads_equal_the_torch_path_bit_for_bit(spec_factory, monkeypatch, precision, read_noise, shape):
    """Whole forward and transposed reads (noise, ADC, tile sums, scaling) through the kernels equal the torch
    path's, bit for bit, and leave the read stream where it leaves it."""
    rows, cols, tr, tc = shape
    cb = bar(spec_factory, rows, cols, precision, read_noise, tile_rows=tr, tile_cols=tc, dac_bits=8, adc_bits=8,
             adc_range=12.0)
    x, d = rand((13, rows), 4, 0.0, 1.0), rand((13, cols), 5, -1e-2, 1e-2)
    start = cb.read_stream.get_state()
    fused = cb.read(x), cb.read_transposed(d), cb.read_stream.get_state()
    torch_path(monkeypatch)
    cb.read_stream.set_state(start)
    plain = cb.read(x), cb.read_transposed(d), cb.read_stream.get_state()
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1]) and torch.equal(fused[2], plain[2])


def test_own_input_may_be_overwritten_and_others_are_not(spec_factory):
    cb = bar(spec_factory, 40, 8, dac_bits=4, adc_bits=6)
    x = rand((5, 40), 6, -2.0, 2.0)
    kept = x.clone()
    y = cb.read(x)
    assert torch.equal(x, kept)                        # not the caller's temporary: untouched
    cb.read_stream.manual_seed(0)
    a = cb.read(x.clone(), own=True)
    cb.read_stream.manual_seed(0)
    assert torch.equal(a, cb.read(x)) and y.shape == a.shape


def test_prologue_is_skipped_where_it_does_not_apply(spec_factory):
    """Autograd, float64 reads (DGC) and non-float32 inputs take the torch operations."""
    cb = bar(spec_factory, 20, 6)
    x = rand((3, 20), 7)
    assert cb._read_kernel(x) is not None
    assert cb._read_kernel(x.double()) is None
    assert cb._read_kernel(x.clone().requires_grad_()) is None
    with torch.no_grad():
        assert cb._read_kernel(x.clone().requires_grad_()) is not None
    cb.read_dtype = torch.float64
    assert cb._read_kernel(x) is None


def test_reads_are_the_same_at_any_thread_count(spec_factory):
    """1 and 2 threads (the epilogue runs in parallel from 2^14 numbers: 3 tiles × 64 × 130 here)."""
    saved = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            cb = bar(spec_factory, 600, 130, tile_rows=256, tile_cols=128, dac_bits=8, adc_bits=8)
            outs.append((cb.read(rand((64, 600), 8, 0.0, 1.0)), cb.read_transposed(rand((64, 130), 9))))
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# --- the epilogue ------------------------------------------------------------------------------------------------

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("shape,keep", [((1, 64, 129), 129), ((1, 64, 10), 10), ((3, 7, 13), 13), ((2, 5, 9), 6),
                                        ((1, 1, 3), 3), ((4, 33, 1), 1), ((2, 300, 600), 600), ((1, 3, 5), 0)])
@pytest.mark.parametrize("var_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 0.37, "rows"])
@pytest.mark.parametrize("counter", [0, 3, 2**32 - 1])
def test_epilogue_equals_the_torch_composition_on_odd_shapes(shape, keep, var_dtype, scale, counter):
    """The epilogue draws whole blocks at once and uses the words it needs: the same numbers as the torch
    composition (noise, ADC, tile sum, scaling) at starts inside a block, at the 32-bit carry of the block
    counter, on rows of any length, with keep < C, with one scale or one a sample."""
    from neurosim.random_streams import PhiloxStream, noisy_adc_sum, noisy_adc_sum_torch
    g = torch.Generator().manual_seed(11)
    part = torch.randn(shape, generator=g) * 20
    var = (torch.rand(shape, generator=g) * 3).to(var_dtype)
    if part.numel() > 20:
        part.view(-1)[::5] = float("nan")
    if scale == "rows":
        scale = torch.rand(shape[1], 1, generator=g) * 1e-3
    for levels in (None, 31.0):
        a = PhiloxStream.from_key(0x1234_5678_9ABC, counter)
        b = PhiloxStream.from_key(0x1234_5678_9ABC, counter, kernel="torch")
        if counter == 3:                                    # a second call: the first block is taken
            a._take(1), b._take(1)
        got = noisy_adc_sum(part, var, 0.8, levels, keep, a, scale)
        want = noisy_adc_sum_torch(part, var, 0.8, levels, keep, b, scale)
        assert got.shape == (shape[1], keep)
        assert torch.equal(_bits(got), _bits(want)) and a.counter == b.counter


def test_epilogue_threads_equal_and_scale_refusals():
    from neurosim.random_streams import PhiloxStream, noisy_adc_sum
    g = torch.Generator().manual_seed(12)
    saved = torch.get_num_threads()
    try:
        for shape in ((3, 200, 129), (3, 2001, 10)):     # long rows, and short rows drawn a piece at once
            part, var = torch.randn(shape, generator=g) * 10, torch.rand(shape, generator=g)
            out = []
            for n in (1, 2):
                torch.set_num_threads(n)
                out.append(noisy_adc_sum(part, var, 0.5, 127.0, shape[2], PhiloxStream(1, "cpu", "t"), 0.25))
            assert torch.equal(out[0], out[1])
    finally:
        torch.set_num_threads(saved)
    part, var = torch.randn(3, 200, 129, generator=g), torch.rand(3, 200, 129, generator=g)
    with pytest.raises(TypeError, match="one number a sample"):
        noisy_adc_sum(part, var, 0.5, 127.0, 129, PhiloxStream(1, "cpu", "t"), torch.ones(199, 1))
    with pytest.raises(TypeError, match="one number a sample"):
        noisy_adc_sum(part, var, 0.5, 127.0, 129, PhiloxStream(1, "cpu", "t"), torch.ones(200, 1).double())


def test_reads_without_numba_take_the_torch_path(spec_factory, monkeypatch):
    """No numba: the prologues and the epilogue are torch operations (add_read_noise, convert), which draw the
    same numbers; torch's square root and fused multiply-add may move a sum by one ulp, so a value on a
    rounding boundary by one ADC code."""
    import neurosim.crossbar as crossbar_module
    cb = bar(spec_factory, 300, 70, tile_rows=128, tile_cols=32, dac_bits=8, adc_bits=8)
    x, d = rand((9, 300), 13, 0.0, 1.0), rand((9, 70), 14)
    start = cb.read_stream.get_state()
    fused = cb.read(x), cb.read_transposed(d)
    end = cb.read_stream.get_state()
    monkeypatch.setattr(crossbar_module, "_numba_kernels", lambda: None)
    cb.read_stream.set_state(start)
    cb.read_stream._kernel = "torch"
    assert cb._read_kernel(x) is None
    plain = cb.read(x), cb.read_transposed(d)
    code_f = cb.adc_step(8) * cb.config.input_max * cb.config.w_max
    code_t = cb.adc_step(8) * d.abs().amax(1, keepdim=True) * cb.config.w_max
    assert float(((fused[0] - plain[0]).abs() / code_f).max()) <= 1 + 1e-4
    assert float(((fused[1] - plain[1]).abs() / code_t).max()) <= 1 + 1e-4
    assert torch.equal(cb.read_stream.get_state(), end)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("conv", range(len(CONVERTERS)))
def test_an_extra_row_read_equals_the_read_of_the_appended_column(spec_factory, monkeypatch, precision, conv):
    """``read(x, extra=v)`` (the bias row's input taken by the prologue) equals the read of x with a column of
    v appended, bit for bit, by the kernel and by the torch path, including the bfloat16 squares' tile layout
    (70 rows in tiles of 32: the extra row lands in the ragged last tile)."""
    cfg = CONVERTERS[conv]
    cb = bar(spec_factory, 70, 45, precision, tile_rows=32, tile_cols=16, **cfg)
    v = cfg.get("input_max", 1.0)
    x = awkward((9, 69), 11, v)
    appended = torch.cat([x, torch.full((9, 1), v)], 1)
    start = cb.read_stream.get_state()
    results = []
    for kernel in (True, False):
        if not kernel:
            torch_path(monkeypatch)
        for args in ((appended.clone(), None), (x.clone(), v)):
            cb.read_stream.set_state(start)
            results.append(cb.read(args[0], extra=args[1]))
    assert all(same(r, results[0]) for r in results[1:])
    with pytest.raises(RuntimeError):   # a width that is not rows − 1 fails as a wrong width does without it
        cb.read(x[:, :60], extra=v)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(785, 256, 256, 256), (129, 10, 256, 256), (512, 70, 128, 32), (7, 5, 3, 2)])
def test_reused_read_temporaries_give_the_reads_of_fresh_ones(spec_factory, monkeypatch, precision, shape):
    """The fused reads' reused temporaries (neurosim.read_scratch) against fresh ones, bit for bit, over a run
    of reads of several batch sizes (each shape's temporaries reused, others made meanwhile), forward with and
    without the bias row's extra input, and transposed; the outputs already returned are not touched by later
    reads, a copied crossbar makes its own temporaries, and a read that finds them busy takes fresh ones."""
    import copy

    rows, cols, tr, tc = shape
    seq = [(13, None), (13, 1.0), (4, None), (13, None), (4, 1.0), (13, 1.0)]

    def run(cb):
        outs = []
        for k, (batch, extra) in enumerate(seq):
            x = rand((batch, rows - (extra is not None)), 10 + k, 0.0, 1.0)
            outs.append(cb.read(x, extra=extra))
            outs.append(cb.read_transposed(rand((batch, cols), 30 + k, -1e-2, 1e-2)))
        return outs, [o.clone() for o in outs], cb.read_stream.get_state()

    cb = bar(spec_factory, rows, cols, precision, tile_rows=tr, tile_cols=tc, dac_bits=8, adc_bits=8)
    copied = copy.deepcopy(cb)
    reused, snapshot, state = run(cb)
    assert cb._scratch is not None and len(cb._scratch) == 4           # (read, transposed) × 2 batch sizes
    assert all(torch.equal(a, b) for a, b in zip(reused, snapshot, strict=True))   # not overwritten since
    monkeypatch.setattr(Crossbar, "_scratch_applies", lambda self, x: False)
    fresh, _, fresh_state = run(copied)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(reused, fresh, strict=True)) and torch.equal(state, fresh_state)
    again = copy.deepcopy(cb)                                           # a copy of used temporaries
    assert again._scratch is not None
    cb.read_stream.set_state(state)
    mine = cb.read(rand((13, rows), 50, 0.0, 1.0))
    theirs = again.read(rand((13, rows), 50, 0.0, 1.0))
    assert torch.equal(mine, theirs)
    assert again._scratch[("read", 13, precision == "bfloat16")].owner == id(again)   # made anew
    cb.read_stream.set_state(state)
    used = [(k, s.buffers[0].data_ptr()) for k, s in cb._scratch.items()]
    with SCRATCH_LOCK:                                                  # (as during another thread's read)
        busy = cb.read(rand((13, rows), 50, 0.0, 1.0))
    assert torch.equal(busy, mine) and [(k, s.buffers[0].data_ptr()) for k, s in cb._scratch.items()] == used


@pytest.mark.parametrize("low", [False, True])
def test_read_temporaries_are_kept_only_up_to_their_size_limit(spec_factory, monkeypatch, low):
    """Reads whose temporaries would take more than read_scratch.MAX_BYTES make fresh ones (a wide layer's
    kept temporaries would add to a network's peak memory): the same outputs, nothing kept for that shape;
    the sizes the limit is checked against are those of the buffers."""
    import neurosim.crossbar as crossbar_module
    from neurosim.random_streams import _numba_kernels
    from neurosim.read_scratch import ForwardScratch, TransposedScratch, forward_bytes, transposed_bytes

    _numba_kernels()
    for batch in (4, 13):
        made = ForwardScratch(0, batch, 785, 256, 4, 256, low), TransposedScratch(0, batch, 785, 256, 1, low)
        sizes = [sum(t.numel() * t.element_size() for t in s.buffers) for s in made]
        assert sizes == [forward_bytes(batch, 785, 256, 4, 256, low), transposed_bytes(batch, 785, 256, 1, low)]
    limit = forward_bytes(8, 785, 256, 4, 256, low)                      # between batch 4's and batch 13's
    monkeypatch.setattr(crossbar_module, "MAX_BYTES", limit)
    cb = bar(spec_factory, 785, 256, "bfloat16" if low else "float32", dac_bits=8, adc_bits=8)
    fresh = bar(spec_factory, 785, 256, "bfloat16" if low else "float32", dac_bits=8, adc_bits=8)
    x4, x13 = rand((4, 785), 1, 0.0, 1.0), rand((13, 785), 2, 0.0, 1.0)
    kept = [cb.read(x4), cb.read(x13), cb.read(x4)]
    assert set(cb._scratch) == {("read", 4, low)}
    monkeypatch.setattr(Crossbar, "_scratch_applies", lambda self, x: False)
    assert all(torch.equal(a, b) for a, b in zip(kept, [fresh.read(x4), fresh.read(x13), fresh.read(x4)],
                                                 strict=True))
