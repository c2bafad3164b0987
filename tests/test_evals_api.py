"""Datasets, feedback, eval runs and comparisons through the real server's API.

The target is the test upstream's ``echo`` model (it answers ``echo: <last user message>``),
so outputs and therefore scores are known exactly; judges and the local model are tested in
tests/test_eval_judges.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer
from tests.test_access import _key_client, _project_with_key, _suffix

QUESTIONS = [f"question number {i} about topic {i % 7}" for i in range(24)]


@pytest.fixture(scope="module")
def project_key(server: RunningServer) -> str:
    """An admin key of a fresh project (so feedback and datasets of other tests stay out)."""
    return _project_with_key(server, f"evals-{_suffix()}")[1]


@pytest.fixture(scope="module")
def project(server: RunningServer, project_key: str) -> Iterator[httpx.Client]:
    with _key_client(server, project_key) as client:
        client.timeout = httpx.Timeout(120)
        yield client


def wait_run(client: httpx.Client, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/evals/runs/{run_id}").json()
        if run["status"] in ("completed", "failed", "cancelled"):
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s")


def _chat(client: httpx.Client, text: str) -> str:
    response = client.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": text}]},
    )
    assert response.status_code == 200, response.text
    return response.headers["x-flywheel-trace-id"]


def _wait_traces(client: httpx.Client, trace_ids: list[str]) -> None:
    for trace_id in trace_ids:
        deadline = time.monotonic() + 10
        while client.get(f"/api/traces/{trace_id}").status_code != 200:
            assert time.monotonic() < deadline, trace_id
            time.sleep(0.05)


def test_dataset_versions_are_content_hashed_and_round_trip(project: httpx.Client) -> None:
    items = [
        {"input": q, "expected": f"echo: {q}", "metadata": {"i": i}}
        for i, q in enumerate(QUESTIONS)
    ]
    first = project.post("/api/datasets", json={"name": "qa", "items": items, "message": "v1"})
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["items"] == len(items)
    same = project.post("/api/datasets", json={"name": "qa", "items": items})
    assert same.status_code == 200 and same.json()["created"] is False
    assert same.json()["content_hash"] == first.json()["content_hash"]

    exported = project.get("/api/datasets/qa/export")
    assert exported.status_code == 200
    lines = [json.loads(line) for line in exported.text.splitlines()]
    assert [line["expected"] for line in lines] == [i["expected"] for i in items]
    assert lines[0]["messages"] == [{"role": "user", "content": QUESTIONS[0]}]

    # The export imports back to the same content: no new version.
    again = project.post(
        "/api/datasets/qa/import", params={"filename": "qa.jsonl"}, content=exported.content
    )
    assert again.status_code == 200 and again.json()["version"] == 1

    changed = project.post(
        "/api/datasets/qa/import",
        params={"filename": "qa.csv"},
        content=b"question,answer\nwhat is 2+2?,4\nwhat is 2+2?,4\n",
    )
    assert changed.status_code == 201 and changed.json()["version"] == 2
    detail = project.get("/api/datasets/qa").json()
    assert [v["version"] for v in detail["versions"]] == [2, 1]

    page = project.get("/api/datasets/qa/items", params={"version": 1, "limit": 5, "offset": 5})
    assert [i["position"] for i in page.json()["data"]] == [5, 6, 7, 8, 9]
    train = project.get("/api/datasets/qa/items", params={"version": 1, "split": "train"}).json()
    test = project.get("/api/datasets/qa/items", params={"version": 1, "split": "test"}).json()
    assert len(train["data"]) + len(test["data"]) == len(items)
    assert {i["split"] for i in test["data"]} == {"test"}

    profile = project.get("/api/datasets/qa/profile", params={"version": 2}).json()
    assert profile["exact_duplicates"] == [[0, 1]]


def test_bad_dataset_input_is_a_clear_4xx(project: httpx.Client) -> None:
    bad = project.post(
        "/api/datasets/broken/import",
        params={"filename": "broken.jsonl"},
        content=b'{"input": "ok"}\n{"input": 3}\n',
    )
    assert bad.status_code == 400
    assert "broken.jsonl:2" in bad.json()["error"]["message"]
    missing = project.get("/api/datasets/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert project.post("/api/datasets", json={"name": "x", "items": [{}]}).status_code == 400


def test_feedback_becomes_a_dataset_and_dpo_pairs(
    server: RunningServer, project: httpx.Client
) -> None:
    good = _chat(project, "say something nice")
    bad = _chat(project, "say something useful")
    _wait_traces(project, [good, bad])

    # An end-user key scoped to feedback posts feedback and nothing else.
    key = project.post(
        "/api/keys", json={"name": "widget", "role": "developer", "scope": "feedback"}
    ).json()["key"]
    with _key_client(server, key) as widget:
        posted = widget.post(f"/api/traces/{good}/feedback", json={"rating": "up"})
        assert posted.status_code == 201, posted.text
        assert posted.json()["rating"] == 1.0 and posted.json()["rating_kind"] == "thumbs"
        assert widget.get(f"/api/traces/{good}").status_code == 403
        assert widget.post("/v1/chat/completions", json={"model": "echo"}).status_code == 403
        assert (
            widget.post(f"/api/traces/{'0' * 32}/feedback", json={"rating": 1}).status_code == 404
        )
        refused = widget.post(f"/api/traces/{good}/feedback", json={"rating": 7})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "rating"

    corrected = project.post(
        f"/api/traces/{bad}/feedback",
        json={"rating": "down", "comment": "vague", "correction": "Drink water."},
    )
    assert corrected.status_code == 201
    listed = project.get(f"/api/traces/{bad}/feedback").json()["data"]
    assert listed[0]["correction"] == "Drink water." and listed[0]["comment"] == "vague"

    dpo = project.get("/api/feedback/export", params={"format": "dpo"})
    pairs = [json.loads(line) for line in dpo.text.splitlines()]
    assert pairs == [
        {
            "prompt": [{"role": "user", "content": "say something useful"}],
            "chosen": [{"role": "assistant", "content": "Drink water."}],
            "rejected": [{"role": "assistant", "content": "echo: say something useful"}],
            "source": "correction",
            "trace_ids": [bad],
        }
    ]
    sft = [json.loads(line) for line in project.get("/api/feedback/export").text.splitlines()]
    assert {e["messages"][-1]["content"] for e in sft} == {
        "echo: say something nice",
        "Drink water.",
    }

    made = project.post("/api/datasets/reviewed/from-traces", json={"with_correction": True})
    assert made.status_code == 201, made.text
    items = project.get("/api/datasets/reviewed/items").json()["data"]
    assert len(items) == 1
    assert items[0]["expected"] == "Drink water."
    assert items[0]["metadata"]["trace_id"] == bad


def test_annotation_queue_hands_each_trace_to_one_reviewer(project: httpx.Client) -> None:
    traces = [_chat(project, f"annotate me {i}") for i in range(3)]
    _wait_traces(project, traces)
    added = project.post("/api/annotation/queues/triage/tasks", json={"trace_ids": traces})
    assert added.json() == {"added": 3}
    again = project.post("/api/annotation/queues/triage/tasks", json={"trace_ids": traces})
    assert again.json() == {"added": 0}

    first = project.post("/api/annotation/queues/triage/next").json()["task"]
    # Asking again returns the same open task, not a new one.
    assert project.post("/api/annotation/queues/triage/next").json()["task"]["id"] == first["id"]
    assert first["answer"].startswith("echo: annotate me")
    done = project.post(
        f"/api/annotation/tasks/{first['id']}/complete",
        json={"rating": 0.25, "correction": "A better answer."},
    )
    assert done.status_code == 200 and done.json()["source"] == "annotation"
    second = project.post("/api/annotation/queues/triage/next").json()["task"]
    assert second["id"] != first["id"]
    assert project.post(f"/api/annotation/tasks/{second['id']}/skip").status_code == 200
    third = project.post("/api/annotation/queues/triage/next").json()["task"]
    project.post(f"/api/annotation/tasks/{third['id']}/complete", json={"rating": "up"})
    empty = project.post("/api/annotation/queues/triage/next").json()
    assert empty["task"] is None
    assert empty["stats"] == {"pending": 0, "claimed": 0, "done": 2, "skipped": 1}
    repeat = project.post(f"/api/annotation/tasks/{first['id']}/complete", json={"rating": 1})
    assert repeat.status_code == 409


def _prompt(client: httpx.Client, template: str, labels: list[str]) -> int:
    response = client.post(
        "/api/prompts",
        json={
            "name": "asker",
            "template": [{"role": "user", "content": template}],
            "model": "echo",
            "labels": labels,
        },
    )
    assert response.status_code == 201, response.text
    return int(response.json()["version"])


def test_two_prompt_versions_compared_with_statistics(project: httpx.Client) -> None:
    items = [{"variables": {"question": q}, "expected": f"echo: {q}"} for q in QUESTIONS]
    assert project.post("/api/datasets", json={"name": "asks", "items": items}).status_code == 201
    good = _prompt(project, "{{ question }}", ["staging"])
    worse = _prompt(project, "Q: {{ question }}?", [])
    suite = {
        "dataset": "asks",
        "target": "prompt:asker@staging",
        "scorers": ["exact_match", {"type": "rouge", "variant": "L"}, "latency"],
        "thresholds": {"exact_match": 0.9},
        "concurrency": 8,
    }
    put = project.put("/api/evals/suites/asks-suite", json=suite)
    assert put.status_code == 200, put.text

    baseline = project.post("/api/evals/runs", json={"suite": "asks-suite"})
    assert baseline.status_code == 202, baseline.text
    assert baseline.json()["resolved_target"] == f"prompt:asker@{good}"
    base = wait_run(project, baseline.json()["id"])
    assert base["status"] == "completed", base
    summary = base["summary"]["scorers"]
    assert summary["exact_match"]["mean"] == 1.0 and summary["exact_match"]["passed"] is True
    assert summary["rougeL"]["n"] == len(QUESTIONS)

    candidate = project.post(
        "/api/evals/runs", json={"suite": "asks-suite", "target": str(worse)}
    ).json()
    assert candidate["resolved_target"] == f"prompt:asker@{worse}"
    cand = wait_run(project, candidate["id"])
    assert cand["summary"]["scorers"]["exact_match"]["mean"] == 0.0
    assert cand["summary"]["passed"] is False

    results = project.get(f"/api/evals/runs/{cand['id']}/results").json()["data"]
    assert results[0]["output"] == f"echo: Q: {QUESTIONS[0]}?"
    assert results[0]["scores"]["exact_match"] == 0.0

    comparison = project.get(
        "/api/evals/compare", params={"baseline": base["id"], "candidate": cand["id"]}
    ).json()
    exact = comparison["scorers"]["exact_match"]
    assert exact["delta"] == -1.0 and exact["losses"] == len(QUESTIONS)
    assert exact["p_value"] < 0.01 and exact["regressed"] is True
    assert exact["ci_high"] < 0
    assert comparison["gate"]["passed"] is False
    worst = comparison["regressions"][0]
    assert worst["baseline_output"].startswith("echo: question")
    assert worst["candidate_output"].startswith("echo: Q:")

    # Re-running the baseline is served from the response cache, with equal results.
    rerun = wait_run(
        project, project.post("/api/evals/runs", json={"suite": "asks-suite"}).json()["id"]
    )
    assert rerun["cache_hits"] == len(QUESTIONS)
    same = project.get(
        "/api/evals/compare", params={"baseline": base["id"], "candidate": rerun["id"]}
    ).json()
    assert same["gate"]["passed"] is True
    assert same["scorers"]["exact_match"]["p_value"] == 1.0
    assert same["scorers"]["exact_match"]["ties"] == len(QUESTIONS)


def test_eval_input_errors_are_4xx(project: httpx.Client) -> None:
    bad_scorer = project.put(
        "/api/evals/suites/bad",
        json={"dataset": "qa", "target": "echo", "scorers": ["nonsense"]},
    )
    assert bad_scorer.status_code == 400 and "nonsense" in bad_scorer.json()["error"]["message"]
    bad_threshold = project.put(
        "/api/evals/suites/bad",
        json={"dataset": "qa", "target": "echo", "scorers": ["bleu"], "thresholds": {"rouge": 1}},
    )
    assert bad_threshold.status_code == 400
    unknown_target = project.post(
        "/api/evals/runs",
        json={
            "spec": {"name": "x", "dataset": "qa", "target": "no-such-route", "scorers": ["bleu"]}
        },
    )
    assert unknown_target.status_code == 400
    assert unknown_target.json()["error"]["code"] == "unknown_target"
    assert project.post("/api/evals/runs", json={"suite": "missing"}).status_code == 404
    assert project.get("/api/evals/runs/nope").status_code == 404


def _gate(
    server: RunningServer, key: str, tmp_path: Path, candidate: str
) -> subprocess.CompletedProcess[str]:
    flywheel = str(Path(sys.executable).parent / "flywheel")
    env = {**os.environ, "FLYWHEEL_BASE_URL": server.base_url, "FLYWHEEL_API_KEY": key}
    env.pop("GITHUB_STEP_SUMMARY", None)
    return subprocess.run(
        [
            flywheel,
            "eval",
            "gate",
            "--suite",
            "asks-suite",
            "--baseline",
            "staging",
            "--candidate",
            candidate,
            "--junit",
            str(tmp_path / "gate.xml"),
            "--summary",
            str(tmp_path / "gate.md"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_gate_fails_on_a_regression_and_passes_an_equal_candidate(
    server: RunningServer, project: httpx.Client, project_key: str, tmp_path: Path
) -> None:
    versions = project.get("/api/prompts/asker/versions").json()["data"]
    assert len(versions) == 2, "runs after test_two_prompt_versions_compared_with_statistics"
    worse = max(v["version"] for v in versions)

    failed = _gate(server, project_key, tmp_path, str(worse))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    report = ET.parse(tmp_path / "gate.xml").getroot().find("testsuite")
    assert report is not None and int(report.get("failures", "0")) >= 2
    names = {case.get("name"): case.find("failure") is not None for case in report.iter("testcase")}
    assert names["threshold exact_match"] is True
    assert names["no regression exact_match"] is True
    markdown = (tmp_path / "gate.md").read_text()
    assert "failed" in markdown and "| exact_match |" in markdown

    passed = _gate(server, project_key, tmp_path, "staging")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "gate passed" in passed.stdout
    report = ET.parse(tmp_path / "gate.xml").getroot().find("testsuite")
    assert report is not None and report.get("failures") == "0"


def test_sdk_runs_and_compares(server: RunningServer, project_key: str) -> None:
    from flywheel import Client

    with Client(server.base_url, project_key) as client:
        seen: list[int] = []
        run = client.evals.run(
            "asks-suite", wait=True, on_progress=lambda r: seen.append(r["done"])
        )
        assert run["status"] == "completed" and seen[-1] == run["total"]
        assert client.evals.results(run["id"])[0]["scores"]["exact_match"] == 1.0
        report = client.evals.compare(run["id"], run["id"])
        assert report["gate"]["passed"] is True
        assert [d["name"] for d in client.datasets.list()][:1] == ["asks"]
        assert len(client.datasets.items("asks")) == len(QUESTIONS)


def test_suites_are_config_as_code(project: httpx.Client) -> None:
    text = """suites:
  - name: yaml-suite
    dataset: asks
    target: prompt:asker@staging
    scorers: [exact_match]
    thresholds: {exact_match: 0.5}
