"""The edges of ``flywheel loop``: the API, the CLI, the SDK, the UI timeline and RBAC.

A real server of its own (so its routes and loops are this module's), with jobs enabled but
no job slots (``FLYWHEEL_JOB_CONCURRENCY=0``): the driver submits each loop's first job,
which stays queued, so nothing here trains (tests/test_loop.py runs a whole loop). A loop
whose steps are all done is made by writing its steps through :class:`LoopStore` directly.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from flywheel.cli.common import console
from flywheel.cli.loops import follow
from flywheel.cli.main import app as cli_app
from flywheel.loop import STEPS, LoopStore
from flywheel.sdk import Client, FlywheelError
from flywheel.security.audit import AuditLog
from flywheel.store import Database
from flywheel.testing import FakeUpstream
from tests.conftest import RunningServer, start_server, stop_server

CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}", api_key: upstream-secret-key}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - name: default
    targets: [{{model: up-echo}}]
  - name: loop-a
    targets: [{{model: up-echo}}]
  - name: loop-b
    targets: [{{model: up-echo}}]
  - name: loop-cli
    targets: [{{model: up-echo}}]
  - name: loop-sdk
    targets: [{{model: up-echo}}]
  - name: loop-ui
    targets: [{{model: up-echo}}]
  - name: loop-form
    targets: [{{model: up-echo}}]
  - name: loop-prompt
    targets: [{{prompt: "greeter@staging"}}]
"""


