"""Counter-based random numbers (Philox4x32-10): the same numbers whatever the thread count, fast on CPU.

torch's CPU generator (mt19937) is sequential: about 2.5 ns a Gaussian at any thread count, a large part of a
hardware-BP step. Philox (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) makes every
draw a function of (key, counter), so any number of threads can fill any part of a request and the result is
the same bit for bit. Two implementations of one algorithm live here:

- a numba kernel (neurosim._philox_numba, compiled on first use and cached on disk): the CPU path;
- int64/float32 torch operations (``kernel="torch"``): any device (the CUDA path) and the kernel's test oracle.
  Both perform the same IEEE float32 operations in the same order, so their numbers are equal bit for bit.

Index mapping (the contract other code may rely on): a call for n numbers takes the next ceil(n / 4) blocks
of the 64-bit block counter; element i of the call (row-major) comes from block ``counter + i // 4``, word
``i % 4``. Words of a block are Philox4x32-10 of (counter low, counter high, 0, 0) under the key (low, high
32 bits of ``derive_seed(seed, *names)``). Normals: Box-Muller on word pairs, (w0, w1) -> r cos, r sin and
(w2, w3) likewise, r = sqrt(-2 ln u) with u = float32(w0 + 1) 2^-32 in (0, 1] (so |z| <= 6.66), angle
2 pi (w1 >> 8) 2^-24. Uniforms: (w >> 8) 2^-24 in [0, 1), 24 bits. float64 (and bfloat16, float16) draws are
the float32 draws converted. See docs/random.md for the errors and speeds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from neurosim.backend import derive_seed, resolve_device
from neurosim.config import ConfigError

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57          # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85          # Weyl increments of the key between rounds
_SERIAL_BELOW = 1 << 14                   # smaller requests run on the calling thread (same numbers)
KERNELS = ("auto", "numba", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _f32(x: float) -> float:
    """The float32 value of x as a Python float (torch then computes with exactly this constant)."""
    return torch.tensor(x, dtype=torch.float32).item()


# float32 constants shared with the kernel (neurosim._philox_numba), same values, same roles
_SQRT2 = _f32(1.4142135623730951)
_LN2_HI, _LN2_LO = _f32(0.693359375), _f32(-2.12194440e-4)
_LOG_P = [_f32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                            1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                            3.3333331174e-1)]
_SIN_P = [_f32(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]
_COS_P = [_f32(c) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)]
_TWO_PI_24 = _f32(2 * math.pi / 2**24)
_U24 = 2.0**-24


# --- the torch implementation ------------------------------------------------------------------------------------

def _mulhilo(c: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of c * m (c < 2^32) without leaving int64's range (m split in 16-bit halves)."""
    a = c * (m & 0xFFFF)
    b = c * (m >> 16)
    s = a + ((b & 0xFFFF) << 16)
    return (b >> 16) + (s >> 32), s & _MASK


def philox4x32_10(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int,
                  k1: int) -> torch.Tensor:
    """Philox4x32-10 of int64 tensors of 32-bit counter words under the key (k0, k1): (..., 4) int64 words.
    The key is bumped by the Weyl constants between rounds (Random123's philox4x32_R)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return torch.stack((c0, c1, c2, c3), -1)


def philox_words_torch(key: int, counter: int, nblocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The blocks counter .. counter + nblocks - 1 (mod 2^64) of a stream: int64 tensor (nblocks, 4) of words."""
    idx = torch.arange(nblocks, dtype=torch.int64, device=device)
    lo = idx + (counter & _MASK)
    c0 = lo & _MASK
    c1 = ((lo >> 32) + (counter >> 32)) & _MASK
    zero = torch.zeros_like(c0)
    return philox4x32_10(c0, c1, zero, zero.clone(), key & _MASK, (key >> 32) & _MASK)


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """float32 square root correctly rounded, as IEEE and the kernel's vsqrtps give it.

    torch.sqrt on CPU is not (this build: 17 % of float32 results one ulp off). Its result is corrected by one
    ulp where x lies outside the rounding interval of the candidate; the interval's ends (midpoints between
    neighbouring floats, 25 bits) square exactly in float64, and x never equals one (no ties)."""
    s = torch.sqrt(x)
    xd = x.double()
    up = torch.nextafter(s, torch.tensor(math.inf, device=x.device))
    dn = torch.nextafter(s, torch.zeros((), device=x.device))
    hi = (s.double() + up.double()) * 0.5
    lo = (s.double() + dn.double()) * 0.5
    return torch.where(xd >= hi * hi, up, torch.where(xd < lo * lo, dn, s))


