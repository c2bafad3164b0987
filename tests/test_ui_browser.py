"""The web UI in a real browser: Debian's Chromium driven by Playwright against a real server.

One real chat call goes through the gateway first, so the dashboard, the traces explorer and
the trace detail have a real trace (from the real local model) to show. Screenshots of each
page are written to ``test-artifacts/``.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import openai
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Page,
    expect,
    sync_playwright,
)

from flywheel.security import ApiKeyStore
from flywheel.store import Database

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's Chromium is not installed at /usr/bin/chromium (`make browser` installs it)",
)


class Server(Protocol):
    base_url: str
    admin_key: str
    home: Path


@dataclass
class ChatTrace:
    trace_id: str
    user_text: str
    answer: str


@dataclass
class BrowserProblems:
    """JavaScript errors and Content-Security-Policy refusals seen by a page."""

    items: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.items.append(f"CSP: {message.text}")

    def page_error(self, error: Exception) -> None:
        self.items.append(f"JS error: {error}")


def wait_for_trace(server: Server, trace_id: str, spans: int = 1) -> None:
    """Return once the background writer has stored ``spans`` spans of the trace."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stored = httpx.get(
            f"{server.base_url}/api/traces/{trace_id}",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=10,
        )
        if stored.status_code == 200 and len(stored.json()["spans"]) >= spans:
            return
        time.sleep(0.05)
    raise AssertionError(f"trace {trace_id} was not stored within 15 s")


def post_spans(server: Server, spans: list[dict[str, object]]) -> None:
    """Send spans the way the SDK does."""
    posted = httpx.post(
        f"{server.base_url}/api/spans",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        json={"spans": spans},
        timeout=10,
    )
    assert posted.status_code == 202, posted.text


