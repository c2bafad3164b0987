"""What an experiment is made of, as the API takes it: variants, unit, metric, guardrails.

Checked in two steps: the shape here (pydantic; a 400 naming the field), then against the
running config and the prompt registry in :mod:`flywheel.experiments.store`.
"""

from __future__ import annotations

import math
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel.errors import ServiceError

__all__ = ["DEFAULT_GUARDRAILS", "MODES", "ExperimentSpec", "Guardrails", "Metric", "Variant"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# "user" (the OpenAI ``user`` field), "session" (the x-flywheel-session header) or
# "header:<name>" (any request header).
UNIT_PATTERN = re.compile(r"^(user|session|header:[A-Za-z0-9-]{1,100})$")
METRIC_PATTERN = re.compile(r"^(feedback|judge:[A-Za-z0-9_.:-]{1,120})$")
PROMPT_REF_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*@[0-9]+$")
# "canary": the variants share the traffic and each serves its own; "shadow": the control
# serves every call and the candidate answers a mirrored copy that is scored, never returned.
MODES = ("canary", "shadow")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(_Strict):
    """One arm: the route as configured (neither set), a pinned prompt version, a catalog
    model, or both; ``share`` of the traffic."""

    name: str = Field(pattern=NAME_PATTERN)
    prompt: str | None = Field(default=None, max_length=200)
    model: str | None = Field(default=None, max_length=128)
    share: float = Field(gt=0, le=1)

    @field_validator("prompt")
    @classmethod
    def _pinned(cls, value: str | None) -> str | None:
        # A label would move under the experiment; a variant is one exact version.
        if value is not None and not PROMPT_REF_PATTERN.match(value):
            raise ValueError("a variant's prompt is 'NAME@VERSION' (a version number)")
        return value


class Metric(_Strict):
    """The primary metric: thumbs and ratings (``feedback``) or an online judge's score
    (``judge:<score name>``), each a value in [0, 1] per trace."""

    source: str = "feedback"
    higher_is_better: bool = True

    @field_validator("source")
    @classmethod
    def _known(cls, value: str) -> str:
        if not METRIC_PATTERN.match(value):
            raise ValueError("source is 'feedback' or 'judge:<score name>'")
        return value


class Guardrails(_Strict):
    """Limits on the candidate against the control; a breach rolls back at the next look.

    Checked once both arms have ``min_samples`` calls: an error rate (failed calls, and
    calls where a target failed before a fallback answered) more than
    ``max_error_rate_increase`` above the control's, a p95 latency more than
    ``max_latency_p95_ratio`` times the control's (and ``min_latency_increase_ms`` above
    it), a mean cost more than ``max_cost_ratio`` times the control's, a share of calls
    with a guard hit (an input or output guard that blocked, flagged or redacted) more than
    ``max_guard_hit_rate_increase`` above the control's."""

    max_error_rate_increase: float | None = Field(default=0.05, ge=0, le=1)
    max_latency_p95_ratio: float | None = Field(default=3.0, gt=0)
    # A slower p95 breaches only when it is also this much slower: at a few milliseconds,
    # jitter alone makes ratios of 3.
    min_latency_increase_ms: float = Field(default=250.0, ge=0)
    max_cost_ratio: float | None = Field(default=None, gt=0)
    max_guard_hit_rate_increase: float | None = Field(default=None, ge=0, le=1)
    min_samples: int = Field(default=20, ge=1, le=1_000_000)


DEFAULT_GUARDRAILS = Guardrails()


class ExperimentSpec(_Strict):
    """The body of ``POST /api/experiments``."""

    name: str = Field(min_length=1, max_length=200)
    route: str = Field(min_length=1, max_length=128)
    variants: list[Variant] = Field(min_length=2, max_length=2)
    control: str | None = Field(
        default=None, description="The control variant's name; default: the first variant."
    )
    mode: str = Field(
        default="canary",
        description="canary: the variants split the traffic; shadow: the control serves every "
        "call and the candidate's share is mirrored to it in the background, scored, not served.",
    )
    unit: str = "user"
    metric: Metric = Field(default_factory=Metric)
    guardrails: Guardrails = Field(default_factory=Guardrails)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    tau: float = Field(default=0.1, gt=0, le=100)
    min_samples: int = Field(default=100, ge=2, le=10_000_000)

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        if not UNIT_PATTERN.match(value):
            raise ValueError("unit is 'user', 'session' or 'header:<name>'")
        return value

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in MODES:
            raise ValueError(f"mode is one of: {', '.join(MODES)}")
        return value

    def check(self) -> ExperimentSpec:
        """The checks across fields (a 400 naming the field); fills in the control."""
        if self.mode == "shadow" and self.metric.source == "feedback":
            # Users rate what they were served; a mirrored answer is never seen, never rated.
            raise ServiceError(
                400,
                "A shadow experiment's metric must be an online judge's score "
                "('judge:<score name>'): feedback only exists for served answers.",
                "invalid_value",
                "metric.source",
            )
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ServiceError(400, "Variant names must be unique.", "invalid_value", "variants")
        total = math.fsum(v.share for v in self.variants)
        if abs(total - 1.0) > 1e-6:
            raise ServiceError(
                400, f"Variant shares must sum to 1, not {total:g}.", "invalid_value", "variants"
            )
        if self.control is None:
            self.control = names[0]
        elif self.control not in names:
            raise ServiceError(
                400,
                f"The control '{self.control}' is not one of the variants: {', '.join(names)}.",
                "invalid_value",
                "control",
            )
        return self

    @property
    def candidate(self) -> Variant:
        """The one variant that is not the control."""
        return next(v for v in self.variants if v.name != self.control)
