"""``/api``: access and governance: who am I, projects, users, members, keys, audit log.

Handlers are thin: they parse the body, call :class:`~flywheel.security.AccessService` (which
audits every change) in a worker thread, and shape the answer. Each acts in the caller's
project only; instance admins pick a project with ``X-Flywheel-Project``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from flywheel.gateway.limits import Limits
from flywheel.security import AccessError, Principal
from flywheel.security.access import project_to_dict, user_to_dict
from flywheel.security.audit import to_dict as audit_to_dict
from flywheel.security.keys import key_to_dict
from flywheel.security.rbac import Role, Scope
from flywheel.server.http import (
    ERROR_RESPONSES,
    MAX_SQL_INT,
    authorize,
    call_service,
    file_response,
    json_body,
    principal,
    read_json,
    service_error,
    services,
)

router = APIRouter(
    prefix="/api", tags=["access"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _me(caller: Principal) -> dict[str, Any]:
    return {
        "kind": caller.kind,
        "id": caller.id,
        "name": caller.name,
        "project_id": caller.project_id,
        "role": caller.role,
        "scope": caller.scope,
        "instance_admin": caller.instance_admin,
        "permissions": sorted(caller.permissions),
        "allowed_models": list(caller.allowed_models) if caller.allowed_models else None,
    }


@router.get("/me")
def me(request: Request) -> Any:
    """The caller: key or user, project, role, scope and permissions."""
    return _me(principal(request))


# -- projects ------------------------------------------------------------------------------


class ProjectIn(_Body):
    name: str = Field(min_length=1, max_length=63)
    description: str = Field(default="", max_length=2000)
    limits: Limits | None = None


class ProjectPatch(_Body):
    description: str | None = Field(default=None, max_length=2000)
    limits: Limits | None = None
    retention_days: int | None = Field(
        default=None, ge=1, le=36500, description="Days traces are kept; null keeps them."
    )


@router.get("/projects")
async def list_projects(request: Request) -> Any:
    """Projects the caller can see."""
    projects = await call_service(services(request).access.list_projects, principal(request))
    return {"data": [project_to_dict(p) for p in projects]}


@router.post("/projects", status_code=201, openapi_extra=json_body(ProjectIn))
async def create_project(request: Request) -> Any:
    """Create a project (instance admins)."""
    body = await read_json(request, ProjectIn)
    limits = body.limits.model_dump(exclude_none=True) if body.limits else None
    project = await call_service(
        services(request).access.create_project,
        body.name,
        principal(request).actor,
        body.description,
        limits,
    )
    return project_to_dict(project)


def _visible(caller: Principal, project_id: str) -> None:
    if not caller.instance_admin and caller.project_id != project_id:
        raise service_error(AccessError(404, f"No project '{project_id}'.", "project_not_found"))


@router.get("/projects/{project_id}")
async def get_project(project_id: str, request: Request) -> Any:
    _visible(principal(request), project_id)
    return project_to_dict(await call_service(services(request).access.get_project, project_id))


@router.patch("/projects/{project_id}", openapi_extra=json_body(ProjectPatch))
async def update_project(project_id: str, request: Request) -> Any:
    """Change a project's limits and budget, description or trace retention (instance
    admins)."""
    body = await read_json(request, ProjectPatch)
    access = services(request).access
    limits = body.limits.model_dump(exclude_none=True) if body.limits else None
    if body.description is not None:
        await call_service(
            access.set_project_description, project_id, body.description, principal(request).actor
        )
    if "retention_days" in body.model_fields_set:
        await call_service(
            access.set_project_retention, project_id, body.retention_days, principal(request).actor
        )
        if body.model_fields_set == {"retention_days"}:
            return project_to_dict(await call_service(access.get_project, project_id))
    project = await call_service(
        access.set_project_limits, project_id, limits, principal(request).actor
    )
    return project_to_dict(project)


# -- users and members ---------------------------------------------------------------------


class UserIn(_Body):
    username: str = Field(min_length=1, max_length=100)
    password: str = Field(min_length=1, max_length=1024)
    is_admin: bool = False


class UserPatch(_Body):
    password: str | None = Field(default=None, min_length=1, max_length=1024)
    disabled: bool | None = None


@router.get("/users")
async def list_users(request: Request) -> Any:
    users = await call_service(services(request).access.list_users)
    return {"data": [user_to_dict(u) for u in users]}


@router.post("/users", status_code=201, openapi_extra=json_body(UserIn))
async def create_user(request: Request) -> Any:
    """Create a user who logs in to the UI with a password (stored as argon2)."""
    body = await read_json(request, UserIn)
    user = await call_service(
        services(request).access.create_user,
        body.username,
        body.password,
        principal(request).actor,
        body.is_admin,
    )
    return user_to_dict(user)


@router.patch("/users/{user_id}", openapi_extra=json_body(UserPatch))
async def update_user(user_id: str, request: Request) -> Any:
    """Set a user's password, or disable / enable the user."""
    body = await read_json(request, UserPatch)
    access = services(request).access
    actor = principal(request).actor
    user = await call_service(access.find_user, user_id)
    if body.password is not None:
        await call_service(access.set_password, user.id, body.password, actor)
    if body.disabled is not None:
        user = await call_service(access.set_user_disabled, user.id, body.disabled, actor)
    return user_to_dict(user)


