"""The provider interface: chat, streaming chat, embeddings and token counting.

Requests and responses are OpenAI-shaped dicts throughout, the lingua franca every provider
speaks, so the gateway never translates between private formats.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from flywheel.config import CatalogModel

ErrorKind = Literal["http", "timeout", "connection", "protocol"]


class ProviderError(Exception):
    """A failed upstream call, classified so routes can decide to retry or fall back."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after

    @property
    def trigger(self) -> int | str:
        """What route policies match on: the HTTP status, or the error kind."""
        return self.status_code if self.kind == "http" and self.status_code else self.kind

    def __repr__(self) -> str:
        return f"ProviderError({self.trigger!r}, {self.message!r})"


class InvalidRequest(ValueError):
    """The request cannot be served by this provider as asked (a 400 for the caller)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Provider(Protocol):
    """What the gateway needs from a provider."""

    name: str

    async def chat(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """A non-streamed chat completion in OpenAI shape."""
        ...

    def stream_chat(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` dicts; the last one carries ``usage``."""
        ...

    async def embed(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """An OpenAI embeddings response."""
        ...

    def is_ready(self, model: CatalogModel) -> bool:
        """Whether the model can answer now without loading first."""
        ...

    async def aclose(self) -> None: ...
