"""The job, run and model-registry pages over HTTP (no browser): the fine-tune and generic job
forms with their refusals, a job's page, status partial and log (HTML and JSON), cancel and
retry, runs and their side-by-side comparison, the registry's model and version pages with
the card, the lineage graph, alias moves and the merge and serve forms; what viewers and
developers may do; CSRF.

Runs are written with the real :class:`RunTracker` and a version with its full lineage with
the real :class:`ModelRegistry`, both on the test server's own database (SQLite, WAL), since
no public API creates them directly.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flywheel import __version__
from flywheel.registry import ModelRegistry
from flywheel.security.audit import AuditLog
from flywheel.store import Database
from flywheel.store.artifacts import ArtifactStore
from flywheel.tuning.runs import RunTracker
from flywheel.ui.jobs import compare_view, fmt_value, thin
from flywheel.ui.registry import layout_lineage, render_card

from .conftest import RunningServer
from .test_ui_prompts import make_key, ui_session, unique

HTMX = {"HX-Request": "true"}
JSON = {"Accept": "application/json"}
CSRF_REFUSAL = "expired or came from somewhere else"
FAKE_BASE = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\1" * 4096}
FAKE_ADAPTER = {
    "adapter_config.json": b'{"peft_type": "LORA", "r": 8}',
    "adapter_model.safetensors": b"\0" * 2048,
}


def database(server: RunningServer) -> Database:
    return Database(server.database_url)


def wait_for_job(api: httpx.Client, job_id: str, timeout: float = 30) -> dict[str, object]:
    """The job once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, object] = api.get(f"/api/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s")


def job_id_of(response: httpx.Response) -> str:
    assert response.status_code == 303, response.text
    found = re.fullmatch(r"/jobs/([0-9a-f]{32})\?submitted=1", response.headers["location"])
    assert found, response.headers["location"]
    return found.group(1)


def error_text(page: str, element: str) -> str:
    found = re.search(rf'id="{element}"[^>]*>(.*?)</div>', page, re.S)
    assert found, f"no #{element} on the page"
    return html.unescape(found.group(1)).strip()


def upload_version(api: httpx.Client, name: str, files: dict[str, bytes], **fields: str) -> int:
    parts = [("files", (path, data)) for path, data in files.items()]
    response = api.post(f"/api/registry/{name}/versions", files=parts, data=fields)
    assert response.status_code == 201, response.text
    version: int = response.json()["version"]
    return version


@dataclass
class Lineage:
    """A model with a base version and an adapter made by a tracked run of a job on a
    dataset version."""

    model: str
    dataset: str
    job_id: str
    run_id: str


@dataclass
class Runs:
    first: str
    second: str


@pytest.fixture(scope="module")
def admin_ui(server: RunningServer) -> Iterator[tuple[httpx.Client, str]]:
    with ui_session(server, server.admin_key) as session:
        yield session


@pytest.fixture(scope="module")
def dataset(api_module: httpx.Client) -> str:
    """A dataset version whose items have no answer to learn: a fine-tune of it fails fast,
    before loading any model."""
    name = unique("ui-tune-data")
    items = [{"messages": [{"role": "user", "content": f"Question {i}?"}]} for i in range(4)]
    created = api_module.post("/api/datasets", json={"name": name, "items": items})
    assert created.status_code == 201, created.text
    return f"{name}@{created.json()['version']}"


