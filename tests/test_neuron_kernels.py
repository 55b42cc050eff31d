"""The fused CPU pass of the neuron circuits (neurosim._activation_numba.circuit) against the torch composition
it stands in for (``ActivationUnit._circuit``'s operations, kept for other devices, dtypes and autograd): the
same outputs bit for bit for every circuit option, the same stream positions afterwards, the same numbers at
any thread count, and the fallbacks (float64, autograd, no numba) where the pass does not apply."""

from __future__ import annotations

import itertools

import pytest
import torch

import neurosim.random_streams as streams
from neurosim.activation import ActivationConfig, ActivationUnit

REALIZATIONS = {
    "sigmoid": {"function": "sigmoid"},
    "tanh": {"function": "tanh"},
    "relu": {"function": "relu"},
    "pwl": {"function": "sigmoid", "mode": "pwl", "epsilon": 0.02},
    "taylor": {"function": "tanh", "mode": "taylor", "terms": 4, "input_range": (-2.0, 2.0)},
}


def _units(seed: int = 5, num: int = 13, **cfg) -> tuple[ActivationUnit, ActivationUnit]:
    """Two units of one chip: the first fused where it applies, the second always on torch operations."""
    config = ActivationConfig(**cfg)
    fused = ActivationUnit(config, num, generator=torch.Generator().manual_seed(seed))
    torch_ops = ActivationUnit(config, num, generator=torch.Generator().manual_seed(seed))
    torch_ops._fusable = lambda *args: False
    return fused, torch_ops


