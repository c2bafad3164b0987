"""Any OpenAI-compatible API (OpenAI, vLLM, Ollama, llama.cpp server, another Flywheel).

httpx is used directly rather than the ``openai`` SDK: the gateway owns retries and needs the
raw status, ``Retry-After`` and the stream's lines to classify failures.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from flywheel.config import CatalogModel, ProviderConfig
from flywheel.providers.base import ProviderError, parse_retry_after


def _error_message(response: httpx.Response, text: str) -> str:
    try:
        payload = json.loads(text)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except ValueError:
        pass
    return f"upstream returned HTTP {response.status_code}"


class OpenAICompatibleProvider:
    """Calls ``{base_url}/chat/completions`` and ``{base_url}/embeddings``."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        assert config.base_url
        self.base_url = config.base_url.rstrip("/")
        key = config.api_key.get_secret_value() if config.api_key else None
        if key is None and config.api_key_env:
            key = os.environ.get(config.api_key_env)
        headers = dict(config.headers)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    @staticmethod
    def _timeout(seconds: float) -> httpx.Timeout:
        return httpx.Timeout(seconds, connect=min(seconds, 10.0))

    def _raise_for(self, response: httpx.Response, text: str) -> None:
        raise ProviderError(
            "http",
            _error_message(response, text),
            status_code=response.status_code,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    async def _post_json(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            response = await self._client.post(
                f"{self.base_url}{path}", json=body, timeout=self._timeout(timeout)
            )
        except httpx.TimeoutException as exc:
            raise ProviderError("timeout", f"{self.name}: timed out after {timeout:g}s") from exc
        except httpx.TransportError as exc:
            raise ProviderError("connection", f"{self.name}: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            self._raise_for(response, response.text)
        try:
            payload = response.json()
        except ValueError as exc:
            raise ProviderError("protocol", f"{self.name}: response is not JSON") from exc
        if not isinstance(payload, dict):
            raise ProviderError("protocol", f"{self.name}: response is not a JSON object")
        return payload

    async def chat(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        payload = await self._post_json("/chat/completions", body, timeout)
        if not isinstance(payload.get("choices"), list):
            raise ProviderError("protocol", f"{self.name}: response has no choices")
        return payload

    async def embed(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        payload = await self._post_json("/embeddings", body, timeout)
        if not isinstance(payload.get("data"), list):
            raise ProviderError("protocol", f"{self.name}: response has no data")
        return payload

    async def stream_chat(
        self, model: CatalogModel, body: dict[str, Any], timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        # The read timeout bounds the wait for each chunk, so a stalled stream times out too.
        request = self._client.build_request(
            "POST", f"{self.base_url}/chat/completions", json=body, timeout=self._timeout(timeout)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise ProviderError("timeout", f"{self.name}: timed out after {timeout:g}s") from exc
        except httpx.TransportError as exc:
            raise ProviderError("connection", f"{self.name}: {type(exc).__name__}") from exc
        try:
            if response.status_code >= 400:
                text = (await response.aread()).decode("utf-8", "replace")
                self._raise_for(response, text)
            async for chunk in self._parse_sse(response):
                yield chunk
        except httpx.TimeoutException as exc:
            raise ProviderError("timeout", f"{self.name}: stream stalled for {timeout:g}s") from exc
        except httpx.TransportError as exc:
            raise ProviderError(
                "connection", f"{self.name}: stream broke ({type(exc).__name__})"
            ) from exc
        finally:
            await response.aclose()

    async def _parse_sse(self, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise ProviderError("protocol", f"{self.name}: invalid JSON in stream") from exc
            if not isinstance(chunk, dict):
                raise ProviderError("protocol", f"{self.name}: stream chunk is not an object")
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else str(error)
                raise ProviderError("http", f"{self.name}: {message}", status_code=502)
            yield chunk
        raise ProviderError("protocol", f"{self.name}: stream ended before [DONE]")

    def is_ready(self, model: CatalogModel) -> bool:
        return True

    async def aclose(self) -> None:
        await self._client.aclose()
