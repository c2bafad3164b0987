"""The gateway: routes each OpenAI-style call through retries and fallbacks, and traces it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from flywheel.config import CatalogModel, FlywheelConfig, RouteConfig
from flywheel.gateway.errors import GatewayError, from_provider_error
from flywheel.gateway.routing import RouteTable, Step
from flywheel.gateway.schemas import ChatCompletionRequest, EmbeddingRequest
from flywheel.providers import InvalidRequest, Provider, ProviderError, ProviderRegistry
from flywheel.tracing import TraceWriter, new_span_id, new_trace_id

log = logging.getLogger("flywheel.gateway")
T = TypeVar("T")
UnaryCall = Callable[[CatalogModel, dict[str, Any], float], Awaitable[dict[str, Any]]]


@dataclass
class CallContext:
    """Who called and which trace the call belongs to."""

    api_key_id: str | None = None
    trace_id: str = field(default_factory=new_trace_id)
    parent_id: str | None = None
    span_id: str = field(default_factory=new_span_id)


@dataclass
class _Call:
    """What a trace records about one gateway call while it runs."""

    ctx: CallContext
    kind: str
    route: str
    stream: bool
    input: Any
    started: float = field(default_factory=time.time)
    perf_start: float = field(default_factory=time.perf_counter)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    model: CatalogModel | None = None
    ttft_ms: float | None = None


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return False


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Gateway:
    """OpenAI-compatible chat and embeddings over the configured routes and providers."""

    def __init__(
        self,
        config: FlywheelConfig,
        providers: ProviderRegistry,
        writer: TraceWriter,
        capture: str = "full",
        routes: RouteTable | None = None,
    ) -> None:
        self.config = config
        self.providers = providers
        self.writer = writer
        self.capture_content = capture == "full"
        self.routes = routes or RouteTable(config)

    # -- discovery -------------------------------------------------------------------------

    def list_models(self) -> list[dict[str, Any]]:
        """Routes first, then catalog models, in the OpenAI ``/v1/models`` shape."""
        out = [
            {"id": r.name, "object": "model", "created": 0, "owned_by": "flywheel-route"}
            for r in self.config.routes
        ]
        out += [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.provider}
            for m in self.config.models
            if m.status != "blocked"
        ]
        return out

    def _resolve(self, call: _Call, kind: str) -> RouteConfig:
        try:
            return self.routes.resolve(call.route, kind)
        except GatewayError as exc:
            self._record(call, error=exc)
            raise

    # -- the retry / fallback loop ---------------------------------------------------------

    async def _run(
        self,
        call: _Call,
        route: RouteConfig,
        attempt: Callable[[Provider, Step], Awaitable[T]],
    ) -> T:
        last: ProviderError | None = None
        last_model = ""
        for step in self.routes.plan(route):
            provider = self.providers.provider_for(step.model)
            retry = 0
            while True:
                started = time.perf_counter()
                try:
                    result = await attempt(provider, step)
                except InvalidRequest as exc:
                    raise GatewayError(400, str(exc), param=exc.param) from None
                except (ProviderError, TimeoutError) as exc:
                    error = (
                        exc
                        if isinstance(exc, ProviderError)
                        else ProviderError("timeout", f"no answer within {step.timeout:g}s")
                    )
                    call.attempts.append(self._attempt(step, started, error))
                    last, last_model = error, step.model.name
                    delay = self.routes.backoff(route.retry, retry, error)
                    if delay is None:
                        break
                    retry += 1
                    await asyncio.sleep(delay)
                    continue
                call.attempts.append(self._attempt(step, started, None))
                call.model = step.model
                return result
            if last.trigger not in route.fallback_on:
                break
        assert last is not None
        raise from_provider_error(last, last_model)

    async def _unary(
        self,
        call: _Call,
        kind: str,
        request: ChatCompletionRequest | EmbeddingRequest,
        method: Callable[[Provider], UnaryCall],
    ) -> dict[str, Any]:
        """One JSON-in, JSON-out call through the route; a failure is traced, then raised."""
        route = self._resolve(call, kind)

        async def attempt(provider: Provider, step: Step) -> dict[str, Any]:
            body = request.upstream_body(step.model.wire_name)
            async with asyncio.timeout(step.timeout):
                return await method(provider)(step.model, body, step.timeout)

        try:
            return await self._run(call, route, attempt)
        except GatewayError as exc:
            self._record(call, error=exc)
            raise

    @staticmethod
    def _attempt(step: Step, started: float, error: ProviderError | None) -> dict[str, Any]:
        return {
            "model": step.model.name,
            "ms": round((time.perf_counter() - started) * 1000, 3),
            "error": None
            if error is None
            else {"trigger": error.trigger, "message": error.message},
        }

    # -- chat ------------------------------------------------------------------------------

    def _chat_input(self, request: ChatCompletionRequest) -> Any:
        if not self.capture_content:
            return None
        return request.params

    async def chat(self, request: ChatCompletionRequest, ctx: CallContext) -> dict[str, Any]:
        """A non-streamed completion."""
        call = _Call(ctx, "gateway.chat", request.model, False, self._chat_input(request))
        response = await self._unary(call, "chat", request, lambda p: p.chat)
        usage = response.get("usage") or {}
        output = None
        if self.capture_content:
            output = {
                "choices": [
                    {"message": c.get("message"), "finish_reason": c.get("finish_reason")}
                    for c in response.get("choices", [])
                ]
            }
        self._record(call, usage=usage, output=output)
        return response

    async def stream_chat(
        self, request: ChatCompletionRequest, ctx: CallContext
    ) -> AsyncIterator[bytes]:
        """Open a stream: targets are tried until one yields its first token, so an error
        before that falls back; the returned iterator then yields SSE bytes. An error after
        the first token ends the stream with an OpenAI-style error event."""
        call = _Call(ctx, "gateway.chat", request.model, True, self._chat_input(request))
        route = self._resolve(call, "chat")
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        async def attempt(
            provider: Provider, step: Step
        ) -> tuple[AsyncIterator[dict[str, Any]], list[dict[str, Any]]]:
            body = request.upstream_body(step.model.wire_name)
            body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
            chunks = aiter(provider.stream_chat(step.model, body, step.timeout))
            buffered: list[dict[str, Any]] = []
            try:
                async with asyncio.timeout(step.timeout):
                    async for chunk in chunks:
                        buffered.append(chunk)
                        if _has_content(chunk):
                            break
            except BaseException:
                await chunks.aclose()  # type: ignore[attr-defined]
                raise
            return chunks, buffered

        try:
            chunks, buffered = await self._run(call, route, attempt)
        except GatewayError as exc:
            self._record(call, error=exc)
            raise
        call.ttft_ms = (time.perf_counter() - call.perf_start) * 1000
        return self._relay(call, chunks, buffered, include_usage)

    async def _relay(
        self,
        call: _Call,
        chunks: AsyncIterator[dict[str, Any]],
        buffered: list[dict[str, Any]],
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        text: list[str] = []
        usage: dict[str, Any] = {}
        finish_reason: str | None = None
        error: GatewayError | None = None
        status = "ok"

        async def all_chunks() -> AsyncIterator[dict[str, Any]]:
            for chunk in buffered:
                yield chunk
            async for chunk in chunks:
                yield chunk

        try:
            async for chunk in all_chunks():
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not include_usage:
                        if not chunk.get("choices"):
                            continue
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                for choice in chunk.get("choices") or []:
                    text.append((choice.get("delta") or {}).get("content") or "")
                    finish_reason = choice.get("finish_reason") or finish_reason
                yield sse(chunk)
            yield sse("[DONE]")
        except ProviderError as exc:
            # Tokens already reached the caller, so falling back would splice two answers.
            target = call.model.name if call.model else call.route
            error = GatewayError(
                502,
                f"upstream '{target}' failed mid-stream: {exc.message}",
                code="stream_interrupted",
            )
            call.attempts.append(
                {
                    "model": target,
                    "ms": None,
                    "error": {
                        "trigger": exc.trigger,
                        "message": exc.message,
                        "after_first_token": True,
                    },
                }
            )
            yield sse(error.body())
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            output = None
            if self.capture_content:
                output = {
                    "choices": [
                        {
                            "message": {"role": "assistant", "content": "".join(text)},
                            "finish_reason": finish_reason,
                        }
                    ]
                }
            self._record(call, usage=usage, output=output, error=error, status=status)

    # -- embeddings ------------------------------------------------------------------------

    async def embeddings(self, request: EmbeddingRequest, ctx: CallContext) -> dict[str, Any]:
        captured = {"input": request.input} if self.capture_content else None
        call = _Call(ctx, "gateway.embeddings", request.model, False, captured)
        response = await self._unary(call, "embedding", request, lambda p: p.embed)
        if request.encoding_format == "base64":
            for item in response["data"]:
                if isinstance(item.get("embedding"), list):
                    vector = np.asarray(item["embedding"], dtype="<f4")
                    item["embedding"] = base64.b64encode(vector.tobytes()).decode("ascii")
        self._record(call, usage=response.get("usage") or {}, output=None)
        return response

    # -- tracing ---------------------------------------------------------------------------

    def _record(
        self,
        call: _Call,
        *,
        usage: dict[str, Any] | None = None,
        output: Any = None,
        error: GatewayError | None = None,
        status: str = "ok",
    ) -> None:
        usage = usage or {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        total = usage.get("total_tokens")
        if total is None and (prompt is not None or completion is not None):
            total = (prompt or 0) + (completion or 0)
        model = call.model
        cost = model.pricing.cost(prompt, completion) if model is not None and usage else None
        end = time.time()
        self.writer.record(
            {
                "trace_id": call.ctx.trace_id,
                "span_id": call.ctx.span_id,
                "parent_id": call.ctx.parent_id,
                "name": f"{call.kind.split('.')[-1]} {call.route}",
                "kind": call.kind,
                "start_time": call.started,
                "end_time": end,
                "latency_ms": (time.perf_counter() - call.perf_start) * 1000,
                "ttft_ms": call.ttft_ms,
                "status": "error" if error is not None else status,
                "status_code": error.status_code if error is not None else 200,
                "error": error.message if error is not None else None,
                "route": call.route,
                "model": model.name if model else None,
                "provider": model.provider if model else None,
                "stream": call.stream,
                "input": call.input,
                "output": output,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": total,
                "cost": cost,
                "attempts": call.attempts,
                "api_key_id": call.ctx.api_key_id,
            }
        )


__all__ = ["CallContext", "Gateway", "sse"]