def _radius_torch(w: torch.Tensor) -> torch.Tensor:
    """sqrt(-2 ln u), u = float32(w + 1) 2^-32: Cephes' logf, step by step as the kernel does it."""
    bits = (w + 1).to(torch.float32).view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 159
    m = ((bits & 0x007FFFFF) | 0x3F800000).view(torch.float32)
    big = m > _SQRT2
    m = torch.where(big, m * 0.5, m)
    e = e + big.to(torch.int32)
    f = m - 1.0
    z = f * f
    y = f * _LOG_P[0] + _LOG_P[1]
    for c in _LOG_P[2:]:
        y = y * f + c
    y = y * f * z
    ef = e.to(torch.float32)
    y = y + ef * _LN2_LO
    y = y - z * 0.5
    lg = f + y
    lg = lg + ef * _LN2_HI
    return sqrt_rn((0.0 - lg) * 2.0)      # 0 - lg: +0, not -0, where u = 1


def _sincos_torch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of 2 pi (w >> 8) 2^-24: exact quarter-turn reduction, Cephes' sinf/cosf polynomials."""
    t = w >> 8
    q = (t + (1 << 21)) >> 22
    x = (t - (q << 22)).to(torch.float32) * _TWO_PI_24
    z = x * x
    s = ((z * _SIN_P[0] + _SIN_P[1]) * z + _SIN_P[2]) * z * x
    s = s + x
    c = ((z * _COS_P[0] + _COS_P[1]) * z + _COS_P[2]) * z * z
    c = c - z * 0.5
    c = c + 1.0
    k = q & 3
    odd = (k & 1) != 0
    sn, cs = torch.where(odd, c, s), torch.where(odd, s, c)
    sn = torch.where((k & 2) != 0, -sn, sn)
    cs = torch.where(((k + 1) & 2) != 0, -cs, cs)
    return sn, cs


def normals_from_words(w: torch.Tensor) -> torch.Tensor:
    """Box-Muller of (nblocks, 4) words -> (nblocks, 4) float32 normals."""
    r0, r1 = _radius_torch(w[:, 0]), _radius_torch(w[:, 2])
    s0, c0 = _sincos_torch(w[:, 1])
    s1, c1 = _sincos_torch(w[:, 3])
    return torch.stack((r0 * c0, r0 * s0, r1 * c1, r1 * s1), 1)


def uniforms_from_words(w: torch.Tensor) -> torch.Tensor:
    """(w >> 8) 2^-24: float32 in [0, 1) on the 24-bit grid."""
    return (w >> 8).to(torch.float32) * _U24


# --- the stream ------------------------------------------------------------------------------------------------

_kernel_module = None
_kernel_lock = threading.Lock()


class _KernelModules:
    """The numba kernel modules, imported by ``_numba_kernels`` once it has chosen numba's threading layer.
    Hot call sites (every read, write and circuit of a training step) take them as attributes after their
    own ``_numba_kernels()`` check: an import statement inside a function cost three Python calls a kernel
    call, about seventy a BP step."""

    philox = read = update = pulse = cache = activation = cost = None


NUMBA = _KernelModules()


