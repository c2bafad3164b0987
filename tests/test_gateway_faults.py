"""Routes against a real upstream on loopback that fails on purpose."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest

from flywheel.testing import FakeUpstream
from tests.conftest import wait_for_trace


def _chat(
    api: httpx.Client, model: str, text: str = "hello world", **extra: object
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    return api.post("/v1/chat/completions", json=body)


def _events(response: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _events_lenient(response: httpx.Response) -> list[dict | str]:
    """Like ``_events``, skipping lines that are not JSON (none should reach a caller)."""
    out: list[dict | str] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            try:
                out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
            except ValueError:
                out.append({"unparsable": line})
    return out


def test_500_falls_back_after_retrying(api: httpx.Client, upstream) -> None:
    before = Counter(upstream.calls)
    response = _chat(api, "fallback-500")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello world"
    assert upstream.calls["fail-500"] - before["fail-500"] == 2  # the try and one retry
    trace = wait_for_trace(api, response.headers["x-flywheel-trace-id"])
    span = trace["spans"][0]
    assert span["status"] == "ok" and span["model"] == "up-echo"
    assert [a["model"] for a in span["attempts"]] == ["up-500", "up-500", "up-echo"]
    assert span["attempts"][0]["error"]["trigger"] == 500


def test_500_everywhere_is_a_502_with_openai_error(api: httpx.Client, upstream) -> None:
    before = upstream.calls["fail-500"]
    response = _chat(api, "only-500")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "server_error" and "upstream exploded" in error["message"]
    assert upstream.calls["fail-500"] - before == 3
    trace = wait_for_trace(api, response.headers["x-flywheel-trace-id"])
    assert trace["spans"][0]["status"] == "error"
    assert trace["spans"][0]["status_code"] == 502


def test_429_retry_after_is_honoured_then_reported(api: httpx.Client, upstream) -> None:
    before = upstream.calls["rate-limit"]
    started = time.perf_counter()
    response = _chat(api, "retry-429")
    elapsed = time.perf_counter() - started
    assert response.status_code == 429
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "1"
    assert upstream.calls["rate-limit"] - before == 2
    assert elapsed >= 1.0  # waited the upstream's Retry-After before the retry


def test_429_falls_back(api: httpx.Client) -> None:
    response = _chat(api, "fallback-429")
    assert response.status_code == 200
    assert response.json()["model"] == "echo"


def test_timeout_falls_back(api: httpx.Client) -> None:
    started = time.perf_counter()
    response = _chat(api, "timeout")
    assert response.status_code == 200
    assert time.perf_counter() - started < 10
    trace = wait_for_trace(api, response.headers["x-flywheel-trace-id"])
    attempts = trace["spans"][0]["attempts"]
    assert attempts[0]["model"] == "up-hang" and attempts[0]["error"]["trigger"] == "timeout"
    assert attempts[0]["ms"] >= 900


def test_timeout_without_fallback_is_504(api: httpx.Client) -> None:
    response = _chat(api, "only-timeout")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_garbage_json_falls_back(api: httpx.Client) -> None:
    response = _chat(api, "garbage")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello world"


def test_retries_recover_a_flaky_target(api: httpx.Client, upstream) -> None:
    user = uuid.uuid4().hex  # the upstream fails twice per user, then answers
    response = _chat(api, "flaky", user=user)
    assert response.status_code == 200
    trace = wait_for_trace(api, response.headers["x-flywheel-trace-id"])
    triggers = [
        a["error"]["trigger"] if a["error"] else None for a in trace["spans"][0]["attempts"]
    ]
    assert triggers == [503, 503, None]


def test_weights_balance_load(api: httpx.Client, upstream) -> None:
    trace_ids = []
    for _ in range(80):
        response = _chat(api, "balanced")
        assert response.status_code == 200
        trace_ids.append(response.headers["x-flywheel-trace-id"])
    served = Counter(wait_for_trace(api, t)["spans"][0]["model"] for t in trace_ids)
    assert served["up-echo"] + served["up-echo-b"] == 80
    assert 45 <= served["up-echo"] <= 75  # weight 3:1, expected 60


def test_stream_error_before_first_token_falls_back(api: httpx.Client) -> None:
    response = _chat(api, "fallback-500", stream=True)
    assert response.status_code == 200
    events = _events(response)
    assert events[-1] == "[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"]
    )
    assert text == "echo: hello world"


def test_stream_garbage_before_first_token_falls_back(api: httpx.Client) -> None:
    response = _chat(api, "garbage", stream=True)
    assert response.status_code == 200
    assert _events(response)[-1] == "[DONE]"


def test_stream_cut_after_first_token_ends_with_error_event(api: httpx.Client, server) -> None:
    client = openai.OpenAI(
        base_url=server.base_url + "/v1", api_key=server.admin_key, max_retries=0
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(
            model="cut", messages=[{"role": "user", "content": "one two three"}], stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert "".join(received) == "echo: one"  # what arrived before the cut is kept
    assert "mid-stream" in str(info.value)


def test_stream_with_no_healthy_target_returns_http_error(api: httpx.Client) -> None:
    response = _chat(api, "only-500", stream=True)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["type"] == "server_error"


def test_the_request_deadline_bounds_retries_and_fallbacks(tmp_path, upstream) -> None:
    """Each try times out after 1 s and is retried twice: without the 2 s request deadline
    the caller would wait 3 s and more."""
    from tests.conftest import start_server, stop_server

    config = f"""
