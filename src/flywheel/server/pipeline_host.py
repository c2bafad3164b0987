"""What a pipeline run calls: the gateway for models and prompts, knowledge-base retrieval,
SSRF-checked HTTP for tools, and the trace writer; always as the caller who started it."""

from __future__ import annotations

import asyncio
import json as jsonlib
from typing import TYPE_CHECKING, Any

import httpx

from flywheel.errors import ServiceError
from flywheel.gateway import CallContext, ChatCompletionRequest, GatewayError
from flywheel.rag.fetch import FetchPolicy, check_url

if TYPE_CHECKING:
    from flywheel.server.services import Services

# Largest tool response a pipeline reads (bytes).
MAX_TOOL_RESPONSE = 5 * 1024 * 1024


class GatewayPipelineHost:
    """A pipeline host acting for ``caller``: its key's model allow-list and limits apply to
    every model call the pipeline makes."""

    def __init__(self, services: Services, caller: CallContext) -> None:
        self.services = services
        self.caller = caller

    def _context(self, trace_id: str, parent_id: str) -> CallContext:
        return CallContext(
            api_key_id=self.caller.api_key_id,
            project_id=self.caller.project_id,
            allowed_models=self.caller.allowed_models,
            limit_subjects=self.caller.limit_subjects,
            trace_id=trace_id,
            parent_id=parent_id,
            attributes=self.caller.attributes,
        )

    async def chat(self, body: dict[str, Any], *, trace_id: str, parent_id: str) -> dict[str, Any]:
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValueError as exc:
            raise ValueError(f"invalid model call: {exc}") from None
        try:
            return await self.services.gateway.chat(request, self._context(trace_id, parent_id))
        except GatewayError as exc:
            raise RuntimeError(f"{exc.status_code} {exc.message}") from None

    async def retrieve(
        self,
        knowledge_base: str,
        query: str,
        *,
        top_k: int,
        mode: str,
        filters: dict[str, Any] | None,
        trace_id: str,
        parent_id: str,
    ) -> list[dict[str, Any]]:
        options: dict[str, Any] = {"top_k": top_k, "mode": mode, "filters": filters or {}}
        try:
            found = await self.services.rag.retrieve(
                self.caller.project_id or "",
                knowledge_base,
                query,
                options,
                trace_id=trace_id,
                parent_id=parent_id,
                api_key_id=self.caller.api_key_id,
            )
        except ServiceError as exc:
            raise RuntimeError(exc.message) from None
        hits: list[dict[str, Any]] = found["hits"]
        return hits

    async def http(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        json: Any,
        content: str | None,
        timeout: float,
    ) -> tuple[int, Any]:
        policy = FetchPolicy(
            allow_hosts=tuple(self.services.settings.fetch_allow_hosts), timeout=timeout
        )
        await asyncio.to_thread(check_url, url, policy)
        async with (
            httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client,
            client.stream(method, url, headers=headers, json=json, content=content) as response,
        ):
            data = bytearray()
            async for part in response.aiter_bytes():
                data += part
                if len(data) > MAX_TOOL_RESPONSE:
                    raise RuntimeError(f"{url}: response larger than {MAX_TOOL_RESPONSE} bytes")
        text = data.decode(response.encoding or "utf-8", errors="replace")
        if "json" in response.headers.get("content-type", ""):
            try:
                return response.status_code, jsonlib.loads(text)
            except ValueError:
                pass
        return response.status_code, text

    def record(self, span: dict[str, Any]) -> None:
        self.services.writer.record(span)


__all__ = ["GatewayPipelineHost"]
