"""Config as code: the applied instance config (providers, catalog, routes) lives in the
database as numbered revisions, so every replica runs the same one and history is kept."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from flywheel.config.schema import FlywheelConfig
from flywheel.store import ConfigRevision, Database

SECTIONS = ("providers", "models", "routes")


@dataclass(frozen=True)
class Change:
    """One line of a plan: what applying a file does to one object."""

    kind: str  # provider | model | route | prompt | label
    name: str
    action: str  # create | update | delete | unchanged | approval
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "action": self.action, "detail": self.detail}


def document_hash(document: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _items(document: dict[str, Any], section: str) -> dict[str, Any]:
    value = document.get(section) or ({} if section == "providers" else [])
    if section == "providers":
        return dict(value)
    return {item["name"]: item for item in value}


def plan_instance(current: dict[str, Any], wanted: dict[str, Any]) -> list[Change]:
    """Changes from ``current`` to ``wanted`` for the sections ``wanted`` declares."""
    changes: list[Change] = []
    for section in SECTIONS:
        if section not in wanted:
            continue
        kind = section.removesuffix("s")
        old, new = _items(current, section), _items(wanted, section)
        for name in sorted(set(old) | set(new)):
            if name not in old:
                changes.append(Change(kind, name, "create"))
            elif name not in new:
                changes.append(Change(kind, name, "delete"))
            elif old[name] != new[name]:
                keys = sorted(
                    k
                    for k in set(old[name]) | set(new[name])
                    if old[name].get(k) != new[name].get(k)
                )
                changes.append(Change(kind, name, "update", ", ".join(keys)))
            else:
                changes.append(Change(kind, name, "unchanged"))
    return changes


class ConfigRevisions:
    """The stored revisions of the instance config; the newest one is the running one."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def latest_number(self) -> int:
        with self.db.session() as session:
            return session.scalar(select(func.max(ConfigRevision.revision))) or 0

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        with self.db.session() as session:
            row = session.scalar(
                select(ConfigRevision).order_by(ConfigRevision.revision.desc()).limit(1)
            )
            return None if row is None else (row.revision, row.document)

    def save(self, config: FlywheelConfig, source: str, actor: str) -> tuple[int, bool]:
        """Store ``config`` as a new revision unless it equals the newest; returns
        ``(revision, created)``."""
        document = config.instance_document()
        digest = document_hash(document)
        with self.db.session() as session:
            row = session.scalar(
                select(ConfigRevision).order_by(ConfigRevision.revision.desc()).limit(1)
            )
            if row is not None and row.content_hash == digest:
                return row.revision, False
            new = ConfigRevision(
                document=document,
                content_hash=digest,
                source=source[:200],
                applied_by=actor[:200],
                applied_at=time.time(),
            )
            session.add(new)
            session.flush()
            return new.revision, True

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.db.session() as session:
            rows = session.scalars(
                select(ConfigRevision).order_by(ConfigRevision.revision.desc()).limit(limit)
            )
            return [
                {
                    "revision": r.revision,
                    "source": r.source,
                    "applied_by": r.applied_by,
                    "applied_at": r.applied_at,
                }
                for r in rows
            ]
