"""Metric windows, alert rules, and signed webhook deliveries to a real loopback receiver.

Issue 6: "An alert reaches a local webhook receiver with a valid signature."
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from flywheel.errors import ServiceError
from flywheel.monitor.alerts import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AlertEvaluator,
    AlertRules,
    parse_duration,
    parse_rule,
    sign,
    verify_signature,
)
from flywheel.monitor.metrics import (
    VALID_METRICS,
    parse_metric,
    route_names,
    series,
    window_metric,
)
from flywheel.security.audit import AuditLog
from flywheel.security.secrets import SecretBox, SecretRedactor, SecretStore
from flywheel.store import Database, Project, SpanRecord
from flywheel.store.models import AlertEvent, AlertRule, DriftEvent, TraceScore

T0 = 1_700_000_000.0
HOOK_KEY = "whsec-test-signing-key-0123456789"
_counter = iter(range(1, 10**9))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    with database.session() as session:
        session.add(Project(id="other", name="other", description="", created_at=T0))
    yield database
    database.dispose()


@pytest.fixture
def secrets(db: Database) -> SecretStore:
    store = SecretStore(db, SecretBox(os.urandom(32)), redactor=SecretRedactor())
    store.set("default", "HOOK_KEY", HOOK_KEY)
    return store


@pytest.fixture
def rules(db: Database) -> AlertRules:
    return AlertRules(db, AuditLog(db))


@dataclass
class Receiver:
    """A loopback webhook endpoint: records each request and answers the next queued status
    (200 once the queue is empty)."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                state.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def add_span(
    db: Database,
    t: float,
    *,
    route: str | None = "chat",
    status: str = "ok",
    latency: float | None = 100.0,
    ttft: float | None = None,
    cost: float | None = 0.01,
    tokens: int | None = 10,
    kind: str = "gateway.chat",
    project: str = "default",
) -> None:
    n = next(_counter)
    with db.session() as session:
        session.add(
            SpanRecord(
                trace_id=f"{n:032x}",
                span_id=f"{n:016x}",
                name="chat",
                kind=kind,
                start_time=t,
                latency_ms=latency,
                ttft_ms=ttft,
                status=status,
                route=route,
                cost=cost,
                total_tokens=tokens,
                project_id=project,
            )
        )


def add_score(
    db: Database,
    t: float,
    name: str,
    value: float,
    label: str | None = None,
    *,
    route: str = "chat",
    project: str = "default",
) -> None:
    with db.session() as session:
        session.add(
            TraceScore(
                project_id=project,
                trace_id=f"{next(_counter):032x}",
                route=route,
                name=name,
                value=value,
                label=label,
                source="guard" if name.startswith("guard.") else "judge",
                created_at=t,
            )
        )


def add_drift(db: Database, t: float, signal: str, p_value: float, route: str = "chat") -> None:
    with db.session() as session:
        session.add(
            DriftEvent(
                project_id="default",
                route=route,
                signal=signal,
                method="ks",
                statistic=0.3,
                p_value=p_value,
                drifted=p_value < 0.05,
                n_baseline=100,
                n_current=100,
                baseline_start=t - 7200,
                baseline_end=t - 3600,
                current_start=t - 3600,
                current_end=t,
                created_at=t,
            )
        )


def metric(db: Database, name: str, route: str | None = None, start: float = T0) -> float | None:
    return window_metric(db, "default", name, route=route, start=start, end=T0 + 60)


def rule_spec(receiver: Receiver | None = None, **overrides: Any) -> Any:
    data: dict[str, Any] = {
        "name": "errors-high",
        "metric": "error_rate",
        "route": "chat",
        "window": "1m",
        "operator": ">",
        "threshold": 0.5,
        "cooldown": "10m",
    }
    if receiver is not None:
        data |= {"webhook_url": receiver.url, "webhook_secret": "HOOK_KEY"}
    return parse_rule(data | overrides)


def check(evaluator: AlertEvaluator, now: float) -> list[dict[str, Any]]:
    return asyncio.run(evaluator.check(now=now))


def event_rows(db: Database) -> list[AlertEvent]:
    with db.session() as session:
        return list(session.scalars(select(AlertEvent).order_by(AlertEvent.id)))


