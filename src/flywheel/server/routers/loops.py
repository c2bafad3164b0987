"""``/api/loops``: ``flywheel loop`` on a route (start, list, show with its step timeline,
resume a failed loop, cancel). The driver moves loops along in the background
(flywheel.loop.driver); this router only starts and steers them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from flywheel.loop import LoopSpec
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
    tags=["loops"],
    dependencies=[Depends(authorize)],
    responses=ERROR_RESPONSES,
)


@router.post("/loops", status_code=201, openapi_extra=json_body(LoopSpec))
async def start_loop(request: Request) -> Any:
    """Start the loop on a route: its bad answers (thumbs-down, low judge scores) with their
    corrections become a dataset version, a LoRA SFT or DPO candidate is trained, registered,
    gated against production, sent for approval and run as a canary that promotes it or
    rolls it back. One active loop per route (409 otherwise)."""
    spec = await read_json(request, LoopSpec)
    svc = services(request)
    # The service validates the spec again and checks the route against the running config.
    return await call_service(svc.start_loop, principal(request), spec.model_dump(mode="json"))


@router.get("/loops")
async def list_loops(
    request: Request,
    status: str | None = None,
    limit: int = Query(default=100, ge=1, le=500),
) -> Any:
    """The project's loops, newest first (``?status=`` narrows to one status)."""
    return {
        "data": await call_service(
            services(request).loops.list_loops, principal(request).project_id, status, limit
        )
    }


@router.get("/loops/{loop_id}")
async def get_loop(request: Request, loop_id: str) -> Any:
    """One loop: its status, the step it is at, and every step's job, result and timing."""
    return await call_service(services(request).loops.get, principal(request).project_id, loop_id)


@router.post("/loops/{loop_id}/resume")
async def resume_loop(request: Request, loop_id: str) -> Any:
    """Run a failed loop's failed step again as a new job (409 unless the loop failed)."""
    caller = principal(request)
    return await call_service(
        services(request).loops.resume, caller.project_id, loop_id, caller.actor
    )


@router.post("/loops/{loop_id}/cancel")
async def cancel_loop(request: Request, loop_id: str) -> Any:
    """Cancel an active (or failed) loop, with its running job, its pending approval request
    and its running canary experiment (409 once it has ended)."""
    caller = principal(request)
    return await call_service(
        services(request).loop_driver.cancel, caller.project_id, loop_id, caller.actor
    )
