"""The UI's ``flywheel loop`` pages: every loop of the project with a form to start one on a
route, and one loop as a single timeline: its eight steps in order, each with its status,
timing, job, a summary of its result and links to what it made (the dataset version, the
tuning run, the adapter and merged model versions, the gate's two eval runs and their
comparison, the approval request, the canary experiment), plus the loop's audit entries.
The timeline polls itself (HTMX) while the loop is active.

A thin edge over :class:`~flywheel.loop.store.LoopStore`, ``Services.start_loop`` and
:class:`~flywheel.loop.driver.LoopDriver` (what ``/api/loops`` uses), so a loop started here
is checked exactly as through the API; a refusal is shown on the page with its status code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from flywheel.errors import ServiceError
from flywheel.loop.store import ACTIVE, STATUSES
from flywheel.sdk.loops import summarize_step
from flywheel.security import Permission, Principal
from flywheel.server.http import services
from flywheel.server.services import Services
from flywheel.ui.datasets import error_page, form_fields, number, whole
from flywheel.ui.jobs import job_url, run_url, version_url
from flywheel.ui.prompts import PageError
from flywheel.ui.routes import _htmx_target as htmx_target
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

RECENT_LOOPS = 100
AUDIT_ENTRIES = 200
METHODS = ("sft", "dpo")
START_FIELDS = ("route", "method", "min_examples", "canary_share", "min_samples")
STATUS_CLASSES = {
    # The loop's statuses.
    "running": "status-run-running",
    "waiting": "status-pending",
    "failed": "status-error",
    "promoted": "status-ok",
    "rolled_back": "status-error",
    "rejected": "status-error",
    "not_enough_data": "status-cancelled",
    "gate_failed": "status-error",
    "cancelled": "status-cancelled",
    # A step's.
    "pending": "status-cancelled",
    "succeeded": "status-ok",
}
STEP_TITLES = {
    "collect": "Collect bad answers",
    "dataset": "Dataset version",
    "train": "Train (LoRA)",
    "register": "Register a servable model",
    "gate": "Eval gate against production",
    "approval": "Approval",
    "canary": "Canary experiment",
    "decision": "Promote or roll back",
}


def loop_url(loop_id: str) -> str:
    """The page of a loop."""
    return f"/loops/{quote(loop_id, safe='')}"


def _dataset_url(ref: str) -> str:
    name, _, version = ref.partition("@")
    return f"/datasets/{quote(name, safe='')}?{urlencode({'version': version})}"


def _link(kind: str, text: str, url: str) -> dict[str, str]:
    return {"kind": kind, "text": text, "url": url}


def step_links(step: Mapping[str, Any]) -> list[dict[str, str]]:
    """The pages of what a step made or used: its artifacts."""
    result = step.get("result") or {}
    if not isinstance(result, Mapping):
        return []
    name = step["name"]
    links: list[dict[str, str]] = []
    model = result.get("model")
    if name == "dataset" and isinstance(result.get("dataset"), str) and "@" in result["dataset"]:
        links.append(_link("dataset", result["dataset"], _dataset_url(result["dataset"])))
    if name == "train":
        if isinstance(result.get("run_id"), str):
            links.append(_link("run", f"run {result['run_id'][:8]}", run_url(result["run_id"])))
        if isinstance(model, str) and "@" in model:
            links.append(_link("adapter", model, version_url(model)))
    if name == "register" and isinstance(model, str) and "@" in model:
        links.append(_link("model", model, version_url(model)))
    if name == "gate":
        production, candidate = result.get("production_run"), result.get("candidate_run")
        for kind, run_id in (("production-run", production), ("candidate-run", candidate)):
            if isinstance(run_id, str):
                label = f"{kind.split('-')[0]} eval {run_id[:8]}"
                links.append(_link(kind, label, f"/evals/runs/{quote(run_id, safe='')}"))
        if isinstance(production, str) and isinstance(candidate, str):
            query = urlencode({"baseline": production, "candidate": candidate})
            links.append(_link("comparison", "comparison", f"/evals/compare?{query}"))
    if name == "approval":
        if isinstance(result.get("approval_id"), str):
            text = f"approval {result['approval_id'][:8]}"
            links.append(_link("approval", text, "/approvals"))
        if isinstance(model, str) and "@" in model:
            links.append(_link("model", model, version_url(model)))
    if name in ("canary", "decision") and isinstance(result.get("experiment_id"), str):
        experiment = result["experiment_id"]
        url = f"/experiments/{quote(experiment, safe='')}"
        links.append(_link("experiment", f"experiment {experiment[:8]}", url))
    return links


def step_view(step: Mapping[str, Any], loop: Mapping[str, Any]) -> dict[str, Any]:
    """A step as the timeline shows it."""
    started, finished = step.get("started_at"), step.get("finished_at")
    jobs = [j for j in step.get("jobs") or [] if isinstance(j, str)]
    return {
        **step,
        "title": STEP_TITLES.get(step["name"], step["name"]),
        "current": step["name"] == loop["step"] and loop["status"] in (*ACTIVE, "failed"),
        "status_class": STATUS_CLASSES.get(step["status"], "status-pending"),
        "summary": summarize_step(dict(step)),
        "links": step_links(step),
        "job_url": job_url(step["job_id"]) if step.get("job_id") else None,
        "earlier_jobs": [{"id": j, "url": job_url(j)} for j in jobs if j != step.get("job_id")],
        "took": (finished - started) if started and finished else None,
    }


def loop_view(loop: Mapping[str, Any]) -> dict[str, Any]:
    """A loop with its steps ready for the timeline."""
    spec = loop.get("spec") or {}
    return {
        **loop,
        "url": loop_url(loop["id"]),
        "short": loop["id"][:8],
        "active": loop["status"] in ACTIVE,
        "resumable": loop["status"] == "failed",
        "cancellable": loop["status"] in (*ACTIVE, "failed"),
        "status_class": STATUS_CLASSES.get(loop["status"], "status-pending"),
        "method": spec.get("method", "sft"),
        "timeline": [step_view(step, loop) for step in loop["steps"]],
        "done": sum(1 for step in loop["steps"] if step["status"] == "succeeded"),
    }


def audit_entries(svc: Services, project_id: str, loop_id: str) -> list[dict[str, Any]]:
    """The loop's audit entries, oldest first: its start, every step and its end."""
    rows = svc.audit.list(
        project_id=project_id, resource_type="loop", resource_id=loop_id, limit=AUDIT_ENTRIES
    )
    return [
        {
            "seq": row.seq,
            "ts": row.ts,
            "actor": row.actor,
            "action": row.action,
            "after": row.after or {},
        }
        for row in reversed(rows)
    ]


