"""``/v1``: the OpenAI-compatible API. Any OpenAI client works with only base_url changed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flywheel.gateway import CallContext, ChatCompletionRequest, EmbeddingRequest, GatewayError
from flywheel.gateway.cache import CACHE_HEADER, cache_directives
from flywheel.server.http import (
    ERROR_RESPONSES,
    UPSTREAM_RESPONSES,
    authorize,
    gateway_context,
    json_body,
    principal,
    read_json,
    services,
)

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)
TRACE_HEADER = "x-flywheel-trace-id"


@contextmanager
def _traced_errors(ctx: CallContext) -> Iterator[None]:
    """Error responses carry the trace id too, so a failed call can be looked up."""
    try:
        yield
    except GatewayError as exc:
        exc.headers[TRACE_HEADER] = ctx.trace_id
        raise


@router.post(
    "/chat/completions",
    openapi_extra=json_body(ChatCompletionRequest),
    responses={
        **UPSTREAM_RESPONSES,
        200: {
            "description": "The completion, or its chunks as server-sent events.",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
    },
)
async def chat_completions(request: Request) -> Any:
    """Chat completions, JSON or server-sent events (``"stream": true``)."""
    body = await read_json(request, ChatCompletionRequest)
    ctx = await gateway_context(request)
    ctx.cache_lookup, ctx.cache_store = cache_directives(request.headers)
    gateway = services(request).gateway
    headers = {TRACE_HEADER: ctx.trace_id}
    with _traced_errors(ctx):
        if body.stream:
            events = await gateway.stream_chat(body, ctx)
            if ctx.cache_status:
                headers[CACHE_HEADER] = ctx.cache_status
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        response = await gateway.chat(body, ctx)
        if ctx.cache_status:
            headers[CACHE_HEADER] = ctx.cache_status
        return JSONResponse(response, headers=headers)


@router.post("/embeddings", openapi_extra=json_body(EmbeddingRequest), responses=UPSTREAM_RESPONSES)
async def embeddings(request: Request) -> Any:
    """Embeddings of one text or a list of texts."""
    body = await read_json(request, EmbeddingRequest)
    ctx = await gateway_context(request)
    with _traced_errors(ctx):
        result = await services(request).gateway.embeddings(body, ctx)
    return JSONResponse(result, headers={TRACE_HEADER: ctx.trace_id})


@router.get("/models")
async def list_models(request: Request) -> Any:
    """Routes and catalog models this key may call as ``model``."""
    caller = principal(request)
    models = services(request).gateway.list_models()
    return {"object": "list", "data": [m for m in models if caller.may_call(m["id"])]}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Any:
    caller = principal(request)
    for item in services(request).gateway.list_models():
        if item["id"] == model_id and caller.may_call(model_id):
            return item
    raise GatewayError(
        404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
    )
