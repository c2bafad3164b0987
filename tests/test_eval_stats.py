"""Evaluation statistics: bootstrap CIs of a mean and paired run comparisons."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from flywheel.evals.stats import Interval, PairedComparison, compare_paired, mean_ci


def scores(n: int, seed: int, mean: float = 0.6, spread: float = 0.2) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(v) for v in np.clip(rng.normal(mean, spread, n), 0.0, 1.0)]


# --- mean_ci ------------------------------------------------------------------------------


def test_ci_contains_the_mean_and_narrows_with_n() -> None:
    small = mean_ci(scores(20, seed=1))
    large = mean_ci(scores(500, seed=1))
    for interval in (small, large):
        assert interval.low is not None and interval.high is not None
        assert interval.mean is not None
        assert interval.low < interval.mean < interval.high
    assert small.n == 20 and large.n == 500
    assert (large.high - large.low) < (small.high - small.low) / 2  # type: ignore[operator]


def test_ci_matches_the_known_mean_and_is_plausibly_wide() -> None:
    values = [0.0] * 50 + [1.0] * 50
    interval = mean_ci(values)
    assert interval.mean == 0.5
    # Binomial standard error is 0.05, so a 95% interval is about ±0.1.
    assert interval.low == pytest.approx(0.4, abs=0.03)
    assert interval.high == pytest.approx(0.6, abs=0.03)
    wider = mean_ci(values, confidence=0.99)
    assert wider.low < interval.low and wider.high > interval.high  # type: ignore[operator]


def test_ci_degenerate_inputs_need_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mean_ci([]) == Interval(None, None, None, 0)
        assert mean_ci([None, None]) == Interval(None, None, None, 0)
        assert mean_ci([0.7]) == Interval(0.7, 0.7, 0.7, 1)
        assert mean_ci([0.3, 0.3, 0.3]) == Interval(0.3, 0.3, 0.3, 3)


def test_ci_skips_none_and_is_deterministic() -> None:
    values: list[float | None] = [1.0, None, 0.0, 1.0, None, 1.0, 0.5]
    interval = mean_ci(values, seed=7)
    assert interval.n == 5
    assert interval.mean == pytest.approx(0.7)
    assert mean_ci(values, seed=7) == interval
    assert interval.to_dict() == {
        "mean": interval.mean,
        "low": interval.low,
        "high": interval.high,
        "n": 5,
    }


def test_ci_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="resamples"):
        mean_ci([1.0, 2.0], resamples=0)


# --- compare_paired -----------------------------------------------------------------------


def regression_pair(n: int = 100) -> tuple[list[float], list[float]]:
    baseline = scores(n, seed=3, mean=0.7, spread=0.15)
    noise = np.random.default_rng(4).normal(0.0, 0.05, n)
    candidate = [float(b - 0.08 + e) for b, e in zip(baseline, noise, strict=True)]
    return baseline, candidate


@pytest.mark.parametrize("test", ["permutation", "wilcoxon"])
def test_known_regression_is_detected(test: str) -> None:
    baseline, candidate = regression_pair()
    result = compare_paired(baseline, candidate, test=test)
    assert result.test == test
    assert result.n == 100
    assert result.p_value is not None and result.p_value < 0.001
    assert result.delta == pytest.approx(-0.08, abs=0.015)
    assert result.delta == pytest.approx(result.candidate_mean - result.baseline_mean)  # type: ignore[operator]
    assert result.ci_low < result.delta < result.ci_high < 0  # type: ignore[operator]
    assert result.significant and result.regressed and not result.improved
    assert result.losses > result.wins
    assert result.wins + result.ties + result.losses == 100


def test_swapping_runs_turns_a_regression_into_an_improvement() -> None:
    baseline, candidate = regression_pair()
    result = compare_paired(candidate, baseline)
    assert result.improved and not result.regressed
    assert result.delta is not None and result.delta > 0


def test_identical_runs_have_p_one_and_all_ties() -> None:
    values = scores(50, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for test in ("permutation", "wilcoxon"):
            result = compare_paired(values, list(values), test=test)
            assert result.p_value == 1.0
            assert result.delta == 0.0 and result.ci_low == 0.0 and result.ci_high == 0.0
            assert (result.wins, result.ties, result.losses) == (0, 50, 0)
            assert not (result.significant or result.improved or result.regressed)


def test_lower_is_better_flips_wins_and_direction() -> None:
    baseline = [100.0, 120.0, 90.0, 110.0, 105.0, 95.0, 130.0, 80.0, 100.0, 115.0]
    slower = [b + 20.0 + i for i, b in enumerate(baseline)]  # candidate is slower everywhere
    higher = compare_paired(baseline, slower, higher_is_better=True)
    lower = compare_paired(baseline, slower, higher_is_better=False)
    assert (higher.wins, higher.losses) == (10, 0)
    assert (lower.wins, lower.losses) == (0, 10)
    # Exact sign-flip test: only the observed and the all-flipped signs are as extreme.
    assert lower.p_value == pytest.approx(2 / 2**10)
    assert higher.improved and not higher.regressed
    assert lower.regressed and not lower.improved


def test_tie_tolerance() -> None:
    result = compare_paired([0.5, 0.5, 0.5], [0.5 + 1e-12, 0.6, 0.4])
    assert (result.wins, result.ties, result.losses) == (1, 1, 1)
    loose = compare_paired([0.5, 0.5, 0.5], [0.5 + 1e-12, 0.6, 0.4], tie_tolerance=0.2)
    assert (loose.wins, loose.ties, loose.losses) == (0, 3, 0)


def test_pairs_with_a_missing_side_are_dropped() -> None:
    baseline: list[float | None] = [1.0, None, 0.0, 1.0, 0.5]
    candidate: list[float | None] = [0.0, 1.0, None, 1.0, 0.5]
    result = compare_paired(baseline, candidate)
    assert result.n == 3
    assert result.baseline_mean == pytest.approx(2.5 / 3)
    assert result.candidate_mean == pytest.approx(1.5 / 3)
    assert (result.wins, result.ties, result.losses) == (0, 2, 1)


def test_no_pairs_and_one_pair() -> None:
    empty = compare_paired([None, 1.0], [0.5, None])
    assert empty.n == 0 and empty.delta is None and empty.p_value is None
    assert not empty.significant and (empty.wins, empty.ties, empty.losses) == (0, 0, 0)
    one = compare_paired([0.2], [0.9])
    assert one.n == 1 and one.delta == pytest.approx(0.7) and one.p_value == 1.0
    assert one.ci_low == one.ci_high == one.delta
    assert not one.significant


def test_same_seed_same_result_and_to_dict() -> None:
    baseline, candidate = regression_pair(60)
    first = compare_paired(baseline, candidate, seed=11)
    assert compare_paired(baseline, candidate, seed=11) == first
    as_dict = first.to_dict()
    assert as_dict["n"] == 60 and as_dict["test"] == "permutation"
    assert PairedComparison(**as_dict) == first


def test_compare_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="pair up"):
        compare_paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="test"):
        compare_paired([1.0], [1.0], test="t-test")
    with pytest.raises(ValueError, match="alpha"):
        compare_paired([1.0], [1.0], alpha=1.5)


def test_two_hundred_pairs_and_four_scorers_well_under_a_second() -> None:
    pairs = [regression_pair(200) for _ in range(4)]
    compare_paired(*pairs[0])  # warm scipy's imports out of the measurement
    started = time.perf_counter()
    for baseline, candidate in pairs:
        mean_ci(baseline)
        mean_ci(candidate)
        compare_paired(baseline, candidate)
    assert time.perf_counter() - started < 0.6