@pytest.fixture(scope="module")
def api_module(server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {server.admin_key}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def runs(server: RunningServer) -> Runs:
    """Two finished SFT runs that differ in learning rate, with loss curves."""
    tracker = RunTracker(database(server))
    ids = []
    for rate, drop in ((2e-4, 0.1), (1e-3, 0.3)):
        run_id = tracker.start(
            "default",
            f"sft lr {rate:g}",
            "tune.sft",
            {"learning_rate": rate, "batch_size": 8, "lora": {"rank": 8}},
            "key:ui-test",
            experiment="ui-compare",
            inputs=["support@1"],
        )
        for step in range(1, 6):
            values = {"loss": 2.0 - drop * step, "learning_rate": rate}
            if step in (1, 5):
                values["eval_loss"] = 2.1 - drop * step
            tracker.log_metrics(run_id, step, values)
        tracker.finish(run_id, "finished", {"train_loss": 2.0 - drop * 3, "steps": 5})
        ids.append(run_id)
    return Runs(*ids)


@pytest.fixture(scope="module")
def lineage(server: RunningServer, api_module: httpx.Client) -> Lineage:
    """Base v1 (uploaded) and adapter v2 registered with its run, job and dataset version."""
    name = unique("ui-model")
    created = api_module.post("/api/registry", json={"name": name, "license": "apache-2.0"})
    assert created.status_code == 201, created.text
    upload_version(api_module, name, FAKE_BASE, kind="base", format="safetensors")
    data = unique("ui-lineage-data")
    items = [{"messages": [{"role": "user", "content": "Hi"}], "expected": "Hello"}]
    made = api_module.post("/api/datasets", json={"name": data, "items": items})
    assert made.status_code == 201, made.text
    ref = f"{data}@{made.json()['version']}"
    job = api_module.post("/api/jobs", json={"kind": "test.count", "params": {"steps": 1}})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    db = database(server)
    run_id = RunTracker(db).start(
        "default",
        f"sft {ref}",
        "tune.sft",
        {"learning_rate": 2e-4},
        "key:ui-test",
        job_id=job_id,
        inputs=[ref],
    )
    folder = server.home / "ui-test-adapter"
    folder.mkdir(exist_ok=True)
    for path, body in FAKE_ADAPTER.items():
        (folder / path).write_bytes(body)
    registry = ModelRegistry(
        db, AuditLog(db), ArtifactStore(str(server.home / "artifacts")), server.home / "models"
    )
    registry.register_version(
        "default",
        name,
        kind="adapter",
        source=Path(folder),
        format="peft",
        actor="key:ui-test",
        parent=f"{name}@1",
        run_id=run_id,
        job_id=job_id,
        datasets=[ref],
        metrics={"eval_loss": 1.25},
        description="LoRA SFT adapter",
    )
    wait_for_job(api_module, job_id)
    return Lineage(name, ref, job_id, run_id)


# -- jobs ---------------------------------------------------------------------------------------


def test_jobs_page_offers_the_forms(admin_ui: tuple[httpx.Client, str], dataset: str) -> None:
    client, _ = admin_ui
    page = client.get("/jobs", params={"dataset": dataset})
    assert page.status_code == 200
    assert '<a href="/jobs" class="active" aria-current="page">Jobs</a>' in page.text
    assert 'id="tune-form"' in page.text and 'id="generic-form"' in page.text
    # The dataset version picker lists the version, preselected from ?dataset=.
    assert f'<option value="{dataset}" selected>' in page.text
    generic = re.search(r'<select name="kind" id="generic-kind">(.*?)</select>', page.text, re.S)
    assert generic and '<option value="test.count"' in generic.group(1)
    assert '<option value="builtin:smollm2">' in page.text  # a suggested base


def test_tune_form_refuses_bad_input_clearly(
    admin_ui: tuple[httpx.Client, str], dataset: str
) -> None:
    client, token = admin_ui
    good = {
        "csrf_token": token,
        "method": "sft",
        "dataset": dataset,
        "base": "builtin:smollm2",
        "register": "kept-name",
        "epochs": "1",
    }
    cases = [
        ({"dataset": ""}, 400, "Dataset version: pick the dataset version to train on."),
        ({"dataset": "no-such-data@1"}, 404, "Dataset version: No dataset 'no-such-data'."),
        ({"base": "no-such-model@1"}, 404, "Base model: No model 'no-such-model'."),
        ({"learning_rate": "fast"}, 400, "Learning rate must be a number."),
        ({"lora_rank": "0"}, 400, "LoRA rank must be a whole number from 1 to 1024."),
        # Left to the kind's own validation, and named by the form's label.
        ({"epochs": "0"}, 400, "Epochs: Input should be greater than 0"),
        ({"register": "has spaces"}, 400, "Register as: String should match pattern"),
        ({"method": "ppo"}, 400, "Pick SFT or DPO."),
    ]
    for change, status, message in cases:
        response = client.post("/jobs", data={**good, **change})
        assert response.status_code == status, (change, response.text[:500])
        assert error_text(response.text, "job-error").startswith(message), change
        assert 'data-form="tune"' in response.text
    # What was typed stays in the form.
    refused = client.post("/jobs", data={**good, "learning_rate": "fast"})
    assert 'value="kept-name"' in refused.text and 'value="fast"' in refused.text


def test_tune_form_queues_the_configured_job(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client, dataset: str
) -> None:
    client, token = admin_ui
    form = {
        "csrf_token": token,
        "form": "tune",
        "method": "sft",
        "dataset": dataset,
        "base": "builtin:smollm2",
        "learning_rate": "0.001",
        "epochs": "2",
        "max_steps": "3",
        "batch_size": "2",
        "max_length": "64",
        "eval_steps": "1",
        "lora_rank": "4",
        "lora_alpha": "8",
        "target_modules": "q_proj, v_proj",
        "qlora": "yes",
        "register": "ui-tuned",
        "name": "UI fine-tune",
    }
    job_id = job_id_of(client.post("/jobs", data=form))
    # Not trained here: the point is what the form queued.
    client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    job = api.get(f"/api/jobs/{job_id}").json()
    assert job["kind"] == "tune.sft" and job["name"] == "UI fine-tune"
    params = job["params"]
    assert params["dataset"] == dataset and params["register"] == "ui-tuned"
    settings = params["settings"]
    assert settings["quantization"] == "nf4"
    assert settings["learning_rate"] == 0.001 and settings["epochs"] == 2
    assert settings["max_steps"] == 3 and settings["batch_size"] == 2
    assert settings["max_length"] == 64 and settings["eval_steps"] == 1
    assert settings["lora"]["rank"] == 4 and settings["lora"]["alpha"] == 8
    assert settings["lora"]["target_modules"] == ["q_proj", "v_proj"]
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    assert "UI fine-tune" in page.text and '"quantization": "nf4"' in html.unescape(page.text)


def test_generic_job_page_status_and_log(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, token = admin_ui
    for params, message in (
        ("{not json", "The params are not JSON"),
        ("[1, 2]", "The params must be a JSON object"),
        ('{"steps": 0}', "params.steps: 1 to 100000"),
    ):
        refused = client.post(
            "/jobs",
            data={"csrf_token": token, "form": "generic", "kind": "test.count", "params": params},
        )
        assert refused.status_code == 400
        assert error_text(refused.text, "job-error").startswith(message)
        assert 'data-form="generic"' in refused.text
    unknown = client.post(
        "/jobs", data={"csrf_token": token, "form": "generic", "kind": "nope", "params": "{}"}
    )
    assert unknown.status_code == 400
    assert error_text(unknown.text, "job-error").startswith("Unknown job kind 'nope'")

    name = unique("ui-count")
    job_id = job_id_of(
        client.post(
            "/jobs",
            data={
                "csrf_token": token,
                "form": "generic",
                "kind": "test.count",
                "name": name,
                "params": '{"steps": 3, "delay": 0.3}',
            },
        )
    )
    page = client.get(f"/jobs/{job_id}?submitted=1")
    assert page.status_code == 200 and "Job queued." in page.text
    assert f"<h1>{name} " in page.text and 'id="job-log"' in page.text
    assert wait_for_job(api, job_id)["status"] == "succeeded"

    # The status panel: finished, it stops polling and asks for a full reload.
    status = client.get(f"/jobs/{job_id}", headers={**HTMX, "HX-Target": "job-status"})
    assert status.text.startswith('<div id="job-status"')
    assert 'data-status="succeeded"' in status.text and "hx-trigger" not in status.text
    assert status.headers["hx-refresh"] == "true"
    row = client.get(f"/jobs/{job_id}", headers={**HTMX, "HX-Target": f"job-row-{job_id}"})
    assert row.text.startswith(f'<tr id="job-row-{job_id}"') and "hx-trigger" not in row.text

    # The log as JSON (what the page polls) follows a cursor; as HTML it is a fragment.
    log = client.get(f"/jobs/{job_id}/log", params={"after": 0}, headers=JSON).json()
    assert "step 1 of 3" in log["text"] and "step 3 of 3" in log["text"]
    assert log["finished"] is True and log["status"] == "succeeded" and log["next"] > 0
    assert log["chart"]["datasets"] == [] and log["chart"]["run"] is None
    rest = client.get(f"/jobs/{job_id}/log", params={"after": log["next"]}, headers=JSON).json()
    assert rest["text"] == "" and rest["next"] == log["next"]
    fragment = client.get(f"/jobs/{job_id}/log", params={"after": 0})
    assert fragment.text.startswith('<span class="log-chunk"') and "step 2 of 3" in fragment.text

    page = client.get(f"/jobs/{job_id}")
    assert "step 3 of 3" in page.text and 'data-status="succeeded"' in page.text
    assert 'id="job-cancel"' not in page.text and 'id="job-retry"' not in page.text
    listed = client.get("/jobs", params={"kind": "test.count", "status": "succeeded"})
    assert f'data-job="{job_id}"' in listed.text


def test_cancel_and_retry(admin_ui: tuple[httpx.Client, str], api: httpx.Client) -> None:
    client, token = admin_ui
    submitted = api.post(
        "/api/jobs", json={"kind": "test.count", "params": {"steps": 400, "delay": 0.05}}
    )
    job_id = submitted.json()["id"]
    page = client.get(f"/jobs/{job_id}")
    assert 'id="job-cancel"' in page.text and 'hx-trigger="every 1s"' in page.text
    cancelled = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert cancelled.status_code == 303
    assert cancelled.headers["location"] == f"/jobs/{job_id}?cancelled=1"
    assert wait_for_job(api, job_id)["status"] == "cancelled"

    again = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert again.status_code == 409
    assert "only queued or running jobs cancel" in error_text(again.text, "job-error")
    page = client.get(f"/jobs/{job_id}")
    assert 'id="job-retry"' in page.text and 'id="job-cancel"' not in page.text

    retry_id = job_id_of(client.post(f"/jobs/{job_id}/retry", data={"csrf_token": token}))
    retried = api.get(f"/api/jobs/{retry_id}").json()
    assert retried["retry_of"] == job_id and retried["attempt"] == 2
    page = client.get(f"/jobs/{retry_id}")
    assert f'href="/jobs/{job_id}"' in page.text  # "retry of" links back
    client.post(f"/jobs/{retry_id}/cancel", data={"csrf_token": token})
    assert wait_for_job(api, retry_id)["status"] == "cancelled"

    done = api.post("/api/jobs", json={"kind": "test.count", "params": {"steps": 1}}).json()
    wait_for_job(api, done["id"])
    refused = client.post(f"/jobs/{done['id']}/retry", data={"csrf_token": token})
    assert refused.status_code == 409 and "only failed, cancelled or orphaned" in refused.text


def test_missing_things_are_404_pages(admin_ui: tuple[httpx.Client, str]) -> None:
    client, token = admin_ui
    page = client.get("/jobs/0123456789abcdef0123456789abcdef")
    assert page.status_code == 404 and "Job not found" in page.text
    log = client.get("/jobs/nope/log", headers=JSON)
    assert log.status_code == 404 and log.json() == {"error": "Job 'nope' not found."}
    assert client.post("/jobs/nope/cancel", data={"csrf_token": token}).status_code == 404
    run = client.get("/runs/nope")
    assert run.status_code == 404 and "Run not found" in run.text
    model = client.get("/registry/no-such-model")
    assert model.status_code == 404 and "Model not found" in model.text
    version = client.get("/registry/no-such-model/versions/1")
    assert version.status_code == 404 and "No model 'no-such-model'." in html.unescape(version.text)


# -- runs ---------------------------------------------------------------------------------------


def test_runs_list_and_run_page(admin_ui: tuple[httpx.Client, str], runs: Runs) -> None:
    client, _ = admin_ui
    listed = client.get("/runs", params={"experiment": "ui-compare"})
    assert listed.status_code == 200
    assert '<a href="/runs" class="active" aria-current="page">Runs</a>' in listed.text
    for run_id in (runs.first, runs.second):
        assert f'name="ids" value="{run_id}"' in listed.text
    assert 'id="runs-compare"' in listed.text

    page = client.get(f"/runs/{runs.first}")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert 'data-param="lora.rank"' in text and 'data-summary="train_loss"' in text
    assert 'data-system="python"' in text and 'id="run-commit"' in text
    assert 'data-package="flywheel-llmops"' in text
    charts = re.findall(r"data-series='([^']*)' data-series-name=\"([^\"]+)\"", text)
    assert [name for _, name in charts] == ["loss", "eval_loss", "learning_rate"]
    loss = json.loads(charts[0][0])
    assert loss["x_title"] == "step" and len(loss["datasets"]) == 1
    assert [p[0] for p in loss["datasets"][0]["points"]] == [1, 2, 3, 4, 5]


def test_a_run_exports_to_mlflow_from_its_page_and_the_api(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client, runs: Runs, server: RunningServer
) -> None:
    from mlflow.tracking import MlflowClient

    client, token = admin_ui
    assert 'id="run-mlflow"' in client.get(f"/runs/{runs.first}").text
    exported = client.post(f"/runs/{runs.first}/mlflow", data={"csrf_token": token})
    assert exported.status_code == 303
    location = exported.headers["location"]
    mlflow_id = location.split("mlflow=")[1]
    assert 'id="run-notice"' in client.get(location).text

    store = MlflowClient(tracking_uri=f"sqlite:///{server.home / 'mlflow.db'}")
    copied = store.get_run(mlflow_id)
    assert copied.data.tags["flywheel.run_id"] == runs.first
    assert [p.value for p in store.get_metric_history(mlflow_id, "loss")] == [
        pytest.approx(2.0 - 0.1 * step) for step in range(1, 6)
    ]
    by_api = api.post(f"/api/runs/{runs.second}/mlflow")
    assert by_api.status_code == 200, by_api.text
    assert store.get_run(by_api.json()["mlflow_run_id"]).info.run_name == "sft lr 0.001"
    missing = client.post("/runs/nope/mlflow", data={"csrf_token": token})
    assert missing.status_code == 404
    assert api.post("/api/runs/nope/mlflow").status_code == 404


def test_compare_marks_differences_and_overlays_curves(
    admin_ui: tuple[httpx.Client, str], runs: Runs
) -> None:
    client, _ = admin_ui
    page = client.get("/runs/compare", params=[("ids", runs.first), ("ids", runs.second)])
    assert page.status_code == 200, page.text
    text = html.unescape(page.text)
    assert re.search(
        r'<tr data-param="learning_rate" data-differs="yes" class="row-differs">', text
    )
    assert '<tr data-param="batch_size" data-differs="no">' in text
    assert 'data-summary="train_loss" data-differs="yes"' in text
    assert 'data-fact="kind" data-differs="no"' in text
    charts = dict(
        (name, json.loads(spec))
        for spec, name in re.findall(r"data-series='([^']*)' data-series-name=\"([^\"]+)\"", text)
    )
    assert list(charts)[:2] == ["loss", "eval_loss"]
    assert len(charts["loss"]["datasets"]) == 2 and charts["loss"]["legend"] is True
    assert [len(d["points"]) for d in charts["eval_loss"]["datasets"]] == [2, 2]

    only = client.get(f"/runs/compare?ids={runs.first},{runs.second}&only=differs")
    assert 'data-param="learning_rate"' in only.text and 'data-param="batch_size"' not in only.text

    one = client.get("/runs/compare", params={"ids": runs.first})
    assert one.status_code == 400
    assert error_text(one.text, "compare-error") == "Pick at least two runs to compare."
    missing = client.get("/runs/compare", params={"ids": f"{runs.first},nope"})
    assert missing.status_code == 404 and "Run &#39;nope&#39; not found." in missing.text


# -- the registry -------------------------------------------------------------------------------


def test_registry_list_and_model_page_with_aliases(
    admin_ui: tuple[httpx.Client, str], lineage: Lineage
) -> None:
    client, token = admin_ui
    listed = client.get("/registry")
    assert listed.status_code == 200
    assert f'data-model="{lineage.model}"' in listed.text
    assert (
        '<a href="/registry" class="active" aria-current="page">Model registry</a>' in listed.text
    )

    url = f"/registry/{lineage.model}"
    page = client.get(url)
    assert page.status_code == 200
    assert 'data-version="2" data-kind="adapter"' in page.text
    assert f'href="/registry/{lineage.model}/versions/1">{lineage.model}@1</a>' in page.text
    assert f'href="/runs/{lineage.run_id}"' in page.text

    moved = client.post(
        f"{url}/aliases", data={"csrf_token": token, "alias": "staging", "version": "2"}
    )
    assert moved.status_code == 303 and moved.headers["location"] == f"{url}?moved=staging"
    page = client.get(moved.headers["location"])
    assert "Alias &#39;staging&#39; moved." in page.text
    assert '<tr data-alias="staging" data-version="2">' in page.text
    assert re.search(r'<tr data-alias="staging">.*?—.*?v2', page.text, re.S)

    protected = client.post(
        f"{url}/aliases", data={"csrf_token": token, "alias": "production", "version": "2"}
    )
    assert protected.status_code == 409
    assert "moves only through an approval" in error_text(protected.text, "model-error")
    bad = client.post(
        f"{url}/aliases", data={"csrf_token": token, "alias": "Bad Alias", "version": "2"}
    )
    assert bad.status_code == 400 and "is not a valid alias" in bad.text

    removed = client.post(f"{url}/aliases/staging/delete", data={"csrf_token": token})
    assert removed.status_code == 303
    page = client.get(url)
    assert '<tr data-alias="staging" data-version="2">' not in page.text
    assert re.search(r'<tr data-alias="staging">.*?v2 → removed', page.text, re.S)


def test_version_page_card_lineage_and_actions(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client, lineage: Lineage
) -> None:
    client, token = admin_ui
    name = lineage.model
    # The card's text comes from the model: raw HTML in it is shown, never run.
    patched = api.patch(f"/api/registry/{name}", json={"intended_use": "<script>x()</script>"})
    assert patched.status_code == 200, patched.text
    page = client.get(f"/registry/{name}/versions/2")
    assert page.status_code == 200, page.text
    card = re.search(
        r'<article class="card model-card" id="model-card">(.*?)</article>', page.text, re.S
    )
    assert card, "no card"
    assert "<h1>" in card.group(1) and "<table>" in card.group(1)
    assert "&lt;script&gt;x()&lt;/script&gt;" in card.group(1) and "<script>x()" not in page.text
    assert 'id="card-front"' in page.text and "license: apache-2.0" in page.text

    # Lineage: data → job → run → adapter, the base feeding the adapter; boxes link out.
    nodes = dict(
        re.findall(r'data-node="([^"]+)" data-node-type="[^"]+" data-column="(\d+)"', page.text)
    )
    data, job, run = f"dataset:{lineage.dataset}", f"job:{lineage.job_id}", f"run:{lineage.run_id}"
    base, adapter = f"model_version:{name}@1", f"model_version:{name}@2"
    assert set(nodes) == {data, job, run, base, adapter}
    column = {node: int(value) for node, value in nodes.items()}
    assert column[data] < column[job] < column[run] < column[adapter]
    assert column[base] < column[adapter]
    assert re.search(
        rf'<a href="/registry/{name}/versions/1" class="lineage-node type-model_version"', page.text
    )
    assert re.search(
        r'class="lineage-node type-model_version is-focus" data-node="' + re.escape(adapter),
        page.text,
    )
    assert f'<a href="/runs/{lineage.run_id}" class="lineage-node type-run' in page.text
    assert f'<a href="/jobs/{lineage.job_id}" class="lineage-node type-job' in page.text
    assert 'data-relation="parent"' in page.text and 'data-relation="executed"' in page.text

    # An adapter is merged, not quantized; an instance admin may serve.
    assert 'id="merge-form"' in page.text and 'id="quantize-form"' not in page.text
    assert 'id="serve-form"' not in page.text and 'id="serve-note"' in page.text
    assert 'id="version-alias-form"' in page.text
    # The layout's own version is still Flywheel's.
    assert f'<div class="version">v{__version__}</div>' in page.text
    base_page = client.get(f"/registry/{name}/versions/1")
    assert 'id="quantize-form"' in base_page.text and 'id="prune-form"' in base_page.text
    assert 'id="merge-form"' not in base_page.text and 'id="serve-form"' in base_page.text
    assert '<option value="gguf">gguf</option>' in base_page.text

    served = client.post(
        f"/registry/{name}/versions/2/serve", data={"csrf_token": token, "route": "ui-serve-test"}
    )
    assert served.status_code == 400
    assert "is an adapter; merge it" in error_text(served.text, "version-error")
    weightless = client.post(
        f"/registry/{name}/versions/1/serve",
        data={"csrf_token": token, "route": "ui-serve-test", "weight": "0"},
    )
    assert weightless.status_code == 400
    assert error_text(weightless.text, "version-error") == "Weight must be above 0."
    assert 'value="ui-serve-test"' in weightless.text  # the form keeps the route
    no_route = client.post(f"/registry/{name}/versions/1/serve", data={"csrf_token": token})
    assert no_route.status_code == 400 and "Route: name the route" in no_route.text
    wrong = client.post(
        f"/registry/{name}/versions/1/jobs", data={"csrf_token": token, "step": "merge"}
    )
    assert wrong.status_code == 400 and "A base version cannot be merged" in wrong.text
    method = client.post(
        f"/registry/{name}/versions/1/jobs",
        data={"csrf_token": token, "step": "quantize", "method": "fp3"},
    )
    assert method.status_code == 400 and "Method: pick one of bnb-int8" in method.text

    job_id = job_id_of(
        client.post(
            f"/registry/{name}/versions/2/jobs",
            data={
                "csrf_token": token,
                "step": "merge",
                "dtype": "bfloat16",
                "register": f"{name}-merged",
            },
        )
    )
    client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token})
    job = api.get(f"/api/jobs/{job_id}").json()
    assert job["kind"] == "merge" and job["name"] == f"merge {name}@2"
    assert job["params"]["model"] == f"{name}@2" and job["params"]["dtype"] == "bfloat16"
    assert job["params"]["register"] == f"{name}-merged"


