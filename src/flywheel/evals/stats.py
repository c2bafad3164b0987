"""Statistics for evaluation runs: bootstrap confidence intervals of a mean, and paired
comparisons of two runs over the same items (bootstrap CI of the delta plus a permutation or
Wilcoxon test). Everything is seeded, so the same inputs give the same numbers.

``None`` (and NaN) values are unscored items: :func:`mean_ci` skips them, and
:func:`compare_paired` drops a pair when either side is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats as scipy_stats

__all__ = ["TESTS", "Interval", "PairedComparison", "compare_paired", "mean_ci"]

TESTS = ("permutation", "wilcoxon")
# Above this many resamples the permutation test costs more than it tells.
MAX_PERMUTATION_RESAMPLES = 10_000

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval over ``n`` scored values (all None when n=0)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """How a candidate run compares with a baseline over ``n`` paired items.

    ``delta`` is candidate - baseline (the mean of the paired differences) with its paired
    bootstrap CI; ``wins``/``ties``/``losses`` count items from the candidate's view, honouring
    ``higher_is_better``; ``improved``/``regressed`` need significance (``p_value < alpha``).
    """

    n: int
    baseline_mean: float | None
    candidate_mean: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str
    wins: int
    ties: int
    losses: int
    significant: bool
    improved: bool
    regressed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {value}")


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _as_array(values: Sequence[float | None]) -> FloatArray:
    """Values as floats, missing ones as NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _bootstrap_mean_ci(
    values: FloatArray, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean; a degenerate sample (n=1, all equal) has none to
    resample, so its interval is the point itself (and scipy is spared a warning)."""
    mean = float(values.mean())
    if values.size < 2 or np.ptp(values) == 0.0:
        return mean, mean
    result = scipy_stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    # Rounding can leave a percentile a hair past the mean of a tight sample.
    return min(low, mean), max(high, mean)


def mean_ci(
    values: Sequence[float | None],
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The mean of the scored values with a seeded percentile-bootstrap confidence interval."""
    _check_fraction("confidence", confidence)
    _check_resamples(resamples)
    array = _as_array(values)
    scored = array[~np.isnan(array)]
    if scored.size == 0:
        return Interval(None, None, None, 0)
    low, high = _bootstrap_mean_ci(scored, confidence, resamples, seed)
    return Interval(float(scored.mean()), low, high, int(scored.size))


def _mean_statistic(sample: FloatArray, axis: int) -> Any:
    return np.mean(sample, axis=axis)


def _p_value(differences: FloatArray, test: str, resamples: int, seed: int) -> float:
    """Two-sided p-value that the paired differences are centred on zero."""
    if differences.size < 2 or not np.any(differences):
        # One pair's sign flip, or no difference at all, is as likely as what was seen (and
        # scipy would refuse the one or warn about the other).
        return 1.0
    if test == "wilcoxon":
        # Zero differences carry no sign; 'wilcox' drops them, as the classic test does.
        result: Any = scipy_stats.wilcoxon(differences, zero_method="wilcox")
        return float(result.pvalue)
    # One sample with permutation_type="samples" flips the sign of each difference: the
    # paired test. It is exact when 2**n fits in n_resamples.
    result = scipy_stats.permutation_test(
        (differences,),
        _mean_statistic,
        permutation_type="samples",
        vectorized=True,
        n_resamples=min(resamples, MAX_PERMUTATION_RESAMPLES),
        alternative="two-sided",
        rng=np.random.default_rng(seed),
    )
    return float(min(1.0, result.pvalue))


def compare_paired(
    baseline: Sequence[float | None],
    candidate: Sequence[float | None],
    *,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    test: str = "permutation",
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    tie_tolerance: float = 1e-9,
) -> PairedComparison:
    """Compare two runs' scores item by item (``baseline[i]`` and ``candidate[i]`` score the
    same item). ``resamples`` drives the bootstrap CI and the permutation test (capped at
    10,000 there). ``test`` is ``"permutation"`` (paired sign-flip) or ``"wilcoxon"``."""
    if len(baseline) != len(candidate):
        raise ValueError(
            f"baseline and candidate must pair up: {len(baseline)} vs {len(candidate)} scores"
        )
    if test not in TESTS:
        raise ValueError(f"test must be one of {', '.join(TESTS)}, got {test!r}")
    _check_fraction("alpha", alpha)
    _check_fraction("confidence", confidence)
    _check_resamples(resamples)
    if tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must not be negative, got {tie_tolerance}")

    base, cand = _as_array(baseline), _as_array(candidate)
    paired = ~(np.isnan(base) | np.isnan(cand))
    base, cand = base[paired], cand[paired]
    n = int(base.size)
    if n == 0:
        return PairedComparison(
            n=0,
            baseline_mean=None,
            candidate_mean=None,
            delta=None,
            ci_low=None,
            ci_high=None,
            p_value=None,
            test=test,
            wins=0,
            ties=0,
            losses=0,
            significant=False,
            improved=False,
            regressed=False,
        )

    differences = cand - base
    delta = float(differences.mean())
    ci_low, ci_high = _bootstrap_mean_ci(differences, confidence, resamples, seed)
    p_value = _p_value(differences, test, resamples, seed)

    better = differences > tie_tolerance
    worse = differences < -tie_tolerance
    if not higher_is_better:
        better, worse = worse, better
    wins, losses = int(better.sum()), int(worse.sum())

    significant = p_value < alpha
    good_direction = delta > 0 if higher_is_better else delta < 0
    bad_direction = delta < 0 if higher_is_better else delta > 0
    return PairedComparison(
        n=n,
        baseline_mean=float(base.mean()),
        candidate_mean=float(cand.mean()),
        delta=delta,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=p_value,
        test=test,
        wins=wins,
        ties=n - wins - losses,
        losses=losses,
        significant=significant,
        improved=significant and good_direction,
        regressed=significant and bad_direction,
    )