@pytest.fixture(scope="module")
def loop_server(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[RunningServer]:
    home: Path = tmp_path_factory.mktemp("loop-api-home")
    running = start_server(
        home,
        CONFIG.format(upstream=upstream.base_url),
        "fw-test-" + secrets.token_hex(16),
        extra_env={
            "FLYWHEEL_JOB_CONCURRENCY": "0",
            "FLYWHEEL_LOOP_INTERVAL": "0.3",
            "FLYWHEEL_PRELOAD_MODELS": "false",
        },
    )
    yield running
    stop_server(running)


@pytest.fixture
def api(loop_server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {loop_server.admin_key}"}
    with httpx.Client(base_url=loop_server.base_url, headers=headers, timeout=60) as client:
        yield client


def _start(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = api.post("/api/loops", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def _cancel_active(api: httpx.Client, route: str) -> None:
    for loop in api.get("/api/loops").json()["data"]:
        if loop["route"] == route and loop["status"] in ("running", "waiting", "failed"):
            api.post(f"/api/loops/{loop['id']}/cancel")


def _refusal(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"], error
    return dict(error)


def _wait_for(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)


# -- API --------------------------------------------------------------------------------------


def test_start_list_show_and_one_loop_per_route(api: httpx.Client) -> None:
    loop = _start(api, route="loop-a", method="dpo", min_examples=3, canary={"share": 0.2})
    assert loop["route"] == "loop-a" and loop["status"] == "running"
    assert loop["step"] == "collect"
    assert [s["name"] for s in loop["steps"]] == list(STEPS) and len(STEPS) == 8
    assert all(s["status"] == "pending" for s in loop["steps"])
    assert loop["spec"]["method"] == "dpo" and loop["spec"]["min_examples"] == 3
    assert loop["spec"]["canary"]["share"] == 0.2
    # Defaults fill in what was not given.
    assert loop["spec"]["canary"]["min_samples"] == 100 and loop["spec"]["gate"]["alpha"] == 0.05

    listed = api.get("/api/loops").json()["data"]
    assert loop["id"] in [row["id"] for row in listed]
    running = api.get("/api/loops", params={"status": "running"}).json()["data"]
    assert loop["id"] in [row["id"] for row in running]
    assert loop["id"] not in [
        row["id"] for row in api.get("/api/loops", params={"status": "promoted"}).json()["data"]
    ]
    _refusal(api.get("/api/loops", params={"status": "sideways"}), 400)

    shown = api.get(f"/api/loops/{loop['id']}").json()
    assert shown["id"] == loop["id"] and len(shown["steps"]) == 8
    _refusal(api.get("/api/loops/" + "0" * 32), 404)

    # The driver submits the collect step's job (queued: this server runs no jobs).
    def collect_job() -> str | None:
        step = api.get(f"/api/loops/{loop['id']}").json()["steps"][0]
        return step["job_id"] if step["status"] == "running" else None

    job_id = _wait_for(collect_job)
    job = api.get(f"/api/jobs/{job_id}").json()
    assert job["kind"] == "loop.step" and job["params"]["step"] == "collect"

    second = api.post("/api/loops", json={"route": "loop-a"})
    error = _refusal(second, 409)
    assert loop["id"] in error["message"]

    cancelled = api.post(f"/api/loops/{loop['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    # Its queued job is cancelled with it.
    assert _wait_for(lambda: api.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled")
    _refusal(api.post(f"/api/loops/{loop['id']}/cancel"), 409)
    _refusal(api.post(f"/api/loops/{loop['id']}/resume"), 409)
    # Once it ended, the route takes a new loop.
    again = _start(api, route="loop-a")
    _refusal(api.post(f"/api/loops/{again['id']}/resume"), 409)  # running, not failed
    api.post(f"/api/loops/{again['id']}/cancel")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"route": "loop-b", "surprise": 1}, "surprise"),
        ({"route": "loop-b", "method": "ppo"}, "method"),
        ({"route": "loop-b", "canary": {"share": 1.5}}, "canary.share"),
        ({"route": "loop-b", "canary": {"unit": "planet"}}, "canary.unit"),
        ({"route": "loop-b", "min_examples": 0}, "min_examples"),
        ({"route": "no-such-route"}, "route"),
        ({"route": "loop-prompt"}, "route"),
        ({"method": "sft"}, "route"),
    ],
)
def test_bad_bodies_name_the_field(api: httpx.Client, body: dict[str, Any], field: str) -> None:
    error = _refusal(api.post("/api/loops", json=body), 400)
    assert error["param"] == field, error
    assert field.split(".")[-1] in error["message"] or field == "route", error


def test_not_json_and_not_an_object(api: httpx.Client) -> None:
    _refusal(
        api.post("/api/loops", content=b"{nope", headers={"content-type": "application/json"}), 400
    )
    _refusal(api.post("/api/loops", json=["loop-b"]), 400)


# -- RBAC -------------------------------------------------------------------------------------


def _key(api: httpx.Client, role: str, scope: str) -> str:
    response = api.post(
        "/api/keys", json={"name": f"loop {role}/{scope}", "role": role, "scope": scope}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


def test_read_only_keys_see_loops_but_cannot_steer_them(
    api: httpx.Client, loop_server: RunningServer
) -> None:
    loop = _start(api, route="loop-b")
    try:
        for role, scope in (("viewer", "admin"), ("admin", "read"), ("developer", "admin")):
            key = _key(api, role, scope)
            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=loop_server.base_url, headers=headers) as client:
                listed = client.get("/api/loops")
                assert listed.status_code == 200, (role, scope, listed.text)
                assert loop["id"] in [r["id"] for r in listed.json()["data"]]
                assert client.get(f"/api/loops/{loop['id']}").status_code == 200
                # Starting and steering a loop applies config: instance admins only.
                _refusal(client.post("/api/loops", json={"route": "loop-b"}), 403)
                _refusal(client.post(f"/api/loops/{loop['id']}/cancel"), 403)
                _refusal(client.post(f"/api/loops/{loop['id']}/resume"), 403)
        assert api.get(f"/api/loops/{loop['id']}").json()["status"] == "running"
        gateway = _key(api, "developer", "gateway")
        with httpx.Client(
            base_url=loop_server.base_url, headers={"Authorization": f"Bearer {gateway}"}
        ) as client:
            _refusal(client.get("/api/loops"), 403)
    finally:
        api.post(f"/api/loops/{loop['id']}/cancel")


# -- CLI --------------------------------------------------------------------------------------


def test_cli_starts_lists_shows_and_cancels(
    api: httpx.Client, loop_server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI's console took its width when first imported (80 columns without a terminal):
    # wide enough for the tables' whole ids.
    monkeypatch.setattr(console, "width", 250)
    runner = CliRunner()
    env = {
        "FLYWHEEL_BASE_URL": loop_server.base_url,
        "FLYWHEEL_API_KEY": loop_server.admin_key,
        "COLUMNS": "250",
    }
    spec = tmp_path / "loop.yaml"
    spec.write_text("method: dpo\ncanary:\n  share: 0.3\n  min_samples: 50\njudge: helpful\n")
    started = runner.invoke(
        cli_app,
        ["loop", "loop-cli", "--spec", str(spec), "--min-examples", "4", "--min-samples", "60"],
        env=env,
    )
    assert started.exit_code == 0, started.output
    loop_id = re.search(r"loop ([0-9a-f]{32}) started on route loop-cli", started.output)
    assert loop_id, started.output
    loop = api.get(f"/api/loops/{loop_id.group(1)}").json()
    # The file, with the flags on top.
    assert loop["spec"]["method"] == "dpo" and loop["spec"]["judge"] == "helpful"
    assert loop["spec"]["min_examples"] == 4
    assert loop["spec"]["canary"] == {**loop["spec"]["canary"], "share": 0.3, "min_samples": 60}

    listed = runner.invoke(cli_app, ["loops", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert loop["id"] in listed.output and "loop-cli" in listed.output

    shown = runner.invoke(cli_app, ["loops", "show", loop["id"]], env=env)
    assert shown.exit_code == 0, shown.output
    for name in STEPS:
        assert name in shown.output, shown.output
    as_json = runner.invoke(cli_app, ["loops", "show", loop["id"], "--json"], env=env)
    assert as_json.exit_code == 0 and '"route": "loop-cli"' in as_json.output

    refused = runner.invoke(cli_app, ["loop", "loop-cli"], env=env)
    assert refused.exit_code == 1 and "already running" in refused.output, refused.output
    resumed = runner.invoke(cli_app, ["loops", "resume", loop["id"]], env=env)
    assert resumed.exit_code == 1 and "only a failed loop resumes" in resumed.output
    cancelled = runner.invoke(cli_app, ["loops", "cancel", loop["id"]], env=env)
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output, cancelled.output

    bad_method = runner.invoke(cli_app, ["loop", "loop-cli", "--method", "ppo"], env=env)
    assert bad_method.exit_code == 1 and "method" in bad_method.output, bad_method.output


def test_cli_names_the_line_of_a_bad_spec_file(loop_server: RunningServer, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"FLYWHEEL_BASE_URL": loop_server.base_url, "FLYWHEEL_API_KEY": loop_server.admin_key}
    bad_value = tmp_path / "bad.yaml"
    bad_value.write_text("method: sft\ncanary:\n  share: 1.5\n")
    result = runner.invoke(cli_app, ["loop", "loop-cli", "--spec", str(bad_value)], env=env)
    assert result.exit_code == 1
    assert f"{bad_value}:3: canary.share:" in result.output, result.output

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: sft\n\nwindow_hourz: 3\n")
    result = runner.invoke(cli_app, ["loop", "loop-cli", "--spec", str(unknown)], env=env)
    assert result.exit_code == 1 and f"{unknown}:3: window_hourz:" in result.output, result.output

    broken = tmp_path / "broken.yaml"
    broken.write_text("method: sft\ncanary: [share\n")
    result = runner.invoke(cli_app, ["loop", "loop-cli", "--spec", str(broken)], env=env)
    assert result.exit_code == 1 and f"{broken}:" in result.output
    assert "invalid YAML" in result.output, result.output

    # A flag's problem names the flag, even with a spec file.
    fine = tmp_path / "fine.yaml"
    fine.write_text("method: sft\n")
    result = runner.invoke(
        cli_app, ["loop", "loop-cli", "--spec", str(fine), "--canary-share", "2"], env=env
    )
    assert result.exit_code == 1 and "--canary-share:" in result.output, result.output

    missing = runner.invoke(
        cli_app, ["loop", "loop-cli", "--spec", str(tmp_path / "nope.yaml")], env=env
    )
    assert missing.exit_code == 1 and "nope.yaml:0: cannot read the file" in missing.output


def test_cli_follow_stops_at_the_approval(api: httpx.Client, loop_server: RunningServer) -> None:
    loop = _start(api, route="loop-cli")
    steps = _finished_steps(loop)
    for name in ("canary", "decision"):
        steps[name].update(status="pending", job_id=None, jobs=[], result=None, attempts=0)
    steps["approval"]["status"] = "waiting"
    steps["approval"]["result"].pop("approved_by")
    _write_steps(
        loop_server, loop["id"], status="waiting", step="approval", steps=steps, reason="waiting"
    )
    try:
        with (
            Client(loop_server.base_url, loop_server.admin_key) as client,
            console.capture() as captured,
        ):
            final = follow(client, client.loops.get(loop["id"]), poll=0.1)
        assert final["status"] == "waiting"
        text = " ".join(captured.get().split())
        assert "appr0123456789abcdef" in text and "approvals:decide" in text, text
        assert "/api/approvals/appr0123456789abcdef/approve" in text, text
    finally:
        api.post(f"/api/loops/{loop['id']}/cancel")


# -- SDK --------------------------------------------------------------------------------------


def test_sdk(loop_server: RunningServer) -> None:
    with Client(loop_server.base_url, loop_server.admin_key) as client:
        loop = client.loops.start("loop-sdk", method="sft", canary={"min_samples": 10})
        assert loop["spec"]["canary"]["min_samples"] == 10
        assert loop["id"] in [row["id"] for row in client.loops.list()]
        assert [row["id"] for row in client.loops.list(status="cancelled")].count(loop["id"]) == 0
        assert [s["name"] for s in client.loops.get(loop["id"])["steps"]] == list(STEPS)
        with pytest.raises(TimeoutError):
            client.loops.wait(loop["id"], until=("promoted",), timeout=0.5, poll=0.1)
        with pytest.raises(FlywheelError) as refused:
            client.loops.start("loop-sdk")
        assert refused.value.status_code == 409
        with pytest.raises(FlywheelError) as bad:
            client.loops.start("loop-sdk", canary={"share": 1.5})
        assert bad.value.status_code == 400 and bad.value.param == "canary.share"
        with pytest.raises(FlywheelError) as not_failed:
            client.loops.resume(loop["id"])
        assert not_failed.value.status_code == 409
        assert client.loops.cancel(loop["id"])["status"] == "cancelled"
        ended = client.loops.wait(loop["id"], timeout=5)
        assert ended["status"] == "cancelled"


# -- UI ---------------------------------------------------------------------------------------


@contextmanager
def _ui(server: RunningServer, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60, follow_redirects=False) as client:
        response = client.post("/login", data={"api_key": key, "next": "/"})
        assert response.status_code == 303, response.text
        # The test server speaks plain HTTP; the cookie is marked Secure, so hand it over.
        client.cookies.set("flywheel_session", response.cookies["flywheel_session"])
        yield client


def _csrf(page: str) -> str:
    token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page)
    assert token, "the page carries the session's CSRF token"
    return token.group(1)


def _finished_steps(loop: dict[str, Any]) -> dict[str, Any]:
    """Every step done, with results shaped as the real steps return them."""
    now = time.time()
    results: dict[str, dict[str, Any]] = {
        "collect": {
            "bad": 12,
            "by_feedback": 10,
            "by_judge": 2,
            "corrected": 9,
            "positive": 4,
            "base": "up-echo",
            "enough": True,
            "needed": 8,
        },
        "dataset": {
            "dataset": "loop-loop-ui@1",
            "items": 13,
            "corrections": 9,
            "rated": 4,
            "train": 10,
            "test": 3,
        },
        "train": {"model": "loop-loop-ui-adapter@1", "run_id": "run0123456789abcdef"},
        "register": {"model": "loop-loop-ui@1"},
        "gate": {
            "passed": True,
            "summary": "token_f1 0.400 → 0.700 (delta 0.300): passed",
            "scorer": "token_f1",
            "delta": 0.3,
            "production_run": "evalprod0123456789",
            "candidate_run": "evalcand0123456789",
            "served_name": "loop-loop-ui-1",
            "checks": [],
        },
        "approval": {
            "approval_id": "appr0123456789abcdef",
            "model": "loop-loop-ui@1",
            "label": "production",
            "approved_by": "user:reviewer",
        },
        "canary": {"experiment_id": "exp0123456789abcdef", "served_name": "loop-loop-ui-1"},
        "decision": {
            "outcome": "promoted",
            "reason": "'candidate' won (delta +0.300)",
            "reverted": None,
            "experiment_id": "exp0123456789abcdef",
        },
    }
    steps = {}
    for position, name in enumerate(STEPS):
        job = f"job{position}" + "0" * 29
        steps[name] = {
            "status": "succeeded",
            "job_id": job,
            "jobs": [job],
            "attempts": 1,
            "result": results[name],
            "error": None,
            "started_at": now - 100 + position * 10,
            "finished_at": now - 95 + position * 10,
        }
    return steps


def _write_steps(server: RunningServer, loop_id: str, **changes: Any) -> None:
    """Write a loop's state as the driver would (retrying when the driver moved it first)."""
    db = Database(server.database_url)
    try:
        store = LoopStore(db, AuditLog(db))
        for _ in range(50):
            loop = store.load(loop_id)
            if store.save(loop, actor="system:loop", **changes):
                return
            time.sleep(0.1)
        raise AssertionError(f"loop {loop_id} kept changing")
    finally:
        db.dispose()


def test_ui_list_timeline_links_and_buttons(api: httpx.Client, loop_server: RunningServer) -> None:
    loop = _start(api, route="loop-ui")
    _write_steps(
        loop_server,
        loop["id"],
        status="promoted",
        step="decision",
        steps=_finished_steps(loop),
        reason="'candidate' won (delta +0.300)",
        action="loop.promoted",
        audit_after={"step": "decision"},
    )
    with _ui(loop_server, loop_server.admin_key) as ui:
        listing = ui.get("/loops")
        assert listing.status_code == 200, listing.text
        assert f'data-loop="{loop["id"]}"' in listing.text and "loop-ui" in listing.text
        assert 'href="/loops"' in listing.text  # the nav
        assert 'id="loop-form"' in listing.text and '<option value="loop-ui"' in listing.text
        assert '<option value="loop-prompt"' not in listing.text  # prompt routes cannot loop
        assert ui.get("/loops", params={"status": "promoted"}).text.count("data-loop=") >= 1

        page = ui.get(f"/loops/{loop['id']}")
        assert page.status_code == 200, page.text
        html = page.text
        positions = [html.index(f'data-step="{name}"') for name in STEPS]
        assert positions == sorted(positions), "the steps in order"
        assert html.count('data-step-status="succeeded"') == 8
        for link in (
            f'href="/jobs/job0{"0" * 29}"',
            'href="/datasets/loop-loop-ui?version=1"',
            'href="/runs/run0123456789abcdef"',
            'href="/registry/loop-loop-ui-adapter/versions/1"',
            'href="/registry/loop-loop-ui/versions/1"',
            'href="/evals/runs/evalprod0123456789"',
            'href="/evals/runs/evalcand0123456789"',
            'href="/evals/compare?baseline=evalprod0123456789&amp;candidate=evalcand0123456789"',
            'href="/approvals"',
            'href="/experiments/exp0123456789abcdef"',
            f'href="/audit?resource_type=loop&amp;resource_id={loop["id"]}"',
        ):
            assert link in html, link
        assert "token_f1 0.400 → 0.700" in html
        assert "9 corrected" in html
        # The audit entries, inline.
        assert 'data-action="loop.start"' in html and 'data-action="loop.promoted"' in html
        # Ended: no polling, no buttons.
        assert "hx-trigger" not in html
        assert 'id="loop-resume"' not in html and 'id="loop-cancel"' not in html

        # A failed loop offers resume; resuming from the page runs its step again.
        failed = _start(api, route="loop-form")
        steps = {s["name"]: {k: v for k, v in s.items() if k != "name"} for s in failed["steps"]}
        steps["collect"].update(status="failed", error="boom", attempts=1)
        _write_steps(
            loop_server, failed["id"], status="failed", steps=steps, reason="collect: boom"
        )
        page = ui.get(f"/loops/{failed['id']}")
        assert 'id="loop-resume"' in page.text and 'id="loop-cancel"' in page.text
        assert "error: boom" in page.text
        resumed = ui.post(f"/loops/{failed['id']}/resume", data={"csrf_token": _csrf(page.text)})
        assert resumed.status_code == 303, resumed.text
        assert api.get(f"/api/loops/{failed['id']}").json()["status"] == "running"
        page = ui.get(resumed.headers["location"])
        assert "hx-trigger" in page.text and 'id="loop-timeline"' in page.text  # polls
        partial = ui.get(
            f"/loops/{failed['id']}", headers={"HX-Request": "true", "HX-Target": "loop-timeline"}
        )
        assert partial.status_code == 200
        assert 'id="loop-timeline"' in partial.text and "<html" not in partial.text
        cancelled = ui.post(f"/loops/{failed['id']}/cancel", data={"csrf_token": _csrf(page.text)})
        assert cancelled.status_code == 303
        assert api.get(f"/api/loops/{failed['id']}").json()["status"] == "cancelled"
        # Cancelling again is refused on the page.
        again = ui.post(f"/loops/{failed['id']}/cancel", data={"csrf_token": _csrf(page.text)})
        assert again.status_code == 409 and "already cancelled" in again.text

        # The start form: a refusal is shown, a good form opens the new loop's timeline.
        token = _csrf(listing.text)
        refused = ui.post("/loops", data={"csrf_token": token, "route": "loop-prompt"})
        assert refused.status_code == 400 and "renders prompts" in refused.text
        out_of_range = ui.post(
            "/loops", data={"csrf_token": token, "route": "loop-form", "canary_share": "1.5"}
        )
        assert out_of_range.status_code == 400 and "Canary share" in out_of_range.text
        started = ui.post(
            "/loops",
            data={
                "csrf_token": token,
                "route": "loop-form",
                "method": "dpo",
                "min_examples": "5",
                "canary_share": "0.25",
                "min_samples": "40",
            },
        )
        assert started.status_code == 303, started.text
        new_id = started.headers["location"].split("/")[-1].split("?")[0]
        made = api.get(f"/api/loops/{new_id}").json()
        assert made["spec"]["method"] == "dpo" and made["spec"]["min_examples"] == 5
        assert made["spec"]["canary"]["share"] == 0.25
        assert made["spec"]["canary"]["min_samples"] == 40
        api.post(f"/api/loops/{new_id}/cancel")

        missing = ui.get("/loops/" + "0" * 32)
        assert missing.status_code == 404


def test_ui_read_only_user_sees_no_buttons(api: httpx.Client, loop_server: RunningServer) -> None:
    loop = _start(api, route="loop-b")
    try:
        with _ui(loop_server, _key(api, "viewer", "admin")) as ui:
            page = ui.get(f"/loops/{loop['id']}")
            assert page.status_code == 200, page.text
            assert 'id="loop-cancel"' not in page.text and 'id="loop-form"' not in page.text
            assert 'id="loop-audit-hidden"' in page.text  # no audit:read
            listing = ui.get("/loops")
            assert listing.status_code == 200 and 'id="loop-form"' not in listing.text
            refused = ui.post(
                f"/loops/{loop['id']}/cancel", data={"csrf_token": _csrf(listing.text)}
            )
            assert refused.status_code == 403
    finally:
        api.post(f"/api/loops/{loop['id']}/cancel")
