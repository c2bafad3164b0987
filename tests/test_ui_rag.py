"""The knowledge-base and pipeline pages over HTTP (no browser): a knowledge base created and
filled through the forms (files, a folder path, a bad file, URLs), its documents and their
chunks over the text, the three-column retrieval box, pipelines saved, refused and run, and
what viewers may do."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from flywheel.ui.rag import chunk_segments, upload_source

from .conftest import RunningServer, wait_for_trace
from .test_rag_api import BAD_JSON, INSTALL, PASSWORDS
from .test_ui_prompts import make_key, ui_session, unique

HTMX = {"HX-Request": "true"}
PIPELINE = """\
name: {name}
description: Greets through the echo route
inputs:
  who: {{type: string}}
  times: {{type: integer, default: 1}}
steps:
  - id: greeting
    type: llm
    model: echo
    messages:
      - {{role: user, content: "Hello {{{{ who }}}} x{{{{ times }}}}"}}
output: "{{{{ greeting }}}}"
"""


@dataclass
class Kb:
    name: str
    report_page: str
    report_headers: httpx.Headers


def row(page: str, attribute: str, value: str) -> str:
    """The table row marked ``attribute="value"``."""
    found = re.search(rf'<tr [^>]*{attribute}="{re.escape(value)}".*?</tr>', page, re.S)
    assert found, f"no row with {attribute}={value!r}"
    return found.group(0)


def column(page: str, key: str) -> list[tuple[str, str]]:
    """(rank, source) of each hit in one retrieval column."""
    found = re.search(rf'data-column="{key}".*?</section>', page, re.S)
    assert found, f"no {key} column"
    return re.findall(r'data-rank="(\d+)" data-source="([^"]+)"', found.group(0))


def problems(page: str) -> list[str]:
    """The pipeline problems listed on the page."""
    listed = re.search(r'<ul class="problems" id="pipeline-problems">(.*?)</ul>', page, re.S)
    assert listed, "no problems listed"
    return [html.unescape(p) for p in re.findall(r"<li[^>]*>(.*?)</li>", listed.group(1))]


def upload(
    client: httpx.Client, token: str, kb: str, files: dict[str, bytes], partial: bool = True
) -> httpx.Response:
    headers = {**HTMX, "HX-Target": "ingest-report", "X-CSRF-Token": token} if partial else {}
    data = {} if partial else {"csrf_token": token}
    parts = [("files", (name, body)) for name, body in files.items()]
    return client.post(f"/kbs/{kb}/documents", files=parts, data=data, headers=headers)


@pytest.fixture(scope="module")
def admin_ui(server: RunningServer) -> Iterator[tuple[httpx.Client, str]]:
    with ui_session(server, server.admin_key) as session:
        yield session


@pytest.fixture(scope="module")
def kb(admin_ui: tuple[httpx.Client, str]) -> Kb:
    """A markdown-chunked knowledge base made through the form, with a Markdown file in a
    folder, a text file and a broken JSON file uploaded through the upload form."""
    client, token = admin_ui
    name = unique("ui-kb")
    created = client.post(
        "/kbs",
        data={
            "csrf_token": token,
            "name": name,
            "description": "Handbook for the UI tests",
            "strategy": "markdown",
            "chunk_tokens": "32",
            "overlap_tokens": "4",
        },
    )
    assert created.status_code == 303, created.text
    assert created.headers["location"] == f"/kbs/{name}?created=1"
    response = upload(
        client,
        token,
        name,
        {
            "guide/install.md": INSTALL.encode(),
            "passwords.txt": PASSWORDS.encode(),
            "broken.json": BAD_JSON,
        },
    )
    assert response.status_code == 200, response.text
    return Kb(name, response.text, response.headers)


def test_upload_report_lists_each_file(admin_ui: tuple[httpx.Client, str], kb: Kb) -> None:
    client, token = admin_ui
    report = kb.report_page
    assert report.startswith('<div id="ingest-report"'), "the partial, not the whole page"
    assert 'data-added="2"' in report and 'data-failed="1"' in report
    assert 'data-index-version="1"' in report
    assert 'data-outcome="added" data-source="guide/install.md"' in report
    assert 'data-outcome="added" data-source="passwords.txt"' in report
    failed = row(report, "data-outcome", "failed")
    assert 'data-source="broken.json"' in failed and "JSON" in failed
    # The documents table is told to refresh itself.
    assert kb.report_headers["hx-trigger"] == "kb-changed"

    # The same files again change nothing: no new index version; without HTMX, the page.
    again = upload(
        client,
        token,
        kb.name,
        {"guide/install.md": INSTALL.encode(), "passwords.txt": PASSWORDS.encode()},
        partial=False,
    )
    assert again.status_code == 200
    assert "<h1>Knowledge base" in again.text
    assert 'data-unchanged="2"' in again.text and 'data-index-version="1"' in again.text

    empty = upload(client, token, kb.name, {}, partial=True)
    assert empty.status_code == 400
    assert "Choose one or more files" in empty.text


def test_list_and_create_form(admin_ui: tuple[httpx.Client, str], kb: Kb) -> None:
    client, token = admin_ui
    page = client.get("/kbs")
    assert page.status_code == 200
    assert '<a href="/kbs" class="active" aria-current="page">Knowledge bases</a>' in page.text
    listed = row(page.text, "data-kb", kb.name)
    assert f'href="/kbs/{kb.name}"' in listed and "Handbook for the UI tests" in listed
    assert 'data-documents="2"' in listed and 'data-index="1"' in listed
    assert "builtin:minilm" in listed and "markdown · 32 tokens" in listed
    chunks = int(re.search(r'data-chunks="(\d+)"', listed).group(1))  # type: ignore[union-attr]
    assert chunks >= 4

    bad = client.post(
        "/kbs",
        data={"csrf_token": token, "name": unique("ui-kb"), "chunk_tokens": "32",
              "overlap_tokens": "32", "strategy": "recursive"},
    )  # fmt: skip
    assert bad.status_code == 400
    assert "overlap_tokens" in html.unescape(bad.text)
    taken = client.post(
        "/kbs", data={"csrf_token": token, "name": kb.name, "strategy": "recursive"}
    )
    assert taken.status_code == 409 and "exists already" in taken.text
    # What was typed stays in the form.
    assert f'value="{kb.name}"' in taken.text


def test_kb_page_shows_settings_versions_and_documents(
    admin_ui: tuple[httpx.Client, str], kb: Kb
) -> None:
    client, _ = admin_ui
    page = client.get(f"/kbs/{kb.name}?created=1")
    assert page.status_code == 200
    text = page.text
    assert "Knowledge base created" in text
    assert 'data-setting="strategy">markdown<' in text
    assert 'data-kpi="documents">2<' in text and 'data-kpi="index_version">v1<' in text
    assert '<tr data-version="1" class="row-current">' in text
    assert 'id="upload-folder"' in text and "webkitdirectory" in text
    install = row(text, "data-source", "guide/install.md")
    assert re.search(r'href="/kbs/[^"]+/documents/[0-9a-f]{32}"', install)
    assert 'data-source="passwords.txt"' in text

    # The source filter, as HTMX asks for it: the table alone, plus the counts out of band.
    filtered = client.get(
        f"/kbs/{kb.name}", params={"q": "guide/"}, headers={**HTMX, "HX-Target": "kb-documents"}
    )
    assert filtered.status_code == 200
    assert filtered.text.startswith('<div id="kb-documents"')
    assert 'data-source="guide/install.md"' in filtered.text
    assert 'data-source="passwords.txt"' not in filtered.text
    assert '<div id="kb-summary" hx-swap-oob="true">' in filtered.text
    assert filtered.headers["hx-push-url"] == f"/kbs/{kb.name}?q=guide%2F"
    nothing = client.get(f"/kbs/{kb.name}", params={"q": "nope"})
    assert "No document's source contains" in nothing.text


def test_document_page_marks_chunks_over_the_text(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client, kb: Kb
) -> None:
    client, _ = admin_ui
    page = client.get(f"/kbs/{kb.name}")
    link = re.search(
        r'<tr data-source="guide/install.md"[^>]*>.*?href="([^"]+)"', page.text, re.S
    ).group(1)  # type: ignore[union-attr]
    doc = client.get(link)
    assert doc.status_code == 200
    rows = re.findall(r'<tr data-chunk="(\d+)" data-start="(\d+)" data-end="(\d+)"', doc.text)
    assert len(rows) >= 3
    spans = [(int(s), int(e)) for _, s, e in rows]
    for start, end in spans:
        assert 0 <= start < end <= len(INSTALL)
    assert "[0, " in doc.text  # offsets shown as [start, end)
    assert "Installing Flywheel \u203a From PyPI" in doc.text  # a heading path
    document_id = link.rsplit("/", 1)[1]
    stored = api.get(f"/api/kbs/{kb.name}/documents/{document_id}").json()["text"]
    assert stored.strip() == INSTALL.strip()
    pre = re.search(r'<pre class="document-text"[^>]*>\n(.*?)</pre>', doc.text, re.S).group(1)  # type: ignore[union-attr]
    # Without the markers, the text is the document's text exactly.
    assert html.unescape(re.sub(r"<[^>]+>", "", pre)) == stored

    second, (start, end) = rows[1][0], spans[1]
    marked = client.get(f"{link}?chunk={second}")
    active = re.findall(r'<span class="seg[^"]*is-active[^"]*"[^>]*>(.*?)</span>', marked.text)
    assert html.unescape("".join(active)) == stored[start:end]
    assert (
        f'<tr data-chunk="{second}" data-start="{start}" data-end="{end}" class="chunk-row row-current">'
        in marked.text
    )

    missing = client.get(f"/kbs/{kb.name}/documents/{'0' * 32}")
    assert missing.status_code == 404 and "No document" in missing.text


def test_search_box_shows_three_columns(admin_ui: tuple[httpx.Client, str], kb: Kb) -> None:
    client, token = admin_ui
    response = client.post(
        f"/kbs/{kb.name}/search",
        data={"query": "forgot my password, ask an administrator", "top_k": "3"},
        headers={**HTMX, "HX-Target": "kb-search", "X-CSRF-Token": token},
    )
    assert response.status_code == 200, response.text
    text = response.text
    assert text.startswith('<div id="kb-search"')
    dense, bm25, hybrid = column(text, "dense"), column(text, "bm25"), column(text, "hybrid")
    for hits in (dense, bm25, hybrid):
        assert hits[0] == ("1", "passwords.txt"), hits
        assert 1 <= len(hits) <= 3
    hybrid_block = re.search(r'data-column="hybrid".*?</section>', text, re.S).group(0)  # type: ignore[union-attr]
    assert 'data-dense-rank="1"' in hybrid_block and 'data-bm25-rank="1"' in hybrid_block
    # One chunk, one label and colour in every column.
    top = re.findall(r'class="hit (chunk-color-\d)" data-chunk-id="(\d+)" data-rank="1"', text)
    assert len(top) == 3 and len(set(top)) == 1
    assert "passwords.txt#0" in text

    full = client.post(
        f"/kbs/{kb.name}/search", data={"csrf_token": token, "query": "upgrade the package"}
    )
    assert full.status_code == 200 and "<h1>Knowledge base" in full.text
    assert column(full.text, "bm25")[0][1] == "guide/install.md"
    assert 'value="upgrade the package"' in full.text
    empty = client.post(
        f"/kbs/{kb.name}/search",
        data={"query": "  "},
        headers={**HTMX, "HX-Target": "kb-search", "X-CSRF-Token": token},
    )
    assert empty.status_code == 400 and "Type a query" in empty.text


def test_urls_are_fetched_under_the_fetch_policy(
    admin_ui: tuple[httpx.Client, str], kb: Kb
) -> None:
    client, token = admin_ui
    response = client.post(
        f"/kbs/{kb.name}/urls",
        data={"urls": "http://127.0.0.1:9/private.html\n\n"},
        headers={**HTMX, "HX-Target": "ingest-report", "X-CSRF-Token": token},
    )
    assert response.status_code == 200, response.text
    failed = row(response.text, "data-outcome", "failed")
    assert "127.0.0.1" in failed and 'data-added="0"' in response.text
    none = client.post(
        f"/kbs/{kb.name}/urls",
        data={"urls": "\n"},
        headers={**HTMX, "HX-Target": "ingest-report", "X-CSRF-Token": token},
    )
    assert none.status_code == 400 and "one or more URLs" in none.text


def test_delete_a_document_and_a_kb(admin_ui: tuple[httpx.Client, str]) -> None:
    client, token = admin_ui
    name = unique("ui-kb-del")
    assert client.post("/kbs", data={"csrf_token": token, "name": name}).status_code == 303
    report = upload(client, token, name, {"a.txt": b"alpha text", "b.txt": b"beta text"})
    assert 'data-added="2"' in report.text
    page = client.get(f"/kbs/{name}")
    action = re.search(
        r'<tr data-source="a.txt".*?<form method="post" action="([^"]+)"', page.text, re.S
    ).group(1)  # type: ignore[union-attr]
    deleted = client.post(action, data={"csrf_token": token})
    assert deleted.status_code == 303
    assert deleted.headers["location"] == f"/kbs/{name}?deleted_document=a.txt"
    after = client.get(deleted.headers["location"])
    assert "Deleted a.txt" in after.text and 'data-source="a.txt"' not in after.text
    assert 'data-kpi="index_version">v2<' in after.text

    gone = client.post(f"/kbs/{name}/delete", data={"csrf_token": token})
    assert gone.status_code == 303 and gone.headers["location"] == f"/kbs?deleted={name}"
    missing = client.get(f"/kbs/{name}")
    assert missing.status_code == 404 and "Knowledge base not found" in missing.text


def test_documents_are_paged(admin_ui: tuple[httpx.Client, str], api: httpx.Client) -> None:
    client, token = admin_ui
    name = unique("ui-kb-pages")
    assert client.post("/kbs", data={"csrf_token": token, "name": name}).status_code == 303
    documents = [{"source": f"doc-{i:02d}.txt", "text": f"note number {i}"} for i in range(53)]
    ingested = api.post(f"/api/kbs/{name}/documents", json={"documents": documents})
    assert ingested.status_code == 200, ingested.text
    first = client.get(f"/kbs/{name}")
    assert len(re.findall(r'<tr data-source="doc-', first.text)) == 50
    assert 'id="documents-next"' in first.text and 'id="documents-prev"' not in first.text
    second = client.get(f"/kbs/{name}?page=2", headers={**HTMX, "HX-Target": "kb-documents"})
    sources = re.findall(r'<tr data-source="(doc-\d+\.txt)"', second.text)
    assert sources == ["doc-50.txt", "doc-51.txt", "doc-52.txt"]
    assert 'id="documents-prev"' in second.text and 'id="documents-next"' not in second.text


def test_viewer_reads_and_searches_but_cannot_write(
    server: RunningServer, api: httpx.Client, kb: Kb
) -> None:
    with ui_session(server, make_key(api, "viewer")) as (client, token):
        page = client.get(f"/kbs/{kb.name}")
        assert page.status_code == 200
        assert 'id="upload-form"' not in page.text and 'id="kb-delete"' not in page.text
        assert 'id="search-form"' in page.text
        assert 'id="kb-form"' not in client.get("/kbs").text
        refused = upload(client, token, kb.name, {"x.txt": b"sneaky"}, partial=False)
        assert refused.status_code == 403
        assert client.post("/kbs", data={"csrf_token": token, "name": "x"}).status_code == 403
        searched = client.post(
            f"/kbs/{kb.name}/search", data={"csrf_token": token, "query": "password"}
        )
        assert searched.status_code == 200 and 'data-column="hybrid"' in searched.text
        pipelines = client.get("/pipelines")
        assert pipelines.status_code == 200 and 'id="pipeline-form"' not in pipelines.text
        saved = client.post("/pipelines", data={"csrf_token": token, "spec": "name: x"})
        assert saved.status_code == 403
    assert 'data-source="x.txt"' not in api.get(f"/api/kbs/{kb.name}/documents").text


def test_unknown_kb_is_a_404_page(admin_ui: tuple[httpx.Client, str]) -> None:
    client, token = admin_ui
    page = client.get("/kbs/no-such-kb")
    assert page.status_code == 404
    text = html.unescape(page.text)
    assert "Knowledge base not found" in text and "No knowledge base 'no-such-kb'." in text
    posted = upload(client, token, "no-such-kb", {"a.txt": b"x"}, partial=False)
    assert posted.status_code == 404 and "Knowledge base not found" in posted.text


def test_pipeline_saved_refused_and_run(
    admin_ui: tuple[httpx.Client, str], api: httpx.Client
) -> None:
    client, token = admin_ui
    name = unique("ui-pipe")
    spec = PIPELINE.format(name=name)
    saved = client.post("/pipelines", data={"csrf_token": token, "spec": spec})
    assert saved.status_code == 303, saved.text
    assert saved.headers["location"] == f"/pipelines/{name}?created=1"
    listed = client.get("/pipelines")
    assert f'href="/pipelines/{name}"' in row(listed.text, "data-pipeline", name)

    misspelt = spec.replace("{{ who }}", "{{ whom }}")
    refused = client.post("/pipelines", data={"csrf_token": token, "spec": misspelt})
    assert refused.status_code == 400
    assert problems(refused.text) == [
        "pipeline.yaml:11: step 'greeting' (llm): messages[0].content: undefined variable "
        "'whom' (defined so far: who, times)"
    ]
    assert "{{ whom }}" in html.unescape(refused.text)  # the YAML stays in the form
    no_model = client.post(
        "/pipelines", data={"csrf_token": token, "spec": spec.replace("model: echo", "model: ''")}
    )
    assert no_model.status_code == 400
    (problem,) = problems(no_model.text)
    assert "step 'greeting' (llm): model:" in problem
    assert api.get(f"/api/pipelines/{name}").json()["version"] == 1

    page = client.get(f"/pipelines/{name}?created=1")
    assert page.status_code == 200 and "Pipeline created." in page.text
    assert (
        html.unescape(
            re.search(r'<pre [^>]*id="pipeline-yaml">(.*?)</pre>', page.text, re.S).group(1)
        )
        == spec
    )  # type: ignore[union-attr]
    assert 'name="input.who"' in page.text and 'name="input.times" step="1"' in page.text

    run = client.post(
        f"/pipelines/{name}/run",
        data={"input.who": "Ada", "input.times": "2"},
        headers={**HTMX, "HX-Target": "pipeline-run", "X-CSRF-Token": token},
    )
    assert run.status_code == 200, run.text
    assert run.text.startswith('<div id="pipeline-run"')
    assert 'data-status="ok"' in run.text
    output = re.search(r'<pre class="template-text" id="run-output">(.*?)</pre>', run.text, re.S)
    assert output and html.unescape(output.group(1)) == "echo: Hello Ada x2"
    assert 'data-step="greeting" data-status="ok"' in run.text
    trace_id = re.search(r'href="/traces/([0-9a-f]+)" id="run-trace"', run.text).group(1)  # type: ignore[union-attr]
    kinds = {s["kind"] for s in wait_for_trace(api, trace_id)["spans"]}
    assert {"pipeline.run", "pipeline.step", "gateway.chat"} <= kinds

    by_json = client.post(
        f"/pipelines/{name}/run",
        data={"csrf_token": token, "inputs_json": '{"who": "Bo"}'},
    )
    assert by_json.status_code == 200 and "<h1>Pipeline" in by_json.text
    assert "echo: Hello Bo x1" in html.unescape(by_json.text)
    missing = client.post(
        f"/pipelines/{name}/run",
        data={"input.times": "3"},
        headers={**HTMX, "HX-Target": "pipeline-run", "X-CSRF-Token": token},
    )
    assert missing.status_code == 400 and "who" in missing.text and 'id="run-error"' in missing.text

    deleted = client.post(f"/pipelines/{name}/delete", data={"csrf_token": token})
    assert deleted.status_code == 303
    gone = client.get(f"/pipelines/{name}")
    assert gone.status_code == 404 and "Pipeline not found" in gone.text


def test_upload_sources_and_chunk_segments() -> None:
    assert upload_source("docs\\guide/./../install.md") == "docs/guide/install.md"
    assert upload_source("/abs//a.md") == "abs/a.md" and upload_source("..") == "upload"
    text = "abcdefghij"
    chunks = [{"start": 0, "end": 6, "position": 0}, {"start": 4, "end": 10, "position": 1}]
    segments = chunk_segments(text, chunks)
    assert [(s.text, s.chunks, s.starts) for s in segments] == [
        ("abcd", (0,), (0,)),
        ("ef", (0, 1), (1,)),
        ("ghij", (1,), ()),
    ]
