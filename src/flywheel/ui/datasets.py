"""The UI's dataset and annotation pages: dataset versions (upload, from traces, items, a
data-quality profile, JSONL export) and the annotation queue reviewers work through.

A thin edge over the services the API uses (:class:`~flywheel.datasets.store.DatasetStore`
and :class:`~flywheel.tracing.feedback.FeedbackStore`, called in worker threads), so their
checks apply here too. A service's refusal is shown on the page with its status code.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import UploadFile

from flywheel.datasets.exports import dpo_pairs, rated_answers, sft_examples
from flywheel.datasets.io import read_items, write_jsonl
from flywheel.datasets.store import SPLITS, TraceSelection, plain_item
from flywheel.errors import ServiceError
from flywheel.security import Principal
from flywheel.server.http import services
from flywheel.tracing.feedback import DEFAULT_QUEUE, QUEUE_PATTERN
from flywheel.tracing.queries import TraceFilter
from flywheel.ui.present import message_text
from flywheel.ui.prompts import PageError
from flywheel.ui.routes import _htmx_target as htmx_target
from flywheel.ui.routes import _options as choices
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

ITEM_PAGE_SIZE = 50
CLIP_CHARS = 240
JSONL_MEDIA_TYPE = "application/jsonl"
EXPECTED_MODES = ("correction_or_output", "correction", "output")
# Stars 1-5 are stored as ratings 0, 0.25 … 1 (the feedback store's scale).
STAR_RATINGS = {str(stars): (stars - 1) / 4 for stars in range(1, 6)}
THUMB_RATINGS = ("up", "down")
RECENT_FEEDBACK = 20
REVIEW_NOTICES = {
    "saved": "Saved. Here is the next one.",
    "skipped": "Skipped. Here is the next one.",
}


# -- shared helpers ----------------------------------------------------------------------------


async def form_fields(request: Request) -> dict[str, str]:
    """The posted form's text fields (files left out)."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def number(value: str, field: str, low: float, high: float) -> float | None:
    """A form's number between ``low`` and ``high``; None when left empty."""
    value = value.strip()
    if not value:
        return None
    try:
        parsed = float(value)
    except ValueError:
        raise PageError(400, f"{field} must be a number.") from None
    if not low <= parsed <= high:
        raise PageError(400, f"{field} must be between {low:g} and {high:g}.")
    return parsed


def whole(value: str, field: str, low: int, high: int) -> int | None:
    """A form's whole number between ``low`` and ``high``; None when left empty."""
    value = value.strip()
    if not value:
        return None
    if not value.isdecimal() or len(value) > 9 or not low <= int(value) <= high:
        raise PageError(400, f"{field} must be a whole number from {low} to {high}.")
    return int(value)


