"""``/api/config``: config as code. ``flywheel apply`` and ``flywheel export`` call these."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from flywheel.server.http import (
    ERROR_RESPONSES,
    authorize,
    call_service,
    file_response,
    json_body,
    principal,
    read_json,
    services,
)

router = APIRouter(
    prefix="/api/config",
    tags=["config"],
    dependencies=[Depends(authorize)],
    responses=ERROR_RESPONSES,
)


class ConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    yaml: str = Field(max_length=2_000_000, description="The flywheel.yaml text.")
    filename: str = Field(default="flywheel.yaml", max_length=200)
    bypass_approvals: bool = Field(
        default=False, description="Instance admins only: move protected labels directly."
    )


@router.get("/export", responses=file_response("flywheel.yaml", "application/yaml"))
async def export_config(request: Request) -> Response:
    """The running providers, models and routes, and this project's prompts, as YAML."""
    svc = services(request)
    text = await call_service(svc.configs.export, principal(request).project_id)
    return Response(text, media_type="application/yaml")


@router.post("/plan", openapi_extra=json_body(ConfigIn))
async def plan_config(request: Request) -> Any:
    """What applying the file would create, update or leave unchanged (changes nothing)."""
    body = await read_json(request, ConfigIn)
    svc = services(request)
    changes = await call_service(svc.configs.plan, principal(request), body.yaml, body.filename)
    return {"changes": [c.to_dict() for c in changes]}


@router.post("/apply", openapi_extra=json_body(ConfigIn))
async def apply_config(request: Request) -> Any:
    """Apply the file idempotently; returns the plan it carried out, the config revision and
    the approval requests it opened for protected labels."""
    body = await read_json(request, ConfigIn)
    svc = services(request)
    return await call_service(
        svc.configs.apply, principal(request), body.yaml, body.filename, body.bypass_approvals
    )
