"""Datasets in the database: immutable, content-hashed versions of items.

A new version is written only when its content differs from the newest one (same items in
the same order give the same hash), so importing a file twice is a no-op. Each item's
train/test split comes from its own hash: it stays put when other items come and go.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flywheel.config.schema import RESOURCE_NAME_PATTERN
from flywheel.datasets.io import item_hash, normalize_item, split_of, version_hash
from flywheel.datasets.quality import profile
from flywheel.errors import ServiceError
from flywheel.security.audit import AuditLog
from flywheel.store import Database, Dataset, DatasetItem, DatasetVersion, Feedback, SpanRecord
from flywheel.store.db import lock_row
from flywheel.tracing.content import CHAT_KINDS, answer_text, chat_messages

NAME_PATTERN = re.compile(RESOURCE_NAME_PATTERN)
MAX_PAGE = 1000
PROFILE_CACHE_SIZE = 32
SPLITS = ("train", "test")


class DatasetError(ServiceError):
    """A refused dataset operation."""


@dataclass(frozen=True)
class TraceSelection:
    """Which traces become items, and what their expected output is.

    ``expected``: ``"correction"`` (the newest correction, else no expected output),
    ``"output"`` (the answer the trace gave) or ``"correction_or_output"``.
    Ratings are feedback ratings (0-1); ``flag`` keeps traces a guard flagged so.
    """

    route: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None
    min_rating: float | None = None
    max_rating: float | None = None
    with_feedback: bool = False
    with_correction: bool = False
    flag: str | None = None
    expected: str = "correction_or_output"
    limit: int = 1000
    # Only these traces (e.g. the ones a loop collected), when given.
    trace_ids: list[str] | None = None


def version_to_dict(dataset: Dataset, row: DatasetVersion) -> dict[str, Any]:
    return {
        "dataset": dataset.name,
        "version": row.version,
        "content_hash": row.content_hash,
        "items": row.item_count,
        "test_fraction": row.test_fraction,
        "message": row.message,
        "source": row.source,
        "created_at": row.created_at,
        "created_by": row.created_by,
    }


def item_to_dict(row: DatasetItem) -> dict[str, Any]:
    return {
        "position": row.position,
        "hash": row.item_hash,
        "split": row.split,
        "messages": row.messages,
        "variables": row.variables,
        "expected": row.expected,
        "context": row.context or [],
        "metadata": row.meta or {},
    }


def plain_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """An item without its stored position, hash and split (the shape files hold)."""
    keys = ("messages", "variables", "expected", "context", "metadata")
    return {key: item.get(key) for key in keys}


class DatasetStore:
    """Datasets and their versions, per project."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        self._profiles: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._profiles_lock = threading.Lock()

    # -- reading --------------------------------------------------------------------------

    def overview(self, project_id: str) -> list[dict[str, Any]]:
        """Every dataset of a project with its newest version."""
        newest = (
            select(DatasetVersion.dataset_id, func.max(DatasetVersion.version).label("version"))
            .group_by(DatasetVersion.dataset_id)
            .subquery()
        )
        query = (
            select(Dataset, DatasetVersion)
            .join(newest, newest.c.dataset_id == Dataset.id)
            .join(
                DatasetVersion,
                (DatasetVersion.dataset_id == Dataset.id)
                & (DatasetVersion.version == newest.c.version),
            )
            .where(Dataset.project_id == project_id)
            .order_by(Dataset.name)
        )
        with self.db.session() as session:
            return [
                {
                    "name": dataset.name,
                    "description": dataset.description,
                    "created_at": dataset.created_at,
                    "latest": version_to_dict(dataset, version),
                }
                for dataset, version in session.execute(query)
            ]

    def _dataset(self, session: Session, project_id: str, name: str) -> Dataset:
        dataset = session.scalar(
            select(Dataset).where(Dataset.project_id == project_id, Dataset.name == name)
        )
        if dataset is None:
            raise DatasetError(404, f"No dataset '{name}'.", "not_found", "dataset")
        return dataset

    def _version(self, session: Session, dataset: Dataset, version: int | None) -> DatasetVersion:
        query = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset.id)
        if version is None:
            query = query.order_by(DatasetVersion.version.desc()).limit(1)
        else:
            query = query.where(DatasetVersion.version == version)
        row = session.scalar(query)
        if row is None:
            raise DatasetError(
                404, f"Dataset '{dataset.name}' has no version {version}.", "not_found", "version"
            )
        return row

    def versions(self, project_id: str, name: str) -> list[dict[str, Any]]:
        """A dataset's versions, newest first."""
        with self.db.session() as session:
            dataset = self._dataset(session, project_id, name)
            rows = session.scalars(
                select(DatasetVersion)
                .where(DatasetVersion.dataset_id == dataset.id)
                .order_by(DatasetVersion.version.desc())
            )
            return [version_to_dict(dataset, row) for row in rows]

    def version(self, project_id: str, name: str, version: int | None = None) -> dict[str, Any]:
        """One version's description (the newest when ``version`` is None)."""
        with self.db.session() as session:
            dataset = self._dataset(session, project_id, name)
            return {
                **version_to_dict(dataset, self._version(session, dataset, version)),
                "description": dataset.description,
            }

    def items(
        self,
        project_id: str,
        name: str,
        version: int | None = None,
        *,
        split: str | None = None,
        offset: int = 0,
        limit: int | None = None,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A version and (a page of) its items in order, optionally one split only."""
        if split is not None and split not in SPLITS:
            raise DatasetError(400, "'split' must be 'train' or 'test'", "invalid_value", "split")
        if offset < 0 or (limit is not None and not 1 <= limit <= MAX_PAGE):
            raise DatasetError(
                400, f"'limit' must be 1-{MAX_PAGE} and 'offset' ≥ 0", "invalid_value", "limit"
            )
        with self.db.session() as session:
            dataset = self._dataset(session, project_id, name)
            row = self._version(session, dataset, version)
            query = select(DatasetItem).where(DatasetItem.version_id == row.id)
            if split is not None:
                query = query.where(DatasetItem.split == split)
            query = query.order_by(DatasetItem.position).offset(offset)
            if limit is not None:
                query = query.limit(limit)
            items = [item_to_dict(item) for item in session.scalars(query)]
            return version_to_dict(dataset, row), items

    # -- writing --------------------------------------------------------------------------

    def create_version(
        self,
        project_id: str,
        name: str,
        items: Iterable[Mapping[str, Any]],
        *,
        author: str,
        message: str = "",
        source: dict[str, Any] | None = None,
        description: str | None = None,
        test_fraction: float = 0.2,
        normalized: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """A new version holding ``items`` (the dataset too, on its first version).

        Returns the version and whether it is new: content equal to the newest version's
        returns that version. Items are checked and normalised unless ``normalized``.
        """
        if not NAME_PATTERN.match(name):
            raise DatasetError(
                400,
                "A dataset name is 1-128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit.",
                "invalid_value",
                "name",
            )
        if not 0 <= test_fraction < 1:
            raise DatasetError(
                400, "'test_fraction' must be at least 0 and below 1", "invalid_value"
            )
        clean = [
            dict(item) if normalized else normalize_item(item, f"item {index + 1}")
            for index, item in enumerate(items)
        ]
        if not clean:
            raise DatasetError(400, "A dataset version needs at least one item.", "empty")
        hashes = [item_hash(item) for item in clean]
        digest = version_hash(hashes)
        for _ in range(3):
            try:
                return self._write_version(
                    project_id,
                    name,
                    clean,
                    hashes,
                    digest,
                    author=author,
                    message=message,
                    source=source or {"kind": "api"},
                    description=description,
                    test_fraction=test_fraction,
                )
            except IntegrityError:
                continue  # another writer took the version number: read again and retry
        raise DatasetError(409, f"Dataset '{name}' is being written; retry.", "conflict")

    def _write_version(
        self,
        project_id: str,
        name: str,
        items: list[dict[str, Any]],
        hashes: list[str],
        digest: str,
        *,
        author: str,
        message: str,
        source: dict[str, Any],
        description: str | None,
        test_fraction: float,
    ) -> tuple[dict[str, Any], bool]:
        now = time.time()
        with self.db.session() as session:
            dataset = session.scalar(
                select(Dataset).where(Dataset.project_id == project_id, Dataset.name == name)
            )
            if dataset is None:
                dataset = Dataset(
                    id=uuid.uuid4().hex,
                    project_id=project_id,
                    name=name,
                    description=description or "",
                    created_at=now,
                    created_by=author,
                )
                session.add(dataset)
                session.flush()
            else:
                # Concurrent writers queue on the dataset's row for the next number.
                lock_row(session, Dataset.id, dataset.id)
                if description is not None:
                    dataset.description = description
            latest = session.scalar(
                select(DatasetVersion)
                .where(DatasetVersion.dataset_id == dataset.id)
                .order_by(DatasetVersion.version.desc())
                .limit(1)
            )
            if (
                latest is not None
                and latest.content_hash == digest
                and latest.test_fraction == test_fraction
            ):
                return version_to_dict(dataset, latest), False
            row = DatasetVersion(
                dataset_id=dataset.id,
                version=(latest.version if latest else 0) + 1,
                content_hash=digest,
                item_count=len(items),
                test_fraction=test_fraction,
                message=message,
                source=source,
                created_at=now,
                created_by=author,
            )
            session.add(row)
            session.flush()
            session.add_all(
                DatasetItem(
                    version_id=row.id,
                    position=position,
                    item_hash=hashes[position],
                    split=split_of(hashes[position], test_fraction),
                    messages=item["messages"],
                    variables=item["variables"],
                    expected=item["expected"],
                    context=item["context"],
                    meta=item["metadata"],
                )
                for position, item in enumerate(items)
            )
            view = version_to_dict(dataset, row)
            self.audit.record(
                actor=author,
                action="dataset.version.create",
                resource_type="dataset",
                resource_id=f"{name}@{row.version}",
                project_id=project_id,
                after={k: v for k, v in view.items() if k != "source"},
                session=session,
            )
            return view, True

    def from_traces(
        self,
        project_id: str,
        name: str,
        selection: TraceSelection,
        *,
        author: str,
        message: str = "",
        test_fraction: float = 0.2,
    ) -> tuple[dict[str, Any], bool]:
        """A new version built from the project's chat traces that match ``selection``."""
        items = self.trace_items(project_id, selection)
        if not items:
            raise DatasetError(400, "No traces match that filter.", "empty", "filter")
        source = {"kind": "traces", "filter": selection.__dict__}
        return self.create_version(
            project_id,
            name,
            items,
            author=author,
            message=message or f"{len(items)} items from traces",
            source=source,
            test_fraction=test_fraction,
        )

    def trace_items(self, project_id: str, selection: TraceSelection) -> list[dict[str, Any]]:
        """Items from matching chat traces, oldest first."""
        if selection.expected not in ("correction", "output", "correction_or_output"):
            raise DatasetError(
                400,
                "'expected' must be 'correction', 'output' or 'correction_or_output'",
                "invalid_value",
                "expected",
            )
        if not 1 <= selection.limit <= 100_000:
            raise DatasetError(400, "'limit' must be 1-100000", "invalid_value", "limit")
        query = select(SpanRecord).where(
            SpanRecord.project_id == project_id,
            SpanRecord.kind.in_(CHAT_KINDS),
            SpanRecord.status == "ok",
        )
        if selection.route:
            query = query.where(SpanRecord.route == selection.route)
        if selection.model:
            query = query.where(SpanRecord.model == selection.model)
        if selection.trace_ids is not None:
            query = query.where(SpanRecord.trace_id.in_(selection.trace_ids))
        if selection.since is not None:
            query = query.where(SpanRecord.start_time >= selection.since)
        if selection.until is not None:
            query = query.where(SpanRecord.start_time < selection.until)
        needs_feedback = (
            selection.with_feedback
            or selection.with_correction
            or selection.min_rating is not None
            or selection.max_rating is not None
        )
        if needs_feedback:
            rated = select(Feedback.trace_id).where(Feedback.project_id == project_id)
            query = query.where(SpanRecord.trace_id.in_(rated))
        query = query.order_by(SpanRecord.start_time.desc()).limit(selection.limit)
        with self.db.session() as session:
            spans = list(session.scalars(query))
            feedback: dict[str, list[Feedback]] = {}
            trace_ids = [span.trace_id for span in spans]
            for start in range(0, len(trace_ids), 500):
                chunk = trace_ids[start : start + 500]
                for row in session.scalars(
                    select(Feedback)
                    .where(Feedback.project_id == project_id, Feedback.trace_id.in_(chunk))
                    .order_by(Feedback.created_at, Feedback.id)
                ):
                    feedback.setdefault(row.trace_id, []).append(row)
        items = []
        for span in reversed(spans):
            item = _trace_item(span, feedback.get(span.trace_id, []), selection)
            if item is not None:
                items.append(item)
        return items

    def profile(
        self,
        project_id: str,
        name: str,
        version: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> dict[str, Any]:
        """The data-quality report of a version (duplicates, lengths, PII…). Versions are
        immutable, so reports are kept per content hash (the newest few)."""
        described = self.version(project_id, name, version)
        key = (described["content_hash"], described["test_fraction"], count_tokens)
        report = self._profiles.get(key)
        if report is None:
            _, items = self.items(project_id, name, described["version"])
            report = profile(items, count_tokens)
            with self._profiles_lock:
                while len(self._profiles) >= PROFILE_CACHE_SIZE:
                    self._profiles.pop(next(iter(self._profiles)))
                self._profiles[key] = report
        return {"version": described, **report}


def _rating_matches(ratings: list[float], selection: TraceSelection) -> bool:
    if selection.min_rating is None and selection.max_rating is None:
        return True
    if not ratings:
        return False
    # The newest rating is the one that counts: reviewers may revise.
    rating = ratings[-1]
    if selection.min_rating is not None and rating < selection.min_rating:
        return False
    return not (selection.max_rating is not None and rating > selection.max_rating)


def _trace_item(
    span: SpanRecord, feedback: list[Feedback], selection: TraceSelection
) -> dict[str, Any] | None:
    messages = chat_messages(span)
    if not messages:
        return None  # content capture was off: nothing to learn from
    attributes = span.attributes or {}
    if selection.flag and selection.flag not in (attributes.get("flywheel.guard.flags") or []):
        return None
    ratings = [row.rating for row in feedback if row.rating is not None]
    if not _rating_matches(ratings, selection):
        return None
    corrections = [row.correction for row in feedback if row.correction is not None]
    if selection.with_correction and not corrections:
        return None
    answer = answer_text(span)
    expected = corrections[-1] if corrections else None
    if expected is None and selection.expected != "correction":
        expected = answer
    variables = (span.input or {}).get("variables") or None
    metadata: dict[str, Any] = {
        "trace_id": span.trace_id,
        "route": span.route,
        "model": span.model,
        "answer": answer,
    }
    if ratings:
        metadata["rating"] = ratings[-1]
    if "flywheel.prompt.ref" in attributes:
        metadata["prompt"] = attributes["flywheel.prompt.ref"]
    return normalize_item(
        {
            "messages": [
                {"role": m.get("role"), "content": m.get("content")}
                for m in messages
                if isinstance(m.get("content"), str)
            ],
            "variables": variables,
            "expected": expected,
            "metadata": metadata,
        },
        f"trace {span.trace_id}",
    )
