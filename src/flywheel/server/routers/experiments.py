"""``/api/experiments``: canary and shadow experiments on routes (create, list, show with
the looks history, stop). The evaluator decides them in the background (flywheel.experiments)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from flywheel.experiments.spec import ExperimentSpec
from flywheel.server.http import (
    ERROR_RESPONSES,
    authorize,
    call_service,
    json_body,
    principal,
    read_json,
    services,
)

router = APIRouter(
    prefix="/api",
    tags=["experiments"],
    dependencies=[Depends(authorize)],
    responses=ERROR_RESPONSES,
)


@router.post("/experiments", status_code=201, openapi_extra=json_body(ExperimentSpec))
async def create_experiment(request: Request) -> Any:
    """Start an experiment on a route: its calls are split between the variants (sticky by
    the unit) until the evaluator promotes the candidate or rolls it back. In ``shadow``
    mode the control serves every call and the candidate's share is mirrored to it, scored
    by a judge; the decision recommends or rejects the candidate and serves nothing."""
    spec = await read_json(request, ExperimentSpec)
    caller = principal(request)
    svc = services(request)
    return await call_service(
        svc.experiments.create, caller.project_id, caller.actor, spec, svc.config, svc.prompts.get
    )


@router.get("/experiments")
async def list_experiments(request: Request, status: str | None = None) -> Any:
    """The project's experiments, newest first."""
    return {
        "data": await call_service(
            services(request).experiments.list_experiments, principal(request).project_id, status
        )
    }


@router.get("/experiments/{experiment_id}")
async def get_experiment(request: Request, experiment_id: str) -> Any:
    """One experiment with its looks (each variant's metrics, p-value and interval)."""
    return await call_service(
        services(request).experiments.get, principal(request).project_id, experiment_id
    )


@router.post("/experiments/{experiment_id}/stop")
async def stop_experiment(request: Request, experiment_id: str) -> Any:
    """Stop a running experiment: the route serves as configured, nothing is promoted."""
    caller = principal(request)
    return await call_service(
        services(request).experiments.stop, caller.project_id, experiment_id, caller.actor
    )