@pytest.fixture(scope="module")
def chat_trace(server: Server) -> ChatTrace:
    """One real chat completion through the gateway, once its trace is stored."""
    user_text = f"Browser test {secrets.token_hex(4)}: please say hello."
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        json={
            "model": "default",
            "messages": [{"role": "user", "content": user_text}],
            "max_tokens": 8,
        },
        timeout=300,
    )
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-flywheel-trace-id"]
    wait_for_trace(server, trace_id)
    return ChatTrace(trace_id, user_text, response.json()["choices"][0]["message"]["content"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture
def problems() -> BrowserProblems:
    return BrowserProblems()


@pytest.fixture
def page(browser: Browser, problems: BrowserProblems) -> Iterator[Page]:
    """A fresh browser context (no cookies) at 1280 px wide; fails the test on JS errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    tab.on("console", problems.console)
    tab.on("pageerror", problems.page_error)
    yield tab
    context.close()
    assert not problems.items, "\n".join(problems.items)


def submit_key(page: Page, key: str) -> None:
    """Fill and send the login page's API-key form (folded under a disclosure)."""
    if not page.locator("#key-login input[name=api_key]").is_visible():
        page.click("text=Log in with an API key")
    page.fill("#key-login input[name=api_key]", key)
    page.click("#key-login button[type=submit]")


def log_in(page: Page, server: Server, path: str = "/") -> None:
    page.goto(f"{server.base_url}{path}")
    expect(page).to_have_url(re.compile(r"/login"))
    submit_key(page, server.admin_key)
    expect(page).to_have_url(f"{server.base_url}{path}")


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_login_wrong_key_then_admin_key_then_logout(page: Page, server: Server) -> None:
    page.goto(f"{server.base_url}/")
    expect(page).to_have_url(f"{server.base_url}/login")
    expect(page.locator("#password-login input[name=username]")).to_be_visible()

    with page.expect_response(
        lambda r: r.url.endswith("/login") and r.request.method == "POST"
    ) as posted:
        submit_key(page, "fw-not-a-real-key")
    assert posted.value.status == 401
    expect(page.locator("#login-error")).to_contain_text("not valid")
    assert not page.context.cookies(), "a wrong key must not start a session"
    screenshot(page, "ui-login-error.png")

    submit_key(page, server.admin_key)
    expect(page).to_have_url(f"{server.base_url}/")
    expect(page.locator("h1")).to_have_text("Dashboard")

    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert server.admin_key not in cookie["value"]
    assert 11 * 3600 < cookie["expires"] - time.time() <= 12 * 3600 + 60

    page.click("text=Log out")
    expect(page).to_have_url(f"{server.base_url}/login")
    page.goto(f"{server.base_url}/traces?status=ok")
    expect(page).to_have_url(f"{server.base_url}/login?next=%2Ftraces%3Fstatus%3Dok")

    # The login form returns to the page that was asked for.
    submit_key(page, server.admin_key)
    expect(page).to_have_url(f"{server.base_url}/traces?status=ok")


def test_dashboard_charts_and_window_switch(
    page: Page, server: Server, chat_trace: ChatTrace
) -> None:
    log_in(page, server)
    assert page.evaluate("typeof window.Chart") == "function", "Chart.js was not loaded"
    assert page.evaluate("typeof window.htmx") == "object", "htmx was not loaded"

    nav = page.locator("nav.nav")
    expect(nav.locator(".nav-stage")).to_contain_text(["Serve", "Observe", "Improve", "Govern"])
    expect(nav.locator("a")).to_have_text(
        [
            "Routes & models",
            "Dashboard",
            "Traces",
            "Costs",
            "Monitoring",
            "Alerts",
            "Prompts",
            "Playground",
            "Knowledge bases",
            "Pipelines",
            "Datasets",
            "Evals",
            "Jobs",
            "Runs",
            "Model registry",
            "Experiments",
            "Loops",
            "Annotate",
            "Approvals",
            "Access",
            "Secrets",
            "Audit log",
            "Projects",
            "Users",
        ]
    )

    requests = int(page.locator("[data-kpi=requests]").inner_text().replace(",", ""))
    assert requests >= 1
    charts = page.locator("canvas[data-chart]")
    expect(charts).to_have_count(5)
    # A function, not an expression: Playwright evaluates bare expressions with eval(),
    # which the UI's Content-Security-Policy forbids.
    rendered = (
        "() => Array.from(document.querySelectorAll('canvas[data-chart]'))"
        ".every(c => Chart.getChart(c) !== undefined && c.width > 0)"
    )
    page.wait_for_function(rendered)
    screenshot(page, "ui-dashboard.png")

    # The window selector swaps the panel in place (no reload) and updates the URL.
    page.evaluate("window.__sameDocument = true")
    page.click("fieldset.segmented label:has-text('24 h')")
    expect(page).to_have_url(f"{server.base_url}/?window=24h")
    expect(page.locator(".panel-meta")).to_contain_text("24 hours")
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"
    expect(charts).to_have_count(5)
    page.wait_for_function(rendered)  # charts are drawn once htmx settles the new panel


def test_traces_explorer_and_detail(page: Page, server: Server, chat_trace: ChatTrace) -> None:
    log_in(page, server, "/traces")
    row = page.locator(f"tr[data-trace-id='{chat_trace.trace_id}']")
    expect(row).to_have_count(1)
    expect(row).to_contain_text("default")
    expect(row).to_contain_text("smollm2-135m-instruct")
    expect(row).to_contain_text("ok")
    screenshot(page, "ui-traces.png")

    # Filters apply through HTMX: same document, tidy URL, table updated.
    page.evaluate("window.__sameDocument = true")
    page.select_option("select[name=status]", "error")
    expect(page).to_have_url(f"{server.base_url}/traces?status=error")
    expect(row).to_have_count(0)
    page.select_option("select[name=status]", "ok")
    page.select_option("select[name=route]", "default")
    expect(page).to_have_url(f"{server.base_url}/traces?route=default&status=ok")
    expect(row).to_have_count(1)
    page.select_option("select[name=window]", "1h")
    expect(page).to_have_url(f"{server.base_url}/traces?route=default&status=ok&window=1h")
    expect(row).to_have_count(1)
    assert page.evaluate("window.__sameDocument === true"), "the page reloaded"

    row.locator("a.trace-link").click()
    expect(page).to_have_url(f"{server.base_url}/traces/{chat_trace.trace_id}")
    expect(page.locator(".span-tree .span-row")).to_have_count(1)
    card = page.locator(".span-card").first
    expect(card.locator(".message.role-user .message-text")).to_have_text(chat_trace.user_text)
    expect(card.locator(".message.role-assistant .message-text")).to_have_text(chat_trace.answer)
    expect(card.locator(".params")).to_contain_text("max_tokens")
    expect(card.locator(".attempts tbody tr")).to_have_count(1)
    expect(card.locator(".attempts")).to_contain_text("smollm2-135m-instruct")
    expect(card.locator(".facts")).to_contain_text("Tokens")
    screenshot(page, "ui-trace-detail.png")

    missing = page.goto(f"{server.base_url}/traces/{'0' * 32}")
    assert missing is not None and missing.status == 404
    expect(page.locator("h1")).to_have_text("Trace not found")


def test_trace_detail_lists_retries_and_fallbacks(page: Page, server: Server) -> None:
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    routes = httpx.get(f"{server.base_url}/api/routes", headers=auth, timeout=10).json()["data"]
    route = next((r for r in routes if r["name"] == "fallback-500"), None)
    if route is None:
        pytest.skip("the test server has no 'fallback-500' route (see tests/conftest.py)")
    response = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        headers=auth,
        json={"model": "fallback-500", "messages": [{"role": "user", "content": "fall back"}]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-flywheel-trace-id"]
    wait_for_trace(server, trace_id)

    log_in(page, server, f"/traces/{trace_id}")
    attempts = page.locator(".attempts tbody tr")
    failed = route["retry"]["attempts"] + 1
    expect(attempts).to_have_count(failed + 1)
    for i in range(failed):
        expect(attempts.nth(i)).to_contain_text(route["targets"][0]["model"])
        expect(attempts.nth(i)).to_contain_text("HTTP 500")
    expect(attempts.nth(failed)).to_contain_text(route["fallbacks"][0])
    expect(attempts.nth(failed)).to_contain_text("answered")
    expect(page.locator(".facts")).to_contain_text(route["fallbacks"][0])
    screenshot(page, "ui-trace-fallback.png")


def test_sdk_span_tree_is_nested_and_escaped(page: Page, server: Server) -> None:
    trace_id = secrets.token_hex(16)
    root, child, grandchild = (secrets.token_hex(8) for _ in range(3))
    start = time.time() - 3 * 86400  # in the past, so newest-first lists elsewhere are unchanged
    hostile = "<script>window.__owned = true</script><b>not bold</b>"
    spans = [
        {"trace_id": trace_id, "span_id": root, "name": "answer question",
         "start_time": start, "end_time": start + 1.0, "input": {"question": hostile},
         "attributes": {"user": "<i>ada</i>"}},
        {"trace_id": trace_id, "span_id": child, "parent_id": root, "name": "retrieve",
         "start_time": start + 0.1, "end_time": start + 0.4, "output": ["doc-1", "doc-2"]},
        {"trace_id": trace_id, "span_id": grandchild, "parent_id": child, "name": "rerank",
         "start_time": start + 0.2, "end_time": start + 0.3, "status": "error",
         "error": "RuntimeError: <boom>"},
    ]  # fmt: skip
    post_spans(server, spans)
    wait_for_trace(server, trace_id, spans=3)

    log_in(page, server, f"/traces/{trace_id}")
    rows = page.locator(".span-tree .span-row .span-label")
    expect(rows).to_have_count(3)
    assert [rows.nth(i).get_attribute("data-depth") for i in range(3)] == ["0", "1", "2"]
    expect(rows).to_contain_text(["answer question", "retrieve", "rerank"])
    expect(page.locator(f"#span-{grandchild}")).to_contain_text("RuntimeError: <boom>")
    expect(page.locator(f"#span-{root} pre.code")).to_contain_text(hostile)
    expect(page.locator(f"#span-{root} .params")).to_contain_text("<i>ada</i>")
    assert page.evaluate("() => window.__owned === undefined")
    assert page.locator(f"#span-{root} b").count() == 0


def test_load_more_pages_with_the_cursor(page: Page, server: Server) -> None:
    start = time.time() - 4 * 86400
    spans = [
        {
            "trace_id": secrets.token_hex(16),
            "span_id": secrets.token_hex(8),
            "name": f"batch job {i}",
            "start_time": start + i,
            "end_time": start + i + 0.01,
        }
        for i in range(55)
    ]
    post_spans(server, spans)
    wanted = {str(s["trace_id"]) for s in spans}
    wait_for_trace(server, str(spans[-1]["trace_id"]))  # one batch: the last means all

    log_in(page, server, "/traces")
    rows = page.locator("tr[data-trace-id]")
    expect(rows).to_have_count(50)
    page.evaluate("window.__sameDocument = true")
    while page.locator("#load-more").count():
        before = rows.count()
        page.click("#load-more a")
        expect(rows).not_to_have_count(before)
    seen = [rows.nth(i).get_attribute("data-trace-id") or "" for i in range(rows.count())]
    assert len(seen) == len(set(seen)), "a trace was listed twice"
    assert wanted <= set(seen)
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    assert page.url == f"{server.base_url}/traces", "Load more must not change the URL"


def test_revoked_key_ends_the_session(page: Page, server: Server) -> None:
    database = server.home / "flywheel.db"
    if not database.is_file():
        pytest.skip("the test server does not use the default SQLite database in its home")
    store = ApiKeyStore(Database(f"sqlite:///{database}"))
    raw, record = store.create("browser test viewer")
    page.goto(f"{server.base_url}/routes")
    submit_key(page, raw)
    expect(page).to_have_url(f"{server.base_url}/routes")
    expect(page.locator(".whoami-name")).to_have_text("browser test viewer")

    page.goto(f"{server.base_url}/traces")
    assert store.revoke(record.id)

    # A filter change on the open page (an HTMX request) leads to the login page.
    page.select_option("select[name=status]", "ok")
    expect(page).to_have_url(f"{server.base_url}/login?next=%2Ftraces")
    assert page.context.cookies() == []
    page.goto(f"{server.base_url}/routes")
    expect(page).to_have_url(f"{server.base_url}/login?next=%2Froutes")


def test_routes_page_lists_routes_and_catalog(page: Page, server: Server) -> None:
    log_in(page, server, "/routes")
    default = page.locator("tr[data-route='default']")
    expect(default).to_have_count(1)
    expect(default).to_contain_text("smollm2-135m-instruct")
    local = page.locator("tr[data-model='smollm2-135m-instruct']")
    expect(local).to_contain_text("local")
    expect(local).to_contain_text("Ready")
    screenshot(page, "ui-routes.png")


def test_govern_pages_keys_audit_and_costs(page: Page, server: Server) -> None:
    log_in(page, server, "/access")
    expect(page.locator("h1")).to_have_text("Access")
    name = f"browser key {int(time.time() * 1000)}"
    page.fill("#key-form input[name=name]", name)
    page.select_option("#key-form select[name=scope]", "read")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#new-key")).to_contain_text(name)
    raw = page.locator("#new-key code").inner_text()
    assert raw.startswith("fw-")
    row = page.locator(f"#keys-table tr[data-key='{name}']")
    expect(row).to_contain_text("developer / read")
    screenshot(page, "ui-access.png")

    # Revoking asks first, then the key shows as revoked.
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button", has_text="Revoke").click()
    expect(page.locator(f"#keys-table tr[data-key='{name}']")).to_contain_text("revoked")

    page.click("nav >> text=Audit log")
    expect(page.locator("#audit-table tr[data-action='key.revoke']").first).to_be_visible()
    page.click("#verify-chain")
    expect(page.locator("#chain-status")).to_contain_text("Chain verified")
    screenshot(page, "ui-audit.png")

    page.click("nav >> text=Costs")
    expect(page.locator("h1")).to_have_text("Costs")
    expect(page.locator("#cost-forecast")).to_be_visible()
    screenshot(page, "ui-costs.png")


def test_prompt_playground_streams_compares_and_saves(page: Page, server: Server) -> None:
    name = f"browser-prompt-{secrets.token_hex(3)}"
    log_in(page, server, "/prompts")
    expect(page.locator("h1")).to_have_text("Prompts")
    form = page.locator("#new-prompt-form")
    form.locator("input[name=name]").fill(name)
    expect(form.locator("textarea[name=text]")).to_be_hidden()  # chat is the default kind
    form.locator("textarea[name=system]").fill("You are terse.")
    form.locator("textarea[name=user_message]").fill("Say {{ thing }}")
    form.locator("select[name=model]").select_option("echo")
    form.locator("input[name=message]").fill("first version")
    screenshot(page, "ui-prompts.png")
    form.locator("button[type=submit]").click()
    expect(page).to_have_url(f"{server.base_url}/prompts/{name}")
    expect(page.locator("#versions-table tbody tr")).to_have_count(1)
    screenshot(page, "ui-prompt.png")

    page.click("#open-playground")
    expect(page).to_have_url(f"{server.base_url}/playground?prompt={name}")
    column_a = page.locator("#column-a")
    output_a = column_a.locator("[data-output]")

    # A missing variable is explained in the output area.
    page.click("#run-button")
    expect(output_a.locator(".pg-error")).to_contain_text("Missing variable 'thing'")

    expect(page.locator("[data-variable=thing][data-required]")).to_have_count(1)
    page.fill("textarea[name='var.thing']", "hello browser")
    page.click("#run-button")
    expect(output_a).to_have_text("echo: Say hello browser")
    expect(column_a.locator("[data-run-status]")).to_have_text("done")
    expect(column_a.locator("[data-run-foot] a")).to_have_attribute("href", re.compile("^/traces/"))
    pieces = "() => document.querySelector('#column-a [data-output]').childNodes.length"
    assert page.evaluate(pieces) > 1, "the answer was not appended piece by piece"

    # Save an edit as version 2: the playground then shows it.
    page.fill("textarea[name='content.1']", "Say {{ thing }}!")
    page.fill("#save-form input[name=message]", "more excited")
    page.click("#save-button")
    expect(page.locator("#playground-saved")).to_contain_text(f"{name}@2")
    expect(column_a.locator(".pg-column-head")).to_contain_text(f"{name}@2")
    expect(page.locator("#playground-saved a")).to_have_attribute(
        "href", f"/prompts/{name}?from=1&to=2"
    )

    # Compare with version 1, side by side, on the same variables (kept across the swap).
    page.evaluate("window.__sameDocument = true")
    page.fill("textarea[name='var.thing']", "both")
    page.select_option("#playground-picks select[name=b]", "1")
    column_b = page.locator("#column-b")
    expect(column_b.locator(".pg-column-head")).to_contain_text(f"{name}@1")
    expect(page.locator("textarea[name='var.thing']")).to_have_value("both")
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    page.click("#run-button")
    expect(output_a).to_have_text("echo: Say both!")
    expect(column_b.locator("[data-output]")).to_have_text("echo: Say both")
    screenshot(page, "ui-playground.png")

    # Version 2 is in the history, with its diff against version 1.
    page.goto(f"{server.base_url}/prompts/{name}?from=1&to=2")
    expect(page.locator("#versions-table tbody tr")).to_have_count(2)
    expect(page.locator("#versions-table tr[data-version='2']")).to_contain_text("more excited")
    expect(page.locator("#diff-view .diff-add")).to_have_text("+Say {{ thing }}!")
    expect(page.locator("#diff-view .diff-del")).to_have_text("-Say {{ thing }}")
    # Another pair loads in place.
    page.check("#versions-table tr[data-version='2'] input[name=from]")
    page.check("#versions-table tr[data-version='1'] input[name=to]")
    expect(page.locator("#diff-view .diff-add")).to_have_text("+Say {{ thing }}")
    expect(page).to_have_url(f"{server.base_url}/prompts/{name}?from=2&to=1")
    screenshot(page, "ui-prompt-diff.png")

    # The prompt made in the UI is served by label through the official openai SDK.
    page.goto(f"{server.base_url}/prompts/{name}")
    label_form = page.locator("#label-form")
    label_form.locator("input[name=label]").fill("staging")
    label_form.locator("select[name=version]").select_option("2")
    label_form.locator("button[type=submit]").click()
    expect(page.locator("#versions-table tr[data-version='2']")).to_contain_text("staging")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.admin_key)
    reply = client.chat.completions.with_raw_response.create(
        model=f"prompt:{name}@staging", messages=[], extra_body={"variables": {"thing": "it"}}
    )
    assert reply.parse().choices[0].message.content == "echo: Say it!"
    trace_id = reply.headers["x-flywheel-trace-id"]
    wait_for_trace(server, trace_id)
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    span = httpx.get(f"{server.base_url}/api/traces/{trace_id}", headers=auth).json()["spans"][0]
    assert span["attributes"]["flywheel.prompt.version"] == 2
    page.goto(f"{server.base_url}/traces/{trace_id}")
    expect(page.locator("body")).to_contain_text(f"{name}@staging")


def test_production_request_shows_on_approvals(page: Page, server: Server) -> None:
    name = f"browser-release-{secrets.token_hex(3)}"
    created = httpx.post(
        f"{server.base_url}/api/prompts",
        headers={"Authorization": f"Bearer {server.admin_key}"},
        json={"name": name, "template": "Hi {{ who }}", "model": "echo", "message": "v1"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    log_in(page, server, f"/prompts/{name}")
    form = page.locator("#label-form")
    confirm = form.locator("[data-protected-only]")
    form.locator("input[name=label]").fill("staging")
    expect(confirm).to_be_hidden()
    form.locator("button[type=submit]").click()
    expect(page.locator("#prompt-notice")).to_contain_text("staging")
    expect(page.locator("#label-history tr[data-label=staging]")).to_contain_text("v1")

    form.locator("input[name=label]").fill("production")
    expect(confirm).to_be_visible()
    confirm.locator("input[type=checkbox]").check()
    dialogs: list[str] = []

    def accept(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    form.locator("button[type=submit]").click()
    expect(page.locator("#approval-requested")).to_contain_text("pending")
    assert dialogs and "production" in dialogs[0]
    expect(page.locator("#current-labels")).not_to_contain_text("production")

    page.click("nav >> text=Approvals")
    row = page.locator(f"#pending-approvals tr[data-prompt='{name}']")
    expect(row).to_contain_text("production")
    expect(row).to_contain_text("not configured")
    screenshot(page, "ui-approvals.png")

    # The admin key wrote the version, so it may not approve it (four eyes).
    row.locator("input[name=comment]").fill("self-approval")
    row.locator("button[data-decision=approve]").click()
    expect(page.locator("#approval-error")).to_contain_text("cannot approve")
    expect(page.locator(f"#pending-approvals tr[data-prompt='{name}']")).to_have_count(1)
