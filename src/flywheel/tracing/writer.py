"""The trace writer: requests enqueue span (and trace score) rows; one thread inserts them in
batches.

No database write happens on the request path. Rows wait in a bounded in-memory buffer
(``FLYWHEEL_TRACE_BUFFER_SPANS`` rows, counting the batch being written). When the database is
unavailable (stopped, restarting, unreachable, a SQLite file locked by another process) the
writer keeps the batch and retries with capped exponential backoff for as long as the outage
lasts, then flushes everything buffered. Requests never wait for it.

When the buffer is full the **oldest** row is dropped and counted (``dropped``,
``overflowed``): the newest traces describe the system as it is now (the incident itself and
the recovery), and a dashboard, an alert rule or an online judge reads the recent past first.
Counts are logged (at most every few seconds) and readable through :attr:`TraceWriter.stats`.

``close()`` (called on SIGTERM through the server's shutdown) drains the buffer, so a graceful
stop loses nothing unless the database is still down when its timeout runs out; what it could
not write is counted as dropped and logged.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import JSON, insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import (
    DisconnectionError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from flywheel.store import Database, SpanRecord, TraceScore

log = logging.getLogger("flywheel.tracing")

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_SPAN_COLUMNS = tuple(c.name for c in SpanRecord.__table__.columns if c.name != "id")
_SCORE_COLUMNS = tuple(c.name for c in TraceScore.__table__.columns if c.name != "id")
# executemany needs every row to carry the same keys.
_SPAN_DEFAULTS: dict[str, Any] = {"status": "ok", "stream": False}
_SCORE_KEY = "__score__"
# The spans insert skips SQLAlchemy's per-row parameter processing (a third of the writer's
# time): each row becomes a tuple in column order, JSON columns encoded here as SQLAlchemy
# would (``json.dumps``, so a missing value is JSON ``null`` as before).
_SPAN_JSON = tuple(
    i for i, c in enumerate(_SPAN_COLUMNS) if isinstance(SpanRecord.__table__.c[c].type, JSON)
)
_SPAN_DEFAULTED = tuple(
    (i, c, _SPAN_DEFAULTS[c]) for i, c in enumerate(_SPAN_COLUMNS) if c in _SPAN_DEFAULTS
)
_encode_json = json.JSONEncoder().encode
# Errors that mean "the database is not there right now" rather than "this row is bad":
# connection refused or lost, a server restarting, a pool with no connection to give, and
# SQLite's "database is locked" (all OperationalError).
_OUTAGE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
# Seconds between two "still down" / "buffer full" log lines.
_LOG_EVERY = 5.0


def new_trace_id() -> str:
    # Ids need uniqueness, not secrecy (as in OpenTelemetry's SDK): no syscall per id.
    return f"{random.getrandbits(128):032x}"


def new_span_id() -> str:
    return f"{random.getrandbits(64):016x}"


def parse_traceparent(header: str | None) -> tuple[str, str] | None:
    """``(trace_id, parent span_id)`` from a W3C ``traceparent`` header, or None."""
    if not header:
        return None
    match = _TRACEPARENT.match(header.strip().lower())
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return match.group(1), match.group(2)


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, _OUTAGE_ERRORS) or bool(getattr(exc, "connection_invalidated", False))


def _insert_spans(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """One executemany of span rows, straight to the driver (qmark or format paramstyle;
    any other goes through SQLAlchemy)."""
    dialect = connection.dialect
    if dialect.paramstyle == "qmark":
        mark = "?"
    elif dialect.paramstyle in ("format", "pyformat"):
        mark = "%s"
    else:
        full = [{c: row.get(c, _SPAN_DEFAULTS.get(c)) for c in _SPAN_COLUMNS} for row in rows]
        connection.execute(insert(SpanRecord), full)
        return
    quote = dialect.identifier_preparer.quote
    table = quote(SpanRecord.__tablename__)
    columns = ", ".join(quote(c) for c in _SPAN_COLUMNS)
    marks = ", ".join([mark] * len(_SPAN_COLUMNS))
    # Identifiers come from the table's metadata, quoted; every value is a parameter.
    statement = f"INSERT INTO {table} ({columns}) VALUES ({marks})"  # noqa: S608
    params = []
    for row in rows:
        values = list(map(row.get, _SPAN_COLUMNS))
        for index in _SPAN_JSON:
            values[index] = _encode_json(values[index])
        for index, name, default in _SPAN_DEFAULTED:
            if name not in row:
                values[index] = default
        params.append(tuple(values))
    connection.exec_driver_sql(statement, params)


def _default_buffer_size() -> int:
    # Imported here: the writer is also built by tools and tests without a server's settings.
    from flywheel.config.settings import get_settings

    return get_settings().trace_buffer_spans


class TraceWriter:
    """Batches span rows into the ``spans`` table from a single background thread, through
    database outages, with at most ``max_pending`` rows held in memory."""

    def __init__(
        self,
        db: Database,
        batch_size: int = 1000,
        flush_seconds: float = 0.2,
        max_pending: int | None = None,
        retry_max_seconds: float = 2.0,
    ) -> None:
        self.db = db
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.max_pending = max(
            1, max_pending if max_pending is not None else _default_buffer_size()
        )
        # Backoff between tries while the database is down grows to this cap, so recovery is
        # noticed within this many seconds.
        self.retry_max_seconds = retry_max_seconds
        self._buffer: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # rows arrived, or closing
        self._idle = threading.Condition(self._lock)  # a batch finished
        self._inflight = 0
        self._closed = False
        self._hurry = False  # a flush() is waiting: do not wait for a full batch
        self._give_up_at: float | None = None
        # Called (in the writer thread) with each batch of span rows once it is stored: the
        # OTLP exporter listens here. A listener must not block.
        self.listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        self.written = 0
        self.written_scores = 0
        self.dropped = 0  # spans lost for any reason (full buffer, closed, refused by the db)
        self.dropped_scores = 0
        self.overflowed = 0  # rows (spans and scores) dropped because the buffer was full
        self.outages = 0
        self.outage_since: float | None = None  # monotonic start of the current outage
        self._outage_rows = 0  # rows that arrived during the current outage
        self._overflow_logged = 0.0
        self._outage_logged = 0.0
        self._thread = threading.Thread(target=self._run, name="flywheel-trace-writer", daemon=True)
        self._thread.start()

    # -- the request side: never blocks on the database, never raises ---------------------

    def record(self, span: dict[str, Any]) -> None:
        """Enqueue one span row (keys are ``SpanRecord`` columns). Never blocks, never raises."""
        if self._closed:
            log.warning("trace writer closed; span %s not recorded", span.get("span_id"))
            with self._lock:
                self.dropped += 1
            return
        self._enqueue(span)

    def record_score(self, score: dict[str, Any]) -> None:
        """Enqueue one trace score row (keys are ``TraceScore`` columns); like :meth:`record`."""
        if self._closed:
            log.warning("trace writer closed; score %s not recorded", score.get("name"))
            with self._lock:
                self.dropped_scores += 1
            return
        self._enqueue({**score, _SCORE_KEY: True})

    def _enqueue(self, row: dict[str, Any]) -> None:
        with self._lock:
            buffer = self._buffer
            if len(buffer) + self._inflight >= self.max_pending:
                # Full: the oldest waiting row makes room (the new one only when every held
                # row is in the batch being written).
                self.overflowed += 1
                if not buffer:
                    self._count_lost(row)
                    self._log_overflow()
                    return
                self._count_lost(buffer.popleft())
                self._log_overflow()
            buffer.append(row)
            if self.outage_since is not None:
                self._outage_rows += 1
            if len(buffer) == 1 or len(buffer) >= self.batch_size:
                self._wake.notify()

    def _count_lost(self, row: dict[str, Any]) -> None:
        self._count_lost_rows(1, _SCORE_KEY in row)

    def _count_lost_rows(self, count: int, scores: bool) -> None:
        if scores:
            self.dropped_scores += count
        else:
            self.dropped += count

    def _log_overflow(self) -> None:
        now = time.monotonic()
        if now - self._overflow_logged >= _LOG_EVERY:
            self._overflow_logged = now
            log.warning(
                "trace buffer full (%d rows): dropping the oldest; %d spans and %d scores "
                "dropped so far",
                self.max_pending,
                self.dropped,
                self.dropped_scores,
            )

    # -- reading the state ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Rows held in memory: waiting, and in the batch being written."""
        return len(self._buffer) + self._inflight

    @property
    def stats(self) -> dict[str, float]:
        """Counters for metrics and logs (read without locking: a snapshot, not a ledger)."""
        since = self.outage_since
        return {
            "pending": self.pending,
            "max_pending": self.max_pending,
            "written": self.written,
            "written_scores": self.written_scores,
            "dropped": self.dropped,
            "dropped_scores": self.dropped_scores,
            "overflowed": self.overflowed,
            "outages": self.outages,
            "database_down": 1 if since is not None else 0,
            "outage_seconds": time.monotonic() - since if since is not None else 0.0,
        }

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything enqueued so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._buffer or self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._hurry = True  # do not wait out the batching delay
                self._wake.notify()
                self._idle.wait(min(remaining, 0.05))
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Write everything still buffered, then stop the thread. If the database stays down,
        rows still held when 80 % of ``timeout`` has passed are counted as dropped."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._give_up_at = time.monotonic() + timeout * 0.8
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error(
                "trace writer did not drain within %.0fs; %d rows pending", timeout, self.pending
            )
        lost = self.dropped or self.dropped_scores
        (log.warning if lost else log.info)(
            "trace writer closed: %d spans and %d scores written, %d spans and %d scores "
            "dropped (%d for a full buffer of %d rows), %d database outages",
            self.written,
            self.written_scores,
            self.dropped,
            self.dropped_scores,
            self.overflowed,
            self.max_pending,
            self.outages,
        )

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._buffer and not self._closed:
                    self._wake.wait()
                if not self._buffer:
                    return  # closed and drained
                # Wait up to flush_seconds for a full batch (not when closing: drain now).
                deadline = time.monotonic() + self.flush_seconds
                while len(self._buffer) < self.batch_size and not (self._closed or self._hurry):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                take = min(self.batch_size, len(self._buffer))
                batch = [self._buffer.popleft() for _ in range(take)]
                if not self._buffer:
                    self._hurry = False
                self._inflight = take
            try:
                self._write(batch)
            except Exception:  # the thread must outlive any surprise; the batch is lost
                log.exception("trace writer failed on a batch of %d rows", len(batch))
                with self._lock:
                    for row in batch:
                        self._count_lost(row)
            finally:
                with self._lock:
                    self._inflight = 0
                    self._idle.notify_all()

    def _write(self, batch: list[dict[str, Any]]) -> None:
        scores = [{c: row.get(c) for c in _SCORE_COLUMNS} for row in batch if _SCORE_KEY in row]
        spans = [row for row in batch if _SCORE_KEY not in row] if scores else batch
        # Spans first: a score is never visible before its trace.
        if spans:
            self._store(SpanRecord, spans, scores=False)
            if self.listeners:
                # Listeners get every column, as stored.
                full = [
                    {c: row.get(c, _SPAN_DEFAULTS.get(c)) for c in _SPAN_COLUMNS} for row in spans
                ]
                for listener in self.listeners:
                    try:
                        listener(full)
                    except Exception:
                        log.exception("trace listener failed")
        if scores:
            self._store(TraceScore, scores, scores=True)

    def _store(
        self, table: type[SpanRecord | TraceScore], rows: list[dict[str, Any]], *, scores: bool
    ) -> None:
        """Insert ``rows``, waiting out database outages; rows the database refuses (a
        duplicate span, a value it cannot hold) are skipped one by one."""
        delay = 0.1
        pending = rows
        while pending:
            try:
                with self.db.engine.begin() as connection:
                    if scores:
                        connection.execute(insert(table), pending)
                    else:
                        _insert_spans(connection, pending)
                self._count_written(len(pending), scores)
                pending = []
            except Exception as exc:
                if not _is_outage(exc):
                    # A duplicate (trace_id, span_id), e.g. a client re-sending, or one bad
                    # row: keep the rest.
                    pending = self._store_one_by_one(table, pending, scores)
                    continue
                if self._giving_up():
                    # Shutting down and the database is still away: what is held is lost
                    # (this batch and the rest of the buffer at once, without a try each).
                    with self._lock:
                        self._count_lost_rows(len(pending), scores)
                        rest = len(self._buffer)
                        while self._buffer:
                            self._count_lost(self._buffer.popleft())
                    log.error(
                        "database still unavailable at shutdown: dropped %d trace rows",
                        len(pending) + rest,
                    )
                    return
                self._note_outage(exc)
                pause = delay * random.uniform(0.5, 1.0)
                if self._give_up_at is not None:  # closing: never sleep past the give-up
                    pause = max(0.0, min(pause, self._give_up_at - time.monotonic()))
                time.sleep(pause)
                delay = min(delay * 2, self.retry_max_seconds)
        self._note_recovered()

    def _store_one_by_one(
        self, table: type[SpanRecord | TraceScore], rows: list[dict[str, Any]], scores: bool
    ) -> list[dict[str, Any]]:
        """Insert rows one at a time; returns the rows not yet tried when an outage began."""
        for index, row in enumerate(rows):
            try:
                if not scores:  # every column, as executemany needs
                    row = {c: row.get(c, _SPAN_DEFAULTS.get(c)) for c in _SPAN_COLUMNS}
                with self.db.engine.begin() as connection:
                    connection.execute(insert(table), [row])
                self._count_written(1, scores)
            except IntegrityError:
                log.info("duplicate span %s/%s ignored", row.get("trace_id"), row.get("span_id"))
            except Exception as exc:
                if _is_outage(exc):
                    return rows[index:]
                with self._lock:
                    self._count_lost_rows(1, scores)
                log.error("trace row %s not written: %s", row.get("span_id"), exc)
        return []

    def _count_written(self, count: int, scores: bool) -> None:
        if scores:
            self.written_scores += count
        else:
            self.written += count

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def _note_outage(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.outage_since is None:
            with self._lock:
                self.outage_since = now
                self._outage_rows = 0
            self.outages += 1
            self._outage_logged = now
            log.warning(
                "database unavailable for traces (%s); buffering up to %d rows and retrying",
                str(exc).splitlines()[0][:200],
                self.max_pending,
            )
        elif now - self._outage_logged >= _LOG_EVERY:
            self._outage_logged = now
            log.warning(
                "database unavailable for traces for %.0fs: %d rows buffered, %d spans and "
                "%d scores dropped so far",
                now - self.outage_since,
                self.pending,
                self.dropped,
                self.dropped_scores,
            )

    def _note_recovered(self) -> None:
        if self.outage_since is None:
            return
        with self._lock:
            lasted = time.monotonic() - self.outage_since
            self.outage_since = None
            arrived = self._outage_rows
        log.warning(
            "database back for traces after %.1fs: %d rows arrived meanwhile, %d rows still "
            "buffered are being written; %d spans and %d scores dropped so far",
            lasted,
            arrived,
            self.pending,
            self.dropped,
            self.dropped_scores,
        )
