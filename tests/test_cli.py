"""The ``flywheel`` command against the running server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path)}
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
    assert key.encode() not in (tmp_path / "flywheel.db").read_bytes()  # stored hashed


def test_projects_users_and_project_keys_on_the_local_database(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(tmp_path),
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
