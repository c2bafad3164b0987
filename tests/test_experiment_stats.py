"""The sequential test behind experiments: always-valid p-values and confidence sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flywheel.experiments.stats import ArmStats, sequential_test


def _run(
    rng: np.random.Generator,
    control_rate: float,
    candidate_rate: float,
    *,
    batch: int = 25,
    limit: int = 3000,
    alpha: float = 0.05,
) -> tuple[str, int]:
    """Bernoulli traffic split evenly, one look per batch: the decision and samples used."""
    control, candidate, p = ArmStats(), ArmStats(), 1.0
    while control.n < limit:
        control = control.merge(ArmStats.of(rng.random(batch) < control_rate))
        candidate = candidate.merge(ArmStats.of(rng.random(batch) < candidate_rate))
        look = sequential_test(control, candidate, alpha=alpha, min_samples=50, previous_p=p)
        assert look.p_value <= p  # never rises
        p = look.p_value
        if look.decision != "continue":
            return look.decision, control.n
    return "continue", control.n


def test_arm_stats_match_numpy() -> None:
    values = [0.2, 0.9, 0.4, 1.0, 0.0, 0.75]
    stats = ArmStats.of(values)
    assert stats.n == 6 and stats.mean == pytest.approx(np.mean(values))
    assert stats.variance == pytest.approx(np.var(values, ddof=1))
    assert ArmStats.of(values[:2]).merge(ArmStats.of(values[2:])) == stats
    assert ArmStats().mean is None and ArmStats.of([1.0]).variance is None


def test_the_mixture_ratio_matches_the_formula() -> None:
    control = ArmStats.of([0.0, 1.0] * 100)  # mean 0.5
    candidate = ArmStats.of([0.0, 1.0, 1.0, 1.0] * 50)  # mean 0.75
    look = sequential_test(control, candidate, tau=0.1, min_samples=10)
    v = control.variance / 200 + candidate.variance / 200  # type: ignore[operator]
    tau2 = 0.01
    ratio = math.sqrt(v / (v + tau2)) * math.exp(tau2 * 0.25**2 / (2 * v * (v + tau2)))
    assert look.delta == pytest.approx(0.25)
    assert look.p_value == pytest.approx(1 / ratio)
    assert look.decision == "win" and look.ci_low > 0  # type: ignore[operator]
    # The same data read the other way round is a loss for the candidate.
    assert sequential_test(candidate, control, tau=0.1, min_samples=10).decision == "loss"
    # Lower is better (latency, cost): the same difference is a loss.
    worse = sequential_test(control, candidate, tau=0.1, min_samples=10, higher_is_better=False)
    assert worse.decision == "loss"


def test_nothing_is_decided_before_min_samples() -> None:
    control, candidate = ArmStats.of([0.0] * 30), ArmStats.of([1.0] * 30)
    look = sequential_test(control, candidate, min_samples=50)
    assert look.decision == "continue" and look.p_value == 1.0 and look.delta == 1.0
    assert sequential_test(ArmStats.of([1.0]), candidate).delta is None


def test_a_real_difference_is_found_in_either_direction() -> None:
    rng = np.random.default_rng(7)
    decisions = [_run(rng, 0.55, 0.70) for _ in range(20)]
    assert sum(d == "win" for d, _ in decisions) >= 19
    assert all(d != "loss" for d, _ in decisions)
    assert sum(d == "loss" for d, _ in (_run(rng, 0.70, 0.55) for _ in range(20))) >= 19


def test_aa_experiments_promote_at_most_alpha_of_the_time() -> None:
    """Looking after every batch must not inflate the false-promotion rate past alpha (a
    fixed-sample z-test looked at this often would decide wrongly several times as often)."""
    rng = np.random.default_rng(11)
    runs = 300
    decided = sum(_run(rng, 0.6, 0.6, limit=1500)[0] != "continue" for _ in range(runs))
    # alpha = 0.05 two-sided; allow sampling noise (binomial sd at 300 runs is ~1.3 %).
    assert decided / runs <= 0.05 + 0.03


def test_the_confidence_sequence_covers_the_true_difference() -> None:
    rng = np.random.default_rng(3)
    misses = 0
    for _ in range(100):
        control = ArmStats.of(rng.random(400) < 0.5)
        candidate = ArmStats.of(rng.random(400) < 0.6)
        look = sequential_test(control, candidate, min_samples=10)
        assert look.ci_low is not None and look.ci_high is not None
        misses += not look.ci_low <= 0.1 <= look.ci_high
    assert misses <= 5


@pytest.mark.parametrize(
    ("option", "value"),
    [("alpha", 0.0), ("alpha", 1.0), ("tau", 0.0), ("tau", math.inf), ("min_samples", 1)],
)
def test_bad_settings_are_refused(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        sequential_test(ArmStats(), ArmStats(), **{option: value})  # type: ignore[arg-type]
