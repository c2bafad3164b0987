"""OTLP ingest and export: spans from the real OpenTelemetry SDK become Flywheel rows, OTLP/JSON
reads like protobuf, rows survive a trip through OTLP, and the exporter delivers to a collector.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace import Status as SdkStatus

from flywheel.tracing.otlp import (
    OtlpError,
    OtlpExporter,
    convert_request,
    decode_request,
    encode_error,
    encode_response,
    encode_spans,
    spans_from_request,
)

PROTOBUF = "application/x-protobuf"


# -- a loopback OTLP receiver -------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A tiny OTLP/HTTP collector: records each POST and answers the queued statuses
    (then 200). ``hold`` makes it wait before answering, to keep an exporter busy."""

    def __init__(self, statuses: tuple[int, ...] = (), hold: threading.Event | None = None):
        self.requests: list[Received] = []
        self.statuses = list(statuses)
        self.hold = hold
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.hold is not None:
                    receiver.hold.wait(10)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.requests.append(Received(self.path, headers, body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("Content-Type", PROTOBUF)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def rows(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for request in self.requests:
            body = decode_request(
                request.body,
                request.headers["content-type"],
                request.headers.get("content-encoding"),
            )
            rows += spans_from_request(body, project_id="proj1", api_key_id="key1")
        return rows

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


# -- the real OpenTelemetry SDK -----------------------------------------------------------


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_spans_from_the_sdk_exporter_land_as_traces(
    receiver: Receiver, compression: Compression
) -> None:
    provider = TracerProvider(
        resource=Resource.create({"service.name": "shop-assistant", "deployment.env": "test"})
    )
    exporter = OTLPSpanExporter(
        endpoint=f"{receiver.endpoint}/v1/traces",
        headers={"x-flywheel-key": "fw-test"},
        compression=compression,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("shop.instrumentation", "1.2.3")

    with tracer.start_as_current_span(
        "invoke_agent shopper",
        attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "shopper"},
    ) as agent:
        # Current GenAI conventions: messages as JSON "parts" attributes.
        with tracer.start_as_current_span(
            "chat gpt-4o-mini",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                "gen_ai.request.temperature": 0.2,
                "gen_ai.request.max_tokens": 200,
                "gen_ai.usage.input_tokens": 31,
                "gen_ai.usage.output_tokens": 9,
                "gen_ai.system_instructions": json.dumps(
                    [{"type": "text", "content": "You are terse."}]
                ),
                "gen_ai.input.messages": json.dumps(
                    [
                        {
                            "role": "user",
                            "parts": [{"type": "text", "content": "Where is order 42?"}],
                        }
                    ]
                ),
                "gen_ai.output.messages": json.dumps(
                    [
                        {
                            "role": "assistant",
                            "parts": [
                                {
                                    "type": "tool_call",
                                    "id": "call_1",
                                    "name": "lookup_order",
                                    "arguments": {"order": 42},
                                }
                            ],
                            "finish_reason": "tool_call",
                        }
                    ]
                ),
                "flywheel.route": "support",
                "app.user_tier": "gold",
            },
        ) as chat:
            pass
        # OpenLLMetry: indexed prompt/completion attributes, legacy token names.
        with tracer.start_as_current_span(
            "openai.chat",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.system": "openai",
                "llm.request.type": "chat",
                "gen_ai.request.model": "gpt-4o",
                "gen_ai.response.model": "gpt-4o-2024-08-06",
                "gen_ai.usage.prompt_tokens": 12,
                "gen_ai.usage.completion_tokens": 5,
                "llm.usage.total_tokens": 17,
                "gen_ai.prompt.0.role": "system",
                "gen_ai.prompt.0.content": "Be nice.",
                "gen_ai.prompt.1.role": "user",
                "gen_ai.prompt.1.content": "Hi!",
                "gen_ai.completion.0.role": "assistant",
                "gen_ai.completion.0.content": "Hello!",
                "gen_ai.completion.0.finish_reason": "stop",
            },
        ) as openllmetry:
            pass
        # OpenInference: llm.* attributes and content items.
        with tracer.start_as_current_span(
            "ChatCompletion",
            attributes={
                "openinference.span.kind": "LLM",
                "llm.model_name": "claude-3-5-haiku",
                "llm.provider": "anthropic",
                "llm.token_count.prompt": 20,
                "llm.token_count.completion": 4,
                "llm.token_count.total": 24,
                "llm.invocation_parameters": json.dumps({"temperature": 0.0}),
                "llm.input_messages.0.message.role": "user",
                "llm.input_messages.0.message.contents.0.message_content.type": "text",
                "llm.input_messages.0.message.contents.0.message_content.text": "Ping?",
                "llm.output_messages.0.message.role": "assistant",
                "llm.output_messages.0.message.content": "Pong.",
                "input.value": '{"messages": [{"role": "user", "content": "Ping?"}]}',
                "input.mime_type": "application/json",
            },
        ) as openinference:
            pass
        with tracer.start_as_current_span(
            "execute_tool lookup_order",
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"},
            record_exception=False,
            set_status_on_exception=False,
        ) as tool:
            tool.record_exception(TimeoutError("inventory timed out"))
            tool.set_status(SdkStatus(StatusCode.ERROR, "inventory service timed out"))
    assert provider.force_flush(10_000)
    provider.shutdown()

    assert receiver.requests, "the SDK exporter posted nothing"
    first = receiver.requests[0]
    assert first.path == "/v1/traces"
    assert first.headers["content-type"] == PROTOBUF
    assert first.headers["x-flywheel-key"] == "fw-test"
    if compression is Compression.Gzip:
        assert first.headers["content-encoding"] == "gzip"

    rows = _by_name(receiver.rows())
    assert len(rows) == 5
    trace_id = f"{agent.get_span_context().trace_id:032x}"
    agent_id = f"{agent.get_span_context().span_id:016x}"
    assert {row["trace_id"] for row in rows.values()} == {trace_id}
    assert rows["invoke_agent shopper"]["parent_id"] is None
    assert rows["invoke_agent shopper"]["span_id"] == agent_id
    assert rows["invoke_agent shopper"]["kind"] == "otel.invoke_agent"
    for name in ("chat gpt-4o-mini", "openai.chat", "ChatCompletion", "execute_tool lookup_order"):
        assert rows[name]["parent_id"] == agent_id
        assert rows[name]["project_id"] == "proj1"
        assert rows[name]["api_key_id"] == "key1"

    new_style = rows["chat gpt-4o-mini"]
    assert new_style["span_id"] == f"{chat.get_span_context().span_id:016x}"
    assert new_style["kind"] == "otel.chat"
    assert new_style["start_time"] == chat.start_time / 1_000_000_000
    assert new_style["end_time"] == chat.end_time / 1_000_000_000
    assert new_style["latency_ms"] == pytest.approx((chat.end_time - chat.start_time) / 1e6)
    assert new_style["status"] == "ok" and new_style["status_code"] == 200
    assert new_style["model"] == "gpt-4o-mini-2024-07-18"
    assert new_style["provider"] == "openai"
    assert new_style["route"] == "support"
    assert (new_style["prompt_tokens"], new_style["completion_tokens"]) == (31, 9)
    assert new_style["total_tokens"] == 40
    assert new_style["input"] == {
        "temperature": 0.2,
        "max_tokens": 200,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Where is order 42?"},
        ],
    }
    assert new_style["output"] == {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "lookup_order", "arguments": '{"order": 42}'},
                        }
                    ],
                },
                "finish_reason": "tool_call",
            }
        ]
    }
    attributes = new_style["attributes"]
    assert attributes["resource.service.name"] == "shop-assistant"
    assert attributes["resource.deployment.env"] == "test"
    assert attributes["otel.scope.name"] == "shop.instrumentation"
    assert attributes["otel.scope.version"] == "1.2.3"
    assert attributes["otel.span.kind"] == "client"
    assert attributes["app.user_tier"] == "gold"
    # The requested model stays beside the answering one; what became a column does not.
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    for taken in ("gen_ai.input.messages", "gen_ai.response.model", "flywheel.route"):
        assert taken not in attributes

    legacy = rows["openai.chat"]
    assert legacy["span_id"] == f"{openllmetry.get_span_context().span_id:016x}"
    assert legacy["kind"] == "otel.chat"
    assert (legacy["model"], legacy["provider"]) == ("gpt-4o-2024-08-06", "openai")
    assert (legacy["prompt_tokens"], legacy["completion_tokens"], legacy["total_tokens"]) == (
        12,
        5,
        17,
    )
    assert legacy["input"] == {
        "messages": [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "Hi!"},
        ]
    }
    assert legacy["output"] == {
        "choices": [
            {"message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}
        ]
    }
    assert not any(k.startswith("gen_ai.prompt.") for k in legacy["attributes"])

    inference = rows["ChatCompletion"]
    assert inference["span_id"] == f"{openinference.get_span_context().span_id:016x}"
    assert inference["kind"] == "otel.chat"
    assert (inference["model"], inference["provider"]) == ("claude-3-5-haiku", "anthropic")
    assert (inference["prompt_tokens"], inference["total_tokens"]) == (20, 24)
    assert inference["input"] == {
        "temperature": 0.0,
        "messages": [{"role": "user", "content": "Ping?"}],
    }
    assert inference["output"] == {
        "choices": [{"message": {"role": "assistant", "content": "Pong."}, "finish_reason": None}]
    }
    assert inference["attributes"]["openinference.span.kind"] == "LLM"

    failed = rows["execute_tool lookup_order"]
    assert failed["span_id"] == f"{tool.get_span_context().span_id:016x}"
    assert failed["kind"] == "otel.execute_tool"
    assert (failed["status"], failed["status_code"]) == ("error", 500)
    assert failed["error"] == "inventory service timed out"
    assert failed["input"] is None and failed["output"] is None


# -- OTLP/JSON ----------------------------------------------------------------------------

TRACE_HEX = "5b8efff798038103d269b633813fc60c"
ROOT_HEX = "eee19b7ec3c1b174"
CHILD_HEX = "0102030405060708"
INPUT_MESSAGES = json.dumps(
    [{"role": "user", "parts": [{"type": "text", "content": "Capital of France?"}]}]
)


def _attr(key: str, **value: Any) -> dict[str, Any]:
    return {"key": key, "value": value}


OTLP_JSON: dict[str, Any] = {
    "resourceSpans": [
        {
            "resource": {"attributes": [_attr("service.name", stringValue="checkout")]},
            "scopeSpans": [
                {
                    "scope": {"name": "manual", "version": "0.1"},
                    "spans": [
                        {
                            "traceId": TRACE_HEX,
                            "spanId": ROOT_HEX,
                            "parentSpanId": "",
                            "name": "chat gpt-4o",
                            "kind": 3,
                            "startTimeUnixNano": "1700000000123456789",
                            "endTimeUnixNano": "1700000001623456789",
                            "attributes": [
                                _attr("gen_ai.operation.name", stringValue="chat"),
                                _attr("gen_ai.request.model", stringValue="gpt-4o"),
                                _attr("gen_ai.usage.input_tokens", intValue="7"),
                                _attr("gen_ai.usage.output_tokens", intValue=3),
                                _attr("gen_ai.request.temperature", doubleValue=0.5),
                                _attr("gen_ai.input.messages", stringValue=INPUT_MESSAGES),
                                _attr(
                                    "app.tags",
                                    arrayValue={"values": [{"stringValue": "a"}, {"intValue": 2}]},
                                ),
                                _attr(
                                    "app.meta",
                                    kvlistValue={
                                        "values": [_attr("tier", stringValue="gold")],
                                    },
                                ),
                            ],
                            # The older convention: the answer as a gen_ai.choice event.
                            "events": [
                                {
                                    "timeUnixNano": "1700000001600000000",
                                    "name": "gen_ai.choice",
                                    "attributes": [
                                        _attr("finish_reason", stringValue="stop"),
                                        _attr(
                                            "message",
                                            kvlistValue={
                                                "values": [
                                                    _attr("role", stringValue="assistant"),
                                                    _attr("content", stringValue="Paris."),
                                                ]
                                            },
                                        ),
                                    ],
                                }
                            ],
                            "status": {},
                        },
                        {
                            "traceId": TRACE_HEX,
                            "spanId": CHILD_HEX,
                            "parentSpanId": ROOT_HEX,
                            "name": "db lookup",
                            "kind": 1,
                            "startTimeUnixNano": 1700000000200000000,
                            "endTimeUnixNano": 1700000000250000000,
                            "status": {"code": 2, "message": "connection reset"},
                        },
                    ],
                }
            ],
        }
    ]
}


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _snake_case_variant(value: Any) -> Any:
    """The same document with snake_case field names, enum names and upper-case hex ids."""
    if isinstance(value, list):
        return [_snake_case_variant(item) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "kind":
            item = Span.SpanKind.Name(item)
        elif key == "code":
            item = Status.StatusCode.Name(item)
        elif key.endswith("Id"):
            item = item.upper()
        out[key if key == "key" else _snake(key)] = _snake_case_variant(item)
    return out


def _kv(key: str, **value: Any) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(**value))


def _protobuf_equivalent() -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(_kv("service.name", string_value="checkout"))
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name, scope_spans.scope.version = "manual", "0.1"
    root = scope_spans.spans.add(
        trace_id=bytes.fromhex(TRACE_HEX),
        span_id=bytes.fromhex(ROOT_HEX),
        name="chat gpt-4o",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=1700000000123456789,
        end_time_unix_nano=1700000001623456789,
    )
    tags = AnyValue()
    tags.array_value.values.extend([AnyValue(string_value="a"), AnyValue(int_value=2)])
    meta = AnyValue()
    meta.kvlist_value.values.append(_kv("tier", string_value="gold"))
    root.attributes.extend(
        [
            _kv("gen_ai.operation.name", string_value="chat"),
            _kv("gen_ai.request.model", string_value="gpt-4o"),
            _kv("gen_ai.usage.input_tokens", int_value=7),
            _kv("gen_ai.usage.output_tokens", int_value=3),
            _kv("gen_ai.request.temperature", double_value=0.5),
            _kv("gen_ai.input.messages", string_value=INPUT_MESSAGES),
            KeyValue(key="app.tags", value=tags),
            KeyValue(key="app.meta", value=meta),
        ]
    )
    message = AnyValue()
    message.kvlist_value.values.extend(
        [_kv("role", string_value="assistant"), _kv("content", string_value="Paris.")]
    )
    event = root.events.add(time_unix_nano=1700000001600000000, name="gen_ai.choice")
    event.attributes.extend(
        [_kv("finish_reason", string_value="stop"), KeyValue(key="message", value=message)]
    )
    child = scope_spans.spans.add(
        trace_id=bytes.fromhex(TRACE_HEX),
        span_id=bytes.fromhex(CHILD_HEX),
        parent_span_id=bytes.fromhex(ROOT_HEX),
        name="db lookup",
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=1700000000200000000,
        end_time_unix_nano=1700000000250000000,
    )
    child.status.code = Status.STATUS_CODE_ERROR
    child.status.message = "connection reset"
    return request


def _rows(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    return spans_from_request(request, project_id="proj1", api_key_id=None)


def test_otlp_json_reads_like_its_protobuf_equivalent() -> None:
    expected = _rows(_protobuf_equivalent())
    root, child = expected
    assert root["trace_id"] == TRACE_HEX and root["span_id"] == ROOT_HEX
    assert root["start_time"] == 1700000000123456789 / 10**9
    assert root["latency_ms"] == 1500.0
    assert (root["model"], root["prompt_tokens"], root["total_tokens"]) == ("gpt-4o", 7, 10)
    assert root["input"] == {
        "temperature": 0.5,
        "messages": [{"role": "user", "content": "Capital of France?"}],
    }
    assert root["output"] == {
        "choices": [
            {"message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}
        ]
    }
    assert root["attributes"]["app.tags"] == ["a", 2]
    assert root["attributes"]["app.meta.tier"] == "gold"
    assert root["attributes"]["resource.service.name"] == "checkout"
    assert "otel.events" not in root["attributes"]  # the choice event became the output
    assert child["parent_id"] == ROOT_HEX
    assert (child["kind"], child["status"], child["error"]) == (
        "otel.span",
        "error",
        "connection reset",
    )

    camel = json.dumps(OTLP_JSON).encode()
    assert _rows(decode_request(camel, "application/json")) == expected
    snake = json.dumps(_snake_case_variant(OTLP_JSON)).encode()
    assert b'"resource_spans"' in snake and b'"SPAN_KIND_CLIENT"' in snake
    assert _rows(decode_request(snake, "application/json; charset=utf-8")) == expected
    protobuf = _protobuf_equivalent().SerializeToString()
    assert _rows(decode_request(protobuf, PROTOBUF)) == expected


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("identity", lambda body: body),
        (None, lambda body: body),
    ],
)
def test_compressed_bodies_decode(encoding: str | None, compress: Any) -> None:
    expected = _rows(_protobuf_equivalent())
    for body, content_type in (
        (json.dumps(OTLP_JSON).encode(), "application/json"),
        (_protobuf_equivalent().SerializeToString(), PROTOBUF),
    ):
        assert _rows(decode_request(compress(body), content_type, encoding)) == expected


def _json_with(**span_fields: Any) -> bytes:
    document = json.loads(json.dumps(OTLP_JSON))
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0].update(span_fields)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("body", "content_type", "encoding", "status", "says"),
    [
        (b"{not json", "application/json", None, 400, "not valid JSON"),
        (b"[1, 2]", "application/json", None, 400, "must be an object"),
        (
            _json_with(traceId="not-an-id"),
            "application/json",
            None,
            400,
            "resourceSpans[0].scopeSpans[0].spans[0].traceId 'not-an-id' is not a hex",
        ),
        (_json_with(spanId=12), "application/json", None, 400, "spanId must be a hex string"),
        (b'{"resourceSpans": 5}', "application/json", None, 400, "not a valid OTLP/JSON"),
        (_json_with(startTimeUnixNano="soon"), "application/json", None, 400, "OTLP/JSON"),
        (_json_with(attributes={"a": 1}), "application/json", None, 400, "OTLP/JSON"),
        (b"\x0a\x05ab", PROTOBUF, None, 400, "not a valid protobuf"),
        (b"plain bytes", PROTOBUF, "gzip", 400, "not valid gzip"),
        (gzip.compress(b"x" * 1000, mtime=0)[:20], PROTOBUF, "gzip", 400, "truncated gzip"),
        (b"{}", "text/plain", None, 415, "Unsupported Content-Type 'text/plain'"),
        (b"{}", "application/json", "br", 415, "Unsupported Content-Encoding 'br'"),
    ],
)
def test_malformed_bodies_raise_otlp_error(
    body: bytes, content_type: str, encoding: str | None, status: int, says: str
) -> None:
    with pytest.raises(OtlpError) as raised:
        decode_request(body, content_type, encoding)
    assert isinstance(raised.value, ValueError)
    assert raised.value.status_code == status
    assert says in raised.value.message


