"""The batched trace writer on a real SQLite database."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select

from flywheel.store import Database, SpanRecord
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


def test_parse_traceparent() -> None:
    assert parse_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01") == ("a" * 32, "b" * 16)
    assert parse_traceparent("00-" + "0" * 32 + "-" + "b" * 16 + "-01") is None
    assert parse_traceparent("garbage") is None
    assert parse_traceparent(None) is None
