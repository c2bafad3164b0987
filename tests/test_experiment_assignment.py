"""Sticky, stateless assignment of units to experiment variants."""

from __future__ import annotations

from collections import Counter

import pytest

from flywheel.experiments.assignment import assign, bucket_of


def test_the_same_unit_always_gets_the_same_variant() -> None:
    split = [("control", 0.5), ("candidate", 0.5)]
    first = [assign("exp-1", f"user-{i}", split) for i in range(200)]
    assert first == [assign("exp-1", f"user-{i}", split) for i in range(200)]
    # Another experiment splits the same users independently.
    other = [assign("exp-2", f"user-{i}", split) for i in range(200)]
    assert 60 < sum(a != b for a, b in zip(first, other, strict=True)) < 140


def test_shares_are_honoured() -> None:
    counts = Counter(
        assign("exp", f"u{i}", [("control", 0.9), ("candidate", 0.1)]) for i in range(20_000)
    )
    assert 0.085 < counts["candidate"] / 20_000 < 0.115


def test_growing_a_share_keeps_the_units_already_in_it() -> None:
    units = [f"session-{i}" for i in range(5000)]
    small = {
        u for u in units if assign("e", u, [("candidate", 0.05), ("control", 0.95)]) == "candidate"
    }
    large = {
        u for u in units if assign("e", u, [("candidate", 0.2), ("control", 0.8)]) == "candidate"
    }
    assert small and small <= large
    assert all(0 <= bucket_of("e", u) < 10_000 for u in units[:100])


@pytest.mark.parametrize("allocation", [[], [("a", 0.5), ("b", 0.4)], [("a", 1.2), ("b", -0.2)]])
def test_bad_allocations_are_refused(allocation: list[tuple[str, float]]) -> None:
    with pytest.raises(ValueError):
        assign("e", "u", allocation)
