"""Any OpenAI-compatible API (OpenAI, vLLM, Ollama, llama.cpp server, another Flywheel).

Upstream calls use aiohttp: on the gateway's hot path it costs about 1 ms less per request
than httpx (docs/decisions/0001-aiohttp-for-upstream-calls.md). The gateway owns retries, so
this module only classifies failures: HTTP status and ``Retry-After``, timeouts, connection
errors and protocol errors (bodies or stream lines that are not the JSON they should be).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp.http_exceptions import LineTooLong

from flywheel.config import CatalogModel, ProviderConfig
from flywheel.providers.base import ProviderError, parse_retry_after

# The longest stream line (one SSE event) read from an upstream. aiohttp's default, 128 KiB,
# is less than one big chunk can be (a long answer sent at once, an image as base64).
MAX_STREAM_LINE = 16 * 1024 * 1024


def _error_message(status: int, text: str) -> str:
    try:
        payload = json.loads(text)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, RecursionError):
        pass  # not JSON (or nested past the recursion limit): the status says enough
    return f"upstream returned HTTP {status}"


class OpenAICompatibleProvider:
    """Calls ``{base_url}/chat/completions`` and ``{base_url}/embeddings``."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        if not config.base_url:
            raise ValueError(f"provider '{name}' needs base_url")
        self.base_url = config.base_url.rstrip("/")
        key = config.api_key.get_secret_value() if config.api_key else None
        if key is None and config.api_key_env:
            key = os.environ.get(config.api_key_env)
        self._headers = dict(config.headers)
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: an aiohttp session belongs to the event loop that first uses it.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=256, ttl_dns_cache=300),
                json_serialize=lambda obj: json.dumps(obj, separators=(",", ":")),
            )
        return self._session

    @staticmethod
    def _timeout(seconds: float, streaming: bool) -> aiohttp.ClientTimeout:
        # Streams bound the wait for each chunk rather than the whole answer.
        return aiohttp.ClientTimeout(
            total=None if streaming else seconds, connect=min(seconds, 10.0), sock_read=seconds
        )

    def _failure(self, exc: BaseException, timeout: float, during: str) -> ProviderError:
        if isinstance(exc, asyncio.TimeoutError):
            return ProviderError("timeout", f"{self.name}: no answer within {timeout:g}s {during}")
        return ProviderError("connection", f"{self.name}: {type(exc).__name__} {during}".strip())

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status >= 400:
            text = (await response.read()).decode("utf-8", "replace")
            raise ProviderError(
                "http",
                _error_message(response.status, text),
                status_code=response.status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )

    async def _post_json(
        self, path: str, body: dict[str, Any], timeout: float, list_key: str
    ) -> dict[str, Any]:
        """POST JSON; the answer must be an object holding a ``list_key`` list."""
        try:
            async with self._client().post(
                f"{self.base_url}{path}", json=body, timeout=self._timeout(timeout, False)
            ) as response:
                await self._raise_for_status(response)
                raw = await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, timeout, "") from exc
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ProviderError("protocol", f"{self.name}: response is not JSON") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get(list_key), list):
            raise ProviderError("protocol", f"{self.name}: response has no '{list_key}' list")
        return payload

    async def chat(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return await self._post_json("/chat/completions", body, timeout, "choices")

    async def embed(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return await self._post_json("/embeddings", body, timeout, "data")

    async def stream_chat(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        try:
            async with self._client().post(
                f"{self.base_url}/chat/completions", json=body, timeout=self._timeout(timeout, True)
            ) as response:
                await self._raise_for_status(response)
                while line := await response.content.readline(max_line_length=MAX_STREAM_LINE):
                    chunk = self._parse_line(line)
                    if chunk is None:
                        continue
                    if chunk == "[DONE]":
                        return
                    yield chunk  # type: ignore[misc]
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc, timeout, "mid-stream") from exc
        except LineTooLong as exc:
            # A line past MAX_STREAM_LINE: not a stream Flywheel can relay.
            raise ProviderError(
                "protocol", f"{self.name}: stream line longer than {MAX_STREAM_LINE} bytes"
            ) from exc
        raise ProviderError("protocol", f"{self.name}: stream ended before [DONE]")

    def _parse_line(self, line: bytes) -> dict[str, Any] | str | None:
        if not line.startswith(b"data:"):
            return None
        data = line[5:].strip()
        if data == b"[DONE]":
            return "[DONE]"
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError) as exc:
            # RecursionError: valid JSON nested deeper than Python decodes.
            raise ProviderError("protocol", f"{self.name}: invalid JSON in stream") from exc
        if not isinstance(chunk, dict):
            raise ProviderError("protocol", f"{self.name}: stream chunk is not an object")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise ProviderError("http", f"{self.name}: {message}", status_code=502)
        return chunk

    def is_ready(self, model: CatalogModel) -> bool:
        return True

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
