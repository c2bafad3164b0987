"""``/api/prompts`` and ``/api/approvals``: the prompt registry and the approval workflow.

Handlers parse, call :class:`~flywheel.prompts.PromptRegistry` or
:class:`~flywheel.security.approvals.ApprovalService` in a worker thread, and shape the
answer; both act in the caller's project only.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from flywheel.gateway import GatewayError
from flywheel.prompts.registry import MAX_VERSION
from flywheel.prompts.templates import Message
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
    prefix="/api", tags=["prompts"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptIn(_Body):
    name: str = Field(min_length=1, max_length=128)
    template: str | list[Message] = Field(
        description="A text template, or chat messages whose contents are templates."
    )
    variables: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the variables; default: inferred."
    )
    model: str | None = Field(default=None, max_length=128)
    params: dict[str, Any] | None = None
    message: str = Field(default="", max_length=2000, description="The commit message.")
    description: str | None = Field(default=None, max_length=2000)
    labels: list[str] = Field(default_factory=list, max_length=20)


class LabelIn(_Body):
    version: int = Field(ge=1, le=MAX_VERSION)


class RenderIn(_Body):
    variables: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, le=MAX_VERSION)
    label: str | None = None


def _selector(version: int | None, label: str | None) -> int | str | None:
    if version is not None and label is not None:
        raise GatewayError(400, "Pass a version or a label, not both.", param="label")
    return version if version is not None else label


@router.get("/prompts")
async def list_prompts(request: Request) -> Any:
    """Prompts of the project, with their latest version and labels."""
    svc = services(request)
    return {"data": await call_service(svc.prompts.overview, principal(request).project_id)}


@router.post("/prompts", status_code=201, openapi_extra=json_body(PromptIn))
async def create_prompt_version(request: Request) -> Any:
    """A new immutable version of a prompt (the prompt too, on its first version)."""
    body = await read_json(request, PromptIn)
    caller = principal(request)
    view = await call_service(
        services(request).prompts.create,
        caller.project_id,
        body.name,
        template=body.template,
        author=caller.actor,
        author_id=caller.identity,
        variables=body.variables,
        model=body.model,
        params=body.params,
        message=body.message,
        description=body.description,
        labels=body.labels,
    )
    return view.to_dict()


@router.get("/prompts/{name}")
async def get_prompt(
    name: str,
    request: Request,
    label: str | None = None,
    version: int | None = Query(default=None, ge=1, le=MAX_VERSION),
) -> Any:
    """One version: by ``version``, by ``label``, or the latest."""
    svc = services(request)
    view = await call_service(
        svc.prompts.get, principal(request).project_id, name, _selector(version, label)
    )
    return view.to_dict()


@router.get("/prompts/{name}/versions")
async def list_versions(name: str, request: Request) -> Any:
    """Every version, newest first."""
    views = await call_service(
        services(request).prompts.versions, principal(request).project_id, name
    )
    return {"data": [v.to_dict() for v in views]}


@router.get("/prompts/{name}/diff")
async def diff_versions(
    name: str,
    request: Request,
    old: int = Query(alias="from", ge=1, le=MAX_VERSION),
    new: int = Query(alias="to", ge=1, le=MAX_VERSION),
) -> Any:
    """A unified diff of the templates and the changed fields between two versions."""
    svc = services(request)
    return await call_service(svc.prompts.diff, principal(request).project_id, name, old, new)


@router.post("/prompts/{name}/render", openapi_extra=json_body(RenderIn))
async def render_prompt(name: str, request: Request) -> Any:
    """The messages a version renders to with ``variables`` (nothing is called)."""
    body = await read_json(request, RenderIn)
    svc = services(request)
    view = await call_service(
        svc.prompts.get,
        principal(request).project_id,
        name,
        _selector(body.version, body.label),
    )
    messages = await call_service(view.render, body.variables)
    return {"name": name, "version": view.version, "messages": messages}


@router.get("/prompts/{name}/labels")
async def label_history(name: str, request: Request) -> Any:
    """Every label move, newest first."""
    svc = services(request)
    return {
        "data": await call_service(svc.prompts.label_history, principal(request).project_id, name)
    }


@router.put("/prompts/{name}/labels/{label}", openapi_extra=json_body(LabelIn))
async def set_label(name: str, label: str, request: Request) -> Any:
    """Point a label at a version (protected labels: 409, request an approval instead)."""
    body = await read_json(request, LabelIn)
    caller = principal(request)
    return await call_service(
        services(request).prompts.set_label,
        caller.project_id,
        name,
        label,
        body.version,
        caller.actor,
    )


@router.delete("/prompts/{name}/labels/{label}", status_code=204)
async def remove_label(name: str, label: str, request: Request) -> None:
    caller = principal(request)
    await call_service(
        services(request).prompts.remove_label, caller.project_id, name, label, caller.actor
    )


# -- approvals -----------------------------------------------------------------------------


class ApprovalIn(_Body):
    resource_type: Literal["prompt", "model"] = "prompt"
    name: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1, le=MAX_VERSION)
    label: str = Field(default="production", max_length=64)
    comment: str | None = Field(default=None, max_length=2000)


class DecisionIn(_Body):
    comment: str = Field(default="", max_length=2000)


@router.get("/approvals")
async def list_approvals(
    request: Request,
    status: str | None = Query(default=None, pattern="^(pending|approved|rejected|cancelled)$"),
) -> Any:
    """Approval requests of the project, newest first."""
    svc = services(request)
    return {
        "data": await call_service(
            svc.approvals.list_requests, principal(request).project_id, status
        )
    }


@router.post("/approvals", status_code=201, openapi_extra=json_body(ApprovalIn))
async def request_approval(request: Request) -> Any:
    """Ask for a protected label (``production``) to move onto a version."""
    body = await read_json(request, ApprovalIn)
    return await call_service(
        services(request).approvals.request,
        principal(request),
        body.resource_type,
        body.name,
        body.version,
        body.label,
        body.comment,
    )


@router.get("/approvals/{approval_id}")
async def get_approval(approval_id: str, request: Request) -> Any:
    svc = services(request)
    return await call_service(svc.approvals.get, principal(request).project_id, approval_id)


async def _decide(request: Request, approval_id: str, decision: str) -> Any:
    body = await read_json(request, DecisionIn, optional=True)
    approvals = services(request).approvals
    function = approvals.approve if decision == "approve" else approvals.reject
    return await call_service(function, principal(request), approval_id, body.comment)


@router.post(
    "/approvals/{approval_id}/approve", openapi_extra=json_body(DecisionIn, required=False)
)
async def approve(approval_id: str, request: Request) -> Any:
    """Approve (never the version's author) and move the label."""
    return await _decide(request, approval_id, "approve")


@router.post("/approvals/{approval_id}/reject", openapi_extra=json_body(DecisionIn, required=False))
async def reject(approval_id: str, request: Request) -> Any:
    return await _decide(request, approval_id, "reject")


@router.post("/approvals/{approval_id}/cancel")
async def cancel(approval_id: str, request: Request) -> Any:
    """Withdraw a pending request (its requester, or an approver)."""
    svc = services(request)
    return await call_service(svc.approvals.cancel, principal(request), approval_id)
