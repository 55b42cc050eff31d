"""PhiloxStream and the fused read epilogue: known answers, kernel == torch reference bit for bit, thread-count
independence, state, and the distributions (tolerances of 5 standard errors from the sample size)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from scipy import stats

from neurosim.backend import derive_seed
from neurosim.config import ConfigError
from neurosim.random_streams import (
    PhiloxStream,
    noisy_adc_sum,
    noisy_adc_sum_torch,
    normals_from_words,
    philox4x32_10,
    philox_words_torch,
    sqrt_rn,
)

KEY = 0x0123456789ABCDEF
# Random123 tests/kat_vectors, the three philox4x32 10 lines: counter (4 words), key (2 words) -> output
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def stream(counter: int = 0, kernel: str = "numba", key: int = KEY) -> PhiloxStream:
    return PhiloxStream.from_key(key, counter, kernel=kernel)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("ctr, key, want", KAT)
def test_known_answers(ctr, key, want):
    c = [torch.tensor([v], dtype=torch.int64) for v in ctr]
    assert philox4x32_10(*c, *key)[0].tolist() == list(want)


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_stream_known_answer_and_key_layout(kernel):
    assert stream(0, kernel, key=0).words(4).tolist() == list(KAT[0][2])
    # block 5 of key (k0, k1) is Philox of counter (5, 0, 0, 0): key low word first
    s = PhiloxStream.from_key(0xA4093822 | 0x299F31D0 << 32, 5, kernel=kernel)
    c = [torch.tensor([v], dtype=torch.int64) for v in (5, 0, 0, 0)]
    assert s.words(4).tolist() == philox4x32_10(*c, 0xA4093822, 0x299F31D0)[0].tolist()


@pytest.mark.parametrize("n", [1, 3, 5, 8, 4097, 65539])
@pytest.mark.parametrize("counter", [0, 2**32 - 3, 2**64 - 2])
@pytest.mark.parametrize("kind", ["words", "normal", "uniform"])
def test_kernel_equals_torch_reference(n, counter, kind):
    a, b = stream(counter, "numba"), stream(counter, "torch")
    draw = {"words": lambda s: s.words(n), "normal": lambda s: s.normal(n), "uniform": lambda s: s.uniform(n)}[kind]
    assert torch.equal(bits(draw(a)), bits(draw(b)))
    assert a.counter == b.counter == (counter + (n + 3) // 4) % 2**64


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_counter_carries_and_wraps(kernel):
    # a call across the low word's end continues at (0, high + 1); the 64-bit counter wraps to 0
    assert torch.equal(stream(2**32 - 1, kernel).words(8)[4:], stream(2**32, kernel).words(4))
    assert torch.equal(stream(2**64 - 1, kernel).words(8)[4:], stream(0, kernel).words(4))
    assert torch.equal(philox_words_torch(KEY, 2**33 + 7, 1).view(-1), stream(2**33 + 7, kernel).words(4))


def test_same_numbers_at_one_and_two_threads(threads):
    out = []
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        s = stream(123)
        out.append((s.normal(100_003), s.uniform(50_001), s.words(40_000)))
    for a, b in zip(*out, strict=True):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("kernel", ["numba", "torch"])
def test_consecutive_calls_equal_one_call(kernel):
    a, b = stream(7, kernel), stream(7, kernel)
    parts = torch.cat([a.normal(8), a.normal((3, 4)).view(-1), a.normal(8196)])
    assert torch.equal(bits(parts), bits(b.normal(8 + 12 + 8196)))
    # a call of n numbers takes ceil(n / 4) blocks: the next call starts on a fresh block
    c = stream(0, kernel)
    c.normal(5)
    assert c.counter == 2
    assert torch.equal(bits(c.normal(4)), bits(stream(0, kernel).normal(12)[8:]))


def test_state_clone_and_names():
    s = PhiloxStream(42, "cpu", "layer", 3)
    assert s.key == derive_seed(42, "layer", 3)
    assert not torch.equal(s.clone().normal(16), PhiloxStream(42, "cpu", "layer", 4).normal(16))
    s.normal(10)
    state = s.get_state()
    assert state.dtype == torch.int64 and state.device.type == "cpu"
    twin = s.clone()
    a = s.normal(1000)
    assert torch.equal(a, twin.normal(1000))
    s.set_state(state)
    assert torch.equal(a, s.normal(1000))
    big = stream(2**64 - 3, key=2**64 - 1)       # values above 2^63 survive the signed int64 state
    restored = stream(0)
    restored.set_state(big.get_state())
    assert (restored.key, restored.counter) == (2**64 - 1, 2**64 - 3)
    with pytest.raises(ConfigError, match="state"):
        s.set_state(torch.get_rng_state())
    with pytest.raises(ConfigError, match="kernel"):
        PhiloxStream(1, "cpu", kernel="fast")


def test_dtypes_and_in_place_fills():
    ref = stream(3).normal((6, 5))
    assert torch.equal(stream(3).normal((6, 5), torch.float64), ref.double())
    assert torch.equal(stream(3).normal((6, 5), torch.bfloat16), ref.bfloat16())
    for t in (torch.empty(6, 5), torch.empty(6, 5, dtype=torch.float64), torch.empty(5, 6).t(),
              torch.empty(6, 5, dtype=torch.bfloat16)):
        stream(3).normal_(t)
        assert torch.equal(t, ref.to(t.dtype))
    u = stream(4).uniform(1000)
    t = torch.empty(1000, dtype=torch.float64)
    assert torch.equal(stream(4).uniform_(t), u.double())
    with pytest.raises(TypeError, match="int64"):
        stream().normal(4, torch.int64)
    with pytest.raises(TypeError, match="int32"):
        stream().uniform_(torch.empty(4, dtype=torch.int32))
    assert stream().normal((0, 3)).shape == (0, 3)
    # float64 straight from the kernel (no conversion pass), serial and parallel sizes: the float32 draws
    # converted, and the torch implementation's float64 draws
    for n in (5, 3 * 2**14 + 3):
        f64 = stream(5).normal(n, torch.float64)
        assert f64.dtype == torch.float64
        assert torch.equal(f64, stream(5).normal(n).double())
        assert torch.equal(f64, stream(5, kernel="torch").normal(n, torch.float64))


def test_sqrt_rn_is_correctly_rounded():
    x = torch.cat([torch.rand(200_000) * 100, torch.rand(1000) * 1e-30, torch.tensor([0.0, 1.0, 4.0, 2.0])])
    assert torch.equal(sqrt_rn(x), torch.from_numpy(np.sqrt(x.numpy())))


def test_import_compiles_nothing():
    code = "import sys, neurosim, neurosim.random_streams; assert 'numba' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_concurrent_callers_get_their_numbers(threads):
    torch.set_num_threads(2)
    want = [stream(i, "torch").normal(300_000) for i in range(3)]
    got, errors = [None] * 3, []

    def work(i):
        try:
            s = stream(i)
            got[i] = s.normal(300_000)
        except Exception as e:
            errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# --- accuracy of the float32 transforms against float64 --------------------------------------------------------

def test_transform_accuracy():
    """Each normal is within 4 ulp (of its magnitude, at least 2^-24) of the float64 Box-Muller of the same
    words; each uniform is exactly the word's top 24 bits."""
    w = stream(11, "torch").words(1 << 18).view(-1, 4).double()
    w[0] = torch.tensor([0.0, 0.0, 2**32 - 1, 2**32 - 1])      # extremes of u and of the angle
    words = w.long()
    z = normals_from_words(words).double()
    u = (w[:, [0, 2]] + 1).float().double() * 2.0**-32
    r = torch.sqrt(-2 * torch.log(u))
    a = 2 * math.pi * torch.floor(w[:, [1, 3]] / 256) * 2.0**-24
    exact = torch.stack((r[:, 0] * torch.cos(a[:, 0]), r[:, 0] * torch.sin(a[:, 0]),
                         r[:, 1] * torch.cos(a[:, 1]), r[:, 1] * torch.sin(a[:, 1])), 1)
    ulp = torch.clamp(exact.abs(), min=1.0) * 2.0**-23
    assert ((z - exact).abs() / ulp).max() < 4
    top24 = torch.floor(stream(11).words(1 << 18).double() / 256)
    assert torch.equal(stream(11).uniform(1 << 18).double(), top24 / 2**24)


