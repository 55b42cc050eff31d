"""Shared helpers for the tests: small device specs built in code, independent of the shipped cards."""

from __future__ import annotations

import pytest
import torch

from neurosim.config import build
from neurosim.device import DeviceSpec

# The tests' tensors are tiny: one thread avoids the thread pool's spin and wake-up cost, which on a shared
# 2-core machine made a (6, 3) cross-entropy take 30 ms instead of 30 µs.
torch.set_num_threads(1)


def make_spec(**fields) -> DeviceSpec:
    base = {"name": "test", "g_min": 1e-6, "g_max": 1e-5, "states": 65}
    base.update(fields)
    return build(DeviceSpec, base)


@pytest.fixture
def spec_factory():
    return make_spec