# -- who may do what ----------------------------------------------------------------------------


def test_viewer_reads_but_cannot_write(
    server: RunningServer, api: httpx.Client, lineage: Lineage, runs: Runs
) -> None:
    done = api.post("/api/jobs", json={"kind": "test.count", "params": {"steps": 1}}).json()
    with ui_session(server, make_key(api, "viewer")) as (client, token):
        # A key of the default project sees its jobs, runs and models.
        jobs = client.get("/jobs")
        assert jobs.status_code == 200
        assert 'id="tune-form"' not in jobs.text and 'id="generic-form"' not in jobs.text
        wait_for_job(api, done["id"])
        job = client.get(f"/jobs/{done['id']}")
        assert job.status_code == 200 and 'id="job-retry"' not in job.text
        assert client.get(f"/runs/compare?ids={runs.first},{runs.second}").status_code == 200
        version = client.get(f"/registry/{lineage.model}/versions/2")
        assert version.status_code == 200 and 'id="lineage"' in version.text
        base = client.get(f"/registry/{lineage.model}/versions/1")
        for form in ("merge-form", "quantize-form", "serve-form", "version-alias-form"):
            assert f'id="{form}"' not in version.text + base.text
        assert 'id="alias-form"' not in client.get(f"/registry/{lineage.model}").text
        posts = [
            ("/jobs", {"form": "generic", "kind": "test.count", "params": "{}"}),
            (f"/jobs/{done['id']}/retry", {}),
            (f"/jobs/{done['id']}/cancel", {}),
            (f"/registry/{lineage.model}/aliases", {"alias": "staging", "version": "1"}),
            (f"/registry/{lineage.model}/versions/2/jobs", {"step": "merge"}),
            (f"/registry/{lineage.model}/versions/1/serve", {"route": "x"}),
        ]
        for path, data in posts:
            refused = client.post(path, data={"csrf_token": token, **data})
            assert refused.status_code == 403, path
            assert CSRF_REFUSAL not in refused.text
    with ui_session(server, make_key(api, "developer")) as (client, token):
        # Developers fine-tune and merge, but serving changes the instance's routes.
        version = client.get(f"/registry/{lineage.model}/versions/2")
        base = client.get(f"/registry/{lineage.model}/versions/1")
        assert 'id="merge-form"' in version.text and 'id="quantize-form"' in base.text
        assert 'id="serve-form"' not in base.text and 'id="serve-note"' not in version.text
        serve = client.post(
            f"/registry/{lineage.model}/versions/1/serve", data={"csrf_token": token, "route": "x"}
        )
        assert serve.status_code == 403


