"""The gateway's response cache on real servers: in-process storage (one server) and Redis
(two replicas sharing it), with the fake upstream counting what reaches it and the real
MiniLM embedder for the semantic mode."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from flywheel.config import RouteConfig
from flywheel.config.schema import RouteCacheConfig
from flywheel.gateway.cache import (
    MemoryCacheStore,
    RedisCacheStore,
    RouteCache,
    Scope,
    VectorIndex,
    cache_directives,
)
from flywheel.gateway.schemas import ChatCompletionRequest
from flywheel.sdk import Client
from flywheel.testing import FakeUpstream
from flywheel.testing.upstream import free_port

from .conftest import RunningServer, start_server, stop_server, wait_for_trace

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')
CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - name: up-echo
    provider: up
    upstream_name: echo
    pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
  - {{name: up-cut, provider: up, upstream_name: cut-stream}}
  - {{name: up-500, provider: up, upstream_name: fail-500}}
  - name: up-pricey
    provider: up
    upstream_name: echo
    pricing: {{input_per_mtok: 10000.0, output_per_mtok: 10000.0}}
routes:
  - name: faq
    targets: [{{model: up-echo}}]
    cache: {{mode: exact, ttl: 1h}}
  - name: faq-short
    targets: [{{model: up-echo}}]
    cache: {{ttl: 1}}
  - name: faq-warm
    targets: [{{model: up-echo}}]
    cache: {{max_temperature: 1.0, cache_tools: true}}
  - name: semantic
    targets: [{{model: up-echo}}]
    cache: {{mode: semantic, similarity: 0.95}}
  - name: uncached
    targets: [{{model: up-echo}}]
  - name: cut-cached
    targets: [{{model: up-cut}}]
    retry: {{attempts: 0}}
    cache: {{}}
  - name: failing-cached
    targets: [{{model: up-500}}]
    retry: {{attempts: 0}}
    cache: {{}}
  - name: pricey-cached
    targets: [{{model: up-pricey}}]
    cache: {{}}
  - name: guarded-cached
    targets: [{{model: up-echo}}]
    cache: {{}}
    guards:
      output:
        - {{type: pii, name: contact-data, action: redact, entities: [EMAIL]}}
"""


@dataclass
class Deployment:
    """One or more servers sharing a cache store."""

    storage: str
    servers: list[RunningServer]
    upstream: FakeUpstream

    @property
    def first(self) -> RunningServer:
        return self.servers[0]

    @property
    def last(self) -> RunningServer:
        return self.servers[-1]

    def admin(self, server: RunningServer | None = None) -> httpx.Client:
        server = server or self.first
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


@pytest.fixture(scope="module", params=["memory", "redis"])
def deployment(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
) -> Iterator[Deployment]:
    storage: str = request.param
    shared = tmp_path_factory.mktemp(f"cache-{storage}")
    admin_key = "fw-cache-" + secrets.token_hex(16)
    env = {
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{shared / 'flywheel.db'}",
        "FLYWHEEL_MASTER_KEY": "A" * 43,
        "FLYWHEEL_PRELOAD_MODELS": "false",
    }
    config = CONFIG.format(upstream=upstream.base_url)
    servers: list[RunningServer] = []
    try:
        if storage == "redis":
            env["FLYWHEEL_REDIS_URL"] = request.getfixturevalue("redis_url")
            for name in ("a", "b"):
                servers.append(
                    start_server(shared / name, config, admin_key, env, ready_path="/healthz")
                )
        else:
            servers.append(
                start_server(shared / "a", config, admin_key, env, ready_path="/healthz")
            )
        yield Deployment(storage, servers, upstream)
    finally:
        for server in servers:
            stop_server(server)


def unique(text: str) -> str:
    return f"{text} [{secrets.token_hex(4)}]"


def ask(
    server: RunningServer,
    route: str,
    question: str,
    key: str | None = None,
    headers: dict[str, str] | None = None,
    **params: Any,
) -> httpx.Response:
    body = {"model": route, "messages": [{"role": "user", "content": question}], **params}
    auth = {"Authorization": f"Bearer {key or server.admin_key}", **(headers or {})}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=auth, timeout=60)


