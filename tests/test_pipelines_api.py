"""Pipelines through the running server: stored YAML, runs traced step by step, and a
pipeline served as a chat route."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import RunningServer, wait_for_trace
from tests.test_access import _key_client, _project_with_key

SUPPORT = """\
name: support-answer
description: Answer from the handbook
inputs:
  question: {type: string}
steps:
  - {id: docs, type: retrieve, knowledge_base: handbook, query: "{{ question }}", top_k: 2}
  - id: answer
    type: llm
    model: echo
    messages:
      - role: system
        content: "{% for d in docs %}[{{ loop.index }}] {{ d.source }}\\n{% endfor %}"
      - {role: user, content: "{{ question }} ({{ docs | length }} sources)"}
  - {id: size, type: tool, python: word_count, args: {text: "{{ answer }}"}}
output: "{{ answer }} / {{ size }} words / top: {{ docs[0].source }}"
"""


@pytest.fixture(scope="module")
def project(server: RunningServer) -> Iterator[str]:
    _, key = _project_with_key(server, f"pipes-{secrets.token_hex(3)}")
    with _key_client(server, key) as client:
        assert client.post("/api/kbs", json={"name": "handbook"}).status_code == 201
        report = client.post(
            "/api/kbs/handbook/documents",
            json={
                "documents": [
                    {"source": "refunds.md", "text": "Refunds reach the card in five days."},
                    {"source": "login.md", "text": "Reset a password from the login page."},
                ]
            },
        ).json()
        assert report["index_version"] == 1
        saved = client.put(
            "/api/pipelines/support-answer",
            content=SUPPORT,
            headers={"content-type": "application/yaml"},
        )
        assert saved.status_code == 201, saved.text
        assert saved.json()["version"] == 1
    yield key


def test_run_is_traced_step_by_step(server, project) -> None:
    with _key_client(server, project) as client:
        run = client.post(
            "/api/pipelines/support-answer/run",
            json={"inputs": {"question": "How do refunds work?"}},
        ).json()
        assert run["status"] == "ok", run
        assert run["output"] == (
            "echo: How do refunds work? (2 sources) / 7 words / top: refunds.md"
        )
        assert [s["id"] for s in run["steps"]] == ["docs", "answer", "size"]
        spans = wait_for_trace(client, run["trace_id"])["spans"]
    by_kind: dict[str, list[dict]] = {}
    for span in spans:
        by_kind.setdefault(span["kind"], []).append(span)
    (root,) = by_kind["pipeline.run"]
    steps = {s["attributes"]["flywheel.pipeline.step"]: s for s in by_kind["pipeline.step"]}
    assert set(steps) == {"docs", "answer", "size"}
    assert all(s["parent_id"] == root["span_id"] for s in steps.values())
    # The model call and the retrieval nest under the steps that made them.
    (chat,) = by_kind["gateway.chat"]
    assert chat["parent_id"] == steps["answer"]["span_id"] and chat["route"] == "echo"
    (retrieval,) = by_kind["rag.retrieve"]
    assert retrieval["parent_id"] == steps["docs"]["span_id"]


def test_pipeline_route_over_the_openai_api(server, project) -> None:
    sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=project)
    answer = sdk.chat.completions.create(
        model="support-pipeline",
        messages=[{"role": "user", "content": "I forgot my password"}],
    )
    assert answer.choices[0].message.content == (
        "echo: I forgot my password (2 sources) / 7 words / top: login.md"
    )
    stream = sdk.chat.completions.create(
        model="pipeline:support-answer",
        messages=[{"role": "user", "content": "refunds"}],
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("echo: refunds (2 sources)")


def test_invalid_pipelines_are_refused_with_the_step_and_field(server, project) -> None:
    out_of_range = SUPPORT.replace("top_k: 2", "top_k: 0")
    misspelt = SUPPORT.replace('{{ answer }}"}', '{{ anser }}"}')
    yaml_headers = {"content-type": "application/yaml"}
    with _key_client(server, project) as client:
        refused = client.put(
            "/api/pipelines/support-answer", content=out_of_range, headers=yaml_headers
        )
        assert refused.status_code == 400
        message = refused.json()["error"]["message"]
        assert message.startswith("support-answer.yaml:6: step 'docs' (retrieve): top_k:")
        checked = client.post("/api/pipelines/validate", content=misspelt, headers=yaml_headers)
        problems = checked.json()["problems"]
        assert not checked.json()["valid"] and len(problems) == 1
        assert "step 'size' (tool)" in problems[0] and "'anser'" in problems[0]
        # The stored pipeline is untouched.
        assert client.get("/api/pipelines/support-answer").json()["version"] == 1
        missing = client.post("/api/pipelines/support-answer/run", json={"inputs": {}})
        assert missing.status_code == 400 and "question" in missing.json()["error"]["message"]
        unknown = client.post(
            "/v1/chat/completions",
            json={"model": "pipeline:nope", "messages": [{"role": "user", "content": "x"}]},
        )
        assert unknown.status_code == 404


def test_failed_step_answers_502_on_the_route(server, project) -> None:
    failing = SUPPORT.replace("name: support-answer", "name: failing").replace(
        "knowledge_base: handbook", "knowledge_base: missing-kb"
    )
    with _key_client(server, project) as client:
        assert (
            client.put(
                "/api/pipelines/failing",
                content=failing,
                headers={"content-type": "application/yaml"},
            ).status_code
            == 201
        )
        run = client.post("/api/pipelines/failing/run", json={"inputs": {"question": "x"}}).json()
        assert run["status"] == "error" and "missing-kb" in run["error"]
        assert [s["status"] for s in run["steps"]] == ["error", "skipped", "skipped"]
        call = client.post(
            "/v1/chat/completions",
            json={"model": "pipeline:failing", "messages": [{"role": "user", "content": "x"}]},
        )
        assert call.status_code == 502 and call.json()["error"]["code"] == "pipeline_failed"
        listed = client.get("/api/pipelines").json()["data"]
        assert {p["name"] for p in listed} == {"support-answer", "failing"}
        assert client.delete("/api/pipelines/failing").status_code == 204
        # Recreated under the same name (version 1 again), it runs its new steps.
        again = failing.replace("knowledge_base: missing-kb", "knowledge_base: handbook")
        yaml_type = {"content-type": "application/yaml"}
        assert (
            client.put("/api/pipelines/failing", content=again, headers=yaml_type).json()["version"]
            == 1
        )
        rerun = client.post("/api/pipelines/failing/run", json={"inputs": {"question": "x"}})
        assert rerun.json()["status"] == "ok"
