"""Request plumbing shared by the routers: JSON bodies with limits, auth, OpenAI errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from flywheel.gateway import GatewayError
from flywheel.security import AuthenticatedKey
from flywheel.server.services import Services

M = TypeVar("M", bound=BaseModel)


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


async def read_json(request: Request, model: type[M]) -> M:
    """Parse and validate a JSON body, refusing bodies over the configured size."""
    limit = services(request).settings.max_body_bytes
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


async def require_key(request: Request) -> AuthenticatedKey:
    """The caller's API key from ``Authorization: Bearer …``; 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GatewayError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
            type="authentication_error",
        )
    keys = services(request).keys
    # Verified keys are cached in memory; only a cache miss reads the database.
    key = keys.cached(token.strip())
    if key is None:
        key = await asyncio.to_thread(keys.verify, token.strip())
    if key is None:
        raise GatewayError(
            401, "Incorrect API key provided.", code="invalid_api_key", type="authentication_error"
        )
    request.state.api_key = key
    return key
