"""``/api/datasets``, trace feedback and the annotation queue.

Handlers parse, call :class:`~flywheel.datasets.store.DatasetStore` or
:class:`~flywheel.tracing.feedback.FeedbackStore` in a worker thread, and shape the answer;
everything acts in the caller's project only.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from flywheel.datasets.exports import dpo_pairs, rated_answers, sft_examples
from flywheel.datasets.io import read_items, write_jsonl
from flywheel.datasets.store import TraceSelection, plain_item
from flywheel.server.http import (
    ERROR_RESPONSES,
    MAX_SQL_INT,
    authorize,
    call_service,
    file_response,
    json_body,
    principal,
    raw_body,
    read_body,
    read_json,
    services,
)
from flywheel.tracing.feedback import DEFAULT_QUEUE
from flywheel.tracing.queries import TraceFilter

router = APIRouter(
    prefix="/api", tags=["datasets"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)
JSONL = "application/jsonl"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetIn(_Body):
    name: str = Field(min_length=1, max_length=128)
    items: list[dict[str, Any]] = Field(min_length=1, max_length=100_000)
    message: str = Field(default="", max_length=2000)
    description: str | None = Field(default=None, max_length=2000)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)


class FromTracesIn(_Body):
    route: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None
    min_rating: float | None = Field(default=None, ge=0, le=1)
    max_rating: float | None = Field(default=None, ge=0, le=1)
    with_feedback: bool = False
    with_correction: bool = False
    flag: str | None = None
    expected: Literal["correction", "output", "correction_or_output"] = "correction_or_output"
    limit: int = Field(default=1000, ge=1, le=100_000)
    message: str = Field(default="", max_length=2000)
    test_fraction: float = Field(default=0.2, ge=0, lt=1)


class FeedbackIn(_Body):
    rating: bool | str | float | None = Field(
        default=None, description='"up", "down", true, false, or a number from 0 to 1.'
    )
    comment: str | None = Field(default=None, max_length=10_000)
    correction: str | None = Field(default=None, max_length=100_000)


class EnqueueIn(_Body):
    trace_ids: list[str] | None = Field(default=None, max_length=10_000)
    route: str | None = None
    model: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = Field(default=100, ge=1, le=10_000)


def _jsonl(rows: list[dict[str, Any]], filename: str) -> Response:
    return Response(
        write_jsonl(rows),
        media_type=JSONL,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# -- datasets -------------------------------------------------------------------------------


@router.get("/datasets")
async def list_datasets(request: Request) -> Any:
    """Datasets of the project, with their newest version."""
    return {
        "data": await call_service(
            services(request).datasets.overview, principal(request).project_id
        )
    }


@router.post("/datasets", status_code=201, openapi_extra=json_body(DatasetIn))
async def create_dataset_version(request: Request, response: Response) -> Any:
    """A new version from items in the body (no new version when nothing changed: 200)."""
    body = await read_json(request, DatasetIn)
    caller = principal(request)
    view, created = await call_service(
        services(request).datasets.create_version,
        caller.project_id,
        body.name,
        body.items,
        author=caller.actor,
        message=body.message,
        source={"kind": "api"},
        description=body.description,
        test_fraction=body.test_fraction,
    )
    if not created:
        response.status_code = 200
    return {**view, "created": created}


@router.post(
    "/datasets/{name}/import",
    status_code=201,
    openapi_extra=raw_body(["application/octet-stream", "application/jsonl", "text/csv"]),
)
async def import_dataset(
    request: Request,
    response: Response,
    name: str,
    filename: str = Query(default="items.jsonl", max_length=200),
    format: Literal["jsonl", "csv", "parquet"] | None = Query(default=None),
    message: str = Query(default="", max_length=2000),
    test_fraction: float = Query(default=0.2, ge=0, lt=1),
) -> Any:
    """A new version from a JSONL, CSV or Parquet file sent as the raw body."""
    svc = services(request)
    data = await read_body(request, svc.settings.max_upload_bytes)
    items = await call_service(read_items, data, filename, format)
    caller = principal(request)
    view, created = await call_service(
        svc.datasets.create_version,
        caller.project_id,
        name,
        items,
        author=caller.actor,
        message=message or f"import {filename}",
        source={"kind": "import", "filename": filename},
        test_fraction=test_fraction,
        normalized=True,
    )
    if not created:
        response.status_code = 200
    return {**view, "created": created}


@router.post(
    "/datasets/{name}/from-traces",
    status_code=201,
    openapi_extra=json_body(FromTracesIn, required=False),
)
async def dataset_from_traces(request: Request, response: Response, name: str) -> Any:
    """A new version from the project's chat traces that match a filter (route, time
    window, feedback rating or correction, guard flag)."""
    body = await read_json(request, FromTracesIn, optional=True)
    caller = principal(request)
    selection = TraceSelection(
        **body.model_dump(exclude={"message", "test_fraction"}),
    )
    view, created = await call_service(
        services(request).datasets.from_traces,
        caller.project_id,
        name,
        selection,
        author=caller.actor,
        message=body.message,
        test_fraction=body.test_fraction,
    )
    if not created:
        response.status_code = 200
    return {**view, "created": created}


@router.get("/datasets/{name}")
async def get_dataset(
    request: Request, name: str, version: int | None = Query(default=None, ge=1, le=MAX_SQL_INT)
) -> Any:
    """One version (the newest by default) and the list of all versions."""
    svc = services(request)
    project = principal(request).project_id
    described = await call_service(svc.datasets.version, project, name, version)
    return {**described, "versions": await call_service(svc.datasets.versions, project, name)}


@router.get("/datasets/{name}/items")
async def dataset_items(
    request: Request,
    name: str,
    version: int | None = Query(default=None, ge=1, le=MAX_SQL_INT),
    split: Literal["train", "test"] | None = None,
    offset: int = Query(default=0, ge=0, le=MAX_SQL_INT),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """A page of a version's items, in order."""
    described, items = await call_service(
        services(request).datasets.items,
        principal(request).project_id,
        name,
        version,
        split=split,
        offset=offset,
        limit=limit,
    )
    return {"version": described, "data": items}