def loop_routes(svc: Services) -> list[str]:
    """The routes a loop can run on: those whose targets are models."""
    return [
        route.name
        for route in svc.config.routes
        if route.pipeline is None
        and not route.prompt_targets
        and any(target.model for target in route.targets)
    ]


# -- the list and the start form ----------------------------------------------------------


def _loops_context(svc: Services, user: Principal, **extra: Any) -> dict[str, Any]:
    status = extra.pop("status", None)
    rows = svc.loops.list_loops(user.project_id, status=status, limit=RECENT_LOOPS)
    return {
        "nav": "loops",
        "loops": [loop_view(row) for row in rows],
        "statuses": STATUSES,
        "status": status or "",
        "routes": loop_routes(svc),
        "methods": METHODS,
        "start": dict.fromkeys(START_FIELDS, ""),
        "error": None,
        **extra,
    }


@router.get("/loops")
def loops_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Every loop of the project, newest first, and (for those who may) a form to start one."""
    svc = services(request)
    wanted = request.query_params.get("status", "").strip()
    status = wanted if wanted in STATUSES else None
    return render(request, "loops.html", _loops_context(svc, user, status=status))


def start_request(svc: Services, user: Principal, form: Mapping[str, str]) -> dict[str, Any]:
    """The start form as a loop spec (empty fields keep the defaults), and the loop."""
    body: dict[str, Any] = {
        "route": form.get("route", "").strip(),
        "method": form.get("method", "sft"),
    }
    min_examples = whole(form.get("min_examples", ""), "Min examples", 1, 1_000_000)
    share = number(form.get("canary_share", ""), "Canary share", 0, 1)
    min_samples = whole(form.get("min_samples", ""), "Min samples", 2, 10_000_000)
    if min_examples is not None:
        body["min_examples"] = min_examples
    canary: dict[str, Any] = {}
    if share is not None:
        canary["share"] = share
    if min_samples is not None:
        canary["min_samples"] = min_samples
    if canary:
        body["canary"] = canary
    return svc.start_loop(user, body)


@router.post("/loops")
async def start_loop(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Start a loop from the form and open its timeline; a refusal is shown on the list."""
    svc = services(request)
    form = await form_fields(request)
    try:
        loop = await run_in_threadpool(start_request, svc, user, form)
    except (ServiceError, PageError) as exc:
        status, message = exc.status_code, exc.message
        kept = {k: form.get(k, "") for k in START_FIELDS}
        context = await run_in_threadpool(
            lambda: _loops_context(svc, user, error=message, start=kept)
        )
        return render(request, "loops.html", context, status_code=status)
    return RedirectResponse(f"{loop_url(loop['id'])}?started=1", status_code=303)


