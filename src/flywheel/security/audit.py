"""The audit log: append-only, hash-chained, with secrets redacted.

Each entry's ``hash`` is SHA-256 over its contents and the previous entry's hash, so editing,
deleting or reordering any entry breaks the chain from that entry on; ``AuditLog.verify``
finds the first break. The chain alone cannot show that its newest entries were cut off:
keep a recent tail hash somewhere else (an export, a ticket) to detect truncation.
"""

from __future__ import annotations

import builtins
import copy
import csv
import hashlib
import io
import json
import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Select, Text, cast, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flywheel.store import AuditEvent, Database

log = logging.getLogger("flywheel.security.audit")

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first entry."""

REDACTED = "[REDACTED]"

# Every column, in export order; all but ``hash`` go into the hash.
COLUMNS: tuple[str, ...] = (
    "seq",
    "ts",
    "actor",
    "action",
    "resource_type",
    "resource_id",
    "project_id",
    "before",
    "after",
    "prev_hash",
    "hash",
)
_CONTENT_FIELDS = COLUMNS[:-2]

_SECRET_MARKERS = (
    "password",
    "secret",
    "token",
    "api_key",
    "apikey",
    "key_hash",
    "authorization",
    "ciphertext",
    "private",
)
_REQUIRED_TEXT = ("actor", "action", "resource_type")
MAX_LIST_LIMIT = 1000

# Stands in for a before/after value whose stored JSON no longer parses: it cannot be
# encoded, so hashing the entry fails and verify() reports the entry instead of crashing.
_UNREADABLE = object()


def _hides(key: object, value: Any) -> bool:
    """Whether the value under ``key`` is a secret to redact."""
    if value is None:
        return False  # "no secret set" reveals nothing, and shows that one was added/removed
    name = str(key).lower()
    markers = {marker for marker in _SECRET_MARKERS if marker in name}
    if markers == {"token"} and isinstance(value, int | float) and not isinstance(value, bool):
        return False  # a count such as max_tokens or tokens_per_minute, not a credential
    return bool(markers)


def redact(value: Any) -> Any:
    """A deep copy of ``value`` with every value under a secret-looking key replaced by
    ``"[REDACTED]"``, at any depth of dicts and lists.

    A key looks secret when its name contains (case-insensitively) password, secret, token,
    api_key, apikey, key_hash, authorization, ciphertext or private. Two exceptions: ``None``
    is kept, and so is a number under a key whose only marker is "token" (a token count).
    Secrets inside free text (a URL with a password in it) are not found.
    """
    if isinstance(value, Mapping):
        return {key: REDACTED if _hides(key, item) else redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    return copy.deepcopy(value)


def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of one entry: its seq, ts, actor, action, resource_type, resource_id,
    project_id, before and after from ``fields``, plus ``prev_hash``.

    The encoding is canonical JSON (sorted keys, no spaces, UTF-8). Floats are encoded by
    ``repr``, which is exact, so the hash recomputed from a row read back from SQLite or
    PostgreSQL is the same. Other keys in ``fields`` (``hash``, or a ``prev_hash`` there) are
    ignored, so ``to_dict`` output and exported lines can be passed as they are.
    """
    payload = {name: fields[name] for name in _CONTENT_FIELDS}
    # Coerced so an integral ts (5 vs 5.0) or a seq read as another int type hashes alike.
    payload["seq"] = int(payload["seq"])
    payload["ts"] = float(payload["ts"])
    payload["prev_hash"] = prev_hash
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()


def to_dict(event: AuditEvent) -> dict[str, Any]:
    """Every column of an entry, hashes included, as plain JSON-ready values."""
    return {name: getattr(event, name) for name in COLUMNS}


