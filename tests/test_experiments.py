"""Canary experiments end to end: a real server, the fake upstream, simulated traffic.

Each test starts an experiment on a route of its own, sends chat calls from many users,
rates the answers the way a better (or worse) variant would be rated, and waits for the
server's evaluator (ticking every half second here) to decide.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flywheel.cli.experiments import experiments_app
from flywheel.experiments.assignment import assign
from flywheel.experiments.evaluator import guardrail_breach
from flywheel.experiments.metrics import VariantMetrics
from flywheel.experiments.spec import Guardrails
from flywheel.experiments.stats import ArmStats
from flywheel.store import DEFAULT_PROJECT_ID, Database
from flywheel.store.models import Experiment
from flywheel.testing import FakeUpstream
from tests.conftest import RunningServer, start_server, stop_server, wait_for_trace

CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}", api_key: upstream-secret-key}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
  - {{name: up-echo-b, provider: up, upstream_name: echo}}
  - {{name: up-500, provider: up, upstream_name: fail-500}}
  - {{name: up-blocked, provider: up, upstream_name: echo, status: blocked}}
routes:
  - name: default
    targets: [{{model: up-echo}}]
  - name: exp-prompt
    targets: [{{prompt: "greeter@staging"}}]
  - name: exp-protected
    targets: [{{prompt: "shipper@production"}}]
  - name: exp-model-win
    targets: [{{model: up-echo}}]
    retry: {{attempts: 0}}
  - name: exp-model-loss
    targets: [{{model: up-echo}}]
    retry: {{attempts: 0}}
  - name: exp-guard
    targets: [{{model: up-echo}}]
    retry: {{attempts: 0}}
  - name: exp-sticky
    targets: [{{model: up-echo}}]
  - name: exp-pipeline
    pipeline: nothing
  - name: exp-recover
    targets: [{{model: up-echo}}]
  - name: exp-guard-hits
    targets: [{{prompt: "noisy@staging"}}]
    retry: {{attempts: 0}}
    guards:
      output:
        - {{type: banned_terms, name: fruit, action: flag, terms: [kumquat]}}
"""
DECIDE_WITHIN = 30.0
# Thumbs by position in a run of ten: the better arm is liked 9 times in 10, the other 3.
GOOD, POOR = 9, 3


