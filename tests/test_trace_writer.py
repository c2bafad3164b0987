"""The batched trace writer on a real database (SQLite, or PostgreSQL with ``--db=postgres``).

The outage tests lock a real SQLite file from a second connection (``BEGIN EXCLUSIVE``), which
makes every write of the writer fail with "database is locked" until the lock is released: the
same error path as a PostgreSQL server that is down (tests/test_trace_outage.py does that one).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select

from flywheel.store import Database, SpanRecord, TraceScore
from flywheel.tracing import TraceWriter, new_span_id, new_trace_id, parse_traceparent


def _span(**extra: object) -> dict:
    return {
        "trace_id": new_trace_id(),
        "span_id": new_span_id(),
        "name": "x",
        "kind": "function",
        "start_time": time.time(),
        **extra,
    }


def _count(db: Database) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(SpanRecord)) or 0


def test_concurrent_producers_lose_nothing(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    writer = TraceWriter(db, batch_size=500, flush_seconds=0.05)

    def produce() -> None:
        for _ in range(2500):
            writer.record(_span())

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()
    assert _count(db) == 10_000
    assert writer.written == 10_000 and writer.dropped == 0


def test_duplicates_do_not_sink_a_batch(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    writer = TraceWriter(db, flush_seconds=0.05)
    twin = _span()
    writer.record(twin)
    writer.flush()
    for row in [_span(), dict(twin), _span()]:
        writer.record(row)
    writer.close()
    assert _count(db) == 3


def test_flush_waits_for_queued_spans(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    writer = TraceWriter(db, flush_seconds=0.5)
    for _ in range(10):
        writer.record(_span())
    assert writer.flush(10)
    assert _count(db) == 10
    writer.close()
    writer.record(_span())  # after close: counted as dropped, never raises
    assert writer.dropped == 1


def _sqlite_db(tmp_path: Any) -> tuple[Database, str]:
    """A migrated SQLite database whose connections give up on a lock after 50 ms (the
    server's 10 s busy timeout would make an outage test slow, not different)."""
    path = str(tmp_path / "outage.db")
    db = Database(f"sqlite:///{path}")

    def short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=50")

    event.listen(db.engine, "connect", short_busy_timeout)
    db.migrate()
    return db, path


@contextmanager
def _locked(path: str) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's exclusive lock on ``path``: nobody else reads or writes until it ends."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield holder
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _names(db: Database) -> set[str]:
    with db.session() as session:
        return set(session.scalars(select(SpanRecord.name)))


def test_outage_is_buffered_and_flushed_afterwards(tmp_path: Any) -> None:
    db, path = _sqlite_db(tmp_path)
    writer = TraceWriter(
        db, batch_size=100, flush_seconds=0.02, max_pending=10_000, retry_max_seconds=0.2
    )
    trace = _span()
    with _locked(path):
        for i in range(1000):
            writer.record(_span(name=f"s{i}"))
        writer.record_score(
            {
                "project_id": "default",
                "trace_id": trace["trace_id"],
                "name": "judge.x",
                "value": 1.0,
                "source": "judge",
                "created_at": time.time(),
            }
        )
        deadline = time.monotonic() + 5
        while not writer.stats["database_down"] and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # several failed tries
        stats = writer.stats
        assert stats["database_down"] == 1 and stats["outages"] == 1
        assert stats["pending"] == 1001 and stats["written"] == 0
        assert not writer.flush(0.2)  # a flush does not pretend during an outage
    assert writer.flush(10)
    assert writer.stats["database_down"] == 0
    assert _names(db) == {f"s{i}" for i in range(1000)}
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(TraceScore)) == 1
    assert writer.written == 1000 and writer.written_scores == 1
    assert writer.dropped == 0 and writer.overflowed == 0
    writer.close()


def test_full_buffer_drops_the_oldest_and_counts_them(tmp_path: Any) -> None:
    db, path = _sqlite_db(tmp_path)
    writer = TraceWriter(
        db, batch_size=10, flush_seconds=0.01, max_pending=100, retry_max_seconds=0.1
    )
    with _locked(path):
        writer.record(_span(name="s0"))
        # The first row leaves as a batch of its own and waits in the writer's hands.
        deadline = time.monotonic() + 5
        while not writer.stats["database_down"] and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, 300):
            writer.record(_span(name=f"s{i}"))
        assert writer.pending == 100  # the bound holds, the batch in flight included
    assert writer.flush(10)
    stored = _names(db)
    # The batch in flight survives, then the newest 99 rows: the oldest waiting were dropped.
    assert stored == {"s0"} | {f"s{i}" for i in range(201, 300)}
    assert writer.dropped == writer.overflowed == 300 - len(stored) == 200
    writer.close()


def test_close_during_an_outage_counts_what_it_could_not_write(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    db, path = _sqlite_db(tmp_path)
    writer = TraceWriter(db, flush_seconds=0.01, retry_max_seconds=0.1)
    with _locked(path):
        for _ in range(50):
            writer.record(_span())
        started = time.monotonic()
        writer.close(timeout=1.0)
        assert time.monotonic() - started < 2
    assert _count(db) == 0
    assert writer.dropped == 50 and writer.written == 0
    assert "50 spans and 0 scores dropped" in caplog.text


def test_parse_traceparent() -> None:
    assert parse_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01") == ("a" * 32, "b" * 16)
    assert parse_traceparent("00-" + "0" * 32 + "-" + "b" * 16 + "-01") is None
    assert parse_traceparent("garbage") is None
    assert parse_traceparent(None) is None
