"""`flywheel loop` end to end on the embedded default, shortened: a support route whose
answers users thumb down and correct goes through every step (collect, dataset, LoRA SFT,
register, eval gate, approval, canary, decision) to a promotion or an automatic rollback.

A real server with the local SmolLM2, real job processes, simulated users
(flywheel.testing.users) rating by a house rule. The full-length run, where the tuned model
wins its canary, is bench/loop/loop_e2e.py (its figures are in docs/benchmarks.md); here the
training is short, so the test asserts that the loop decides, and that what it decided is
what production serves.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.testing.users import HOUSE_MARK, SimulatedUsers
from tests.conftest import RunningServer, start_server, stop_server
from tests.test_loop_api import _ui

# Training, merging and two models answering the gate on 2 cores: a bound against hangs.
pytestmark = pytest.mark.timeout(1500)

CONFIG = """
providers:
  local: {type: local}
models:
  - {name: smollm2-135m-instruct, provider: local, source: "builtin:smollm2", context_length: 8192}
routes:
  - name: support
    targets: [{model: smollm2-135m-instruct}]
    production: true
  - name: spare
    targets: [{model: smollm2-135m-instruct}]
"""
ENDS = {"promoted", "rolled_back", "rejected", "not_enough_data", "gate_failed", "failed"}
SPEC = {
    "route": "support",
    "min_examples": 8,
    "train": {
        "learning_rate": 2e-3,
        "epochs": 5,
        "batch_size": 4,
        "max_length": 64,
        "lora": {"rank": 8, "alpha": 16},
    },
    "gate": {"max_tokens": 24},
    "canary": {"share": 0.5, "min_samples": 8},
}


@pytest.fixture(scope="module")
def loop_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    home: Path = tmp_path_factory.mktemp("loop-home")
    running = start_server(
        home,
        CONFIG,
        "fw-test-" + secrets.token_hex(16),
        extra_env={
            "FLYWHEEL_LOOP_INTERVAL": "0.5",
            "FLYWHEEL_EXPERIMENT_INTERVAL": "0.5",
            "FLYWHEEL_JOB_CONCURRENCY": "1",
        },
    )
    yield running
    stop_server(running)


def _client(server: RunningServer, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


@pytest.fixture(scope="module")
def keys(loop_server: RunningServer) -> dict[str, str]:
    """An operator who runs the loop (an instance admin: a loop changes the running config)
    and a reviewer, a project admin, who approves (four eyes)."""
    with _client(loop_server, loop_server.admin_key) as admin:
        response = admin.post(
            "/api/keys", json={"name": "reviewer", "role": "admin", "scope": "admin"}
        )
        assert response.status_code == 201, response.text
    return {"operator": loop_server.admin_key, "reviewer": response.json()["key"]}


def _wait(api: httpx.Client, loop_id: str, until: set[str], timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        loop = api.get(f"/api/loops/{loop_id}").json()
        if loop["status"] in until or (loop["status"] in ENDS and loop["status"] not in until):
            return loop
        assert time.monotonic() < deadline, f"loop still {loop['status']} at {loop['step']}"
        time.sleep(1)


def _failure_log(api: httpx.Client, loop: dict) -> str:
    failed = [s for s in loop["steps"] if s["status"] == "failed" and s["job_id"]]
    if not failed:
        return loop.get("reason") or ""
    return api.get(f"/api/jobs/{failed[0]['job_id']}/logs").json()["text"][-3000:]


def test_a_route_with_poor_answers_goes_through_the_loop(
    loop_server: RunningServer, keys: dict[str, str]
) -> None:
    with _client(loop_server, keys["operator"]) as api:
        users = SimulatedUsers(api, "support")
        # The base model never answers in the house style: every answer is corrected.
        assert users.visit(24) == {"smollm2-135m-instruct": 0.0}

        started = api.post("/api/loops", json=SPEC)
        assert started.status_code == 201, started.text
        loop_id = started.json()["id"]
        loop = _wait(api, loop_id, {"waiting"})
        assert loop["status"] == "waiting" and loop["step"] == "approval", _failure_log(api, loop)
        steps = {s["name"]: s for s in loop["steps"]}

        # 1-2: the bad answers and their corrections became a dataset version.
        assert steps["collect"]["result"]["bad"] == 24
        assert steps["collect"]["result"]["corrected"] == 24
        dataset, version = steps["dataset"]["result"]["dataset"].split("@")
        items = api.get(f"/api/datasets/{dataset}/items", params={"version": version}).json()
        expected = [item["expected"] for item in items["data"]]
        assert len(expected) == 24 and all(e.startswith(HOUSE_MARK) for e in expected)

        # 3-4: a LoRA adapter and the merged version, with lineage back to the dataset.
        adapter = steps["train"]["result"]["model"]
        merged = steps["register"]["result"]["model"]
        name, number = merged.split("@")
        lineage = api.get(f"/api/registry/{name}/versions/{number}/lineage").json()
        refs = {node.get("ref") or node.get("id") for node in lineage["nodes"]}
        assert adapter in refs and steps["dataset"]["result"]["dataset"] in refs, lineage
        card = api.get(f"/api/registry/{name}/versions/{number}/card")
        assert card.status_code == 200 and adapter.split("@")[0] in card.text

        # 5: the gate compared the candidate with production on the held-out items.
        gate = steps["gate"]["result"]
        assert gate["passed"] and gate["candidate_mean"] >= gate["production_mean"], gate
        for run in (gate["production_run"], gate["candidate_run"]):
            assert api.get(f"/api/evals/runs/{run}").json()["status"] == "completed"

        # 6: the approval request waits for someone other than the loop's author.
        approval_id = steps["approval"]["result"]["approval_id"]
        refused = api.post(f"/api/approvals/{approval_id}/approve", json={})
        assert refused.status_code == 403, refused.text

    with _client(loop_server, keys["reviewer"]) as reviewer:
        approved = reviewer.post(f"/api/approvals/{approval_id}/approve", json={"comment": "ok"})
        assert approved.status_code == 200, approved.text

    with _client(loop_server, keys["operator"]) as api:
        # 7-8: canary traffic from new users until the experiment decides.
        users = SimulatedUsers(api, "support")
        deadline = time.monotonic() + 600
        first_user = 1000
        while True:
            loop = api.get(f"/api/loops/{loop_id}").json()
            if loop["status"] in ENDS:
                break
            assert time.monotonic() < deadline, f"no decision: {loop['reason']}"
            if loop["step"] == "decision":
                users.visit(8, first_user=first_user, first_question=100, correct=False)
                first_user += 8
            else:
                time.sleep(0.5)
        assert loop["status"] in {"promoted", "rolled_back"}, _failure_log(api, loop)
        steps = {s["name"]: s for s in loop["steps"]}
        assert all(s["status"] == "succeeded" for s in steps.values()), steps
        for step in steps.values():
            job = api.get(f"/api/jobs/{step['job_id']}").json()
            assert job["status"] == "succeeded"

        experiment = api.get(f"/api/experiments/{steps['canary']['result']['experiment_id']}")
        experiment_status = experiment.json()["status"]
        served = steps["canary"]["result"]["served_name"]
        route = next(r for r in api.get("/api/routes").json()["data"] if r["name"] == "support")
        route_models = [t["model"] for t in route["targets"]]
        production = api.get(f"/api/registry/{name}").json()["aliases"].get("production")
        if loop["status"] == "promoted":
            assert experiment_status == "promoted"
            assert route_models == [served] and production == int(number)
            # Production now serves the tuned model.
            assert users.ask("after", "Tell me about parks in Riga.")[2] == served
        else:
            assert experiment_status in {"rolled_back", "stopped"}
            assert route_models == ["smollm2-135m-instruct"] and production is None
            assert steps["decision"]["result"]["reverted"]["label"] == "production"

        # Every step is in the audit log.
        history = api.get(
            "/api/audit", params={"resource_type": "loop", "resource_id": loop_id, "limit": 1000}
        ).json()["data"]
        assert {(e["resource_type"], e["resource_id"]) for e in history} == {("loop", loop_id)}
        actions = [e["action"] for e in history]
        assert "loop.start" in actions and f"loop.{loop['status']}" in actions
        assert actions.count("loop.step.done") >= 7

    # The UI shows the loop as one timeline, linking each step's job and artifacts.
    with _ui(loop_server, keys["operator"]) as ui:
        page = ui.get(f"/loops/{loop_id}")
        assert page.status_code == 200
        links = [f"/jobs/{step['job_id']}" for step in steps.values()]
        links += [f"/experiments/{experiment.json()['id']}", f"/evals/runs/{gate['candidate_run']}"]
        for link in links:
            assert link in page.text, link


def test_a_failed_step_resumes_and_a_loop_cancels(
    loop_server: RunningServer, keys: dict[str, str]
) -> None:
    with _client(loop_server, keys["operator"]) as api:
        users = SimulatedUsers(api, "spare", max_tokens=8)
        users.visit(4, first_question=40)
        # A base model that does not exist: collecting and the dataset work, training fails.
        spec = {"route": "spare", "min_examples": 2, "test_fraction": 0.5, "base": "nope@1"}
        started = api.post("/api/loops", json=spec)
        assert started.status_code == 201, started.text
        loop_id = started.json()["id"]
        assert api.post("/api/loops", json=spec).status_code == 409
        loop = _wait(api, loop_id, {"failed"}, timeout=300)
        assert loop["status"] == "failed" and loop["step"] == "train", loop
        assert "nope" in loop["reason"]
        first_job = next(s for s in loop["steps"] if s["name"] == "train")["job_id"]

        resumed = api.post(f"/api/loops/{loop_id}/resume")
        assert resumed.status_code == 200, resumed.text
        assert resumed.json()["status"] == "running"
        again = _wait(api, loop_id, {"failed"}, timeout=300)
        train = next(s for s in again["steps"] if s["name"] == "train")
        # The earlier steps kept their results; the failed one ran as a new job.
        assert train["job_id"] != first_job and train["jobs"] == [first_job, train["job_id"]]
        assert next(s for s in again["steps"] if s["name"] == "collect")["attempts"] == 1

        cancelled = api.post(f"/api/loops/{loop_id}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert api.post(f"/api/loops/{loop_id}/resume").status_code == 409
