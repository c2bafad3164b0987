"""Loops as stored: start, list, show, resume, cancel, and the step updates the driver makes.

A loop is one row: its spec, the step it is at, and per step the job that ran it, its
attempts, its result or error. Every change is a compare-and-set on ``revision``, so when
several replicas drive the same loop exactly one of them moves it on (the others see zero
rows changed and look again at their next tick). Every status change is audited.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sqlalchemy import select, update

from flywheel.errors import ServiceError
from flywheel.loop.spec import STEPS, LoopSpec
from flywheel.security.audit import AuditLog
from flywheel.store import Database
from flywheel.store.db import changed_rows
from flywheel.store.models import Loop

__all__ = [
    "ACTIVE",
    "STATUSES",
    "LoopError",
    "LoopStore",
    "loop_to_dict",
    "step_states",
]

# running: a step's job is queued or running; waiting: for a reviewer or the canary;
# failed: a step failed (resume retries it); the rest are ends.
STATUSES = (
    "running",
    "waiting",
    "failed",
    "promoted",
    "rolled_back",
    "rejected",
    "not_enough_data",
    "gate_failed",
    "cancelled",
)
ACTIVE = ("running", "waiting")
RESUMABLE = ("failed",)


class LoopError(ServiceError):
    """A refused loop operation."""


def _new_step() -> dict[str, Any]:
    return {
        "status": "pending",
        "job_id": None,
        "jobs": [],
        "attempts": 0,
        "result": None,
        "error": None,
        "started_at": None,
        "finished_at": None,
    }


def step_states(loop: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A loop's steps (as :func:`loop_to_dict` lists them) keyed by name, as stored: what
    :meth:`LoopStore.save` takes back after a change."""
    return {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in loop["steps"]}


def loop_to_dict(row: Loop) -> dict[str, Any]:
    """A loop as the API shows it: its steps in order, each with its state."""
    steps = row.steps or {}
    return {
        "id": row.id,
        "route": row.route,
        "status": row.status,
        "step": row.step,
        "reason": row.reason,
        "spec": row.spec,
        "steps": [{"name": name, **steps.get(name, _new_step())} for name in STEPS],
        "revision": row.revision,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
    }