@pytest.mark.parametrize("content_type", [PROTOBUF, "application/json"])
def test_errors_reply_with_a_google_rpc_status(content_type: str) -> None:
    from google.rpc.status_pb2 import Status as RpcStatus  # googleapis-common-protos

    error = OtlpError("Body is not valid JSON: é" + "x" * 300)
    body, reply_type = encode_error(error, content_type)
    assert reply_type == content_type
    status = RpcStatus()
    if content_type == PROTOBUF:
        status.ParseFromString(body)
        assert (status.code, status.message) == (3, error.message)
    else:
        assert json.loads(body) == {"code": 3, "message": error.message}
    body, _ = encode_error(OtlpError("too big", 413), PROTOBUF)
    status.ParseFromString(body)
    assert (status.code, status.message) == (8, "too big")


def test_a_gzip_bomb_is_refused() -> None:
    bomb = gzip.compress(b"\0" * 1_000_000)
    with pytest.raises(OtlpError) as raised:
        decode_request(bomb, PROTOBUF, "gzip", max_bytes=100_000)
    assert raised.value.status_code == 413


def test_spans_with_invalid_ids_are_rejected_and_counted() -> None:
    request = _protobuf_equivalent()
    spans = request.resource_spans[0].scope_spans[0].spans
    spans.add(trace_id=bytes(16), span_id=b"\1" * 8, name="zero trace", start_time_unix_nano=1)
    spans.add(trace_id=b"\1" * 16, span_id=b"\1" * 4, name="short span", start_time_unix_nano=1)
    spans.add(trace_id=b"\1" * 16, span_id=b"\2" * 8, name="no start")
    result = convert_request(request, project_id="proj1", api_key_id=None)
    assert [row["name"] for row in result.rows] == ["chat gpt-4o", "db lookup"]
    assert result.rejected == 3
    assert result.error_message.startswith("3 span(s) rejected: trace_id must be 16 bytes")
    assert "start_time_unix_nano is missing" in result.error_message

    body, content_type = encode_response(result, PROTOBUF)
    assert content_type == PROTOBUF
    reply = ExportTraceServiceResponse.FromString(body)
    assert reply.partial_success.rejected_spans == 3
    body, content_type = encode_response(result, "application/json")
    assert content_type == "application/json"
    assert json.loads(body)["partialSuccess"]["rejectedSpans"] in (3, "3")

    accepted = convert_request(_protobuf_equivalent(), project_id="proj1", api_key_id=None)
    body, _ = encode_response(accepted, PROTOBUF)
    assert not ExportTraceServiceResponse.FromString(body).HasField("partial_success")