@router.get("/datasets/{name}/export", responses=file_response("JSON Lines.", JSONL))
async def export_dataset(
    request: Request,
    name: str,
    version: int | None = Query(default=None, ge=1, le=MAX_SQL_INT),
    split: Literal["train", "test"] | None = None,
) -> Response:
    """A version's items as JSONL (the shape the import reads)."""
    described, items = await call_service(
        services(request).datasets.items, principal(request).project_id, name, version, split=split
    )
    suffix = f"-{split}" if split else ""
    return _jsonl(
        [plain_item(item) for item in items], f"{name}-v{described['version']}{suffix}.jsonl"
    )


@router.get("/datasets/{name}/profile")
async def profile_dataset(
    request: Request, name: str, version: int | None = Query(default=None, ge=1, le=MAX_SQL_INT)
) -> Any:
    """Data quality: duplicates, empty and overlong items, token lengths, PII."""
    return await call_service(
        services(request).datasets.profile, principal(request).project_id, name, version
    )


# -- feedback -------------------------------------------------------------------------------


@router.post("/traces/{trace_id}/feedback", status_code=201, openapi_extra=json_body(FeedbackIn))
async def post_feedback(request: Request, trace_id: str) -> Any:
    """A rating (thumbs or 0-1), a comment and/or a correction on a trace."""
    body = await read_json(request, FeedbackIn)
    caller = principal(request)
    return await call_service(
        services(request).feedback.record,
        caller.project_id,
        trace_id,
        rating=body.rating,
        comment=body.comment,
        correction=body.correction,
        author=caller.actor,
        api_key_id=caller.key_id,
    )


