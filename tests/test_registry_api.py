"""The model registry through the running server: register uploaded versions, aliases,
production through the approval workflow (four eyes), cards, lineage, and the refusals."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
import yaml

from flywheel.sdk import Client, FlywheelError
from tests.conftest import RunningServer
from tests.test_access import _key_client, _project_with_key


def _files(names: dict[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, data)) for name, data in names.items()]


FAKE_ADAPTER = {
    "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
    "adapter_model.safetensors": b"\0" * 2048,
}
FAKE_BASE = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\1" * 4096}


@pytest.fixture(scope="module")
def project(server: RunningServer) -> tuple[str, str]:
    return _project_with_key(server, f"reg-{secrets.token_hex(3)}")


def test_versions_aliases_card_and_lineage(server: RunningServer, project) -> None:
    name, key = project
    with _key_client(server, key) as api:
        created = api.post(
            "/api/registry",
            json={"name": "support-bot", "license": "apache-2.0", "intended_use": "Support."},
        )
        assert created.status_code == 201, created.text
        assert api.post("/api/registry", json={"name": "support-bot"}).status_code == 409
        base = api.post(
            "/api/registry/support-bot/versions",
            files=_files(FAKE_BASE),
            data={"kind": "base", "format": "safetensors"},
        )
        assert base.status_code == 201, base.text
        assert base.json()["version"] == 1 and base.json()["size_bytes"] == 4096 + 23
        adapter = api.post(
            "/api/registry/support-bot/versions",
            files=_files(FAKE_ADAPTER),
            data={"kind": "adapter", "format": "peft", "parent": "support-bot@1"},
        )
        assert adapter.status_code == 201, adapter.text
        # An adapter needs a parent; a path may not climb out of the version's folder.
        orphan = api.post(
            "/api/registry/support-bot/versions",
            files=_files(FAKE_ADAPTER),
            data={"kind": "adapter", "format": "peft"},
        )
        assert orphan.status_code == 400
        escape = api.post(
            "/api/registry/support-bot/versions",
            files=[("files", ("../evil.json", b"{}"))],
            data={"kind": "base"},
        )
        assert escape.status_code == 400 and "Invalid file name" in escape.text

        model = api.get("/api/registry/support-bot").json()
        assert [v["version"] for v in model["versions"]] == [2, 1]
        assert api.get("/api/registry").json()["data"][0]["name"] == "support-bot"

        staged = api.put("/api/registry/support-bot/aliases/staging", json={"version": 2})
        assert staged.status_code == 200, staged.text
        assert api.get("/api/registry/support-bot/versions/staging").json()["version"] == 2
        history = api.get("/api/registry/support-bot/aliases").json()["data"]
        assert history[0]["label"] == "staging" and history[0]["to_version"] == 2

        card = api.get("/api/registry/support-bot/versions/2/card")
        assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown")
        front = yaml.safe_load(card.text.split("---")[1])
        assert front["license"] == "apache-2.0"
        assert "Limitations" in card.text and "not stated" in card.text

        lineage = api.get("/api/registry/support-bot/versions/2/lineage").json()
        kinds = {node["type"] for node in lineage["nodes"]}
        assert "model_version" in kinds
        assert any(edge["relation"] for edge in lineage["edges"])

        # An adapter is not servable on its own, and serving is for instance admins.
        refused = api.post(
            "/api/registry/support-bot/versions/2/serve", json={"route": "bot-route"}
        )
        assert refused.status_code == 403
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.admin_key}", "X-Flywheel-Project": name},
        timeout=60,
    ) as admin:
        adapter_serve = admin.post(
            "/api/registry/support-bot/versions/2/serve", json={"route": "bot-route"}
        )
        assert adapter_serve.status_code == 400, adapter_serve.text
        assert adapter_serve.json()["error"]["code"] == "not_servable"


def test_production_alias_needs_an_approval_from_someone_else(
    server: RunningServer, project
) -> None:
    _, key = project
    with _key_client(server, key) as api:
        api.post("/api/registry", json={"name": "gated"})
        api.post("/api/registry/gated/versions", files=_files(FAKE_BASE), data={"kind": "base"})
        direct = api.put("/api/registry/gated/aliases/production", json={"version": 1})
        assert direct.status_code == 409
        assert direct.json()["error"]["code"] == "approval_required"
        request = api.post(
            "/api/approvals", json={"resource_type": "model", "name": "gated", "version": 1}
        )
        assert request.status_code == 201, request.text
        # No eval suite targets the model, so the gate does not block.
        assert request.json()["gate"]["status"] == "not_configured"
        own = api.post(f"/api/approvals/{request.json()['id']}/approve")
        assert own.status_code == 403 and own.json()["error"]["code"] == "four_eyes"
        reviewer_key = api.post(
            "/api/keys", json={"name": "reviewer", "role": "reviewer", "scope": "admin"}
        ).json()["key"]
    with _key_client(server, reviewer_key) as reviewer:
        approved = reviewer.post(f"/api/approvals/{request.json()['id']}/approve")
        assert approved.status_code == 200, approved.text
    with _key_client(server, key) as api:
        assert api.get("/api/registry/gated/versions/production").json()["version"] == 1


def test_sdk_and_isolation(server: RunningServer, project, tmp_path: Path) -> None:
    _, key = project
    folder = tmp_path / "weights"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "sub" / "model.safetensors").write_bytes(b"\2" * 100)
    client = Client(server.base_url, key)
    client.models.create("sdk-model", description="made by the SDK")
    version = client.models.register("sdk-model", folder)
    assert version["version"] == 1
    assert client.models.version("sdk-model@1")["size_bytes"] == 123
    assert "sdk-model" in client.models.card("sdk-model@1")
    with pytest.raises(FlywheelError) as missing:
        client.models.version("sdk-model@9")
    assert missing.value.status_code == 404

    _, other_key = _project_with_key(server, f"reg-other-{secrets.token_hex(3)}")
    with _key_client(server, other_key) as other:
        assert other.get("/api/registry").json()["data"] == []
        assert other.get("/api/registry/sdk-model").status_code == 404
        assert other.get("/api/registry/sdk-model/versions/1/card").status_code == 404
        # The same name is free in another project.
        assert other.post("/api/registry", json={"name": "sdk-model"}).status_code == 201
