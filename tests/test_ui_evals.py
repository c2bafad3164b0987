"""The dataset, eval and annotation pages over HTTP (no browser): real content, chart data,
forms with their refusals, an eval run started from the UI, a comparison, and the review
flow storing feedback the API then returns."""

from __future__ import annotations

import html
import json
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import RunningServer, wait_for_trace
from .test_ui_prompts import make_key, ui_session, unique

HTMX = {"HX-Request": "true"}
PLOT = re.compile(r"""data-plot='([^']*)' data-plot-name="([a-z_]+)\"""")


@pytest.fixture(scope="module")
def admin_ui(server: RunningServer) -> Iterator[tuple[httpx.Client, str]]:
    with ui_session(server, server.admin_key) as session:
        yield session


def plots(page: str) -> dict[str, dict[str, Any]]:
    """The Chart.js specs the page hands to app.js, by name."""
    return {name: json.loads(html.unescape(raw)) for raw, name in PLOT.findall(page)}


def create_dataset(api: httpx.Client, name: str, items: list[dict[str, Any]], **extra: Any) -> int:
    response = api.post("/api/datasets", json={"name": name, "items": items, **extra})
    assert response.status_code == 201, response.text
    version: int = response.json()["version"]
    return version


def wait_for_run(api: httpx.Client, run_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run: dict[str, Any] = api.get(f"/api/evals/runs/{run_id}").json()
        if run["status"] != "running":
            return run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} still running after {timeout}s")


QUALITY_ITEMS = [
    {"input": "hi", "expected": "echo: hi"},
    {"input": "hi", "expected": "echo: hi"},  # an exact duplicate of the first
    {"input": "Contact me at jane.doe@example.com please", "expected": "ok"},
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "what is two plus two"},
        ],
        "expected": "4",
    },
    {"input": "the quick brown fox jumps over the lazy dog today", "expected": ""},
    {"input": "The quick brown fox jumps over the lazy dog today!", "expected": "x"},
]


