"""Batch evals (``eval.run``) and knowledge-base ingestion (``kb.ingest``) as jobs, through
the running server: real worker processes, the real eval runner and ingestion, the test
upstream's ``echo`` model as the eval target (answers are known exactly) and ``hang`` as one
that never answers in time (to cancel)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.sdk import Client
from tests.conftest import RunningServer
from tests.test_access import _key_client, _project_with_key, _suffix
from tests.test_cli import _run
from tests.test_jobs_api import full_log, wait_job, wait_until

QUESTIONS = [f"question {i} about topic {i % 3}" for i in range(6)]
NOTES = """# Release notes

Version 2 adds background ingestion: uploads are stored and ingested by a job.
"""
FAQ = "Background jobs report progress, stream their log and can be cancelled.\n"
BAD_JSON = b'{"a": 1,\n "b": }\n'


@pytest.fixture(scope="module")
def project_key(server: RunningServer) -> str:
    return _project_with_key(server, f"stage-jobs-{_suffix()}")[1]


@pytest.fixture(scope="module")
def project(server: RunningServer, project_key: str) -> Iterator[httpx.Client]:
    with _key_client(server, project_key) as client:
        client.timeout = httpx.Timeout(120)
        items = [{"input": q, "expected": f"echo: {q}"} for q in QUESTIONS]
        made = client.post("/api/datasets", json={"name": "qa", "items": items})
        assert made.status_code == 201, made.text
        suites = {
            "echo-qa": {"target": "echo", "thresholds": {"exact_match": 0.9}},
            # The upstream's "hang" model answers after a minute: a run that stays in flight.
            "hanging": {"target": "up-hang", "cache": False, "concurrency": 1},
        }
        for name, extra in suites.items():
            body = {"dataset": "qa", "scorers": ["exact_match", "token_f1"], **extra}
            put = client.put(f"/api/evals/suites/{name}", json=body)
            assert put.status_code == 200, put.text
        yield client


def submit(client: httpx.Client, kind: str, params: dict) -> dict:
    response = client.post("/api/jobs", json={"kind": kind, "params": params})
    assert response.status_code == 201, response.text
    return response.json()


def test_an_eval_job_stores_its_run_like_the_api_does(project: httpx.Client) -> None:
    job = submit(project, "eval.run", {"suite": "echo-qa@1"})
    # An inline suite with a target override (as the API takes them), run alongside: the
    # target is unknown, so that job fails with the eval API's own message.
    inline = {"name": "inline", "dataset": "qa", "target": "echo", "scorers": ["exact_match"]}
    other = submit(project, "eval.run", {"spec": inline, "target": "echo-b"})
    done = wait_job(project, job["id"])
    assert done["status"] == "succeeded", (done, full_log(project, job["id"]))
    result = done["result"]
    assert result["status"] == "completed" and result["suite"] == "echo-qa"
    assert result["dataset"] == "qa" and result["dataset_version"] == 1
    assert result["total"] == len(QUESTIONS) and result["passed"] is True
    assert done["progress"] == 1.0

    # The run is an ordinary run: listed, with the job's summary, its results stored.
    run = project.get(f"/api/evals/runs/{result['run_id']}").json()
    assert run["status"] == "completed" and run["summary"] == result["summary"]
    assert run["summary"]["scorers"]["exact_match"]["mean"] == 1.0
    listed = project.get("/api/evals/runs", params={"suite": "echo-qa"}).json()["data"]
    assert result["run_id"] in {r["id"] for r in listed}
    results = project.get(f"/api/evals/runs/{result['run_id']}/results").json()["data"]
    assert [r["output"] for r in results] == [f"echo: {q}" for q in QUESTIONS]
    # The worker's gateway calls are traced like the server's own.
    trace = project.get(f"/api/traces/{results[0]['trace_id']}")
    assert trace.status_code == 200, trace.text

    log = full_log(project, job["id"])
    assert f"eval run {result['run_id']} started" in log
    assert "exact_match 1.000 pass" in log and "job ended: succeeded" in log

    # The same suite through the API scores the same (now from the response cache).
    started = project.post("/api/evals/runs", json={"suite": "echo-qa"}).json()
    deadline = time.monotonic() + 60
    while (api_run := project.get(f"/api/evals/runs/{started['id']}").json())["status"] not in (
        "completed",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert api_run["summary"]["scorers"] == run["summary"]["scorers"]
    assert api_run["cache_hits"] == len(QUESTIONS)

    failed = wait_job(project, other["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == "The target 'echo-b' is no route or model here."


def test_a_cancelled_eval_job_cancels_its_run(project: httpx.Client) -> None:
    job = submit(project, "eval.run", {"suite": "hanging"})
    running = wait_until(
        project, job["id"], lambda j: j["status"] == "running" and j["message"].startswith("run ")
    )
    run_id = running["message"].split()[1].rstrip(":")
    assert project.get(f"/api/evals/runs/{run_id}").json()["status"] == "running"
    assert project.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    done = wait_job(project, job["id"], timeout=60)
    assert done["status"] == "cancelled", done
    assert done["result"]["status"] == "cancelled" and done["result"]["run_id"] == run_id
    run = project.get(f"/api/evals/runs/{run_id}").json()
    assert run["status"] == "cancelled" and run["summary"] is None
    assert f"cancelling eval run {run_id}" in full_log(project, job["id"])


def test_the_evals_api_cancels_a_run_that_a_job_runs(project: httpx.Client) -> None:
    """The run lives in the job's process: the API's cancel reaches it through the database
    (as it would a run on another replica)."""
    job = submit(project, "eval.run", {"suite": "hanging"})
    running = wait_until(
        project, job["id"], lambda j: j["status"] == "running" and j["message"].startswith("run ")
    )
    run_id = running["message"].split()[1].rstrip(":")
    cancelled = project.post(f"/api/evals/runs/{run_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancel_requested"] is True
    deadline = time.monotonic() + 30
    while (run := project.get(f"/api/evals/runs/{run_id}").json())["status"] == "running":
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    assert run["status"] == "cancelled" and run["summary"] is None
    done = wait_job(project, job["id"], timeout=60)
    assert done["result"]["status"] == "cancelled" and done["result"]["run_id"] == run_id
    assert f"eval run {run_id} cancelled" in full_log(project, job["id"])
    again = project.post(f"/api/evals/runs/{run_id}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]


def test_bad_params_are_refused_naming_the_field(server, project: httpx.Client) -> None:
    cases = [
        ("eval.run", {}, "params.suite"),
        ("eval.run", {"suite": "a", "spec": {}}, "params.suite"),
        ("eval.run", {"suite": "not a name"}, "params.suite"),
        ("eval.run", {"suite": "echo-qa", "target": ""}, "params.target"),
        ("eval.run", {"suite": "echo-qa", "timeout": -1}, "params.timeout"),
        ("eval.run", {"spec": {"name": "x", "dataset": "qa"}}, "params.spec.target"),
        (
            "eval.run",
            {"spec": {"name": "x", "dataset": "qa", "target": "echo", "scorers": ["nope"]}},
            "params.spec.scorers",
        ),
        ("eval.run", {"suite": "echo-qa", "color": "red"}, "params.color"),
        ("kb.ingest", {"urls": ["https://example.com"]}, "params.knowledge_base"),
        ("kb.ingest", {"knowledge_base": "docs"}, "params.urls"),
        ("kb.ingest", {"knowledge_base": "docs", "urls": "https://x"}, "params.urls"),
        (
            "kb.ingest",
            {"knowledge_base": "docs", "artifacts": [{"key": "../../secrets", "name": "x"}]},
            "params.artifacts.0.key",
        ),
        (
            "kb.ingest",
            {"knowledge_base": "docs", "artifacts": [{"key": "a/b"}]},
            "params.artifacts.0.name",
        ),
    ]
    for kind, params, param in cases:
        response = project.post("/api/jobs", json={"kind": kind, "params": params})
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"]["param"] == param, (params, response.json())

    # Background ingestion into a missing knowledge base: 404 before anything is stored.
    missing = project.post(
        "/api/kbs/nope/documents", params={"background": "true"}, files=[("files", ("a.txt", b"x"))]
    )
    assert missing.status_code == 404, missing.text
    # A read-only key may not start either job.
    viewer = project.post("/api/keys", json={"name": "viewer", "role": "viewer", "scope": "read"})
    with _key_client(server, viewer.json()["key"]) as reader:
        refused = reader.post("/api/jobs", json={"kind": "eval.run", "params": {"suite": "x"}})
        assert refused.status_code == 403
        upload = reader.post(
            "/api/kbs/nope/urls", params={"background": "true"}, json={"urls": ["https://x"]}
        )
        assert upload.status_code == 403


def test_background_upload_ingests_and_reports_broken_files(
    server: RunningServer, project: httpx.Client
) -> None:
    assert project.post("/api/kbs", json={"name": "notes"}).status_code == 201
    files = [
        ("files", ("release.md", NOTES.encode(), "text/markdown")),
        ("files", ("broken.json", BAD_JSON, "application/json")),
        ("files", ("faq.txt", FAQ.encode(), "text/plain")),
    ]
    form = {"metadata": json.dumps({"team": "docs"})}
    answer = project.post(
        "/api/kbs/notes/documents", params={"background": "true"}, files=files, data=form
    )
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["kind"] == "kb.ingest" and job["status"] == "queued"
    names = [a["name"] for a in job["params"]["artifacts"]]
    assert names == ["release.md", "broken.json", "faq.txt"]
    # Texts in a JSON body go the same way; this job waits for the first (same knowledge
    # base), then finds its text already there.
    texts = project.post(
        "/api/kbs/notes/documents",
        params={"background": "true"},
        json={"documents": [{"source": "inline.txt", "text": FAQ.strip(), "metadata": {"k": 1}}]},
    )
    assert texts.status_code == 202, texts.text

    done = wait_job(project, job["id"])
    assert done["status"] == "succeeded", (done, full_log(project, job["id"]))
    report = done["result"]
    assert sorted(report["added"]) == ["faq.txt", "release.md"]
    assert [f["source"] for f in report["failed"]] == ["broken.json"]
    assert "line 2" in report["failed"][0]["problem"]
    assert report["index_version"] == 1 and done["progress"] == 1.0
    log = full_log(project, job["id"])
    assert "read release.md" in log and "could not read broken.json" in log

    docs = project.get("/api/kbs/notes/documents").json()["data"]
    by_source = {d["source"]: d for d in docs}
    assert by_source["release.md"]["metadata"]["team"] == "docs"
    hits = project.post("/api/kbs/notes/search", json={"query": "cancelled jobs"}).json()["hits"]
    assert hits and hits[0]["source"] == "faq.txt"
    # The stored uploads went once they were ingested.
    batch = job["params"]["artifacts"][0]["key"].split("/")[0]
    assert not [p for p in server.home.rglob(f"uploads/*/{batch}*") if p.is_file()]

    second = wait_job(project, texts.json()["id"])
    assert second["status"] == "succeeded", (second, full_log(project, second["id"]))
    assert second["result"]["duplicates"] == [{"source": "inline.txt", "duplicate_of": "faq.txt"}]
    assert second["finished_at"] >= done["finished_at"]


def test_sdk_runs_both_in_the_background(server: RunningServer, project_key: str) -> None:
    client = Client(server.base_url, project_key)
    job = client.evals.run("echo-qa", background=True)
    assert job["kind"] == "eval.run" and job["params"]["suite"] == "echo-qa"
    # URLs too; a private address is refused as in the synchronous path (reported).
    private = f"{server.base_url}/healthz"
    fetched = client.kbs.add_urls("notes", [private], background=True, wait=True, timeout=120)
    assert fetched["status"] == "succeeded", fetched
    assert [f["source"] for f in fetched["result"]["failed"]] == [private]
    assert fetched["result"]["index_version"] == 1
    final = client.jobs.wait(job["id"], timeout=120, poll=0.2)
    assert final["status"] == "succeeded" and final["result"]["passed"] is True


def test_cli_submits_and_follows_jobs(
    server: RunningServer, project_key: str, tmp_path: Path
) -> None:
    followed = _run(
        server, "eval", "run", "-s", "echo-qa", "--background", "--wait", key=project_key
    )
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "queued (eval.run)" in followed.stdout and "succeeded" in followed.stdout
    assert "exact_match" in followed.stdout

    doc = tmp_path / "release-copy.md"
    doc.write_text(NOTES)
    ingest = _run(
        server, "kb", "ingest", "notes", str(doc), "--background", "--wait", key=project_key
    )
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    assert "queued (kb.ingest, 1 file)" in ingest.stdout and "succeeded" in ingest.stdout
    assert '"duplicate_of": "release.md"' in ingest.stdout


def test_a_job_and_a_request_ingesting_into_one_kb_keep_both(project: httpx.Client) -> None:
    """A background ingest (a worker process) and synchronous uploads (the server) into the
    same knowledge base at once: whichever index build finishes last, the active version
    holds every document."""
    assert project.post("/api/kbs", json={"name": "busy"}).status_code == 201
    words = ["aardvark", "bassoon", "cumulus", "dromedary", "estuary", "fjord"]
    job = project.post(
        "/api/kbs/busy/documents",
        params={"background": "true"},
        json={
            "documents": [{"source": f"{w}.txt", "text": f"All about the {w}."} for w in words[:3]]
        },
    ).json()
    for word in words[3:]:
        sync = project.post(
            "/api/kbs/busy/documents",
            json={"documents": [{"source": f"{word}.txt", "text": f"All about the {word}."}]},
        )
        assert sync.status_code == 200, sync.text
    assert wait_job(project, job["id"])["status"] == "succeeded"
    for word in words:
        hits = project.post(
            "/api/kbs/busy/search", json={"query": word, "mode": "bm25", "top_k": 1}
        ).json()["hits"]
        assert hits and hits[0]["source"] == f"{word}.txt", (word, hits)
