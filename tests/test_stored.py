"""The helper every comparison against numbers stored in the repository goes through."""

from __future__ import annotations

import pytest
from conftest import STORED_TOLERANCE, assert_matches_stored


def test_within_the_tolerance_passes():
    # the difference seen between an AMD EPYC and an Intel Xeon on the version-1 fixture
    assert_matches_stored([0.4454938471317291], [0.4454938769340515], "float32 probabilities")


@pytest.mark.parametrize("kind", sorted(STORED_TOLERANCE))
def test_beyond_the_tolerance_fails_naming_the_kind(kind):
    step = 3 * STORED_TOLERANCE[kind]
    with pytest.raises(AssertionError, match=kind):
        assert_matches_stored([0.5, 0.5 + step], [0.5, 0.5], kind, "probs")


def test_lengths_must_match():
    with pytest.raises(AssertionError, match="shape"):
        assert_matches_stored([0.5], [0.5, 0.5], "float32 probabilities")
