"""The Python SDK: trace your own code and send the spans to a Flywheel server."""

from flywheel.sdk.tracing import (
    Span,
    configure,
    current_span,
    flush,
    span,
    trace,
    traceparent,
)

__all__ = ["Span", "configure", "current_span", "flush", "span", "trace", "traceparent"]
