"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from flywheel.errors import ServiceError
from flywheel.providers.base import ProviderError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """An error the caller sees, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(
            status_code, "server_error" if status_code >= 500 else "api_error"
        )
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_service_error(
    error: ServiceError, *, param: str | None = None, type: str | None = None
) -> GatewayError:
    """A stage's refusal in the OpenAI shape; ``param`` names the field when the service did
    not."""
    return GatewayError(
        error.status_code,
        error.message,
        param=error.param or param,
        code=error.code,
        type=type,
    )


def from_provider_error(error: ProviderError, target: str) -> GatewayError:
    """What the caller sees when every target failed and ``error`` was the last failure."""
    status = error.status_code
    if error.kind == "timeout":
        return GatewayError(504, f"upstream '{target}' timed out", code="upstream_timeout")
    if error.kind == "connection":
        return GatewayError(
            502,
            f"could not reach upstream '{target}': {error.message}",
            code="upstream_unreachable",
        )
    if error.kind == "protocol":
        return GatewayError(
            502,
            f"upstream '{target}' sent an invalid response: {error.message}",
            code="upstream_protocol_error",
        )
    if status == 429:
        headers = (
            {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after else {}
        )
        return GatewayError(
            429,
            f"upstream '{target}' is rate limited: {error.message}",
            code="rate_limit_exceeded",
            headers=headers,
        )
    if status in (401, 403):
        return GatewayError(
            502, f"upstream '{target}' rejected Flywheel's credentials", code="upstream_auth_error"
        )
    if status is not None and 400 <= status < 500:
        # The request itself is wrong for the upstream (e.g. too long): the caller can fix it.
        return GatewayError(status, error.message, code="upstream_invalid_request")
    return GatewayError(502, f"upstream '{target}' failed: {error.message}", code="upstream_error")
