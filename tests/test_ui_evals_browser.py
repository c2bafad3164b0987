"""The annotation queue in a real browser: a reviewer rates and corrects a trace, the next
task is swapped in without a reload, and the feedback is stored (read back through the API).

Reuses the browser fixtures and helpers of ``test_ui_browser``.
"""

from __future__ import annotations

import re
import secrets

import httpx
import pytest
from playwright.sync_api import Page, expect

from .conftest import RunningServer
from .test_ui_browser import (  # noqa: F401 (fixtures used by name)
    CHROMIUM,
    browser,
    page,
    problems,
    screenshot,
    submit_key,
    wait_for_trace,
)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's Chromium is not installed at /usr/bin/chromium (`make browser` installs it)",
)


def test_reviewer_rates_corrects_and_gets_the_next_task(
    page: Page,  # noqa: F811
    server: RunningServer,
) -> None:
    admin = httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=60,
    )
    with admin:
        trace_ids = []
        for _ in range(2):
            reply = admin.post(
                "/v1/chat/completions",
                json={
                    "model": "echo",
                    "messages": [{"role": "user", "content": f"review {secrets.token_hex(3)}"}],
                },
            )
            assert reply.status_code == 200, reply.text
            trace_ids.append(reply.headers["x-flywheel-trace-id"])
            wait_for_trace(server, trace_ids[-1])
        queued = admin.post("/api/annotation/queues/default/tasks", json={"trace_ids": trace_ids})
        assert queued.status_code == 201 and queued.json()["added"] == 2, queued.text
        key = admin.post(
            "/api/keys",
            json={
                "name": f"browser reviewer {secrets.token_hex(3)}",
                "role": "reviewer",
                "scope": "admin",
            },
        )
        assert key.status_code == 201, key.text

        page.goto(f"{server.base_url}/annotate/default")
        expect(page).to_have_url(re.compile(r"/login\?next="))
        submit_key(page, key.json()["key"])
        expect(page).to_have_url(f"{server.base_url}/annotate/default")
        expect(page.locator("nav a.active")).to_have_text("Annotate")

        task = page.locator("#review-task")
        expect(task).to_be_visible()
        first = task.get_attribute("data-trace")
        assert first
        answer = page.locator("#review-answer").inner_text()
        expect(page.locator("#review-form textarea[name=correction]")).to_have_value(answer)

        page.click("#review-form .stars label:has-text('4★')")
        page.fill("#review-form textarea[name=comment]", "Too curt.")
        page.fill("#review-form textarea[name=correction]", "A corrected answer\nfrom the browser.")
        page.evaluate("() => { window.__sameDocument = true; }")
        screenshot(page, "ui-annotate.png")
        page.click("#review-submit")

        expect(page.locator("#review-notice")).to_contain_text("Saved")
        expect(task).not_to_have_attribute("data-trace", first)
        expect(task).to_be_visible()
        assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
        expect(page.locator("#review-form textarea[name=comment]")).to_have_value("")

        (feedback,) = admin.get(f"/api/traces/{first}/feedback").json()["data"]
        assert feedback["rating"] == 0.75
        assert feedback["comment"] == "Too curt."
        assert feedback["correction"] == "A corrected answer\nfrom the browser."
        assert feedback["source"] == "annotation"
        assert feedback["author"].startswith("key:browser reviewer")
