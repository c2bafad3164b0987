"""Shadow experiments end to end: a real server, the fake upstream, simulated traffic.

The control serves every call; the candidate's share of the calls is mirrored to it in the
background, traced with ``flywheel.shadow``. Online judges are simulated by writing their
scores into the server's database (what the online judging loop would write), and the
server's evaluator (ticking every half second here) decides.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import String, cast, select
from typer.testing import CliRunner

from flywheel.cli.experiments import experiments_app
from flywheel.experiments.assignment import assign
from flywheel.store import Database, SpanRecord
from flywheel.store.models import TraceScore
from flywheel.testing import FakeUpstream
from tests.conftest import RunningServer, start_server, stop_server, wait_for_trace
from tests.test_experiments import _allocation, _decided, _prompt

CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}", api_key: upstream-secret-key}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
  - {{name: up-echo-b, provider: up, upstream_name: echo}}
  - {{name: up-500, provider: up, upstream_name: fail-500}}
routes:
  - name: default
    targets: [{{model: up-echo}}]
  - name: shadow-prompt
    targets: [{{prompt: "critic@staging"}}]
  - name: shadow-broken
    targets: [{{model: up-echo}}]
    retry: {{attempts: 0}}
  - name: shadow-limited
    targets: [{{model: up-echo}}]
"""
JUDGE = "quality"


@pytest.fixture(scope="module")
def shadow_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[RunningServer]:
    home: Path = tmp_path_factory.mktemp("shadow-home")
    running = start_server(
        home,
        CONFIG.format(upstream=upstream.base_url),
        "fw-test-" + secrets.token_hex(16),
        extra_env={
            "FLYWHEEL_EXPERIMENT_INTERVAL": "0.5",
            "FLYWHEEL_JOB_CONCURRENCY": "0",
            "FLYWHEEL_PRELOAD_MODELS": "false",
        },
    )
    yield running
    stop_server(running)