def test_older_genai_events_become_messages() -> None:
    request = ExportTraceServiceRequest()
    span = (
        request.resource_spans.add()
        .scope_spans.add()
        .spans.add(
            trace_id=bytes.fromhex(TRACE_HEX),
            span_id=bytes.fromhex(ROOT_HEX),
            name="chat mistral",
            start_time_unix_nano=1_700_000_000_000_000_000,
            end_time_unix_nano=1_700_000_000_500_000_000,
        )
    )
    span.attributes.extend(
        [
            _kv("gen_ai.operation.name", string_value="chat"),
            _kv("gen_ai.system", string_value="mistral_ai"),
            _kv("gen_ai.request.model", string_value="mistral-small"),
        ]
    )
    call = AnyValue()
    function = AnyValue()
    function.kvlist_value.values.extend(
        [_kv("name", string_value="weather"), _kv("arguments", string_value='{"city":"Oslo"}')]
    )
    call.kvlist_value.values.extend(
        [_kv("id", string_value="c1"), KeyValue(key="function", value=function)]
    )
    calls = AnyValue()
    calls.array_value.values.append(call)
    for name, attributes in (
        ("gen_ai.system.message", [_kv("content", string_value="Be brief.")]),
        ("gen_ai.user.message", [_kv("content", string_value="Weather in Oslo?")]),
        ("gen_ai.assistant.message", [KeyValue(key="tool_calls", value=calls)]),
        (
            "gen_ai.tool.message",
            [_kv("id", string_value="c1"), _kv("content", string_value="snow")],
        ),
        ("cache.miss", [_kv("key", string_value="abc")]),
        (
            "gen_ai.choice",
            [
                _kv(
                    "gen_ai.event.content",
                    string_value=json.dumps(
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"content": "Snowing in Oslo."},
                        }
                    ),
                )
            ],
        ),
    ):
        span.events.add(name=name, time_unix_nano=1_700_000_000_100_000_000).attributes.extend(
            attributes
        )
    row = _rows(request)[0]
    assert row["input"] == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "content": "snow", "tool_call_id": "c1"},
        ]
    }
    assert row["output"] == {
        "choices": [
            {
                "message": {"role": "assistant", "content": "Snowing in Oslo."},
                "finish_reason": "stop",
            }
        ]
    }
    assert (row["provider"], row["model"]) == ("mistral_ai", "mistral-small")
    assert row["attributes"]["otel.events"] == ["cache.miss"]