def clip(text: str | None, limit: int = CLIP_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def page_number(value: str | None) -> int:
    """A 1-based page number from the query string (1 when missing or mangled)."""
    return int(value) if value and value.isdecimal() and 0 < len(value) <= 6 and int(value) else 1


def error_page(
    request: Request, status_code: int, title: str, message: str, back: tuple[str, str]
) -> Response:
    """A page that only explains a refusal (a missing dataset or run, a bad name)."""
    context = {"title": title, "error": message, "back_url": back[0], "back_text": back[1]}
    return render(request, "page_error.html", context, status_code=status_code)


# -- the dataset list, the upload and from-traces forms ----------------------------------------


UPLOAD_FIELDS = ("name", "message", "test_fraction")
TRACE_FIELDS = (
    "name",
    "route",
    "since_hours",
    "min_rating",
    "with_correction",
    "expected",
    "limit",
    "message",
)


def _datasets_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    upload = {name: "" for name in UPLOAD_FIELDS} | {"test_fraction": "0.2"}
    upload.update(extra.pop("upload", {}))
    traces = {name: "" for name in TRACE_FIELDS} | {"expected": EXPECTED_MODES[0], "limit": "1000"}
    traces.update(extra.pop("traces", {}))
    return {
        "nav": "datasets",
        "datasets": svc.datasets.overview(user.project_id),
        "routes": choices(
            [r.name for r in svc.config.routes],
            svc.traces.distinct_values(user.project_id, "route"),
        ),
        "expected_modes": EXPECTED_MODES,
        "upload": upload,
        "traces": traces,
        "max_upload_mb": svc.settings.max_upload_bytes / 1024 / 1024,
        "error": None,
        "error_form": None,
        **extra,
    }


@router.get("/datasets")
def datasets_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's datasets with their newest version; forms for a new version from a
    file or from traces (``?name=`` fills in the dataset's name)."""
    name = request.query_params.get("name", "")[:128]
    extra = {"upload": {"name": name}, "traces": {"name": name}}
    return render(request, "datasets.html", _datasets_context(request, user, **extra))


def _version_redirect(name: str, view: Mapping[str, Any], created: bool) -> Response:
    outcome = "created" if created else "unchanged"
    query = urlencode({"version": view["version"], outcome: view["version"]})
    return RedirectResponse(f"/datasets/{name}?{query}", status_code=303)


def _test_fraction(form: Mapping[str, str]) -> float:
    fraction = number(form.get("test_fraction", ""), "The test fraction", 0, 0.99)
    return 0.2 if fraction is None else fraction


@router.post("/datasets/import")
async def import_dataset(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """A new version from an uploaded JSONL, CSV or Parquet file (no new version when the
    content is unchanged)."""
    svc = services(request)
    form = await request.form()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    name = fields.get("name", "").strip()
    upload = form.get("file")
    try:
        if not isinstance(upload, UploadFile) or not upload.filename:
            raise PageError(400, "Choose a JSONL, CSV or Parquet file to upload.")
        limit = svc.settings.max_upload_bytes
        if upload.size is not None and upload.size > limit:
            raise PageError(413, f"The file is larger than {limit / 1024 / 1024:g} MiB.")
        data = await upload.read()
        filename = upload.filename.replace("\\", "/").rsplit("/", 1)[-1][:200]
        fraction = _test_fraction(fields)
        items = await run_in_threadpool(read_items, data, filename, None)
        message = fields.get("message", "").strip()[:2000] or f"import {filename}"
        view, created = await run_in_threadpool(
            lambda: svc.datasets.create_version(
                user.project_id,
                name,
                items,
                author=user.actor,
                message=message,
                source={"kind": "import", "filename": filename},
                test_fraction=fraction,
                normalized=True,
            )
        )
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
        kept = {k: fields.get(k, "") for k in UPLOAD_FIELDS}
        context = await run_in_threadpool(
            lambda: _datasets_context(
                request, user, upload=kept, error=error, error_form="upload", traces={"name": name}
            )
        )
        return render(request, "datasets.html", context, status_code=status)
    return _version_redirect(name, view, created)


def trace_selection(form: Mapping[str, str], now: float) -> TraceSelection:
    """The from-traces form as a :class:`TraceSelection` (a PageError naming a bad field)."""
    hours = number(form.get("since_hours", ""), "Since (hours)", 0.01, 24 * 365)
    expected = form.get("expected", EXPECTED_MODES[0])
    if expected not in EXPECTED_MODES:
        raise PageError(400, "Pick what the expected output is: correction or output.")
    limit = whole(form.get("limit", ""), "Limit", 1, 100_000)
    return TraceSelection(
        route=form.get("route", "").strip() or None,
        since=now - hours * 3600 if hours is not None else None,
        min_rating=number(form.get("min_rating", ""), "Minimum rating", 0, 1),
        with_correction=form.get("with_correction") == "yes",
        expected=expected,
        limit=limit or 1000,
    )


@router.post("/datasets/from-traces")
async def dataset_from_traces(
    request: Request, user: Principal = Depends(ui_authorize)
) -> Response:
    """A new version from the project's chat traces that match the form's filter."""
    svc = services(request)
    form = await form_fields(request)
    name = form.get("name", "").strip()
    try:
        selection = trace_selection(form, time.time())
        view, created = await run_in_threadpool(
            lambda: svc.datasets.from_traces(
                user.project_id,
                name,
                selection,
                author=user.actor,
                message=form.get("message", "").strip()[:2000],
            )
        )
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
        kept = {k: form.get(k, "") for k in TRACE_FIELDS}
        context = await run_in_threadpool(
            lambda: _datasets_context(
                request, user, traces=kept, error=error, error_form="traces", upload={"name": name}
            )
        )
        return render(request, "datasets.html", context, status_code=status)
    return _version_redirect(name, view, created)


# -- one dataset: versions, items, profile, export ---------------------------------------------


def source_text(source: Mapping[str, Any] | None) -> str:
    """Where a version came from, in a few words."""
    source = source or {}
    kind = str(source.get("kind") or "api")
    if kind == "import" and source.get("filename"):
        return f"import: {source['filename']}"
    if kind == "traces":
        defaults = TraceSelection().__dict__
        chosen = {
            k: v
            for k, v in (source.get("filter") or {}).items()
            if v is not None and v != defaults.get(k) and k != "since"
        }
        return "traces" + (
            ": " + ", ".join(f"{k}={v}" for k, v in chosen.items()) if chosen else ""
        )
    return kind


def item_row(item: Mapping[str, Any]) -> dict[str, Any]:
    """An item as the table shows it: every field cut to a readable length."""
    variables = item.get("variables")
    context = item.get("context") or []
    return {
        "position": item["position"],
        "split": item["split"],
        "messages": [
            {"role": str(m.get("role", "")), "text": clip(message_text(m.get("content")))}
            for m in item.get("messages") or []
        ],
        "variables": None
        if variables is None
        else clip(json.dumps(variables, ensure_ascii=False, sort_keys=True)),
        "expected": None if item.get("expected") is None else clip(item["expected"]),
        "context": [clip(passage, 120) for passage in context[:3]],
        "context_count": len(context),
    }


def _edge(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.1f}"


def histogram_plot(stats: Mapping[str, Any], label: str, color: str) -> dict[str, Any] | None:
    """A token-length histogram as the bar chart ``app.js`` draws (None with no data)."""
    histogram = stats.get("histogram") or {}
    counts, edges = histogram.get("counts") or [], histogram.get("edges") or []
    if not counts:
        return None
    labels = [f"{_edge(edges[i])}-{_edge(edges[i + 1])}" for i in range(len(counts))]
    return {
        "type": "bar",
        "labels": labels,
        "datasets": [{"label": label, "data": counts, "color": color}],
        "x_title": "tokens",
        "y_title": "items",
        "integer": True,
    }


def profile_view(report: Mapping[str, Any]) -> dict[str, Any]:
    """The data-quality report with its charts, ready for the template."""
    roles = sorted(report["roles"].items(), key=lambda kv: (-kv[1], kv[0]))
    exact = report["exact_duplicates"]
    return {
        **report,
        "plots": {
            "input": histogram_plot(report["tokens"]["input"], "input tokens", "1"),
            "expected": histogram_plot(report["tokens"]["expected"], "expected tokens", "2"),
            "roles": {
                "type": "bar",
                "labels": [role for role, _ in roles],
                "datasets": [
                    {"label": "messages", "data": [count for _, count in roles], "color": "3"}
                ],
                "y_title": "messages",
                "integer": True,
            }
            if roles
            else None,
        },
        "exact_redundant": sum(len(group) - 1 for group in exact),
        "pii_kinds": sorted(report["pii"]["by_kind"].items(), key=lambda kv: (-kv[1], kv[0])),
    }


def _dataset_query(version: int | None, split: str, page: int) -> dict[str, str]:
    query = {"version": str(version) if version else "", "split": split}
    if page > 1:
        query["page"] = str(page)
    return {k: v for k, v in query.items() if v}


@router.get("/datasets/{name}")
def dataset_page(request: Request, name: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A version of a dataset (the newest by default): its history, a page of its items
    (optionally one split) and its data-quality profile. HTMX swaps only the items table
    when the split or page changes."""
    svc = services(request)
    params = request.query_params
    version_param = params.get("version", "")
    version = int(version_param) if version_param.isdecimal() and len(version_param) <= 9 else None
    split = params.get("split", "")
    split = split if split in SPLITS else ""
    page = page_number(params.get("page"))
    offset = (page - 1) * ITEM_PAGE_SIZE
    project = user.project_id
    try:
        described, items = svc.datasets.items(
            project, name, version, split=split or None, offset=offset, limit=ITEM_PAGE_SIZE + 1
        )
    except ServiceError as exc:
        return error_page(
            request,
            exc.status_code,
            "Dataset not found",
            exc.message,
            ("/datasets", "All datasets"),
        )
    number_shown = described["version"]
    base = f"/datasets/{name}"
    context: dict[str, Any] = {
        "nav": "datasets",
        "name": name,
        "described": described,
        "split": split,
        "splits": SPLITS,
        "page": page,
        "rows": [item_row(item) for item in items[:ITEM_PAGE_SIZE]],
        "prev_url": f"{base}?{urlencode(_dataset_query(number_shown, split, page - 1))}"
        if page > 1
        else None,
        "next_url": f"{base}?{urlencode(_dataset_query(number_shown, split, page + 1))}"
        if len(items) > ITEM_PAGE_SIZE
        else None,
        "export_url": f"{base}/export?"
        + urlencode({"version": number_shown, **({"split": split} if split else {})}),
        "created": params.get("created", ""),
        "unchanged": params.get("unchanged", ""),
    }
    canonical = f"{base}?{urlencode(_dataset_query(number_shown, split, page))}"
    if htmx_target(request) == "dataset-items":
        return render(request, "_dataset_items.html", context, headers={"HX-Push-Url": canonical})
    versions = svc.datasets.versions(project, name)
    report = svc.datasets.profile(project, name, number_shown)
    context.update(
        versions=[{**v, "source_text": source_text(v.get("source"))} for v in versions],
        description=svc.datasets.version(project, name, number_shown).get("description") or "",
        profile=profile_view(report),
    )
    return render(request, "dataset.html", context)


@router.get("/datasets/{name}/export")
def export_dataset(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """A version's items as JSONL (the API's export, for a browser session)."""
    params = request.query_params
    version_param = params.get("version", "")
    version = int(version_param) if version_param.isdecimal() and len(version_param) <= 9 else None
    split = params.get("split") if params.get("split") in SPLITS else None
    try:
        described, items = services(request).datasets.items(
            user.project_id, name, version, split=split
        )
    except ServiceError as exc:
        return error_page(
            request,
            exc.status_code,
            "Dataset not found",
            exc.message,
            ("/datasets", "All datasets"),
        )
    suffix = f"-{split}" if split else ""
    filename = f"{name}-v{described['version']}{suffix}.jsonl"
    return Response(
        write_jsonl([plain_item(item) for item in items]),
        media_type=JSONL_MEDIA_TYPE,
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


# -- annotation: queues, enqueueing, reviewing ---------------------------------------------------


def _queue_param(request: Request) -> str:
    return request.query_params.get("queue", "").strip()[:64] or DEFAULT_QUEUE


def _annotate_context(
    request: Request, user: Principal, queue: str, **extra: Any
) -> dict[str, Any]:
    svc = services(request)
    project = user.project_id
    names = svc.feedback.queues(project)
    if queue not in names:
        names = sorted([*names, queue])
    enqueue = {"route": "", "hours": "24", "limit": "20"}
    enqueue.update(extra.pop("enqueue", {}))
    return {
        "nav": "annotate",
        "queue": queue,
        "queues": [{"name": q, **svc.feedback.queue_stats(project, q)} for q in names],
        "stats": svc.feedback.queue_stats(project, queue),
        "routes": choices(
            [r.name for r in svc.config.routes], svc.traces.distinct_values(project, "route")
        ),
        "recent": svc.feedback.recent(project, limit=RECENT_FEEDBACK),
        "enqueue": enqueue,
        "added": None,
        "error": None,
        **extra,
    }


@router.get("/annotate")
def annotate_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The annotation queues with their counts, a form to add traces to the picked queue,
    and the newest feedback."""
    queue = _queue_param(request)
    extra: dict[str, Any] = {}
    added = request.query_params.get("added", "")
    if added.isdecimal() and len(added) <= 6:
        extra["added"] = int(added)
    try:
        context = _annotate_context(request, user, queue, **extra)
    except ServiceError as exc:
        context = _annotate_context(request, user, DEFAULT_QUEUE, error=exc.message)
        return render(request, "annotate.html", context, status_code=exc.status_code)
    return render(request, "annotate.html", context)


@router.post("/annotate/enqueue")
async def enqueue_traces(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Add the newest chat traces matching the form (route, last N hours) to a queue."""
    svc = services(request)
    form = await form_fields(request)
    queue = form.get("queue", "").strip()[:64] or DEFAULT_QUEUE
    try:
        hours = number(form.get("hours", ""), "Last hours", 0.01, 24 * 365)
        limit = whole(form.get("limit", ""), "Limit", 1, 10_000) or 100
        match = TraceFilter(
            route=form.get("route", "").strip() or None,
            since=time.time() - hours * 3600 if hours is not None else None,
        )
        added = await run_in_threadpool(
            lambda: svc.feedback.enqueue(user.project_id, queue, match=match, limit=limit)
        )
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
        kept = {k: form.get(k, "") for k in ("route", "hours", "limit")}
        shown = queue if QUEUE_PATTERN.match(queue) else DEFAULT_QUEUE
        context = await run_in_threadpool(
            lambda: _annotate_context(request, user, shown, enqueue=kept, error=error)
        )
        return render(request, "annotate.html", context, status_code=status)
    return RedirectResponse(
        f"/annotate?{urlencode({'queue': queue, 'added': added})}", status_code=303
    )


@router.get("/annotate/export")
def export_feedback(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Feedback as training data (the API's export): SFT examples or DPO pairs, as JSONL."""
    params = request.query_params
    kind = "dpo" if params.get("format") == "dpo" else "sft"
    answers = rated_answers(services(request).db, user.project_id)
    rows = sft_examples(answers) if kind == "sft" else dpo_pairs(answers)
    return Response(
        write_jsonl(rows),
        media_type=JSONL_MEDIA_TYPE,
        headers={
            "Content-Disposition": f'attachment; filename="feedback-{kind}.jsonl"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


def answer_digest(text: str | None) -> str:
    """A short fingerprint of an answer: the form sends it back, so an unedited correction
    (the answer itself) is not stored as one."""
    return hashlib.sha256(_lines(text or "").encode()).hexdigest()[:32]


def _lines(text: str) -> str:
    # Browsers send textarea lines with CRLF.
    return text.replace("\r\n", "\n")


def review_rating(value: str) -> str | float | None:
    """The review form's rating: thumbs as ``"up"``/``"down"``, 1-5 stars as 0-1."""
    value = value.strip()
    if not value:
        return None
    if value in THUMB_RATINGS:
        return value
    if value in STAR_RATINGS:
        return STAR_RATINGS[value]
    raise PageError(400, "Pick thumbs up or down, or 1 to 5 stars.")


def review_correction(text: str, digest: str) -> str | None:
    """The correction to store: None when blank or left as the answer it was prefilled with."""
    text = _lines(text)
    if not text.strip() or answer_digest(text) == digest:
        return None
    return text


def _task_context(request: Request, user: Principal, queue: str, **extra: Any) -> dict[str, Any]:
    """The reviewer's open task in ``queue`` (or the next one, claimed now) and the counts."""
    svc = services(request)
    project = user.project_id
    task = svc.feedback.next_task(project, queue, user.actor)
    view = svc.feedback.describe(project, task) if task is not None else None
    if view is not None:
        view["messages"] = [
            {"role": str(m.get("role", "")), "text": message_text(m.get("content"))}
            for m in view["messages"] or []
        ]
        view["digest"] = answer_digest(view["answer"])
    kept = extra.pop("kept", None)
    # Typed values stay only on the task they were typed for.
    if kept is None or view is None or kept.get("task_id") != str(view["id"]):
        kept = {}
    return {
        "nav": "annotate",
        "queue": queue,
        "task": view,
        "stats": svc.feedback.queue_stats(project, queue),
        "kept": kept,
        "stars": list(STAR_RATINGS),
        "notice": None,
        "error": None,
        **extra,
    }


@router.get("/annotate/{queue}")
def annotate_queue(
    request: Request, queue: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Review the next task of a queue: the conversation and its answer, a rating, a comment
    and a correction. Opening the page claims the task for the reviewer."""
    extra: dict[str, Any] = {}
    for outcome, notice in REVIEW_NOTICES.items():
        if request.query_params.get(outcome) == "1":
            extra["notice"] = notice
    try:
        context = _task_context(request, user, queue, **extra)
    except ServiceError as exc:
        return error_page(
            request, exc.status_code, "No such queue", exc.message, ("/annotate", "All queues")
        )
    return render(request, "annotate_queue.html", context)


async def _after_review(
    request: Request,
    user: Principal,
    queue: str,
    outcome: str,
    *,
    error: ServiceError | PageError | None = None,
    kept: dict[str, str] | None = None,
) -> Response:
    """The next task: swapped in by HTMX, or a redirect for a plain form post. A refusal
    shows the same task again with what was typed."""
    partial = htmx_target(request) == "annotate-task"
    if error is None and not partial:
        return RedirectResponse(f"/annotate/{queue}?{urlencode({outcome: '1'})}", status_code=303)
    extra: dict[str, Any] = {"kept": kept}
    if error is not None:
        extra["error"] = error.message
    else:
        extra["notice"] = REVIEW_NOTICES[outcome]
    try:
        context = await run_in_threadpool(lambda: _task_context(request, user, queue, **extra))
    except ServiceError as exc:
        return error_page(
            request, exc.status_code, "No such queue", exc.message, ("/annotate", "All queues")
        )
    status = error.status_code if error is not None else 200
    template = "_annotate_task.html" if partial else "annotate_queue.html"
    return render(request, template, context, status_code=status)


@router.post("/annotate/{queue}/tasks/{task_id}/complete")
async def complete_task(
    request: Request, queue: str, task_id: int, user: Principal = Depends(ui_authorize)
) -> Response:
    """Store the review as feedback on the task's trace, close the task, show the next."""
    form = await form_fields(request)
    svc = services(request)
    try:
        rating = review_rating(form.get("rating", ""))
        comment = form.get("comment", "").strip() or None
        correction = review_correction(form.get("correction", ""), form.get("digest", ""))
        await run_in_threadpool(
            lambda: svc.feedback.complete(
                user.project_id,
                task_id,
                user.actor,
                rating=rating,
                comment=comment,
                correction=correction,
            )
        )
    except (PageError, ServiceError) as exc:
        kept = {**form, "task_id": str(task_id)}
        return await _after_review(request, user, queue, "saved", error=exc, kept=kept)
    return await _after_review(request, user, queue, "saved")


@router.post("/annotate/{queue}/tasks/{task_id}/skip")
async def skip_task(
    request: Request, queue: str, task_id: int, user: Principal = Depends(ui_authorize)
) -> Response:
    """Set the task aside without feedback and show the next."""
    svc = services(request)
    try:
        await run_in_threadpool(svc.feedback.skip, user.project_id, task_id, user.actor)
    except ServiceError as exc:
        return await _after_review(request, user, queue, "skipped", error=exc)
    return await _after_review(request, user, queue, "skipped")