def echo_calls(upstream: FakeUpstream) -> int:
    return upstream.calls["echo"]


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def span_of(server: RunningServer, trace_id: str) -> dict[str, Any]:
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=60,
    ) as api:
        trace = wait_for_trace(api, trace_id, kinds=("gateway.chat",))
    span: dict[str, Any] = next(s for s in trace["spans"] if s["kind"] == "gateway.chat")
    return span


def new_project_key(deployment: Deployment, limits: dict[str, Any] | None = None) -> str:
    project = f"cache-{secrets.token_hex(3)}"
    with deployment.admin() as admin:
        created = admin.post("/api/projects", json={"name": project, "limits": limits or {}})
        assert created.status_code == 201, created.text
        response = admin.post(
            "/api/keys", headers={"X-Flywheel-Project": project}, json={"name": "app"}
        )
        assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


# -- exact ----------------------------------------------------------------------------------


def test_exact_hit_skips_the_upstream_and_is_traced(deployment: Deployment) -> None:
    question = unique("What is Flywheel?")
    server = deployment.first
    before = echo_calls(deployment.upstream)
    first = ask(server, "faq", question, temperature=0)
    assert first.headers["x-flywheel-cache"] == "miss"
    assert answer(first) == f"echo: {question}"
    second = ask(deployment.last, "faq", question, temperature=0)
    assert second.headers["x-flywheel-cache"] == "hit"
    assert answer(second) == f"echo: {question}"
    assert second.json()["usage"] == first.json()["usage"]
    assert second.json()["id"] != first.json()["id"]
    assert echo_calls(deployment.upstream) == before + 1, "a hit must not reach the upstream"

    miss_span = span_of(server, first.headers["x-flywheel-trace-id"])
    hit_span = span_of(deployment.last, second.headers["x-flywheel-trace-id"])
    assert miss_span["attributes"]["flywheel.cache"] == "miss"
    assert miss_span["cost"] > 0
    assert hit_span["attributes"]["flywheel.cache"] == "hit"
    assert hit_span["attributes"]["flywheel.cache.source_trace_id"] == miss_span["trace_id"]
    assert hit_span["cost"] == 0
    assert hit_span["model"] == "up-echo"
    assert hit_span["completion_tokens"] == first.json()["usage"]["completion_tokens"]

    # Different output-changing parameters are a different answer.
    other = ask(server, "faq", question, temperature=0, max_tokens=5)
    assert other.headers["x-flywheel-cache"] == "miss"


def test_routes_without_a_cache_say_nothing(deployment: Deployment) -> None:
    question = unique("plain")
    first = ask(deployment.first, "uncached", question, temperature=0)
    second = ask(deployment.first, "uncached", question, temperature=0)
    assert answer(first) == answer(second)
    assert "x-flywheel-cache" not in second.headers


def test_answers_are_scoped_per_project(deployment: Deployment) -> None:
    question = unique("What is our refund policy?")
    key_a, key_b = new_project_key(deployment), new_project_key(deployment)
    before = echo_calls(deployment.upstream)
    assert (
        ask(deployment.first, "faq", question, key_a, temperature=0).headers["x-flywheel-cache"]
        == "miss"
    )
    assert (
        ask(deployment.last, "faq", question, key_a, temperature=0).headers["x-flywheel-cache"]
        == "hit"
    )
    other = ask(deployment.last, "faq", question, key_b, temperature=0)
    assert other.headers["x-flywheel-cache"] == "miss", "project B got project A's answer"
    assert echo_calls(deployment.upstream) == before + 2


def test_entries_expire_after_their_ttl(deployment: Deployment) -> None:
    question = unique("short-lived")
    assert (
        ask(deployment.first, "faq-short", question, temperature=0).headers["x-flywheel-cache"]
        == "miss"
    )
    assert (
        ask(deployment.last, "faq-short", question, temperature=0).headers["x-flywheel-cache"]
        == "hit"
    )
    time.sleep(1.3)
    assert (
        ask(deployment.last, "faq-short", question, temperature=0).headers["x-flywheel-cache"]
        == "miss"
    )