@pytest.mark.parametrize(
    ("attributes", "expected_input", "expected_output"),
    [
        (  # OpenInference chain: plain text stays text, even when it looks like a number
            {
                "input.value": "123",
                "input.mime_type": "text/plain",
                "output.value": '{"answer": 42}',
                "output.mime_type": "application/json",
            },
            {"value": "123"},
            {"value": {"answer": 42}},
        ),
        (  # an OpenAI request and response as the values: the gateway's own shapes
            {
                "input.value": '{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}',
                "input.mime_type": "application/json",
                "output.value": json.dumps(
                    {
                        "id": "x",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "Yo"},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                ),
            },
            {"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
            {
                "choices": [
                    {"message": {"role": "assistant", "content": "Yo"}, "finish_reason": "stop"}
                ]
            },
        ),
        (  # OpenLLMetry workflow spans
            {"traceloop.entity.input": '{"q": "why"}', "traceloop.entity.output": "because"},
            {"value": {"q": "why"}},
            {"value": "because"},
        ),
    ],
)
def test_generic_values_fill_input_and_output(
    attributes: dict[str, str], expected_input: Any, expected_output: Any
) -> None:
    request = ExportTraceServiceRequest()
    span = (
        request.resource_spans.add()
        .scope_spans.add()
        .spans.add(
            trace_id=bytes.fromhex(TRACE_HEX),
            span_id=bytes.fromhex(ROOT_HEX),
            name="chain",
            start_time_unix_nano=1_700_000_000_000_000_000,
        )
    )
    span.attributes.extend(_kv(k, string_value=v) for k, v in attributes.items())
    row = _rows(request)[0]
    assert (row["input"], row["output"]) == (expected_input, expected_output)
    assert (row["kind"], row["end_time"], row["latency_ms"]) == ("otel.span", None, None)
    assert not set(attributes) & set(row["attributes"])


def test_long_content_is_truncated_and_says_so() -> None:
    request = _protobuf_equivalent()
    root = request.resource_spans[0].scope_spans[0].spans[0]
    long_messages = json.dumps(
        [{"role": "user", "parts": [{"type": "text", "content": "y" * 500}]}]
    )
    for kv in root.attributes:
        if kv.key == "gen_ai.input.messages":
            kv.value.string_value = long_messages
    root.attributes.append(_kv("app.note", string_value="z" * 500))
    row = spans_from_request(request, project_id="p", api_key_id=None, max_content_chars=50)[0]
    assert row["input"]["messages"][0]["content"] == "y" * 50
    assert row["attributes"]["app.note"] == "z" * 50
    assert row["output"]["choices"][0]["message"]["content"] == "Paris."
    assert row["attributes"]["flywheel.truncated"] == ["input", "attributes"]


# -- export -------------------------------------------------------------------------------

ROUND_TRIP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _gateway_rows() -> list[dict[str, Any]]:
    """Rows as the gateway writes them (``Gateway._record``)."""
    base = {
        "trace_id": ROUND_TRIP_TRACE,
        "ttft_ms": None,
        "stream": False,
        "attempts": [{"model": "gpt-4o-mini", "ms": 812.5, "error": None}],
        "api_key_id": "key9",
        "project_id": "proj9",
    }
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "rainy, 14C", "tool_call_id": "call_9"},
    ]
    return [
        {
            **base,
            "span_id": "00f067aa0ba902b7",
            "parent_id": None,
            "name": "chat support",
            "kind": "gateway.chat",
            "start_time": 1717171717.123456,
            "end_time": 1717171718.0,
            "latency_ms": 876.544,
            "ttft_ms": 120.5,
            "status": "ok",
            "status_code": 200,
            "error": None,
            "route": "support",
            "model": "gpt-4o-mini",
            "provider": "openai",
            "stream": True,
            "input": {"model": "support", "messages": messages, "temperature": 0.3, "top_p": 0.9},
            "output": {
                "choices": [
                    {
                        "message": {"role": "assistant", "content": "Rainy, 14°C."},
                        "finish_reason": "stop",
                    }
                ]
            },
            "prompt_tokens": 57,
            "completion_tokens": 8,
            "total_tokens": 65,
            "cost": 0.000123,
            "attributes": {"flywheel.prompt.name": "support-bot", "flywheel.prompt.version": 3},
        },
        {
            **base,
            "span_id": "00f067aa0ba902b8",
            "parent_id": "00f067aa0ba902b7",
            "name": "chat limited",
            "kind": "gateway.chat",
            "start_time": 1717171719.5,
            "end_time": 1717171719.625,
            "latency_ms": 125.0,
            "status": "error",
            "status_code": 429,
            "error": "Rate limit exceeded for key.",
            "route": "limited",
            "model": None,
            "provider": None,
            "input": None,
            "output": None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "total_tokens": None,
            "cost": None,
            "attributes": None,
        },
    ]


