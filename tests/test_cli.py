"""The ``flywheel`` command against the running server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import database_files, new_database_url

FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def _run(server, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FLYWHEEL_BASE_URL": server.base_url,
        "FLYWHEEL_API_KEY": key or server.admin_key,
        "COLUMNS": "200",
    }
    return subprocess.run([FLYWHEEL, *args], capture_output=True, text=True, env=env, timeout=120)


def test_version() -> None:
    result = subprocess.run([FLYWHEEL, "version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "flywheel 0.1.0"


def test_chat_streams_an_answer(server) -> None:
    result = _run(server, "chat", "knock knock", "--model", "echo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "echo: knock knock"


def test_chat_with_the_local_model(server) -> None:
    result = _run(
        server, "chat", "What is the capital of France?", "--max-tokens", "16", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_errors_are_clear(server) -> None:
    result = _run(server, "chat", "hi", "--model", "no-such-route")
    assert result.returncode == 1
    assert "404" in result.stderr and "no-such-route" in result.stderr
    result = _run(server, "chat", "hi", key="fw-wrong")
    assert result.returncode == 1 and "401" in result.stderr


def test_traces_table(server) -> None:
    _run(server, "chat", "for the table", "--model", "echo")
    result = _run(server, "traces", "--route", "echo", "--limit", "5")
    assert result.returncode == 0, result.stderr
    assert "echo" in result.stdout and "up-echo" in result.stdout


def test_routes_table(server) -> None:
    result = _run(server, "routes")
    assert result.returncode == 0, result.stderr
    assert "fallback-500" in result.stdout and "up-echo" in result.stdout
    assert "balanced" in result.stdout and "up-echo (3)" in result.stdout


def test_keys_create_works_on_the_local_database(tmp_path: Path) -> None:
    url = new_database_url(tmp_path)
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_DATABASE_URL": url}
    result = subprocess.run(
        [FLYWHEEL, "keys", "create", "--name", "ci"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("fw-")
    listing = subprocess.run(
        [FLYWHEEL, "keys", "list"], capture_output=True, text=True, env={**env, "COLUMNS": "200"}
    )
    assert "ci" in listing.stdout and key not in listing.stdout  # only the prefix is shown
    stored = b"".join(path.read_bytes() for path in database_files(url))
    assert key[:10].encode() in stored  # the scan sees the key's row: its prefix is kept
    assert key.encode() not in stored  # stored hashed


def test_projects_users_and_project_keys_on_the_local_database(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(tmp_path),
        "FLYWHEEL_DATABASE_URL": new_database_url(tmp_path),
        "FLYWHEEL_NEW_PASSWORD": "a long enough password",
        "COLUMNS": "200",
    }

    def flywheel(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FLYWHEEL, *args], capture_output=True, text=True, env=env)

    assert flywheel("projects", "create", "demo").returncode == 0
    assert flywheel("users", "create", "dana").returncode == 0
    assert flywheel("users", "grant", "dana", "demo", "developer").returncode == 0
    created = flywheel("keys", "create", "--project", "demo", "--role", "viewer", "--allow", "x")
    assert created.returncode == 0, created.stderr
    listing = flywheel("keys", "list").stdout
    assert "demo" in listing and "viewer" in listing
    assert "demo" in flywheel("projects", "list").stdout
    missing = flywheel("users", "grant", "dana", "nope", "viewer")
    assert missing.returncode == 1 and "No project 'nope'" in missing.stderr
    verified = flywheel("audit", "verify")
    assert verified.returncode == 0 and "4 entries" in verified.stdout


def test_prompts_commands_round_trip(server, tmp_path: Path) -> None:
    import secrets

    name = f"cli-{secrets.token_hex(3)}"
    chat = tmp_path / "chat.yaml"
    chat.write_text(
        "- {role: system, content: 'Be brief.'}\n- {role: user, content: 'Hi {{ who }}'}\n"
    )
    created = _run(
        server, "prompts", "create", name, "-f", str(chat), "--model", "echo", "-m", "v1"
    )
    assert created.returncode == 0, created.stderr
    assert f"{name} v1 created" in created.stdout
    second = _run(server, "prompts", "create", name, "-t", "Hello {{ who }}", "-l", "staging")
    assert second.returncode == 0, second.stderr
    listed = _run(server, "prompts", "list")
    assert name in listed.stdout and "staging→v2" in listed.stdout
    shown = _run(server, "prompts", "show", f"{name}@1")
    assert "Be brief." in shown.stdout and "model: echo" in shown.stdout
    rendered = _run(server, "prompts", "render", f"{name}@staging", "--var", "who=Ada")
    assert rendered.returncode == 0 and "Hello Ada" in rendered.stdout
    missing = _run(server, "prompts", "render", f"{name}@staging")
    assert missing.returncode == 1 and "Missing variable 'who'" in missing.stderr
    diff = _run(server, "prompts", "diff", name, "1", "2")
    assert "+Hello {{ who }}" in diff.stdout and "model: 'echo' -> None" in diff.stdout
    refused = _run(server, "prompts", "label", name, "production", "2")
    assert refused.returncode == 1 and "approval" in refused.stderr
    requested = _run(server, "prompts", "label", name, "production", "2", "--request")
    assert requested.returncode == 0 and "requested" in requested.stdout


def test_apply_prints_a_plan_and_export_writes_yaml(server, tmp_path: Path) -> None:
    import secrets

    import yaml

    name = f"gitops-cli-{secrets.token_hex(3)}"
    config = tmp_path / "flywheel.yaml"
    config.write_text(f"prompts:\n  - name: {name}\n    template: 'Hi {{{{ x }}}}'\n")
    dry = _run(server, "apply", "-f", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"create prompt {name}" in dry.stdout and "nothing applied" in dry.stdout
    applied = _run(server, "apply", "-f", str(config))
    assert applied.returncode == 0 and "1 created" in applied.stdout
    again = _run(server, "apply", "-f", str(config))
    assert f"unchanged prompt {name}" in again.stdout and "0 created" in again.stdout
    out = tmp_path / "export.yaml"
    exported = _run(server, "export", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    prompts = {p["name"]: p for p in yaml.safe_load(out.read_text())["prompts"]}
    assert prompts[name]["versions"][0]["template"] == "Hi {{ x }}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("routes:\n  - name: r\n    targets: [{model: nope}]\n")
    failed = _run(server, "apply", "-f", str(bad))
    assert failed.returncode == 1 and f"{bad}:3" in failed.stderr and "nope" in failed.stderr


def test_rotating_the_master_key_keeps_secrets_readable(tmp_path: Path) -> None:
    from flywheel.security.secrets import SecretBox, SecretStore, load_master_key
    from flywheel.store import Database

    url = new_database_url(tmp_path)
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_DATABASE_URL": url}
    env.pop("FLYWHEEL_MASTER_KEY", None)
    db = Database(url)
    db.migrate()
    old_key = load_master_key(tmp_path, None)
    SecretStore(db, SecretBox(old_key)).set("default", "provider-key", "sk-rotate-me-123456")
    result = subprocess.run(
        [FLYWHEEL, "secrets", "rotate-master-key"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "1 secrets re-encrypted" in result.stdout
    new_key = load_master_key(tmp_path, None)
    assert new_key != old_key
    assert (tmp_path / "master.key").stat().st_mode & 0o777 == 0o600
    assert SecretStore(db, SecretBox(new_key)).reveal("default", "provider-key") == (
        "sk-rotate-me-123456"
    )
    verified = subprocess.run(
        [FLYWHEEL, "audit", "verify"], capture_output=True, text=True, env=env
    )
    assert verified.returncode == 0, verified.stdout
    db.dispose()
