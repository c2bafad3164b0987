"""The trace API (filters, pagination) and the tracing SDK sending nested spans."""

from __future__ import annotations

import asyncio
import time

import httpx

import flywheel
from flywheel.sdk import tracing
from tests.conftest import wait_for_trace


def _echo(api: httpx.Client, text: str, model: str = "echo") -> str:
    response = api.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}]},
    )
    return response.headers["x-flywheel-trace-id"]


def test_filters_and_keyset_pagination(api: httpx.Client) -> None:
    since = time.time()
    ids = [_echo(api, f"page {i}") for i in range(7)]
    failed = _echo(api, "x", model="only-500")
    wait_for_trace(api, ids[-1])
    wait_for_trace(api, failed)
    seen, cursor = [], None
    while True:
        page = api.get(
            "/api/traces", params={"route": "echo", "since": since, "limit": 3, "cursor": cursor}
        ).json()
        assert len(page["data"]) <= 3
        seen += [s["trace_id"] for s in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, nothing twice, nothing missed
    errors = api.get("/api/traces", params={"status": "error", "since": since}).json()["data"]
    assert [s["trace_id"] for s in errors] == [failed]
    listed = api.get("/api/traces", params={"since": since, "limit": 1}).json()["data"][0]
    assert "input" not in listed and "output" not in listed  # lists stay light


def test_stats_count_requests(api: httpx.Client) -> None:
    before = api.get("/api/stats", params={"window": 600, "route": "echo"}).json()["totals"][
        "requests"
    ]
    wait_for_trace(api, _echo(api, "stats"))
    stats = api.get("/api/stats", params={"window": 600, "buckets": 10, "route": "echo"}).json()
    assert stats["totals"]["requests"] == before + 1
    assert len(stats["series"]) == 10
    assert sum(b["requests"] for b in stats["series"]) == stats["totals"]["requests"]
    assert stats["totals"]["p50_ms"] > 0


def test_sdk_spans_nest_and_join_gateway_calls(server, api: httpx.Client) -> None:
    flywheel.configure(base_url=server.base_url, api_key=server.admin_key)
    try:

        @flywheel.trace
        def retrieve(query: str) -> list[str]:
            return [f"doc about {query}"]

        @flywheel.trace(name="answer", kind="agent")
        async def answer(question: str) -> str:
            docs = retrieve(question)
            with flywheel.span("call-llm", attributes={"docs": len(docs)}) as llm_span:
                response = httpx.post(
                    server.base_url + "/v1/chat/completions",
                    headers={
                        "Authorization": f"Bearer {server.admin_key}",
                        "traceparent": flywheel.traceparent() or "",
                    },
                    json={"model": "echo", "messages": [{"role": "user", "content": question}]},
                )
                llm_span.set_output(response.json()["choices"][0]["message"]["content"])
            return llm_span.output

        root_ids: list[str] = []

        @flywheel.trace(name="outer")
        def run() -> str:
            span = flywheel.current_span()
            assert span is not None
            root_ids.append(span.trace_id)
            return asyncio.run(answer("cats"))

        assert run() == "echo: cats"
        tracing.flush()
    finally:
        flywheel.configure(base_url="", api_key="")
    trace = wait_for_trace(api, root_ids[0])
    deadline = time.monotonic() + 10
    while len(trace["spans"]) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        trace = wait_for_trace(api, root_ids[0])
    by_name = {s["name"]: s for s in trace["spans"]}
    assert set(by_name) == {
        "outer",
        "answer",
        "test_sdk_spans_nest_and_join_gateway_calls.<locals>.retrieve",
        "call-llm",
        "chat echo",
    }
    retrieve_span = by_name["test_sdk_spans_nest_and_join_gateway_calls.<locals>.retrieve"]
    assert by_name["outer"]["parent_id"] is None
    assert by_name["answer"]["parent_id"] == by_name["outer"]["span_id"]
    assert retrieve_span["parent_id"] == by_name["answer"]["span_id"]
    assert retrieve_span["input"] == {"query": "cats"} and retrieve_span["output"] == [
        "doc about cats"
    ]
    assert by_name["call-llm"]["attributes"] == {"docs": 1}
    assert by_name["chat echo"]["parent_id"] == by_name["call-llm"]["span_id"]
    assert by_name["answer"]["kind"] == "agent"


def test_sdk_records_errors(server, api: httpx.Client) -> None:
    flywheel.configure(base_url=server.base_url, api_key=server.admin_key)
    trace_id = ""
    try:
        try:
            with flywheel.span("fails") as span:
                trace_id = span.trace_id
                raise KeyError("missing")
        except KeyError:
            pass
        tracing.flush()
    finally:
        flywheel.configure(base_url="", api_key="")
    span = wait_for_trace(api, trace_id)["spans"][0]
    assert span["status"] == "error" and "KeyError" in span["error"]


def test_span_ingest_validates(api: httpx.Client) -> None:
    response = api.post(
        "/api/spans",
        json={"spans": [{"trace_id": "nothex", "span_id": "1", "name": "x", "start_time": 1.0}]},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("spans.0")