def test_dataset_pages_profile_items_and_export(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, _ = admin_ui
    name = unique("ui-data")
    create_dataset(api, name, QUALITY_ITEMS, message="seed", test_fraction=0.5)

    listing = client.get("/datasets")
    assert listing.status_code == 200
    row = re.search(rf'<tr[^>]*data-dataset="{name}".*?</tr>', listing.text, re.S)
    assert row and 'data-items="6"' in row.group(0) and "seed" in row.group(0)
    assert 'id="upload-form"' in listing.text and 'id="traces-form"' in listing.text

    page = client.get(f"/datasets/{name}")
    assert page.status_code == 200
    text = page.text
    assert "Contact me at jane.doe@example.com please" in text  # the item, in the table
    assert re.search(r'data-kpi="exact_duplicates">1<', text)
    assert re.search(r'data-kpi="near_duplicates">1<', text), "the two fox items"
    assert re.search(r'data-count="empty_expected">1<', text)
    assert "j***@example.com" in text and 'data-pii="email"' in text
    charts = plots(text)
    assert set(charts) == {"input", "expected", "roles"}
    assert sum(charts["input"]["datasets"][0]["data"]) == 6
    assert sum(charts["expected"]["datasets"][0]["data"]) == 6
    roles = dict(
        zip(charts["roles"]["labels"], charts["roles"]["datasets"][0]["data"], strict=True)
    )
    assert roles == {"user": 6, "system": 1}
    assert re.search(r'<tr data-version="1"[^>]*>', text) and "seed" in text

    # The split filter swaps only the items table (HTMX), with a tidy URL to push.
    test_rows = client.get(
        f"/datasets/{name}",
        params={"version": "1", "split": "test"},
        headers={**HTMX, "HX-Target": "dataset-items"},
    )
    assert test_rows.status_code == 200
    assert "<html" not in test_rows.text and 'id="items-table"' in test_rows.text
    splits = re.findall(r'data-split="(train|test)"', test_rows.text)
    assert splits and set(splits) == {"test"}
    assert test_rows.headers["hx-push-url"] == f"/datasets/{name}?version=1&split=test"

    export = client.get(f"/datasets/{name}/export", params={"version": "1"})
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/jsonl")
    assert f'filename="{name}-v1.jsonl"' in export.headers["content-disposition"]
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert len(lines) == 6 and lines[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert lines[0]["expected"] == "echo: hi"

    missing = client.get("/datasets/no-such-dataset")
    assert missing.status_code == 404 and "No dataset" in missing.text
    assert client.get("/datasets/no-such-dataset/export").status_code == 404


def test_upload_form_adds_a_version_and_explains_bad_files(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, token = admin_ui
    name = unique("ui-upload")
    create_dataset(api, name, [{"input": "first", "expected": "1"}])
    body = b'{"input": "uploaded question", "expected": "uploaded answer"}\n{"input": "two"}\n'

    def upload(data: bytes, filename: str = "more.jsonl", **fields: str) -> httpx.Response:
        form = {"csrf_token": token, "name": name, "message": "from the browser", **fields}
        return client.post("/datasets/import", data=form, files={"file": (filename, data)})

    assert (
        client.post(
            "/datasets/import", data={"name": name}, files={"file": ("a.jsonl", body)}
        ).status_code
        == 403
    ), "no CSRF token"

    created = upload(body)
    assert created.status_code == 303, created.text
    assert created.headers["location"] == f"/datasets/{name}?version=2&created=2"
    page = client.get(created.headers["location"])
    assert "Version 2 created." in page.text and "uploaded question" in page.text
    assert re.search(r'<tr data-version="2"[^>]*>', page.text)
    assert "import: more.jsonl" in page.text and "from the browser" in page.text
    described = api.get(f"/api/datasets/{name}").json()
    assert described["version"] == 2 and described["items"] == 2

    again = upload(body)
    assert again.headers["location"] == f"/datasets/{name}?version=2&unchanged=2"

    broken = upload(b'{"input": "ok"}\n{"expected": 5}\n', "broken.jsonl")
    assert broken.status_code == 400
    assert "broken.jsonl:2" in broken.text and 'data-form="upload"' in broken.text
    assert f'value="{name}"' in broken.text, "the form keeps the name"
    empty = upload(b"", "empty.csv")
    assert empty.status_code == 400 and "at least one item" in empty.text
    no_file = client.post("/datasets/import", data={"csrf_token": token, "name": name})
    assert no_file.status_code == 400 and "Choose a JSONL" in no_file.text


def test_eval_suite_run_and_comparison_from_the_ui(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, token = admin_ui
    dataset = unique("ui-eval-data")
    items = [
        {"input": "hi", "expected": "echo: hi"},
        {"input": "yo", "expected": "echo: yo"},
        {"input": "bye", "expected": "something else"},
    ]
    create_dataset(api, dataset, items)
    suite = unique("ui-suite")
    form = {
        "csrf_token": token,
        "name": suite,
        "dataset": dataset,
        "target": "echo",
        "scorers": "exact_match\n{type: contains, name: says_echo}",
        "thresholds": "exact_match: 0.5",
        "max_tokens": "8",
        "concurrency": "2",
    }
    bad = client.post("/evals/suites", data={**form, "scorers": "no_such_scorer"})
    assert bad.status_code == 400 and "unknown scorer type" in bad.text
    assert 'data-form="suite"' in bad.text and f'value="{suite}"' in bad.text
    saved = client.post("/evals/suites", data=form)
    assert saved.status_code == 303, saved.text
    evals = client.get(saved.headers["location"])
    row = re.search(rf'<tr data-suite="{suite}">.*?</tr>', evals.text, re.S)
    assert row and "echo" in row.group(0) and "says_echo" in row.group(0)
    assert f"Saved suite &#39;{suite}&#39;." in evals.text

    unknown = client.post(
        "/evals/runs", data={"csrf_token": token, "suite": suite, "target": "no-such-route"}
    )
    assert unknown.status_code == 400 and "no route or model" in unknown.text

    started = client.post("/evals/runs", data={"csrf_token": token, "suite": suite})
    assert started.status_code == 303, started.text
    baseline = started.headers["location"].rsplit("/", 1)[1]
    assert wait_for_run(api, baseline)["status"] == "completed"
    page = client.get(f"/evals/runs/{baseline}")
    assert page.status_code == 200
    summary = re.search(r'<tr data-scorer="exact_match" data-mean="([0-9.]+)"', page.text)
    assert summary and float(summary.group(1)) == pytest.approx(2 / 3)
    assert 'id="run-verdict"><span class="status status-ok" data-verdict="passed"' in page.text
    chart = plots(page.text)["summary"]
    assert chart["labels"] == ["exact_match", "says_echo"]
    assert chart["datasets"][0]["data"][0] == pytest.approx(2 / 3)
    assert len(chart["datasets"][0]["low"]) == 2 and len(chart["datasets"][0]["high"]) == 2
    first = re.search(r'<tr data-position="0">.*?</tr>', page.text, re.S)
    assert (
        first
        and "echo: hi" in first.group(0)
        and 'data-score="exact_match">1.000' in first.group(0)
    )

    # The runs table polls a running row; a finished one stops polling.
    row_html = client.get(
        f"/evals/runs/{baseline}", headers={**HTMX, "HX-Target": f"run-row-{baseline}"}
    )
    assert row_html.text.lstrip().startswith(f'<tr id="run-row-{baseline}"')
    assert "hx-trigger" not in row_html.text and 'data-progress="3/3"' in row_html.text
    progress = client.get(f"/evals/runs/{baseline}", headers={**HTMX, "HX-Target": "run-progress"})
    assert progress.headers["hx-refresh"] == "true"

    # The same suite on another target (the local model) answers differently.
    override = client.post(
        "/evals/runs", data={"csrf_token": token, "suite": suite, "target": "default"}
    )
    assert override.status_code == 303, override.text
    candidate = override.headers["location"].rsplit("/", 1)[1]
    assert wait_for_run(api, candidate)["status"] == "completed"

    compare = client.get("/evals/compare", params={"baseline": baseline, "candidate": candidate})
    assert compare.status_code == 200, compare.text
    api_report = api.get(
        "/api/evals/compare", params={"baseline": baseline, "candidate": candidate}
    ).json()
    exact = api_report["scorers"]["exact_match"]
    scorer_row = re.search(r'<tr data-scorer="exact_match"[^>]*>.*?</tr>', compare.text, re.S)
    assert scorer_row
    assert f'data-delta="{exact["delta"]}"' in scorer_row.group(0)
    assert f'data-p-value="{exact["p_value"]}"' in scorer_row.group(0)
    assert exact["delta"] == pytest.approx(-2 / 3) and exact["p_value"] is not None
    wtl = f"{exact['wins']}/{exact['ties']}/{exact['losses']}"
    assert f'data-wtl="{wtl}"' in scorer_row.group(0) and exact["losses"] == 2
    assert 'data-verdict="failed"' in compare.text, "the candidate misses the threshold"
    assert 'data-check="threshold exact_match" data-passed="no"' in compare.text
    regressions = re.findall(r'<article class="card regression" data-position="(\d)"', compare.text)
    assert sorted(regressions) == ["0", "1"], "one card per item that got worse"
    assert 'data-scorer="exact_match">exact_match 1.000 → ' in compare.text
    assert '<pre class="template-text" data-side="baseline">echo: hi</pre>' in compare.text
    assert {"means", "delta"} <= set(plots(compare.text))

    # A run compared with one on another dataset version is explained, not a 500.
    create_dataset(api, dataset, [*items, {"input": "new", "expected": "echo: new"}])
    third = client.post("/evals/runs", data={"csrf_token": token, "suite": suite})
    other = third.headers["location"].rsplit("/", 1)[1]
    wait_for_run(api, other)
    refused = client.get("/evals/compare", params={"baseline": baseline, "candidate": other})
    assert refused.status_code == 400 and "same dataset version" in refused.text
    assert client.get("/evals/runs/not-a-run").status_code == 404

    listing = client.get("/evals")
    assert f'name="baseline" value="{baseline}"' in listing.text
    assert f'name="candidate" value="{candidate}"' in listing.text
    finished = client.post(f"/evals/runs/{baseline}/cancel", data={"csrf_token": token})
    assert finished.status_code == 409 and "already completed" in finished.text

    # Editing fills the form with the stored suite; deleting removes it (its runs stay).
    edit = client.get("/evals", params={"edit": suite})
    assert "{name: says_echo, type: contains}" in edit.text and "exact_match: 0.5" in edit.text
    deleted = client.post(f"/evals/suites/{suite}/delete", data={"csrf_token": token})
    assert deleted.status_code == 303
    assert f'data-suite="{suite}"' not in client.get(deleted.headers["location"]).text
    assert client.get(f"/evals/runs/{baseline}").status_code == 200


def chat(api: httpx.Client, text: str) -> str:
    response = api.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": text}]},
    )
    assert response.status_code == 200, response.text
    trace_id: str = response.headers["x-flywheel-trace-id"]
    wait_for_trace(api, trace_id)
    return trace_id


def task_of(page: str) -> tuple[int, str]:
    found = re.search(r'id="review-task" data-task="(\d+)" data-trace="([0-9a-f]+)"', page)
    assert found, page
    return int(found.group(1)), found.group(2)


def test_annotation_queue_review_flow(server: RunningServer, api: httpx.Client) -> None:
    texts = {chat(api, f"review me {secrets.token_hex(3)}"): "" for _ in range(3)}
    for trace_id in texts:
        span = api.get(f"/api/traces/{trace_id}").json()["spans"][0]
        texts[trace_id] = span["input"]["messages"][0]["content"]
    queue = f"q-{secrets.token_hex(4)}"
    with ui_session(server, make_key(api, "reviewer")) as (client, token):
        added = client.post(
            "/annotate/enqueue",
            data={"csrf_token": token, "queue": queue, "route": "echo", "hours": "1", "limit": "3"},
        )
        assert added.status_code == 303, added.text
        assert added.headers["location"] == f"/annotate?queue={queue}&added=3"
        overview = client.get(added.headers["location"])
        assert "Added 3 traces" in overview.text
        assert re.search(r'data-stat="pending">3<', overview.text)

        page = client.get(f"/annotate/{queue}")
        assert page.status_code == 200
        task_id, trace_id = task_of(page.text)
        assert trace_id in texts and texts[trace_id] in page.text
        answer = f"echo: {texts[trace_id]}"
        assert f'<pre class="message-text" id="review-answer">{answer}</pre>' in page.text
        assert f'<textarea name="correction" rows="6" maxlength="100000">{answer}</textarea>' in (
            page.text
        ), "the correction starts as the answer"
        digest = re.search(r'name="digest" value="([0-9a-f]+)"', page.text)
        assert digest

        partial = {**HTMX, "HX-Target": "annotate-task"}
        nothing = client.post(
            f"/annotate/{queue}/tasks/{task_id}/complete",
            data={"csrf_token": token, "digest": digest.group(1), "correction": answer},
            headers=partial,
        )
        assert nothing.status_code == 400 and "Feedback needs" in nothing.text
        assert task_of(nothing.text) == (task_id, trace_id), "the same task, shown again"

        corrected = "A better answer,\r\non two lines."
        done = client.post(
            f"/annotate/{queue}/tasks/{task_id}/complete",
            data={
                "csrf_token": token,
                "digest": digest.group(1),
                "rating": "4",
                "comment": "close",
                "correction": corrected,
            },
            headers=partial,
        )
        assert done.status_code == 200 and "<html" not in done.text
        assert "Saved. Here is the next one." in done.text
        next_id, next_trace = task_of(done.text)
        assert next_trace != trace_id and next_trace in texts

        (feedback,) = api.get(f"/api/traces/{trace_id}/feedback").json()["data"]
        assert feedback["rating"] == 0.75 and feedback["rating_kind"] == "score"
        assert feedback["comment"] == "close" and feedback["source"] == "annotation"
        assert feedback["correction"] == "A better answer,\non two lines."
        assert feedback["author"].startswith("key:ui prompts reviewer")

        # Thumbs up with the correction left as the answer: no correction is stored.
        next_digest = re.search(r'name="digest" value="([0-9a-f]+)"', done.text)
        assert next_digest
        thumbs = client.post(
            f"/annotate/{queue}/tasks/{next_id}/complete",
            data={
                "csrf_token": token,
                "digest": next_digest.group(1),
                "rating": "up",
                "correction": f"echo: {texts[next_trace]}\r\n".rstrip(),
            },
        )
        assert thumbs.status_code == 303
        assert thumbs.headers["location"] == f"/annotate/{queue}?saved=1"
        (up,) = api.get(f"/api/traces/{next_trace}/feedback").json()["data"]
        assert up["rating"] == 1.0 and up["rating_kind"] == "thumbs" and up["correction"] is None

        last_id, last_trace = task_of(client.get(f"/annotate/{queue}").text)
        skipped = client.post(
            f"/annotate/{queue}/tasks/{last_id}/skip", data={"csrf_token": token}, headers=partial
        )
        assert skipped.status_code == 200 and 'id="queue-empty"' in skipped.text
        assert api.get(f"/api/traces/{last_trace}/feedback").json()["data"] == []
        stats = client.get("/annotate", params={"queue": queue}).text
        assert re.search(r'data-stat="done">2<', stats) and re.search(
            r'data-stat="skipped">1<', stats
        )

        # Corrections become training data and dataset items.
        sft = client.get("/annotate/export", params={"format": "sft"})
        examples = [json.loads(line) for line in sft.text.splitlines()]
        mine = [e for e in examples if e["trace_id"] == trace_id]
        assert mine and mine[0]["messages"][-1]["content"] == "A better answer,\non two lines."
        name = unique("ui-corrected")
        built = client.post(
            "/datasets/from-traces",
            data={
                "csrf_token": token,
                "name": name,
                "route": "echo",
                "since_hours": "1",
                "with_correction": "yes",
                "expected": "correction",
            },
        )
        assert built.status_code == 303, built.text
        items = api.get(f"/api/datasets/{name}/items").json()["data"]
        assert "A better answer,\non two lines." in [i["expected"] for i in items]

        bad_queue = client.post(
            "/annotate/enqueue", data={"csrf_token": token, "queue": "Not A Queue"}
        )
        assert bad_queue.status_code == 400 and "queue name" in bad_queue.text
        assert client.get("/annotate", params={"queue": "Not A Queue"}).status_code == 400
        assert client.get("/annotate/Not-A-Queue").status_code == 400


def test_viewers_read_but_cannot_post(server: RunningServer, api: httpx.Client) -> None:
    with ui_session(server, make_key(api, "viewer")) as (client, token):
        datasets = client.get("/datasets")
        assert datasets.status_code == 200 and 'id="upload-form"' not in datasets.text
        assert client.get("/evals").status_code == 200
        assert client.get("/annotate").status_code == 200
        assert client.get("/annotate/default").status_code == 403  # reviewing writes feedback
        posts = {
            "/datasets/import": {"name": "x"},
            "/datasets/from-traces": {"name": "x"},
            "/evals/suites": {"name": "x"},
            "/evals/runs": {"suite": "x"},
            "/evals/suites/x/delete": {},
            "/evals/runs/x/cancel": {},
            "/annotate/enqueue": {"queue": "default"},
            "/annotate/default/tasks/1/complete": {"rating": "up"},
            "/annotate/default/tasks/1/skip": {},
        }
        for path, data in posts.items():
            response = client.post(path, data={"csrf_token": token, **data})
            assert response.status_code == 403, path
            assert "permission" in response.text, path
