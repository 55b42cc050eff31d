"""The process-level allocator setting that the neurosim command and the benchmarks apply."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROUNDS = """
import resource, sys, torch
from neurosim.backend import tune_allocator
applied = tune_allocator()
def rounds(n):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        bufs = [torch.empty(3 * 1024 * 1024).fill_(1.0) for _ in range(4)]   # four 12 MB temporaries
        del bufs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
rounds(3)                                   # warm-up: the heap grows once
print(applied, rounds(20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_tuned_allocator_reuses_large_temporaries_without_page_faults():
    """With the setting, 20 rounds of four 12 MB temporaries (61,440 pages if each were mapped afresh) fault
    almost no page; with NEUROSIM_MALLOC_TUNING=0 nothing is applied."""
    out = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: nothing to tune")
    pages = 20 * 4 * 3 * 1024 * 1024 * 4 // 4096
    assert int(out[1]) < pages // 100
    env = {**os.environ, "NEUROSIM_MALLOC_TUNING": "0"}
    off = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, check=True, env=env)
    assert off.stdout.split()[0] == "False"
