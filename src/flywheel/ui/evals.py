"""The UI's eval pages: suites (define, run), recent runs with live progress, one run's
summary and per-item results, and the baseline-vs-candidate comparison with its gate.

A thin edge over :class:`~flywheel.evals.suites.EvalSuites` and
:class:`~flywheel.evals.runner.EvalRunner` (the services the API uses); a comparison is built
exactly as ``GET /api/evals/compare`` builds it. Refusals are shown on the page.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import yaml
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from flywheel.datasets.store import SPLITS
from flywheel.errors import ServiceError
from flywheel.evals.base import scorer_types
from flywheel.evals.runner import FINISHED
from flywheel.evals.stats import TESTS
from flywheel.evals.suites import SuiteSpec, expand_target, parse_suite
from flywheel.security import Principal
from flywheel.server.http import services
from flywheel.server.routers.evals import comparison
from flywheel.server.services import Services
from flywheel.ui.datasets import clip, error_page, form_fields, number, page_number, whole
from flywheel.ui.present import fmt_json, message_text
from flywheel.ui.prompts import PageError, chat_models
from flywheel.ui.routes import _htmx_target as htmx_target
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

RECENT_RUNS = 50
RESULT_PAGE_SIZE = 100
OUTPUT_CHARS = 2000
SUITE_FIELDS = (
    "name",
    "description",
    "dataset",
    "dataset_version",
    "split",
    "target",
    "scorers",
    "thresholds",
    "concurrency",
    "temperature",
    "max_tokens",
)
_THRESHOLD_LINE = re.compile(r"^\s*([^\s:=]+)\s*[:=]\s*(\S+)\s*$")


def scorer_name(spec: str | Mapping[str, Any]) -> str:
    """The column a suite's scorer reports under: its ``name``, else its type."""
    if isinstance(spec, str):
        return spec
    return str(spec.get("name") or spec.get("type") or "?")


def run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run as the runs table shows it: progress, and each scorer's mean once done."""
    summary = run.get("summary") or {}
    total = run.get("total") or 0
    return {
        **run,
        "short": run["id"][:8],
        "running": run["status"] not in FINISHED,
        "pct": round(100 * (run.get("done") or 0) / total) if total else 0,
        "means": [
            {"name": name, "mean": info.get("mean"), "passed": info.get("passed")}
            for name, info in (summary.get("scorers") or {}).items()
        ],
        "passed": summary.get("passed"),
    }


def _suite_row(suite: Mapping[str, Any]) -> dict[str, Any]:
    return {**suite, "scorer_names": [scorer_name(s) for s in suite.get("scorers") or []]}


def _suite_form(spec: SuiteSpec | None) -> dict[str, str]:
    form = {name: "" for name in SUITE_FIELDS}
    form["concurrency"] = "4"
    if spec is None:
        form["scorers"] = "exact_match"
        return form
    form.update(
        name=spec.name,
        description=spec.description,
        dataset=spec.dataset,
        dataset_version=str(spec.dataset_version or ""),
        split=spec.split or "",
        target=spec.target,
        scorers="\n".join(
            s if isinstance(s, str) else yaml.safe_dump(s, default_flow_style=True).strip()
            for s in spec.scorers
        ),
        thresholds="\n".join(f"{k}: {v:g}" for k, v in spec.thresholds.items()),
        concurrency=str(spec.concurrency),
        temperature=str(spec.params.get("temperature", "")),
        max_tokens=str(spec.params.get("max_tokens", "")),
    )
    return form


def _evals_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    project = user.project_id
    suite_form = _suite_form(extra.pop("edit_spec", None))
    suite_form.update(extra.pop("suite_form", {}))
    runs = [run_row(run) for run in svc.evals.recent(project, limit=RECENT_RUNS)]
    return {
        "nav": "evals",
        "suites": [_suite_row(s) for s in svc.suites.overview(project)],
        "runs": runs,
        "completed": [r for r in runs if r["status"] == "completed"],
        "datasets": [d["name"] for d in svc.datasets.overview(project)],
        "targets": chat_models(svc, user),
        "scorer_types": scorer_types(),
        "splits": SPLITS,
        "suite_form": suite_form,
        "error": None,
        "error_form": None,
        "notice": None,
        **extra,
    }