providers:
  up: {{type: openai, base_url: "{upstream.base_url}"}}
models:
  - {{name: up-hang, provider: up, upstream_name: hang}}
routes:
  - name: slow
    targets: [{{model: up-hang, timeout: 1}}]
    retry: {{attempts: 2, backoff_initial: 0.01, on: [timeout]}}
"""
    server = start_server(
        tmp_path,
        config,
        "fw-deadline-" + uuid.uuid4().hex,
        {"FLYWHEEL_REQUEST_DEADLINE": "2", "FLYWHEEL_PRELOAD_MODELS": "false"},
        ready_path="/healthz",
    )
    try:
        started = time.monotonic()
        response = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            json={"model": "slow", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        )
        elapsed = time.monotonic() - started
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert 1.9 < elapsed < 2.9, elapsed
    finally:
        stop_server(server)


# --- Connection resets, stalls and garbage mid-stream, and answers that are not completions:
# a server of its own, so these routes do not crowd the shared test config.

FAULTS_CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
  - {{name: up-reset, provider: up, upstream_name: reset}}
  - {{name: up-hang, provider: up, upstream_name: hang}}
  - {{name: up-stall, provider: up, upstream_name: stall-stream}}
  - {{name: up-garbage, provider: up, upstream_name: garbage}}
  - {{name: up-garbage-stream, provider: up, upstream_name: garbage-stream}}
  - {{name: up-no-choices, provider: up, upstream_name: no-choices}}
  - {{name: up-429-long, provider: up, upstream_name: rate-limit-long}}
routes:
  - name: reset
    targets: [{{model: up-reset}}]
    fallbacks: [up-echo]
    retry: {{attempts: 1, backoff_initial: 0.01}}
  - name: only-reset
    targets: [{{model: up-reset}}]
    retry: {{attempts: 1, backoff_initial: 0.01}}
  - name: hang
    targets: [{{model: up-hang, timeout: 1}}]
    fallbacks: [up-echo]
    retry: {{attempts: 0}}
  - name: stall
    targets: [{{model: up-stall, timeout: 1}}]
    fallbacks: [up-echo]
  - name: garbage
    targets: [{{model: up-garbage}}]
    retry: {{attempts: 2, backoff_initial: 0.01}}
  - name: garbage-stream
    targets: [{{model: up-garbage-stream}}]
    fallbacks: [up-echo]
  - name: no-choices
    targets: [{{model: up-no-choices}}]
    fallbacks: [up-echo]
  - name: long-429
    targets: [{{model: up-429-long}}]
    fallbacks: [up-echo]
    retry: {{attempts: 2, max_retry_after: 5}}
"""


