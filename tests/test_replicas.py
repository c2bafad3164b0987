"""Two gateway replicas (separate servers, each with its own home) share one database and
one Redis: a budget holds across both, and nothing a replica keeps in process breaks when the
next request lands on the other one (config, UI sessions and logouts, the login throttle, API
key revocation, prompt labels).

With ``--db=postgres`` both replicas share a PostgreSQL database instead of a SQLite file.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from flywheel.security.secrets import SecretBox, generate_master_key, load_master_key
from flywheel.security.sessions import SessionRevocations, redis_client, shared_session_secret
from flywheel.security.throttle import SharedLoginThrottle
from flywheel.store import Database
from flywheel.testing import FakeUpstream
from flywheel.testing.upstream import free_port

from .conftest import RunningServer, new_database_url, start_server, stop_server

CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - name: up-pricey
    provider: up
    upstream_name: echo
    pricing: {{input_per_mtok: 10000.0, output_per_mtok: 10000.0}}
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - name: pricey
    targets: [{{model: up-pricey}}]
  - name: echo
    targets: [{{model: up-echo}}]
"""
SESSION = "flywheel_session"


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream, redis_url: str
) -> Iterator[list[RunningServer]]:
    shared = tmp_path_factory.mktemp("replicas")
    admin_key = "fw-replica-" + secrets.token_hex(16)
    env = {
        # One database for both: a SQLite file, or a PostgreSQL database with --db=postgres.
        "FLYWHEEL_DATABASE_URL": new_database_url(shared),
        "FLYWHEEL_MASTER_KEY": "A" * 43,
        "FLYWHEEL_REDIS_URL": redis_url,
        "FLYWHEEL_PRELOAD_MODELS": "false",
        # Artifacts (knowledge-base indexes, models) in one store both replicas read.
        "FLYWHEEL_ARTIFACT_ROOT": str(shared / "artifacts"),
    }
    config = CONFIG.format(upstream=upstream.base_url)
    # Started together, as an orchestrator would: they migrate the same database and agree
    # on one UI session secret at the same moment.
    with ThreadPoolExecutor(2) as pool:
        starts = [
            pool.submit(start_server, shared / home, config, admin_key, env, "/healthz")
            for home in ("a", "b")
        ]
        failures = [e for e in (start.exception() for start in starts) if e is not None]
        if failures:  # stop the one that did start before failing
            for start in starts:
                if start.exception() is None:
                    stop_server(start.result())
            raise failures[0]
        first, second = (start.result() for start in starts)
    assert first.database_url == second.database_url
    yield [first, second]
    for server in (first, second):
        stop_server(server)


