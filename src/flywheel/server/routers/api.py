"""``/api``: Flywheel's own API: traces, stats and costs, routes and models, span ingestion.

Every handler reads and writes only the caller's project (``principal(request).project_id``).
Access management (projects, users, members, keys, secrets, audit) is in ``routers/access``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from flywheel.gateway import GatewayError
from flywheel.server.http import (
    ERROR_RESPONSES,
    authorize,
    json_body,
    principal,
    read_json,
    services,
)
from flywheel.tracing import TraceFilter
from flywheel.tracing.queries import span_to_dict

router = APIRouter(
    prefix="/api", tags=["flywheel"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)


@router.get("/traces")
def list_traces(
    request: Request,
    route: str | None = None,
    model: str | None = None,
    status: str | None = Query(default=None, pattern="^(ok|error|cancelled)$"),
    kind: str | None = None,
    since: float | None = Query(default=None, description="Unix seconds"),
    until: float | None = Query(default=None, description="Unix seconds"),
    limit: int = Query(default=50, ge=1, le=500),
    cursor: str | None = None,
) -> Any:
    """Traces (root spans), newest first. Pass ``next_cursor`` back as ``cursor`` for more."""
    flt = TraceFilter(route, model, status, kind, since, until)
    try:
        page = services(request).traces.list_traces(
            principal(request).project_id, flt, limit, cursor
        )
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="cursor") from None
    return {
        "data": [span_to_dict(s, include_content=False) for s in page.items],
        "next_cursor": page.next_cursor,
    }


@router.get("/traces/{trace_id}")
def get_trace(trace_id: str, request: Request) -> Any:
    """Every span of one trace, with content, in start order, and the trace's scores
    (guards, online judges)."""
    traces, project_id = services(request).traces, principal(request).project_id
    spans = traces.get_trace(project_id, trace_id)
    if not spans:
        raise GatewayError(404, f"No trace '{trace_id}'.", param="trace_id", code="not_found")
    return {
        "trace_id": trace_id,
        "spans": [span_to_dict(s) for s in spans],
        "scores": traces.scores(project_id, trace_id),
    }


class SpanIn(BaseModel):
    """A span sent by the SDK."""

    model_config = ConfigDict(extra="forbid")

    trace_id: str = Field(pattern="^[0-9a-f]{32}$")
    span_id: str = Field(pattern="^[0-9a-f]{16}$")
    parent_id: str | None = Field(default=None, pattern="^[0-9a-f]{16}$")
    name: str = Field(min_length=1, max_length=200)
    kind: str = Field(default="function", max_length=64)
    start_time: float
    end_time: float | None = None
    status: str = Field(default="ok", pattern="^(ok|error)$")
    error: str | None = None
    input: Any = None
    output: Any = None
    attributes: dict[str, Any] = Field(default_factory=dict)


class SpanBatch(BaseModel):
    spans: list[SpanIn] = Field(max_length=10_000)


@router.post("/spans", status_code=202, openapi_extra=json_body(SpanBatch))
async def ingest_spans(request: Request) -> Any:
    """Record spans from the SDK (``@flywheel.trace``, ``flywheel.span``)."""
    batch = await read_json(request, SpanBatch)
    caller = principal(request)
    writer = services(request).writer
    for span in batch.spans:
        row = span.model_dump()
        if span.end_time is not None:
            row["latency_ms"] = (span.end_time - span.start_time) * 1000
        row["api_key_id"] = caller.key_id
        row["project_id"] = caller.project_id
        writer.record(row)
    return JSONResponse({"accepted": len(batch.spans)}, status_code=202)


@router.get("/routes")
def list_routes(request: Request) -> Any:
    """The configured routes with their targets, fallbacks and retry policy."""
    return {"data": [r.model_dump() for r in services(request).config.routes]}


@router.get("/models")
def list_catalog(request: Request) -> Any:
    """The model catalog, with whether each model is loaded and ready."""
    svc = services(request)
    return {
        "data": [
            {**m.model_dump(), "ready": svc.providers.provider_for(m).is_ready(m)}
            for m in svc.config.models
        ]
    }


@router.get("/stats")
def stats(
    request: Request,
    window: float = Query(default=3600, gt=0, le=90 * 86400, description="Seconds"),
    buckets: int = Query(default=30, ge=1, le=500),
    route: str | None = None,
) -> Any:
    """Requests, error rate, p50/p95 latency, tokens and cost over time."""
    return services(request).traces.timeseries(
        principal(request).project_id, window, buckets, route
    )


@router.get("/costs")
def costs(request: Request) -> Any:
    """This month's spend by route, model and key, per day, with a month-end forecast."""
    return services(request).traces.costs(principal(request).project_id)
