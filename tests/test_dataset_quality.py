"""Dataset quality profile: duplicates, empty/overlong items, token statistics, roles, PII."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from flywheel.datasets.quality import (
    MAX_NEAR_DUPLICATE_PAIRS,
    PiiFinding,
    approximate_token_count,
    mask_pii,
    profile,
    scan_pii,
)


def item(
    user: str | None = None,
    *,
    expected: str | None = None,
    variables: dict[str, Any] | None = None,
    system: str | None = None,
    context: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    if user is not None:
        messages.append({"role": "user", "content": user})
    return {
        "messages": messages or None,
        "variables": variables,
        "expected": expected,
        "context": context or [],
        "metadata": metadata or {},
    }


FOX = (
    "the quick brown fox jumps over the lazy dog near the quiet river bank at dawn while "
    "three small birds sing in the old oak tree and a farmer walks his cows slowly home "
    "along the muddy lane today"
)


def kinds(text: str) -> list[tuple[str, str]]:
    return [(finding.kind, finding.text) for finding in scan_pii(text)]


# --- PII --------------------------------------------------------------------------------------


def test_scan_pii_finds_each_kind_with_spans() -> None:
    text = (
        "Mail jane.doe@example.com, call +44 20 7946 0958 or (555) 123-4567, "
        "card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, "
        "SSN 078-05-1120, host 192.168.1.20."
    )
    findings = scan_pii(text)
    assert [(f.kind, f.text) for f in findings] == [
        ("email", "jane.doe@example.com"),
        ("phone", "+44 20 7946 0958"),
        ("phone", "(555) 123-4567"),
        ("credit_card", "4111 1111 1111 1111"),
        ("iban", "DE89 3704 0044 0532 0130 00"),
        ("us_ssn", "078-05-1120"),
        ("ipv4", "192.168.1.20"),
    ]
    for finding in findings:
        assert text[finding.start : finding.end] == finding.text


def test_checksums_reject_invalid_numbers() -> None:
    assert kinds("card 4111111111111111") == [("credit_card", "4111111111111111")]
    assert kinds("card 4111111111111112") == []  # fails Luhn
    assert kinds("amex 3782-822463-10005") == [("credit_card", "3782-822463-10005")]
    assert kinds("iban GB82 WEST 1234 5698 7654 32") == [("iban", "GB82 WEST 1234 5698 7654 32")]
    assert kinds("iban GB82 WEST 1234 5698 7654 33") == []  # fails mod-97
    assert kinds("iban GB82WEST12345698765432") == [("iban", "GB82WEST12345698765432")]
    # A following upper-case word is not swallowed into the IBAN.
    assert kinds("pay DE89370400440532013000 EUR now") == [("iban", "DE89370400440532013000")]


def test_scan_pii_leaves_ordinary_numbers_alone() -> None:
    text = (
        "On 2024-01-15 order 12345678 shipped 3 items, version 1.2.3.4.5, "
        "SSN-like 000-12-3456 and 666-12-3456, octets 300.1.1.1, pi 3.14159"
    )
    assert scan_pii(text) == []


def test_mask_hides_all_but_a_hint() -> None:
    assert mask_pii(PiiFinding("email", 0, 20, "jane.doe@example.com")) == "j***@example.com"
    assert mask_pii(PiiFinding("ipv4", 0, 12, "192.168.1.20")) == "192.*.*.*"
    card = PiiFinding("credit_card", 0, 19, "4111 1111 1111 1111")
    assert mask_pii(card) == "**** **** **** 1111"
    assert mask_pii(PiiFinding("us_ssn", 0, 11, "078-05-1120")) == "***-**-1120"


def test_profile_pii_report_counts_items_kinds_and_masks() -> None:
    items = [
        item("write to bob@example.org", expected="call 555-123-4567"),
        item("nothing here"),
        item(None, variables={"card": "4111 1111 1111 1111", "n": 3}, context=["ip 10.0.0.1"]),
        item("invalid card 4111 1111 1111 1112"),
    ]
    pii = profile(items)["pii"]
    assert pii["items"] == 2
    assert pii["by_kind"] == {"email": 1, "phone": 1, "credit_card": 1, "ipv4": 1}
    assert pii["examples"] == [
        {"item": 0, "kind": "email", "field": "messages", "text": "b***@example.org"},
        {"item": 0, "kind": "phone", "field": "expected", "text": "***-***-4567"},
        {"item": 2, "kind": "credit_card", "field": "variables", "text": "**** **** **** 1111"},
        {"item": 2, "kind": "ipv4", "field": "context", "text": "10.*.*.*"},
    ]


def test_pii_examples_are_capped() -> None:
    items = [item(f"user{i}@example.com") for i in range(30)]
    pii = profile(items)["pii"]
    assert pii["items"] == 30 and pii["by_kind"] == {"email": 30}
    assert len(pii["examples"]) == 20


# --- duplicates -------------------------------------------------------------------------------


def test_exact_duplicates_ignore_metadata() -> None:
    items = [
        item("what is two plus two", expected="4", metadata={"id": 1}),
        item("something else entirely different"),
        item("what is two plus two", expected="4", metadata={"id": 2}),
        item("what is two plus two", expected="5"),
        item("something else entirely different"),
        item("what is two plus two", expected="4"),
    ]
    report = profile(items)
    assert report["exact_duplicates"] == [[0, 2, 5], [1, 4]]
    # 0 and 3 differ only in the answer: 3 of 5 shingles shared, 0.6 is below the threshold.
    assert report["near_duplicates"] == []


def test_near_duplicates_found_and_unrelated_items_not() -> None:
    items = [
        item(FOX, expected="ok"),
        item("completely different sentence about quantum chromodynamics and gluon fields"),
        item(FOX.replace("today", "again"), expected="ok"),  # one word changed
        item("a recipe for bread needs flour water salt yeast and patience overnight"),
        item(FOX, expected="ok", metadata={"copy": True}),  # exact duplicate of 0
    ]
    report = profile(items)
    assert report["exact_duplicates"] == [[0, 4]]
    pairs = report["near_duplicates"]
    assert [(p["a"], p["b"]) for p in pairs] == [(0, 2)]
    # True Jaccard: 2 of the 40 word 3-shingles differ on each side, 38/42 = 0.905.
    assert 0.8 <= pairs[0]["similarity"] < 1.0
    assert report["near_duplicates_truncated"] is False
    # A strict threshold drops the pair; the same input gives the same answer every time.
    assert profile(items, near_duplicate_threshold=0.99)["near_duplicates"] == []
    assert profile(items)["near_duplicates"] == pairs


def test_shared_system_prompt_does_not_make_items_near_duplicates() -> None:
    system = "You are a careful assistant. " * 30
    items = [
        item("translate good morning into french", system=system),
        item("what is the boiling point of water at sea level", system=system),
        item("name three primary colours used in painting", system=system),
    ]
    report = profile(items)
    assert report["near_duplicates"] == [] and report["exact_duplicates"] == []
    assert report["roles"] == {"system": 3, "user": 3}


def test_near_duplicate_pairs_are_capped() -> None:
    base = " ".join(f"word{i}" for i in range(60))
    items = [item(f"{base} tail{i}") for i in range(60)]  # 1770 similar pairs
    report = profile(items)
    assert len(report["near_duplicates"]) == MAX_NEAR_DUPLICATE_PAIRS
    assert report["near_duplicates_truncated"] is True


# --- empty, overlong, tokens, counts ----------------------------------------------------------


def test_empty_overlong_and_counts() -> None:
    items = [
        item("   ", expected="x"),
        item(None, variables={"a": "", "b": None}),
        item(None, variables={"n": 0}, expected=""),
        item("one two three four five six", context=["c"]),
        item("fine", expected=""),
    ]
    report = profile(items, max_tokens=5)
    assert report["items"] == 5
    assert report["with_expected"] == 3
    assert report["with_context"] == 1
    assert report["with_variables"] == 2
    assert report["empty"] == [0, 1]
    assert report["empty_expected"] == [2, 4]
    assert report["overlong"] == [3]
    assert report["roles"] == {"user": 3}


def test_token_stats_and_histogram() -> None:
    lengths = [1, 2, 2, 3, 10, 40]
    items = [item(" ".join(["w"] * n), expected="a b") for n in lengths]
    stats = profile(items)["tokens"]
    inputs = stats["input"]
    assert (inputs["count"], inputs["min"], inputs["max"]) == (6, 1, 40)
    assert inputs["mean"] == pytest.approx(sum(lengths) / 6, abs=0.01)
    assert inputs["p50"] == 2.5
    assert inputs["p95"] == pytest.approx(32.5)
    histogram = inputs["histogram"]
    assert sum(histogram["counts"]) == 6
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1
    assert histogram["edges"][0] == 1 and histogram["edges"][-1] == 40
    assert stats["expected"]["count"] == 6 and stats["expected"]["max"] == 2
    assert sum(stats["expected"]["histogram"]["counts"]) == 6


def test_custom_tokenizer_and_empty_expected_stats() -> None:
    items = [item("abcdef"), item("ab")]
    report = profile(items, count_tokens=len, max_tokens=4)
    assert report["tokens"]["input"]["max"] == 6
    assert report["overlong"] == [0]
    assert report["tokens"]["expected"]["count"] == 0
    assert report["tokens"]["expected"]["min"] is None
    assert report["tokens"]["expected"]["histogram"] == {"edges": [], "counts": []}


def test_approximate_token_count_counts_words_and_punctuation() -> None:
    assert approximate_token_count("Hello, world!") == 4
    assert approximate_token_count("") == 0


def test_profile_of_nothing_and_json_serialisable() -> None:
    report = profile([])
    assert report["items"] == 0 and report["exact_duplicates"] == []
    assert report["tokens"]["input"]["count"] == 0
    json.dumps(profile([item("a@b.co"), item(FOX)]))
    with pytest.raises(ValueError):
        profile([], near_duplicate_threshold=0)


def test_ten_thousand_short_items_are_fast() -> None:
    rng = random.Random(7)
    vocabulary = [f"w{i}" for i in range(500)]
    items = [
        item(
            " ".join(rng.choices(vocabulary, k=12)),
            expected=" ".join(rng.choices(vocabulary, k=4)),
            system="Be brief.",
        )
        for _ in range(10_000)
    ]
    items[9_999] = dict(items[0])
    started = time.perf_counter()
    report = profile(items)
    elapsed = time.perf_counter() - started
    assert report["items"] == 10_000
    assert [0, 9_999] in report["exact_duplicates"]
    assert sum(report["tokens"]["input"]["histogram"]["counts"]) == 10_000
    assert elapsed < 8.0, elapsed
