"""Projects, users, keys, limits, secrets and the audit log, through a running server."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from .conftest import RunningServer, copy_database, database_files, wait_for_trace

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}


def _suffix() -> str:
    return secrets.token_hex(4)


def _admin(server: RunningServer, project: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    if project:
        headers["X-Flywheel-Project"] = project
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


def _key_client(server: RunningServer, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def _project_with_key(server: RunningServer, name: str, **key: object) -> tuple[str, str]:
    """A new project and an admin key in it (overridable), as ``(project, raw key)``."""
    with _admin(server) as admin:
        assert admin.post("/api/projects", json={"name": name}).status_code == 201
    with _admin(server, name) as admin:
        body = {"name": f"{name} key", "role": "admin", "scope": "admin", **key}
        response = admin.post("/api/keys", json=body)
        assert response.status_code == 201, response.text
        return name, response.json()["key"]


@pytest.fixture(scope="module")
def two_projects(server: RunningServer) -> Iterator[dict[str, str]]:
    suffix = _suffix()
    a, key_a = _project_with_key(server, f"iso-a-{suffix}")
    b, key_b = _project_with_key(server, f"iso-b-{suffix}")
    yield {"a": a, "key_a": key_a, "b": b, "key_b": key_b}


def test_projects_isolate_every_resource(server: RunningServer, two_projects) -> None:
    a, b = two_projects["a"], two_projects["b"]
    with (
        _key_client(server, two_projects["key_a"]) as client_a,
        _key_client(server, two_projects["key_b"]) as client_b,
    ):
        call = client_a.post("/v1/chat/completions", json=CHAT)
        assert call.status_code == 200, call.text
        trace_id = call.headers["x-flywheel-trace-id"]
        assert wait_for_trace(client_a, trace_id)["spans"][0]["project_id"] == a
        assert client_a.put("/api/secrets/only-a", json={"value": "a-secret-value"}).is_success
        key_a_id = client_a.get("/api/me").json()["id"]

        # Traces: list, get, stats and costs of B know nothing of A's call.
        assert trace_id not in {t["trace_id"] for t in client_b.get("/api/traces").json()["data"]}
        assert client_b.get(f"/api/traces/{trace_id}").status_code == 404
        assert client_b.get("/api/stats").json()["totals"]["requests"] == 0
        assert client_a.get("/api/stats").json()["totals"]["requests"] >= 1
        assert client_b.get("/api/costs").json()["by_route"] == []
        # Keys, secrets, members, audit entries and projects.
        assert key_a_id not in {k["id"] for k in client_b.get("/api/keys").json()["data"]}
        assert client_b.delete(f"/api/keys/{key_a_id}").status_code == 404
        assert client_b.get("/api/secrets").json()["data"] == []
        assert client_b.delete("/api/secrets/only-a").status_code == 404
        audit_b = client_b.get("/api/audit").json()["data"]
        assert audit_b and all(e["project_id"] == b for e in audit_b)
        assert [p["id"] for p in client_b.get("/api/projects").json()["data"]] == [b]
        assert client_b.get(f"/api/projects/{a}").status_code == 404
        # Knowledge bases and pipelines, even under the same names.
        kb = {"documents": [{"source": "a.txt", "text": "Only project A knows this."}]}
        assert client_a.post("/api/kbs", json={"name": "shared-name"}).status_code == 201
        assert client_a.post("/api/kbs/shared-name/documents", json=kb).is_success
        assert client_b.get("/api/kbs").json()["data"] == []
        assert client_b.post("/api/kbs/shared-name/search", json={"query": "A"}).status_code == 404
        assert client_b.post("/api/kbs", json={"name": "shared-name"}).status_code == 201
        assert (
            client_b.post("/api/kbs/shared-name/search", json={"query": "A"}).json()["hits"] == []
        )
        pipeline = "name: p\nsteps:\n  - {id: n, type: tool, python: current_time}\n"
        yaml_type = {"content-type": "application/yaml"}
        assert client_a.put("/api/pipelines/p", content=pipeline, headers=yaml_type).is_success
        assert client_b.get("/api/pipelines").json()["data"] == []
        assert client_b.post("/api/pipelines/p/run").status_code == 404
        # A project key cannot step into another project.
        wrong = client_b.get("/api/traces", headers={"X-Flywheel-Project": a})
        assert wrong.status_code == 403
        assert wrong.json()["error"]["code"] == "wrong_project"
    with _admin(server) as admin:
        # Members are per project too.
        user = f"iso-user-{_suffix()}"
        assert admin.post(
            "/api/users", json={"username": user, "password": "long-enough-pw"}
        ).is_success
    with _admin(server, a) as admin_a, _admin(server, b) as admin_b:
        assert admin_a.put(f"/api/members/{user}", json={"role": "viewer"}).is_success
        assert user in {m["username"] for m in admin_a.get("/api/members").json()["data"]}
        assert user not in {m["username"] for m in admin_b.get("/api/members").json()["data"]}


def test_key_may_call_only_its_models(server: RunningServer) -> None:
    _, key = _project_with_key(
        server, f"allow-{_suffix()}", role="developer", scope="gateway", allowed_models=["echo"]
    )
    with _key_client(server, key) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        refused = client.post("/v1/chat/completions", json={**CHAT, "model": "balanced"})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "model_not_allowed"
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["echo"]
        # A gateway-scoped key reads nothing.
        assert client.get("/api/traces").status_code == 403


def test_expired_and_revoked_keys_stop_working(server: RunningServer) -> None:
    project, _ = _project_with_key(server, f"expiry-{_suffix()}")
    with _admin(server, project) as admin:
        expiring = admin.post(
            "/api/keys", json={"name": "short", "expires_at": time.time() + 1.5}
        ).json()
        revoked = admin.post("/api/keys", json={"name": "to revoke"}).json()
        with _key_client(server, revoked["key"]) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert admin.delete(f"/api/keys/{revoked['id']}").status_code == 200
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
        with _key_client(server, expiring["key"]) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            time.sleep(2)
            response = client.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 401
            assert "expired" in response.json()["error"]["message"]
        past = admin.post("/api/keys", json={"name": "past", "expires_at": time.time() - 5})
        assert past.status_code == 400


def test_nobody_grants_more_than_they_hold(server: RunningServer) -> None:
    project, _ = _project_with_key(server, f"cap-{_suffix()}")
    with _admin(server, project) as admin:
        developer = admin.post(
            "/api/keys", json={"name": "dev", "role": "developer", "scope": "admin"}
        ).json()
    with _key_client(server, developer["key"]) as client:
        # Developers do not manage keys at all; admins of a project cannot create projects.
        assert client.post("/api/keys", json={"name": "x", "role": "admin"}).status_code == 403
        assert client.post("/api/projects", json={"name": "nope"}).status_code == 403


def test_user_key_follows_the_users_role(server: RunningServer) -> None:
    project, _ = _project_with_key(server, f"owner-{_suffix()}")
    user = f"owner-{_suffix()}"
    with _admin(server) as admin:
        assert admin.post(
            "/api/users", json={"username": user, "password": "a-good-password"}
        ).is_success
    with _admin(server, project) as admin:
        assert admin.put(f"/api/members/{user}", json={"role": "developer"}).is_success
        key = admin.post(
            "/api/keys",
            json={"name": "user key", "role": "developer", "scope": "admin", "user": user},
        ).json()["key"]
        with _key_client(server, key) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
            assert admin.put(f"/api/members/{user}", json={"role": "viewer"}).is_success
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 403
            assert client.get("/api/traces").status_code == 200
            assert admin.delete(f"/api/members/{user}").is_success
            assert client.get("/api/traces").status_code == 401


def test_catalog_status_is_enforced(server: RunningServer, api: httpx.Client) -> None:
    blocked = api.post("/v1/chat/completions", json={**CHAT, "model": "up-blocked"})
    assert blocked.status_code == 403
    assert blocked.json()["error"]["code"] == "model_blocked"
    assert "blocked" in blocked.json()["error"]["message"]
    assert "up-blocked" not in {m["id"] for m in api.get("/v1/models").json()["data"]}
    # Experimental models may be called directly, and production routes work as usual.
    assert api.post("/v1/chat/completions", json={**CHAT, "model": "up-experimental"}).is_success
    assert api.post("/v1/chat/completions", json={**CHAT, "model": "production-echo"}).is_success


def _login(server: RunningServer, **form: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/login", data={"next": "/", **form}, timeout=60)


def test_users_log_in_with_passwords_and_are_throttled(server: RunningServer) -> None:
    user, password = f"pw-{_suffix()}", "correct horse battery"
    with _admin(server) as admin:
        weak = admin.post("/api/users", json={"username": user, "password": "short"})
        assert weak.status_code == 400 and weak.json()["error"]["code"] == "weak_password"
        created = admin.post("/api/users", json={"username": user, "password": password})
        assert created.status_code == 201
        assert "password" not in created.text and "argon2" not in created.text
        assert admin.put(f"/api/members/{user}", json={"role": "viewer"}).is_success
    ok = _login(server, username=user, password=password)
    assert ok.status_code == 303
    assert "flywheel_session" in ok.headers["set-cookie"]
    assert "HttpOnly" in ok.headers["set-cookie"] and "Secure" in ok.headers["set-cookie"]
    assert _login(server, username=user, password="wrong password!").status_code == 401
    for _ in range(9):
        _login(server, username=user, password="wrong password!")
    throttled = _login(server, username=user, password=password)
    assert throttled.status_code == 429
    assert int(throttled.headers["retry-after"]) > 0
    with _admin(server) as admin:
        failures = admin.get(
            "/api/audit",
            params={"action": "login.failure", "actor": f"user:{user}", "all_projects": True},
        ).json()["data"]
        assert len(failures) == 10
        assert all("wrong password" not in str(e) for e in failures)


def test_budget_stops_at_its_limit_under_concurrent_load(server: RunningServer) -> None:
    """$2 a day for the project; every call costs 5 cents and reserves up to 66 (its prompt's
    bytes plus max_tokens, at the model's price). 16 concurrent clients keep calling until
    the budget is used up: spend never exceeds the budget, ends within one reservation of it,
    and everything after that is refused until the period resets."""
    budget = 2.0
    project, key = _project_with_key(server, f"budget-{_suffix()}")
    with _admin(server) as admin:
        limits = {"budget_usd": budget, "budget_period": "day"}
        assert admin.patch(f"/api/projects/{project}", json={"limits": limits}).is_success
    body = {**CHAT, "model": "pricey", "max_tokens": 8}
    costs: list[float] = []
    refusals: list[dict] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code == 429:
                refusals.append(response.json()["error"])
                if int(response.headers["retry-after"]) > 5:
                    return  # used up until the period resets
                await asyncio.sleep(0.05)  # held by calls in flight: retry shortly
                continue
            assert response.status_code == 200, response.text
            usage = response.json()["usage"]
            costs.append((usage["prompt_tokens"] + usage["completion_tokens"]) * 0.01)

    async def run() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as c:
            await asyncio.gather(*(client_loop(c) for _ in range(16)))

    asyncio.run(run())
    spent = sum(costs)
    largest = max(costs)
    assert len(costs) > 3
    assert spent <= budget + 1e-9, f"overshot: spent {spent} of {budget}"
    reservation = (len('[{"role":"user","content":"hello there"}]') + 8 + 8) * 0.01
    assert spent > budget - reservation - largest, f"stopped far below the budget: {spent}"
    assert all(r["code"] == "insufficient_quota" for r in refusals)
    with _key_client(server, key) as client:
        after = client.post("/v1/chat/completions", json=body)
        assert after.status_code == 429
        assert "resets" in after.json()["error"]["message"]
        assert int(after.headers["retry-after"]) > 0
        # The traces agree with what the clients were charged.
        time.sleep(0.5)
        costs_page = client.get("/api/costs").json()
        assert costs_page["spent"] == pytest.approx(spent, abs=1e-6)


def test_rate_limit_per_key(server: RunningServer) -> None:
    _, key = _project_with_key(server, f"rpm-{_suffix()}", limits={"rpm": 3})
    with _key_client(server, key) as client:
        statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = client.post("/v1/chat/completions", json=CHAT)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 0 < int(refused.headers["retry-after"]) <= 60


def test_secrets_are_encrypted_and_never_returned(server: RunningServer) -> None:
    value = "sk-flywheel-test-" + secrets.token_hex(16)
    _, key = _project_with_key(server, f"secret-{_suffix()}")
    with _key_client(server, key) as client:
        stored = client.put("/api/secrets/provider-key", json={"value": value})
        assert stored.status_code == 200
        listed = client.get("/api/secrets")
        for response in (stored, listed):
            assert value not in response.text
        assert [s["name"] for s in listed.json()["data"]] == ["provider-key"]
        audit = client.get("/api/audit", params={"action": "secret.set"}).text
        assert "provider-key" in audit and value not in audit
        bad = client.put("/api/secrets/bad name", json={"value": "x" * 10})
        assert bad.status_code == 400
    # Nothing on disk holds the value: database, WAL, logs (and PostgreSQL's files).
    files = [path for path in server.home.rglob("*") if path.is_file()]
    if not server.database_url.startswith("sqlite"):
        files += database_files(server.database_url)
    for path in files:
        assert value.encode() not in path.read_bytes(), f"secret found in {path}"


def test_audit_log_verifies_then_detects_an_edited_row(server: RunningServer, tmp_path) -> None:
    # Something to audit, then a consistent copy of the server's database to tamper with.
    _project_with_key(server, f"audit-{_suffix()}")
    copy = copy_database(server.database_url, tmp_path)
    env = {"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_DATABASE_URL": copy}

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLYWHEEL, "audit", "verify"],
            capture_output=True,
            text=True,
            env={**_environ(), **env},
            timeout=120,
        )

    good = verify()
    assert good.returncode == 0, good.stderr
    assert "intact" in good.stdout
    tamper = create_engine(copy)
    with tamper.begin() as db:
        db.execute(text("UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 2"))
    tamper.dispose()
    bad = verify()
    assert bad.returncode == 1
    assert "entry 2" in bad.stderr and "NOT intact" in bad.stderr
    exported = subprocess.run(
        [FLYWHEEL, "audit", "export", "--format", "jsonl"],
        capture_output=True,
        text=True,
        env={**_environ(), **env},
        timeout=120,
    )
    assert exported.returncode == 0 and exported.stdout.count("\n") >= 2
    assert '"hash"' in exported.stdout


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}


def test_a_cut_stream_is_charged_its_reservation(server: RunningServer) -> None:
    """The upstream drops the stream after two chunks, so no usage is reported. The call
    produced output, so the budget is charged what was reserved for it (about $0.57: the
    prompt's bytes plus max_tokens at $0.01 a token) rather than nothing."""
    project, key = _project_with_key(server, f"cut-{_suffix()}")
    with _admin(server) as admin:
        limits = {"budget_usd": 1.0, "budget_period": "day"}
        assert admin.patch(f"/api/projects/{project}", json={"limits": limits}).is_success
    body = {**CHAT, "model": "cut-pricey", "max_tokens": 8, "stream": True}
    with _key_client(server, key) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = "".join(response.iter_text())
        assert "stream_interrupted" in events
        again = client.post("/v1/chat/completions", json=body)
        assert again.status_code == 429, again.text
        assert again.json()["error"]["code"] == "insufficient_quota"