def _numba_kernels():
    """The numba kernels, imported (and their threading layer chosen) on first use; None without numba."""
    global _kernel_module
    if _kernel_module is None:
        try:
            import numba
        except ImportError:
            _kernel_module = False
            return None
        import os
        # Threading layer: OpenMP where the system has a GNU OpenMP runtime, else numba's workqueue. Measured
        # here (2 vCPUs, torch at 2 threads): a parallel launch costs ~10 us with 'omp' and ~100 us with
        # 'workqueue' (whose threads sleep on a condition variable), and a torch product followed by a
        # parallel kernel takes the sum of the two with 'omp' but 1.4-2x it with 'workqueue'. 'omp' loads
        # the system's libgomp, but its calls bind to the runtime torch loaded first (LD_DEBUG=bindings:
        # omp_set_num_threads, GOMP_parallel -> torch/lib/libgomp.so.1): one pool for both, which is why
        # _numba_threads guards torch's thread count. GNU OpenMP is not fork-safe: neurosim's worker
        # processes are spawned. Launches from two Python threads are serialized by _kernel_lock either way
        # (workqueue would abort).
        if "NUMBA_THREADING_LAYER" not in os.environ:
            numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
            numba.config.THREADING_LAYER = "default"
        from neurosim import (
            _activation_numba,
            _cache_numba,
            _cost_numba,
            _philox_numba,
            _pulse_numba,
            _read_numba,
            _update_numba,
        )
        NUMBA.philox, NUMBA.read, NUMBA.update, NUMBA.pulse = _philox_numba, _read_numba, _update_numba, _pulse_numba
        NUMBA.cache, NUMBA.activation, NUMBA.cost = _cache_numba, _activation_numba, _cost_numba
        _kernel_module = _philox_numba
    return _kernel_module or None


_numba_threads_set = threading.local()   # .torch: torch's count numba's was last set from, on this thread


def _numba_threads() -> int:
    """numba's thread count for this call: torch's, so ``runtime.threads`` governs both. numba's setting is
    per thread; asking numba for it costs a microsecond a kernel, so the count last set on a thread is
    remembered, as torch's count it was set from (neurosim is the only one that sets it)."""
    import numba
    wanted = torch.get_num_threads()
    n = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    if _numba_threads_set.__dict__.get("torch") != wanted:   # (thread-local: a new thread starts unset)
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        # numba's OpenMP layer resolves to the OpenMP runtime torch loaded, and launching it (numba's first
        # thread call) sets that runtime's count to all of numba's threads: torch would then run every product
        # on all cores whatever runtime.threads said. The caller's count is put back.
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
        _numba_threads_set.torch = wanted
    return n


def _shape(shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"PhiloxStream draws floating-point numbers (float32, float64, bfloat16, float16), "
                        f"not {dtype}")