# --- metrics ---------------------------------------------------------------------------------


def test_parse_metric_names_and_errors() -> None:
    assert parse_metric("latency_p95_ms").percentile == 95
    assert parse_metric("score:judge.relevance").argument == "judge.relevance"
    assert parse_metric("guard_hits:pii").base == "guard_hits"
    assert parse_metric("drift_p_value").source == "drift"
    with pytest.raises(ValueError, match="valid metrics: requests, errors") as info:
        parse_metric("latency_p42_ms")
    assert "score:<name>" in str(info.value)
    with pytest.raises(ValueError, match="needs a score name"):
        parse_metric("score")
    with pytest.raises(ValueError, match="unknown metric"):
        parse_metric("requests:chat")
    assert "guard_blocks" in VALID_METRICS


def test_window_metrics_over_exact_windows(db: Database) -> None:
    for i, (latency, status) in enumerate(
        [(100.0, "ok"), (200.0, "error"), (300.0, "ok"), (400.0, "cancelled")]
    ):
        add_span(db, T0 + 10 * i, latency=latency, status=status, ttft=latency / 10)
    add_span(db, T0 + 5, route="summarize", status="error", latency=1000.0, cost=0.5, tokens=7)
    # Outside: the window is [T0, T0 + 60); another kind; another project.
    add_span(db, T0 + 60, status="error", latency=9999.0)
    add_span(db, T0 - 0.001, status="error", latency=9999.0)
    add_span(db, T0 + 1, kind="app.step", status="error", latency=9999.0)
    add_span(db, T0 + 1, project="other", status="error", latency=9999.0)

    assert metric(db, "requests") == 5.0
    assert metric(db, "errors") == 2.0
    assert metric(db, "error_rate") == pytest.approx(2 / 5)
    assert metric(db, "error_rate", "chat") == pytest.approx(1 / 4)
    assert metric(db, "latency_p95_ms", "chat") == pytest.approx(385.0)
    assert metric(db, "latency_p50_ms") == pytest.approx(300.0)
    assert metric(db, "latency_p99_ms") == pytest.approx(
        float(np.percentile([100, 200, 300, 400, 1000], 99))
    )
    assert metric(db, "ttft_p95_ms", "chat") == pytest.approx(38.5)
    assert metric(db, "cost") == pytest.approx(0.54)
    assert metric(db, "cost", "chat") == pytest.approx(0.04)
    assert metric(db, "tokens") == 47.0
    # A window with no traffic: counts are 0, rates and percentiles have no value.
    empty = {"start": T0 + 1000, "end": T0 + 2000, "route": None}
    assert window_metric(db, "default", "requests", **empty) == 0.0
    assert window_metric(db, "default", "error_rate", **empty) is None
    assert window_metric(db, "default", "latency_p95_ms", **empty) is None
    with pytest.raises(ValueError, match="empty window"):
        window_metric(db, "default", "requests", route=None, start=T0, end=T0)


def test_score_and_drift_window_metrics(db: Database) -> None:
    add_score(db, T0 + 1, "guard.pii", 0.9, "block")
    add_score(db, T0 + 2, "guard.pii", 0.7, "redact")
    add_score(db, T0 + 3, "guard.injection", 0.8, "flag", route="summarize")
    add_score(db, T0 + 4, "judge.relevance", 0.8)
    add_score(db, T0 + 5, "judge.relevance", 0.4)
    add_score(db, T0 + 6, "judge.relevance", 0.3, route="summarize")
    add_score(db, T0 + 70, "guard.pii", 1.0, "block")  # after the window
    add_score(db, T0 + 7, "guard.pii", 1.0, "block", project="other")
    add_drift(db, T0 + 10, "prompt_embedding", 0.2)
    add_drift(db, T0 + 20, "latency_ms", 0.01)
    add_drift(db, T0 + 30, "latency_ms", 0.04, route="summarize")
    add_drift(db, T0 - 30, "prompt_embedding", 0.0001)  # before the window

    assert metric(db, "guard_hits") == 3.0
    assert metric(db, "guard_hits", "chat") == 2.0
    assert metric(db, "guard_hits:pii") == 2.0
    assert metric(db, "guard_hits:injection", "chat") == 0.0
    assert metric(db, "guard_blocks") == 1.0
    assert metric(db, "score:judge.relevance", "chat") == pytest.approx(0.6)
    assert metric(db, "score:judge.relevance") == pytest.approx(0.5)
    assert metric(db, "score:judge.missing") is None
    assert metric(db, "drift_p_value") == pytest.approx(0.01)
    assert metric(db, "drift_p_value:prompt_embedding") == pytest.approx(0.2)
    assert metric(db, "drift_p_value", "summarize") == pytest.approx(0.04)
    assert metric(db, "drift_p_value:response_length") is None


