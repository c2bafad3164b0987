"""Sustained trace ingestion: spans/s into SQLite and PostgreSQL with zero loss.

Two paths:

- ``writer``: producer threads hand gateway-like span rows (messages, answer, tokens, cost,
  attempts) to a :class:`~flywheel.tracing.TraceWriter`, as request handlers do, for a fixed
  time; the rate is spans stored per second from the first record to the final flush. The
  producers never let more than half the writer's buffer wait, so nothing is dropped and the
  rate is what the database sustains.
- ``otlp``: a real ``flywheel up`` takes OTLP/HTTP protobuf exports of 500 spans each
  (``POST /v1/traces``) from concurrent clients; the rate is spans stored per second. The
  clients hold back while the server's trace writer has more than half its buffer waiting
  (read from ``/metrics``), as a collector honouring backpressure would.

Each run checks that every span sent is in the database (zero loss).

    python bench/trace_ingest.py [--seconds 20] [--path writer|otlp|both]
                                 [--database-url URL | --postgres] [--json results.json]

``--postgres`` starts a throwaway PostgreSQL on loopback from the machine's binaries (as the
test suite does). Target (issue 9): >= 5,000 spans/s on SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from sqlalchemy import func, select

from flywheel.store import Database, SpanRecord
from flywheel.testing.upstream import free_port
from flywheel.tracing import TraceWriter, new_span_id, new_trace_id

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

BIN = Path(sys.executable).parent
KEY = "fw-ingest-bench-key"
OTLP_BATCH = 500
BUFFER = 100_000  # the server's FLYWHEEL_TRACE_BUFFER_SPANS (its default)


def gateway_span() -> dict[str, Any]:
    """A row shaped like the gateway's own (short chat, full capture)."""
    now = time.time()
    return {
        "trace_id": new_trace_id(),
        "span_id": new_span_id(),
        "name": "chat echo",
        "kind": "gateway.chat",
        "start_time": now - 0.05,
        "end_time": now,
        "latency_ms": 50.0,
        "status": "ok",
        "status_code": 200,
        "route": "echo",
        "model": "up-echo",
        "provider": "up",
        "input": {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        "output": {"role": "assistant", "content": "The capital of France is Paris."},
        "prompt_tokens": 12,
        "completion_tokens": 8,
        "total_tokens": 20,
        "cost": 0.00002,
        "attempts": [{"model": "up-echo", "ms": 48.0, "error": None}],
        "attributes": {"user": f"u{random.randrange(1000)}"},
        "project_id": "default",
    }


def _count(db: Database) -> int:
    query = select(func.count()).select_from(SpanRecord)
    with db.session() as session:
        return int(session.scalar(query) or 0)


def bench_writer(database_url: str, seconds: float, producers: int = 4) -> dict[str, Any]:
    db = Database(database_url)
    db.migrate()
    before = _count(db)
    writer = TraceWriter(db, batch_size=1000, flush_seconds=0.2, max_pending=100_000)
    stop = threading.Event()
    sent = [0] * producers
    ceiling = writer.max_pending // 2

    def produce(slot: int) -> None:
        rows = [gateway_span() for _ in range(200)]
        while not stop.is_set():
            if writer.pending > ceiling:  # the database is behind: wait, do not overflow
                time.sleep(0.001)
                continue
            for row in rows:
                row["trace_id"], row["span_id"] = new_trace_id(), new_span_id()
                writer.record(dict(row))
            sent[slot] += len(rows)

    started = time.perf_counter()
    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    produced_for = time.perf_counter() - started
    assert writer.flush(300), "the writer did not catch up"
    elapsed = time.perf_counter() - started
    writer.close()
    stored = _count(db) - before
    db.dispose()
    total = sum(sent)
    return {
        "path": "TraceWriter",
        "spans": total,
        "stored": stored,
        "lost": total - stored,
        "dropped": writer.dropped,
        "seconds": round(elapsed, 2),
        "produce_seconds": round(produced_for, 2),
        "spans_per_s": round(stored / elapsed),
    }


def _otlp_payload() -> bytes:
    spans = []
    trace_id = bytes.fromhex(new_trace_id())
    for _ in range(OTLP_BATCH):
        now = time.time_ns()
        spans.append(
            Span(
                trace_id=trace_id,
                span_id=bytes.fromhex(new_span_id()),
                name="chat gpt-4o-mini",
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=now - 50_000_000,
                end_time_unix_nano=now,
                attributes=[
                    KeyValue(key="gen_ai.system", value=AnyValue(string_value="openai")),
                    KeyValue(key="gen_ai.request.model", value=AnyValue(string_value="gpt")),
                    KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(int_value=12)),
                    KeyValue(key="gen_ai.usage.output_tokens", value=AnyValue(int_value=8)),
                ],
            )
        )
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])]
    )
    return request.SerializeToString()