def test_forms_need_the_csrf_token(admin_ui: tuple[httpx.Client, str]) -> None:
    client, _ = admin_ui
    for path in ("/jobs", "/jobs/x/cancel", "/registry/x/aliases", "/registry/x/versions/1/serve"):
        missing = client.post(path, data={"form": "generic", "kind": "test.count"})
        assert missing.status_code == 403 and CSRF_REFUSAL in missing.text, path
        wrong = client.post(path, data={"csrf_token": "0" * 64})
        assert wrong.status_code == 403 and CSRF_REFUSAL in wrong.text, path


# -- the pieces ---------------------------------------------------------------------------------


def test_lineage_layout_puts_data_first_and_routes_last() -> None:
    """A quantized version of a merged adapter, evaluated and served: columns follow the flow
    and every arrow points right."""
    nodes = [
        {"id": "dataset:d@1", "type": "dataset", "label": "d v1", "url": "/datasets/d?version=1"},
        {"id": "job:j1", "type": "job", "label": "sft job", "url": "/jobs/j1"},
        {"id": "run:r1", "type": "run", "label": "sft d@1", "url": "/runs/r1"},
        {"id": "job:j2", "type": "job", "label": "merge job", "url": "/jobs/j2"},
        {"id": "run:r2", "type": "run", "label": "merge", "url": "/runs/r2"},
        {
            "id": "model_version:m@1",
            "type": "model_version",
            "label": "m v1 (base)",
            "ref": "m@1",
            "url": "/models/m?version=1",
        },
        {
            "id": "model_version:m@2",
            "type": "model_version",
            "label": "m v2 (adapter)",
            "ref": "m@2",
            "url": "/models/m?version=2",
        },
        {
            "id": "model_version:m@3",
            "type": "model_version",
            "label": "m v3 (merged)",
            "ref": "m@3",
            "url": "/models/m?version=3",
        },
        {"id": "eval_run:e", "type": "eval_run", "label": "eval", "url": "/evals/runs/e"},
        {"id": "route:chat", "type": "route", "label": "chat", "url": "/monitor/chat"},
        {"id": "dataset:held@2", "type": "dataset", "label": "held v2", "url": "javascript:x"},
    ]
    edges = [
        ("dataset:d@1", "run:r1", "input"),
        ("job:j1", "run:r1", "executed"),
        ("model_version:m@1", "run:r1", "input"),
        ("run:r1", "model_version:m@2", "produced"),
        ("model_version:m@1", "model_version:m@2", "parent"),
        ("job:j2", "run:r2", "executed"),
        ("model_version:m@2", "run:r2", "input"),
        ("run:r2", "model_version:m@3", "produced"),
        ("model_version:m@2", "model_version:m@3", "parent"),
        ("model_version:m@3", "eval_run:e", "evaluated_by"),
        ("dataset:held@2", "eval_run:e", "evaluated_on"),
        ("model_version:m@3", "route:chat", "target"),
    ]
    graph = {
        "focus": "model_version:m@3",
        "nodes": nodes,
        "edges": [{"source": s, "target": t, "relation": r} for s, t, r in edges],
    }
    layout = layout_lineage(graph)
    column = {n.id: n.column for n in layout.nodes}
    assert column["dataset:d@1"] == column["dataset:held@2"] == 0
    assert column["route:chat"] == max(column.values())
    assert column["eval_run:e"] == column["route:chat"] - 1
    for source, target, _ in edges:
        assert column[source] < column[target], (source, target)
    # A job sits right before the run it executed, not back with the data.
    assert column["job:j2"] == column["run:r2"] - 1
    by_id = {n.id: n for n in layout.nodes}
    assert by_id["model_version:m@3"].focus and not by_id["model_version:m@2"].focus
    assert by_id["model_version:m@2"].url == "/registry/m/versions/2"
    assert by_id["dataset:held@2"].url is None  # only same-site paths become links
    assert layout.columns[0][1] == "Datasets"
    assert layout.columns[-1][1] == "Routes"
    # No two boxes overlap, and every box is inside the drawing.
    boxes = [(n.x, n.y) for n in layout.nodes]
    assert len(set(boxes)) == len(boxes)
    assert all(x > 0 and x + layout.node_width <= layout.width for x, _ in boxes)
    assert all(y > 0 and y + layout.node_height <= layout.height for _, y in boxes)
    assert layout_lineage({"focus": "x", "nodes": [], "edges": []}).nodes == []