# --- distributions ----------------------------------------------------------------------------------------------

def test_normal_moments_ks_and_tails():
    n = 1 << 22
    z = stream(2024).normal(n).double()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs((z**2).mean() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)              # Var(z^4) = 105 - 9
    # Kolmogorov-Smirnov: P(sqrt(n) D > x) <= 2 exp(-2 x^2), 5.7e-7 (a 5-sigma normal tail) at x = 2.75
    sub = z[: 1 << 20].numpy()
    assert stats.kstest(sub, "norm").statistic < 2.75 / math.sqrt(sub.size)
    for k in (3.0, 4.0):
        p = 2 * stats.norm.sf(k)
        count = int((z.abs() > k).sum())
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (k, count, n * p)
    assert z.abs().max() <= math.sqrt(64 * math.log(2)) + 1e-6           # u >= 2^-32 bounds |z|


def test_uniform_range_grid_and_moments():
    n = 1 << 22
    u = stream(99).uniform(n).double()
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(((u - 0.5) ** 2).mean() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)   # Var((u - 1/2)^2) = 1/180


# --- the fused epilogue ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, keep", [((3, 64, 256), 256), ((3, 64, 256), 200), ((2, 5, 7), 3), ((1, 1, 1), 1)])
@pytest.mark.parametrize("levels", [None, 31.0])
@pytest.mark.parametrize("var_dtype", [torch.float32, torch.bfloat16])
def test_epilogue_equals_torch_composition(shape, keep, levels, var_dtype):
    g = torch.Generator().manual_seed(5)
    part = torch.randn(shape, generator=g) * 25                           # beyond +-31: the clamp acts
    var = (torch.rand(shape, generator=g) * 4).to(var_dtype)
    var.view(-1)[::7] = 0                                                  # noiseless cells
    a, b = stream(17), stream(17, "torch")
    got = noisy_adc_sum(part, var, 0.8, levels, keep, a)
    want = noisy_adc_sum_torch(part, var, 0.8, levels, keep, b)
    assert got.shape == (shape[1], keep)
    assert torch.equal(bits(got), bits(want))
    assert a.counter == b.counter == 17 + (math.prod(shape) + 3) // 4
    # the same z as stream.normal(part.shape) would give
    c = stream(17)
    z = c.normal(shape)
    x = part + 0.8 * sqrt_rn(var.float()) * z
    if levels is not None:
        x = torch.round(torch.clamp(x, -levels, levels))
    assert torch.equal(bits(x[..., :keep].sum(0)), bits(got))