# -- one loop -------------------------------------------------------------------------------


def _loop_error(request: Request, exc: ServiceError) -> Response:
    title = "Loop not found" if exc.status_code == 404 else "Loop"
    return error_page(request, exc.status_code, title, exc.message, ("/loops", "All loops"))


def _loop_context(svc: Services, user: Principal, loop_id: str, **extra: Any) -> dict[str, Any]:
    loop = loop_view(svc.loops.get(user.project_id, loop_id))
    may_audit = user.can(Permission.AUDIT_READ)
    return {
        "nav": "loops",
        "loop": loop,
        "spec_items": sorted((loop.get("spec") or {}).items()),
        "audit": audit_entries(svc, user.project_id, loop_id) if may_audit else None,
        "audit_url": "/audit?" + urlencode({"resource_type": "loop", "resource_id": loop_id}),
        "error": None,
        "notice": None,
        **extra,
    }


@router.get("/loops/{loop_id}")
def loop_page(request: Request, loop_id: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A loop as one timeline (polled while it is active), its spec and its audit entries."""
    svc = services(request)
    try:
        if htmx_target(request) == "loop-timeline":
            loop = loop_view(svc.loops.get(user.project_id, loop_id))
            # Once it stops, the page gains its buttons and audit entries: reload it whole.
            headers = {} if loop["active"] else {"HX-Refresh": "true"}
            return render(request, "_loop_timeline.html", {"loop": loop}, headers=headers)
        context = _loop_context(svc, user, loop_id)
    except ServiceError as exc:
        return _loop_error(request, exc)
    if context["loop"]["active"]:
        if request.query_params.get("started") == "1":
            context["notice"] = "Loop started: each step runs as a job; the timeline updates below."
        elif request.query_params.get("resumed") == "1":
            context["notice"] = "Loop resumed: the failed step runs again as a new job."
    elif request.query_params.get("cancelled") == "1":
        context["notice"] = "Loop cancelled, with its running job, approval and canary."
    return render(request, "loop.html", context)


async def _refusal(request: Request, user: Principal, loop_id: str, exc: ServiceError) -> Response:
    svc = services(request)
    try:
        context = await run_in_threadpool(
            lambda: _loop_context(svc, user, loop_id, error=exc.message)
        )
    except ServiceError as missing:
        return _loop_error(request, missing)
    return render(request, "loop.html", context, status_code=exc.status_code)


@router.post("/loops/{loop_id}/resume")
async def resume_loop(
    request: Request, loop_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Run a failed loop's failed step again (refused unless the loop failed)."""
    svc = services(request)
    try:
        await run_in_threadpool(svc.loops.resume, user.project_id, loop_id, user.actor)
    except ServiceError as exc:
        return await _refusal(request, user, loop_id, exc)
    return RedirectResponse(f"{loop_url(loop_id)}?resumed=1", status_code=303)


@router.post("/loops/{loop_id}/cancel")
async def cancel_loop(
    request: Request, loop_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Cancel a loop with what it has under way (refused once it has ended)."""
    svc = services(request)
    try:
        await run_in_threadpool(svc.loop_driver.cancel, user.project_id, loop_id, user.actor)
    except ServiceError as exc:
        return await _refusal(request, user, loop_id, exc)
    return RedirectResponse(f"{loop_url(loop_id)}?cancelled=1", status_code=303)
