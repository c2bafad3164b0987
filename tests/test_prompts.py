"""The prompt registry through the HTTP API and the gateway, with the approval workflow.

Everything runs against the shared real server: prompts are created over HTTP, served by
label through the official openai SDK, and moved to ``production`` only by an approval.
"""

from __future__ import annotations

import secrets

import httpx
import openai
import pytest

from .conftest import RunningServer, wait_for_trace

GREETING = [
    {"role": "system", "content": "You greet people in {{ language }}."},
    {"role": "user", "content": "Say hello to {{ name }}."},
]


def _client(server: RunningServer, key: str, project: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"}
    if project:
        headers["X-Flywheel-Project"] = project
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def team(server: RunningServer) -> dict[str, str]:
    """A project with a developer key and a reviewer key (each its own identity)."""
    project = f"prompts-{secrets.token_hex(3)}"
    with _client(server, server.admin_key) as admin:
        assert admin.post("/api/projects", json={"name": project}).status_code == 201
    keys = {"project": project}
    with _client(server, server.admin_key, project) as admin:
        for role in ("developer", "reviewer", "viewer"):
            response = admin.post(
                "/api/keys", json={"name": f"{role} key", "role": role, "scope": "admin"}
            )
            assert response.status_code == 201, response.text
            keys[role] = response.json()["key"]
    return keys


def _create(client: httpx.Client, name: str, **fields: object) -> dict:
    response = client.post("/api/prompts", json={"name": name, "template": GREETING, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def test_versions_are_immutable_and_numbered_with_author(server, team) -> None:
    name = f"greet-{secrets.token_hex(3)}"
    with _client(server, team["developer"]) as dev:
        first = _create(dev, name, model="echo", params={"temperature": 0.2}, message="first")
        second = _create(dev, name, model="echo", params={"temperature": 0.7}, message="warmer")
        assert (first["version"], second["version"]) == (1, 2)
        assert first["author"] == "key:developer key" and first["message"] == "first"
        assert first["variables"]["required"] == ["language", "name"]
        assert dev.get(f"/api/prompts/{name}").json()["version"] == 2
        assert dev.get(f"/api/prompts/{name}", params={"version": 1}).json()["params"] == {
            "temperature": 0.2
        }
        versions = dev.get(f"/api/prompts/{name}/versions").json()["data"]
        assert [v["version"] for v in versions] == [2, 1]
        listed = {p["name"]: p for p in dev.get("/api/prompts").json()["data"]}
        assert listed[name]["latest_version"] == 2
        # There is no route that edits a version: the only way to change is a new version.
        assert dev.put(f"/api/prompts/{name}", json={}).status_code in (404, 405)


def test_diff_shows_template_and_param_changes(server, team) -> None:
    name = f"diff-{secrets.token_hex(3)}"
    with _client(server, team["developer"]) as dev:
        _create(dev, name, params={"temperature": 0.2})
        changed = [GREETING[0], {"role": "user", "content": "Say goodbye to {{ name }}."}]
        _create(dev, name, template=changed, params={"temperature": 0.9, "max_tokens": 20})
        diff = dev.get(f"/api/prompts/{name}/diff", params={"from": 1, "to": 2}).json()
    assert "-Say hello to {{ name }}." in diff["template"]
    assert "+Say goodbye to {{ name }}." in diff["template"]
    assert diff["changes"]["params.temperature"] == [0.2, 0.9]
    assert diff["changes"]["params.max_tokens"] == [None, 20]


def test_bad_templates_and_variables_are_clear_400s(server, team) -> None:
    name = f"bad-{secrets.token_hex(3)}"
    with _client(server, team["developer"]) as dev:
        escape = dev.post(
            "/api/prompts", json={"name": name, "template": "{{ ''.__class__.__mro__ }}"}
        )
        assert escape.status_code == 400
        assert escape.json()["error"]["code"] == "template_unsafe"
        syntax = dev.post("/api/prompts", json={"name": name, "template": "Hi {{ name "})
        assert syntax.status_code == 400
        assert syntax.json()["error"]["code"] == "template_syntax"
        params = dev.post(
            "/api/prompts", json={"name": name, "template": "x", "params": {"temperature": 9}}
        )
        assert params.status_code == 400 and "temperature" in params.json()["error"]["message"]
        _create(dev, name)
        missing = dev.post(f"/api/prompts/{name}/render", json={"variables": {"name": "Ada"}})
        assert missing.status_code == 400
        assert missing.json()["error"]["code"] == "missing_variable"
        assert "'language'" in missing.json()["error"]["message"]
        extra = dev.post(
            f"/api/prompts/{name}/render",
            json={"variables": {"name": "Ada", "language": "French", "mood": "happy"}},
        )
        assert extra.status_code == 400 and "'mood'" in extra.json()["error"]["message"]
        ok = dev.post(
            f"/api/prompts/{name}/render",
            json={"variables": {"name": "{{ 7*7 }}", "language": "French"}},
        )
        assert ok.status_code == 200
        assert ok.json()["messages"][1]["content"] == "Say hello to {{ 7*7 }}."
        # The gateway refuses the same way, naming the variable, before calling any model.
        call = dev.post(
            "/v1/chat/completions",
            json={"model": f"prompt:{name}", "variables": {"name": "Ada"}},
        )
        assert call.status_code == 400 and "'language'" in call.json()["error"]["message"]


def test_gateway_serves_a_prompt_by_label_through_the_openai_sdk(server, team) -> None:
    name = f"serve-{secrets.token_hex(3)}"
    with _client(server, team["developer"]) as dev:
        _create(dev, name, model="echo", params={"max_tokens": 50})
        assert (
            dev.put(f"/api/prompts/{name}/labels/staging", json={"version": 1}).status_code == 200
        )
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=team["developer"])
        reply = client.chat.completions.with_raw_response.create(
            model=f"prompt:{name}@staging",
            messages=[],
            extra_body={"variables": {"name": "Ada", "language": "French"}},
        )
        answer = reply.parse().choices[0].message.content
        assert answer == "echo: Say hello to Ada."
        trace = wait_for_trace(dev, reply.headers["x-flywheel-trace-id"])
        span = trace["spans"][0]
        assert span["attributes"]["flywheel.prompt.name"] == name
        assert span["attributes"]["flywheel.prompt.version"] == 1
        assert span["route"] == f"prompt:{name}@staging" and span["model"] == "up-echo"
        sent = span["input"]["messages"]
        assert sent[0] == {"role": "system", "content": "You greet people in French."}
        assert span["input"]["max_tokens"] == 50

        # A new version behind the label: the next call uses it, no code change.
        changed = [GREETING[0], {"role": "user", "content": "Say goodbye to {{ name }}."}]
        _create(dev, name, template=changed, model="echo")
        assert (
            dev.put(f"/api/prompts/{name}/labels/staging", json={"version": 2}).status_code == 200
        )
        stream = client.chat.completions.create(
            model=f"prompt:{name}@staging",
            messages=[],
            stream=True,
            extra_body={"variables": {"name": "Ada", "language": "French"}},
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "echo: Say goodbye to Ada."
        # Rollback is moving the label back; the move history shows both moves.
        dev.put(f"/api/prompts/{name}/labels/staging", json={"version": 1})
        history = dev.get(f"/api/prompts/{name}/labels").json()["data"]
        assert [(h["from_version"], h["to_version"]) for h in history] == [
            (2, 1),
            (1, 2),
            (None, 1),
        ]


def test_a_route_can_target_a_prompt(server, auth) -> None:
    # conftest's route "greeter-route" targets greeter@staging in the caller's project.
    with httpx.Client(base_url=server.base_url, headers=auth, timeout=60) as admin:
        if admin.get("/api/prompts/greeter").status_code == 404:
            _create(admin, "greeter", model="echo")
        admin.put("/api/prompts/greeter/labels/staging", json={"version": 1})
        response = admin.post(
            "/v1/chat/completions",
            json={"model": "greeter-route", "variables": {"name": "Bo", "language": "Danish"}},
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "echo: Say hello to Bo."
        trace = wait_for_trace(admin, response.headers["x-flywheel-trace-id"])
        assert trace["spans"][0]["route"] == "greeter-route"
        assert trace["spans"][0]["attributes"]["flywheel.prompt.ref"] == "greeter@staging"


def test_production_moves_only_by_four_eyes_approval(server, team) -> None:
    name = f"release-{secrets.token_hex(3)}"
    dev = _client(server, team["developer"])
    reviewer = _client(server, team["reviewer"])
    viewer = _client(server, team["viewer"])
    with dev, reviewer, viewer:
        _create(dev, name, model="echo")
        direct = dev.put(f"/api/prompts/{name}/labels/production", json={"version": 1})
        assert direct.status_code == 409
        assert direct.json()["error"]["code"] == "approval_required"
        assert viewer.post("/api/approvals", json={"name": name, "version": 1}).status_code == 403

        request = dev.post(
            "/api/approvals", json={"name": name, "version": 1, "comment": "ship it"}
        )
        assert request.status_code == 201, request.text
        approval = request.json()
        assert approval["status"] == "pending" and approval["label"] == "production"
        assert approval["gate"]["status"] == "not_configured"
        again = dev.post("/api/approvals", json={"name": name, "version": 1})
        assert again.status_code == 409

        # Nothing serves from production until the reviewer approves.
        call = {"model": f"prompt:{name}@production", "variables": {"name": "A", "language": "B"}}
        assert dev.post("/v1/chat/completions", json=call).status_code == 404

        # The developer's own admin-role identity is still the author: four-eyes refuses.
        self_approval = dev.post(f"/api/approvals/{approval['id']}/approve", json={})
        assert self_approval.status_code == 403  # developers lack approvals:decide
        with _client(server, server.admin_key, team["project"]) as admin:
            admin_version = _create(admin, name, model="echo")["version"]
            own = admin.post("/api/approvals", json={"name": name, "version": admin_version}).json()
            refused = admin.post(f"/api/approvals/{own['id']}/approve")
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "four_eyes"
            assert admin.post(f"/api/approvals/{own['id']}/reject").json()["status"] == "rejected"

        approved = reviewer.post(
            f"/api/approvals/{approval['id']}/approve", json={"comment": "looks good"}
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "approved"
        assert approved.json()["label_event"]["to_version"] == 1
        assert (
            dev.get(f"/api/prompts/{name}", params={"label": "production"}).json()["version"] == 1
        )
        assert dev.post("/v1/chat/completions", json=call).status_code == 200
        twice = reviewer.post(f"/api/approvals/{approval['id']}/approve")
        assert twice.status_code == 409

        history = dev.get(f"/api/prompts/{name}/labels").json()["data"]
        assert history[0]["approval_id"] == approval["id"]
        listed = reviewer.get("/api/approvals", params={"status": "approved"}).json()["data"]
        assert approval["id"] in [a["id"] for a in listed]

    with _client(server, server.admin_key, team["project"]) as admin:
        audit = admin.get("/api/audit", params={"limit": 200}).json()["data"]
        actions = [e["action"] for e in audit if name in (e.get("resource_id") or "")]
        for action in ("prompt.version.create", "approval.request", "approval.approve"):
            assert action in actions, actions
        assert "prompt.label.move" in [e["action"] for e in audit]
        assert admin.get("/api/audit/verify").json()["ok"] is True


def test_prompts_stay_in_their_project(server, team) -> None:
    name = f"private-{secrets.token_hex(3)}"
    with _client(server, team["developer"]) as dev:
        _create(dev, name, model="echo")
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=60,
    ) as other:  # the instance key acts in the default project
        assert other.get(f"/api/prompts/{name}").status_code == 404
        assert name not in [p["name"] for p in other.get("/api/prompts").json()["data"]]
        call = other.post(
            "/v1/chat/completions",
            json={"model": f"prompt:{name}", "variables": {"name": "A", "language": "B"}},
        )
        assert call.status_code == 404


def test_odd_version_selectors_are_400s_not_500s(server, team) -> None:
    with _client(server, team["developer"]) as dev:
        _create(dev, "odd", model="echo")
        variables = {"name": "A", "language": "B"}
        for ref in ("odd@²", "odd@99999999999999999999999", "odd@0"):
            call = dev.post(
                "/v1/chat/completions", json={"model": f"prompt:{ref}", "variables": variables}
            )
            assert call.status_code in (400, 404), (ref, call.text)
        huge = 10**22
        assert dev.get("/api/prompts/odd", params={"version": huge}).status_code == 400
        assert dev.put("/api/prompts/odd/labels/staging", json={"version": huge}).status_code == 400
        assert dev.post("/api/approvals", json={"name": "odd", "version": huge}).status_code == 400
        # Variables belong to prompt targets only.
        plain = dev.post(
            "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "x"}], "variables": {}},
        )
        assert plain.status_code == 400 and plain.json()["error"]["param"] == "variables"


def test_chat_template_diffs_keep_one_line_per_line(server, team) -> None:
    name = f"lines-{secrets.token_hex(3)}"
    with _client(server, team["developer"]) as dev:
        _create(dev, name, template=[{"role": "system", "content": "You are terse."}])
        _create(dev, name, template=[{"role": "system", "content": "You are kind."}])
        diff = dev.get(f"/api/prompts/{name}/diff", params={"from": 1, "to": 2}).json()
    lines = diff["template"].splitlines()
    assert "-You are terse." in lines and "+You are kind." in lines
