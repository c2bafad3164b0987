"""Routes against a real upstream on loopback that fails on purpose."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

import httpx
import openai
import pytest

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
