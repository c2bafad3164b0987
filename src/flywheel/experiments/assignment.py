"""Sticky assignment of traffic to an experiment's variants.

A unit (a user, a session, the value of a header) is hashed with the experiment's id into one
of 10,000 buckets, and the buckets are cut by the variants' allocation in order. The same unit
always lands in the same variant of the same experiment, on every replica and after restarts,
with no state; two experiments split the same units independently. Growing a variant's share
(5 % -> 20 %) keeps everyone already in it there, because the cuts only move outwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["BUCKETS", "assign", "bucket_of"]

BUCKETS = 10_000


def bucket_of(experiment_id: str, unit: str) -> int:
    """The unit's bucket in ``[0, BUCKETS)`` for this experiment."""
    digest = hashlib.sha256(f"{experiment_id}\x00{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def assign(experiment_id: str, unit: str, allocation: Sequence[tuple[str, float]]) -> str:
    """The variant of ``allocation`` (``(name, share)`` pairs, shares summing to 1) that
    ``unit`` belongs to."""
    if not allocation:
        raise ValueError("an experiment needs at least one variant")
    total = sum(share for _, share in allocation)
    if any(share < 0 for _, share in allocation) or abs(total - 1.0) > 1e-6:
        raise ValueError(f"variant shares must be non-negative and sum to 1, not {total:g}")
    bucket = bucket_of(experiment_id, unit)
    edge = 0.0
    for name, share in allocation:
        edge += share * BUCKETS
        if bucket < round(edge):
            return name
    return allocation[-1][0]