def test_series_buckets_and_routes(db: Database) -> None:
    add_span(db, T0 + 1, latency=100.0, cost=0.1, tokens=5)
    add_span(db, T0 + 2, latency=300.0, status="error", cost=0.2, tokens=6)
    add_span(db, T0 + 65, latency=50.0, route="summarize")
    add_span(db, T0 + 200, latency=1.0)  # past the range
    add_score(db, T0 + 3, "guard.pii", 0.9, "block")
    add_score(db, T0 + 4, "judge.relevance", 1.0)
    add_score(db, T0 + 5, "judge.relevance", 0.5)
    add_drift(db, T0 + 70, "latency_ms", 0.3)
    add_drift(db, T0 + 80, "latency_ms", 0.02)

    buckets = series(db, "default", route=None, start=T0, end=T0 + 180, bucket_seconds=60)
    assert [b["t"] for b in buckets] == [T0, T0 + 60, T0 + 120]
    first, second, third = buckets
    assert (first["requests"], first["errors"], first["error_rate"]) == (2, 1, 0.5)
    assert first["latency_p50_ms"] == pytest.approx(200.0)
    assert first["latency_p95_ms"] == pytest.approx(290.0)
    assert first["cost"] == pytest.approx(0.3)
    assert first["tokens"] == 11
    assert first["guard_hits"] == 1
    assert first["scores"] == {"judge.relevance": pytest.approx(0.75)}
    assert first["drift"] == {}
    assert second["requests"] == 1 and second["latency_p95_ms"] == pytest.approx(50.0)
    assert second["drift"] == {"latency_ms": pytest.approx(0.02)}
    assert third["requests"] == 0 and third["error_rate"] is None
    assert third["latency_p50_ms"] is None and third["scores"] == {}
    assert not any(b["truncated"] for b in buckets)

    only_chat = series(db, "default", route="chat", start=T0, end=T0 + 120, bucket_seconds=60)
    assert [b["requests"] for b in only_chat] == [2, 0]

    assert route_names(db, "default", since=T0) == ["chat", "summarize"]
    assert route_names(db, "default", since=T0 + 100) == ["chat"]
    with pytest.raises(ValueError, match="buckets"):
        series(db, "default", route=None, start=T0, end=T0 + 10**7, bucket_seconds=1)


# --- rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"window": "5x"}, "window"),
        ({"window": 0}, "window"),
        ({"cooldown": "-1m"}, "cooldown"),
        ({"metric": "latency_p42_ms"}, "metric"),
        ({"operator": "=="}, "operator"),
        ({"threshold": "high"}, "threshold"),
        ({"name": "has space"}, "name"),
        ({"webhook_url": "ftp://example.com/x", "webhook_secret": "K"}, "webhook_url"),
        ({"webhook_url": "http://127.0.0.1:9/hook"}, "webhook_secret"),
        (
            {"webhook_url": "http://127.0.0.1:9/hook", "webhook_secret": "bad/name"},
            "webhook_secret",
        ),
        ({"severity": "page"}, "severity"),
    ],
)
def test_bad_rule_specs_name_the_field(overrides: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ServiceError) as info:
        rule_spec(**overrides)
    assert info.value.status_code == 400
    assert info.value.param == field_name
    assert field_name in info.value.message


def test_durations() -> None:
    spec = rule_spec(window="1h", cooldown="30s")
    assert (spec.window, spec.cooldown) == (3600, 30)
    assert rule_spec(window=90, cooldown="2d").cooldown == 172_800
    assert (
        parse_rule({k: v for k, v in spec.model_dump().items() if k != "cooldown"}).cooldown == 900
    )
    assert parse_duration("5m") == 300


