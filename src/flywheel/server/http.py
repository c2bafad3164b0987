"""Request plumbing shared by the routers: JSON bodies with limits, auth, OpenAI errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from flywheel.errors import ServiceError
from flywheel.gateway import CallContext, GatewayError
from flywheel.gateway.errors import from_service_error
from flywheel.gateway.limits import Limits, Subject
from flywheel.security import AccessError, AuthenticatedKey, Permission, Principal
from flywheel.server.policy import required_permission
from flywheel.server.services import Services
from flywheel.tracing import parse_traceparent

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# Files one form may carry (Starlette's own default).
MAX_FORM_FILES = 1000


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def validation_error(errors: Sequence[Any]) -> GatewayError:
    """The first validation problem (pydantic or FastAPI) as a 400 naming the parameter."""
    if not errors:
        return GatewayError(400, "Invalid request.", code="invalid_value")
    first = errors[0]
    # FastAPI prefixes where the value came from; callers know that already.
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = first["msg"]
    return GatewayError(
        400,
        f"Invalid value for '{param}': {message}" if param else message,
        param=param,
        code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value",
    )


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The raw body, refused (413) past ``limit`` bytes (default: the configured size)."""
    limit = limit or services(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise GatewayError(
            413, f"Request body is larger than {limit} bytes.", code="body_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise GatewayError(
                413, f"Request body is larger than {limit} bytes.", code="body_too_large"
            )
    return bytes(body)


async def read_form(
    request: Request, limit: int | None = None, max_files: int = MAX_FORM_FILES
) -> FormData:
    """A form, its body refused (413) past ``limit`` bytes (default: the upload limit) before
    it is parsed; later calls return the same form."""
    body = await read_body(request, limit or services(request).settings.max_upload_bytes)
    request._body = body  # form() parses the body already read (and limited) here
    return await request.form(max_files=max_files, max_fields=100)


async def read_json(request: Request, model: type[M], *, optional: bool = False) -> M:
    """Parse and validate a JSON body, refusing bodies over the configured size; with
    ``optional``, an empty body means ``{}``."""
    body = await read_body(request)
    if optional and not body.strip():
        body = b"{}"
    try:
        data: Any = json.loads(body)
    except ValueError as exc:
        raise GatewayError(
            400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def awaited(operation: Awaitable[T]) -> T:
    """Await a service coroutine; its refusals become OpenAI-style errors."""
    try:
        return await operation
    except ServiceError as exc:
        raise service_error(exc) from None


async def call_service(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a service operation off the event loop; its refusals become OpenAI-style errors."""
    try:
        return await run_in_threadpool(function, *args, **kwargs)
    except ServiceError as exc:
        raise service_error(exc) from None


PROJECT_HEADER = "x-flywheel-project"


def service_error(exc: ServiceError) -> GatewayError:
    """A service's refusal in the OpenAI error shape."""
    kind = {401: "authentication_error", 403: "permission_error"}.get(
        exc.status_code, "invalid_request_error"
    )
    return from_service_error(exc, type=kind)


async def authenticate(request: Request) -> Principal:
    """The caller from ``Authorization: Bearer …``, acting in its project (an instance key
    may pick one with ``X-Flywheel-Project``); 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise GatewayError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
            type="authentication_error",
        )
    svc = services(request)
    # Verified keys are cached in memory; only a cache miss reads the database.
    key = svc.keys.cached(token)
    if key is None:
        key = await asyncio.to_thread(svc.keys.verify, token)
    if key is None:
        raise GatewayError(
            401,
            "Incorrect API key provided, or it has expired or been revoked.",
            code="invalid_api_key",
            type="authentication_error",
        )
    requested = request.headers.get(PROJECT_HEADER)
    if key.project_id is None and requested:
        # Checking a named project may read the database; keep that off the event loop.
        return await asyncio.to_thread(_principal, svc, key, requested)
    return _principal(svc, key, requested)


def _principal(svc: Services, key: AuthenticatedKey, requested: str | None) -> Principal:
    try:
        return svc.access.principal_for_key(key, requested)
    except AccessError as exc:
        raise service_error(exc) from None


def forbidden(principal: Principal, permission: Permission) -> GatewayError:
    who = (
        f"role '{principal.role}'"
        if principal.kind == "user"
        else (f"a key with role '{principal.role}' and scope '{principal.scope}'")
    )
    return GatewayError(
        403,
        f"Permission '{permission}' is needed here; {who} in project "
        f"'{principal.project_id}' does not have it.",
        code="permission_denied",
        type="permission_error",
    )


async def authorize(request: Request) -> Principal:
    """Router dependency: authenticate, then check the route's policy (deny by default)."""
    route = request.scope.get("route")
    permission = required_permission(request.method, getattr(route, "path", ""))
    if permission is None:
        raise GatewayError(
            403, "This route has no access policy.", code="no_policy", type="permission_error"
        )
    principal = await authenticate(request)
    if not principal.can(permission):
        raise forbidden(principal, permission)
    request.state.principal = principal
    return principal


async def limit_subjects(svc: Services, caller: Principal) -> tuple[Subject, ...]:
    """The limits a gateway call must fit: the key's own, then its project's."""
    own = (
        (Subject("key", caller.key_id, Limits(**caller.limits)),)
        if caller.limits and caller.key_id
        else ()
    )
    return own + await svc.project_limit_subjects(caller.project_id)


async def gateway_context(request: Request) -> CallContext:
    """The caller as the gateway sees it: key, project, model allow-list, limits, and the
    trace a ``traceparent`` header asks to join."""
    caller = principal(request)
    ctx = CallContext(
        api_key_id=caller.key_id,
        project_id=caller.project_id,
        allowed_models=caller.allowed_models,
        limit_subjects=await limit_subjects(services(request), caller),
    )
    parent = parse_traceparent(request.headers.get("traceparent"))
    if parent is not None:
        ctx.trace_id, ctx.parent_id = parent
    return ctx


def principal(request: Request) -> Principal:
    """The principal :func:`authorize` stored on the request."""
    found: Principal = request.state.principal
    return found