class LoopStore:
    """The loops table: what the API, the CLI and every replica's driver share."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    def create(
        self, project_id: str, spec: LoopSpec, actor: str, author_id: str | None = None
    ) -> dict[str, Any]:
        """A new loop at its first step (one active loop per route)."""
        now = time.time()
        with self.db.session() as session:
            active = session.scalar(
                select(Loop.id).where(
                    Loop.project_id == project_id,
                    Loop.route == spec.route,
                    Loop.status.in_(ACTIVE),
                )
            )
            if active is not None:
                raise LoopError(
                    409,
                    f"Loop {active} is already running on route '{spec.route}'; cancel it or "
                    "wait for it to end.",
                    "conflict",
                    "route",
                )
            row = Loop(
                id=uuid.uuid4().hex,
                project_id=project_id,
                route=spec.route,
                status="running",
                step=STEPS[0],
                spec=spec.model_dump(mode="json"),
                steps={name: _new_step() for name in STEPS},
                revision=0,
                created_at=now,
                created_by=actor,
                author_id=author_id or actor,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            found = loop_to_dict(row)
            self.audit.record(
                actor=actor,
                action="loop.start",
                resource_type="loop",
                resource_id=row.id,
                project_id=project_id,
                after={"route": spec.route, "spec": found["spec"]},
                session=session,
            )
        return found

    def _row(self, session: Any, project_id: str, loop_id: str) -> Loop:
        row = session.get(Loop, loop_id)
        if row is None or row.project_id != project_id:
            raise LoopError(404, f"No loop '{loop_id}'.", "not_found", "loop_id")
        return row

    def get(self, project_id: str, loop_id: str) -> dict[str, Any]:
        with self.db.session() as session:
            return loop_to_dict(self._row(session, project_id, loop_id))

    def load(self, loop_id: str) -> dict[str, Any]:
        """A loop by id, whatever its project (for the driver and the step jobs)."""
        with self.db.session() as session:
            row = session.get(Loop, loop_id)
            if row is None:
                raise LoopError(404, f"No loop '{loop_id}'.", "not_found", "loop_id")
            found = loop_to_dict(row)
            found["project_id"] = row.project_id
            found["author_id"] = row.author_id
            return found

    def list_loops(
        self, project_id: str, status: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The project's loops, newest first."""
        if status is not None and status not in STATUSES:
            raise LoopError(
                400,
                f"Unknown status '{status}'; statuses: {', '.join(STATUSES)}.",
                "invalid_value",
                "status",
            )
        query = select(Loop).where(Loop.project_id == project_id)
        if status is not None:
            query = query.where(Loop.status == status)
        with self.db.session() as session:
            rows = session.scalars(query.order_by(Loop.created_at.desc()).limit(limit))
            return [loop_to_dict(row) for row in rows]

    def active_ids(self) -> list[str]:
        """Every loop (in any project) that a driver has work on."""
        with self.db.session() as session:
            return list(session.scalars(select(Loop.id).where(Loop.status.in_(ACTIVE))))

    # -- changes ------------------------------------------------------------------------------

    def save(
        self,
        loop: dict[str, Any],
        *,
        status: str | None = None,
        step: str | None = None,
        steps: dict[str, Any] | None = None,
        reason: str | None = None,
        actor: str = "system:loop",
        action: str | None = None,
        audit_after: dict[str, Any] | None = None,
    ) -> bool:
        """Write the loop's new state if nobody changed it since ``loop`` was read (its
        ``revision``); False when someone did. ``action`` records an audit entry."""
        now = time.time()
        values: dict[str, Any] = {"revision": loop["revision"] + 1, "updated_at": now}
        if status is not None:
            values["status"] = status
            if status not in ACTIVE and status not in RESUMABLE:
                values["finished_at"] = now
            elif status in ACTIVE:
                values["finished_at"] = None
        if step is not None:
            values["step"] = step
        if steps is not None:
            values["steps"] = steps
        if reason is not None:
            values["reason"] = reason
        with self.db.session() as session:
            result = session.execute(
                update(Loop)
                .where(Loop.id == loop["id"], Loop.revision == loop["revision"])
                .values(**values)
            )
            if changed_rows(result) != 1:
                return False
            if action is not None:
                self.audit.record(
                    actor=actor,
                    action=action,
                    resource_type="loop",
                    resource_id=loop["id"],
                    project_id=loop["project_id"],
                    before={"status": loop["status"], "step": loop["step"]},
                    after={
                        "status": status or loop["status"],
                        "step": step or loop["step"],
                        **({"reason": reason} if reason else {}),
                        **(audit_after or {}),
                    },
                    session=session,
                )
        return True

    def resume(self, project_id: str, loop_id: str, actor: str) -> dict[str, Any]:
        """Run a failed loop's failed step again (a new job), keeping everything before it."""
        loop = self.load(loop_id)
        if loop["project_id"] != project_id:
            raise LoopError(404, f"No loop '{loop_id}'.", "not_found", "loop_id")
        if loop["status"] not in RESUMABLE:
            raise LoopError(
                409,
                f"Loop {loop_id} is {loop['status']}; only a failed loop resumes.",
                "conflict",
            )
        steps = step_states(loop)
        current = steps[loop["step"]]
        current.update(status="pending", job_id=None, error=None, attempts=0)
        if not self.save(
            loop,
            status="running",
            steps=steps,
            reason="",
            actor=actor,
            action="loop.resume",
        ):
            raise LoopError(409, f"Loop {loop_id} changed meanwhile; retry.", "conflict")
        return self.get(project_id, loop_id)

    def cancel(self, project_id: str, loop_id: str, actor: str) -> dict[str, Any]:
        """Stop a loop where it is (:meth:`LoopDriver.cancel` also stops what it has under
        way: its step's job, its pending approval request, its running experiment)."""
        for _ in range(5):
            loop = self.load(loop_id)
            if loop["project_id"] != project_id:
                raise LoopError(404, f"No loop '{loop_id}'.", "not_found", "loop_id")
            if loop["status"] not in (*ACTIVE, *RESUMABLE):
                raise LoopError(409, f"Loop {loop_id} is already {loop['status']}.", "conflict")
            if self.save(
                loop,
                status="cancelled",
                reason=f"cancelled by {actor} at step {loop['step']}",
                actor=actor,
                action="loop.cancel",
            ):
                return self.get(project_id, loop_id)
        raise LoopError(409, f"Loop {loop_id} keeps changing; retry.", "conflict")
