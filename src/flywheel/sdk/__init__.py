"""The Python SDK: a client for the prompt registry and the gateway, and tracing of your own
code with the spans sent to a Flywheel server."""

from flywheel.sdk.client import Client, FlywheelError, Prompt, StalePromptWarning
from flywheel.sdk.tracing import (
    Span,
    configure,
    current_span,
    flush,
    span,
    trace,
    traceparent,
)

__all__ = [
    "Client",
    "FlywheelError",
    "Prompt",
    "Span",
    "StalePromptWarning",
    "configure",
    "current_span",
    "flush",
    "span",
    "trace",
    "traceparent",
]
