"""The process-level allocator setting that the neurosim command and the benchmarks apply, and the cheap no_grad."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# Where glibc places a large block: from mmap (fresh, zeroed pages that fault on first touch, returned to the
# kernel on free) or from the heap (kept for reuse). mallinfo2's hblkhd is the bytes in mmapped blocks.
PLACEMENT = """
import ctypes, ctypes.util, os, sys
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallinfo2"):
    print("skip"); sys.exit()
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1024 * 1024
def mapped(size):
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(size)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return grown >= size
# Untuned (before anything big was freed: measured before torch is imported), glibc maps a 20 MB block;
# freeing it raises glibc's dynamic threshold to 20 MB, so a 24 MB block is still mapped.
untuned, untuned_24 = mapped(20 * MB), mapped(24 * MB)
from neurosim.backend import tune_allocator
os.environ["NEUROSIM_MALLOC_TUNING"] = "0"
refused = tune_allocator()
del os.environ["NEUROSIM_MALLOC_TUNING"]
# Tuned, the threshold is held at 32 MB whatever was freed before: 16 and 24 MB blocks come from the heap.
applied = tune_allocator()
print(untuned, refused, untuned_24, applied, mapped(24 * MB), mapped(16 * MB), mapped(40 * MB))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_tuned_allocator_keeps_large_temporaries_in_the_heap():
    """The setting's mechanism, checked where glibc places large blocks in one process, before and after
    (deterministic: no page-fault counts, which depend on where small allocations happen to land and made
    the earlier form of this test fail 1 run in 3). The speed it buys is a benchmark figure
    (docs/benchmarks.md, "tune_allocator": exact DGC 2.5x faster)."""
    env = {k: v for k, v in os.environ.items() if k != "NEUROSIM_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", PLACEMENT], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    if out == ["skip"]:
        pytest.skip("not glibc >= 2.33 (no mallinfo2): nothing to check")
    untuned, refused, untuned_24, applied, tuned_24, tuned_16, tuned_40 = (v == "True" for v in out)
    assert untuned and untuned_24            # untuned: mapped afresh (below 32 MB until a bigger one was freed)
    assert not refused                       # NEUROSIM_MALLOC_TUNING=0 leaves the allocator alone
    assert applied
    assert not tuned_24 and not tuned_16     # tuned: from the heap, reused without faulting pages
    assert tuned_40                          # above glibc's largest threshold (32 MB) a block is mapped anyway


def test_no_grad_turns_gradients_off_and_leaves_an_inner_enable_grad_alone():
    from neurosim.backend import no_grad

    x = torch.ones(2, requires_grad=True)
    with no_grad():
        assert not torch.is_grad_enabled() and not (x * 2).requires_grad
        with no_grad():                       # already off: nothing to enter, still off after
            assert not torch.is_grad_enabled()
        assert not torch.is_grad_enabled()
        with torch.enable_grad():
            assert (x * 2).requires_grad
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
