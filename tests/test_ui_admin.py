"""The administration pages over HTTP (no browser): projects and users for instance admins,
secrets for project admins, one's own password for users, and the refusals around them."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from .conftest import RunningServer

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _login(server: RunningServer, **form: str) -> httpx.Response:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        return client.post("/login", data={**form, "next": "/account"})


@contextmanager
def ui_session(server: RunningServer, **login: str) -> Iterator[tuple[httpx.Client, str]]:
    """A logged-in UI client (``api_key=`` or ``username=`` and ``password=``) and its CSRF
    token."""
    with httpx.Client(base_url=server.base_url, timeout=60, follow_redirects=False) as client:
        response = client.post("/login", data={**login, "next": "/account"})
        assert response.status_code == 303, response.text
        # The test server speaks plain HTTP; the cookie is marked Secure, so hand it over.
        client.cookies.set("flywheel_session", response.cookies["flywheel_session"])
        page = client.get("/account")
        assert page.status_code == 200, page.text
        token = CSRF.search(page.text)
        assert token, "the page carries the session's CSRF token"
        yield client, token.group(1)


@pytest.fixture(scope="module")
def admin_api(server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def admin_ui(server: RunningServer) -> Iterator[tuple[httpx.Client, str]]:
    with ui_session(server, api_key=server.admin_key) as session:
        yield session


def make_key(admin_api: httpx.Client, role: str, project: str = "default") -> str:
    response = admin_api.post(
        "/api/keys",
        json={"name": unique(f"ui admin {role}"), "role": role, "scope": "admin"},
        headers={"X-Flywheel-Project": project},
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def test_instance_admin_creates_projects_and_sets_limits(
    admin_ui: tuple[httpx.Client, str], admin_api: httpx.Client
) -> None:
    client, token = admin_ui
    name = unique("ui-proj")
    assert client.post("/admin/projects", data={"name": name}).status_code == 403  # no CSRF
    assert admin_api.get(f"/api/projects/{name}").status_code == 404

    bad = client.post("/admin/projects", data={"csrf_token": token, "name": "Not Valid"})
    assert bad.status_code == 400 and "A project name is 1-63 lowercase" in bad.text
    assert 'value="Not Valid"' in bad.text, "the form keeps what was typed"

    form = {"csrf_token": token, "name": name, "description": "made from the UI"}
    created = client.post("/admin/projects", data=form)
    assert created.status_code == 303, created.text
    assert created.headers["location"] == f"/admin/projects#project-{name}"
    project = admin_api.get(f"/api/projects/{name}").json()
    assert project["description"] == "made from the UI" and project["limits"] is None
    again = client.post("/admin/projects", data=form)
    assert again.status_code == 409 and f"Project &#39;{name}&#39; already exists." in again.text

    limits = {
        "rpm": "60",
        "tpm": "",
        "max_concurrent": "3",
        "budget_usd": "12.5",
        "budget_period": "day",
        "soft_pct": "0.5",
    }
    saved = client.post(
        f"/admin/projects/{name}",
        data={"csrf_token": token, "description": "limited", **limits},
    )
    assert saved.status_code == 303, saved.text
    project = admin_api.get(f"/api/projects/{name}").json()
    assert project["description"] == "limited"
    assert project["limits"] == {
        "rpm": 60,
        "max_concurrent": 3,
        "budget_usd": 12.5,
        "budget_period": "day",
        "soft_pct": 0.5,
    }
    page = client.get("/admin/projects")
    assert page.status_code == 200
    row = re.search(rf'<tr data-project="{name}".*?</tr>', page.text, re.S)
    assert row and "60 rpm" in row.group(0) and "$12.5 / day, alert at 50%" in row.group(0)

    negative = client.post(
        f"/admin/projects/{name}", data={"csrf_token": token, "description": "x", "rpm": "-5"}
    )
    assert negative.status_code == 400 and "Requests per minute:" in negative.text
    share = client.post(
        f"/admin/projects/{name}",
        data={"csrf_token": token, "description": "x", "budget_usd": "5", "soft_pct": "2"},
    )
    assert share.status_code == 400 and "Soft alert share:" in share.text
    assert admin_api.get(f"/api/projects/{name}").json()["limits"]["rpm"] == 60, "unchanged"

    cleared = client.post(f"/admin/projects/{name}", data={"csrf_token": token, "rpm": ""})
    assert cleared.status_code == 303
    assert admin_api.get(f"/api/projects/{name}").json()["limits"] is None
    missing = client.post("/admin/projects/no-such-project", data={"csrf_token": token})
    assert missing.status_code == 404 and "No project" in missing.text


def test_instance_admin_manages_users(
    server: RunningServer, admin_ui: tuple[httpx.Client, str], admin_api: httpx.Client
) -> None:
    client, token = admin_ui
    username, password = unique("ui-user"), "first password 1"
    weak = client.post(
        "/admin/users", data={"csrf_token": token, "username": username, "password": "short"}
    )
    assert weak.status_code == 400 and "at least 10 characters" in weak.text

    created = client.post(
        "/admin/users",
        data={"csrf_token": token, "username": username, "password": password, "is_admin": "on"},
    )
    assert created.status_code == 303, created.text
    users = {u["username"]: u for u in admin_api.get("/api/users").json()["data"]}
    user = users[username]
    assert user["is_admin"] is True and user["disabled_at"] is None
    page = client.get("/admin/users")
    assert f'data-user="{username}"' in page.text
    assert "argon2" not in page.text and password not in page.text

    new_password = "second password 2"
    changed = client.post(
        f"/admin/users/{user['id']}/password", data={"csrf_token": token, "password": new_password}
    )
    assert changed.status_code == 200 and "was changed" in changed.text
    assert new_password not in changed.text
    assert _login(server, username=username, password=password).status_code == 401
    assert _login(server, username=username, password=new_password).status_code == 303

    disabled = client.post(
        f"/admin/users/{user['id']}/disabled", data={"csrf_token": token, "disabled": "true"}
    )
    assert disabled.status_code == 303
    users = {u["username"]: u for u in admin_api.get("/api/users").json()["data"]}
    assert users[username]["disabled_at"] is not None
    assert _login(server, username=username, password=new_password).status_code == 401
    enabled = client.post(
        f"/admin/users/{user['id']}/disabled", data={"csrf_token": token, "disabled": "false"}
    )
    assert enabled.status_code == 303
    assert _login(server, username=username, password=new_password).status_code == 303

    unknown = client.post(
        "/admin/users/nobody-here/disabled", data={"csrf_token": token, "disabled": "true"}
    )
    assert unknown.status_code == 404 and "No user" in unknown.text


def test_project_admin_stores_secrets_without_seeing_them(
    server: RunningServer, admin_api: httpx.Client
) -> None:
    key = make_key(admin_api, "admin")
    name, value = unique("UI_SECRET").replace("-", "_"), f"sk-ui-{secrets.token_hex(12)}"
    with ui_session(server, api_key=key) as (client, token):
        assert client.post("/secrets", data={"name": name, "value": value}).status_code == 403
        saved = client.post("/secrets", data={"csrf_token": token, "name": name, "value": value})
        assert saved.status_code == 200, saved.text
        assert f'data-secret="{name}"' in saved.text and value not in saved.text
        listing = client.get("/secrets")
        assert f'data-secret="{name}"' in listing.text and value not in listing.text

        bad = client.post(
            "/secrets", data={"csrf_token": token, "name": "no/slash", "value": value}
        )
        assert bad.status_code == 400 and "invalid secret name" in bad.text
        assert value not in bad.text
        empty = client.post("/secrets", data={"csrf_token": token, "name": name, "value": " "})
        assert empty.status_code == 400 and "empty value" in empty.text

        # A project admin is not an instance admin.
        assert client.get("/admin/projects").status_code == 403
        assert client.get("/admin/users").status_code == 403
        create = client.post("/admin/projects", data={"csrf_token": token, "name": unique("p")})
        assert create.status_code == 403

    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as api:
        stored = api.get("/api/secrets")
        assert stored.status_code == 200 and value not in stored.text
        assert name in {s["name"] for s in stored.json()["data"]}
        audit = api.get("/api/audit", params={"action": "secret.set"}).json()["data"]
        assert any(e["resource_id"] == name for e in audit)

    with ui_session(server, api_key=key) as (client, token):
        deleted = client.post("/secrets/delete", data={"csrf_token": token, "name": name})
        assert deleted.status_code == 200 and f'data-secret="{name}"' not in deleted.text
        gone = client.post("/secrets/delete", data={"csrf_token": token, "name": name})
        assert gone.status_code == 404 and "No secret" in gone.text
    names = {s["name"] for s in admin_api.get("/api/secrets").json()["data"]}
    assert name not in names


def test_user_changes_own_password(server: RunningServer, admin_api: httpx.Client) -> None:
    username, old = unique("ui-self"), "the old password"
    created = admin_api.post("/api/users", json={"username": username, "password": old})
    assert created.status_code == 201
    assert admin_api.put(f"/api/members/{username}", json={"role": "viewer"}).is_success

    new = "the new password!"
    with ui_session(server, username=username, password=old) as (client, token):
        page = client.get("/account")
        assert 'id="password-form"' in page.text and 'href="/account"' in page.text

        def change(current: str, new_password: str, confirm: str) -> httpx.Response:
            data = {
                "csrf_token": token,
                "current_password": current,
                "new_password": new_password,
                "confirm_password": confirm,
            }
            return client.post("/account/password", data=data)

        no_csrf = client.post(
            "/account/password",
            data={"current_password": old, "new_password": new, "confirm_password": new},
        )
        assert no_csrf.status_code == 403
        wrong = change("not my password", new, new)
        assert wrong.status_code == 400 and "current password is not correct" in wrong.text
        mismatch = change(old, new, new + "x")
        assert mismatch.status_code == 400 and "do not match" in mismatch.text
        short = change(old, "short", "short")
        assert short.status_code == 400 and "at least 10 characters" in short.text
        assert _login(server, username=username, password=old).status_code == 303

        with ui_session(server, username=username, password=old) as (elsewhere, _):
            assert elsewhere.get("/account").status_code == 200
            done = change(old, new, new)
            assert done.status_code == 200 and "Your password was changed" in done.text
            assert old not in done.text and new not in done.text
            # The session begun with the old password elsewhere has ended; this one goes on.
            ended = elsewhere.get("/account")
            assert ended.status_code in (302, 303) and "/login" in ended.headers["location"]
        client.cookies.set("flywheel_session", done.cookies["flywheel_session"])
        assert client.get("/account").status_code == 200

    assert _login(server, username=username, password=old).status_code == 401
    assert _login(server, username=username, password=new).status_code == 303
    # A viewer sees none of the administration pages.
    with ui_session(server, username=username, password=new) as (client, token):
        for path in ("/admin/projects", "/admin/users", "/secrets"):
            assert client.get(path).status_code == 403, path


@pytest.mark.parametrize("role", ["developer", "viewer"])
def test_developer_and_viewer_are_refused(
    server: RunningServer, admin_api: httpx.Client, role: str
) -> None:
    key = make_key(admin_api, role)
    project, username = unique("ui-refused"), unique("ui-refused")
    with ui_session(server, api_key=key) as (client, token):
        for path in ("/admin/projects", "/admin/users", "/secrets"):
            assert client.get(path).status_code == 403, path
        posts = {
            "/admin/projects": {"name": project},
            "/admin/projects/default": {"rpm": "1"},
            "/admin/users": {"username": username, "password": "long enough pw"},
            "/admin/users/nobody/password": {"password": "long enough pw"},
            "/admin/users/nobody/disabled": {"disabled": "true"},
            "/secrets": {"name": "REFUSED", "value": "never stored"},
            "/secrets/delete": {"name": "REFUSED"},
        }
        for path, data in posts.items():
            response = client.post(path, data={"csrf_token": token, **data})
            assert response.status_code == 403, path
            assert "Not allowed" in response.text
        # A key session has no password to change.
        assert "which has no password" in client.get("/account").text
        refused = client.post(
            "/account/password",
            data={
                "csrf_token": token,
                "current_password": "x",
                "new_password": "long enough pw",
                "confirm_password": "long enough pw",
            },
        )
        assert refused.status_code == 403 and "which has no password" in refused.text

    assert admin_api.get(f"/api/projects/{project}").status_code == 404
    assert username not in {u["username"] for u in admin_api.get("/api/users").json()["data"]}
    assert admin_api.get("/api/projects/default").json()["limits"] != {"rpm": 1}
    assert "REFUSED" not in {s["name"] for s in admin_api.get("/api/secrets").json()["data"]}