def test_rule_store_crud_and_audit(db: Database, rules: AlertRules, secrets: SecretStore) -> None:
    view, created = rules.put("default", rule_spec(), "alice")
    assert created is True
    assert view["window"] == 60 and view["cooldown"] == 600 and view["state"] == "ok"
    assert rules.put("default", rule_spec(), "alice") == (view, False)
    updated, created = rules.put("default", rule_spec(threshold=0.2), "bob")
    assert created is False and updated["threshold"] == 0.2 and updated["updated_by"] == "bob"
    assert [r["name"] for r in rules.list("default")] == ["errors-high"]
    assert rules.list("other") == []
    assert rules.get("default", "errors-high")["threshold"] == 0.2

    with pytest.raises(ServiceError) as info:
        rules.put(
            "default",
            rule_spec(webhook_url="http://127.0.0.1:9/h", webhook_secret="NOPE"),
            "bob",
        )
    assert (info.value.status_code, info.value.param) == (400, "webhook_secret")
    with pytest.raises(ServiceError) as info:
        rules.put("missing-project", rule_spec(), "bob")
    assert info.value.status_code == 404

    rules.delete("default", "errors-high", "carol")
    for call in (
        lambda: rules.get("default", "errors-high"),
        lambda: rules.delete("default", "errors-high", "carol"),
        lambda: rules.events("default", rule="errors-high"),
    ):
        with pytest.raises(ServiceError) as info:
            call()
        assert info.value.status_code == 404

    audit = AuditLog(db)
    assert audit.verify().ok
    entries = [e for e in audit.list(project_id="default") if e.resource_type == "alert_rule"]
    assert sorted((e.action, e.actor) for e in entries) == [
        ("alert_rule.create", "alice"),
        ("alert_rule.delete", "carol"),
        ("alert_rule.update", "bob"),
    ]
    update_entry = next(e for e in entries if e.action == "alert_rule.update")
    assert update_entry.before["threshold"] == 0.5
    assert update_entry.after["threshold"] == 0.2
    assert update_entry.resource_id == "errors-high"


# --- signing ---------------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    body = b'{"rule":"x"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", "1700000000", body) == f"sha256={expected}"
    signature = sign("k", "1700000000", body)
    assert verify_signature("k", signature, "1700000000", body, now=T0 + 10)
    assert not verify_signature("k", signature, "1700000000", body + b" ", now=T0)
    assert not verify_signature("k2", signature, "1700000000", body, now=T0)
    assert not verify_signature("k", signature, "1700000001", body, now=T0)
    assert not verify_signature("k", signature, "1700000000", body, now=T0 + 301)
    assert not verify_signature("k", signature, "17e8", body, now=T0)
    assert not verify_signature("k", "sha256=é", "1700000000", body, now=T0)


# --- evaluation and delivery -----------------------------------------------------------------


def add_errors(db: Database, start: float, errors: int, oks: int = 0) -> None:
    for i in range(errors):
        add_span(db, start + i, status="error")
    for i in range(oks):
        add_span(db, start + errors + i)