def test_card_rendering_escapes_html_and_splits_front_matter() -> None:
    front, body = render_card(
        "---\nlicense: mit\n---\n# m v1\n\n<img src=x onerror=alert(1)>\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n[bad](javascript:alert(1)) [ok](https://example.com)\n"
    )
    assert front == "license: mit"
    assert "<h1>m v1</h1>" in body and "<td>1</td>" in body
    assert "<img" not in body and "&lt;img src=x onerror=alert(1)&gt;" in body
    assert 'href="javascript' not in body and '<a href="https://example.com">ok</a>' in body


def test_series_thinning_and_values() -> None:
    points = [[step, float(step)] for step in range(10_000)]
    thinned = thin(points, 100)
    assert 95 <= len(thinned) <= 102 and thinned[-1] == [9999, 9999.0] and thinned[0] == [0, 0.0]
    assert thin([[1, float("nan")], [2, 1.0]]) == [[2, 1.0]]
    assert fmt_value(0.000123456789) == "0.000123457" and fmt_value(None) == "—"
    assert fmt_value(["q_proj"]) == '["q_proj"]' and fmt_value(True) == "true"
    view = compare_view(
        {
            "runs": [
                {
                    "id": "a" * 32,
                    "name": "A",
                    "kind": "tune.sft",
                    "status": "finished",
                    "experiment": "",
                    "git_commit": None,
                    "job_id": None,
                    "summary": {},
                },
                {
                    "id": "b" * 32,
                    "name": "B",
                    "kind": "tune.sft",
                    "status": "failed",
                    "experiment": "",
                    "git_commit": None,
                    "job_id": None,
                    "summary": {},
                },
            ],
            "params": [
                {"key": "lr", "values": [0.1, 0.2], "differs": True},
                {"key": "bs", "values": [8, 8], "differs": False},
            ],
            "summary": [],
            "metrics": {"a" * 32: {"loss": [[1, 2.0]]}, "b" * 32: {}},
        },
        only_differs=True,
    )
    assert [row["key"] for row in view["params"]] == ["lr"]
    assert view["charts"][0]["chart"]["datasets"][0]["label"] == f"A ({'a' * 8})"
    assert [f["key"] for f in view["facts"] if f["differs"]] == ["status"]