@pytest.fixture
def api(shadow_server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {shadow_server.admin_key}"}
    with httpx.Client(base_url=shadow_server.base_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def db(shadow_server: RunningServer) -> Iterator[Database]:
    database = Database(shadow_server.database_url)
    yield database
    database.dispose()


def _create(api: httpx.Client, **body: object) -> dict[str, Any]:
    response = api.post("/api/experiments", json={"mode": "shadow", **body})
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    assert found["mode"] == "shadow"
    return found


def _spans(db: Database, experiment_id: str) -> list[Any]:
    """Every gateway span of the experiment, served and mirrored."""
    with db.session() as session:
        return list(
            session.scalars(
                select(SpanRecord).where(
                    SpanRecord.kind == "gateway.chat",
                    cast(SpanRecord.attributes, String).like(f"%{experiment_id}%"),
                )
            )
        )


def _wait_spans(db: Database, experiment_id: str, count: int) -> list[Any]:
    """The experiment's spans once ``count`` are stored (the writer stores in batches, and
    mirrored calls finish after the calls they copy)."""
    deadline = time.monotonic() + 15
    while True:
        found = _spans(db, experiment_id)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _score(db: Database, spans: list[Any], value_of: Any) -> None:
    """What an online judge would write: one score per trace."""
    now = time.time()
    with db.session() as session:
        for i, span in enumerate(spans):
            session.add(
                TraceScore(
                    project_id=span.project_id,
                    trace_id=span.trace_id,
                    span_id=span.span_id,
                    route=span.route,
                    name=JUDGE,
                    value=value_of(i, span),
                    source="judge",
                    created_at=now,
                )
            )


def test_the_control_serves_every_call_and_a_judged_win_is_only_recommended(
    api: httpx.Client, db: Database, shadow_server: RunningServer
) -> None:
    first = _prompt(api, "critic", "(v1)")
    second = _prompt(api, "critic", "(v2)")
    assert api.put("/api/prompts/critic/labels/staging", json={"version": first}).is_success
    experiment = _create(
        api,
        name="critic v2 shadow",
        route="shadow-prompt",
        variants=[
            {"name": "control", "share": 0.5},
            {"name": "v2", "prompt": f"critic@{second}", "share": 0.5},
        ],
        metric={"source": f"judge:{JUDGE}"},
        min_samples=20,
    )
    served: dict[str, str] = {}
    mirrored_users = set()
    for i in range(70):
        user = f"shadow-user-{i}"
        body: dict[str, Any] = {
            "model": "shadow-prompt",
            "user": user,
            "messages": [],
            "variables": {"question": "hi"},
            "stream": i % 10 == 0,
        }
        response = api.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        # Whatever the unit's variant, the caller gets the control's answer.
        text = (
            response.text if body["stream"] else response.json()["choices"][0]["message"]["content"]
        )
        assert "(v1)" in text and "(v2)" not in text, text
        served[response.headers["x-flywheel-trace-id"]] = user
        if assign(experiment["id"], user, _allocation(experiment)) == "v2":
            mirrored_users.add(user)
    assert 20 <= len(mirrored_users) <= 50

    spans = _wait_spans(db, experiment["id"], len(served) + len(mirrored_users))
    shadows = [s for s in spans if (s.attributes or {}).get("flywheel.shadow")]
    controls = [s for s in spans if not (s.attributes or {}).get("flywheel.shadow")]
    assert {s.trace_id for s in controls} == set(served)
    assert all(s.attributes["flywheel.experiment.variant"] == "control" for s in controls)
    assert len(shadows) == len(mirrored_users)
    for span in shadows:
        assert span.attributes["flywheel.experiment"] == experiment["id"]
        assert span.attributes["flywheel.experiment.variant"] == "v2"
        assert span.status == "ok" and span.stream is False  # a streamed call: mirrored whole
        # Each mirror names the served call it copies, on a trace of its own.
        assert served[span.attributes["flywheel.shadow.of"]] in mirrored_users
        assert span.trace_id not in served
        assert span.output["choices"][0]["message"]["content"].endswith("(v2)")
    # The trace API shows a mirrored call like any other.
    shown = wait_for_trace(api, shadows[0].trace_id)["spans"][0]
    assert shown["attributes"]["flywheel.shadow"] is True

    # The judge prefers the candidate's answers: 9 in 10 good against 3 in 10.
    _score(db, shadows, lambda i, _: 1.0 if i % 10 < 9 else 0.0)
    _score(db, controls, lambda i, _: 1.0 if i % 10 < 3 else 0.0)
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "finished", decided
    assert decided["outcome"]["action"] == "recommend" and decided["outcome"]["variant"] == "v2"
    assert decided["outcome"]["summary"] and "recommended" in decided["reason"]
    last = decided["looks"][-1]
    assert last["decision"] == "win"
    assert last["arms"]["v2"]["primary"]["n"] == len(shadows)
    assert last["arms"]["control"]["primary"]["n"] == len(controls)
    # Nothing served changed: the label still points at v1, and the route serves it.
    assert api.get("/api/prompts/critic", params={"label": "staging"}).json()["version"] == first
    after = api.post(
        "/v1/chat/completions",
        json={"model": "shadow-prompt", "user": "later", "variables": {"question": "hi"}},
    )
    assert after.json()["choices"][0]["message"]["content"].endswith("(v1)")
    listed = api.get("/api/experiments", params={"status": "finished"}).json()["data"]
    assert experiment["id"] in [e["id"] for e in listed]

    # The CLI and the UI show the mode and the outcome.
    runner = CliRunner()
    env = {
        "FLYWHEEL_BASE_URL": shadow_server.base_url,
        "FLYWHEEL_API_KEY": shadow_server.admin_key,
        "COLUMNS": "250",  # room for every column of the table
    }
    shown_cli = runner.invoke(experiments_app, ["show", experiment["id"]], env=env)
    assert shown_cli.exit_code == 0, shown_cli.output
    assert "(shadow)" in shown_cli.output and "recommend 'v2'" in shown_cli.output
    listed_cli = runner.invoke(experiments_app, ["list"], env=env)
    assert listed_cli.exit_code == 0 and "shadow" in listed_cli.output
    with httpx.Client(base_url=shadow_server.base_url, timeout=60) as ui:
        login = ui.post("/login", data={"api_key": shadow_server.admin_key, "next": "/"})
        ui.cookies.set("flywheel_session", login.cookies["flywheel_session"])
        page = ui.get(f"/experiments/{experiment['id']}")
        assert page.status_code == 200
        assert 'id="experiment-mode" data-mode="shadow"' in page.text
        assert 'data-outcome="recommend"' in page.text
        listing = ui.get("/experiments")
        assert 'data-mode="shadow"' in listing.text


def test_a_failing_candidate_never_fails_the_served_call_and_is_rejected(
    api: httpx.Client, db: Database
) -> None:
    experiment = _create(
        api,
        name="broken shadow",
        route="shadow-broken",
        variants=[{"name": "a", "share": 0.5}, {"name": "broken", "model": "up-500", "share": 0.5}],
        metric={"source": f"judge:{JUDGE}"},
        min_samples=1000,  # the judge could never decide this soon: the guardrail does
        guardrails={"max_error_rate_increase": 0.1, "min_samples": 10},
    )
    for i in range(40):
        response = api.post(
            "/v1/chat/completions",
            json={
                "model": "shadow-broken",
                "user": f"broken-user-{i}",
                "messages": [{"role": "user", "content": "hello"}],
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "echo: hello"
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "finished", decided
    assert decided["outcome"]["action"] == "reject"
    assert decided["reason"].startswith("guardrail breached by 'broken': error rate 100.0%")
    spans = _spans(db, experiment["id"])
    failed = [s for s in spans if (s.attributes or {}).get("flywheel.shadow")]
    assert failed and all(
        s.status == "error" and s.attempts[0]["model"] == "up-500" for s in failed
    )
    assert all(s.status == "ok" for s in spans if s not in failed)
    # The route was never changed: served as configured, with no experiment any more.
    config = api.get("/api/config/export").text
    assert "up-500" not in config.split("name: shadow-broken", 1)[1].split("- name:", 1)[0]


def test_mirrored_calls_do_not_count_against_the_callers_rate_limit(
    api: httpx.Client, db: Database, shadow_server: RunningServer
) -> None:
    experiment = _create(
        api,
        name="limited shadow",
        route="shadow-limited",
        variants=[{"name": "a", "share": 0.01}, {"name": "b", "model": "up-echo-b", "share": 0.99}],
        metric={"source": f"judge:{JUDGE}"},
    )
    limited = api.post(
        "/api/keys",
        json={"name": "limited", "role": "admin", "scope": "admin", "limits": {"rpm": 4}},
    )
    assert limited.status_code == 201, limited.text
    headers = {"Authorization": f"Bearer {limited.json()['key']}"}
    users = [
        u
        for u in (f"lim-{i}" for i in range(50))
        if assign(experiment["id"], u, _allocation(experiment)) == "b"
    ][:5]
    statuses = []
    with httpx.Client(base_url=shadow_server.base_url, headers=headers, timeout=60) as client:
        for user in users:
            response = client.post(
                "/v1/chat/completions",
                json={
                    "model": "shadow-limited",
                    "user": user,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            statuses.append(response.status_code)
    # Four calls fit the limit even though each was mirrored; the fifth is the caller's own.
    assert statuses == [200, 200, 200, 200, 429], statuses
    spans = _wait_spans(db, experiment["id"], 8)
    assert len([s for s in spans if (s.attributes or {}).get("flywheel.shadow")]) == 4
    assert api.post(f"/api/experiments/{experiment['id']}/stop").status_code == 200


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"metric": {"source": "feedback"}}, "metric.source"),
        ({}, "metric.source"),  # feedback is the default metric
        ({"mode": "mirror"}, "mode"),
    ],
)
def test_shadow_bad_input_is_a_400_naming_the_field(
    api: httpx.Client, change: dict[str, Any], param: str
) -> None:
    body = {
        "name": "bad",
        "route": "shadow-limited",
        "mode": "shadow",
        "variants": [
            {"name": "a", "share": 0.5},
            {"name": "b", "model": "up-echo-b", "share": 0.5},
        ],
        **change,
    }
    response = api.post("/api/experiments", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    if param == "metric.source":
        assert "feedback" in error["message"]
