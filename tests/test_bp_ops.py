"""The BP step's operation-count work (issue 14) leaves every number as it was: whole training epochs against
fingerprints pinned from the code before it (``tests/bp_fingerprint.py``)."""

from __future__ import annotations

import json

import pytest

from tests.bp_fingerprint import CASES, PINNED, epoch_fingerprint


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_epochs_equal_the_pinned_fingerprints_bit_for_bit(case):
    pinned = json.loads(PINNED.read_text())[case]
    got = epoch_fingerprint(case)
    assert {k: v for k, v in got.items() if v != pinned.get(k)} == {}
    assert set(got) == set(pinned)