def test_epilogue_threads_and_refusals(threads):
    g = torch.Generator().manual_seed(6)
    part, var = torch.randn(4, 64, 96, generator=g) * 10, torch.rand(4, 64, 96, generator=g)
    out = []
    for n in (1, 2):
        torch.set_num_threads(n)
        out.append(noisy_adc_sum(part, var, 0.5, 127.0, 90, stream(1)))
    assert torch.equal(out[0], out[1])
    with pytest.raises(TypeError, match="float64"):
        noisy_adc_sum(part.double(), var, 0.5, 127.0, 90, stream())
    with pytest.raises(TypeError, match="float16"):
        noisy_adc_sum(part, var.half(), 0.5, 127.0, 90, stream())
    with pytest.raises(ValueError, match="keep"):
        noisy_adc_sum(part, var, 0.5, 127.0, 97, stream())
    with pytest.raises(ValueError, match="levels"):
        noisy_adc_sum(part, var, 0.5, 0.0, 90, stream())


def test_flat_numpy_is_a_view_of_the_tensor_and_refuses_a_copy():
    """The kernels write through ``flat_numpy``: it must share the tensor's memory, never a silent copy."""
    from neurosim.random_streams import flat_numpy

    t = torch.zeros(3, 4)
    a = flat_numpy(t)
    a[5] = 7.0
    assert a.shape == (12,) and t[1, 1] == 7.0
    assert flat_numpy(t[1:]).shape == (8,) and flat_numpy(t[1:])[0] == 0.0
    with pytest.raises(ValueError, match="not contiguous"):
        flat_numpy(t.t())
    with pytest.raises(ValueError, match="not contiguous"):
        flat_numpy(t[:, :2])


def test_numba_threads_follow_torch_on_every_thread():
    """numba's thread count is per thread: a new thread (whose numba count is its default) gets torch's
    count too, though the calling thread has it remembered already."""
    import threading

    import numba

    from neurosim.random_streams import _numba_kernels, _numba_threads

    if _numba_kernels() is None or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs numba with at least 2 threads")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _numba_threads() == 1 and numba.get_num_threads() == 1
        seen = []
        worker = threading.Thread(target=lambda: seen.append((_numba_threads(), numba.get_num_threads())))
        worker.start()
        worker.join()
        assert seen == [(1, 1)]
    finally:
        torch.set_num_threads(threads)


def test_run_returns_the_kernels_result_with_numba_at_torchs_thread_count():
    """``_run`` hands back what the kernel returns, launches large requests in parallel at torch's thread
    count and small ones serially, and follows torch's count when it changes between launches (it
    remembers the count it set, so it must notice a change)."""
    import numba

    from neurosim import random_streams as streams

    if streams._numba_kernels() is None or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs numba with at least 2 threads")

    def kernel(value, parallel):
        return value, parallel, numba.get_num_threads()

    big, small = streams._SERIAL_BELOW, streams._SERIAL_BELOW - 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert streams._run(kernel, big, "a") == ("a", True, 2)
        assert streams._run(kernel, small, "b")[:2] == ("b", False)
        torch.set_num_threads(1)
        assert streams._run(kernel, big, "c")[:2] == ("c", False)
        assert streams._numba_threads() == 1 and numba.get_num_threads() == 1   # numba now at 1
        torch.set_num_threads(2)
        assert streams._run(kernel, big, "d") == ("d", True, 2)                 # and back at 2
    finally:
        torch.set_num_threads(threads)


def test_launching_numbas_threads_leaves_torchs_count_as_set():
    """numba's OpenMP layer shares the OpenMP runtime torch loaded, and its launch (the first thread call of
    a process) set that runtime's count to all of numba's threads, so torch's products ran on every core
    whatever ``runtime.threads`` said; ``_numba_threads`` puts torch's count back. A fresh process, since
    the launch happens once."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs numba with at least 2 threads (else there is no count to jump to)")
    script = ("import torch; torch.set_num_threads(1)\n"
              "from neurosim import random_streams as s\n"
              "assert s._numba_kernels() is not None\n"
              "import numba\n"
              "print(s._numba_threads(), torch.get_num_threads(), numba.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["1", "1", "1"]
