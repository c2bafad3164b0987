"""Pipelines of each project, stored as the YAML their authors wrote (comments kept),
validated on every save and versioned by a counter."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flywheel.errors import ServiceError
from flywheel.pipelines.spec import PipelineSpec, PipelineSpecError, parse_pipeline
from flywheel.security.audit import AuditLog
from flywheel.store import Database, Pipeline

MAX_CACHED_SPECS = 1000


class PipelineError(ServiceError):
    """A refused pipeline operation."""


def pipeline_to_dict(row: Pipeline, *, spec: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": row.name,
        "description": row.description,
        "version": row.version,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "updated_by": row.updated_by,
    }
    if spec:
        out["spec"] = row.spec
    return out


class PipelineStore:
    """Create, read, replace and delete pipelines; parsed specs are cached by version."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        # By row id and version: a deleted and recreated pipeline starts again at version 1.
        self._parsed: dict[tuple[str, int], PipelineSpec] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _row(session: Session, project_id: str, name: str) -> Pipeline:
        row = session.scalar(
            select(Pipeline).where(Pipeline.project_id == project_id, Pipeline.name == name)
        )
        if row is None:
            raise PipelineError(404, f"No pipeline '{name}'.", "not_found", "pipeline")
        return row

    def get(self, project_id: str, name: str) -> dict[str, Any]:
        """One pipeline with its YAML and step ids."""
        with self.db.session() as session:
            row = self._row(session, project_id, name)
            out = pipeline_to_dict(row)
        out["steps"] = self.spec(project_id, name).step_ids()
        return out

    def spec(self, project_id: str, name: str) -> PipelineSpec:
        """The parsed pipeline, as stored now."""
        with self.db.session() as session:
            row = self._row(session, project_id, name)
            key, text = (row.id, row.version), row.spec
        with self._lock:
            cached = self._parsed.get(key)
        if cached is not None:
            return cached
        parsed = self._parse(text, name)
        with self._lock:
            if len(self._parsed) >= MAX_CACHED_SPECS:
                self._parsed.clear()
            self._parsed[key] = parsed
        return parsed

    @staticmethod
    def _parse(text: str, name: str) -> PipelineSpec:
        try:
            return parse_pipeline(text, f"{name}.yaml")
        except PipelineSpecError as exc:
            raise PipelineError(
                400, "; ".join(exc.problems) or str(exc), "invalid_pipeline", "spec"
            ) from None

    def put(
        self, project_id: str, name: str, text: str, *, actor: str
    ) -> tuple[dict[str, Any], bool]:
        """Create or replace ``name`` with the YAML ``text`` (its ``name:`` must match);
        returns the pipeline and whether it was created. Same text: nothing changes."""
        parsed = self._parse(text, name)
        if parsed.name != name:
            raise PipelineError(
                400,
                f"The YAML names the pipeline '{parsed.name}', not '{name}'.",
                "invalid_value",
                "name",
            )
        now = time.time()
        try:
            with self.db.session() as session:
                row = session.scalar(
                    select(Pipeline).where(Pipeline.project_id == project_id, Pipeline.name == name)
                )
                created = row is None
                before = None if row is None else pipeline_to_dict(row)
                if row is None:
                    row = Pipeline(
                        id=uuid.uuid4().hex,
                        project_id=project_id,
                        name=name,
                        version=0,
                        created_at=now,
                    )
                    session.add(row)
                elif row.spec == text:
                    return pipeline_to_dict(row), False
                row.spec = text
                row.description = parsed.description
                row.version += 1
                row.updated_at = now
                row.updated_by = actor
                session.flush()
                self.audit.record(
                    actor=actor,
                    action="create" if created else "update",
                    resource_type="pipeline",
                    resource_id=name,
                    project_id=project_id,
                    before=before,
                    after=pipeline_to_dict(row),
                    session=session,
                )
                return pipeline_to_dict(row), created
        except IntegrityError:
            raise PipelineError(409, f"Pipeline '{name}' was saved concurrently; retry.") from None

    def delete(self, project_id: str, name: str, *, actor: str) -> None:
        with self.db.session() as session:
            row = self._row(session, project_id, name)
            before = pipeline_to_dict(row)
            session.delete(row)
            self.audit.record(
                actor=actor,
                action="delete",
                resource_type="pipeline",
                resource_id=name,
                project_id=project_id,
                before=before,
                session=session,
            )

    # Last in the class: the name 'list' would shadow the builtin in annotations below it.
    def list(self, project_id: str) -> list[dict[str, Any]]:
        """The project's pipelines (without their YAML), by name."""
        with self.db.session() as session:
            rows = session.scalars(
                select(Pipeline).where(Pipeline.project_id == project_id).order_by(Pipeline.name)
            )
            return [pipeline_to_dict(row, spec=False) for row in rows]


__all__ = ["PipelineError", "PipelineStore", "pipeline_to_dict"]
