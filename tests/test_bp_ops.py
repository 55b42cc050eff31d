"""The BP step's operation-count work (issue 14) leaves every number as it was: whole training epochs (every
conductance, programming time, belief, neuron-circuit parameter, momentum buffer, metrics row and random stream
afterwards) equal, bit for bit, those of the functions it replaced (``tests/bp_reference.py``), and the
fingerprints pinned from the code before it where the machine is the one they were pinned on."""

from __future__ import annotations

import json

import pytest

import neurosim.crossbar
import neurosim.device
from neurosim.crossbar import Crossbar
from tests import bp_reference
from tests.bp_fingerprint import CASES, PINNED, environment, epoch_fingerprint


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_epochs_equal_the_old_functions_bit_for_bit(case, monkeypatch):
    """The torch pulse pass against the old functions, bit for bit; the fused CPU pulse pass
    (neurosim._pulse_numba) rounds log1p/expm1 differently in the last bit, so with it every number but the
    conductances themselves (the pulses fired, beliefs, metrics, streams) is still the same bit for bit here
    (the conductances' bound: tests/test_pulse_kernel.py)."""
    with bp_reference.frozen():
        assert Crossbar._written is bp_reference._written and neurosim.crossbar._fire is bp_reference._fire
        old = epoch_fingerprint(case)
    assert Crossbar._written is not bp_reference._written      # restored
    fused = epoch_fingerprint(case)
    assert {k: v for k, v in fused.items() if v != old[k] and not k.endswith(".devices")} == {}
    monkeypatch.setattr(neurosim.device, "_fused", lambda joined: False)
    new = epoch_fingerprint(case)
    assert {k: v for k, v in new.items() if v != old[k]} == {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_epochs_equal_the_pinned_fingerprints(case):
    pinned = json.loads(PINNED.read_text())
    if pinned["environment"] != environment():
        pytest.skip(f"pinned on {pinned['environment']}, this is {environment()}: bits may differ by machine")
    got = epoch_fingerprint(case)
    assert {k: v for k, v in got.items() if v != pinned[case].get(k)} == {}
    assert set(got) == set(pinned[case])
