"""What a run of ``flywheel loop`` is told: which bad answers to learn from, how to train, the
eval gate, the approval and the canary. Every field has a default, so ``{"route": "chat"}``
is a whole spec; the shape is checked here (a 400 naming the field), the route against the
running config when the loop starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flywheel.errors import ServiceError
from flywheel.experiments.spec import UNIT_PATTERN, Guardrails

__all__ = ["STEPS", "CanarySpec", "GateSpec", "LoopSpec", "parse_loop_spec"]

# The loop's steps, in order. Each runs as a job; "approval" then waits for the reviewer's
# decision and "decision" first waits for the canary's verdict.
STEPS = ("collect", "dataset", "train", "register", "gate", "approval", "canary", "decision")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateSpec(_Strict):
    """The eval gate: the candidate and the production route answer the dataset's held-out
    items; the candidate passes when ``scorer``'s mean beats production's by at least
    ``min_improvement`` and no scorer regressed significantly (paired test at ``alpha``)."""

    scorer: str | dict[str, Any] = Field(default="token_f1")
    min_improvement: float = Field(default=0.0, ge=-1, le=1)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    max_tokens: int = Field(default=128, ge=1, le=4096)
    max_items: int = Field(default=200, ge=1, le=10_000)


class CanarySpec(_Strict):
    """The canary experiment the approved candidate runs in: its share of the route's
    traffic, the sticky unit, the primary metric (``feedback`` or ``judge:<name>``), the
    sample size before the sequential test may decide, and the guardrails."""

    share: float = Field(default=0.1, gt=0, lt=1)
    unit: str = "user"
    metric: str = "feedback"
    min_samples: int = Field(default=100, ge=2, le=10_000_000)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    guardrails: Guardrails = Field(default_factory=Guardrails)

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        if not UNIT_PATTERN.match(value):
            raise ValueError("unit is 'user', 'session' or 'header:<name>'")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value != "feedback" and not value.startswith("judge:"):
            raise ValueError("metric is 'feedback' or 'judge:<score name>'")
        return value


class LoopSpec(_Strict):
    """The body of ``POST /api/loops``."""

    route: str = Field(min_length=1, max_length=128)
    method: Literal["sft", "dpo"] = "sft"
    window_hours: float = Field(
        default=168.0, gt=0, le=24 * 366, description="How far back to look for bad answers."
    )
    max_rating: float = Field(
        default=0.25, ge=0, le=1, description="Feedback at or below this is a bad answer."
    )
    judge: str | None = Field(
        default=None,
        max_length=120,
        description="An online judge's score name: traces it scored at or below "
        "judge_threshold are bad answers too.",
    )
    judge_threshold: float = Field(default=0.5, ge=0, le=1)
    include_positive: bool = Field(
        default=True,
        description="Also train on well-rated answers (rating at least 0.75), so the model "
        "keeps what it did well (SFT only).",
    )
    min_examples: int = Field(
        default=8, ge=1, le=1_000_000, description="Fewer corrected bad answers end the loop."
    )
    max_examples: int = Field(default=5000, ge=1, le=100_000)
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    base: str | None = Field(
        default=None,
        max_length=300,
        description="The model to tune (default: the model the route serves).",
    )
    model_name: str | None = Field(
        default=None,
        pattern=NAME_PATTERN,
        description="The registry model the loop's versions go to (default: loop-<route>).",
    )
    train: dict[str, Any] = Field(default_factory=dict, description="Tuning settings.")
    gate: GateSpec = Field(default_factory=GateSpec)
    approval_label: str = Field(default="production", pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    canary: CanarySpec = Field(default_factory=CanarySpec)

    @property
    def registry_name(self) -> str:
        """The registry model of the merged versions (adapters go to ``<it>-adapter``)."""
        if self.model_name:
            return self.model_name
        safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in self.route)
        return f"loop-{safe}"[:100]


def parse_loop_spec(values: dict[str, Any]) -> LoopSpec:
    """A spec from a request body, or a 400 naming the first bad field."""
    try:
        return LoopSpec.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ServiceError(400, f"{where}: {message}", "invalid_value", where) from None
