"""Config as code: ``/api/config`` plan, apply and export, on real servers.

The round trip that matters: export a project's state from one server, apply it to a
server on an empty home, and export the same YAML back.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest
import yaml

from .conftest import RunningServer, start_server, stop_server

FRESH_CONFIG = """
providers:
  local: {type: local}
models:
  - {name: smollm2-135m-instruct, provider: local, source: "builtin:smollm2"}
routes:
  - name: default
    targets: [{model: smollm2-135m-instruct}]
"""


def _admin(server: RunningServer, project: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    if project:
        headers["X-Flywheel-Project"] = project
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A second server on an empty home that never loads a model."""
    running = start_server(
        tmp_path_factory.mktemp("fresh-home"),
        FRESH_CONFIG,
        "fw-fresh-" + secrets.token_hex(16),
        extra_env={"FLYWHEEL_PRELOAD_MODELS": "false"},
        ready_path="/healthz",
    )
    yield running
    stop_server(running)


def _apply(client: httpx.Client, text: str, **extra: object) -> httpx.Response:
    return client.post("/api/config/apply", json={"yaml": text, **extra})


def test_export_then_apply_on_an_empty_home_reproduces_the_state(server, fresh) -> None:
    project = f"gitops-{secrets.token_hex(3)}"
    with _admin(server) as admin:
        assert admin.post("/api/projects", json={"name": project}).status_code == 201
    with _admin(server, project) as source:
        for text in ("Hello {{ name }}", "Hi {{ name }}!"):
            response = source.post(
                "/api/prompts",
                json={"name": "hello", "template": text, "model": "echo", "message": "m"},
            )
            assert response.status_code == 201
        source.put("/api/prompts/hello/labels/staging", json={"version": 2})
        source.post(
            "/api/prompts", json={"name": "sys", "template": [{"role": "system", "content": "x"}]}
        )
        exported = source.get("/api/config/export")
        assert exported.status_code == 200
        document = yaml.safe_load(exported.text)
        assert [m["name"] for m in document["models"]][:2] == [
            "smollm2-135m-instruct",
            "all-minilm-l6-v2",
        ]
        assert "api_key" not in exported.text  # the inline upstream key never leaves
        hello = next(p for p in document["prompts"] if p["name"] == "hello")
        assert len(hello["versions"]) == 2 and hello["labels"] == {"staging": 2}

    with _admin(fresh) as target:
        plan = target.post("/api/config/plan", json={"yaml": exported.text}).json()["changes"]
        actions = {(c["kind"], c["name"]): c["action"] for c in plan}
        assert actions[("route", "echo")] == "create"
        assert actions[("route", "default")] == "unchanged"
        assert actions[("prompt", "hello")] == "create"
        assert actions[("label", "hello:staging")] == "update"

        applied = _apply(target, exported.text)
        assert applied.status_code == 200, applied.text
        revision = applied.json()["revision"]
        assert target.get("/api/config/export").text == exported.text
        # The new routes serve at once, without a restart.
        names = [m["id"] for m in target.get("/v1/models").json()["data"]]
        assert "echo" in names and "greeter-route" in names

        again = _apply(target, exported.text).json()
        assert again["revision"] == revision  # idempotent: no new revision
        assert {c["action"] for c in again["changes"]} == {"unchanged"}


def test_inline_form_makes_a_version_only_when_content_changes(fresh) -> None:
    name = f"inline-{secrets.token_hex(3)}"
    text = f"""
prompts:
  - name: {name}
    template: "Summarise: {{{{ text }}}}"
    params: {{temperature: 0.1}}
    labels: [staging]
"""
    with _admin(fresh) as admin:
        first = _apply(admin, text).json()["changes"]
        assert {"kind": "prompt", "name": name, "action": "create", "detail": "new v1"} in first
        assert _apply(admin, text).json()["changes"][0]["action"] == "unchanged"
        changed = text.replace("0.1", "0.3")
        plan = admin.post("/api/config/plan", json={"yaml": changed}).json()["changes"]
        assert plan[0] == {"kind": "prompt", "name": name, "action": "update", "detail": "new v2"}
        assert plan[1]["action"] == "update" and plan[1]["detail"] == "→ v2"
        _apply(admin, changed)
        current = admin.get(f"/api/prompts/{name}", params={"label": "staging"}).json()
        assert current["version"] == 2 and current["params"] == {"temperature": 0.3}


def test_production_labels_in_a_file_go_through_approval(fresh) -> None:
    name = f"prod-{secrets.token_hex(3)}"
    text = f"prompts:\n  - name: {name}\n    template: hi\n    labels: [production]\n"
    with _admin(fresh) as admin:
        result = _apply(admin, text).json()
        assert len(result["approvals"]) == 1
        approval = admin.get(f"/api/approvals/{result['approvals'][0]}").json()
        assert approval["status"] == "pending" and approval["name"] == name
        assert admin.get(f"/api/prompts/{name}", params={"label": "production"}).status_code == 404
        # An instance admin may bypass explicitly; it is audited as such.
        bypassed = _apply(admin, text, bypass_approvals=True).json()
        assert bypassed["approvals"] == []
        moved = admin.get(f"/api/prompts/{name}/labels").json()["data"][0]
        assert moved["approval_id"] == "bypass"


def test_bad_files_name_the_line_and_non_admins_cannot_touch_the_catalog(server) -> None:
    with _admin(server) as admin:
        broken = admin.post(
            "/api/config/plan",
            json={
                "yaml": "routes:\n  - name: x\n    targets: [{model: nope}]\n",
                "filename": "f.yaml",
            },
        )
        assert broken.status_code == 400
        assert "f.yaml:3" in broken.json()["error"]["message"]
        assert "unknown model 'nope'" in broken.json()["error"]["message"]
        syntax = admin.post("/api/config/plan", json={"yaml": "routes: [\n", "filename": "g.yaml"})
        assert syntax.status_code == 400 and "g.yaml:" in syntax.json()["error"]["message"]
        project = f"gitops-dev-{secrets.token_hex(3)}"
        admin.post("/api/projects", json={"name": project})
    with _admin(server, project) as admin:
        key = admin.post(
            "/api/keys", json={"name": "dev", "role": "developer", "scope": "admin"}
        ).json()["key"]
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as dev:
        refused = _apply(dev, "routes: []\n")
        assert refused.status_code == 403
        assert _apply(dev, "prompts:\n  - {name: mine, template: hello}\n").status_code == 200
        assert _apply(dev, "prompts: []\n", bypass_approvals=True).status_code == 403