def test_clients_can_bypass_or_refresh(deployment: Deployment) -> None:
    question = unique("bypass me")
    server = deployment.first
    before = echo_calls(deployment.upstream)
    for headers in ({"Cache-Control": "no-store"}, {"x-flywheel-cache": "bypass"}):
        response = ask(server, "faq", question, headers=headers, temperature=0)
        assert response.headers["x-flywheel-cache"] == "bypass"
    assert echo_calls(deployment.upstream) == before + 2
    # Nothing was stored by those: the next call is a miss.
    assert ask(server, "faq", question, temperature=0).headers["x-flywheel-cache"] == "miss"
    # no-cache skips the lookup but stores the fresh answer, which later calls are served.
    refreshed = ask(server, "faq", question, headers={"Cache-Control": "no-cache"}, temperature=0)
    assert refreshed.headers["x-flywheel-cache"] == "bypass"
    hit = ask(deployment.last, "faq", question, temperature=0)
    assert hit.headers["x-flywheel-cache"] == "hit"
    span = span_of(deployment.last, hit.headers["x-flywheel-trace-id"])
    refreshed_trace = refreshed.headers["x-flywheel-trace-id"]
    assert span["attributes"]["flywheel.cache.source_trace_id"] == refreshed_trace


def test_tools_temperature_and_n_are_never_cached(deployment: Deployment) -> None:
    question = unique("What is the weather?")
    tools = [
        {
            "type": "function",
            "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 0, "tools": tools}, "tools"),
        ({"temperature": 0.7}, "temperature"),
        ({}, "temperature"),  # unset counts as 1.0, the OpenAI default
        ({"temperature": 0, "n": 2}, "n"),
    ]
    for params, reason in cases:
        before = echo_calls(deployment.upstream)
        for _ in range(2):
            response = ask(deployment.first, "faq", question, **params)
            assert response.headers["x-flywheel-cache"] == "bypass", (params, response.text)
        assert echo_calls(deployment.upstream) == before + 2, params
        span = span_of(deployment.first, response.headers["x-flywheel-trace-id"])
        assert span["attributes"]["flywheel.cache.bypass_reason"] == reason
    # A route may allow them: max_temperature 1.0 and cache_tools.
    for params in ({}, {"temperature": 0.9, "tools": tools}):
        assert (
            ask(deployment.first, "faq-warm", question, **params).headers["x-flywheel-cache"]
            == "miss"
        )
        assert (
            ask(deployment.last, "faq-warm", question, **params).headers["x-flywheel-cache"]
            == "hit"
        )


def test_errors_cut_streams_and_redacted_answers_are_not_stored(deployment: Deployment) -> None:
    server = deployment.first
    for _ in range(2):
        failed = ask(server, "failing-cached", unique("boom"), temperature=0)
        assert failed.status_code == 502
    question = unique("one two three four")
    for _ in range(2):
        with httpx.stream(
            "POST",
            f"{server.base_url}/v1/chat/completions",
            json={
                "model": "cut-cached",
                "stream": True,
                "temperature": 0,
                "messages": [{"role": "user", "content": question}],
            },
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=60,
        ) as response:
            assert response.headers["x-flywheel-cache"] == "miss"
            body = response.read().decode()
        assert "stream_interrupted" in body
    leaky = unique("write to jane.doe@example.com please")
    first = ask(server, "guarded-cached", leaky, temperature=0)
    assert "jane.doe@example.com" not in answer(first)
    again = ask(deployment.last, "guarded-cached", leaky, temperature=0)
    assert again.headers["x-flywheel-cache"] == "miss", "a redacted answer was cached"
    clean = unique("nothing personal here")
    ask(server, "guarded-cached", clean, temperature=0)
    assert (
        ask(deployment.last, "guarded-cached", clean, temperature=0).headers["x-flywheel-cache"]
        == "hit"
    )


def test_a_hit_costs_nothing_against_the_budget(deployment: Deployment) -> None:
    key = new_project_key(deployment, {"budget_usd": 1.0, "budget_period": "day"})
    question = unique("hello there")
    first = ask(deployment.first, "pricey-cached", question, key, temperature=0, max_tokens=8)
    assert first.headers["x-flywheel-cache"] == "miss", first.text
    refused = None
    for i in range(60):
        response = ask(
            deployment.first, "pricey-cached", f"{question} {i}", key, temperature=0, max_tokens=8
        )
        if response.status_code == 429:
            refused = response
            break
        assert response.status_code == 200, response.text
    assert refused is not None, "the budget never ran out"
    # Out of budget, yet the cached answer is still served: no model is called.
    hit = ask(deployment.last, "pricey-cached", question, key, temperature=0, max_tokens=8)
    assert hit.status_code == 200, hit.text
    assert hit.headers["x-flywheel-cache"] == "hit"


# -- streaming ------------------------------------------------------------------------------


def stream(
    server: RunningServer, route: str, question: str, **params: Any
) -> tuple[httpx.Headers, list[dict[str, Any]]]:
    body = {
        "model": route,
        "stream": True,
        "messages": [{"role": "user", "content": question}],
        **params,
    }
    events: list[dict[str, Any]] = []
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        headers = response.headers
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    return headers, events


def streamed_text(events: list[dict[str, Any]]) -> str:
    return "".join(
        (c.get("delta") or {}).get("content") or "" for e in events for c in e.get("choices", [])
    )


def test_streams_fill_the_cache_and_hits_replay_as_sse(deployment: Deployment) -> None:
    question = unique("stream this answer")
    before = echo_calls(deployment.upstream)
    headers, events = stream(
        deployment.first, "faq", question, temperature=0, stream_options={"include_usage": True}
    )
    assert headers["x-flywheel-cache"] == "miss"
    assert streamed_text(events) == f"echo: {question}"
    headers, replayed = stream(
        deployment.last, "faq", question, temperature=0, stream_options={"include_usage": True}
    )
    assert headers["x-flywheel-cache"] == "hit"
    assert streamed_text(replayed) == f"echo: {question}"
    assert [c["finish_reason"] for e in replayed for c in e["choices"]][-1] == "stop"
    assert replayed[-1]["usage"] == events[-1]["usage"]
    # Without include_usage the replay has no usage chunk, as a live stream.
    _, plain = stream(deployment.last, "faq", question, temperature=0)
    assert all("usage" not in e for e in plain)
    # The streamed answer also serves a plain call.
    assert ask(deployment.last, "faq", question, temperature=0).headers["x-flywheel-cache"] == "hit"
    assert echo_calls(deployment.upstream) == before + 1


# -- semantic -------------------------------------------------------------------------------


def test_semantic_paraphrase_hits_and_near_miss_does_not(deployment: Deployment) -> None:
    tag = secrets.token_hex(3)
    system = {"role": "system", "content": f"You answer support questions ({tag})."}

    def ask_semantic(server: RunningServer, question: str) -> httpx.Response:
        body = {
            "model": "semantic",
            "temperature": 0,
            "messages": [system, {"role": "user", "content": question}],
        }
        return httpx.post(
            f"{server.base_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=120,
        )

    first = ask_semantic(deployment.first, "How do I reset my password?")
    assert first.headers["x-flywheel-cache"] == "miss"
    paraphrase = ask_semantic(deployment.last, "How can I reset my password?")
    assert paraphrase.headers["x-flywheel-cache"] == "hit"
    assert answer(paraphrase) == "echo: How do I reset my password?"
    span = span_of(deployment.last, paraphrase.headers["x-flywheel-trace-id"])
    assert span["attributes"]["flywheel.cache.similarity"] >= 0.95

    # Near misses: a different question, and the same words with a different number.
    for question in ("How do I change my username?", "How do I reset my 2 passwords?"):
        response = ask_semantic(deployment.last, question)
        assert response.headers["x-flywheel-cache"] == "miss", question
        assert answer(response) == f"echo: {question}"
    ask_semantic(deployment.first, "convert 5 km to m")
    near = ask_semantic(deployment.last, "convert 50 km to m")
    assert near.headers["x-flywheel-cache"] == "miss"
    assert answer(near) == "echo: convert 50 km to m"


# -- administration -------------------------------------------------------------------------


def test_purge_through_api_sdk_cli_and_ui(deployment: Deployment) -> None:
    server = deployment.first
    question = unique("purge me")

    def cached() -> str:
        return ask(deployment.last, "faq", question, temperature=0).headers["x-flywheel-cache"]

    ask(server, "faq", question, temperature=0)
    assert cached() == "hit"
    with deployment.admin() as admin:
        stats = admin.get("/api/routes/faq/cache").json()
        assert stats["enabled"] and stats["config"]["mode"] == "exact"
        assert stats["hits"] >= 1 and stats["entries"] >= 1
        assert 0 < stats["hit_rate"] <= 1
        purged = admin.delete("/api/routes/faq/cache")
        assert purged.status_code == 200, purged.text
        assert purged.json()["removed"] >= 1
        assert admin.delete("/api/routes/nope/cache").status_code == 404
        audit = admin.get("/api/audit", params={"action": "route.cache_purge"}).json()
        assert any(e["resource_id"] == "faq" for e in audit["data"])
    assert cached() == "miss"  # purged on the first replica, gone on the last

    # SDK
    assert cached() == "hit"
    with Client(server.base_url, server.admin_key) as client:
        assert client.route_cache("faq")["entries"] >= 1
        assert client.clear_route_cache("faq")["removed"] >= 1
    assert cached() == "miss"

    # CLI
    assert cached() == "hit"
    result = subprocess.run(
        [FLYWHEEL, "cache", "clear", "faq", "--url", server.base_url],
        capture_output=True,
        text=True,
        env={**os.environ, "FLYWHEEL_API_KEY": server.admin_key},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stdout
    assert cached() == "miss"

    # UI: the routes page shows the hit rate and purges.
    assert cached() == "hit"
    with httpx.Client(base_url=server.base_url, timeout=60, follow_redirects=False) as ui:
        login = ui.post("/login", data={"api_key": server.admin_key, "next": "/routes"})
        assert login.status_code == 303, login.text
        ui.cookies.set("flywheel_session", login.cookies["flywheel_session"])
        page = ui.get("/routes")
        assert page.status_code == 200
        assert "hit rate" in page.text and 'data-purge="faq"' in page.text
        token = CSRF.search(page.text)
        assert token
        done = ui.post("/routes/faq/cache/purge", data={"csrf_token": token.group(1)})
        assert done.status_code == 200, done.text
        assert "cached answer" in done.text and 'id="cache-notice"' in done.text
    assert cached() == "miss"


def test_purge_needs_write_access_and_all_projects_needs_an_instance_admin(
    deployment: Deployment,
) -> None:
    with deployment.admin() as admin:
        project = f"cache-rbac-{secrets.token_hex(3)}"
        assert admin.post("/api/projects", json={"name": project}).status_code == 201
        keys = {}
        for role in ("viewer", "admin"):
            response = admin.post(
                "/api/keys",
                headers={"X-Flywheel-Project": project},
                json={"name": role, "role": role, "scope": "admin"},
            )
            keys[role] = response.json()["key"]
        assert (
            admin.delete("/api/routes/faq/cache", params={"all_projects": True}).status_code == 200
        )
    base = deployment.first.base_url
    viewer = {"Authorization": f"Bearer {keys['viewer']}"}
    project_admin = {"Authorization": f"Bearer {keys['admin']}"}
    assert httpx.get(f"{base}/api/routes/faq/cache", headers=viewer).status_code == 200
    assert httpx.delete(f"{base}/api/routes/faq/cache", headers=viewer).status_code == 403
    assert httpx.delete(f"{base}/api/routes/faq/cache", headers=project_admin).status_code == 200
    refused = httpx.delete(
        f"{base}/api/routes/faq/cache", headers=project_admin, params={"all_projects": True}
    )
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "permission_denied"


def test_prometheus_counts_hits_and_misses(deployment: Deployment) -> None:
    question = unique("count me")
    ask(deployment.first, "faq", question, temperature=0)
    ask(deployment.first, "faq", question, temperature=0)
    with deployment.admin() as admin:
        text = admin.get("/metrics").text
    assert re.search(r'flywheel_cache_requests_total\{result="hit",route="faq"\} [1-9]', text)
    assert re.search(r'flywheel_cache_requests_total\{result="miss",route="faq"\} [1-9]', text)


# -- the parts, on their own ----------------------------------------------------------------


def test_cache_config_is_validated() -> None:
    route = {"name": "r", "targets": [{"model": "m"}]}
    for bad in (
        {"mode": "fuzzy"},
        {"similarity": 1.5},
        {"ttl": 0},
        {"max_entries": 0},
        {"max_temperature": 3},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            RouteConfig.model_validate({**route, "cache": bad})
    with pytest.raises(ValidationError, match="cache"):
        RouteConfig.model_validate({"name": "p", "pipeline": "x", "cache": {}})
    assert RouteCacheConfig.model_validate({"ttl": "10m"}).ttl == 600


def test_cache_control_directives() -> None:
    assert cache_directives({}) == (True, True)
    assert cache_directives({"cache-control": "no-cache"}) == (False, True)
    assert cache_directives({"cache-control": "max-age=0, no-store"}) == (False, False)
    assert cache_directives({"x-flywheel-cache": "BYPASS"}) == (False, False)


def test_vector_index_is_bounded_and_filters_context_and_expiry() -> None:
    index = VectorIndex(capacity=3, dim=2)
    unit = np.array([1.0, 0.0], np.float32)
    for i in range(5):
        index.add(f"k{i}", unit, context=7, expires=100.0)
    assert len(index) == 3
    assert {k for k, _ in index.search(unit, 7, 0.9, now=1.0, limit=5)} == {"k2", "k3", "k4"}
    assert index.search(unit, 8, 0.9, now=1.0, limit=5) == []
    assert index.search(unit, 7, 0.9, now=100.0, limit=5) == []
    index.discard("k3")
    assert {k for k, _ in index.search(unit, 7, 0.9, now=1.0, limit=5)} == {"k2", "k4"}
    assert len(index.resized(1)) == 1


def _plan(cache: RouteCache, project: str = "p") -> Any:
    route = RouteConfig.model_validate(
        {"name": "r", "targets": [{"model": "m"}], "cache": {"mode": "semantic"}}
    )
    request = ChatCompletionRequest.model_validate(
        {"model": "r", "temperature": 0, "messages": [{"role": "user", "content": "hi there"}]}
    )
    return cache.plan(route, "fp", project, request)


def test_memory_store_keeps_the_least_recently_used() -> None:
    async def run() -> None:
        store = MemoryCacheStore()
        scope = Scope("r", "p")
        for key in ("a", "b"):
            await store.put(scope, key, key, ttl=60, max_entries=2)
        assert await store.get(scope, "a") == "a"  # a is now the most recent
        await store.put(scope, "c", "c", ttl=60, max_entries=2)
        assert await store.get(scope, "b") is None
        assert await store.get(scope, "a") == "a"
        assert await store.get(Scope("r", "other"), "a") is None
        assert await store.purge("r", "p") == 2

    asyncio.run(run())


def test_redis_store_evicts_beyond_max_entries(redis_url: str) -> None:
    async def run() -> None:
        store = RedisCacheStore(redis_url, prefix=f"test:{secrets.token_hex(4)}:")
        scope = Scope("r", "p")
        for key in ("a", "b", "c"):
            await store.put(scope, key, key, ttl=60, max_entries=2)
        assert await store.get(scope, "a") is None
        assert await store.get(scope, "c") == "c"
        assert (await store.stats(scope))["entries"] == 2
        await store.aclose()

    asyncio.run(run())


def test_an_unreachable_redis_is_a_miss_not_an_error() -> None:
    async def run() -> None:
        cache = RouteCache(
            RedisCacheStore(f"redis://127.0.0.1:{free_port()}/0"), embed=lambda _: None
        )
        plan = _plan(cache)
        started = time.perf_counter()
        assert await cache.lookup(plan) is None
        response = {"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}
        assert await cache.save(plan, response, model="m", trace_id="t") is False
        await cache.count(plan)
        assert time.perf_counter() - started < 3
        with pytest.raises(Exception):  # noqa: B017 - the admin API turns it into a 503
            await cache.stats("r", "p")
        await cache.aclose()

    asyncio.run(run())
