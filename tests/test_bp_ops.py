"""The BP step's operation-count work (issue 14) leaves every number as it was: whole training epochs (every
conductance, programming time, belief, neuron-circuit parameter, momentum buffer, metrics row and random stream
afterwards) equal, bit for bit, those of the functions it replaced (``tests/bp_reference.py``), and the
fingerprints pinned from the code before it where the machine is the one they were pinned on."""

from __future__ import annotations

import json

import pytest

import neurosim.crossbar
from neurosim.crossbar import Crossbar
from tests import bp_reference
from tests.bp_fingerprint import CASES, PINNED, environment, epoch_fingerprint


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_epochs_equal_the_old_functions_bit_for_bit(case):
    with bp_reference.frozen():
        assert Crossbar._written is bp_reference._written and neurosim.crossbar._fire is bp_reference._fire
        old = epoch_fingerprint(case)
    assert Crossbar._written is not bp_reference._written      # restored
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