def bench_otlp(database_url: str, seconds: float, clients: int = 4) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="flywheel-ingest-"))
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_DATABASE_URL": database_url,
        "FLYWHEEL_ADMIN_KEY": KEY,
        "FLYWHEEL_PRELOAD_MODELS": "false",
        "FLYWHEEL_JOBS_ENABLED": "false",
        "FLYWHEEL_LOG_LEVEL": "warning",
        "FLYWHEEL_CONFIG_FILE": str(home / "flywheel.yaml"),
        "FLYWHEEL_TRACE_BUFFER_SPANS": str(BUFFER),
        "FLYWHEEL_METRICS_PUBLIC": "true",
    }
    (home / "flywheel.yaml").write_text("routes: []\n")
    server = subprocess.Popen(
        [str(BIN / "flywheel"), "up", "--port", str(port)],
        env=env,
        stdout=(home / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / "server.log").read_text()[-3000:])
            time.sleep(0.2)
        db = Database(database_url)
        before = _count(db)
        payloads = [_otlp_payload() for _ in range(clients * 4)]
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-protobuf"}
        stop = threading.Event()
        accepted = [0] * clients
        failures = [0] * clients

        def pending() -> float:
            """The server's trace writer backlog (its /metrics gauge)."""
            text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
            for line in text.splitlines():
                if line.startswith("flywheel_trace_writer_pending "):
                    return float(line.split()[1])
            return 0.0

        backlog = [0.0]

        def watch() -> None:
            while not stop.is_set():
                backlog[0] = pending()
                time.sleep(0.2)

        def client(slot: int) -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                turn = slot
                while not stop.is_set():
                    # Keep the server's writer within half its buffer, as a collector that
                    # honours backpressure would: this measures what is stored, not dropped.
                    if backlog[0] > BUFFER / 2:
                        time.sleep(0.05)
                        continue
                    body = payloads[turn % len(payloads)]
                    turn += clients
                    # Fresh span ids every time: the same ids twice are duplicates, not load.
                    request = ExportTraceServiceRequest.FromString(body)
                    spans = request.resource_spans[0].scope_spans[0].spans
                    trace_id = bytes.fromhex(new_trace_id())
                    for span in spans:
                        span.trace_id = trace_id
                        span.span_id = bytes.fromhex(new_span_id())
                    response = http.post("/v1/traces", content=request.SerializeToString())
                    if response.status_code == 200:
                        accepted[slot] += len(spans)
                    else:
                        failures[slot] += 1

        started = time.perf_counter()
        with ThreadPoolExecutor(clients + 1) as pool:
            futures = [pool.submit(client, i) for i in range(clients)]
            futures.append(pool.submit(watch))
            time.sleep(seconds)
            stop.set()
            for future in futures:
                future.result()
        total = sum(accepted)
        # Wait for the server's writer to store what it acknowledged.
        deadline = time.monotonic() + 300
        while pending() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        stored = _count(db) - before
        elapsed = time.perf_counter() - started
        db.dispose()
        return {
            "path": "OTLP/HTTP protobuf",
            "spans": total,
            "stored": stored,
            "lost": total - stored,
            "refused_requests": sum(failures),
            "seconds": round(elapsed, 2),
            "spans_per_s": round(stored / elapsed),
        }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--path", choices=("writer", "otlp", "both"), default="both")
    parser.add_argument("--database-url", help="default: a SQLite file in a temp folder")
    parser.add_argument("--postgres", action="store_true", help="a throwaway local PostgreSQL")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    pg = None
    if args.postgres:
        from tests.pg import PostgresServer

        pg = PostgresServer.start()
    try:
        results = []
        for path in ("writer", "otlp") if args.path == "both" else (args.path,):
            if pg is not None:
                url = pg.create_database("ingest")
            elif args.database_url:
                url = args.database_url
            else:
                url = f"sqlite:///{tempfile.mkdtemp(prefix='flywheel-ingest-')}/flywheel.db"
            run = bench_writer if path == "writer" else bench_otlp
            result = run(url, args.seconds)
            result["database"] = url.split(":", 1)[0].split("+", 1)[0]
            result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        if pg is not None:
            pg.stop()
    print("\n| database | path | spans | stored | lost | seconds | spans/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['database']} | {r['path']} | {r['spans']} | {r['stored']} | {r['lost']} | "
            f"{r['seconds']} | {r['spans_per_s']} |"
        )
    report = {"machine": describe(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
