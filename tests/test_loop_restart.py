"""A loop survives a restart: the server and its training job are killed (-9) mid-step; the
restarted server finds the job orphaned and the loop runs the step again by itself.

The route answers through the fake upstream (nothing to load at start-up); only the training
step loads the local SmolLM2, and the test stops the loop once the step runs again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from flywheel.testing import FakeUpstream
from flywheel.testing.users import SimulatedUsers
from tests.conftest import RunningServer, start_server, stop_server
from tests.test_loop_api import CONFIG

ENV = {
    "FLYWHEEL_LOOP_INTERVAL": "0.3",
    "FLYWHEEL_JOB_CONCURRENCY": "1",
    "FLYWHEEL_PRELOAD_MODELS": "false",
}


def _until(check: Callable[[], dict | None], timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _train(api: httpx.Client, loop_id: str) -> dict:
    loop = api.get(f"/api/loops/{loop_id}").json()
    return next(s for s in loop["steps"] if s["name"] == "train")


def test_a_loop_runs_its_step_again_after_a_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    home, key = tmp_path / "home", "fw-test-" + secrets.token_hex(16)
    config = CONFIG.format(upstream=upstream.base_url)
    server: RunningServer = start_server(home, config, key, extra_env=ENV)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as api:
            # The echo model never answers in the house style: each answer is corrected.
            SimulatedUsers(api, "loop-a", max_tokens=8).visit(4)
            spec = {
                "route": "loop-a",
                "min_examples": 2,
                "test_fraction": 0.5,
                "base": "builtin:smollm2",
                "train": {"epochs": 50, "batch_size": 1, "max_length": 64},
            }
            started = api.post("/api/loops", json=spec)
            assert started.status_code == 201, started.text
            loop_id = started.json()["id"]

            def training_job() -> dict | None:
                loop = api.get(f"/api/loops/{loop_id}").json()
                assert loop["status"] == "running", loop
                step = _train(api, loop_id)
                if step["status"] != "running":
                    return None
                job = api.get(f"/api/jobs/{step['job_id']}").json()
                return job if job["status"] == "running" and job["pid"] else None

            job = _until(training_job, 240, "the training job to run")
        # The machine goes down: the server and its job process die at once.
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.kill(job["pid"], signal.SIGKILL)
    finally:
        stop_server(server)

    server = start_server(home, config, key, extra_env=ENV)
    try:
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as api:

            def running_again() -> dict | None:
                step = _train(api, loop_id)
                return step if len(step["jobs"]) == 2 else None

            step = _until(running_again, 120, "the training step to run again")
            assert step["jobs"][0] == job["id"] and step["attempts"] == 2
            assert api.get(f"/api/jobs/{job['id']}").json()["status"] == "orphaned"
            loop = api.get(f"/api/loops/{loop_id}").json()
            assert loop["status"] == "running" and loop["step"] == "train"
            earlier = {s["name"]: s for s in loop["steps"]}
            assert earlier["collect"]["attempts"] == earlier["dataset"]["attempts"] == 1

            cancelled = api.post(f"/api/loops/{loop_id}/cancel")
            assert cancelled.status_code == 200, cancelled.text

            def stopped() -> dict | None:
                job = api.get(f"/api/jobs/{step['job_id']}").json()
                return job if job["status"] in {"cancelled", "succeeded", "failed"} else None

            retried = _until(stopped, 120, "the retried job to stop")
            assert retried["status"] == "cancelled"
    finally:
        stop_server(server)
