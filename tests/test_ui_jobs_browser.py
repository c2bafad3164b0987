"""The job, run and registry pages in a real browser: a job submitted from the generic form,
its log, progress and loss chart followed live without a reload until it succeeds; runs
picked in the list and compared with their curves drawn; the lineage graph's boxes opening
their pages.

Reuses the browser fixtures and helpers of ``test_ui_browser``. Runs are written with the real
:class:`RunTracker` on the test server's database (no public API creates them).
"""

from __future__ import annotations

import re
import secrets

import httpx
import pytest
from playwright.sync_api import Page, expect

from flywheel.store import Database
from flywheel.tuning.runs import RunTracker

from .conftest import RunningServer
from .test_ui_browser import (  # noqa: F401 (fixtures used by name)
    CHROMIUM,
    browser,
    log_in,
    page,
    problems,
    screenshot,
)
from .test_ui_jobs import FAKE_ADAPTER, FAKE_BASE, upload_version

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's Chromium is not installed at /usr/bin/chromium (`make browser` installs it)",
)

CHART_POINTS = """() => {
  const chart = window.Chart.getChart(document.querySelector('#job-chart'));
  return chart ? chart.data.datasets.map(d => d.data.length) : null;
}"""
# The progress bar's value: the status panel (and so the bar) is swapped every second.
PROGRESS = "Number(document.querySelector('#job-progress').getAttribute('value'))"
PROGRESS_NOW = f"() => {PROGRESS}"
DRAWN_SERIES = """() => Array.from(document.querySelectorAll('canvas[data-series]')).map(c => {
  const chart = window.Chart.getChart(c);
  return [c.dataset.seriesName, chart ? chart.data.datasets.length : -1, c.width > 0];
})"""


def tracker(server: RunningServer) -> RunTracker:
    return RunTracker(Database(server.database_url))


def test_job_log_progress_and_loss_follow_live(
    page: Page,  # noqa: F811
    server: RunningServer,
) -> None:
    name = f"browser-count-{secrets.token_hex(3)}"
    log_in(page, server, "/jobs")
    expect(page.locator("nav a.active")).to_have_text("Jobs")
    screenshot(page, "ui-jobs.png")
    page.select_option("#generic-kind", "test.count")
    page.fill("#generic-name", name)
    page.fill("#generic-params", '{"steps": 100, "delay": 0.15}')
    page.click("#generic-submit")
    expect(page).to_have_url(re.compile(r"/jobs/[0-9a-f]{32}\?submitted=1$"))
    job_id = page.url.split("/jobs/")[1].split("?")[0]
    expect(page.locator("h1")).to_contain_text(name)
    page.evaluate("() => { window.__sameDocument = true; }")

    # The log and the progress grow in place.
    # A job process starts in a second or two, longer on a loaded machine.
    expect(page.locator("#job-log")).to_contain_text("step 3 of 100", timeout=30_000)
    expect(page.locator("#job-status")).to_have_attribute("data-status", "running")
    page.wait_for_function(f"() => {PROGRESS} > 0")
    first = page.evaluate(PROGRESS_NOW)
    page.wait_for_function(f"() => {PROGRESS} > {first}")
    expect(page.locator("#job-log")).to_contain_text("step 12 of 100")

    # A run of this job logs its loss: the chart draws it as it arrives.
    runs = tracker(server)
    run_id = runs.start("default", "browser sft", "tune.sft", {}, "key:ui-test", job_id=job_id)
    for step in (1, 2, 3):
        runs.log_metrics(run_id, step, {"loss": 3.0 / step})
    page.wait_for_function(f"() => ({CHART_POINTS})()?.[0] === 3")
    expect(page.locator("#job-chart-empty")).to_be_hidden()
    expect(page.locator("a#job-chart-run")).to_have_text("browser sft")
    runs.log_metrics(run_id, 4, {"loss": 0.7, "eval_loss": 0.9})
    page.wait_for_function(f"() => JSON.stringify(({CHART_POINTS})()) === '[4,1]'")
    assert page.evaluate("() => window.__sameDocument === true"), "the page reloaded"
    screenshot(page, "ui-job-running.png")

    # Finished, the page reloads once with the whole log and the result.
    expect(page.locator("#job-status")).to_have_attribute(
        "data-status", "succeeded", timeout=30_000
    )
    expect(page.locator("#job-log")).to_contain_text("step 100 of 100")
    expect(page.locator("#job-log-state")).to_have_text("complete")
    expect(page.locator("#job-result")).to_contain_text('"reached": 100')
    expect(page.locator("#job-runs tr[data-run]")).to_have_count(1)
    runs.finish(run_id, "finished", {"train_loss": 0.7})
    screenshot(page, "ui-job.png")


def test_runs_compared_with_their_curves(
    page: Page,  # noqa: F811
    server: RunningServer,
) -> None:
    experiment = f"browser-{secrets.token_hex(3)}"
    runs = tracker(server)
    for rate in (1e-4, 5e-4):
        run_id = runs.start(
            "default",
            f"lr {rate:g}",
            "tune.sft",
            {"learning_rate": rate, "epochs": 1},
            "key:ui-test",
            experiment=experiment,
        )
        for step in range(1, 9):
            runs.log_metrics(run_id, step, {"loss": 2 - rate * 1000 * step, "grad_norm": 1.0})
        runs.finish(run_id, "finished", {"train_loss": 2 - rate * 4000})

    log_in(page, server, f"/runs?experiment={experiment}")
    boxes = page.locator("#runs-table input[name=ids]")
    expect(boxes).to_have_count(2)
    boxes.nth(0).check()
    boxes.nth(1).check()
    page.click("#runs-compare")
    expect(page).to_have_url(re.compile(r"/runs/compare\?ids=[0-9a-f]{32}&ids=[0-9a-f]{32}$"))
    expect(page.locator("tr.row-differs[data-param=learning_rate]")).to_be_visible()
    expect(page.locator("tr[data-param=epochs]")).not_to_have_class(re.compile("row-differs"))
    drawn = page.evaluate(DRAWN_SERIES)
    assert drawn == [["loss", 2, True], ["grad_norm", 2, True]], drawn
    screenshot(page, "ui-runs-compare.png")
    page.click("#compare-differs")
    expect(page.locator("tr[data-param=epochs]")).to_have_count(0)
    expect(page.locator("tr[data-param=learning_rate]")).to_have_count(1)


def test_lineage_boxes_open_their_pages(
    page: Page,  # noqa: F811
    server: RunningServer,
) -> None:
    name = f"browser-model-{secrets.token_hex(3)}"
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=60,
    ) as api:
        assert api.post("/api/registry", json={"name": name}).status_code == 201
        upload_version(api, name, FAKE_BASE, kind="base", format="safetensors")
        upload_version(api, name, FAKE_ADAPTER, kind="adapter", format="peft", parent=f"{name}@1")

    log_in(page, server, f"/registry/{name}/versions/2")
    expect(page.locator("nav a.active")).to_have_text("Model registry")
    nodes = page.locator("svg.lineage-graph .lineage-node")
    expect(nodes).to_have_count(2)
    expect(page.locator("svg.lineage-graph .lineage-node.is-focus")).to_contain_text(f"{name} v2")
    expect(page.locator("#model-card h1")).to_be_visible()
    expect(page.locator("#merge-form")).to_be_visible()
    screenshot(page, "ui-model-version.png")
    page.click(f"svg.lineage-graph a.lineage-node[data-node='model_version:{name}@1']")
    expect(page).to_have_url(f"{server.base_url}/registry/{name}/versions/1")
    expect(page.locator("#quantize-form")).to_be_visible()
