"""Jobs through the running server: real worker processes started by the supervisor, with
their logs, progress, cancel, retry, crash, timeout and orphan handling.

The ``test.count`` kind is a plugin (tests/plugins/slow_job.py) loaded through
``FLYWHEEL_PLUGINS`` by the server and by every job process, as any plugin would be.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import httpx
import pytest

from flywheel.sdk import Client
from tests.conftest import TEST_CONFIG, RunningServer, start_server, stop_server

FINISHED = {"succeeded", "failed", "cancelled", "orphaned"}


def wait_job(api: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["status"] in FINISHED:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


def wait_until(api: httpx.Client, job_id: str, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if predicate(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the state: {job}")


def full_log(api: httpx.Client, job_id: str) -> str:
    text, cursor = "", 0
    while True:
        chunk = api.get(f"/api/jobs/{job_id}/logs", params={"after": cursor}).json()
        text += chunk["text"]
        if chunk["next"] == cursor:
            return text
        cursor = chunk["next"]


def submit(api: httpx.Client, params: dict, kind: str = "test.count") -> dict:
    response = api.post("/api/jobs", json={"kind": kind, "params": params})
    assert response.status_code == 201, response.text
    return response.json()


def test_a_job_runs_in_its_own_process_with_log_and_progress(api: httpx.Client) -> None:
    job = submit(api, {"steps": 4})
    assert job["status"] == "queued" and job["attempt"] == 1
    done = wait_job(api, job["id"])
    assert done["status"] == "succeeded", done
    assert done["result"] == {"reached": 4}
    assert done["progress"] == 1.0
    # The worker is a process of its own, not the server.
    assert done["pid"] and done["pid"] != os.getpid()
    log = full_log(api, job["id"])
    assert "step 4 of 4" in log and "job ended: succeeded" in log
    assert job["id"] in {j["id"] for j in api.get("/api/jobs").json()["data"]}
    assert api.get("/api/jobs", params={"status": "succeeded"}).status_code == 200
    kinds = {k["name"] for k in api.get("/api/jobs/kinds").json()["data"]}
    assert {"test.count", "tune.sft", "tune.dpo", "merge", "quantize", "prune"} <= kinds


def test_bad_submissions_are_refused_before_anything_runs(api: httpx.Client) -> None:
    cases = [
        ({"kind": "test.count", "params": {"steps": 0}}, "params.steps"),
        ({"kind": "no.such.kind", "params": {}}, "kind"),
        ({"kind": "test.count", "params": {}, "executor": "mainframe"}, "executor"),
        ({"kind": "test.count", "params": {}, "executor": "ray"}, "executor"),
        (
            {"kind": "tune.sft", "params": {"dataset": "d@1", "settings": {"learning_rate": -1}}},
            "params.settings.learning_rate",
        ),
        ({"kind": "tune.sft", "params": {"dataset": "bad name!"}}, "params.dataset"),
        ({"kind": "quantize", "params": {"model": "m@1", "method": "int3"}}, "params.method"),
        # No Ray cluster configured here: more than one training worker is refused up front.
        (
            {"kind": "tune.sft", "params": {"dataset": "d@1", "num_workers": 2}},
            "params.num_workers",
        ),
    ]
    before = len(api.get("/api/jobs", params={"limit": 1000}).json()["data"])
    for body, param in cases:
        response = api.post("/api/jobs", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, response.json()
    assert api.get("/api/jobs/nope").status_code == 404
    assert len(api.get("/api/jobs", params={"limit": 1000}).json()["data"]) == before


def test_cancel_stops_a_running_job_and_retry_runs_it_again(api: httpx.Client) -> None:
    job = submit(api, {"steps": 100_000, "delay": 0.02})
    wait_until(api, job["id"], lambda j: j["status"] == "running" and j["progress"] > 0)
    cancelled = api.post(f"/api/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True
    done = wait_job(api, job["id"], timeout=30)
    assert done["status"] == "cancelled", done
    # It stopped well before the end; the worker's last words are in the log.
    assert done["result"] is None or done["result"]["reached"] < 100_000
    assert "cancel" in full_log(api, job["id"])
    again = api.post(f"/api/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"

    retried = api.post(f"/api/jobs/{job['id']}/retry")
    assert retried.status_code == 201, retried.text
    second = retried.json()
    assert second["retry_of"] == job["id"] and second["attempt"] == 2
    assert second["params"] == done["params"]
    api.post(f"/api/jobs/{second['id']}/cancel")
    assert wait_job(api, second["id"], timeout=30)["status"] == "cancelled"


def test_failures_crashes_and_timeouts_are_recorded(api: httpx.Client) -> None:
    failing = submit(api, {"steps": 5, "fail_at": 2})
    crashing = submit(api, {"steps": 5, "crash_at": 2})
    done = wait_job(api, failing["id"])
    assert done["status"] == "failed"
    assert done["error"] == "ValueError: told to fail at step 2"
    crashed = wait_job(api, crashing["id"])
    assert crashed["status"] == "failed"
    assert crashed["error"] == "the worker stopped unexpectedly (exit code 9)"
    # Only jobs that ended badly retry.
    ok = wait_job(api, submit(api, {"steps": 1})["id"])
    assert api.post(f"/api/jobs/{ok['id']}/retry").status_code == 409

    slow = submit(api, {"steps": 100_000, "delay": 0.02, "timeout": 2})
    timed_out = wait_job(api, slow["id"], timeout=60)
    assert timed_out["status"] == "failed" and timed_out["error"] == "timed out after 2s"


def test_sdk_follows_a_job_with_its_log(server: RunningServer) -> None:
    client = Client(server.base_url, server.admin_key)
    job = client.jobs.submit("test.count", {"steps": 3})
    seen: list[str] = []
    final = client.jobs.wait(job["id"], timeout=120, poll=0.2, on_log=seen.append)
    assert final["status"] == "succeeded"
    assert "step 3 of 3" in "".join(seen)
    assert client.jobs.get(job["id"])["result"] == {"reached": 3}


LONE_ENV = {"FLYWHEEL_PRELOAD_MODELS": "false", "FLYWHEEL_JOB_ORPHAN_AFTER": "600"}


@pytest.fixture
def lone_server(tmp_path: Path, upstream) -> RunningServer:
    """A server of its own (no model preloading) that a test may kill."""
    home = tmp_path / "home"
    running = start_server(
        home,
        TEST_CONFIG.format(upstream=upstream.base_url),
        "fw-test-" + secrets.token_hex(16),
        extra_env=LONE_ENV,
        ready_path="/healthz",
        timeout=120,
    )
    yield running
    stop_server(running)


def test_a_job_whose_server_and_worker_died_is_marked_orphaned(
    lone_server: RunningServer, upstream
) -> None:
    headers = {"Authorization": f"Bearer {lone_server.admin_key}"}
    with httpx.Client(base_url=lone_server.base_url, headers=headers, timeout=60) as api:
        job = submit(api, {"steps": 100_000, "delay": 0.05})
        running = wait_until(api, job["id"], lambda j: j["status"] == "running" and j["pid"])
    # Kill -9 the server and the job's whole process group: nobody records the end.
    lone_server.process.kill()
    lone_server.process.wait(30)
    os.killpg(running["pid"], signal.SIGKILL)
    time.sleep(0.5)
    restarted = start_server(
        lone_server.home,
        TEST_CONFIG.format(upstream=upstream.base_url),
        lone_server.admin_key,
        extra_env=LONE_ENV,
        ready_path="/healthz",
        timeout=120,
    )
    lone_server.process = restarted.process
    with httpx.Client(base_url=restarted.base_url, headers=headers, timeout=60) as api:
        found = wait_until(api, job["id"], lambda j: j["status"] != "running", timeout=30)
        assert found["status"] == "orphaned", found
        assert "killed" in found["error"]
        assert "orphaned" in full_log(api, job["id"])
        # An orphan can be retried, and the retry runs to the end.
        retried = api.post(f"/api/jobs/{job['id']}/retry").json()
        api.post(f"/api/jobs/{retried['id']}/cancel")
        assert wait_job(api, retried["id"])["status"] == "cancelled"


def test_jobs_and_runs_stay_in_their_project(server: RunningServer, api: httpx.Client) -> None:
    from tests.test_access import _key_client, _project_with_key

    job = wait_job(api, submit(api, {"steps": 1})["id"])
    _, key = _project_with_key(server, f"jobs-iso-{secrets.token_hex(3)}")
    with _key_client(server, key) as other:
        assert job["id"] not in {j["id"] for j in other.get("/api/jobs").json()["data"]}
        assert other.get(f"/api/jobs/{job['id']}").status_code == 404
        assert other.get(f"/api/jobs/{job['id']}/logs").status_code == 404
        assert other.post(f"/api/jobs/{job['id']}/retry").status_code == 404
        assert other.get("/api/runs").json()["data"] == []
