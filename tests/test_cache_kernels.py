"""The read cache's numba passes (neurosim._cache_numba) against the torch composition they replace.

Rebuild: bit for bit without drift; with drift within the stated bound (the kernel's ln/exp are correctly
rounded, torch's within 1 ulp). Patch after a sparse write: bit for bit the torch arithmetic, and what a rebuild
computes for a freshly written cell. Same bits at any thread count; float64 and no-numba crossbars keep torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neurosim.crossbar import Crossbar, CrossbarConfig
from tests.conftest import make_spec

EPS = 2.0 ** -23


def rand(shape, seed, lo=-1.0, hi=1.0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)


def _pair(spec, shape, mapping="differential", torch_path=False, **cfg):
    cb = Crossbar(spec, *shape, CrossbarConfig(mapping=mapping, tile_rows=96, **cfg), seed=4, name="fc")
    cb.set_weights(rand(shape, 1, -0.8, 0.8).float())
    if torch_path:
        cb._cache_kernel = lambda: False
    return cb


def _spec(drift: bool, stuck: bool = False, spread: bool = True):
    kw = {"drift_nu": 0.05, "drift_nu_dtod": 0.3 if spread else 0.0} if drift else {}
    if stuck:
        kw.update(stuck_at_gmin=0.03, stuck_at_gmax=0.03)
    return make_spec(states=65, g_min_dtod=0.1, g_max_dtod=0.1, c2c=0.02, read_noise=0.03, **kw)


def _twins(spec, shape=(200, 40), **kw):
    return _pair(spec, shape, **kw), _pair(spec, shape, torch_path=True, **kw)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("mapping", ["differential", "reference"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_rebuild_without_drift_equals_torch_bit_for_bit(mapping, precision):
    fused, ref = _twins(_spec(False, stuck=True), mapping=mapping, noise_variance_precision=precision)
    for cb in (fused, ref):
        cb._read_tensors()
        cb._variance_operand()
    assert fused._cache_np is not None and ref._cache_np is None       # each took its own path
    for a, b in zip(fused._cache, ref._cache, strict=True):
        assert torch.equal(_bits(a), _bits(b))
    assert (fused._cache_low is None) == (precision == "float32")
    if fused._cache_low is not None:
        assert torch.equal(_bits(fused._cache_low), _bits(ref._cache_low))
    assert not fused._cache[0][fused.in_features:].any()                # padded rows of the ragged tile


@pytest.mark.parametrize("mapping", ["differential", "reference"])
@pytest.mark.parametrize("spread,stuck", [(True, True), (False, False)])
def test_drifting_rebuild_is_within_its_bound_of_torch(mapping, spread, stuck):
    """Per cell, with p = ν·ln(max(age, t0)/t0) (the larger of the pair's): each drifted conductance within
    e = (2 + 2|p|)·eps relative of torch's (torch's ln and exp within 1 ulp, the kernel's within ½, and an ulp of
    p moves e^−p by |p| ulp), so ŵ within e·(|G⁺| + |G⁻|)/(k·w_max) + eps·|ŵ| and ΣG² within (2e + eps)
    relative (measured: at most 0.65 of either bound); the bfloat16 copy is the kernel's own ΣG² rounded (so
    within one bfloat16 step of torch's). Clock at several ages, the pairs' times equal and (after one array's
    write) not equal."""
    fused, ref = _twins(_spec(True, stuck, spread), mapping=mapping, noise_variance_precision="bfloat16")
    worst, differs = 0.0, False
    for step, dt in enumerate((10.0, 3e3, 7e6)):
        if step == 2 and mapping == "differential":   # one array of the pair written alone: times differ
            for cb in (fused, ref):
                n = torch.zeros(cb.padded_shape)
                n[:50, :7] = 3.0
                cb.plus.program(n)
        for cb in (fused, ref):
            cb.advance(dt)
            cb._read_tensors()
            cb._variance_operand()
        arrays = ref._arrays()
        g = [a.conductance().double() for a in arrays]
        p = torch.stack([a.drift_nu.double().expand(a.shape) * torch.log(
            ((a.time_s - a.t_programmed.double()) / a.spec.drift_t0).clamp(min=1.0)) for a in arrays]).amax(0)
        e = (2 + 2 * p) * EPS
        denom = ref.k * ref.config.w_max
        size = (g[0].abs() + (g[1].abs() if len(g) == 2 else ref.g_mid)) / denom
        rows = fused.in_features
        w_ref, q_ref = (t.double()[:rows] for t in ref._cache)
        dw = (fused._cache[0].double()[:rows] - w_ref).abs()
        dq = (fused._cache[1].double()[:rows] - q_ref).abs()
        worst = max(worst, float((dw / (e[:rows] * size[:rows] + EPS * w_ref.abs())).max()),
                    float((dq / ((2 * e[:rows] + EPS) * q_ref)).max()))
        assert torch.equal(_bits(fused._cache_low), _bits(fused._cache[1].to(torch.bfloat16)))
        assert not fused._cache[1][rows:].any() and not fused._cache[0][rows:].any()
        differs = differs or float(dq.max()) > 0
    assert worst <= 1.0
    assert differs or not spread   # with a spread of ν, some cell's last bit differs: both computed drift


@pytest.mark.parametrize("mapping,pulse_kernel", [("differential", True), ("differential", False),
                                                  ("reference", True)])
@pytest.mark.parametrize("drift", [False, True])
def test_patch_equals_torch_and_a_rebuild_bit_for_bit(mapping, pulse_kernel, drift, monkeypatch):
    """Training steps through the kernel patch (inside the pulse kernel of a pair, or the patch kernel after a
    torch pulse pass or a single device's write) and through the torch patch: the written cells hold the same
    bits (all cells without drift, where the rebuilds agree too)."""
    import neurosim.device as device_module

    if not pulse_kernel:
        monkeypatch.setattr(device_module, "_fused", lambda joined: False)
    fused, ref = _twins(_spec(drift, stuck=True), mapping=mapping, noise_variance_precision="bfloat16",
                        drift_tolerance=1e-2)
    gen = torch.Generator().manual_seed(5)
    for cb in (fused, ref):
        cb.advance(50.0)
        cb._read_tensors()
        cb._variance_operand()
    separate = []
    refresh = fused._refresh_cells
    fused._refresh_cells = lambda *args: (separate.append(1), refresh(*args))
    for step in range(4):
        cells = torch.randperm(200 * 40, generator=gen)[:60]
        dw = torch.zeros(200, 40)
        dw.view(-1)[cells] = rand((60,), 10 + step, -0.3, 0.3).float()
        for cb in (fused, ref):
            cb.advance(1e-3)
            cb.program_delta(dw)
            assert cb._cache_key == cb._state_key()                     # patched, not rebuilt
        assert torch.equal(fused.plus.g, ref.plus.g)
        flat = torch.unique(cells // 40 * fused.padded_shape[1] + cells % 40)
        for a, b in zip((*fused._cache, fused._cache_low), (*ref._cache, ref._cache_low), strict=True):
            a, b = a.view(-1), b.view(-1)
            assert torch.equal(_bits(a[flat]), _bits(b[flat]))
            if not drift:
                assert torch.equal(_bits(a), _bits(b))
    assert (len(separate) == 0) == (mapping == "differential" and pulse_kernel)   # where each patch ran


def test_patched_fresh_cells_equal_a_rebuild_at_the_same_clock():
    """A drifting array written at the current clock: the patch puts factor 1 into the written cells, and a
    rebuild at that clock computes exactly that for them (ln 1 = 0, exp 0 = 1), the other cells unchanged."""
    cb = _pair(_spec(True), (200, 40), drift_tolerance=1e-2)
    cb.advance(100.0)
    cb._read_tensors()
    dw = torch.zeros(200, 40)
    dw.view(-1)[torch.randperm(8000, generator=torch.Generator().manual_seed(2))[:150]] = 0.2
    cb.program_delta(dw)                                  # no advance: anchor == clock
    patched = [t.clone() for t in cb._cache]
    cb._cache_key = None
    rebuilt = cb._read_tensors()
    for a, b in zip(patched, rebuilt, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_thread_count_does_not_change_the_rebuild():
    from neurosim import _cache_numba

    cb = _pair(_spec(True), (700, 130), noise_variance_precision="bfloat16")
    cb.advance(1e4)
    arrays = cb._arrays()
    n = cb.in_features * cb.padded_shape[1]
    assert n > 4 * _cache_numba.PIECE
    outs = []
    for parallel in (False, True):
        out = (np.zeros(cb.plus.g.numel(), np.float32), np.zeros(cb.plus.g.numel(), np.float32),
               np.zeros(cb.plus.g.numel(), np.int16))
        _cache_numba.rebuild(n, tuple(a.g.view(-1).numpy() for a in arrays),
                             tuple(a.t_programmed.view(-1).numpy() for a in arrays),
                             (cb.plus.time_s, cb.minus.time_s), tuple(a.numpy_views()[2] for a in arrays),
                             cb.spec.drift_t0, cb.g_mid, cb.k * cb.config.w_max, out, parallel)
        outs.append(out)
    for a, b in zip(*outs, strict=True):
        assert np.array_equal(a.view(np.int32 if a.dtype == np.float32 else np.int16),
                              b.view(np.int32 if b.dtype == np.float32 else np.int16))
    fused = cb._read_tensors()                                          # the crossbar's own call: the same
    assert np.array_equal(fused[0].view(-1).numpy(), outs[0][0])


def test_buffers_are_reused_unless_someone_holds_them():
    cb = _pair(_spec(True), (200, 40), noise_variance_precision="bfloat16", drift_tolerance=0.0)
    cb.advance(10.0)
    w0 = cb._read_tensors()[0].data_ptr()
    cb.advance(10.0)
    assert cb._read_tensors()[0].data_ptr() == w0                       # nobody held it: rewritten in place
    cb.read(torch.rand(300, 200))                                       # (its per-tile views, remembered)
    cb.advance(10.0)
    assert cb._read_tensors()[0].data_ptr() == w0 and cb._cache_low is not None
    low0 = cb._cache_low.data_ptr()
    cb.read(torch.rand(300, 200))
    cb.advance(10.0)
    assert cb._read_tensors()[0].data_ptr() == w0 and cb._cache_low.data_ptr() == low0   # the crossbar's own
    held = cb._read_tensors()[0]
    view = cb._cache_low[:5]
    before, before_view = held.clone(), view.clone()
    cb.advance(1e5)
    w_new = cb._read_tensors()[0]
    assert w_new.data_ptr() != held.data_ptr()                          # a fresh buffer for the rebuild
    assert torch.equal(held, before) and torch.equal(view, before_view)
    assert not torch.equal(w_new, before)                               # (the clock did move the weights)


def test_float64_and_no_numba_crossbars_keep_the_torch_path(monkeypatch):
    import neurosim.crossbar as crossbar_module

    spec = _spec(True, stuck=True)
    cb64 = Crossbar(spec, 50, 9, CrossbarConfig(), seed=0, dtype=torch.float64)
    assert not cb64._cache_kernel()
    cb64.advance(30.0)
    w_hat = cb64._read_tensors()[0]
    assert w_hat.dtype == torch.float64 and cb64._cache_np is None
    torch.testing.assert_close(w_hat[:50, :9], cb64.weights() / cb64.config.w_max, rtol=0, atol=1e-15)
    dw = rand((120, 30), 3, -0.2, 0.2).float()
    dw = dw * (torch.rand(120, 30, generator=torch.Generator().manual_seed(1)) < 0.03)

    def run(cb):
        cb._read_tensors()
        cb.program_delta(dw)
        assert cb._cache_key == cb._state_key()
        return cb

    fused = run(_pair(_spec(False), (120, 30)))
    monkeypatch.setattr(crossbar_module, "_numba_kernels", lambda: None)
    plain = _pair(_spec(False), (120, 30))
    assert not plain._cache_kernel()
    run(plain)
    monkeypatch.undo()
    assert plain._cache_np is None and fused._cache_np is not None
    for a, b in zip(fused._cache, plain._cache, strict=True):
        assert torch.equal(a, b)


def test_a_copied_crossbar_patches_its_own_cache():
    """The numpy views are remembered by data pointer: a deep copy's writes reach the copy's cache (equal to
    its rebuild) and leave the original's alone."""
    import copy

    cb = _pair(_spec(False), (120, 30), noise_variance_precision="bfloat16")
    cb._read_tensors()
    cb._variance_operand()
    before = [t.clone() for t in (*cb._cache, cb._cache_low)]
    twin = copy.deepcopy(cb)
    dw = torch.zeros(120, 30)
    dw.view(-1)[torch.randperm(3600, generator=torch.Generator().manual_seed(4))[:80]] = 0.3
    twin.program_delta(dw)
    assert twin._cache_key == twin._state_key()
    patched = [t.clone() for t in (*twin._cache, twin._cache_low)]
    assert not torch.equal(patched[0], before[0])
    twin._cache_key = None
    twin._read_tensors()
    for a, b in zip(patched, (*twin._cache, twin._cache_low), strict=True):
        assert torch.equal(_bits(a), _bits(b))
    for a, b in zip(before, (*cb._cache, cb._cache_low), strict=True):
        assert torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_pulse_pass_patches_only_the_cache_tensors_that_exist(precision):
    """Without a bfloat16 copy (float32 variance products) the pulse pass must not write one: its placeholder
    stays untouched (a kernel variable once shadowed the flag and wrote bfloat16 bits past the placeholder)."""
    from neurosim import _cache_numba

    before = (_cache_numba._NONE16.copy(), _cache_numba._NONE32.copy())
    cb = _pair(_spec(False), (120, 30), noise_variance_precision=precision)
    cb._read_tensors()
    cb._variance_operand()
    dw = torch.zeros(120, 30)
    dw.view(-1)[torch.arange(0, 3600, 45)] = 0.3          # cell 0 included: a stray write would hit the placeholder
    cb.program_delta(dw)
    assert (cb._cache_low is None) == (precision == "float32")
    assert np.array_equal(_cache_numba._NONE16, before[0]) and np.array_equal(_cache_numba._NONE32, before[1])
    patched = [t.clone() for t in cb._cache if t is not None]
    cb._cache_key = None
    for a, b in zip(patched, cb._read_tensors(), strict=True):
        assert torch.equal(_bits(a), _bits(b))
