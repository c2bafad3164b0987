"""The RBAC matrix: every route of the app, every role and key scope, against the policy.

A route added without an entry in ``flywheel.server.policy.POLICY`` fails
``test_every_route_has_a_policy``; a route whose handler forgets to enforce its policy fails
the matrix (a caller without the permission gets through).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from flywheel.security.rbac import ALL_PERMISSIONS, Permission, permissions_for
from flywheel.server.app import create_app
from flywheel.server.policy import POLICY, READ_ONLY_POSTS, iter_routes

from .conftest import RunningServer

PROJECT = "rbac-matrix"
UI_PREFIXES = ("/v1/", "/api/")
CSRF_REFUSAL = "expired or came from somewhere else"


@dataclass(frozen=True)
class Caller:
    label: str
    key: str
    granted: frozenset[Permission]


def _app_routes() -> list[tuple[str, str]]:
    return sorted(set(iter_routes(create_app())))


def test_every_route_has_a_policy() -> None:
    routes = _app_routes()
    assert len(routes) > 40, routes  # the enumeration sees included routers and mounts
    missing = [route for route in routes if route not in POLICY]
    assert not missing, f"routes without an access policy in flywheel/server/policy.py: {missing}"
    stale = sorted(set(POLICY) - set(routes))
    assert not stale, f"policy entries for routes that no longer exist: {stale}"


@pytest.fixture(scope="module")
def callers(server: RunningServer, auth: dict[str, str]) -> list[Caller]:
    """A key for every role (scope admin) and every narrower scope (role admin)."""
    with httpx.Client(base_url=server.base_url, headers=auth, timeout=60) as admin:
        created = admin.post("/api/projects", json={"name": PROJECT})
        assert created.status_code in (201, 409), created.text
        project = {"X-Flywheel-Project": PROJECT}
        out = [Caller("instance admin", server.admin_key, ALL_PERMISSIONS)]
        combos = [(role, "admin") for role in ("viewer", "reviewer", "developer", "admin")]
        combos += [("admin", scope) for scope in ("gateway", "feedback", "read")]
        for role, scope in combos:
            response = admin.post(
                "/api/keys",
                headers=project,
                json={"name": f"matrix {role}/{scope}", "role": role, "scope": scope},
            )
            assert response.status_code == 201, response.text
            out.append(
                Caller(f"{role}/{scope}", response.json()["key"], permissions_for(role, scope))
            )
    return out


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "matrix-x", path)


def _api_status(client: httpx.Client, method: str, path: str, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, _concrete(path), headers=headers, json=body).status_code


def test_api_matrix(server: RunningServer, callers: list[Caller]) -> None:
    routes = [
        (m, p, POLICY[(m, p)])
        for m, p in _app_routes()
        if p.startswith(UI_PREFIXES) and POLICY[(m, p)] is not Permission.PUBLIC
    ]
    failures: list[str] = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for method, path, permission in routes:
            status = _api_status(client, method, path, None)
            if status != 401:
                failures.append(f"{method} {path} without a key: {status}, expected 401")
            for caller in callers:
                status = _api_status(client, method, path, caller.key)
                allowed = permission in caller.granted
                if allowed and status in (401, 403):
                    failures.append(f"{method} {path} as {caller.label}: {status}, expected access")
                if not allowed and status != 403:
                    failures.append(f"{method} {path} as {caller.label}: {status}, expected 403")
    assert not failures, "\n".join(failures)


@contextmanager
def _ui_session(server: RunningServer, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60, follow_redirects=False) as client:
        response = client.post("/login", data={"api_key": key, "next": "/"})
        assert response.status_code == 303, response.text
        # The test server speaks plain HTTP; the cookie is marked Secure, so hand it over.
        client.cookies.set("flywheel_session", response.cookies["flywheel_session"])
        yield client


def test_ui_matrix(server: RunningServer, callers: list[Caller]) -> None:
    routes = [
        (m, p, POLICY[(m, p)])
        for m, p in _app_routes()
        if not p.startswith(UI_PREFIXES)
        and POLICY[(m, p)] is not Permission.PUBLIC
        and p != "/static"
    ]
    failures: list[str] = []
    with httpx.Client(base_url=server.base_url, timeout=60) as anonymous:
        for method, path, _ in routes:
            response = anonymous.request(method, _concrete(path), follow_redirects=False)
            if response.status_code not in (303, 401) or "/login" not in response.headers.get(
                "location", response.headers.get("hx-redirect", "")
            ):
                failures.append(f"{method} {path} logged out: {response.status_code}")
    for caller in callers:
        if Permission.AUTHENTICATED not in caller.granted:
            continue
        with _ui_session(server, caller.key) as client:
            for method, path, permission in routes:
                response = client.request(method, _concrete(path))
                allowed = permission in caller.granted
                refused = response.status_code == 403 and CSRF_REFUSAL not in response.text
                if allowed and refused:
                    failures.append(f"{method} {path} as {caller.label}: refused, expected access")
                if not allowed and not refused:
                    failures.append(f"{method} {path} as {caller.label}: {response.status_code}")
    assert not failures, "\n".join(failures)


def test_ui_post_without_csrf_token_is_refused(server: RunningServer) -> None:
    with _ui_session(server, server.admin_key) as client:
        response = client.post("/access/members", data={"username": "nobody", "role": "viewer"})
        assert response.status_code == 403
        assert CSRF_REFUSAL in response.text
        page = client.get("/access")
        token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page.text)
        assert token, "the access page carries the session's CSRF token"
        response = client.post(
            "/access/members",
            data={"username": "nobody", "role": "viewer", "csrf_token": token.group(1)},
        )
        assert response.status_code == 404  # past the CSRF check: the user does not exist
        assert "No user" in response.text


def test_read_only_callers_change_nothing(server: RunningServer, callers: list[Caller]) -> None:
    """Independent of the policy table: a viewer, or a key with the read scope, is refused
    on every API route that is not a GET."""
    readers = [c for c in callers if c.label in ("viewer/admin", "admin/read")]
    assert len(readers) == 2
    writes = [
        (m, p)
        for m, p in _app_routes()
        if p.startswith(UI_PREFIXES) and m != "GET" and (m, p) not in READ_ONLY_POSTS
    ]
    assert len(writes) > 10
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        for caller in readers:
            for method, path in writes:
                status = _api_status(client, method, path, caller.key)
                assert status == 403, f"{method} {path} as {caller.label}: {status}"
