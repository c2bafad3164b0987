"""The official openai SDK against a running server: only base_url and api_key change."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from tests.conftest import wait_for_trace


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.admin_key, max_retries=0)


def test_models_lists_routes_and_catalog(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"default", "smollm2-135m-instruct", "all-minilm-l6-v2", "echo"} <= ids
    assert client.models.retrieve("default").owned_by == "flywheel-route"


def test_chat_with_the_local_model(client: openai.OpenAI, api: httpx.Client) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    completion = raw.parse()
    assert "Paris" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 5
    assert 0 < completion.usage.completion_tokens <= 24
    assert (
        completion.usage.total_tokens
        == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    trace = wait_for_trace(api, raw.headers["x-flywheel-trace-id"])
    span = trace["spans"][0]
    assert span["route"] == "default" and span["model"] == "smollm2-135m-instruct"
    assert span["provider"] == "local" and span["status"] == "ok" and span["stream"] is False
    assert span["prompt_tokens"] == completion.usage.prompt_tokens
    assert span["completion_tokens"] == completion.usage.completion_tokens
    assert span["latency_ms"] > 0 and span["cost"] == 0
    assert span["input"]["messages"][0]["content"] == "What is the capital of France?"
    assert (
        span["output"]["choices"][0]["message"]["content"] == completion.choices[0].message.content
    )


def test_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, ids = [], None, None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(ids) == 1
    assert len([p for p in pieces if p]) >= 2  # really streamed, not one blob
    assert finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 16


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: a b c"


def test_streamed_trace_has_ttft_and_usage(server, api: httpx.Client) -> None:
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        json={"model": "echo", "stream": True, "messages": [{"role": "user", "content": "x y"}]},
    ) as response:
        trace_id = response.headers["x-flywheel-trace-id"]
        body = response.read().decode()
    assert body.rstrip().endswith("data: [DONE]")
    span = wait_for_trace(api, trace_id)["spans"][0]
    assert span["stream"] is True and span["status"] == "ok"
    assert 0 < span["ttft_ms"] <= span["latency_ms"]
    assert span["prompt_tokens"] == 2 and span["completion_tokens"] == 3  # usage asked upstream
    assert span["cost"] == pytest.approx((2 * 1.0 + 3 * 2.0) / 1e6)


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(
        model="all-minilm-l6-v2",
        input=["The cat sat on the mat.", "A cat is sitting on a rug.", "Quarterly tax law."],
    )
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-3) for v in vectors)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2]) + 0.2
    assert result.usage.prompt_tokens > 10


def test_embeddings_base64(server) -> None:
    response = httpx.post(
        server.base_url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        json={"model": "all-minilm-l6-v2", "input": "hello", "encoding_format": "base64"},
    )
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    values = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(values) == 384 and math.isclose(sum(v * v for v in values), 1.0, rel_tol=1e-3)


def test_remote_embeddings_through_a_provider(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="up-embed", input="four")
    assert result.data[0].embedding[0] == 4.0


def test_traceparent_joins_the_callers_trace(server, api: httpx.Client) -> None:
    trace_id, parent = "ab" * 16, "cd" * 8
    response = httpx.post(
        server.base_url + "/v1/chat/completions",
        headers={
            "Authorization": f"Bearer {server.admin_key}",
            "traceparent": f"00-{trace_id}-{parent}-01",
        },
        json={"model": "echo", "messages": [{"role": "user", "content": "joined"}]},
    )
    assert response.headers["x-flywheel-trace-id"] == trace_id
    span = wait_for_trace(api, trace_id)["spans"][0]
    assert span["parent_id"] == parent