def test_encoded_rows_survive_the_round_trip() -> None:
    original = _gateway_rows()
    body = encode_spans(original, service_name="flywheel-test")
    request = decode_request(body, PROTOBUF)
    assert request.resource_spans[0].scope_spans[0].scope.name == "flywheel"
    attributes = {
        kv.key: kv.value for kv in request.resource_spans[0].scope_spans[0].spans[0].attributes
    }
    assert attributes["gen_ai.operation.name"].string_value == "chat"
    assert attributes["gen_ai.request.model"].string_value == "support"
    assert attributes["gen_ai.response.model"].string_value == "gpt-4o-mini"
    assert json.loads(attributes["gen_ai.output.messages"].string_value) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "Rainy, 14°C."}],
            "finish_reason": "stop",
        }
    ]
    parts = json.loads(attributes["gen_ai.input.messages"].string_value)
    assert parts[2]["parts"] == [
        {"type": "tool_call", "id": "call_9", "name": "weather", "arguments": {"city": "Paris"}}
    ]
    assert parts[3]["parts"] == [
        {"type": "tool_call_response", "id": "call_9", "response": "rainy, 14C"}
    ]

    chat, limited = spans_from_request(request, project_id="proj9", api_key_id="key9")
    for before, after in zip(original, (chat, limited), strict=True):
        for column in (
            "trace_id", "span_id", "parent_id", "name", "start_time", "end_time", "status",
            "status_code", "error", "route", "model", "provider", "prompt_tokens",
            "completion_tokens", "total_tokens", "cost", "output",
        ):  # fmt: skip
            assert after[column] == before[column], column
        assert after["latency_ms"] == pytest.approx(before["latency_ms"], abs=1e-3)
        assert after["attributes"]["resource.service.name"] == "flywheel-test"
    assert chat["kind"] == "otel.chat"
    assert chat["ttft_ms"] == 120.5 and chat["stream"] is True
    assert chat["input"] == {
        "temperature": 0.3,
        "top_p": 0.9,
        "messages": original[0]["input"]["messages"],
    }
    assert chat["attributes"]["flywheel.prompt.version"] == 3
    assert limited["kind"] == "otel.chat"
    assert limited["input"] is None and limited["output"] is None


