"""``/api/jobs`` (submit, watch, cancel, retry long work) and ``/api/runs`` (experiment
tracking: runs, their metric series, side-by-side comparison, MLflow export)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from flywheel.jobs import job_kinds
from flywheel.security import Permission
from flywheel.server.http import (
    ERROR_RESPONSES,
    MAX_SQL_INT,
    authorize,
    call_service,
    forbidden,
    json_body,
    principal,
    read_json,
    services,
)

router = APIRouter(
    prefix="/api", tags=["jobs"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)


class JobIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)
    name: str = Field(default="", max_length=200)
    executor: str | None = Field(default=None, max_length=16)


@router.get("/jobs/kinds")
async def list_job_kinds(request: Request) -> Any:
    """The kinds of job this server runs, with what each does."""
    kinds = await asyncio.to_thread(job_kinds)
    return {
        "data": [
            {"name": kind.name, "description": kind.description, "permission": kind.permission}
            for kind in sorted(kinds.values(), key=lambda k: k.name)
        ]
    }


@router.get("/jobs")
async def list_jobs(
    request: Request,
    status: str | None = None,
    kind: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """The project's jobs, newest first."""
    return {
        "data": await call_service(
            services(request).jobs.list_jobs,
            principal(request).project_id,
            status=status,
            kind=kind,
            limit=limit,
        )
    }


@router.post("/jobs", status_code=201, openapi_extra=json_body(JobIn))
async def submit_job(request: Request) -> Any:
    """Queue a job; its params are checked now, so bad input is a 400, never a failed job."""
    body = await read_json(request, JobIn)
    caller = principal(request)
    kind = (await asyncio.to_thread(job_kinds)).get(body.kind)
    if kind is not None and Permission(kind.permission) not in caller.permissions:
        raise forbidden(caller, Permission(kind.permission))
    return await call_service(
        services(request).submit_job,
        caller.project_id,
        body.kind,
        body.params,
        caller.actor,
        name=body.name,
        executor=body.executor,
        author_id=caller.identity,
    )


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> Any:
    """One job: status, progress, result or error."""
    return await call_service(services(request).jobs.get, principal(request).project_id, job_id)


@router.get("/jobs/{job_id}/logs")
async def job_logs(
    request: Request, job_id: str, after: int = Query(default=0, ge=0, le=MAX_SQL_INT)
) -> Any:
    """Log text after cursor ``after``; poll with the returned ``next`` to follow it live."""
    return await call_service(
        services(request).jobs.logs, principal(request).project_id, job_id, after
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> Any:
    """Cancel a queued job, or ask a running one to stop (409 once it has ended)."""
    caller = principal(request)
    return await call_service(
        services(request).jobs.cancel, caller.project_id, job_id, caller.actor
    )


@router.post("/jobs/{job_id}/retry", status_code=201)
async def retry_job(request: Request, job_id: str) -> Any:
    """Run a failed, cancelled or orphaned job again, as a new job linked to it."""
    caller = principal(request)
    svc = services(request)
    job = await call_service(
        svc.jobs.retry, caller.project_id, job_id, caller.actor, caller.identity
    )
    if svc.supervisor is not None:
        svc.supervisor.wake()
    return job


# -- experiment tracking -------------------------------------------------------------------


@router.get("/runs")
async def list_runs(
    request: Request,
    experiment: str | None = None,
    job: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """The project's runs, newest first (``experiment`` groups a sweep's trials)."""
    return {
        "data": await call_service(
            services(request).runs.list_runs,
            principal(request).project_id,
            experiment=experiment,
            job_id=job,
            limit=limit,
        )
    }


@router.get("/runs/compare")
async def compare_runs(request: Request, ids: str = Query(min_length=1, max_length=2000)) -> Any:
    """Runs side by side: params and summaries (``differs`` marks what changed) and every
    metric series; ``ids`` is a comma-separated list."""
    run_ids = [part.strip() for part in ids.split(",") if part.strip()]
    return await call_service(
        services(request).runs.compare, principal(request).project_id, run_ids
    )


@router.get("/runs/{run_id}")
async def get_run(request: Request, run_id: str) -> Any:
    """One run with its params, summary, system info, packages and metric series."""
    return await call_service(services(request).runs.get, principal(request).project_id, run_id)


@router.delete("/runs/{run_id}", status_code=204)
async def delete_run(request: Request, run_id: str) -> None:
    await call_service(services(request).runs.delete, principal(request).project_id, run_id)


@router.post("/runs/{run_id}/mlflow")
async def export_run(request: Request, run_id: str) -> Any:
    """Copy a run to the configured MLflow tracking URI (``FLYWHEEL_MLFLOW_TRACKING_URI``)."""
    svc = services(request)
    return await call_service(
        svc.runs.export_mlflow,
        principal(request).project_id,
        run_id,
        svc.settings.mlflow_tracking_uri,
    )