def test_alert_fires_once_signed_then_cooldown_and_resolution(
    db: Database, rules: AlertRules, secrets: SecretStore, receiver: Receiver
) -> None:
    rules.put("default", rule_spec(receiver), "alice")
    evaluator = AlertEvaluator(db, rules, secrets.reveal)
    add_errors(db, T0 + 10, errors=3, oks=1)

    assert check(evaluator, T0 - 100) == []  # nothing yet in that window
    fired = check(evaluator, T0 + 60)
    assert len(fired) == 1
    event = fired[0]
    assert (event["status"], event["delivery"], event["attempts"]) == ("firing", "delivered", 1)
    assert event["value"] == pytest.approx(0.75)
    assert event["delivered_at"] == T0 + 60

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    body, headers = request["body"], request["headers"]
    payload = json.loads(body)
    assert payload == {
        "rule": "errors-high",
        "project_id": "default",
        "status": "firing",
        "metric": "error_rate",
        "route": "chat",
        "value": pytest.approx(0.75),
        "threshold": 0.5,
        "operator": ">",
        "window_seconds": 60,
        "message": event["message"],
        "event_id": event["id"],
        "fired_at": T0 + 60,
    }
    assert "error_rate on route 'chat' is 0.75" in payload["message"]
    signature, timestamp = headers[SIGNATURE_HEADER], headers[TIMESTAMP_HEADER]
    assert timestamp == str(int(T0 + 60))
    assert verify_signature(HOOK_KEY, signature, timestamp, body, now=T0 + 61)
    assert not verify_signature(HOOK_KEY, signature, timestamp, body.replace(b"0.75", b"0.1"))
    assert not verify_signature("another-key", signature, timestamp, body, now=T0 + 61)
    assert not verify_signature(HOOK_KEY, signature, timestamp, body, now=T0 + 3600)

    # Still breaching: no new event while firing.
    assert check(evaluator, T0 + 65) == []
    view = rules.get("default", "errors-high")
    assert view["state"] == "firing" and view["last_fired_at"] == T0 + 60
    assert view["last_value"] == pytest.approx(0.75) and view["last_checked_at"] == T0 + 65

    # The window empties: resolved (error_rate has no value, which is not a breach).
    resolved = check(evaluator, T0 + 200)
    assert [(e["status"], e["delivery"]) for e in resolved] == [("resolved", "delivered")]
    assert json.loads(receiver.requests[1]["body"])["status"] == "resolved"
    assert rules.get("default", "errors-high")["state"] == "ok"

    # Breaching again within the 10-minute cooldown: firing, but no event.
    add_errors(db, T0 + 250, errors=2)
    assert check(evaluator, T0 + 300) == []
    assert rules.get("default", "errors-high")["state"] == "firing"
    assert len(receiver.requests) == 2
    # Still breaching once the cooldown is over: now it is announced.
    add_errors(db, T0 + 650, errors=2)
    refired = check(evaluator, T0 + 700)
    assert [(e["status"], e["delivery"]) for e in refired] == [("firing", "delivered")]
    assert len(receiver.requests) == 3

    listed = rules.events("default", rule="errors-high")
    assert [e["status"] for e in listed] == ["firing", "resolved", "firing"]
    assert [e["status"] for e in rules.events("default", limit=1)] == ["firing"]
    assert rules.events("other") == []


def test_two_evaluators_record_and_deliver_each_event_once(
    tmp_path: Path, db: Database, rules: AlertRules, secrets: SecretStore, receiver: Receiver
) -> None:
    names = [f"rule-{i}" for i in range(8)]
    for name in names:
        rules.put("default", rule_spec(receiver, name=name), "alice")
    add_errors(db, T0 + 10, errors=3)
    second_db = Database(db.url)  # another replica's engine
    try:
        second_rules = AlertRules(second_db, AuditLog(second_db))
        first = AlertEvaluator(db, rules, secrets.reveal)
        second = AlertEvaluator(second_db, second_rules, secrets.reveal)

        async def both() -> list[list[dict[str, Any]]]:
            return list(await asyncio.gather(first.check(T0 + 60), second.check(T0 + 60)))

        results = asyncio.run(both())
    finally:
        second_db.dispose()
    recorded = [e["rule"] for result in results for e in result]
    assert sorted(recorded) == names
    rows = event_rows(db)
    assert len(rows) == len(names)
    assert {row.delivery for row in rows} == {"delivered"}
    assert {row.attempts for row in rows} == {1}
    delivered = sorted(json.loads(r["body"])["rule"] for r in receiver.requests)
    assert delivered == names


def test_failed_delivery_is_retried_with_backoff(
    db: Database, rules: AlertRules, secrets: SecretStore, receiver: Receiver
) -> None:
    rules.put("default", rule_spec(receiver, window="1h"), "alice")
    evaluator = AlertEvaluator(db, rules, secrets.reveal, retry_base_seconds=30)
    add_errors(db, T0 + 10, errors=3)
    receiver.statuses = [500]

    [event] = check(evaluator, T0 + 60)
    assert (event["delivery"], event["attempts"]) == ("failed", 1)
    assert event["last_error"].startswith("HTTP 500")
    assert check(evaluator, T0 + 80) == []  # the first retry is due 30 s after the event
    assert len(receiver.requests) == 1
    check(evaluator, T0 + 91)
    [row] = event_rows(db)
    assert (row.delivery, row.attempts, row.last_error) == ("delivered", 2, None)
    assert row.delivered_at == T0 + 91
    assert len(receiver.requests) == 2
    first, retry = (r["body"] for r in receiver.requests)
    assert first == retry  # the same event, signed again at the retry's time
    assert receiver.requests[1]["headers"][TIMESTAMP_HEADER] == str(int(T0 + 91))