@router.get("/evals")
def evals_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Suites with a run button, recent runs (live while running) and the comparison picker;
    ``?edit=NAME`` fills the suite form with a stored suite."""
    svc = services(request)
    params = request.query_params
    extra: dict[str, Any] = {}
    edit = params.get("edit", "")
    if edit:
        try:
            extra["edit_spec"] = svc.suites.get(user.project_id, edit[:128])
        except ServiceError as exc:
            extra["error"], extra["error_form"] = exc.message, "suite"
    if params.get("saved"):
        extra["notice"] = f"Saved suite '{params['saved'][:128]}'."
    elif params.get("deleted"):
        extra["notice"] = f"Deleted suite '{params['deleted'][:128]}'."
    return render(request, "evals.html", _evals_context(request, user, **extra))


async def _evals_error(
    request: Request, user: Principal, exc: PageError | ServiceError, where: str, **extra: Any
) -> Response:
    error, status = exc.message, exc.status_code
    context = await run_in_threadpool(
        lambda: _evals_context(request, user, error=error, error_form=where, **extra)
    )
    return render(request, "evals.html", context, status_code=status)


@router.post("/evals/runs")
async def start_run(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Start a run of a stored suite, optionally on another target, and open it."""
    svc = services(request)
    form = await form_fields(request)
    suite = form.get("suite", "").strip()
    target = form.get("target", "").strip()[:256]
    try:
        if not suite:
            raise PageError(400, "Pick a suite to run.")
        spec = await run_in_threadpool(svc.suites.get, user.project_id, suite)
        run = await svc.evals.start(
            user.project_id,
            spec,
            author=user.actor,
            target=expand_target(spec.target, target) if target else None,
            suite_name=suite,
        )
    except (PageError, ServiceError) as exc:
        return await _evals_error(request, user, exc, f"run:{suite}")
    return RedirectResponse(f"/evals/runs/{run['id']}", status_code=303)


def suite_from_form(form: Mapping[str, str]) -> SuiteSpec:
    """The suite form as a checked :class:`SuiteSpec`. Scorers are one per line: a type
    (``exact_match``) or a mapping (``{type: rouge, variant: L}``); thresholds are lines of
    ``scorer: value``."""
    scorers: list[str | dict[str, Any]] = []
    for line in form.get("scorers", "").splitlines():
        if not line.strip():
            continue
        try:
            value = yaml.safe_load(line)
        except yaml.YAMLError:
            raise PageError(400, f"Scorer line '{clip(line, 60)}' is not valid YAML.") from None
        if not isinstance(value, str | dict):
            raise PageError(400, f"Scorer line '{clip(line, 60)}' is neither a type nor a mapping.")
        scorers.append(value)
    thresholds: dict[str, float] = {}
    for line in form.get("thresholds", "").splitlines():
        if not line.strip():
            continue
        match = _THRESHOLD_LINE.match(line)
        threshold = (
            number(match.group(2), f"Threshold '{match.group(1)}'", -1e12, 1e12)
            if (match)
            else None
        )
        if match is None or threshold is None:
            raise PageError(400, f"Threshold line '{clip(line, 60)}' must read 'scorer: number'.")
        thresholds[match.group(1)] = threshold
    params: dict[str, Any] = {}
    temperature = number(form.get("temperature", ""), "Temperature", 0, 2)
    max_tokens = whole(form.get("max_tokens", ""), "Max tokens", 1, 1_000_000)
    if temperature is not None:
        params["temperature"] = temperature
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    data: dict[str, Any] = {
        "name": form.get("name", "").strip(),
        "description": form.get("description", "").strip()[:2000],
        "dataset": form.get("dataset", "").strip(),
        "target": form.get("target", "").strip(),
        "scorers": scorers,
        "thresholds": thresholds,
    }
    version = whole(form.get("dataset_version", ""), "Dataset version", 1, 10**9)
    if version is not None:
        data["dataset_version"] = version
    if form.get("split") in SPLITS:
        data["split"] = form["split"]
    concurrency = whole(form.get("concurrency", ""), "Concurrency", 1, 64)
    if concurrency is not None:
        data["concurrency"] = concurrency
    if params:
        data["params"] = params
    return parse_suite(data)


