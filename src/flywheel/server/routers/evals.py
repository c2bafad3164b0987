"""``/api/evals``: suites, runs, per-item results and baseline-vs-candidate comparisons.

A run starts in the background and answers 202 at once; poll ``GET /api/evals/runs/{id}``
(``done`` of ``total``) until its status is completed, failed or cancelled.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from flywheel.errors import ServiceError
from flywheel.evals.base import scorer_types
from flywheel.evals.compare import compare_runs
from flywheel.evals.suites import EvalError, SuiteSpec, expand_target, parse_suite
from flywheel.server.http import (
    ERROR_RESPONSES,
    authorize,
    call_service,
    json_body,
    principal,
    read_json,
    service_error,
    services,
)

router = APIRouter(
    prefix="/api/evals",
    tags=["evals"],
    dependencies=[Depends(authorize)],
    responses=ERROR_RESPONSES,
)


class RunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    suite: str | None = Field(default=None, description="A stored suite's name.")
    spec: dict[str, Any] | None = Field(
        default=None, description="An inline suite (same fields as a stored one)."
    )
    target: str | None = Field(
        default=None,
        max_length=256,
        description="Overrides the suite's target; for a prompt suite a bare label or "
        "version ('production', '4') means that version of the suite's prompt.",
    )


@router.get("/scorers")
async def list_scorers(request: Request) -> Any:
    """Every scorer type a suite may name."""
    return {"data": await call_service(scorer_types)}


@router.get("/suites")
async def list_suites(request: Request) -> Any:
    return {
        "data": await call_service(services(request).suites.overview, principal(request).project_id)
    }


@router.get("/suites/{name}")
async def get_suite(request: Request, name: str) -> Any:
    spec = await call_service(services(request).suites.get, principal(request).project_id, name)
    return spec.model_dump(mode="json")


@router.put("/suites/{name}", openapi_extra=json_body(SuiteSpec, omit=("name",)))
async def put_suite(request: Request, name: str) -> Any:
    """Create or replace a suite (its scorers and thresholds are checked)."""
    body = await _json_object(request)
    body.setdefault("name", name)
    if body["name"] != name:
        raise service_error(
            EvalError(400, "The body's 'name' differs from the URL's.", param="name")
        )
    spec = await call_service(parse_suite, body)
    caller = principal(request)
    view, changed = await call_service(
        services(request).suites.put, caller.project_id, spec, caller.actor
    )
    return {**view, "changed": changed}


@router.delete("/suites/{name}", status_code=204)
async def delete_suite(request: Request, name: str) -> None:
    caller = principal(request)
    await call_service(services(request).suites.delete, caller.project_id, name, caller.actor)


class _AnyObject(BaseModel):
    """Any JSON object: the suite's own model checks it, naming the field at fault."""

    model_config = ConfigDict(extra="allow")


async def _json_object(request: Request) -> dict[str, Any]:
    body = await read_json(request, _AnyObject)
    return dict(body.model_extra or {})


@router.post("/runs", status_code=202, openapi_extra=json_body(RunIn))
async def start_run(request: Request) -> Any:
    """Start a run of a stored suite (or an inline one), optionally on another target."""
    body = await read_json(request, RunIn)
    svc, caller = services(request), principal(request)
    if (body.suite is None) == (body.spec is None):
        raise service_error(EvalError(400, "Pass either 'suite' or 'spec'.", param="suite"))
    spec: SuiteSpec
    if body.suite is not None:
        spec = await call_service(svc.suites.get, caller.project_id, body.suite)
    else:
        spec = await call_service(parse_suite, body.spec)
    target = expand_target(spec.target, body.target) if body.target else None
    try:
        return await svc.evals.start(
            caller.project_id, spec, author=caller.actor, target=target, suite_name=body.suite
        )
    except ServiceError as exc:
        raise service_error(exc) from None


@router.get("/runs")
async def list_runs(
    request: Request, suite: str | None = None, limit: int = Query(default=50, ge=1, le=500)
) -> Any:
    """Runs of the project, newest first."""
    return {
        "data": await call_service(
            services(request).evals.recent, principal(request).project_id, suite=suite, limit=limit
        )
    }


@router.get("/runs/{run_id}")
async def get_run(request: Request, run_id: str) -> Any:
    """A run: status, progress (``done`` of ``total``) and, once completed, its summary."""
    return await call_service(services(request).evals.get, principal(request).project_id, run_id)


@router.get("/runs/{run_id}/results")
async def run_results(request: Request, run_id: str) -> Any:
    """Per-item outputs, scores and scorer details, in dataset order."""
    return {
        "data": await call_service(
            services(request).evals.results, principal(request).project_id, run_id
        )
    }


@router.post("/runs/{run_id}/cancel")
async def cancel_run(request: Request, run_id: str) -> Any:
    try:
        return await services(request).evals.cancel(principal(request).project_id, run_id)
    except ServiceError as exc:
        raise service_error(exc) from None


def comparison(
    svc: Any, project_id: str, baseline: str, candidate: str, test: str
) -> dict[str, Any]:
    """Two runs of a project compared (see :func:`flywheel.evals.compare.compare_runs`)."""
    runs = svc.evals
    return compare_runs(
        runs.get(project_id, baseline),
        runs.get(project_id, candidate),
        runs.results(project_id, baseline),
        runs.results(project_id, candidate),
        test=test,
    )


@router.get("/compare")
async def compare(
    request: Request,
    baseline: str = Query(min_length=1, max_length=64),
    candidate: str = Query(min_length=1, max_length=64),
    test: Literal["permutation", "wilcoxon"] = "permutation",
) -> Any:
    """Baseline vs candidate per scorer (delta, paired CI, p-value, win/tie/loss), the
    items that got worse side by side, and the gate's verdict."""
    return await call_service(
        comparison, services(request), principal(request).project_id, baseline, candidate, test
    )
