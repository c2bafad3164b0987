"""The prompt pages over HTTP (no browser): forms, refusals shown on the page, the playground's
streamed runs, saving a version, label moves and approvals with the four-eyes rule."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from unittest.mock import ANY

import httpx
import pytest

from .conftest import RunningServer

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


@contextmanager
def ui_session(server: RunningServer, key: str) -> Iterator[tuple[httpx.Client, str]]:
    """A logged-in UI client and its CSRF token."""
    with httpx.Client(base_url=server.base_url, timeout=60, follow_redirects=False) as client:
        response = client.post("/login", data={"api_key": key, "next": "/prompts"})
        assert response.status_code == 303, response.text
        # The test server speaks plain HTTP; the cookie is marked Secure, so hand it over.
        client.cookies.set("flywheel_session", response.cookies["flywheel_session"])
        page = client.get("/prompts")
        assert page.status_code == 200, page.text
        token = CSRF.search(page.text)
        assert token, "the page carries the session's CSRF token"
        yield client, token.group(1)


def make_key(api: httpx.Client, role: str, scope: str = "admin") -> str:
    response = api.post(
        "/api/keys",
        json={"name": f"ui prompts {role} {secrets.token_hex(3)}", "role": role, "scope": scope},
    )
    assert response.status_code == 201, response.text
    key: str = response.json()["key"]
    return key


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def create_prompt(client: httpx.Client, token: str, name: str, **fields: str) -> httpx.Response:
    data = {
        "csrf_token": token,
        "name": name,
        "kind": "chat",
        "system": "You are terse.",
        "user_message": "Say {{ thing }}",
        "model": "echo",
        "temperature": "0.5",
        "max_tokens": "50",
        "message": "first",
        **fields,
    }
    return client.post("/prompts", data=data)


def run_lines(response: httpx.Response) -> list[dict[str, object]]:
    assert response.headers["content-type"].startswith("application/x-ndjson"), response.text
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def streamed_text(lines: list[dict[str, object]]) -> str:
    return "".join(str(line["text"]) for line in lines if "text" in line)


@pytest.fixture(scope="module")
def admin_ui(server: RunningServer) -> Iterator[tuple[httpx.Client, str]]:
    with ui_session(server, server.admin_key) as session:
        yield session


def test_create_prompt_form_and_its_refusals(admin_ui: tuple[httpx.Client, str]) -> None:
    client, token = admin_ui
    name = unique("ui-form")
    assert client.post("/prompts", data={"name": name}).status_code == 403  # no CSRF token

    empty = create_prompt(client, token, name, system="", user_message=" ")
    assert empty.status_code == 400
    assert "Write a system message, a user message, or both." in empty.text
    assert f'value="{name}"' in empty.text, "the form keeps what was typed"

    hot = create_prompt(client, token, name, temperature="7")
    assert hot.status_code == 400 and "Temperature must be between 0 and 2" in hot.text
    bad = create_prompt(client, token, "no spaces allowed")
    assert bad.status_code == 400 and "A prompt name is" in bad.text
    broken = create_prompt(client, token, name, user_message="{{ unclosed")
    assert broken.status_code == 400 and "template" in broken.text.lower()

    created = create_prompt(client, token, name)
    assert created.status_code == 303
    assert created.headers["location"] == f"/prompts/{name}"
    again = create_prompt(client, token, name)
    assert again.status_code == 409 and "already exists" in again.text

    listing = client.get("/prompts")
    assert f'data-prompt="{name}"' in listing.text
    page = client.get(f"/prompts/{name}")
    assert page.status_code == 200
    assert 'data-version="1"' in page.text and "first" in page.text
    assert client.get("/prompts/no-such-prompt").status_code == 404


def test_playground_streams_compares_and_saves(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, token = admin_ui
    name = unique("ui-play")
    assert create_prompt(client, token, name).status_code == 303

    page = client.get("/playground", params={"prompt": name})
    assert page.status_code == 200
    assert 'name="var.thing"' in page.text and "data-required" in page.text

    run = client.post(
        "/playground/run",
        data={"csrf_token": token, "prompt": name, "ref": "1", "model": "", "var.thing": "hi"},
    )
    assert run.status_code == 200
    lines = run_lines(run)
    meta = lines[0]["meta"]
    assert isinstance(meta, dict) and meta["ref"] == f"{name}@1" and meta["model"] == "echo"
    assert re.fullmatch(r"[0-9a-f]{32}", meta["trace_id"])
    assert streamed_text(lines) == "echo: Say hi"
    assert len([line for line in lines if "text" in line]) > 1, "the answer arrives in pieces"
    assert lines[-1] == {"done": True}

    # Another model: the version is rendered here and sent to it.
    other = client.post(
        "/playground/run",
        data={
            "csrf_token": token,
            "prompt": name,
            "ref": "1",
            "model": "up-echo-b",
            "var.thing": "x",
        },
    )
    other_lines = run_lines(other)
    assert other_lines[0]["meta"] == {**meta, "model": "up-echo-b", "trace_id": ANY}
    assert streamed_text(other_lines) == "echo: Say x"

    missing = client.post("/playground/run", data={"csrf_token": token, "prompt": name, "ref": "1"})
    assert missing.status_code == 400
    assert "Missing variable 'thing'" in str(run_lines(missing)[0]["error"])
    unknown = client.post("/playground/run", data={"csrf_token": token, "prompt": name, "ref": "9"})
    assert unknown.status_code == 404 and "no version 9" in unknown.text
    nomodel = client.post(
        "/playground/run",
        data={"csrf_token": token, "prompt": name, "ref": "1", "model": "nope", "var.thing": "x"},
    )
    assert nomodel.status_code == 404 and "does not exist" in nomodel.text
    assert client.post("/playground/run", data={"prompt": name}).status_code == 403

    # Save an edit as version 2; it keeps the model and parameters of the version it started from.
    unsent = client.post(
        "/playground/save",
        data={"csrf_token": token, "prompt": name, "base": "1", "role.0": "system",
              "content.0": "You are kind.", "role.1": "user", "content.1": "Say {{ thing }}!"},
    )  # fmt: skip
    assert unsent.status_code == 400 and "commit message" in unsent.text
    assert "You are kind." in unsent.text, "the editor keeps the edit"
    saved = client.post(
        "/playground/save",
        data={"csrf_token": token, "prompt": name, "base": "1", "role.0": "system",
              "content.0": "You are kind.", "role.1": "user", "content.1": "Say {{ thing }}!",
              "message": "kinder"},
    )  # fmt: skip
    assert saved.status_code == 303
    assert saved.headers["location"] == f"/playground?prompt={name}&a=2&saved=2"
    shown = client.get(saved.headers["location"])
    assert 'id="playground-saved"' in shown.text

    compare = client.get("/playground", params={"prompt": name, "a": "2", "b": "1"})
    assert compare.text.count("data-run-column=") == 2
    fragment = client.get(
        "/playground",
        params={"prompt": name, "a": "2", "b": "1"},
        headers={"HX-Request": "true", "HX-Target": "playground"},
    )
    assert "<html" not in fragment.text and 'data-run-column="b"' in fragment.text
    run2 = client.post(
        "/playground/run",
        data={"csrf_token": token, "prompt": name, "ref": "2", "var.thing": "yo"},
    )
    assert streamed_text(run_lines(run2)) == "echo: Say yo!"

    versions = api.get(f"/api/prompts/{name}/versions")
    assert versions.status_code == 200
    v2 = versions.json()["data"][0]
    assert v2["version"] == 2 and v2["model"] == "echo"
    assert v2["params"] == {"temperature": 0.5, "max_tokens": 50}

    diff = client.get(
        f"/prompts/{name}",
        params={"from": "1", "to": "2"},
        headers={"HX-Request": "true", "HX-Target": "prompt-diff"},
    )
    assert diff.status_code == 200 and "<html" not in diff.text
    assert 'class="diff-line diff-add">+Say {{ thing }}!' in diff.text
    assert 'class="diff-line diff-del">-You are terse.' in diff.text


def test_playground_types_variables_by_schema(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, token = admin_ui
    name = unique("ui-typed")
    created = api.post(
        "/api/prompts",
        json={
            "name": name,
            "template": "Count {{ n + 1 }} {{ unit }}",
            "model": "echo",
            "variables": {
                "type": "object",
                "properties": {
                    "n": {"type": "integer"},
                    "unit": {"type": "string", "enum": ["apples", "pears"], "default": "pears"},
                },
                "required": ["n"],
                "additionalProperties": False,
            },
        },
    )
    assert created.status_code == 201, created.text
    page = client.get("/playground", params={"prompt": name})
    assert 'type="number"' in page.text and '<option value="apples"' in page.text

    def run(**variables: str) -> httpx.Response:
        data = {"csrf_token": token, "prompt": name, "ref": "latest"}
        data.update({f"var.{k}": v for k, v in variables.items()})
        return client.post("/playground/run", data=data)

    assert streamed_text(run_lines(run(n="2"))) == "echo: Count 3 pears"
    assert streamed_text(run_lines(run(n="2", unit="apples"))) == "echo: Count 3 apples"
    wrong = run(n="two")
    assert wrong.status_code == 400 and "must be a whole number" in wrong.text


def test_labels_approvals_and_four_eyes(
    server: RunningServer, admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, token = admin_ui
    name = unique("ui-label")
    assert create_prompt(client, token, name).status_code == 303

    moved = client.post(
        f"/prompts/{name}/labels", data={"csrf_token": token, "label": "staging", "version": "1"}
    )
    assert moved.status_code == 303
    page = client.get(moved.headers["location"])
    assert "Moved the &#39;staging&#39; label to v1." in page.text
    assert '<tr data-label="staging">' in page.text

    unconfirmed = client.post(
        f"/prompts/{name}/labels", data={"csrf_token": token, "label": "production", "version": "1"}
    )
    assert unconfirmed.status_code == 400 and "tick the confirmation box" in unconfirmed.text
    bad = client.post(
        f"/prompts/{name}/labels", data={"csrf_token": token, "label": "Bad Label", "version": "1"}
    )
    assert bad.status_code == 400 and "is not a valid label" in bad.text

    requested = client.post(
        f"/prompts/{name}/labels",
        data={"csrf_token": token, "label": "production", "version": "1", "confirm": "yes"},
    )
    assert requested.status_code == 303
    page = client.get(requested.headers["location"])
    assert 'id="approval-requested"' in page.text and "pending" in page.text
    twice = client.post(
        f"/prompts/{name}/labels",
        data={"csrf_token": token, "label": "production", "version": "1", "confirm": "yes"},
    )
    assert twice.status_code == 409 and "already pending" in twice.text

    approvals = client.get("/approvals")
    match = re.search(rf'data-approval="([0-9a-f]+)" data-prompt="{name}"', approvals.text)
    assert match, approvals.text
    approval_id = match.group(1)

    # Four eyes: the author (the admin key) cannot approve its own version.
    own = client.post(f"/approvals/{approval_id}/approve", data={"csrf_token": token})
    assert own.status_code == 403
    assert 'data-code="four_eyes"' in own.text
    assert "The author of a version cannot approve it" in own.text

    reviewer = make_key(api, "reviewer")
    with ui_session(server, reviewer) as (other, other_token):
        assert 'href="/prompts"' in other.get("/approvals").text
        # A reviewer cannot create prompts or run them: the forms are not offered.
        assert 'id="new-prompt-form"' not in other.get("/prompts").text
        assert 'id="run-disabled"' in other.get("/playground", params={"prompt": name}).text
        assert other.post(
            "/playground/run", data={"csrf_token": other_token, "prompt": name}
        ).status_code == 403  # fmt: skip
        approved = other.post(
            f"/approvals/{approval_id}/approve",
            data={"csrf_token": other_token, "comment": "looks good"},
        )
        assert approved.status_code == 303
        done = other.get(approved.headers["location"])
        assert f"Approved: {name}@1" in done.text
        again = other.post(f"/approvals/{approval_id}/reject", data={"csrf_token": other_token})
        assert again.status_code == 409 and "already approved" in again.text

    label = api.get(f"/api/prompts/{name}", params={"label": "production"})
    assert label.status_code == 200 and label.json()["version"] == 1
    history = client.get(f"/prompts/{name}").text
    assert '<tr data-label="production">' in history


def test_text_prompt_edit_and_a_stream_cut_midway(admin_ui: tuple[httpx.Client, str]) -> None:
    client, token = admin_ui
    name = unique("ui-text")
    created = create_prompt(client, token, name, kind="text", text="Echo {{ word }}", model="")
    assert created.status_code == 303
    page = client.get("/playground", params={"prompt": name})
    assert 'name="template"' in page.text and "the version's (default)" in page.text

    saved = client.post(
        "/playground/save",
        data={"csrf_token": token, "prompt": name, "base": "1", "model": "echo",
              "template": "Echo {{ word }} twice", "message": "twice, on echo"},
    )  # fmt: skip
    assert saved.status_code == 303
    run = client.post(
        "/playground/run",
        data={"csrf_token": token, "prompt": name, "ref": "latest", "var.word": "hey"},
    )
    lines = run_lines(run)
    assert lines[0]["meta"] == {"ref": f"{name}@2", "model": "echo", "trace_id": ANY}
    assert streamed_text(lines) == "echo: Echo hey twice"

    routed = client.post(
        "/playground/run",
        data={"csrf_token": token, "prompt": name, "model": "greeter-route", "var.word": "a"},
    )
    assert routed.status_code == 400 and "not a prompt" in routed.text

    # Tokens already reached the page when the upstream cut the stream: the error follows them.
    cut = client.post(
        "/playground/run",
        data={"csrf_token": token, "prompt": name, "ref": "2", "model": "cut", "var.word": "a b"},
    )
    assert cut.status_code == 200
    cut_lines = run_lines(cut)
    assert streamed_text(cut_lines)
    assert "failed mid-stream" in str(cut_lines[-1].get("error"))
    assert {"done": True} not in cut_lines