@router.post("/evals/suites")
async def save_suite(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Create a suite, or replace the one with the same name."""
    svc = services(request)
    form = await form_fields(request)
    try:
        spec = await run_in_threadpool(suite_from_form, form)
        await run_in_threadpool(svc.suites.put, user.project_id, spec, user.actor)
    except (PageError, ServiceError) as exc:
        kept = {k: form.get(k, "") for k in SUITE_FIELDS}
        return await _evals_error(request, user, exc, "suite", suite_form=kept)
    return RedirectResponse(f"/evals?{urlencode({'saved': spec.name})}", status_code=303)


@router.post("/evals/suites/{name}/delete")
async def delete_suite(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Delete a suite (its runs stay)."""
    svc = services(request)
    try:
        await run_in_threadpool(svc.suites.delete, user.project_id, name, user.actor)
    except ServiceError as exc:
        return await _evals_error(request, user, exc, f"run:{name}")
    return RedirectResponse(f"/evals?{urlencode({'deleted': name})}", status_code=303)


# -- one run ----------------------------------------------------------------------------------


def _item_texts(svc: Services, project: str, run: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Each item's input (last user message, or its variables) and expected output, by
    position; empty when the dataset version cannot be read."""
    try:
        _, items = svc.datasets.items(
            project, run["dataset"], run["dataset_version"], split=run["split"]
        )
    except ServiceError:
        return {}
    texts: dict[int, dict[str, Any]] = {}
    for item in items:
        users = [m for m in item.get("messages") or [] if m.get("role") == "user"]
        if users:
            question = message_text(users[-1].get("content"))
        elif item.get("variables") is not None:
            question = json.dumps(item["variables"], ensure_ascii=False, sort_keys=True)
        else:
            question = ""
        texts[item["position"]] = {
            "input": clip(question, 400),
            "expected": item.get("expected"),
        }
    return texts


def ci_plot(
    labels: list[str],
    means: list[Any],
    lows: list[Any],
    highs: list[Any],
    colors: list[str],
    label: str,
) -> dict[str, Any]:
    """A bar chart with confidence-interval whiskers, as ``app.js`` draws it."""
    return {
        "type": "bar",
        "labels": labels,
        "datasets": [{"label": label, "data": means, "low": lows, "high": highs, "color": colors}],
        "y_title": label,
    }


def _verdict_color(passed: bool | None) -> str:
    return "ok" if passed is True else "err" if passed is False else "1"


def _run_context(request: Request, user: Principal, run_id: str, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    project = user.project_id
    run = run_row(svc.evals.get(project, run_id))
    summary = run.get("summary") or {}
    scorers = [{"name": name, **info} for name, info in (summary.get("scorers") or {}).items()]
    context: dict[str, Any] = {
        "nav": "evals",
        "run": run,
        "summary": summary,
        "scorers": scorers,
        "scorer_names": [s["name"] for s in scorers]
        or [scorer_name(s) for s in (run.get("spec") or {}).get("scorers") or []],
        "plot": ci_plot(
            [s["name"] for s in scorers],
            [s["mean"] for s in scorers],
            [s["low"] for s in scorers],
            [s["high"] for s in scorers],
            [_verdict_color(s["passed"]) for s in scorers],
            "mean (95% CI)",
        )
        if scorers
        else None,
        "rows": [],
        "page": 1,
        "prev_url": None,
        "next_url": None,
        "result_count": 0,
        "error": None,
        **extra,
    }
    if run["running"]:
        return context
    page = page_number(request.query_params.get("page"))
    results = svc.evals.results(project, run_id)
    start = (page - 1) * RESULT_PAGE_SIZE
    texts = _item_texts(svc, project, run)
    context["rows"] = [
        {
            **result,
            "output_text": clip(result["output"], OUTPUT_CHARS),
            "input": texts.get(result["position"], {}).get("input", ""),
            "expected": clip(texts.get(result["position"], {}).get("expected"), OUTPUT_CHARS),
            "has_expected": texts.get(result["position"], {}).get("expected") is not None,
            "detail_json": {
                name: fmt_json(detail) for name, detail in (result["details"] or {}).items()
            },
        }
        for result in results[start : start + RESULT_PAGE_SIZE]
    ]
    context["page"] = page
    base = f"/evals/runs/{run_id}"
    if page > 1:
        context["prev_url"] = base + (f"?page={page - 1}" if page > 2 else "")
    if len(results) > start + RESULT_PAGE_SIZE:
        context["next_url"] = f"{base}?page={page + 1}"
    context["result_count"] = len(results)
    return context


@router.get("/evals/runs/{run_id}")
def run_page(request: Request, run_id: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A run: progress while it runs (polled by HTMX), then its summary per scorer (mean,
    95% interval, threshold verdict) and per-item outputs, scores and judge details."""
    target = htmx_target(request)
    svc = services(request)
    try:
        if target == f"run-row-{run_id}":
            run = run_row(svc.evals.get(user.project_id, run_id))
            return render(request, "_eval_run_row.html", {"r": run})
        context = _run_context(request, user, run_id)
    except ServiceError as exc:
        return error_page(
            request, exc.status_code, "Run not found", exc.message, ("/evals", "All evals")
        )
    if target == "run-progress":
        # Once finished, the whole page changes (summary, results): reload it.
        headers = {} if context["run"]["running"] else {"HX-Refresh": "true"}
        return render(request, "_eval_run_progress.html", context, headers=headers)
    return render(request, "eval_run.html", context)


@router.post("/evals/runs/{run_id}/cancel")
async def cancel_run(
    request: Request, run_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Stop a running run (its finished items are kept)."""
    svc = services(request)
    try:
        await svc.evals.cancel(user.project_id, run_id)
    except ServiceError as exc:
        error, status = exc.message, exc.status_code
        try:
            context = await run_in_threadpool(
                lambda: _run_context(request, user, run_id, error=error)
            )
        except ServiceError as missing:
            return error_page(
                request,
                missing.status_code,
                "Run not found",
                missing.message,
                ("/evals", "All evals"),
            )
        return render(request, "eval_run.html", context, status_code=status)
    return RedirectResponse(f"/evals/runs/{run_id}", status_code=303)


# -- comparison -------------------------------------------------------------------------------


def _badge(result: Mapping[str, Any]) -> str:
    return "regressed" if result.get("regressed") else "improved" if result.get("improved") else ""


def compare_view(svc: Services, project: str, report: dict[str, Any]) -> dict[str, Any]:
    """A comparison with its charts and each regression's input and expected output."""
    names = list(report["scorers"])
    results = [report["scorers"][name] for name in names]
    # Positions are global in a version, so every split's items map by position.
    texts = _item_texts(svc, project, {**report["candidate"], "split": None})
    # One card per item (worst first), listing each scorer that dropped on it.
    by_item: dict[int, dict[str, Any]] = {}
    for row in report["regressions"]:
        card = by_item.get(row["position"])
        if card is None:
            text = texts.get(row["position"], {})
            card = by_item[row["position"]] = {
                "position": row["position"],
                "drops": [],
                "input": text.get("input", ""),
                "expected": clip(text.get("expected"), OUTPUT_CHARS) if text else "",
                "baseline_text": clip(row["baseline_output"], OUTPUT_CHARS),
                "candidate_text": clip(row["candidate_output"], OUTPUT_CHARS),
            }
        card["drops"].append(
            {k: row[k] for k in ("scorer", "baseline_score", "candidate_score", "drop")}
        )
    return {
        **report,
        "rows": [{"name": n, "badge": _badge(r), **r} for n, r in zip(names, results, strict=True)],
        "regression_rows": list(by_item.values()),
        "regression_shown": len(report["regressions"]),
        "means_plot": {
            "type": "bar",
            "labels": names,
            "datasets": [
                {"label": "baseline", "data": [r["baseline_mean"] for r in results], "color": "3"},
                {
                    "label": "candidate",
                    "data": [r["candidate_mean"] for r in results],
                    "color": "1",
                },
            ],
            "y_title": "mean",
            "legend": True,
        }
        if names
        else None,
        "delta_plot": ci_plot(
            names,
            [r["delta"] for r in results],
            [r["ci_low"] for r in results],
            [r["ci_high"] for r in results],
            ["err" if r["regressed"] else "ok" if r["improved"] else "muted" for r in results],
            "delta (95% CI)",
        )
        if names
        else None,
    }


@router.get("/evals/compare")
def compare_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Baseline vs candidate run: per scorer the means, the delta with its paired interval,
    the p-value and win/tie/loss; the gate's checks; and each regressed item side by side."""
    svc = services(request)
    params = request.query_params
    baseline = params.get("baseline", "").strip()[:64]
    candidate = params.get("candidate", "").strip()[:64]
    test = params.get("test", TESTS[0])
    test = test if test in TESTS else TESTS[0]
    project = user.project_id
    runs = [run_row(r) for r in svc.evals.recent(project, limit=RECENT_RUNS)]
    context: dict[str, Any] = {
        "nav": "evals",
        "baseline": baseline,
        "candidate": candidate,
        "test": test,
        "tests": TESTS,
        "completed": [r for r in runs if r["status"] == "completed"],
        "report": None,
        "error": None,
    }
    status = 200
    if baseline and candidate:
        try:
            report = comparison(svc, project, baseline, candidate, test)
            context["report"] = compare_view(svc, project, report)
        except ServiceError as exc:
            context["error"], status = exc.message, exc.status_code
    elif baseline or candidate:
        context["error"], status = "Pick both a baseline run and a candidate run.", 400
    return render(request, "eval_compare.html", context, status_code=status)