def test_delivery_gives_up_after_max_attempts(
    db: Database, rules: AlertRules, secrets: SecretStore, receiver: Receiver
) -> None:
    rules.put("default", rule_spec(receiver, window="1h"), "alice")
    evaluator = AlertEvaluator(db, rules, secrets.reveal, max_attempts=2, retry_base_seconds=1)
    add_errors(db, T0 + 10, errors=3)
    receiver.statuses = [500, 502, 503]
    check(evaluator, T0 + 60)
    check(evaluator, T0 + 62)
    check(evaluator, T0 + 120)
    [row] = event_rows(db)
    assert (row.delivery, row.attempts) == ("failed", 2)
    assert row.last_error is not None and row.last_error.startswith("HTTP 502")
    assert len(receiver.requests) == 2


def test_unreachable_webhook_and_missing_secret_fail_with_reason(
    db: Database, rules: AlertRules, secrets: SecretStore
) -> None:
    rules.put(
        "default",
        rule_spec(webhook_url="http://127.0.0.1:9/closed", webhook_secret="HOOK_KEY", window="1h"),
        "alice",
    )
    add_errors(db, T0 + 10, errors=3)
    evaluator = AlertEvaluator(db, rules, secrets.reveal, timeout=2)
    [event] = check(evaluator, T0 + 60)
    assert event["delivery"] == "failed" and event["last_error"].startswith("ConnectError")

    secrets.delete("default", "HOOK_KEY")
    check(evaluator, T0 + 100)
    [row] = event_rows(db)
    assert row.attempts == 2
    assert row.last_error == "webhook secret 'HOOK_KEY' unavailable: KeyError"


def test_events_without_webhook_and_a_broken_rule(
    db: Database, rules: AlertRules, secrets: SecretStore
) -> None:
    rules.put("default", rule_spec(name="quiet"), "alice")
    rules.put(
        "default",
        rule_spec(name="judge-low", metric="score:judge.relevance", operator="<", threshold=0.5),
        "alice",
    )
    with db.session() as session:
        # A rule whose metric no longer parses (stored by an older version) must not stop
        # the others from being checked.
        session.add(
            AlertRule(
                id="broken",
                project_id="default",
                name="broken",
                metric="no_such_metric",
                window_seconds=60,
                operator=">",
                threshold=1,
                cooldown_seconds=60,
                enabled=True,
                state="ok",
                created_at=T0,
                updated_at=T0,
                updated_by="test",
            )
        )
    add_errors(db, T0 + 10, errors=3)
    add_score(db, T0 + 20, "judge.relevance", 0.2)
    events = check(AlertEvaluator(db, rules, secrets.reveal), T0 + 60)
    assert sorted((e["rule"], e["delivery"]) for e in events) == [
        ("judge-low", "none"),
        ("quiet", "none"),
    ]
    with db.session() as session:
        broken = session.get(AlertRule, "broken")
        assert broken is not None and broken.last_checked_at is None
        assert session.scalar(select(func.count()).select_from(AlertEvent)) == 2


def test_series_marks_buckets_cut_by_the_row_cap(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    for t in (T0 + 1, T0 + 61, T0 + 62, T0 + 121):
        add_span(db, t)
    monkeypatch.setattr("flywheel.monitor.metrics.MAX_SERIES_ROWS", 3)
    buckets = series(db, "default", route=None, start=T0, end=T0 + 180, bucket_seconds=60)
    # The newest 3 spans are read; the oldest one read is at T0 + 61.
    assert [b["requests"] for b in buckets] == [0, 2, 1]
    assert [b["truncated"] for b in buckets] == [True, True, False]
