"""Sequential tests for experiments: always-valid p-values and confidence sequences.

An experiment looks at its metric after every batch of traffic, so a fixed-sample test would
promote far more often than its alpha says. The mixture sequential probability ratio test
(mSPRT; Johari, Pekelis and Walsh, "Always valid inference", 2017) stays valid under any number
of looks: with a normal mixing distribution N(0, tau^2) over the effect and the difference of
means d ~ N(effect, v) (the central limit approximation, with v = s_a^2/n_a + s_b^2/n_b), the
mixture likelihood ratio against "no effect" is

    L = sqrt(v / (v + tau^2)) * exp(tau^2 d^2 / (2 v (v + tau^2)))

and ``p = min over looks of 1/L`` is an always-valid p-value. The matching confidence
sequence is d +- sqrt(v (v + tau^2) / tau^2 * (2 ln(1/alpha) + ln((v + tau^2) / v))).
``tau`` is the effect size the test is tuned to find fastest, in the metric's units.

Arms are kept as running sums (:class:`ArmStats`), so an experiment stores three numbers per
arm and metric, and a look costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["ArmStats", "Decision", "SequentialResult", "sequential_test"]

Decision = Literal["continue", "win", "loss"]
# Below this a variance estimate is treated as this (an arm of identical values).
_VARIANCE_FLOOR = 1e-9


@dataclass(frozen=True)
class ArmStats:
    """Count, sum and sum of squares of one arm's metric values."""

    n: int = 0
    total: float = 0.0
    total_squares: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> ArmStats:
        floats = [float(value) for value in values]
        return cls(len(floats), math.fsum(floats), math.fsum(v * v for v in floats))

    def add(self, value: float) -> ArmStats:
        """These stats with one more value."""
        return ArmStats(self.n + 1, self.total + value, self.total_squares + value * value)

    def merge(self, other: ArmStats) -> ArmStats:
        return ArmStats(
            self.n + other.n, self.total + other.total, self.total_squares + other.total_squares
        )

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """The unbiased sample variance (None below two values)."""
        if self.n < 2:
            return None
        centred = self.total_squares - self.total * self.total / self.n
        return max(centred / (self.n - 1), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SequentialResult:
    """One look at an experiment's metric: candidate minus control.

    ``p_value`` is always valid (the running minimum, given the previous look's value);
    ``ci_low``/``ci_high`` are the confidence sequence at level 1 - alpha. ``decision`` is
    ``win``/``loss`` only once both arms have ``min_samples`` and ``p_value <= alpha``; a
    loss is a significant difference in the worse direction (``higher_is_better``).
    """

    control_n: int
    candidate_n: int
    control_mean: float | None
    candidate_mean: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float
    decision: Decision

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(alpha: float, tau: float, min_samples: int) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
    if not tau > 0.0 or math.isinf(tau):
        raise ValueError(f"tau must be a positive number, not {tau}")
    if min_samples < 2:
        raise ValueError(f"min_samples must be at least 2, not {min_samples}")


def sequential_test(
    control: ArmStats,
    candidate: ArmStats,
    *,
    alpha: float = 0.05,
    tau: float = 0.1,
    min_samples: int = 100,
    higher_is_better: bool = True,
    previous_p: float = 1.0,
) -> SequentialResult:
    """The mSPRT look at ``candidate`` against ``control`` (see the module's docstring).

    ``previous_p`` is the p-value of the previous look (1.0 at the first): the p-value never
    rises, which is what makes stopping at any look safe. It only starts to fall once both
    arms have ``min_samples`` values.
    """
    _check(alpha, tau, min_samples)
    nothing = SequentialResult(
        control.n,
        candidate.n,
        control.mean,
        candidate.mean,
        None,
        None,
        None,
        min(previous_p, 1.0),
        "continue",
    )
    control_variance, candidate_variance = control.variance, candidate.variance
    if control_variance is None or candidate_variance is None:
        return nothing
    assert control.mean is not None and candidate.mean is not None
    delta = candidate.mean - control.mean
    v = max(
        control_variance / control.n + candidate_variance / candidate.n,
        _VARIANCE_FLOOR / min(control.n, candidate.n),
    )
    tau2 = tau * tau
    # log L, kept in logs: L overflows a float long before the test is in doubt.
    log_ratio = 0.5 * math.log(v / (v + tau2)) + tau2 * delta * delta / (2 * v * (v + tau2))
    p_value = min(previous_p, 1.0)
    # Before min_samples the variance estimates are too rough to trust a small p.
    enough = min(control.n, candidate.n) >= min_samples
    if enough and log_ratio > 0:
        p_value = min(p_value, math.exp(-log_ratio))
    half_width = math.sqrt(
        v * (v + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log((v + tau2) / v))
    )
    decision: Decision = "continue"
    if enough and p_value <= alpha and delta != 0:
        better = delta > 0 if higher_is_better else delta < 0
        decision = "win" if better else "loss"
    return SequentialResult(
        control.n,
        candidate.n,
        control.mean,
        candidate.mean,
        delta,
        delta - half_width,
        delta + half_width,
        p_value,
        decision,
    )
