"""Shared helpers for the tests: small device specs built in code, independent of the shipped cards."""

from __future__ import annotations

import pytest

from neurosim.config import build
from neurosim.device import DeviceSpec


def make_spec(**fields) -> DeviceSpec:
    base = {"name": "test", "g_min": 1e-6, "g_max": 1e-5, "states": 65}
    base.update(fields)
    return build(DeviceSpec, base)


@pytest.fixture
def spec_factory():
    return make_spec