def _admin(server: RunningServer, project: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    if project:
        headers["X-Flywheel-Project"] = project
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


def _ui(server: RunningServer, cookie: str | None = None) -> httpx.Client:
    client = httpx.Client(base_url=server.base_url, timeout=60, follow_redirects=False)
    if cookie:
        # The cookie is marked Secure and the test servers speak plain HTTP: hand it over.
        client.cookies.set(SESSION, cookie)
    return client


def _ui_login(server: RunningServer, api_key: str) -> str:
    with _ui(server) as client:
        response = client.post("/login", data={"api_key": api_key, "next": "/account"})
        assert response.status_code == 303, response.text
        return str(response.cookies[SESSION])


def _eventually(check: Callable[[], bool], seconds: float, what: str) -> float:
    """Poll ``check`` until it holds; returns how long that took (fails after ``seconds``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"{what} within {seconds}s"
        time.sleep(0.1)
    return time.monotonic() - start


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
    text = (
        "routes:\n  - name: pricey\n    targets: [{model: up-pricey}]\n"
        "  - name: echo\n    targets: [{model: up-echo}]\n"
        f"  - name: {route}\n    targets: [{{model: up-pricey}}]\n"
    )
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


def test_a_ui_login_on_one_replica_holds_on_the_other_and_a_logout_ends_it_on_both(
    replicas: list[RunningServer],
) -> None:
    first, second = replicas
    with _admin(first) as admin:
        made = admin.post("/api/keys", json={"name": f"ui-{secrets.token_hex(3)}"})
        assert made.status_code == 201, made.text
        key = made.json()["key"]
    cookie = _ui_login(first, key)
    # The cookie is signed with the secret both replicas read from the database.
    with _ui(second, cookie) as other, _ui(first, cookie) as same:
        assert other.get("/account").status_code == 200
        assert same.get("/account").status_code == 200
        # A second session of the same key, which the logout must leave alone.
        kept = _ui_login(second, key)
        logout = same.post("/logout")
        assert logout.status_code == 303 and logout.headers["location"] == "/login"
        # The logged-out cookie, replayed on the other replica, is refused at once.
        for client in (other, same):
            refused = client.get("/account")
            assert refused.status_code == 303, refused.text
            assert refused.headers["location"].startswith("/login")
    with _ui(first, kept) as still:
        assert still.get("/account").status_code == 200


def test_failed_logins_are_counted_across_replicas(replicas: list[RunningServer]) -> None:
    username = f"ghost-{secrets.token_hex(4)}"
    clients = [_ui(server) for server in replicas]
    try:
        # Ten wrong passwords for one account (its limit), alternating between the replicas:
        # each replica saw only five, yet the next attempt is refused on both.
        for attempt in range(10):
            response = clients[attempt % 2].post(
                "/login", data={"username": username, "password": f"wrong-{attempt}"}
            )
            assert response.status_code == 401, (attempt, response.text)
        for client in clients:
            refused = client.post("/login", data={"username": username, "password": "again"})
            assert refused.status_code == 429, refused.text
            assert 250 < int(refused.headers["retry-after"]) <= 301
        other = clients[0].post("/login", data={"username": f"{username}-2", "password": "wrong"})
        assert other.status_code == 401  # another account is not held up
    finally:
        for client in clients:
            client.close()


def test_a_key_revoked_on_one_replica_is_refused_by_the_other_within_seconds(
    replicas: list[RunningServer],
) -> None:
    first, second = replicas
    with _admin(first) as admin:
        made = admin.post("/api/keys", json={"name": f"revoked-{secrets.token_hex(3)}"})
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["id"]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=second.base_url, headers=headers, timeout=60) as user:
        # The second replica verified the key and holds it in its cache (30 s by default).
        for _ in range(3):
            assert user.get("/v1/models").status_code == 200
        with _admin(first) as admin:
            assert admin.delete(f"/api/keys/{key_id}").status_code == 200
        took = _eventually(
            lambda: user.get("/v1/models").status_code == 401,
            5.0,
            "the other replica refuses the revoked key",
        )
    assert took < 5.0


def test_a_prompt_label_moved_on_one_replica_is_served_by_the_other(
    replicas: list[RunningServer],
) -> None:
    first, second = replicas
    name = f"hello-{secrets.token_hex(3)}"
    with _admin(first) as admin:
        for word in ("first", "second"):
            template = [{"role": "user", "content": word + " {{ who }}"}]
            made = admin.post(
                "/api/prompts", json={"name": name, "template": template, "model": "echo"}
            )
            assert made.status_code == 201, made.text
        assert admin.put(f"/api/prompts/{name}/labels/staging", json={"version": 1}).is_success
    body = {"model": f"prompt:{name}@staging", "messages": [], "variables": {"who": "Ada"}}

    def answer() -> str:
        with _admin(second) as client:
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return str(response.json()["choices"][0]["message"]["content"])

    assert answer() == "echo: first Ada"  # now cached on the second replica
    with _admin(first) as admin:
        assert admin.put(f"/api/prompts/{name}/labels/staging", json={"version": 2}).is_success
    _eventually(lambda: answer() == "echo: second Ada", 6.0, "the label change is served")


def test_project_limits_changed_on_one_replica_hold_on_the_other(
    replicas: list[RunningServer],
) -> None:
    first, second = replicas
    project = f"limits-{secrets.token_hex(3)}"
    with _admin(first) as admin:
        assert admin.post("/api/projects", json={"name": project}).status_code == 201
    with _admin(first, project) as admin:
        key = admin.post("/api/keys", json={"name": "app"}).json()["key"]
    body = {"model": "echo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=second.base_url, headers=headers, timeout=60) as app:
        for _ in range(3):  # unlimited, and the second replica caches that
            assert app.post("/v1/chat/completions", json=body).status_code == 200
        with _admin(first) as admin:
            patched = admin.patch(f"/api/projects/{project}", json={"limits": {"rpm": 1}})
            assert patched.status_code == 200, patched.text
        # Within the limits cache's few seconds, the other replica enforces the new limit.
        _eventually(
            lambda: app.post("/v1/chat/completions", json=body).status_code == 429,
            10.0,
            "the other replica enforces the project's new rpm",
        )


def test_a_knowledge_base_ingested_on_one_replica_is_searched_on_the_other(
    replicas: list[RunningServer],
) -> None:
    first, second = replicas
    name = f"kb-{secrets.token_hex(3)}"
    query = {"query": "red kite", "mode": "bm25"}
    with _admin(first) as admin:
        assert admin.post("/api/kbs", json={"name": name}).status_code == 201
        doc = {"source": "kites.txt", "text": "A red kite flies over the green hill."}
        added = admin.post(f"/api/kbs/{name}/documents", json={"documents": [doc]})
        assert added.status_code in (200, 201), added.text
    with _admin(second) as other:
        found = other.post(f"/api/kbs/{name}/search", json=query)
        assert found.status_code == 200, found.text
        assert found.json()["index_version"] == 1  # loaded, and now cached on this replica
        assert [h["source"] for h in found.json()["hits"]] == ["kites.txt"]
        with _admin(first) as admin:
            doc = {"source": "red.txt", "text": "Red kite, red kite: the red kite is back."}
            added = admin.post(f"/api/kbs/{name}/documents", json={"documents": [doc]})
            assert added.status_code in (200, 201), added.text
        # The new active version replaces the cached one on the very next search.
        again = other.post(f"/api/kbs/{name}/search", json=query).json()
        assert again["index_version"] == 2
        assert [h["source"] for h in again["hits"]][:2] == ["red.txt", "kites.txt"]


# -- the shared parts on their own ------------------------------------------------------------


def test_replicas_starting_at_once_agree_on_one_session_secret(tmp_path: Path) -> None:
    url = new_database_url(tmp_path)
    Database(url).migrate()
    box = SecretBox(load_master_key(tmp_path, generate_master_key()))
    databases = [Database(url) for _ in range(6)]  # one engine per "replica"
    start = threading.Barrier(len(databases))
    found: list[str] = []

    def replica(db: Database) -> None:
        start.wait()
        found.append(shared_session_secret(db, box))

    threads = [threading.Thread(target=replica, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(found) == len(databases) and len(set(found)) == 1, found
    assert len(found[0]) >= 60
    # Later starts read it; it is stored sealed, never in clear.
    assert shared_session_secret(databases[0], box) == found[0]
    with databases[0].engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT value FROM shared_state").scalars().all()
    assert stored and all(found[0] not in value for value in stored)
    # Another master key cannot open it: it is replaced (UI sessions end), not crashed on.
    other = SecretBox(load_master_key(tmp_path, generate_master_key()))
    replaced = shared_session_secret(databases[0], other)
    assert replaced != found[0] and shared_session_secret(databases[1], other) == replaced
    for db in databases:
        db.dispose()


def test_revocations_go_through_redis_and_fall_back_to_the_database(
    tmp_path: Path, redis_url: str
) -> None:
    url = new_database_url(tmp_path)
    db = Database(url)
    db.migrate()
    shared = redis_client(redis_url)
    dead = redis_client(f"redis://127.0.0.1:{free_port()}/0")
    one, two = SessionRevocations(db, shared), SessionRevocations(db, shared)
    sid = secrets.token_urlsafe(16)
    assert not two.is_revoked(sid)
    one.revoke(sid, 3600)
    assert two.is_revoked(sid) and not two.is_revoked(sid + "x")
    assert 3590 < shared.ttl(f"flywheel:sessions:revoked:{sid}") <= 3600
    # Redis down: the database still knows, and a revocation made meanwhile holds.
    blind = SessionRevocations(db, dead)
    assert blind.is_revoked(sid)
    later = secrets.token_urlsafe(16)
    blind.revoke(later, 3600)
    assert blind.is_revoked(later) and SessionRevocations(db).is_revoked(later)
    # An expired revocation no longer counts (its cookie is past its age anyway).
    SessionRevocations(db).revoke("short-lived", -1)
    assert not SessionRevocations(db).is_revoked("short-lived")
    shared.close()
    dead.close()
    db.dispose()


def test_the_login_throttle_is_shared_through_redis_and_falls_back_when_it_fails(
    redis_url: str,
) -> None:
    scope = f"flywheel:login:test-{secrets.token_hex(3)}:"
    shared = redis_client(redis_url)
    one = SharedLoginThrottle(shared, max_failures=3, window_seconds=60, prefix=scope)
    two = SharedLoginThrottle(shared, max_failures=3, window_seconds=60, prefix=scope)
    one.failed("user:a")
    two.failed("user:a", "ip:1")
    assert one.retry_after("user:a") == 0 and two.retry_after("ip:1") == 0
    one.failed("user:a")
    for throttle in (one, two):
        wait = throttle.retry_after("ip:2", "user:a")
        assert 55 < wait <= 60
    assert two.retry_after("user:b", "ip:1") == 0
    # Only the newest failures are kept: a key never grows past the limit.
    for _ in range(5):
        one.failed("user:c")
    assert shared.zcard(scope + "user:c") == 3 and 0 < shared.ttl(scope + "user:c") <= 61

    # Redis down: this replica's own count takes over (quickly: short timeouts).
    dead = redis_client(f"redis://127.0.0.1:{free_port()}/0")
    alone = SharedLoginThrottle(dead, max_failures=2, window_seconds=60, prefix=scope)
    started = time.monotonic()
    assert alone.retry_after("user:d") == 0
    alone.failed("user:d")
    alone.failed("user:d")
    assert alone.retry_after("user:d") > 55
    assert time.monotonic() - started < 3
    shared.close()
    dead.close()