@dataclass(frozen=True)
class AuditVerification:
    """The result of checking the chain.

    ``checked`` counts the entries found intact before the first problem (all of them when
    ``ok``); ``first_bad_seq`` is the seq of the first bad or missing entry.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    problem: str | None = None


def verify_chain(entries: Iterable[Mapping[str, Any]]) -> AuditVerification:
    """Check a whole chain given oldest first, e.g. the lines of an unfiltered JSONL export.

    Every hash is recomputed, every ``prev_hash`` must equal the previous entry's hash (the
    first entry's: ``GENESIS_HASH``) and the seqs must run 1, 2, 3... without gaps.
    """
    checked = 0
    expected_seq = 1
    prev_hash = GENESIS_HASH

    def bad(seq: int, problem: str) -> AuditVerification:
        return AuditVerification(ok=False, checked=checked, first_bad_seq=seq, problem=problem)

    for entry in entries:
        seq = int(entry["seq"])
        if seq > expected_seq:
            if seq == expected_seq + 1:
                return bad(expected_seq, f"entry {expected_seq} is missing (deleted?)")
            return bad(expected_seq, f"entries {expected_seq}-{seq - 1} are missing (deleted?)")
        if seq < expected_seq:
            return bad(seq, f"entry {seq}: out of sequence, expected entry {expected_seq}")
        try:
            recomputed = entry_hash(entry["prev_hash"], entry)
        except (TypeError, ValueError):
            return bad(seq, f"entry {seq}: contents cannot be read (edited?)")
        if recomputed != entry["hash"]:
            return bad(seq, f"entry {seq}: hash does not match its contents (edited?)")
        if entry["prev_hash"] != prev_hash:
            if seq == 1:
                return bad(seq, "entry 1: prev_hash is not the genesis hash (rewritten?)")
            return bad(
                seq,
                f"entry {seq}: prev_hash does not match entry {seq - 1} "
                f"(deleted, reordered or rewritten?)",
            )
        checked += 1
        expected_seq = seq + 1
        prev_hash = entry["hash"]
    return AuditVerification(ok=True, checked=checked)


def _json_value(name: str, value: Any) -> Any:
    """``value`` as it will read back from a JSON column (tuples become lists, non-string
    keys strings), so the hash computed now matches the one recomputed later."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except TypeError as exc:
        raise TypeError(f"{name} must be JSON-serialisable: {exc}") from None
    except ValueError as exc:  # NaN and infinities: not JSON, and PostgreSQL rejects them
        raise ValueError(f"{name} must be JSON-serialisable: {exc}") from None


def _column_length(name: str) -> int | None:
    length: int | None = getattr(AuditEvent.__table__.c[name].type, "length", None)
    return length


