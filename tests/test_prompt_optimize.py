"""Prompt optimisation (``prompt.optimize`` jobs) through the running server.

The proposer is the test upstream's ``echo`` route: it answers with the request's last user
message, which ends with the job's guidance (``instructions``), so a fenced template put there
is exactly what the optimiser gets proposed. The prompt being optimised also answers through
``echo``, so its output is its rendered template: a ``contains`` scorer then tells a template
that adds the expected text from one that does not, with real eval runs, real scoring and a
real paired comparison.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import httpx
import pytest

from flywheel.prompts.optimize import ProposalError, check_variant, parse_proposal
from flywheel.prompts.registry import VersionView
from flywheel.prompts.templates import infer_schema
from flywheel.sdk import Client
from tests.conftest import RunningServer
from tests.test_access import _key_client, _project_with_key, _suffix
from tests.test_cli import _run
from tests.test_jobs_api import full_log, wait_job
from tests.test_ui_prompts import ui_session

QUESTIONS = [f"question {i}" for i in range(6)]
EXPECTED = "Be brief."
BETTER = "{{ question }} Be brief."


def guidance(template: str) -> str:
    return f"Add the reminder.\n```jinja\n{template}\n```"


@pytest.fixture(scope="module")
def project_key(server: RunningServer) -> str:
    return _project_with_key(server, f"optimize-{_suffix()}")[1]


@pytest.fixture(scope="module")
def api(server: RunningServer, project_key: str) -> Iterator[httpx.Client]:
    with _key_client(server, project_key) as client:
        client.timeout = httpx.Timeout(120)
        items = [{"variables": {"question": q}, "expected": EXPECTED} for q in QUESTIONS]
        made = client.post("/api/datasets", json={"name": "briefs", "items": items})
        assert made.status_code == 201, made.text
        yield client


def new_prompt(api: httpx.Client, labels: tuple[str, ...] = ()) -> str:
    name = f"asker-{secrets.token_hex(4)}"
    body = {"name": name, "template": "{{ question }}", "model": "echo", "labels": list(labels)}
    response = api.post("/api/prompts", json=body)
    assert response.status_code == 201, response.text
    return name


def versions(api: httpx.Client, name: str) -> list[dict]:
    response = api.get(f"/api/prompts/{name}/versions")
    assert response.status_code == 200, response.text
    data: list[dict] = response.json()["data"]
    return data


def optimize(api: httpx.Client, **params: object) -> dict:
    body = {"dataset": "briefs", "scorer": "contains", "proposer": "echo", **params}
    response = api.post("/api/jobs", json={"kind": "prompt.optimize", "params": body})
    assert response.status_code == 201, response.text
    job = wait_job(api, response.json()["id"], timeout=240)
    assert job["status"] == "succeeded", (job, full_log(api, job["id"]))
    return job


def test_a_better_variant_becomes_a_new_version_and_no_label_moves(api: httpx.Client) -> None:
    name = new_prompt(api, labels=("staging",))
    job = optimize(api, prompt=name, variants=2, instructions=guidance(BETTER))
    result = job["result"]
    assert result["status"] == "improved" and result["new_version"] == 2
    assert result["base_version"] == 1 and result["dataset_version"] == 1
    # The comparison: the baseline never contains the text, the variant always does.
    baseline, [variant] = result["baseline"], result["variants"]
    assert baseline["mean"] == 0.0 and baseline["n"] == len(QUESTIONS)
    assert variant["template"] == BETTER and variant["mean"] == 1.0
    assert variant["low"] == 1.0 and variant["high"] == 1.0
    paired = variant["comparison"]
    assert paired["delta"] == 1.0 and paired["wins"] == len(QUESTIONS)
    assert paired["improved"] is True and paired["p_value"] < 0.05
    assert variant["beats_baseline"] is True and result["best"] == variant["name"]
    # The echo proposer proposes the same template twice: the second one is dropped.
    assert [d["reason"] for d in result["dropped"]] == [
        "the same as the current template or a proposal"
    ]

    stored = versions(api, name)
    assert [v["version"] for v in stored] == [2, 1]
    new, old = stored
    assert new["template"] == BETTER and new["model"] == "echo"
    assert new["variables"] == old["variables"]
    assert f"job {job['id']}" in new["message"] and "optimiser" in new["message"]
    # Never promoted: the labels stay where they were.
    assert new["labels"] == [] and old["labels"] == ["staging"]

    # Both runs are ordinary eval runs, stored with their results.
    for row, target in ((baseline, f"prompt:{name}@1"), (variant, None)):
        run = api.get(f"/api/evals/runs/{row['run_id']}").json()
        assert run["status"] == "completed" and run["total"] == len(QUESTIONS)
        if target:
            assert run["resolved_target"] == target
    outputs = api.get(f"/api/evals/runs/{variant['run_id']}/results").json()["data"]
    assert outputs[0]["output"] == f"echo: {QUESTIONS[0]} {EXPECTED}"
    log = full_log(api, job["id"])
    assert "proposal 1.2 dropped" in log and f"stored as {name}@2" in log


def test_when_no_variant_wins_nothing_is_created(
    server: RunningServer, project_key: str, api: httpx.Client
) -> None:
    # Through the CLI, waiting: the variant scores as the baseline does, so it is no win.
    name = new_prompt(api)
    done = _run(
        server,
        "prompts",
        "optimize",
        name,
        "--dataset",
        "briefs@1",
        "--scorer",
        "contains",
        "--proposer",
        "echo",
        "--variants",
        "1",
        "--instructions",
        guidance("Q: {{ question }}"),
        "--wait",
        key=project_key,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "prompt.optimize" in done.stdout
    assert "no variant beat the baseline" in done.stdout
    assert re.search(r"variant 1\.1\s.*0", done.stdout)
    assert [v["version"] for v in versions(api, name)] == [1]
    jobs = api.get("/api/jobs", params={"kind": "prompt.optimize"}).json()["data"]
    result = next(j for j in jobs if j["params"]["prompt"] == name)["result"]
    assert result["status"] == "no_improvement" and result["new_version"] is None
    [variant] = result["variants"]
    assert variant["mean"] == 0.0 and variant["beats_baseline"] is False
    assert variant["comparison"]["ties"] == len(QUESTIONS)


def test_invalid_proposals_are_dropped_through_the_sdk(
    server: RunningServer, project_key: str, api: httpx.Client
) -> None:
    name = new_prompt(api)
    with Client(server.base_url, project_key, timeout=120) as client:
        job = client.prompts.optimize(
            name,
            dataset="briefs",
            scorer="contains",
            proposer="echo",
            variants=1,
            instructions=guidance("{{ question } Be brief."),
            wait=True,
            timeout=240,
        )
        assert job["status"] == "succeeded", job
        result = job["result"]
        assert result["status"] == "no_improvement" and result["variants"] == []
        [dropped] = result["dropped"]
        assert dropped["name"] == "variant 1.1"
        assert dropped["reason"].startswith("invalid template:")
        assert [p.version for p in client.prompts.versions(name)] == [1]
        # A proposer the gateway does not know fails the job before anything runs.
        failed = client.prompts.optimize(
            name, dataset="briefs", scorer="contains", proposer="no-such-route", wait=True
        )
        assert failed["status"] == "failed" and "params.proposer" in failed["error"]
        # Without waiting, the job is returned queued.
        queued = client.prompts.optimize(
            name, dataset="briefs", scorer="contains", proposer="echo", variants=1
        )
        assert queued["kind"] == "prompt.optimize" and queued["status"] in ("queued", "running")
        client.jobs.cancel(queued["id"])


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"dataset": "briefs", "scorer": "contains"}, "params.prompt"),
        ({"prompt": "p", "scorer": "contains"}, "params.dataset"),
        ({"prompt": "p", "dataset": "briefs"}, "params.scorer"),
        ({"prompt": "p", "dataset": "briefs", "scorer": "no-such-scorer"}, "params.scorer"),
        (
            {"prompt": "p", "dataset": "briefs", "scorer": "contains", "variants": 0},
            "params.variants",
        ),
        ({"prompt": "p", "dataset": "briefs", "scorer": "contains", "rounds": 9}, "params.rounds"),
        ({"prompt": "p", "dataset": "b@x", "scorer": "contains"}, "params.dataset"),
        ({"prompt": "p", "dataset": "briefs", "scorer": "contains", "base": "Prod"}, "params.base"),
        ({"prompt": "p", "dataset": "briefs", "scorer": "contains", "bogus": 1}, "params.bogus"),
    ],
)
def test_bad_params_are_refused_naming_the_field(
    api: httpx.Client, params: dict, field: str
) -> None:
    response = api.post("/api/jobs", json={"kind": "prompt.optimize", "params": params})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field, error
    assert error["message"].startswith(field)


def test_the_ui_form_starts_the_job_and_the_page_shows_the_comparison(
    server: RunningServer, project_key: str, api: httpx.Client
) -> None:
    name = new_prompt(api)
    with ui_session(server, project_key) as (client, token):
        page = client.get(f"/prompts/{name}")
        assert page.status_code == 200 and 'id="optimize-form"' in page.text
        form = {
            "csrf_token": token,
            "dataset": "briefs",
            "scorer": "contains",
            "variants": "1",
            "rounds": "1",
            "proposer": "echo",
            "instructions": guidance(BETTER),
        }
        started = client.post(f"/prompts/{name}/optimize", data=form)
        assert started.status_code == 303, started.text
        location = started.headers["location"]
        assert location.startswith("/jobs/")
        job = wait_job(api, location.removeprefix("/jobs/"), timeout=240)
        assert job["status"] == "succeeded", (job, full_log(api, job["id"]))
        assert job["result"]["new_version"] == 2
        page = client.get(f"/prompts/{name}")
        assert page.status_code == 200
        assert f'data-job="{job["id"]}"' in page.text
        assert 'created <span class="mono">v2</span>' in page.text
        assert 'data-row="variant 1.1"' in page.text and "beats baseline" in page.text
        # A bad form is shown on the page with the kind's message, not a 500.
        bad = client.post(f"/prompts/{name}/optimize", data={**form, "variants": "99"})
        assert bad.status_code == 400 and "variants" in bad.text
        missing = client.post(f"/prompts/no-such-{_suffix()}/optimize", data=form)
        assert missing.status_code == 404


# -- the proposal parser and checks (pure functions, no server) --------------------------------


def _base(template: str | list[dict[str, str]]) -> VersionView:
    return VersionView(
        name="p",
        version=1,
        template=template,
        variables=infer_schema(template),
        model=None,
        params={},
        message="",
        author="t",
        author_id="t",
        created_at=0.0,
    )


def test_parse_proposal_takes_json_or_the_last_fenced_block() -> None:
    assert parse_proposal('{"template": "Hi {{ x }}"}', chat=False) == "Hi {{ x }}"
    text = "Old:\n```jinja\nold\n```\nNew:\n```jinja\nLine 1\nLine 2 {{ x }}\n```\n"
    assert parse_proposal(text, chat=False) == "Line 1\nLine 2 {{ x }}"
    chat = '```json\n[{"role": "user", "content": "{{ x }}!"}]\n```'
    assert parse_proposal(chat, chat=True) == [{"role": "user", "content": "{{ x }}!"}]
    with pytest.raises(ProposalError, match="no fenced code block"):
        parse_proposal("just some prose", chat=False)
    with pytest.raises(ProposalError, match="JSON list of messages"):
        parse_proposal("```\nnot json\n```", chat=True)


def test_check_variant_refuses_unsafe_and_undeclared_templates() -> None:
    base = _base("{{ x }}")
    items = [{"position": 0, "variables": {"x": "a"}}]
    assert check_variant("{{ x }}!", base, items) == "{{ x }}!"
    with pytest.raises(ProposalError, match="does not declare: y"):
        check_variant("{{ x }} {{ y }}", base, items)
    with pytest.raises(ProposalError, match="invalid template"):
        check_variant("{{ x.__class__ }}", base, items)
    with pytest.raises(ProposalError, match="does not render dataset item 0"):
        check_variant("{{ x + 1 }}", base, items)
