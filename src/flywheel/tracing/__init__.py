"""Traces: the batched background writer and the queries behind the trace API and UI."""

from flywheel.tracing.queries import TraceFilter, TraceQueries
from flywheel.tracing.writer import TraceWriter, new_span_id, new_trace_id, parse_traceparent

__all__ = [
    "TraceFilter",
    "TraceQueries",
    "TraceWriter",
    "new_span_id",
    "new_trace_id",
    "parse_traceparent",
]