def _clean_text(name: str, value: Any, *, required: bool) -> str | None:
    """``value`` fitted to its column, the same on every database (SQLite would store what
    PostgreSQL rejects). Over-long text is cut and NUL replaced rather than refused: the text
    may come from an attacker (a 10 kB username on a failed login), and refusing it would
    keep that attempt out of the log."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    value = value.replace("\x00", "\ufffd")
    length = _column_length(name)
    if length is not None and len(value) > length:
        value = value[: length - 1] + "\u2026"
    return value


class AuditLog:
    """Appends to, reads, exports and verifies the audit log of one database.

    Share one instance per process: its lock serialises the appends of its threads. Appends
    from other processes (or instances) queue on the tail row's lock where the database has
    row locks, and whatever still races is kept off a forked chain by the unique ``seq`` and
    ``prev_hash`` columns: the loser retries on the new tail.
    """

    def __init__(self, db: Database, *, page_size: int = 500, max_attempts: int = 20) -> None:
        if page_size < 1 or max_attempts < 1:
            raise ValueError("page_size and max_attempts must be at least 1")
        self.db = db
        self.page_size = page_size
        self.max_attempts = max_attempts
        self.retries = 0
        """Appends retried after losing a race to another process (a metric)."""
        self._lock = threading.Lock()

    def record(
        self,
        *,
        actor: str,
        action: str,
        resource_type: str,
        resource_id: str | None = None,
        project_id: str | None = None,
        before: Any = None,
        after: Any = None,
        session: Session | None = None,
    ) -> AuditEvent:
        """Append one entry, chained to the current tail, and return it.

        ``before`` and ``after`` are stored redacted (see ``redact``) and must be
        JSON-serialisable. Text longer than its column is cut to fit (ending in "…") and NUL
        characters are replaced. Raises ``ValueError`` or ``TypeError``, storing nothing, for
        an empty actor, action or resource_type, or for before/after that are not JSON.

        With ``session``, the entry is flushed inside the caller's transaction, so it commits
        or rolls back with the change it describes, and later appends wait for that commit.
        Make (and flush) the change first: on SQLite the transaction then already holds the
        write lock, so the tail it chains to cannot move; on PostgreSQL the tail row is
        locked instead. A race can still be lost for the very first entry of a log, or on
        SQLite by a transaction that has written nothing yet: that raises ``IntegrityError``
        here or at commit, the caller's transaction is spoilt, and the caller retries its
        unit of work. Do not append without ``session`` while holding such a transaction
        open: that append would wait for it.

        Without ``session``, the entry gets its own transaction, and a race lost to another
        process is retried here on the new tail, up to ``max_attempts`` times.
        """
        given = {
            "actor": actor,
            "action": action,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "project_id": project_id,
        }
        texts = {
            name: _clean_text(name, value, required=name in _REQUIRED_TEXT)
            for name, value in given.items()
        }
        content: dict[str, Any] = {
            "ts": time.time(),
            **texts,
            "before": _json_value("before", redact(before)),
            "after": _json_value("after", redact(after)),
        }
        if session is not None:
            # No process lock here: the caller's transaction may already hold the database
            # write lock, and an own-transaction append holding our lock could be waiting
            # for it, a deadlock until the busy timeout.
            return self._append(session, content)
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                try:
                    with self.db.session() as own:
                        return self._append(own, content)
                except IntegrityError:
                    if attempt >= self.max_attempts:
                        raise
                    self.retries += 1
                    log.debug("audit append lost a race (attempt %d); retrying", attempt)
            # Jittered backoff outside the lock, so two racing processes fall out of step.
            time.sleep(random.uniform(0, min(0.1, 0.001 * 2**attempt)))

    def _append(self, session: Session, content: dict[str, Any]) -> AuditEvent:
        # Flush the caller's pending changes first: on SQLite that takes the write lock, so
        # the tail read next is current and stays the tail until commit.
        session.flush()
        tail = self._lock_tail(session)
        seq, prev_hash = (1, GENESIS_HASH) if tail is None else (tail[0] + 1, tail[1])
        # An explicit seq, so the hash covers the seq actually stored (and the primary key
        # guards against a fork just as the unique prev_hash does).
        fields = {"seq": seq, **content}
        event = AuditEvent(**fields, prev_hash=prev_hash, hash=entry_hash(prev_hash, fields))
        session.add(event)
        session.flush()
        return event

    @staticmethod
    def _lock_tail(session: Session) -> tuple[int, str] | None:
        """The newest entry's ``(seq, hash)``, its row locked until the transaction ends
        where the database has row locks (PostgreSQL), so concurrent appends queue instead
        of racing.

        The lock is taken on the tail as read, then the tail is read again: another writer
        may have committed a new one meanwhile (we waited on its lock), so repeat until the
        locked row is still the tail. SQLite ignores FOR UPDATE; it needs none, as a
        transaction that has written holds the database write lock.
        """
        newest = select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
        tail = session.execute(newest).first()
        while tail is not None:
            session.execute(
                select(AuditEvent.seq).where(AuditEvent.seq == tail.seq).with_for_update()
            )
            latest = session.execute(newest).first()
            if latest is not None and latest.seq == tail.seq:
                break
            tail = latest
        return None if tail is None else (tail.seq, tail.hash)

    def verify(self) -> AuditVerification:
        """Walk the whole chain oldest first, in pages, and report the first break: an
        edited entry, a missing (deleted) one, or a broken or reordered link."""
        return verify_chain(self._stored_entries())

    def _stored_entries(self) -> Iterator[dict[str, Any]]:
        """Every row oldest first, JSON read as stored text and parsed here, so a row edited
        into invalid JSON is reported by ``verify_chain`` rather than failing the read."""
        table = AuditEvent.__table__
        json_columns = ("before", "after")
        selected = [
            cast(table.c[name], Text).label(name) if name in json_columns else table.c[name]
            for name in COLUMNS
        ]
        last_seq: int | None = None
        while True:
            query = select(*selected).order_by(table.c.seq).limit(self.page_size)
            if last_seq is not None:
                query = query.where(table.c.seq > last_seq)
            # A short read per page: a long-held read transaction would stall SQLite's WAL
            # checkpoints while a big log is verified.
            with self.db.engine.connect() as connection:
                rows = [dict(row) for row in connection.execute(query).mappings()]
            for row in rows:
                for name in json_columns:
                    if row[name] is not None:
                        try:
                            row[name] = json.loads(row[name])
                        except ValueError:
                            row[name] = _UNREADABLE
                yield row
            if len(rows) < self.page_size:
                return
            last_seq = rows[-1]["seq"]

    @staticmethod
    def _filtered(
        query: Select[Any],
        *,
        project_id: str | None,
        action: str | None,
        actor: str | None,
        since: float | None,
        until: float | None,
        before_seq: int | None,
        resource_type: str | None = None,
        resource_id: str | None = None,
    ) -> Select[Any]:
        if project_id is not None:
            query = query.where(AuditEvent.project_id == project_id)
        if resource_type is not None:
            query = query.where(AuditEvent.resource_type == resource_type)
        if resource_id is not None:
            query = query.where(AuditEvent.resource_id == resource_id)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        if actor is not None:
            query = query.where(AuditEvent.actor == actor)
        if since is not None:
            query = query.where(AuditEvent.ts >= since)
        if until is not None:
            query = query.where(AuditEvent.ts < until)
        if before_seq is not None:
            query = query.where(AuditEvent.seq < before_seq)
        return query

    def export(
        self,
        fmt: Literal["jsonl", "csv"],
        *,
        project_id: str | None = None,
        action: str | None = None,
        actor: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before_seq: int | None = None,
    ) -> Iterator[str]:
        """The matching entries oldest first, as text chunks ending in a newline, read in
        pages. Filters as for ``list``; ``before_seq`` pins the end of the export, since
        entries appended meanwhile are otherwise included.

        ``jsonl``: one JSON object per entry with every column. An unfiltered export can be
        checked offline with ``verify_chain``. ``csv``: a header line, then one record per
        entry (a record may span lines when a value contains a newline); ``before`` and
        ``after`` are JSON text, and an empty cell in another column means null.
        """
        if fmt not in ("jsonl", "csv"):
            raise ValueError(f"unknown export format '{fmt}' (expected jsonl or csv)")
        query = self._filtered(
            select(AuditEvent),
            project_id=project_id,
            action=action,
            actor=actor,
            since=since,
            until=until,
            before_seq=before_seq,
        )
        # A generator inside, so a bad format fails at the call rather than at first read.
        return self._export_lines(fmt, query)

    def _export_lines(self, fmt: str, query: Select[Any]) -> Iterator[str]:
        if fmt == "csv":
            yield ",".join(COLUMNS) + "\n"
        for event in self._pages_ascending(query):
            record = to_dict(event)
            if fmt == "jsonl":
                yield json.dumps(record, ensure_ascii=False) + "\n"
                continue
            for name in ("before", "after"):
                record[name] = json.dumps(record[name], ensure_ascii=False)
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerow(
                "" if record[name] is None else record[name] for name in COLUMNS
            )
            yield buffer.getvalue()

    def _pages_ascending(self, query: Select[Any]) -> Iterator[AuditEvent]:
        last_seq = 0
        while True:
            page_query = query.where(AuditEvent.seq > last_seq)
            page_query = page_query.order_by(AuditEvent.seq).limit(self.page_size)
            # One short session per page: nothing is held open while the consumer is slow.
            with self.db.sessions() as session:
                page = builtins.list(session.scalars(page_query))
            yield from page
            if len(page) < self.page_size:
                return
            last_seq = page[-1].seq

    def list(
        self,
        *,
        project_id: str | None = None,
        action: str | None = None,
        actor: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        before_seq: int | None = None,
        resource_type: str | None = None,
        resource_id: str | None = None,
    ) -> builtins.list[AuditEvent]:
        """Matching entries, newest first, at most ``limit`` (1 to 1000).

        ``project_id`` narrows to one project; None means every project, so callers enforce
        isolation. ``since`` is inclusive and ``until`` exclusive (unix seconds). For the next
        page pass the last entry's seq as ``before_seq``. ``resource_type`` and
        ``resource_id`` narrow to one thing's history (a loop, an experiment).
        """
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        query = self._filtered(
            select(AuditEvent),
            project_id=project_id,
            action=action,
            actor=actor,
            since=since,
            until=until,
            before_seq=before_seq,
            resource_type=resource_type,
            resource_id=resource_id,
        )
        query = query.order_by(AuditEvent.seq.desc()).limit(limit)
        with self.db.sessions() as session:
            return builtins.list(session.scalars(query))
