"""Flywheel: a self-hosted LLMOps platform.

The top-level package stays light: importing :mod:`flywheel` pulls in no model code, so
applications can use the SDK (``flywheel.Client``, ``flywheel.trace``, ``flywheel.span``)
cheaply.
"""

from flywheel.sdk import (
    Client,
    FlywheelError,
    StalePromptWarning,
    configure,
    current_span,
    span,
    trace,
    traceparent,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "FlywheelError",
    "StalePromptWarning",
    "__version__",
    "configure",
    "current_span",
    "span",
    "trace",
    "traceparent",
]