@pytest.fixture(scope="module")
def faults(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[httpx.Client]:
    from tests.conftest import start_server, stop_server

    server = start_server(
        tmp_path_factory.mktemp("faults"),
        FAULTS_CONFIG.format(upstream=upstream.base_url),
        "fw-faults-" + uuid.uuid4().hex,
        {"FLYWHEEL_PRELOAD_MODELS": "false"},
        ready_path="/healthz",
    )
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    try:
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
            yield client
    finally:
        stop_server(server)


def _stream_text(events: list[dict | str]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in events
        if isinstance(c, dict) and c.get("choices")
    )


def test_connection_reset_is_retried_then_falls_back(
    faults: httpx.Client, upstream: FakeUpstream
) -> None:
    before = upstream.calls["reset"]
    response = _chat(faults, "reset")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello world"
    assert upstream.calls["reset"] - before == 2  # the try and one retry
    trace = wait_for_trace(faults, response.headers["x-flywheel-trace-id"])
    attempts = trace["spans"][0]["attempts"]
    assert [a["model"] for a in attempts] == ["up-reset", "up-reset", "up-echo"]
    assert [a["error"]["trigger"] for a in attempts[:2]] == ["connection", "connection"]


def test_connection_reset_everywhere_is_a_502(faults: httpx.Client, upstream: FakeUpstream) -> None:
    before = upstream.calls["reset"]
    response = _chat(faults, "only-reset")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_unreachable"
    assert upstream.calls["reset"] - before == 2
    trace = wait_for_trace(faults, response.headers["x-flywheel-trace-id"])
    assert trace["spans"][0]["status"] == "error" and trace["spans"][0]["status_code"] == 502


def test_stream_connection_reset_before_first_token_falls_back(faults: httpx.Client) -> None:
    response = _chat(faults, "reset", stream=True)
    assert response.status_code == 200
    events = _events(response)
    assert events[-1] == "[DONE]" and _stream_text(events) == "echo: hello world"


def test_stream_timeout_before_first_token_falls_back(faults: httpx.Client) -> None:
    started = time.perf_counter()
    response = _chat(faults, "hang", stream=True)
    assert response.status_code == 200
    assert 0.9 < time.perf_counter() - started < 10  # the 1 s target timeout, then the echo
    events = _events(response)
    assert events[-1] == "[DONE]" and _stream_text(events) == "echo: hello world"
    trace = wait_for_trace(faults, response.headers["x-flywheel-trace-id"])
    assert trace["spans"][0]["attempts"][0]["error"]["trigger"] == "timeout"


def test_stream_stalled_after_first_token_ends_with_error_event(faults: httpx.Client) -> None:
    """Tokens already reached the caller: no fallback (it would splice two answers); the
    per-chunk timeout ends the stream with an OpenAI-style error event."""
    started = time.perf_counter()
    response = _chat(faults, "stall", "one two three", stream=True)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert 0.9 < elapsed < 10
    events = _events(response)
    assert _stream_text(events) == "echo: one"  # what arrived before the stall is kept
    last = events[-1]
    assert isinstance(last, dict) and last["error"]["code"] == "stream_interrupted"
    assert "mid-stream" in last["error"]["message"] and "[DONE]" not in events
    trace = wait_for_trace(faults, response.headers["x-flywheel-trace-id"])
    span = trace["spans"][0]
    assert span["status"] == "error"
    assert span["attempts"][-1]["error"]["trigger"] == "timeout"
    assert span["attempts"][-1]["error"]["after_first_token"] is True


def test_stream_garbage_after_first_token_ends_with_error_event(faults: httpx.Client) -> None:
    response = _chat(faults, "garbage-stream", "one two three", stream=True)
    assert response.status_code == 200
    events = _events_lenient(response)
    assert not [e for e in events if isinstance(e, dict) and "unparsable" in e]
    assert _stream_text(events) == "echo: one"
    last = events[-1]
    assert isinstance(last, dict) and last["error"]["code"] == "stream_interrupted"
    assert "invalid JSON" in last["error"]["message"]
    trace = wait_for_trace(faults, response.headers["x-flywheel-trace-id"])
    assert trace["spans"][0]["attempts"][-1]["error"]["trigger"] == "protocol"


def test_garbage_json_is_not_retried_and_is_a_502(
    faults: httpx.Client, upstream: FakeUpstream
) -> None:
    """A 200 whose body is not JSON is a protocol error: a retry would get the same answer,
    so it is not retried by default (``retry.on``), and with no fallback it is a 502."""
    before = upstream.calls["garbage"]
    response = _chat(faults, "garbage")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_protocol_error" and "not JSON" in error["message"]
    assert upstream.calls["garbage"] - before == 1


def test_a_200_that_is_not_a_completion_falls_back(faults: httpx.Client) -> None:
    response = _chat(faults, "no-choices")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello world"
    trace = wait_for_trace(faults, response.headers["x-flywheel-trace-id"])
    assert trace["spans"][0]["attempts"][0]["error"]["trigger"] == "protocol"


def test_retry_after_past_the_limit_falls_back_at_once(
    faults: httpx.Client, upstream: FakeUpstream
) -> None:
    """Retry-After: 120 is longer than the route's max_retry_after (5 s): no waiting, no
    retries, straight to the fallback."""
    before = upstream.calls["rate-limit-long"]
    started = time.perf_counter()
    response = _chat(faults, "long-429")
    assert response.status_code == 200
    assert time.perf_counter() - started < 1.0
    assert upstream.calls["rate-limit-long"] - before == 1
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello world"


def test_the_fake_upstream_really_resets(upstream: FakeUpstream) -> None:
    """The fault is what it says: the client sees a reset, not an HTTP answer."""
    body = {"model": "reset", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.post(upstream.base_url + "/chat/completions", json=body, timeout=5)