@router.get("/traces/{trace_id}/feedback")
async def trace_feedback(request: Request, trace_id: str) -> Any:
    """Every piece of feedback on a trace, oldest first."""
    return {
        "data": await call_service(
            services(request).feedback.for_trace, principal(request).project_id, trace_id
        )
    }


@router.get("/feedback")
async def list_feedback(
    request: Request,
    since: float | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """The project's feedback, newest first."""
    return {
        "data": await call_service(
            services(request).feedback.recent, principal(request).project_id, since, limit
        )
    }


@router.get("/feedback/export", responses=file_response("JSON Lines.", JSONL))
async def export_feedback(
    request: Request,
    format: Literal["sft", "dpo"] = Query(default="sft"),
    min_rating: float = Query(default=0.75, ge=0, le=1),
    margin: float = Query(default=0.5, gt=0, le=1),
) -> Response:
    """Feedback as training data: SFT examples in chat format, or DPO preference pairs."""
    answers = await call_service(rated_answers, services(request).db, principal(request).project_id)
    if format == "sft":
        return _jsonl(sft_examples(answers, min_rating), "feedback-sft.jsonl")
    return _jsonl(dpo_pairs(answers, margin), "feedback-dpo.jsonl")


# -- annotation queue -----------------------------------------------------------------------


@router.get("/annotation/queues")
async def annotation_queues(request: Request) -> Any:
    """The project's queues and how many tasks each has per status."""
    svc, project = services(request), principal(request).project_id
    names = await call_service(svc.feedback.queues, project)
    return {
        "data": [
            {"queue": q, **await call_service(svc.feedback.queue_stats, project, q)}
            for q in names or [DEFAULT_QUEUE]
        ]
    }


@router.post(
    "/annotation/queues/{queue}/tasks",
    status_code=201,
    openapi_extra=json_body(EnqueueIn, required=False),
)
async def enqueue_traces(request: Request, queue: str) -> Any:
    """Add traces to a queue: the ones named, or the newest chat traces matching a filter."""
    body = await read_json(request, EnqueueIn, optional=True)
    added = await call_service(
        services(request).feedback.enqueue,
        principal(request).project_id,
        queue,
        trace_ids=body.trace_ids,
        match=TraceFilter(route=body.route, model=body.model, since=body.since, until=body.until),
        limit=body.limit,
    )
    return {"added": added}


@router.post("/annotation/queues/{queue}/next")
async def next_annotation(request: Request, queue: str) -> Any:
    """The caller's open task, or the next free one, claimed for them (``task`` is null
    when the queue is empty)."""
    svc, caller = services(request), principal(request)
    task = await call_service(svc.feedback.next_task, caller.project_id, queue, caller.actor)
    if task is None:
        return {
            "task": None,
            "stats": await call_service(svc.feedback.queue_stats, caller.project_id, queue),
        }
    return {"task": await call_service(svc.feedback.describe, caller.project_id, task)}


@router.post("/annotation/tasks/{task_id}/complete", openapi_extra=json_body(FeedbackIn))
async def complete_annotation(request: Request, task_id: int = Path(ge=0, le=MAX_SQL_INT)) -> Any:
    """Record the reviewer's feedback and close the task."""
    body = await read_json(request, FeedbackIn)
    caller = principal(request)
    return await call_service(
        services(request).feedback.complete,
        caller.project_id,
        task_id,
        caller.actor,
        rating=body.rating,
        comment=body.comment,
        correction=body.correction,
    )


@router.post("/annotation/tasks/{task_id}/skip")
async def skip_annotation(request: Request, task_id: int = Path(ge=0, le=MAX_SQL_INT)) -> Any:
    """Set a task aside without feedback."""
    caller = principal(request)
    await call_service(services(request).feedback.skip, caller.project_id, task_id, caller.actor)
    return {"skipped": task_id}
