"""``POST /v1/traces``: OTLP/HTTP trace ingest (protobuf or JSON), so that an app instrumented
with OpenTelemetry, OpenLLMetry or OpenInference shows up in Flywheel.

Point the app's exporter at Flywheel: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=
http://127.0.0.1:8000/v1/traces`` and ``OTEL_EXPORTER_OTLP_HEADERS=Authorization=Bearer%20KEY``.
Spans land in the key's project; ``gen_ai.*`` attributes become the model, tokens, messages
and answer of a chat call.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from flywheel.server.http import (
    BINARY,
    authorize,
    principal,
    read_body,
    request_body,
    services,
)
from flywheel.tracing.otlp import (
    OtlpError,
    convert_request,
    decode_request,
    encode_error,
    encode_response,
)

router = APIRouter(tags=["otlp"], dependencies=[Depends(authorize)])


@router.post(
    "/v1/traces",
    openapi_extra=request_body(
        {"application/x-protobuf": BINARY, "application/json": {"type": "object"}}
    ),
    responses={
        200: {
            "description": "The ExportTraceServiceResponse, in the request's encoding.",
            "content": {"application/x-protobuf": {}, "application/json": {}},
        },
        # Refusals of the body are a google.rpc.Status in the request's encoding (400, 413,
        # 415); refusals of the key an OpenAI-style error.
        "4XX": {
            "description": "A google.rpc.Status, or an OpenAI-style error for the key.",
            "content": {"application/x-protobuf": {}, "application/json": {}},
        },
    },
)
async def ingest_otlp(request: Request) -> Response:
    """Accept an ``ExportTraceServiceRequest``; spans with invalid ids are counted in the
    reply's ``partialSuccess``. Errors come back as a ``google.rpc.Status``."""
    svc, caller = services(request), principal(request)
    content_type = request.headers.get("content-type", "")
    limit = svc.settings.max_upload_bytes
    body = await read_body(request, limit)

    def convert() -> tuple[bytes, str, int]:
        try:
            export = decode_request(
                body, content_type, request.headers.get("content-encoding"), max_bytes=limit
            )
            result = convert_request(export, project_id=caller.project_id, api_key_id=caller.key_id)
        except OtlpError as exc:
            payload, media = encode_error(exc, content_type)
            return payload, media, exc.status_code
        for row in result.rows:
            svc.writer.record(row)
        payload, media = encode_response(result, content_type)
        return payload, media, 200

    payload, media, status = await asyncio.to_thread(convert)
    return Response(payload, status_code=status, media_type=media)
