"""``flywheel jobs``, ``flywheel runs``, ``flywheel models`` and ``flywheel tune`` against the
running server."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

from tests.test_access import _project_with_key
from tests.test_cli import _run


@pytest.fixture(scope="module")
def key(server) -> str:
    return _project_with_key(server, f"cli-jobs-{secrets.token_hex(3)}")[1]


def test_job_commands(server, key) -> None:
    from flywheel.sdk import Client

    client = Client(server.base_url, key)
    job = client.jobs.submit("test.count", {"steps": 3, "fail_at": 3})
    client.jobs.wait(job["id"], timeout=120, poll=0.2)

    listed = _run(server, "jobs", "list", key=key)
    assert listed.returncode == 0, listed.stderr
    assert job["id"][:12] in listed.stdout and "failed" in listed.stdout
    logs = _run(server, "jobs", "logs", job["id"], key=key)
    assert "step 2 of 3" in logs.stdout and "told to fail at step 3" in logs.stdout

    # A retry followed to its end: the CLI exits non-zero because the job failed again.
    retried = _run(server, "jobs", "retry", job["id"], "--wait", key=key)
    assert retried.returncode == 1
    assert "attempt 2" in retried.stdout and "failed" in retried.stdout
    finished = _run(server, "jobs", "cancel", job["id"], key=key)
    assert finished.returncode == 1 and "already failed" in finished.stderr


def test_tune_refuses_bad_settings_with_the_field(server, key) -> None:
    bad = _run(server, "tune", "sft", "--dataset", "nothing@1", "--lr", "-1", key=key)
    assert bad.returncode == 1
    assert "params.settings.learning_rate" in bad.stderr
    no_dataset = _run(server, "tune", "sft", "--dataset", "nothing@1", "--no-wait", key=key)
    # The dataset is read when the job runs: the submission itself is accepted.
    assert no_dataset.returncode == 0 and "queued (tune.sft)" in no_dataset.stdout
    job_id = re.search(r"job ([0-9a-f]{32})", no_dataset.stdout).group(1)
    shown = _run(server, "jobs", "logs", job_id, "--follow", key=key)
    assert shown.returncode == 0
    assert "No dataset 'nothing'" in _run(server, "jobs", "show", job_id, key=key).stdout


def test_model_commands(server, key, tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    registered = _run(server, "models", "register", "cli-model", str(folder), key=key)
    assert registered.returncode == 0, registered.stderr
    assert "registered cli-model@1 (87 bytes)" in registered.stdout
    assert "cli-model" in _run(server, "models", "list", key=key).stdout
    shown = _run(server, "models", "show", "cli-model", key=key)
    assert "base" in shown.stdout and "safetensors" in shown.stdout
    alias = _run(server, "models", "alias", "cli-model", "staging", "1", key=key)
    assert alias.returncode == 0 and "cli-model@staging → 1" in alias.stdout
    card = _run(server, "models", "card", "cli-model@staging", key=key)
    assert card.stdout.startswith("---") and "# cli-model" in card.stdout
    refused = _run(server, "models", "alias", "cli-model", "production", "1", key=key)
    assert refused.returncode == 1 and "approval" in refused.stderr