@pytest.fixture(scope="module")
def exp_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[RunningServer]:
    home: Path = tmp_path_factory.mktemp("experiments-home")
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
def api(exp_server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {exp_server.admin_key}"}
    with httpx.Client(base_url=exp_server.base_url, headers=headers, timeout=60) as client:
        yield client


def _prompt(api: httpx.Client, name: str, suffix: str) -> int:
    response = api.post(
        "/api/prompts",
        json={
            "name": name,
            "template": [{"role": "user", "content": "{{ question }} " + suffix}],
            "model": "up-echo",
        },
    )
    assert response.status_code == 201, response.text
    return int(response.json()["version"])


def _create(api: httpx.Client, **body: object) -> dict:
    response = api.post("/api/experiments", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def _chat(api: httpx.Client, route: str, user: str, **extra: object) -> httpx.Response:
    body = {"model": route, "user": user, **extra}
    if "variables" not in extra:
        body["messages"] = [{"role": "user", "content": f"hello from {user}"}]
    return api.post("/v1/chat/completions", json=body)


def _allocation(experiment: dict) -> list[tuple[str, float]]:
    return [(v["name"], v["share"]) for v in experiment["variants"]]


def _rate(api: httpx.Client, trace_id: str, up: bool) -> None:
    deadline = time.monotonic() + 10
    while True:
        response = api.post(f"/api/traces/{trace_id}/feedback", json={"rating": up})
        if response.status_code == 201:
            return
        # The trace writer stores spans in batches: the trace may not be there yet.
        assert response.status_code == 404 and time.monotonic() < deadline, response.text
        time.sleep(0.05)


def _traffic(
    api: httpx.Client, experiment: dict, better: str | None, users: int, **extra: object
) -> dict[str, int]:
    """``users`` calls, each from a user of its own, rated: the ``better`` variant's answers
    are liked GOOD times in ten, the others POOR times. Returns calls per variant."""
    counts: dict[str, int] = {}
    rated: list[tuple[str, bool]] = []
    for i in range(users):
        user = f"{experiment['id'][:6]}-user-{i}"
        variant = assign(experiment["id"], user, _allocation(experiment))
        response = _chat(api, experiment["route"], user, **extra)
        assert response.status_code == 200, response.text
        counts[variant] = counts.get(variant, 0) + 1
        liked = (GOOD if variant == better else POOR) > counts[variant] % 10
        rated.append((response.headers["x-flywheel-trace-id"], liked))
    for trace_id, liked in rated:
        _rate(api, trace_id, liked)
    return counts


def _decided(
    api: httpx.Client,
    experiment_id: str,
    timeout: float = DECIDE_WITHIN,
    statuses: tuple[str, ...] = ("running", "promoting"),
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = api.get(f"/api/experiments/{experiment_id}").json()
        if found["status"] not in statuses:
            return found
        time.sleep(0.2)
    raise AssertionError(f"experiment {experiment_id} undecided after {timeout}s: {found}")


@contextmanager
def _ui(server: RunningServer) -> Iterator[httpx.Client]:
    """A UI client logged in with the admin key."""
    with httpx.Client(base_url=server.base_url, timeout=60, follow_redirects=False) as client:
        response = client.post("/login", data={"api_key": server.admin_key, "next": "/"})
        assert response.status_code == 303, response.text
        # The test server speaks plain HTTP; the cookie is marked Secure, so hand it over.
        client.cookies.set("flywheel_session", response.cookies["flywheel_session"])
        yield client


def _audit_actions(api: httpx.Client, experiment_id: str) -> list[str]:
    events = api.get("/api/audit", params={"limit": 500}).json()["data"]
    return [e["action"] for e in events if e.get("resource_id") == experiment_id]


def test_a_better_prompt_version_is_promoted_by_moving_the_label(
    api: httpx.Client, exp_server: RunningServer
) -> None:
    first = _prompt(api, "greeter", "(v1)")
    second = _prompt(api, "greeter", "(v2)")
    assert api.put("/api/prompts/greeter/labels/staging", json={"version": first}).is_success
    experiment = _create(
        api,
        name="greeter v2",
        route="exp-prompt",
        variants=[
            {"name": "control", "share": 0.5},
            {"name": "v2", "prompt": f"greeter@{second}", "share": 0.5},
        ],
        metric={"source": "feedback"},
        min_samples=30,
    )
    assert experiment["status"] == "running" and experiment["control"] == "control"
    # Each answer says which prompt version rendered it (the echo upstream repeats it).
    seen = {}
    for i in range(6):
        user = f"probe-{i}"
        variant = assign(experiment["id"], user, _allocation(experiment))
        answer = _chat(api, "exp-prompt", user, variables={"question": "hi"}, messages=[])
        assert answer.status_code == 200, answer.text
        text = answer.json()["choices"][0]["message"]["content"]
        assert text.endswith("(v2)" if variant == "v2" else "(v1)"), (variant, text)
        seen[variant] = answer.headers["x-flywheel-trace-id"]
    for variant, trace_id in seen.items():
        span = wait_for_trace(api, trace_id)["spans"][0]
        assert span["attributes"]["flywheel.experiment"] == experiment["id"]
        assert span["attributes"]["flywheel.experiment.variant"] == variant

    counts = _traffic(api, experiment, "v2", 90, variables={"question": "hi"}, messages=[])
    assert min(counts.values()) >= 30, counts
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "promoted", decided
    assert decided["outcome"]["label"] == "staging"
    assert "'v2' won" in decided["reason"]
    labels = api.get("/api/prompts/greeter").json()
    assert api.get("/api/prompts/greeter", params={"label": "staging"}).json()["version"] == (
        second
    ), labels
    looks = decided["looks"]
    assert looks and looks[-1]["decision"] == "win" and looks[-1]["p_value"] <= 0.05
    assert looks[-1]["arms"]["v2"]["primary"]["n"] >= 30
    # A finished experiment takes no more traffic: the route serves its label (now v2).
    after = _chat(api, "exp-prompt", "late-user", variables={"question": "hi"}, messages=[])
    assert after.json()["choices"][0]["message"]["content"].endswith("(v2)")
    assert "experiment.create" in _audit_actions(api, experiment["id"])
    assert "experiment.promoted" in _audit_actions(api, experiment["id"])
    # The UI charts the looks.
    with _ui(exp_server) as ui:
        page = ui.get(f"/experiments/{experiment['id']}")
        assert page.status_code == 200 and 'id="experiment-means"' in page.text, page.text
        assert "data-series=" in page.text and "promoted" in page.text
        listing = ui.get("/experiments")
        assert listing.status_code == 200 and "greeter v2" in listing.text


def test_a_win_on_a_protected_label_requests_an_approval(
    api: httpx.Client, exp_server: RunningServer
) -> None:
    first = _prompt(api, "shipper", "(v1)")
    second = _prompt(api, "shipper", "(v2)")
    reviewer = api.post(
        "/api/keys", json={"name": "reviewer", "role": "reviewer", "scope": "admin"}
    ).json()["key"]
    approval = api.post("/api/approvals", json={"name": "shipper", "version": first}).json()
    approved = httpx.post(
        f"{exp_server.base_url}/api/approvals/{approval['id']}/approve",
        headers={"Authorization": f"Bearer {reviewer}"},
        json={},
    )
    assert approved.status_code == 200, approved.text
    experiment = _create(
        api,
        name="shipper v2",
        route="exp-protected",
        variants=[
            {"name": "control", "share": 0.5},
            {"name": "v2", "prompt": f"shipper@{second}", "share": 0.5},
        ],
        min_samples=30,
    )
    _traffic(api, experiment, "v2", 90, variables={"question": "hi"}, messages=[])
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "awaiting_approval", decided
    pending = api.get("/api/approvals", params={"status": "pending"}).json()["data"]
    request = next(a for a in pending if a["id"] == decided["outcome"]["approval_id"])
    assert (request["name"], request["version"], request["label"]) == (
        "shipper",
        second,
        "production",
    )
    # The label has not moved: it waits for a reviewer.
    current = api.get("/api/prompts/shipper", params={"label": "production"}).json()
    assert current["version"] == first
    # Once the reviewer approves, the evaluator's next tick marks the experiment promoted.
    approved = httpx.post(
        f"{exp_server.base_url}/api/approvals/{request['id']}/approve",
        headers={"Authorization": f"Bearer {reviewer}"},
        json={},
    )
    assert approved.status_code == 200, approved.text
    decided = _decided(api, experiment["id"], statuses=("awaiting_approval",))
    assert decided["status"] == "promoted", decided
    assert f"approval {request['id']} approved by" in decided["reason"]
    assert decided["outcome"]["approval_status"] == "approved"
    current = api.get("/api/prompts/shipper", params={"label": "production"}).json()
    assert current["version"] == second


def _insert(exp_server: RunningServer, route: str, status: str, **fields: object) -> str:
    """An experiment row as a replica left it (a decision taken, its follow-up pending)."""
    experiment_id = secrets.token_hex(16)
    values: dict[str, object] = {
        "id": experiment_id,
        "project_id": DEFAULT_PROJECT_ID,
        "route": route,
        "name": f"left {status}",
        "status": status,
        "mode": "canary",
        "variants": [
            {"name": "a", "share": 0.5, "prompt": None, "model": None},
            {"name": "b", "share": 0.5, "prompt": None, "model": "up-echo-b"},
        ],
        "control": "a",
        "unit": "user",
        "primary_metric": {"source": "feedback", "higher_is_better": True},
        "guardrails": Guardrails().model_dump(),
        "alpha": 0.05,
        "tau": 0.1,
        "min_samples": 100,
        "created_at": time.time() - 600,
        "created_by": "test",
        "decided_at": time.time(),
        "decided_by": "system:experiments",
        "reason": "'b' won (delta +0.500)",
        "outcome": {"action": "promote", "variant": "b", "summary": "delta +0.500"},
        **fields,
    }
    db = Database(exp_server.database_url)
    try:
        with db.session() as session:
            session.add(Experiment(**values))
    finally:
        db.dispose()
    return experiment_id


def test_a_rejected_approval_rolls_the_waiting_experiment_back(
    api: httpx.Client, exp_server: RunningServer
) -> None:
    first = _prompt(api, "rejecter", "(v1)")
    approval = api.post("/api/approvals", json={"name": "rejecter", "version": first})
    assert approval.status_code == 201, approval.text
    approval_id = approval.json()["id"]
    experiment_id = _insert(
        exp_server,
        "exp-protected",
        "awaiting_approval",
        outcome={"action": "promote", "variant": "b", "approval_id": approval_id},
    )
    time.sleep(1.0)  # a tick or two: a pending approval leaves it waiting
    assert api.get(f"/api/experiments/{experiment_id}").json()["status"] == "awaiting_approval"
    rejected = api.post(f"/api/approvals/{approval_id}/reject", json={"comment": "no"})
    assert rejected.status_code == 200, rejected.text
    decided = _decided(api, experiment_id, statuses=("awaiting_approval",))
    assert decided["status"] == "rolled_back", decided
    assert f"approval {approval_id} was rejected" in decided["reason"]
    assert "experiment.rolled_back" in _audit_actions(api, experiment_id)


def _config_applies(api: httpx.Client) -> int:
    events = api.get("/api/audit", params={"action": "config.apply", "limit": 500}).json()
    return len(events["data"])


def test_a_promotion_left_half_done_is_resumed_once(
    api: httpx.Client, exp_server: RunningServer
) -> None:
    # Left "promoting" two minutes ago by a replica that died before the config revision.
    first = _insert(exp_server, "exp-recover", "promoting", decided_at=time.time() - 120)
    # One its replica is still promoting (decided recently) is left alone.
    fresh = _insert(exp_server, "exp-sticky", "promoting", decided_at=time.time() + 3600)
    decided = _decided(api, first, statuses=("promoting",))
    assert decided["status"] == "promoted", decided
    assert decided["outcome"]["resumed"] is True
    assert isinstance(decided["outcome"]["revision"], int)
    exported = api.get("/api/config/export").text
    route_part = exported.split("name: exp-recover", 1)[1].split("- name:", 1)[0]
    assert "up-echo-b" in route_part, route_part
    applied = _config_applies(api)
    # The same promotion left again: the route serves the model already, so no new revision.
    again = _insert(exp_server, "exp-recover", "promoting", decided_at=time.time() - 120)
    decided = _decided(api, again, statuses=("promoting",))
    assert decided["status"] == "promoted" and decided["outcome"]["revision"] is None, decided
    assert _config_applies(api) == applied
    assert api.get(f"/api/experiments/{fresh}").json()["status"] == "promoting"


def test_a_better_model_is_promoted_with_a_config_revision(api: httpx.Client) -> None:
    experiment = _create(
        api,
        name="model b",
        route="exp-model-win",
        variants=[{"name": "a", "share": 0.5}, {"name": "b", "model": "up-echo-b", "share": 0.5}],
        min_samples=30,
    )
    _traffic(api, experiment, "b", 90)
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "promoted", decided
    revision = decided["outcome"]["revision"]
    assert isinstance(revision, int)
    exported = api.get("/api/config/export").text
    route_part = exported.split("name: exp-model-win", 1)[1].split("- name:", 1)[0]
    assert "up-echo-b" in route_part, route_part
    answer = _chat(api, "exp-model-win", "anyone")
    span = wait_for_trace(api, answer.headers["x-flywheel-trace-id"])["spans"][0]
    assert span["model"] == "up-echo-b" and "flywheel.experiment" not in (span["attributes"] or {})


def test_a_worse_model_is_rolled_back(api: httpx.Client) -> None:
    experiment = _create(
        api,
        name="model b worse",
        route="exp-model-loss",
        variants=[{"name": "a", "share": 0.5}, {"name": "b", "model": "up-echo-b", "share": 0.5}],
        min_samples=30,
    )
    _traffic(api, experiment, "a", 90)
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "rolled_back", decided
    assert "significantly worse" in decided["reason"]
    assert decided["looks"][-1]["decision"] == "loss"
    assert "experiment.rolled_back" in _audit_actions(api, experiment["id"])
    # Rolled back: every call is served as configured again, with no experiment.
    for i in range(5):
        answer = _chat(api, "exp-model-loss", f"after-{i}")
        span = wait_for_trace(api, answer.headers["x-flywheel-trace-id"])["spans"][0]
        assert span["model"] == "up-echo" and "flywheel.experiment" not in (
            span["attributes"] or {}
        )


def test_a_failing_candidate_breaches_the_error_guardrail_at_once(api: httpx.Client) -> None:
    experiment = _create(
        api,
        name="broken model",
        route="exp-guard",
        variants=[{"name": "a", "share": 0.5}, {"name": "broken", "model": "up-500", "share": 0.5}],
        min_samples=1000,  # the primary metric could never decide this soon
        guardrails={"max_error_rate_increase": 0.1, "min_samples": 10},
    )
    failed = 0
    for i in range(40):
        response = _chat(api, "exp-guard", f"guard-user-{i}")
        failed += response.status_code >= 500
    assert failed >= 10
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "rolled_back", decided
    assert decided["reason"].startswith("guardrail breached by 'broken': error rate 100.0%")
    assert decided["looks"][-1]["decision"] == "breach"
    # No one is sent to the broken model any more.
    assert all(_chat(api, "exp-guard", f"guard-user-{i}").status_code == 200 for i in range(10))


def test_more_guard_hits_breach_the_guard_guardrail(api: httpx.Client) -> None:
    first = _prompt(api, "noisy", "(v1)")
    second = _prompt(api, "noisy", "kumquat (v2)")
    assert api.put("/api/prompts/noisy/labels/staging", json={"version": first}).is_success
    experiment = _create(
        api,
        name="noisy v2",
        route="exp-guard-hits",
        variants=[
            {"name": "a", "share": 0.5},
            {"name": "v2", "prompt": f"noisy@{second}", "share": 0.5},
        ],
        min_samples=1000,
        guardrails={"max_guard_hit_rate_increase": 0.2, "min_samples": 10},
    )
    for i in range(40):
        response = _chat(api, "exp-guard-hits", f"noisy-{i}", variables={"question": "hi"})
        assert response.status_code == 200, response.text  # flagged, still served
    decided = _decided(api, experiment["id"])
    assert decided["status"] == "rolled_back", decided
    assert decided["reason"].startswith("guardrail breached by 'v2': guard hit rate 100.0%")
    arms = decided["looks"][-1]["arms"]
    assert arms["a"]["guard_hits"]["total"] == 0 and arms["v2"]["guard_hits"]["n"] >= 10


def test_assignment_is_sticky_and_stop_ends_the_experiment(
    api: httpx.Client, exp_server: RunningServer
) -> None:
    experiment = _create(
        api,
        name="sticky",
        route="exp-sticky",
        variants=[{"name": "a", "share": 0.5}, {"name": "b", "model": "up-echo-b", "share": 0.5}],
    )
    variants: dict[str, set[str]] = {}
    traces = []
    for _ in range(3):
        for user in ("ann", "bob", "cyd", "dee"):
            answer = _chat(api, "exp-sticky", user)
            traces.append((user, answer.headers["x-flywheel-trace-id"]))
    for user, trace_id in traces:
        span = wait_for_trace(api, trace_id)["spans"][0]
        variants.setdefault(user, set()).add(span["attributes"]["flywheel.experiment.variant"])
        expected = assign(experiment["id"], user, _allocation(experiment))
        assert span["attributes"]["flywheel.experiment.variant"] == expected
        assert span["model"] == ("up-echo-b" if expected == "b" else "up-echo")
    assert all(len(found) == 1 for found in variants.values()), variants
    # A streamed call is assigned the same way.
    streamed = _chat(api, "exp-sticky", "ann", stream=True)
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    span = wait_for_trace(api, streamed.headers["x-flywheel-trace-id"])["spans"][0]
    assert span["attributes"]["flywheel.experiment.variant"] == variants["ann"].pop()
    # A second experiment on the same route is refused while this one runs.
    again = api.post(
        "/api/experiments",
        json={
            "name": "twice",
            "route": "exp-sticky",
            "variants": [
                {"name": "a", "share": 0.5},
                {"name": "b", "model": "up-echo-b", "share": 0.5},
            ],
        },
    )
    assert again.status_code == 409 and again.json()["error"]["param"] == "route"

    # The CLI (its Typer app, against this server) lists, shows and stops it.
    runner = CliRunner()
    env = {"FLYWHEEL_BASE_URL": exp_server.base_url, "FLYWHEEL_API_KEY": exp_server.admin_key}
    listed = runner.invoke(experiments_app, ["list"], env=env)
    assert listed.exit_code == 0 and experiment["id"] in listed.output, listed.output
    shown = runner.invoke(experiments_app, ["show", experiment["id"]], env=env)
    assert shown.exit_code == 0 and "sticky" in shown.output, shown.output
    stopped = runner.invoke(experiments_app, ["stop", experiment["id"]], env=env)
    assert stopped.exit_code == 0 and "stopped" in stopped.output, stopped.output
    assert api.get(f"/api/experiments/{experiment['id']}").json()["status"] == "stopped"
    twice = api.post(f"/api/experiments/{experiment['id']}/stop")
    assert twice.status_code == 409
    answer = _chat(api, "exp-sticky", "ann")
    span = wait_for_trace(api, answer.headers["x-flywheel-trace-id"])["spans"][0]
    assert "flywheel.experiment" not in (span["attributes"] or {})
    listed = api.get("/api/experiments", params={"status": "stopped"}).json()["data"]
    assert [e["id"] for e in listed] == [experiment["id"]]
    # The CLI creates one too (and the server checks it like any other).
    created = runner.invoke(
        experiments_app,
        ["create", "cli", "--route", "exp-sticky", "--model", "up-echo-b", "--share", "0.2"],
        env=env,
    )
    assert created.exit_code == 0 and "running on route exp-sticky" in created.output
    refused = runner.invoke(
        experiments_app, ["create", "cli2", "--route", "nope", "--model", "up-echo-b"], env=env
    )
    assert refused.exit_code == 1 and "No route 'nope'" in refused.output


GOOD_BODY = {
    "name": "x",
    "route": "exp-sticky",
    "variants": [{"name": "a", "share": 0.5}, {"name": "b", "model": "up-echo-b", "share": 0.5}],
}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"route": "no-such-route"}, "route"),
        ({"route": "exp-pipeline"}, "route"),
        ({"variants": [{"name": "a", "share": 1.0}]}, "variants"),
        ({"variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.6}]}, "variants"),
        ({"variants": [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}]}, "variants"),
        (
            {"variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]},
            "variants",
        ),
        (
            {
                "variants": [
                    {"name": "a", "share": 0.5},
                    {"name": "b", "model": "nope", "share": 0.5},
                ]
            },
            "variants.1.model",
        ),
        (
            {
                "variants": [
                    {"name": "a", "share": 0.5},
                    {"name": "b", "model": "up-blocked", "share": 0.5},
                ]
            },
            "variants.1.model",
        ),
        (
            {
                "route": "exp-prompt",
                "variants": [
                    {"name": "a", "share": 0.5},
                    {"name": "b", "prompt": "greeter@latest", "share": 0.5},
                ],
            },
            "variants.1.prompt",
        ),
        (
            {
                "route": "exp-prompt",
                "variants": [
                    {"name": "a", "share": 0.5},
                    {"name": "b", "prompt": "other@1", "share": 0.5},
                ],
            },
            "variants.1.prompt",
        ),
        ({"control": "c"}, "control"),
        ({"unit": "cookie"}, "unit"),
        ({"metric": {"source": "vibes"}}, "metric.source"),
        ({"alpha": 1.5}, "alpha"),
        ({"min_samples": 1}, "min_samples"),
        ({"guardrails": {"max_error_rate_increase": -1}}, "guardrails.max_error_rate_increase"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(api: httpx.Client, change: dict, param: str) -> None:
    response = api.post("/api/experiments", json={**GOOD_BODY, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_unknown_experiments_are_404(api: httpx.Client, exp_server: RunningServer) -> None:
    assert api.get("/api/experiments/nope").status_code == 404
    assert api.post("/api/experiments/nope/stop").status_code == 404
    assert api.get("/api/experiments", params={"status": "weird"}).status_code == 400
    with _ui(exp_server) as ui:
        assert ui.get("/experiments/nope").status_code == 404


def _arm(errors: int, calls: int, latency_ms: float, cost: float) -> VariantMetrics:
    arm = VariantMetrics()
    arm.errors = ArmStats.of([1.0] * errors + [0.0] * (calls - errors))
    arm.latencies = [latency_ms] * calls
    arm.cost = ArmStats.of([cost] * calls)
    return arm


def test_guardrails_need_samples_and_allow_jitter() -> None:
    rules = Guardrails(max_cost_ratio=2.0).model_dump()
    control = _arm(0, 20, 5.0, 0.001)
    # Too few calls to judge, however bad.
    assert guardrail_breach(rules, control, _arm(5, 5, 5.0, 0.001)) is None
    assert "error rate" in (guardrail_breach(rules, control, _arm(2, 20, 5.0, 0.001)) or "")
    assert guardrail_breach(rules, control, _arm(1, 20, 5.0, 0.001)) is None  # +5 % is allowed
    # Four times slower, but by milliseconds: jitter, not a breach; by seconds: a breach.
    assert guardrail_breach(rules, control, _arm(0, 20, 20.0, 0.001)) is None
    slow = guardrail_breach(rules, _arm(0, 20, 500.0, 0.001), _arm(0, 20, 2000.0, 0.001))
    assert slow is not None and slow.startswith("p95 latency 2000 ms")
    assert "mean cost" in (guardrail_breach(rules, control, _arm(0, 20, 5.0, 0.003)) or "")
    # Guard hits: off by default; with a limit, a share of calls with hits above it breaches.
    flagged = _arm(0, 20, 5.0, 0.001)
    flagged.guard_hits = ArmStats.of([1.0] * 6 + [0.0] * 14)
    assert guardrail_breach(rules, control, flagged) is None
    rules["max_guard_hit_rate_increase"] = 0.25
    assert guardrail_breach(rules, control, flagged) == (
        "guard hit rate 30.0% against the control's 0.0% (allowed: +25.0%)"
    )
    flagged.guard_hits = ArmStats.of([1.0] * 5 + [0.0] * 15)
    assert guardrail_breach(rules, control, flagged) is None