"""
    plan = project.post("/api/config/plan", json={"yaml": text, "filename": "fw.yaml"})
    assert plan.status_code == 200, plan.text
    assert plan.json()["changes"] == [
        {"kind": "suite", "name": "yaml-suite", "action": "create", "detail": ""}
    ]
    applied = project.post("/api/config/apply", json={"yaml": text, "filename": "fw.yaml"})
    assert applied.status_code == 200, applied.text
    assert project.get("/api/evals/suites/yaml-suite").json()["thresholds"] == {"exact_match": 0.5}
    again = project.post("/api/config/plan", json={"yaml": text, "filename": "fw.yaml"}).json()
    assert again["changes"][0]["action"] == "unchanged"
    exported = project.get("/api/config/export").text
    assert "yaml-suite" in exported and "exact_match" in exported

    bad = text.replace("scorers: [exact_match]", "scorers: [exact_match, nope]")
    refused = project.post("/api/config/plan", json={"yaml": bad, "filename": "fw.yaml"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("fw.yaml:")
    assert "unknown scorer type 'nope'" in refused.json()["error"]["message"]


def test_production_needs_a_passing_eval_run(server: RunningServer, project: httpx.Client) -> None:
    """The approval gate reads the prompt's suites: asks-suite failed on version 2, and
    yaml-suite has no run on version 1 until one is made."""
    reviewer_key = project.post(
        "/api/keys", json={"name": "second pair of eyes", "role": "admin", "scope": "admin"}
    ).json()["key"]
    worse = project.post("/api/approvals", json={"name": "asker", "version": 2}).json()
    assert worse["gate"]["status"] == "failed", worse["gate"]
    by_suite = {s["suite"]: s for s in worse["gate"]["suites"]}
    assert by_suite["asks-suite"]["status"] == "failed"
    assert by_suite["yaml-suite"]["status"] == "missing"

    good = project.post("/api/approvals", json={"name": "asker", "version": 1}).json()
    assert good["gate"]["status"] == "missing"
    project.post(f"/api/approvals/{good['id']}/cancel")
    wait_run(project, project.post("/api/evals/runs", json={"suite": "yaml-suite"}).json()["id"])
    good = project.post("/api/approvals", json={"name": "asker", "version": 1}).json()
    assert good["gate"]["status"] == "passed", good["gate"]

    with _key_client(server, reviewer_key) as reviewer:
        refused = reviewer.post(f"/api/approvals/{worse['id']}/approve")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "gate_failed"
        approved = reviewer.post(f"/api/approvals/{good['id']}/approve")
        assert approved.status_code == 200, approved.text
    assert project.get("/api/prompts/asker", params={"label": "production"}).json()["version"] == 1


def test_a_run_whose_server_stopped_is_marked_failed(
    server: RunningServer, project: httpx.Client
) -> None:
    """A row left 'running' with an old heartbeat (its server died) reads as failed."""
    from sqlalchemy import create_engine, text

    run = wait_run(
        project, project.post("/api/evals/runs", json={"suite": "asks-suite"}).json()["id"]
    )
    engine = create_engine(server.database_url)
    with engine.begin() as db:
        db.execute(
            text("UPDATE eval_runs SET status = 'running', heartbeat_at = 0 WHERE id = :id"),
            {"id": run["id"]},
        )
    engine.dispose()
    deadline = time.monotonic() + 15
    while True:
        orphan = project.get(f"/api/evals/runs/{run['id']}").json()
        if orphan["status"] == "failed" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert orphan["status"] == "failed" and orphan["error"].startswith("interrupted")


def test_a_judge_scores_a_run_with_the_local_model(project: httpx.Client) -> None:
    """Answers from the echo route, judged by the real local model through the gateway."""
    items = [
        {
            "input": "What is the capital of France?",
            "expected": "echo: What is the capital of France?",
        },
        {"input": "Name a colour.", "expected": "Blue."},
    ]
    project.post("/api/datasets", json={"name": "judged", "items": items})
    spec = {
        "name": "judged",
        "dataset": "judged",
        "target": "echo",
        "scorers": [{"type": "judge.correctness", "model": "default", "max_tokens": 4}],
    }
    run = wait_run(project, project.post("/api/evals/runs", json={"spec": spec}).json()["id"], 300)
    assert run["status"] == "completed", run
    results = project.get(f"/api/evals/runs/{run['id']}/results").json()["data"]
    for result in results:
        detail = result["details"]["judge.correctness"]
        assert detail["raw"] and all(isinstance(text, str) for text in detail["raw"])
        value = result["scores"]["judge.correctness"]
        assert value is None or 0.0 <= value <= 1.0
    assert run["summary"]["scorers"]["judge.correctness"]["n"] >= 1