def _rows_to_send(count: int) -> list[dict[str, Any]]:
    row = _gateway_rows()[0]
    return [{**row, "span_id": f"{i + 1:016x}"} for i in range(count)]


def test_exporter_delivers_rows(receiver: Receiver) -> None:
    exporter = OtlpExporter(
        receiver.endpoint, headers={"authorization": "Bearer collector-token"}, timeout=5,
        flush_interval=0.05,
    )  # fmt: skip
    exporter.export(_rows_to_send(3))
    assert exporter.flush(5)
    assert (exporter.sent, exporter.failed, exporter.dropped, exporter.pending) == (3, 0, 0, 0)
    assert exporter.close(5)
    assert receiver.requests[0].path == "/v1/traces"
    assert receiver.requests[0].headers["authorization"] == "Bearer collector-token"
    rows = receiver.rows()
    assert [row["span_id"] for row in rows] == [f"{i + 1:016x}" for i in range(3)]
    assert rows[0]["model"] == "gpt-4o-mini"
    assert rows[0]["attributes"]["resource.service.name"] == "flywheel"


def test_exporter_retries_a_503() -> None:
    receiver = Receiver(statuses=(503, 200))
    try:
        exporter = OtlpExporter(
            receiver.endpoint, backoff=0.01, compression="gzip", flush_interval=0.01
        )
        exporter.export(_rows_to_send(2))
        assert exporter.flush(5)  # not closing: the retry waits out its backoff
        assert exporter.close(5)
        assert (exporter.sent, exporter.failed) == (2, 0)
        assert len(receiver.requests) == 2
        assert receiver.requests[0].body == receiver.requests[1].body
        assert receiver.requests[1].headers["content-encoding"] == "gzip"
        delivered = receiver.requests[1]
        request = decode_request(delivered.body, PROTOBUF, delivered.headers["content-encoding"])
        assert len(spans_from_request(request, project_id="p", api_key_id=None)) == 2
    finally:
        receiver.close()