class MemberIn(_Body):
    role: Role


@router.get("/members")
async def list_members(request: Request) -> Any:
    """Users of the caller's project with their roles."""
    members = await call_service(
        services(request).access.list_members, principal(request).project_id
    )
    return {"data": members}


@router.put("/members/{user_id}", openapi_extra=json_body(MemberIn))
async def set_member(user_id: str, request: Request) -> Any:
    """Give a user (id or username) a role in the caller's project."""
    body = await read_json(request, MemberIn)
    access = services(request).access
    caller = principal(request)
    user = await call_service(access.find_user, user_id)
    await call_service(access.set_member, caller.project_id, user.id, body.role, caller.actor)
    return {**user_to_dict(user), "role": body.role, "project_id": caller.project_id}


@router.delete("/members/{user_id}")
async def remove_member(user_id: str, request: Request) -> Any:
    access = services(request).access
    caller = principal(request)
    user = await call_service(access.find_user, user_id)
    removed = await call_service(access.remove_member, caller.project_id, user.id, caller.actor)
    if not removed:
        raise service_error(AccessError(404, f"'{user_id}' is not a member.", "not_a_member"))
    return {"removed": True}


# -- API keys ------------------------------------------------------------------------------


class KeyIn(_Body):
    name: str = Field(min_length=1, max_length=200)
    role: Role = "developer"
    scope: Scope = "gateway"
    expires_at: float | None = Field(default=None, description="Unix seconds.")
    allowed_models: list[str] | None = Field(
        default=None, description="Routes or models the key may call; omit for all."
    )
    limits: Limits | None = None
    user: str | None = Field(default=None, description="Owner (id or username).")


@router.get("/keys")
async def list_keys(request: Request) -> Any:
    """The project's keys (metadata only: the key itself is shown once, at creation)."""
    keys = await call_service(services(request).keys.list, principal(request).project_id)
    return {"data": [key_to_dict(k) for k in keys]}


@router.post("/keys", status_code=201, openapi_extra=json_body(KeyIn))
async def create_key(request: Request) -> Any:
    """Create a key in the caller's project. The response holds the key; it is not stored."""
    body = await read_json(request, KeyIn)
    access = services(request).access
    owner = (await call_service(access.find_user, body.user)).id if body.user else None
    raw, record = await call_service(
        access.create_key,
        principal(request),
        body.name,
        role=body.role,
        scope=body.scope,
        expires_at=body.expires_at,
        allowed_models=body.allowed_models,
        limits=body.limits.model_dump(exclude_none=True) if body.limits else None,
        for_user=owner,
    )
    return {**key_to_dict(record), "key": raw}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> Any:
    record = await call_service(services(request).access.revoke_key, principal(request), key_id)
    return key_to_dict(record)


# -- secrets -------------------------------------------------------------------------------


