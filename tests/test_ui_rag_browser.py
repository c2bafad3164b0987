"""The knowledge-base pages in a real browser: a folder uploaded through the folder picker
with its progress shown, the report and the refreshed documents table without a reload, the
retrieval box's three columns, and a chunk's span marked on the document page.

Reuses the browser fixtures and helpers of ``test_ui_browser``.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from .conftest import RunningServer
from .test_ui_browser import (  # noqa: F401 (fixtures used by name)
    CHROMIUM,
    browser,
    log_in,
    page,
    problems,
    screenshot,
)
from .test_ui_rag import INSTALL, PASSWORDS, PIPELINE

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's Chromium is not installed at /usr/bin/chromium (`make browser` installs it)",
)

BILLING = "team,topic,answer\nbilling,refunds,Refunds reach the original card in five days.\n"
# Every status line the upload form shows, in order (the upload itself is over in a blink).
RECORD_STATUS = """() => {
  window.__sameDocument = true;
  window.__statuses = [];
  const status = document.querySelector('#upload-status');
  new MutationObserver(() => window.__statuses.push(status.textContent))
    .observe(status, {childList: true, characterData: true, subtree: true});
}"""
# The text of the marked spans, and the text between the chunk's offsets.
MARKED_SPAN = """() => {
  const text = document.querySelector('#document-text');
  const row = document.querySelector('tr.chunk-row.row-current');
  const marked = Array.from(text.querySelectorAll('.seg.is-active')).map(s => s.textContent);
  const start = Number(row.dataset.start), end = Number(row.dataset.end);
  return [marked.join(''), text.textContent.slice(start, end), row.dataset.chunk];
}"""


def _handbook(root: Path) -> Path:
    folder = root / "handbook"
    (folder / "guide").mkdir(parents=True)
    (folder / "guide" / "install.md").write_text(INSTALL)
    (folder / "passwords.txt").write_text(PASSWORDS)
    (folder / "billing.csv").write_text(BILLING)
    return folder


def test_folder_upload_then_retrieval_columns_and_chunk_spans(
    page: Page,  # noqa: F811
    server: RunningServer,
    tmp_path: Path,
) -> None:
    name = f"browser-kb-{secrets.token_hex(3)}"
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=60,
    ) as api:
        created = api.post(
            "/api/kbs",
            json={
                "name": name,
                "settings": {
                    "chunker": {"strategy": "markdown", "chunk_tokens": 32, "overlap_tokens": 4}
                },
            },
        )
        assert created.status_code == 201, created.text

    log_in(page, server, f"/kbs/{name}")
    expect(page.locator("nav a.active")).to_have_text("Knowledge bases")
    expect(page.locator("#documents-table tbody tr[data-source]")).to_have_count(0)
    page.evaluate(RECORD_STATUS)

    # The folder picker: sources are the paths inside the picked folder.
    page.set_input_files("#upload-folder", str(_handbook(tmp_path)))
    page.click("#upload-submit")
    expect(page.locator("#ingest-summary")).to_contain_text("3 added")
    rows = page.locator("#ingest-table tr[data-outcome=added]")
    expect(rows).to_have_count(3)
    sources = sorted(rows.nth(i).get_attribute("data-source") or "" for i in range(3))
    assert sources == ["billing.csv", "guide/install.md", "passwords.txt"]
    expect(page.locator("#upload-status")).to_have_text("Done.")
    expect(page.locator("#upload-progress")).to_be_hidden()
    statuses = page.evaluate("() => window.__statuses")
    assert "Uploading 3 files: 100%" in statuses, statuses
    assert statuses.index("Uploading 3 files: 100%") < statuses.index("Uploaded; indexing…")

    # The documents table and the counts refresh in place.
    expect(page.locator("#documents-table tbody tr[data-source]")).to_have_count(3)
    expect(page.locator("[data-kpi=index_version]")).to_have_text("v1")
    expect(page.locator("[data-kpi=documents]")).to_have_text("3")
    expect(page.locator("#documents-count")).to_have_text("3")
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    # Typing in the source filter narrows the table in place.
    page.fill("#documents-q", "guide/")
    expect(page.locator("#documents-table tbody tr[data-source]")).to_have_count(1)
    expect(page).to_have_url(re.compile(r"\?q=guide%2F$"))
    page.fill("#documents-q", "")
    expect(page.locator("#documents-table tbody tr[data-source]")).to_have_count(3)

    page.fill("#search-query", "I forgot my password, who resets it?")
    page.fill("#search-form input[name=top_k]", "3")
    page.click("#search-submit")
    for key in ("dense", "bm25", "hybrid"):
        hits = page.locator(f"[data-column={key}] .hit")
        expect(hits.first).to_have_attribute("data-source", "passwords.txt")
        assert 1 <= hits.count() <= 3
    top = page.locator("[data-column=hybrid] .hit").first
    expect(top.locator(".hit-ranks")).to_contain_text("dense #1")
    expect(top.locator(".chunk-chip")).to_have_text("passwords.txt#0")
    # Pointing at a hit lights up the same chunk in the other columns.
    page.hover("[data-column=dense] .hit >> nth=0")
    expect(top).to_have_class(re.compile(r"(^|\s)is-linked(\s|$)"))
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    screenshot(page, "ui-kb.png")

    # A document's chunks: clicking one marks exactly its [start, end) span, in place.
    page.click("#documents-table a:has-text('guide/install.md')")
    expect(page.locator("h1")).to_contain_text("guide/install.md")
    chunk_links = page.locator("[data-chunk-link]")
    assert chunk_links.count() >= 3
    page.evaluate("() => { window.__sameDocument = true; }")
    chunk_links.nth(1).click()
    expect(page).to_have_url(re.compile(r"[?&]chunk=1$"))
    marked, expected, chunk = page.evaluate(MARKED_SPAN)
    assert chunk == "1" and marked == expected and marked.strip()
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    screenshot(page, "ui-kb-document.png")


def test_pipeline_saved_and_run_from_the_page(
    page: Page,  # noqa: F811
    server: RunningServer,
) -> None:
    name = f"browser-pipe-{secrets.token_hex(3)}"
    log_in(page, server, "/pipelines")
    expect(page.locator("nav a.active")).to_have_text("Pipelines")
    page.fill("#pipeline-spec", PIPELINE.format(name=name).replace("{{ who }}", "{{ whom }}"))
    page.click("#pipeline-save")
    expect(page.locator("#pipeline-problems li")).to_have_count(1)
    expect(page.locator("#pipeline-problems")).to_contain_text("step 'greeting' (llm)")
    page.fill("#pipeline-spec", PIPELINE.format(name=name))
    page.click("#pipeline-save")
    expect(page).to_have_url(f"{server.base_url}/pipelines/{name}?created=1")
    expect(page.locator("#pipeline-yaml")).to_contain_text("model: echo")

    page.evaluate("() => { window.__sameDocument = true; }")
    page.fill("#run-form textarea[name='input.who']", "Ada")
    page.click("#run-submit")
    expect(page.locator("#run-status")).to_have_text("ok")
    expect(page.locator("#run-output")).to_have_text("echo: Hello Ada x1")
    expect(page.locator("#run-steps tr[data-step=greeting]")).to_have_attribute("data-status", "ok")
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    screenshot(page, "ui-pipeline.png")
    page.click("#run-trace")
    expect(page).to_have_url(re.compile(r"/traces/[0-9a-f]+$"))