def test_exporter_does_not_retry_a_400() -> None:
    receiver = Receiver(statuses=(400,))
    try:
        exporter = OtlpExporter(receiver.endpoint, backoff=0.01)
        exporter.export(_rows_to_send(2))
        assert exporter.close(5)
        assert (exporter.sent, exporter.failed) == (0, 2)
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


def test_exporter_counts_failures_against_a_dead_endpoint() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port now: every try is refused.
    exporter = OtlpExporter(f"http://127.0.0.1:{port}", timeout=1, backoff=0.01)
    exporter.export(_rows_to_send(4))
    assert exporter.close(5)
    assert (exporter.sent, exporter.failed, exporter.pending) == (0, 4, 0)


def test_close_flushes_and_later_rows_are_dropped(receiver: Receiver) -> None:
    # A long interval: only close() can make these go out in time.
    exporter = OtlpExporter(receiver.endpoint, flush_interval=60, batch_size=1000)
    exporter.export(_rows_to_send(3))
    started = time.monotonic()
    assert exporter.close(5)
    assert time.monotonic() - started < 2
    assert len(receiver.rows()) == 3
    assert (exporter.sent, exporter.pending) == (3, 0)
    exporter.export(_rows_to_send(1))
    assert exporter.dropped == 1


def test_export_never_blocks_when_the_queue_is_full() -> None:
    hold = threading.Event()
    receiver = Receiver(hold=hold)
    try:
        exporter = OtlpExporter(receiver.endpoint, max_queue=2, batch_size=1, flush_interval=0.01)
        started = time.monotonic()
        exporter.export(_rows_to_send(10))
        assert time.monotonic() - started < 0.5
        # One row may be in flight to the stalled receiver, two wait: the rest are dropped.
        assert 7 <= exporter.dropped <= 8
        hold.set()
        assert exporter.close(5)
        assert exporter.sent + exporter.dropped == 10 and exporter.failed == 0
    finally:
        receiver.close()


def test_hex_and_base64_ids_in_json_mean_the_same() -> None:
    # Some clients send protobuf-JSON's base64 ids; their length cannot pass for hex.
    b64 = _json_with(
        traceId=base64.b64encode(bytes.fromhex(TRACE_HEX)).decode(),
        spanId=base64.b64encode(bytes.fromhex(ROOT_HEX)).decode(),
    )
    rows = _rows(decode_request(b64, "application/json"))
    assert (rows[0]["trace_id"], rows[0]["span_id"]) == (TRACE_HEX, ROOT_HEX)