class SecretIn(_Body):
    value: str = Field(min_length=1, max_length=65_536)


def _secret_call(function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except ValueError as exc:
        raise service_error(AccessError(400, str(exc), "invalid_value")) from None


async def _audit_secret(request: Request, action: str, name: str, after: Any = None) -> None:
    caller = principal(request)
    await run_in_threadpool(
        lambda: services(request).audit.record(
            actor=caller.actor,
            action=action,
            resource_type="secret",
            resource_id=name,
            project_id=caller.project_id,
            after=after,
        )
    )


@router.get("/secrets")
async def list_secrets(request: Request) -> Any:
    """The project's secrets: names and dates only; values are never returned."""
    infos = await run_in_threadpool(services(request).secrets.list, principal(request).project_id)
    return {"data": [info.to_dict() for info in infos]}


@router.put("/secrets/{name}", openapi_extra=json_body(SecretIn))
async def set_secret(name: str, request: Request) -> Any:
    """Store (or replace) a secret, encrypted with the master key."""
    body = await read_json(request, SecretIn)
    svc, caller = services(request), principal(request)
    info = await run_in_threadpool(
        _secret_call, svc.secrets.set, caller.project_id, name, body.value, caller.actor
    )
    await _audit_secret(request, "secret.set", name, info.to_dict())
    return info.to_dict()


@router.delete("/secrets/{name}")
async def delete_secret(name: str, request: Request) -> Any:
    svc, caller = services(request), principal(request)
    if not await run_in_threadpool(svc.secrets.delete, caller.project_id, name):
        raise service_error(AccessError(404, f"No secret '{name}'.", "secret_not_found"))
    await _audit_secret(request, "secret.delete", name)
    return {"deleted": True}


# -- audit ---------------------------------------------------------------------------------


def _audit_scope(caller: Principal, everything: bool) -> str | None:
    # Instance admins may read the whole log; everyone else only their project's entries.
    return None if everything and caller.instance_admin else caller.project_id


@router.get("/audit")
async def list_audit(
    request: Request,
    action: str | None = None,
    actor: str | None = None,
    since: float | None = None,
    until: float | None = None,
    before_seq: int | None = Query(default=None, ge=0, le=MAX_SQL_INT),
    limit: int = Query(default=100, ge=1, le=1000),
    all_projects: bool = Query(default=False, description="Instance admins: every project."),
    resource_type: str | None = Query(default=None, max_length=64),
    resource_id: str | None = Query(default=None, max_length=200),
) -> Any:
    """Audit entries, newest first; pass the last ``seq`` as ``before_seq`` for more;
    ``resource_type`` and ``resource_id`` narrow to one thing's history."""
    events = await call_service(
        services(request).audit.list,
        project_id=_audit_scope(principal(request), all_projects),
        action=action,
        actor=actor,
        since=since,
        until=until,
        limit=limit,
        before_seq=before_seq,
        resource_type=resource_type,
        resource_id=resource_id,
    )
    return {"data": [audit_to_dict(e) for e in events]}


@router.get(
    "/audit/export",
    responses=file_response("JSON lines or CSV.", "application/x-ndjson", "text/csv"),
)
def export_audit(
    request: Request,
    format: Literal["jsonl", "csv"] = "jsonl",
    since: float | None = None,
    until: float | None = None,
    all_projects: bool = False,
) -> Any:
    """The audit log as JSON lines or CSV, oldest first, with hashes for offline checking."""
    lines = services(request).audit.export(
        format,
        project_id=_audit_scope(principal(request), all_projects),
        since=since,
        until=until,
    )
    media = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return StreamingResponse(
        (line if line.endswith("\n") else line + "\n" for line in lines),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="flywheel-audit.{format}"'},
    )


@router.get("/audit/verify")
async def verify_audit(request: Request) -> Any:
    """Recompute the hash chain over the whole log and report the first broken entry."""
    result = await call_service(services(request).audit.verify)
    return {
        "ok": result.ok,
        "checked": result.checked,
        "first_bad_seq": result.first_bad_seq,
        "problem": result.problem,
    }
