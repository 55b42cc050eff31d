"""Where tensors live and where randomness comes from: one setting for the device, one seed for everything.

Every stochastic part of neurosim draws from a ``torch.Generator`` made here, so the same seed gives the same
numbers (bit for bit on CPU), and a run moves between CPU and CUDA by one setting (``device = "auto"``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import os
import sys

import torch

from neurosim.config import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


_NO_CHANGE = contextlib.nullcontext()


def no_grad():
    """``torch.no_grad()``, or nothing to do where gradients are already off: a BP step's stages each say
    they run without autograd, and entering and leaving torch's context nine times a step cost more than
    some of the stages' arithmetic. Inside it a stage may still turn gradients on (``torch.enable_grad``)."""
    return torch.no_grad() if torch.is_grad_enabled() else _NO_CHANGE


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA where present, else CPU; 'cuda' without a GPU is a user error, not a crash."""
    if isinstance(name, torch.device):
        return name
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine (use 'cpu' or 'auto')")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError("device", name, "must be 'auto', 'cpu' or 'cuda[:N]'") from None


def derive_seed(seed: int, *names: object) -> int:
    """A seed for one named part (a layer, a device array): independent streams that do not shift when
    another part draws more numbers."""
    text = ":".join([str(seed), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, device: torch.device | str = "cpu", *names: object) -> torch.Generator:
    """A generator on ``device`` seeded from ``seed`` and the part's names."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(derive_seed(seed, *names) if names else seed)
    return g


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products are fast here: on CUDA, and on CPUs with AVX512-BF16 or AMX (Linux:
    their flags in /proc/cpuinfo). Elsewhere torch emulates them, slower than float32. A fixed property of the
    machine, so a choice made by it keeps runs reproducible on that machine."""
    if torch.device(device).type == "cuda":
        return True
    return _cpu_has_bfloat16()


@functools.cache
def _cpu_has_bfloat16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


# glibc's mallopt parameters (malloc.h) and the values tune_allocator sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 1024 * 1024   # glibc's largest allowed value
_TRIM_THRESHOLD = 512 * 1024 * 1024


def tune_allocator() -> bool:
    """Keep large freed buffers in the process's heap for reuse (glibc on Linux; elsewhere nothing happens).

    By default glibc hands every buffer above a few MB straight back to the kernel when it is freed and maps
    fresh, zeroed pages for the next one. A simulation step allocates the same large temporaries again and
    again (DGC's batched perturbations: tens of MB a chunk), so it pays the page faults each time: measured
    here, exact DGC ran 2.5× slower that way. This raises the threshold for mapping to glibc's maximum (32 MB)
    and lets up to 512 MB of free heap stay with the process. It changes the allocator of the whole process,
    so the library never calls it on its own: the ``neurosim`` command and the benchmarks do, and a script can.
    Set ``NEUROSIM_MALLOC_TUNING=0`` to leave the allocator alone. Returns whether the settings were applied."""
    if os.environ.get("NEUROSIM_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
