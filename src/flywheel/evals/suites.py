"""Eval suites: a dataset (version), a target, scorers and thresholds, stored per project.

A suite is declared in ``flywheel.yaml`` (under ``suites:``, applied with ``flywheel apply``)
or through the API. The target is anything the gateway answers to: a route, a catalog model
or ``prompt:NAME@LABEL``. For a prompt suite, a run may name just another label or version
of the same prompt (``production``, ``@4``, ``4``): :func:`expand_target`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select

from flywheel.config.schema import RESOURCE_NAME_PATTERN
from flywheel.errors import ServiceError
from flywheel.evals.base import AnyScorer, ScorerError, build_scorer
from flywheel.security.audit import AuditLog
from flywheel.store import Database, EvalSuite

PROMPT_PREFIX = "prompt:"
_LABEL_OR_VERSION = re.compile(r"^@?([a-z][a-z0-9_-]{0,63}|[0-9]{1,9})$")


class EvalError(ServiceError):
    """A refused eval operation."""


class SuiteSpec(BaseModel):
    """What a suite declares. Thresholds name scorers: a run passes when each scorer's mean
    is at least its threshold (at most, for lower-is-better scorers like latency)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN)]
    description: str = ""
    dataset: Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN)]
    dataset_version: Annotated[int | None, Field(ge=1, le=2**63 - 1)] = None  # a SQL integer
    split: Literal["train", "test"] | None = None
    target: Annotated[str, Field(min_length=1, max_length=256)]
    params: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0, "max_tokens": 256})
    scorers: Annotated[list[str | dict[str, Any]], Field(min_length=1, max_length=32)]
    thresholds: dict[str, float] = Field(default_factory=dict)
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    cache: bool = True
    alpha: Annotated[float, Field(gt=0, lt=1)] = 0.05

    @field_validator("params")
    @classmethod
    def _no_routing_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("model", "messages", "stream", "variables"):
            if key in value:
                raise ValueError(f"'{key}' is set by the run, not by params")
        return value

    def build_scorers(self) -> list[AnyScorer]:
        """The suite's scorers; a ScorerError names a bad one, and thresholds must name
        scorers the suite has."""
        scorers = [build_scorer(spec) for spec in self.scorers]
        names = [scorer.name for scorer in scorers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ScorerError(
                f"scorer names must be unique: {', '.join(duplicates)} appears twice "
                "(give one a 'name')"
            )
        unknown = sorted(set(self.thresholds) - set(names))
        if unknown:
            raise ScorerError(
                f"thresholds name unknown scorers: {', '.join(unknown)}; "
                f"the suite's scorers are {', '.join(names)}",
                "thresholds",
            )
        return scorers


def parse_suite(data: Any) -> SuiteSpec:
    """A checked suite from a request body or a config file (a 400 naming the field)."""
    try:
        spec = SuiteSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "suite"
        raise EvalError(
            400, f"Invalid suite field '{where}': {first['msg']}", "invalid_value", where
        ) from None
    spec.build_scorers()
    return spec


def is_prompt(target: str) -> bool:
    return target.startswith(PROMPT_PREFIX)


def expand_target(suite_target: str, value: str) -> str:
    """``value`` as a full target: for a prompt suite, a bare label or version (or ``@x``)
    means that label or version of the suite's prompt; anything else is taken as is."""
    if is_prompt(suite_target) and not is_prompt(value):
        match = _LABEL_OR_VERSION.match(value)
        if match:
            prompt = suite_target[len(PROMPT_PREFIX) :].partition("@")[0]
            return f"{PROMPT_PREFIX}{prompt}@{match.group(1)}"
    return value


def _suite_to_dict(row: EvalSuite) -> dict[str, Any]:
    return {**row.definition, "updated_at": row.updated_at, "updated_by": row.updated_by}


class EvalSuites:
    """Stored suites of every project."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    def overview(self, project_id: str) -> list[dict[str, Any]]:
        """Every suite of the project, with who changed it last and when."""
        query = select(EvalSuite).where(EvalSuite.project_id == project_id).order_by(EvalSuite.name)
        with self.db.session() as session:
            return [_suite_to_dict(row) for row in session.scalars(query)]

    def specs(self, project_id: str) -> list[SuiteSpec]:
        """Every suite of the project, by name, as declared."""
        query = select(EvalSuite).where(EvalSuite.project_id == project_id).order_by(EvalSuite.name)
        with self.db.session() as session:
            return [SuiteSpec.model_validate(row.definition) for row in session.scalars(query)]

    def get(self, project_id: str, name: str) -> SuiteSpec:
        with self.db.session() as session:
            row = session.scalar(
                select(EvalSuite).where(EvalSuite.project_id == project_id, EvalSuite.name == name)
            )
            if row is None:
                raise EvalError(404, f"No eval suite '{name}'.", "not_found", "suite")
            return SuiteSpec.model_validate(row.definition)

    def put(self, project_id: str, spec: SuiteSpec, author: str) -> tuple[dict[str, Any], bool]:
        """Create or replace a suite; returns it and whether anything changed."""
        definition = spec.model_dump(mode="json")
        with self.db.session() as session:
            row = session.scalar(
                select(EvalSuite).where(
                    EvalSuite.project_id == project_id, EvalSuite.name == spec.name
                )
            )
            before = row.definition if row is not None else None
            if before == definition and row is not None:
                return _suite_to_dict(row), False
            if row is None:
                row = EvalSuite(id=uuid.uuid4().hex, project_id=project_id, name=spec.name)
                session.add(row)
            row.definition, row.updated_at, row.updated_by = definition, time.time(), author
            self.audit.record(
                actor=author,
                action="eval.suite.put",
                resource_type="eval_suite",
                resource_id=spec.name,
                project_id=project_id,
                before=before,
                after=definition,
                session=session,
            )
            session.flush()
            return _suite_to_dict(row), True

    def delete(self, project_id: str, name: str, author: str) -> None:
        with self.db.session() as session:
            row = session.scalar(
                select(EvalSuite).where(EvalSuite.project_id == project_id, EvalSuite.name == name)
            )
            if row is None:
                raise EvalError(404, f"No eval suite '{name}'.", "not_found", "suite")
            self.audit.record(
                actor=author,
                action="eval.suite.delete",
                resource_type="eval_suite",
                resource_id=name,
                project_id=project_id,
                before=row.definition,
                session=session,
            )
            session.delete(row)