def _inputs(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Inputs spread over and beyond the realizations' ranges, with the special values in them."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    flat = x.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 40.0])
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, signed zeros included; NaN where NaN (which of two NaN operands a product passes on,
    and so its sign bit, is the vector unit's choice)."""
    nan = a.isnan()
    return (a.shape == b.shape and torch.equal(nan, b.isnan())
            and torch.equal(a.masked_fill(nan, 0).view(torch.int32), b.masked_fill(nan, 0).view(torch.int32)))


def _counters(unit: ActivationUnit) -> dict:
    return {k: g.counter for k, g in unit._noise_gens.items()}


@pytest.mark.parametrize("realization", sorted(REALIZATIONS))
def test_every_circuit_option_equals_the_torch_composition(realization):
    """Gain, offset, noise and clip each on and off (16 circuits), forward and derivative circuit, on a batch
    whose rows (13 neurons) are not whole Philox blocks, and on conv-shaped (B, N, H, W) outputs."""
    for gain, offset, noise, clip in itertools.product((0.0, 0.1), (0.0, 0.05), (0.0, 0.02), (None, (0.1, 0.7))):
        cfg = dict(REALIZATIONS[realization], gain_dtod=gain, offset_dtod=offset, noise=noise, output_range=clip,
                   derivative_gain_dtod=gain, derivative_offset_dtod=offset, derivative_noise=noise)
        fused, ref = _units(**cfg)
        for shape in ((37, 13), (3, 13, 5, 3)):
            x = _inputs(shape)
            grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                for a, b in ((fused(x), ref(x)), (fused.derivative(x), ref.derivative(x)),
                             (fused.derivative_times(x, grad), ref.derivative_times(x, grad))):
                    assert _same(a, b), (cfg, shape)
            assert _counters(fused) == _counters(ref)
        if noise:
            assert _counters(fused)[("noise", "cpu")] > 0 and _counters(fused)[("d_noise", "cpu")] > 0


def test_the_pass_is_taken_where_it_applies():
    """The BP benchmark's neurons: the forward and the derivative circuit both run the fused pass (a test
    that compared the torch path with itself would prove nothing)."""
    fused, _ = _units(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02, noise=0.01, derivative_gain_dtod=0.05,
                      derivative_offset_dtod=0.02, derivative_noise=0.01)
    calls = []
    original = fused._fused
    fused._fused = lambda *args, **kw: calls.append(kw.get("pre", args[7] if len(args) > 7 else 0)) or \
        original(*args, **kw)
    x, g = _inputs((8, 13)), torch.ones(8, 13)
    with torch.no_grad():
        fused(x)
        fused.derivative_times(x, g)
    assert calls == [0, 1]


@pytest.mark.parametrize("function", ["sigmoid", "tanh", "softplus"])
def test_error_product_with_a_strided_error(function):
    """The error arriving at a layer is a column slice of the wider matrix of the layer above (its bias column
    cut off), or any non-contiguous tensor: the product is the same bit for bit."""
    fused, ref = _units(function=function, num=13, derivative_gain_dtod=0.1, derivative_noise=0.01)
    x = _inputs((29, 13))
    wide = torch.randn(29, 14, generator=torch.Generator().manual_seed(3))
    for grad in (wide[:, :13], wide[:, 1:], wide.t().contiguous().t()[:, :13]):
        assert not grad.is_contiguous()
        with torch.no_grad():
            assert _same(fused.derivative_times(x, grad), ref.derivative_times(x, grad))
    x4 = _inputs((4, 13, 3, 2))
    g4 = torch.randn(4, 3, 13, 2).transpose(1, 2)
    with torch.no_grad():
        assert _same(fused.derivative_times(x4, g4), ref.derivative_times(x4, g4))


def test_the_input_is_kept_and_fresh_outputs_are_reused():
    """The identity realization returns its input: the pass writes elsewhere then. A fresh realization output
    (sigmoid) is worked on in its own buffer."""
    fused, ref = _units(function="identity", noise=0.01, gain_dtod=0.1)
    x = _inputs((16, 13))
    before = x.clone()
    with torch.no_grad():
        out = fused(x)
        assert _same(out, ref(x)) and _same(x, before) and out.data_ptr() != x.data_ptr()


def test_the_same_numbers_at_one_and_two_threads():
    """A batch large enough for the parallel pass (spans of rows over the threads) gives the numbers of the
    serial pass, forward and BP; and the kernel's serial and parallel entries agree directly."""
    n = torch.get_num_threads()
    cfg = dict(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02, noise=0.01, derivative_gain_dtod=0.05,
               derivative_offset_dtod=0.02, derivative_noise=0.01, output_range=(0.0, 0.9))
    x = _inputs((130, 257))
    grad = torch.randn(130, 258, generator=torch.Generator().manual_seed(4))[:, :257]
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            unit, _ = _units(num=257, **cfg)
            with torch.no_grad():
                runs.append((unit(x), unit.derivative_times(x, grad), _counters(unit)))
    finally:
        torch.set_num_threads(n)
    assert all(_same(a, b) for a, b in zip(runs[0][:2], runs[1][:2], strict=True)) and runs[0][2] == runs[1][2]
    _, ref = _units(num=257, **cfg)
    with torch.no_grad():
        assert _same(runs[0][0], ref(x)) and _same(runs[0][1], ref.derivative_times(x, grad))

    from neurosim import _activation_numba as kernels
    y = torch.rand(130, 257)
    outs = []
    for parallel in (False, True):
        out = torch.empty_like(y)
        row = torch.rand(257, generator=torch.Generator().manual_seed(6))
        kernels.circuit(y.numpy(), out.numpy(), row.numpy(), row.numpy(), 1, 0.01, True, -1.0, 1.0,
                        grad.contiguous().view(-1).numpy(), 257, True, 2**63 + 12345, 7, 9, parallel)
        outs.append(out)
    assert _same(outs[0], outs[1])


def test_float64_and_autograd_take_the_torch_operations():
    """float64 (the kernel is float32) and a recorded forward keep the torch composition, and still work."""
    cfg = dict(function="tanh", gain_dtod=0.1, noise=0.01, derivative_noise=0.01)
    unit = ActivationUnit(ActivationConfig(**cfg), 13, dtype=torch.float64)
    x64 = _inputs((9, 13)).double()
    assert not unit._fusable(x64, 0.01, "noise", 1)
    with torch.no_grad():
        assert unit(x64).dtype == torch.float64
        assert unit.derivative_times(x64, torch.ones_like(x64)).dtype == torch.float64
    fused, _ = _units(**cfg)
    x = _inputs((9, 13)).requires_grad_(True)
    assert not fused._fusable(x, 0.01, "noise", 1)
    y = fused(x)
    y.nan_to_num().sum().backward()
    assert y.requires_grad and x.grad is not None


def test_without_numba_the_same_numbers(monkeypatch):
    """Without numba the torch operations (and the torch Philox draws) give the fused pass's numbers."""
    cfg = dict(function="sigmoid", gain_dtod=0.05, offset_dtod=0.02, noise=0.01, derivative_gain_dtod=0.05,
               derivative_offset_dtod=0.02, derivative_noise=0.01, output_range=(0.05, 0.95))
    x = _inputs((21, 13))
    grad = torch.randn(21, 13, generator=torch.Generator().manual_seed(8))
    fused, _ = _units(**cfg)
    with torch.no_grad():
        want = fused(x), fused.derivative_times(x, grad)
    monkeypatch.setattr(streams, "_kernel_module", False)
    plain, _ = _units(**cfg)
    assert not plain._fusable(x, 0.01, "noise", 1)
    with torch.no_grad():
        got = plain(x), plain.derivative_times(x, grad)
    assert all(_same(a, b) for a, b in zip(want, got, strict=True))
    assert _counters(plain) == _counters(fused)


def test_block_counter_wraps_as_the_stream_does():
    """A stream near the end of its 64-bit block counter: the draws wrap to block 0 as ``normal`` does."""
    fused, ref = _units(function="sigmoid", noise=0.01, derivative_noise=0.01)
    for unit in (fused, ref):
        for name in ("noise", "d_noise"):
            unit._generator(name, torch.device("cpu"))._counter = 2**64 - 3
    x = _inputs((7, 13))
    with torch.no_grad():
        assert _same(fused(x), ref(x)) and _same(fused.derivative_times(x, x), ref.derivative_times(x, x))
    assert _counters(fused) == _counters(ref) == {("noise", "cpu"): 20, ("d_noise", "cpu"): 20}


def test_empty_batch_and_changed_mismatch():
    """An empty batch takes no draws and returns an empty result; a gain buffer changed in place (a chip's
    neuron-circuit update) is read anew."""
    fused, ref = _units(function="sigmoid", gain_dtod=0.1, noise=0.01)
    with torch.no_grad():
        assert fused(torch.empty(0, 13)).shape == (0, 13)
        assert _counters(fused)[("noise", "cpu")] == 0
        x = _inputs((5, 13))
        assert _same(fused(x), ref(x))
        for unit in (fused, ref):
            unit.gain.mul_(2.0)
        assert _same(fused(x), ref(x))


@pytest.mark.parametrize("terms", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("center", [0.0, 0.3])
def test_taylor_kernel_equals_the_torch_polynomial_bit_for_bit(terms, center):
    """The Taylor realization and its derivative as one CPU pass (``_activation_numba.taylor``) against the
    torch passes (``_Taylor``, ``ideal_derivative``): the same bits, at the clipping range's ends, beyond them,
    at ±0, ±inf and NaN, for polynomials of one to six terms, centred or not, with trained (arbitrary)
    coefficients."""
    cfg = ActivationConfig(function="sigmoid", mode="taylor", terms=terms, center=center, input_range=(-1.5, 2.0))
    unit = ActivationUnit(cfg, 13, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        unit.coefficients.mul_(1 + 0.1 * torch.randn(terms, generator=torch.Generator().manual_seed(4)))
    x = _inputs((257, 13))
    x.view(-1)[6:12] = torch.tensor([-1.5, 2.0, -1.5000001, 2.0000002, center, -center])
    assert unit._kernels(x) is not None
    with torch.no_grad():
        fused = (unit.ideal(x), unit.ideal_derivative(x))
        unit._kernels = lambda x: None
        reference = (unit.ideal(x), unit.ideal_derivative(x))
    for a, b in zip(fused, reference, strict=True):
        assert _same(a, b)