class PhiloxStream:
    """A Philox4x32-10 stream: key from (seed, names) like ``backend.make_generator``, 64-bit block counter.

    ``kernel``: 'auto' (numba on CPU when installed, else torch operations), 'numba' (CPU only) or 'torch'.
    Every kernel gives the same numbers."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", *names: object, kernel: str = "auto"):
        self._setup(derive_seed(seed, *names), 0, device, kernel)

    @classmethod
    def from_key(cls, key: int, counter: int = 0, device: torch.device | str = "cpu",
                 kernel: str = "auto") -> PhiloxStream:
        """A stream at an explicit 64-bit key and block counter (known-answer tests, other key schedules)."""
        s = cls.__new__(cls)
        s._setup(key, counter, device, kernel)
        return s

    def _setup(self, key: int, counter: int, device: torch.device | str, kernel: str) -> None:
        if not 0 <= int(key) < 2**64:
            raise ConfigError("key", key, "a Philox key is 64 bits: 0 <= key < 2**64")
        if not 0 <= int(counter) < 2**64:
            raise ConfigError("counter", counter, "the block counter is 64 bits: 0 <= counter < 2**64")
        if kernel not in KERNELS:
            raise ConfigError("kernel", kernel, f"must be one of {', '.join(KERNELS)}")
        self._device = resolve_device(device)
        if kernel == "numba" and self._device.type != "cpu":
            raise ConfigError("kernel", kernel, f"the numba kernel runs on the CPU, not on {self._device}")
        if kernel == "numba" and _numba_kernels() is None:
            raise ConfigError("kernel", kernel, "numba is not installed (pip install numba)")
        self._key, self._counter, self._kernel = int(key), int(counter), kernel

    # -- state ---------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def key(self) -> int:
        return self._key

    @property
    def counter(self) -> int:
        """The next unused block."""
        return self._counter

    @property
    def kernel(self) -> str:
        """The implementation a draw uses now: 'numba' or 'torch'."""
        if self._kernel == "auto":   # (the module global first: asked at every draw of a training step)
            return "numba" if self._device.type == "cpu" and (_kernel_module or _numba_kernels()) else "torch"
        return self._kernel

    def get_state(self) -> torch.Tensor:
        """(key, counter) as a CPU int64 tensor of 2 (the 64-bit values in two's complement), for checkpoints."""
        signed = [v - 2**64 if v >= 2**63 else v for v in (self._key, self._counter)]
        return torch.tensor(signed, dtype=torch.int64)

    def set_state(self, state: torch.Tensor) -> None:
        """Restore what get_state returned."""
        if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or tuple(state.shape) != (2,):
            got = f"{state.dtype} {tuple(state.shape)}" if isinstance(state, torch.Tensor) else type(state).__name__
            raise ConfigError("state", got, "a PhiloxStream state is an int64 tensor of 2 (key, counter) "
                              "from get_state()")
        key, counter = (int(v) % 2**64 for v in state.tolist())
        self._key, self._counter = key, counter

    def manual_seed(self, seed: int) -> PhiloxStream:
        """Restart at key ``seed`` (mod 2^64), block 0: as ``torch.Generator.manual_seed``, for tests and
        scripts that reseed a chip's streams."""
        self._key, self._counter = int(seed) % 2**64, 0
        return self

    def clone(self) -> PhiloxStream:
        """An independent copy at the same position: it draws the same numbers as this stream would."""
        return PhiloxStream.from_key(self._key, self._counter, self._device, self._kernel)

    def __repr__(self) -> str:
        return f"PhiloxStream(key={self._key:#x}, counter={self._counter}, device={self._device}, " \
               f"kernel={self._kernel!r})"

    def _take(self, n: int) -> int:
        """Reserve the blocks of a call of n numbers; returns the first."""
        first = self._counter
        self._counter = (first + (n + 3) // 4) % 2**64
        return first

    # -- draws -------------------------------------------------------------------------------------------------
    def _draw(self, kind: str, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """n draws of `kind` ("words": int64, else float32) into a new 1-d tensor, or into contiguous ``out``
        (float32, or float64 from the kernel: the float32 draws stored converted, exactly)."""
        first = self._take(n)
        if self.kernel == "numba":
            k0, k1 = self._key & _MASK, self._key >> 32
            if kind == "words":
                arr = np.empty(n, np.uint32)
                _run(NUMBA.philox.fill, n, arr, kind, first, k0, k1)
                return torch.from_numpy(arr.astype(np.int64))
            buf = out if out is not None else torch.empty(n, dtype=torch.float32)
            _run(NUMBA.philox.fill, n, buf.detach().numpy(), kind, first, k0, k1)
            return buf
        nblocks = (n + 3) // 4
        w = philox_words_torch(self._key, first, nblocks, self._device)
        vals = w if kind == "words" else normals_from_words(w) if kind == "normal" else uniforms_from_words(w)
        vals = vals.reshape(-1)[:n]
        if out is None:
            return vals
        out.copy_(vals)
        return out

    def words(self, n: int) -> torch.Tensor:
        """n raw 32-bit words (int64 tensor, values in [0, 2^32)): the generator's output itself."""
        return self._draw("words", int(n)).to(self._device)

    def normal(self, shape: int | Sequence[int] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal numbers (float32 Box-Muller; other float dtypes are these converted)."""
        return self._fill_new("normal", shape, dtype)

    def uniform(self, shape: int | Sequence[int] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform numbers in [0, 1) with 24-bit resolution (float64: the float32 draws, exactly)."""
        return self._fill_new("uniform", shape, dtype)

    def normal_(self, t: torch.Tensor) -> torch.Tensor:
        """Fill ``t`` in place with what ``normal(t.shape)`` would return (converted to t's dtype)."""
        return self._fill_into("normal", t)

    def uniform_(self, t: torch.Tensor) -> torch.Tensor:
        """Fill ``t`` in place with what ``uniform(t.shape)`` would return (converted to t's dtype)."""
        return self._fill_into("uniform", t)

    def _fill_new(self, kind: str, shape, dtype: torch.dtype) -> torch.Tensor:
        _check_dtype(dtype)
        shape = _shape(shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"negative size in shape {shape}")
        n = math.prod(shape)
        if dtype in (torch.float32, torch.float64) and self.kernel == "numba":
            # float64: the kernel stores the float32 draws converted (exactly), without a pass of its own
            return self._draw(kind, n, out=torch.empty(n, dtype=dtype)).view(shape)
        out = self._draw(kind, n).view(shape)
        return out.to(device=self._device, dtype=dtype)

    def _fill_into(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        _check_dtype(t.dtype)
        if t.device != self._device:
            raise ValueError(f"tensor on {t.device}, stream on {self._device}: draw on the stream's device")
        if t.dtype in (torch.float32, torch.float64) and t.is_contiguous() and self.kernel == "numba":
            self._draw(kind, t.numel(), out=t.view(-1))
        else:
            with torch.no_grad():
                t.copy_(self._fill_new(kind, t.shape, torch.float32))
        return t


def flat_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a 1-d numpy array: ``t.view(-1).numpy()`` with one torch operation
    instead of two (a kernel call takes several a read); refuses (ValueError) a tensor that would need a copy."""
    a = t.numpy()
    if not a.flags.c_contiguous:
        raise ValueError("flat_numpy: the tensor is not contiguous")
    return a.reshape(-1)


def _run(fn, n: int, *args):
    """Run a kernel entry: in parallel (numba's threads = torch's) for large n when no other thread is in a
    parallel kernel, else serially on this thread. Either way the same numbers; returns what ``fn`` returns."""
    threads = torch.get_num_threads() if n >= _SERIAL_BELOW else 1
    if threads > 1 and _kernel_lock.acquire(blocking=False):
        try:
            if _numba_threads_set.__dict__.get("torch") != threads:   # (set for this count already: no call)
                _numba_threads()
            return fn(*args, parallel=True)
        finally:
            _kernel_lock.release()
    return fn(*args, parallel=False)


# --- the crossbar read's epilogue --------------------------------------------------------------------------

_ONE = np.ones(1, np.float32)   # the factor of an unscaled epilogue


def noisy_adc_sum(part: torch.Tensor, var: torch.Tensor, sigma: float, levels: float | None, keep: int,
                  stream: PhiloxStream, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Read noise, ADC and the sum over row tiles in one pass: (B, keep) float32.

    ``part`` (T, B, C) float32: partial sums of T row tiles in ADC steps; ``var`` (T, B, C) float32 or bfloat16
    (converted exactly per element): their read-noise variances. out[b, c] = sum over t, ascending, in float32
    of q(part + sigma sqrt(var) z) for c < keep, where z is exactly ``stream.normal((T, B, C))`` (the stream
    advances by ceil(T B C / 4) blocks, as that call would) and q clamps to +-levels, then rounds half to even
    (levels None: no clamp, no rounding); then multiplied in float32 by ``scale`` (a number, or a float32
    tensor of B numbers, one a sample), when given. Equal bit for bit to that torch composition
    (docs/random.md)."""
    if not isinstance(part, torch.Tensor) or part.dtype != torch.float32 or part.dim() != 3:
        what = f"{part.dtype} {tuple(part.shape)}" if isinstance(part, torch.Tensor) else type(part).__name__
        raise TypeError(f"noisy_adc_sum: part must be a float32 (T, B, C) tensor, got {what}")
    if not isinstance(var, torch.Tensor) or var.dtype not in (torch.float32, torch.bfloat16) \
            or var.shape != part.shape:
        what = f"{var.dtype} {tuple(var.shape)}" if isinstance(var, torch.Tensor) else type(var).__name__
        raise TypeError(f"noisy_adc_sum: var must be float32 or bfloat16 of part's shape {tuple(part.shape)}, "
                        f"got {what}")
    _, B, C = part.shape
    if not 0 <= keep <= C:
        raise ValueError(f"noisy_adc_sum: keep = {keep} outside 0..{C} (the columns of part)")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noisy_adc_sum: sigma = {sigma} must be finite and >= 0")
    if levels is not None and not (math.isfinite(levels) and levels > 0):
        raise ValueError(f"noisy_adc_sum: levels = {levels} must be None or finite and > 0")
    device = stream._device
    if part.device != device or var.device != device:
        raise ValueError(f"noisy_adc_sum: tensors on {part.device}/{var.device}, stream on {device}")
    factor = _factor(scale, B, device)
    keep = int(keep)
    if stream.kernel != "numba":
        return noisy_adc_sum_torch(part, var, sigma, levels, keep, stream, scale)
    return _noisy_adc_sum_kernel(part, var, sigma, levels, keep, stream, factor)


def _noisy_adc_sum_kernel(part: torch.Tensor, var: torch.Tensor, sigma: float, levels: float | None, keep: int,
                          stream: PhiloxStream, factor: np.ndarray | None) -> torch.Tensor:
    """``noisy_adc_sum``'s CPU kernel call for arguments it has checked, or that a crossbar's read makes
    (float32 (T, B, C) partial sums, var of their shape, a CPU stream with the numba kernel, ``factor`` as
    ``_factor`` gives it): a read's five checks cost as much as its small kernel."""
    T, B, C = part.shape
    if not (B and keep):
        stream._take(T * B * C)
        return torch.from_numpy(np.empty((B, keep), np.float32))
    if part.requires_grad or not part.is_contiguous():
        part = part.detach().contiguous()
    if var.requires_grad or not var.is_contiguous():
        var = var.detach().contiguous()
    var_np = var.view(torch.int16).numpy().view(np.uint16) if var.dtype == torch.bfloat16 else var.numpy()
    return noisy_adc_sum_arrays(part.numpy(), var_np, sigma, levels, keep, stream, factor)


def noisy_adc_sum_arrays(part: np.ndarray, var: np.ndarray, sigma: float, levels: float | None, keep: int,
                         stream: PhiloxStream, factor: np.ndarray | None) -> torch.Tensor:
    """``_noisy_adc_sum_kernel`` on the kernel's own views of the operands: ``part`` (T, B, C) float32 and
    ``var`` of its shape, float32 or bfloat16 bits as uint16, both C-contiguous, B and keep at least 1 (a
    crossbar's reused read temporaries pass the views they keep)."""
    T, B, C = part.shape
    first = stream._take(T * B * C)
    out = np.empty((B, keep), np.float32)
    _run(NUMBA.philox.epilogue, B * keep * T, out, part, var, float(sigma), None if levels is None else float(levels),
         keep, first, stream._key & _MASK, stream._key >> 32, _ONE if factor is None else factor)
    return torch.from_numpy(out)


def _factor(scale: float | torch.Tensor | None, B: int, device: torch.device) -> np.ndarray | None:
    """The epilogue's scale as the kernel's float32 array of 1 or B numbers (None: unscaled); refuses others."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32 or scale.numel() != B or scale.device != device:
            raise TypeError(f"noisy_adc_sum: a scale tensor must be float32 with one number a sample ({B}) on "
                            f"{device}, got {scale.dtype} {tuple(scale.shape)} on {scale.device}")
        if device.type != "cpu":
            return None
        return flat_numpy(scale if scale.is_contiguous() and not scale.requires_grad else
                          scale.detach().contiguous())
    known = _SCALES.get(scale)
    if known is None:
        if len(_SCALES) > 64:
            _SCALES.clear()
        known = _SCALES[scale] = np.full(1, scale, np.float32)
        known.flags.writeable = False
    return known


_SCALES: dict[float, np.ndarray] = {}   # the epilogue's scalar factors as kernel arrays (a few per network)


def noisy_adc_sum_torch(part: torch.Tensor, var: torch.Tensor, sigma: float, levels: float | None, keep: int,
                        stream: PhiloxStream, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """The epilogue as torch operations (any device; the kernel's oracle): the composition it replaces, with
    sqrt_rn for torch.sqrt (which on CPU is not correctly rounded)."""
    z = stream.normal(part.shape)
    x = part + sigma * sqrt_rn(var.float()) * z
    if levels is not None:
        x = torch.round(torch.clamp(x, -levels, levels))
    y = x[..., :keep].sum(0)
    if scale is None:
        return y
    return y * (scale.reshape(-1, 1) if isinstance(scale, torch.Tensor) else scale)
