"""The approval workflow: a protected label (``production``) moves onto a version only after
a reviewer who is not the version's author approves, and, where a gate is configured, only
when the version passed it.

Stages register what can be approved (prompt versions now, model versions with the model
registry) as an :class:`ApprovalTarget`; approving moves the label in the same transaction
as the decision and its audit entry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.errors import ServiceError
from flywheel.security.audit import AuditLog
from flywheel.security.rbac import Permission, Principal
from flywheel.store import ApprovalRequest, Database

STATUSES = ("pending", "approved", "rejected", "cancelled")
DECISION_ACTIONS = {
    "approved": "approval.approve",
    "rejected": "approval.reject",
    "cancelled": "approval.cancel",
}
# Called with (project_id, resource_type, name, version); returns at least {"status": ...}
# where "passed" or "not_configured" lets an approval through and anything else blocks it.
Gate = Callable[[str, str, str, int], dict[str, Any]]


class ApprovalError(ServiceError):
    """A refused approval operation."""


class ApprovalTarget(Protocol):
    """A kind of versioned resource whose labels can be protected."""

    def is_protected(self, label: str) -> bool: ...

    def author_of(self, project_id: str, name: str, version: int) -> str:
        """The author identity of a version; raises a 404 ServiceError when it is missing."""
        ...

    def move_label(
        self,
        session: Session,
        project_id: str,
        name: str,
        label: str,
        version: int,
        actor: str,
        approval_id: str | None,
    ) -> dict[str, Any]: ...


def approval_to_dict(row: ApprovalRequest) -> dict[str, Any]:
    return {
        "id": row.id,
        "project_id": row.project_id,
        "resource_type": row.resource_type,
        "name": row.resource_name,
        "version": int(row.resource_version),
        "label": row.label,
        "requested_by": row.requested_by,
        "status": row.status,
        "gate": row.gate,
        "comment": row.comment,
        "created_at": row.created_at,
        "decided_by": row.decided_by,
        "decided_at": row.decided_at,
    }


def _not_configured(_project: str, _kind: str, _name: str, _version: int) -> dict[str, Any]:
    return {"status": "not_configured", "detail": "no eval gate suite is configured"}


class ApprovalService:
    """Requests, approvals and rejections, each audited."""

    def __init__(self, db: Database, audit: AuditLog, gate: Gate | None = None) -> None:
        self.db = db
        self.audit = audit
        self.gate = gate or _not_configured
        self.targets: dict[str, ApprovalTarget] = {}

    def register(self, resource_type: str, target: ApprovalTarget) -> None:
        self.targets[resource_type] = target

    def _target(self, resource_type: str) -> ApprovalTarget:
        target = self.targets.get(resource_type)
        if target is None:
            known = ", ".join(sorted(self.targets))
            raise ApprovalError(
                400,
                f"Nothing of type '{resource_type}' needs approval; types: {known}.",
                "invalid_value",
                "resource_type",
            )
        return target

    def request(
        self,
        caller: Principal,
        resource_type: str,
        name: str,
        version: int,
        label: str = "production",
        comment: str | None = None,
    ) -> dict[str, Any]:
        """Ask for ``label`` to move onto ``name@version``; the gate runs now and is kept."""
        target = self._target(resource_type)
        if not target.is_protected(label):
            raise ApprovalError(
                400,
                f"The '{label}' label needs no approval; move it directly.",
                "approval_not_needed",
                "label",
            )
        author = target.author_of(caller.project_id, name, version)
        gate = self.gate(caller.project_id, resource_type, name, version)
        with self.db.session() as session:
            pending = session.scalar(
                select(ApprovalRequest).where(
                    ApprovalRequest.project_id == caller.project_id,
                    ApprovalRequest.resource_type == resource_type,
                    ApprovalRequest.resource_name == name,
                    ApprovalRequest.resource_version == str(version),
                    ApprovalRequest.label == label,
                    ApprovalRequest.status == "pending",
                )
            )
            if pending is not None:
                raise ApprovalError(
                    409,
                    f"Approval request {pending.id} for {name}@{version} → '{label}' is "
                    "already pending.",
                    "conflict",
                )
            row = ApprovalRequest(
                id=uuid.uuid4().hex,
                project_id=caller.project_id,
                resource_type=resource_type,
                resource_name=name,
                resource_version=str(version),
                label=label,
                author=author,
                requested_by=caller.actor,
                status="pending",
                gate=gate,
                comment=comment,
                created_at=time.time(),
            )
            session.add(row)
            session.flush()
            self.audit.record(
                actor=caller.actor,
                action="approval.request",
                resource_type=resource_type,
                resource_id=f"{name}@{version}",
                project_id=caller.project_id,
                after=approval_to_dict(row),
                session=session,
            )
            return approval_to_dict(row)

    def _pending(self, session: Session, caller: Principal, approval_id: str) -> ApprovalRequest:
        row = session.get(ApprovalRequest, approval_id)
        if row is None or row.project_id != caller.project_id:
            raise ApprovalError(404, f"No approval request '{approval_id}'.", "not_found")
        if row.status != "pending":
            raise ApprovalError(
                409, f"Approval request {approval_id} is already {row.status}.", "conflict"
            )
        return row

    def _decide(
        self, session: Session, caller: Principal, row: ApprovalRequest, status: str, note: str
    ) -> dict[str, Any]:
        before = approval_to_dict(row)
        row.status, row.decided_by, row.decided_at = status, caller.actor, time.time()
        if note:
            row.comment = f"{row.comment}\n{note}" if row.comment else note
        session.flush()
        self.audit.record(
            actor=caller.actor,
            action=DECISION_ACTIONS[status],
            resource_type=row.resource_type,
            resource_id=f"{row.resource_name}@{row.resource_version}",
            project_id=row.project_id,
            before=before,
            after=approval_to_dict(row),
            session=session,
        )
        return approval_to_dict(row)

    def approve(self, caller: Principal, approval_id: str, comment: str = "") -> dict[str, Any]:
        """Approve and move the label (four-eyes: never by the version's author)."""
        with self.db.session() as session:
            row = self._pending(session, caller, approval_id)
            if caller.identity == row.author:
                raise ApprovalError(
                    403,
                    "The author of a version cannot approve it; another reviewer must.",
                    "four_eyes",
                )
            gate = row.gate or {}
            if gate.get("status") not in ("passed", "not_configured"):
                raise ApprovalError(
                    409,
                    f"The version did not pass the eval gate ({gate.get('status')}); "
                    "it cannot be approved.",
                    "gate_failed",
                )
            target = self._target(row.resource_type)
            decided = self._decide(session, caller, row, "approved", comment)
            decided["label_event"] = target.move_label(
                session,
                row.project_id,
                row.resource_name,
                row.label,
                int(row.resource_version),
                caller.actor,
                row.id,
            )
            return decided

    def reject(self, caller: Principal, approval_id: str, comment: str = "") -> dict[str, Any]:
        with self.db.session() as session:
            row = self._pending(session, caller, approval_id)
            return self._decide(session, caller, row, "rejected", comment)

    def cancel(self, caller: Principal, approval_id: str) -> dict[str, Any]:
        """Withdraw a pending request (its requester, or anyone who may decide it)."""
        with self.db.session() as session:
            row = self._pending(session, caller, approval_id)
            if row.requested_by != caller.actor and not caller.can(Permission.APPROVALS_DECIDE):
                raise ApprovalError(
                    403, "Only the requester or an approver can cancel a request.", "forbidden"
                )
            return self._decide(session, caller, row, "cancelled", "")

    def get(self, project_id: str, approval_id: str) -> dict[str, Any]:
        with self.db.session() as session:
            row = session.get(ApprovalRequest, approval_id)
            if row is None or row.project_id != project_id:
                raise ApprovalError(404, f"No approval request '{approval_id}'.", "not_found")
            return approval_to_dict(row)

    def list_requests(self, project_id: str, status: str | None = None) -> list[dict[str, Any]]:
        with self.db.session() as session:
            query = select(ApprovalRequest).where(ApprovalRequest.project_id == project_id)
            if status is not None:
                query = query.where(ApprovalRequest.status == status)
            rows = session.scalars(query.order_by(ApprovalRequest.created_at.desc()).limit(500))
            return [approval_to_dict(r) for r in rows]
