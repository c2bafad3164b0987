"""Request plumbing shared by the routers: JSON bodies with limits, auth, OpenAI errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError
from starlette.datastructures import FormData
from starlette.routing import Match

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
# Nesting levels a JSON body may have; deeper bodies are refused before any code recurses.
MAX_JSON_DEPTH = 128
_TOO_DEEP = object()
# SQL integers are 64-bit: an id, version or offset past this matches nothing, and binding it
# to a query fails (OverflowError), so the parameters that reach SQL stop here with a 400.
MAX_SQL_INT = 2**63 - 1


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


class ErrorDetail(BaseModel):
    """The fields of an OpenAI-style error."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every refusal: ``{"error": {message, type, param, code}}``."""

    error: ErrorDetail


# Every 4xx of the API carries the OpenAI error body; documented once per router so the
# OpenAPI spec (and schemathesis, which checks answers against it) knows every status the
# routes answer with. "4XX" also replaces FastAPI's default 422, which Flywheel never sends
# for validation (it answers 400 naming the parameter).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "Refused: an OpenAI-style error body."}
}
# Routes that call upstream models also answer 502 (the upstream failed or broke protocol)
# and 504 (it timed out), by design.
UPSTREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorBody, "description": "Every upstream target failed."},
    504: {"model": ErrorBody, "description": "The upstream timed out."},
}


def file_response(description: str, *media_types: str) -> dict[int | str, dict[str, Any]]:
    """``responses`` documenting a 200 that is a file of ``media_types``, not JSON."""
    return {200: {"description": description, "content": {media: {} for media in media_types}}}


def request_body(content: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a body the handler reads itself (FastAPI cannot see it):
    ``content`` maps media types to their schemas."""
    return {
        "requestBody": {
            "required": required,
            "content": {media: {"schema": schema} for media, schema in content.items()},
        }
    }


def model_schema(model: type[BaseModel], omit: Sequence[str] = ()) -> dict[str, Any]:
    """``model``'s JSON schema, less the fields in ``omit`` (those the URL gives), nested
    models inlined: pydantic's ``#/$defs/...`` references would point into the spec's root."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    for name in omit:
        schema.get("properties", {}).pop(name, None)
        if name in schema.get("required", ()):
            schema["required"] = [field for field in schema["required"] if field != name]
    inlined: dict[str, Any] = _inline_refs(schema, defs, ())
    return inlined


def json_body(
    model: type[BaseModel], *, required: bool = True, omit: Sequence[str] = ()
) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body read with :func:`read_json`."""
    return request_body({"application/json": model_schema(model, omit)}, required=required)


BINARY: dict[str, Any] = {"type": "string", "format": "binary"}


def raw_body(media_types: Sequence[str]) -> dict[str, Any]:
    """``openapi_extra`` documenting a raw body (a file) of the given media types."""
    return request_body(dict.fromkeys(media_types, BINARY))


def form_schema(fields: Sequence[str]) -> dict[str, Any]:
    """A multipart upload's schema: text ``fields`` and any number of ``files``."""
    properties: dict[str, Any] = {name: {"type": "string"} for name in fields}
    properties["files"] = {"type": "array", "items": BINARY}
    return {"type": "object", "properties": properties, "required": ["files"]}


def _inline_refs(node: Any, defs: dict[str, Any], stack: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            # A recursive model documents its inner levels as any value.
            target = {} if name in stack else _inline_refs(defs[name], defs, (*stack, name))
            rest = {k: _inline_refs(v, defs, stack) for k, v in node.items() if k != "$ref"}
            return {**target, **rest}
        return {key: _inline_refs(value, defs, stack) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, defs, stack) for item in node]
    return node


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


def json_loads(text: bytes | str) -> Any:
    """``json.loads``, refusing (``ValueError``) JSON nested more than MAX_JSON_DEPTH levels:
    code further on (validation, tracing, storage, reading back) recurses per level, and
    ``json.loads`` itself raises RecursionError, not ValueError, past Python's limit."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = _TOO_DEEP
    if value is _TOO_DEEP or _too_deep(text, value):
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _too_deep(text: bytes | str, data: Any) -> bool:
    # Only a text with more brackets than the limit can be too deep: a C-speed count
    # spares the gateway's small bodies the walk.
    brackets = (
        text.count(b"[") + text.count(b"{")
        if isinstance(text, bytes)
        else text.count("[") + text.count("{")
    )
    if brackets <= MAX_JSON_DEPTH:
        return False
    level: list[tuple[Any, int]] = [(data, 1)]
    while level:
        value, depth = level.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(value, dict):
            level.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            level.extend((item, depth + 1) for item in value)
    return False


async def read_json(request: Request, model: type[M], *, optional: bool = False) -> M:
    """Parse and validate a JSON body, refusing bodies over the configured size; with
    ``optional``, an empty body means ``{}``."""
    body = await read_body(request)
    if optional and not body.strip():
        body = b"{}"
    try:
        data: Any = json_loads(body)
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
        try:
            key = await asyncio.to_thread(svc.keys.verify, token)
        except OperationalError:
            raise database_unavailable() from None
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
        # Experiments assign by a header (a session, a named header) when configured so.
        headers={name.lower(): value for name, value in request.headers.items()},
    )
    parent = parse_traceparent(request.headers.get("traceparent"))
    if parent is not None:
        ctx.trace_id, ctx.parent_id = parent
    return ctx


def principal(request: Request) -> Principal:
    """The principal :func:`authorize` stored on the request."""
    found: Principal = request.state.principal
    return found


def database_unavailable() -> GatewayError:
    """The 503 for a request that needs the database while it is unreachable (an outage, a
    failover): clients retry after the ``Retry-After`` seconds, nothing was changed."""
    return GatewayError(
        503,
        "The database is unavailable; retry shortly.",
        code="database_unavailable",
        headers={"Retry-After": "2"},
    )


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: the methods of every route matching the request's path.

    Starlette's router answers 405 with the first matching route's methods only, although
    FastAPI registers ``GET`` and ``POST`` of one path as two routes."""
    methods: set[str] = set()
    scope = {**request.scope, "method": "OPTIONS"}  # no route takes OPTIONS: a partial match
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))
