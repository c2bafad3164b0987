"""Two gateway replicas share one database and one Redis: a budget holds across both."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from flywheel.testing import FakeUpstream

from .conftest import RunningServer, start_server, stop_server

CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - name: up-pricey
    provider: up
    upstream_name: echo
    pricing: {{input_per_mtok: 10000.0, output_per_mtok: 10000.0}}
routes:
  - name: pricey
    targets: [{{model: up-pricey}}]
"""


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, redis_url: str
) -> Iterator[list[RunningServer]]:
    shared = tmp_path_factory.mktemp("replicas")
    admin_key = "fw-replica-" + secrets.token_hex(16)
    env = {
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{shared / 'flywheel.db'}",
        "FLYWHEEL_MASTER_KEY": "A" * 43,
        "FLYWHEEL_REDIS_URL": redis_url,
        "FLYWHEEL_PRELOAD_MODELS": "false",
    }
    config = CONFIG.format(upstream=upstream.base_url)
    first = start_server(shared / "a", config, admin_key, env, ready_path="/healthz")
    second = start_server(shared / "b", config, admin_key, env, ready_path="/healthz")
    yield [first, second]
    for server in (first, second):
        stop_server(server)


def test_budget_holds_across_replicas(replicas: list[RunningServer]) -> None:
    first, second = replicas
    admin = {"Authorization": f"Bearer {first.admin_key}"}
    project = f"replicas-{secrets.token_hex(3)}"
    budget = 6.0  # room for several calls in flight on each replica
    with httpx.Client(base_url=first.base_url, headers=admin, timeout=60) as client:
        created = client.post(
            "/api/projects",
            json={"name": project, "limits": {"budget_usd": budget, "budget_period": "day"}},
        )
        assert created.status_code == 201, created.text
        key = client.post(
            "/api/keys", headers={"X-Flywheel-Project": project}, json={"name": "app"}
        ).json()["key"]
    body = {
        "model": "pricey",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    costs: list[float] = []
    served = {first.base_url: 0, second.base_url: 0}

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code == 429:
                if int(response.headers["retry-after"]) > 5:
                    return
                await asyncio.sleep(0.05)
                continue
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            costs.append((usage["prompt_tokens"] + usage["completion_tokens"]) * 0.01)
            served[str(client.base_url).rstrip("/")] += 1

    async def run() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        clients = [
            httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60)
            for server in replicas
        ]
        try:
            await asyncio.gather(*(client_loop(c) for c in clients for _ in range(8)))
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(run())
    spent = sum(costs)
    assert spent <= budget + 1e-9, f"two replicas overshot the budget: {spent} > {budget}"
    assert spent > budget - 0.7, f"stopped far below the budget: {spent}"
    assert all(n > 0 for n in served.values()), served  # both replicas took traffic


def test_a_config_applied_on_one_replica_reaches_the_other(
    replicas: list[RunningServer],
) -> None:
    first, second = replicas
    admin = {"Authorization": f"Bearer {first.admin_key}"}
    route = f"added-{secrets.token_hex(3)}"
    text = f"routes:\n  - name: pricey\n    targets: [{{model: up-pricey}}]\n  - name: {route}\n    targets: [{{model: up-pricey}}]\n"
    with httpx.Client(base_url=first.base_url, headers=admin, timeout=60) as client:
        applied = client.post("/api/config/apply", json={"yaml": text})
        assert applied.status_code == 200, applied.text
        assert route in [m["id"] for m in client.get("/v1/models").json()["data"]]
    body = {"model": route, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=second.base_url, headers=admin, timeout=60) as client:
        deadline = time.monotonic() + 15  # replicas look for new revisions every 3 s
        while route not in [m["id"] for m in client.get("/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "the second replica never switched"
            time.sleep(0.2)
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
