"""The ``ray`` executor against a real local Ray cluster: jobs run as Ray tasks with their log,
progress, cancel, failures and crashes seen through the API, a ``tune.sft`` job trains on
two Ray Train workers (DDP over gloo), and a batch eval (``eval.run``) and a knowledge-base
ingestion (``kb.ingest``) run there too: the server's default executor is ``ray``, so a
background upload goes to the cluster without naming it.

The module starts its own head (``ray start --head --block`` on loopback, 2 CPUs, a temp dir
of its own) and stops it at the end, killing by process id whatever of it is left: it never
touches another Ray on the machine (``ray stop`` would stop every one).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from flywheel.testing import FakeUpstream
from flywheel.testing.upstream import free_port
from tests.conftest import RunningServer, start_server, stop_server
from tests.test_jobs_api import full_log, wait_job, wait_until

RAY = Path(sys.executable).parent / "ray"
CONFIG = """
providers:
  local: {{type: local}}
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - {{name: smollm2-135m-instruct, provider: local, source: "builtin:smollm2"}}
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - name: default
    targets: [{{model: smollm2-135m-instruct}}]
  - name: echo
    targets: [{{model: up-echo}}]
"""


@dataclass
class RayHead:
    address: str
    process: subprocess.Popen[bytes]
    temp: Path

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: its session, or its temp dir on the command line."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                same_session = os.getsid(proc.pid) == self.process.pid
                ours = any(str(self.temp) in arg for arg in proc.info["cmdline"] or [])
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
            if (same_session or ours) and proc.pid != os.getpid():
                found.append(proc)
        return found


def _stop_head(head: RayHead) -> None:
    """Stop the cluster gracefully for a few seconds, then kill what is left of it by pid (a
    detached Ray Train actor can hold a graceful stop for half a minute)."""
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)  # `ray start --block` stops its cluster
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.process.wait(5)
    for proc in head.processes():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, alive = psutil.wait_procs(head.processes(), timeout=10)
    left = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    head.process.poll()
    shutil.rmtree(head.temp, ignore_errors=True)
    assert not left, f"Ray processes left behind: {left}"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    # A short path: Ray's Unix sockets live under it (108-byte limit).
    temp = Path(tempfile.mkdtemp(prefix="fwray-", dir="/tmp"))
    port = free_port()
    process = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--object-store-memory=200000000",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            "--block",
        ],
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=(temp / "ray-start.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    head = RayHead(f"127.0.0.1:{port}", process, temp)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (temp / "ray-start.log").read_text()
            status = subprocess.run(
                [str(RAY), "status", "--address", head.address],
                capture_output=True,
                check=False,
            )
            if status.returncode == 0 and b"CPU" in status.stdout:
                break
            assert time.monotonic() < deadline, (temp / "ray-start.log").read_text()
            time.sleep(0.5)
        yield head.address
    finally:
        _stop_head(head)


@pytest.fixture(scope="module")
def ray_server(
    ray_head: str, tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("flywheel-ray"),
        CONFIG.format(upstream=upstream.base_url),
        "fw-test-" + secrets.token_hex(16),
        extra_env={
            "FLYWHEEL_RAY_ADDRESS": ray_head,
            "FLYWHEEL_JOB_EXECUTOR": "ray",
            "FLYWHEEL_PRELOAD_MODELS": "false",
            "FLYWHEEL_JOB_HEARTBEAT": "1",
        },
        ready_path="/healthz",
        timeout=120,
    )
    yield running
    stop_server(running)


@pytest.fixture
def api(ray_server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ray_server.admin_key}"}
    with httpx.Client(base_url=ray_server.base_url, headers=headers, timeout=120) as client:
        yield client


def submit(api: httpx.Client, kind: str, params: dict) -> dict:
    response = api.post("/api/jobs", json={"kind": kind, "params": params, "executor": "ray"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["executor"] == "ray"
    return job


def test_jobs_run_as_ray_tasks_and_record_how_they_ended(api: httpx.Client) -> None:
    ok = submit(api, "test.count", {"steps": 4})
    failing = submit(api, "test.count", {"steps": 5, "fail_at": 2})
    crashing = submit(api, "test.count", {"steps": 5, "crash_at": 2})

    done = wait_job(api, ok["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["result"] == {"reached": 4} and done["progress"] == 1.0
    assert done["pid"] is None  # a Ray task, not a process of this host's supervisor
    log = full_log(api, ok["id"])
    assert "submitted to Ray at 127.0.0.1:" in log
    assert "started on Ray task" in log
    assert "step 4 of 4" in log and "job ended: succeeded" in log

    failed = wait_job(api, failing["id"], timeout=60)
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: told to fail at step 2"

    # The task's worker process dies mid-job: nobody records the end but the supervisor.
    crashed = wait_job(api, crashing["id"], timeout=60)
    assert crashed["status"] == "failed", crashed
    assert crashed["error"] == (
        f"the worker stopped unexpectedly (the Ray worker running task {_task_of(api, crashing)} "
        "died)"
    )


def _task_of(api: httpx.Client, job: dict) -> str:
    """The Ray task id the launcher logged for a job."""
    log = full_log(api, job["id"])
    return log.split(" as task ", 1)[1].split()[0]


def test_cancel_stops_a_running_ray_job(api: httpx.Client) -> None:
    job = submit(api, "test.count", {"steps": 100_000, "delay": 0.02})
    wait_until(api, job["id"], lambda j: j["status"] == "running" and j["progress"] > 0)
    cancelled = api.post(f"/api/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["cancel_requested"] is True
    asked = time.monotonic()
    done = wait_job(api, job["id"], timeout=30)
    assert done["status"] == "cancelled", done
    # The job's own code stopped (it returned what it reached), well before the end.
    assert done["result"] is not None and 0 < done["result"]["reached"] < 100_000
    assert time.monotonic() - asked < 10
    assert "stopping at step" in full_log(api, job["id"])


def test_a_timed_out_ray_job_is_stopped_through_ray_cancel(api: httpx.Client) -> None:
    job = submit(api, "test.count", {"steps": 100_000, "delay": 0.02, "timeout": 6})
    # The clock starts at launch; the task's worker takes a few seconds to start.
    wait_until(api, job["id"], lambda j: j["progress"] > 0 or j["status"] != "running")
    done = wait_job(api, job["id"], timeout=60)
    assert done["status"] == "failed" and done["error"] == "timed out after 6s"
    # No cancel flag for the heartbeat to see: the task stopped because the supervisor's
    # ray.cancel reached the job's code, which then logged its (too late) end.
    assert not done["cancel_requested"]
    deadline = time.monotonic() + 45  # a bound, not a claim: a loaded machine ships it late
    while "job ended: cancelled" not in full_log(api, job["id"]):
        assert time.monotonic() < deadline, full_log(api, job["id"])[-2000:]
        time.sleep(0.2)
    assert "stopping at step" in full_log(api, job["id"])


def _tiny_dataset() -> list[dict]:
    colors = ["red", "blue", "green", "amber", "violet", "teal", "olive", "coral"]
    return [
        {
            "messages": [{"role": "user", "content": f"Name a thing that is {color} ({n})."}],
            "expected": f"A {color} kite.",
        }
        for color in colors
        for n in (1, 2)
    ]


def test_a_two_worker_sft_job_trains_through_ray_train(api: httpx.Client) -> None:
    created = api.post("/api/datasets", json={"name": "kites", "items": _tiny_dataset()})
    assert created.status_code == 201, created.text
    job = submit(
        api,
        "tune.sft",
        {
            "dataset": "kites@1",
            "num_workers": 2,
            "register": "kites-ddp",
            "settings": {"max_steps": 2, "max_length": 64, "batch_size": 2},
        },
    )
    done = wait_job(api, job["id"], timeout=110)
    log = full_log(api, job["id"])
    assert done["status"] == "succeeded", f"{done['error']}\n{log[-4000:]}"
    # Two workers in one gloo process group, each reporting its rank.
    assert "2 Ray Train workers" in log
    assert "rank 0 of 2" in log and "rank 1 of 2" in log
    assert log.count("torch.distributed world size 2 (gloo)") == 2
    result = done["result"]
    assert result["steps"] == 2 and result["train_tokens"] > 0
    assert result["eval_loss_before"] is not None and result["eval_loss_after"] is not None
    # Rank 0's adapter came back to the job and was registered.
    assert result["model"].startswith("kites-ddp@")
    versions = api.get("/api/registry/kites-ddp").json()["versions"]
    assert versions[0]["kind"] == "adapter" and versions[0]["size_bytes"] > 0
    # Rank 0's step metrics reached the tracking run.
    run = api.get(f"/api/runs/{result['run_id']}").json()
    assert run["status"] == "finished" and run["metrics"]["loss"]


def test_a_batch_eval_runs_as_a_ray_task(api: httpx.Client) -> None:
    questions = [f"ray question {i}" for i in range(4)]
    items = [{"input": q, "expected": f"echo: {q}"} for q in questions]
    made = api.post("/api/datasets", json={"name": "ray-qa", "items": items})
    assert made.status_code == 201, made.text
    suite = {
        "dataset": "ray-qa",
        "target": "echo",
        "scorers": ["exact_match"],
        "thresholds": {"exact_match": 0.9},
    }
    assert api.put("/api/evals/suites/ray-echo", json=suite).status_code == 200
    job = submit(api, "eval.run", {"suite": "ray-echo@1"})
    done = wait_job(api, job["id"], timeout=120)
    log = full_log(api, job["id"])
    assert done["status"] == "succeeded", f"{done['error']}\n{log[-4000:]}"
    assert done["pid"] is None and "started on Ray task" in log
    result = done["result"]
    assert result["status"] == "completed" and result["total"] == len(questions)
    assert result["passed"] is True
    # The task's eval run is an ordinary run in the server's database, answers scored.
    run = api.get(f"/api/evals/runs/{result['run_id']}").json()
    assert run["status"] == "completed"
    assert run["summary"]["scorers"]["exact_match"]["mean"] == 1.0


def test_a_background_ingestion_runs_on_ray_by_default(api: httpx.Client) -> None:
    assert api.post("/api/kbs", json={"name": "ray-notes"}).status_code == 201
    documents = [
        {"source": "jobs.txt", "text": "Background jobs run as Ray tasks on the cluster."},
        {"source": "kites.txt", "text": "A red kite flies over the green hill in spring."},
    ]
    sent = api.post(
        "/api/kbs/ray-notes/documents",
        params={"background": "true"},
        json={"documents": documents},
    )
    assert sent.status_code == 202, sent.text
    job = sent.json()
    # No executor named: the server's default (FLYWHEEL_JOB_EXECUTOR=ray) took it.
    assert job["kind"] == "kb.ingest" and job["executor"] == "ray"
    done = wait_job(api, job["id"], timeout=120)
    log = full_log(api, job["id"])
    assert done["status"] == "succeeded", f"{done['error']}\n{log[-4000:]}"
    assert "started on Ray task" in log
    report = done["result"]
    assert sorted(report["added"]) == ["jobs.txt", "kites.txt"]
    assert report["index_version"] == 1
    # The index the task built is served by the server.
    found = api.post("/api/kbs/ray-notes/search", json={"query": "red kite"})
    assert found.status_code == 200, found.text
    assert found.json()["hits"][0]["source"] == "kites.txt"
