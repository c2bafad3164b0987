"""Spans for users' own code, nested with OpenTelemetry-style ids.

``with flywheel.span("retrieve"):`` and ``@flywheel.trace`` record spans; nesting follows the
call stack through ``contextvars`` (so it works across ``await``). Finished spans are batched
by a background thread and posted to ``POST /api/spans`` of the configured server. Pass
:func:`traceparent` as a header to the gateway and its trace joins yours.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import inspect
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import httpx

log = logging.getLogger("flywheel.sdk")
F = TypeVar("F", bound=Callable[..., Any])

_current: ContextVar[Span | None] = ContextVar("flywheel_span", default=None)


@dataclass
class Span:
    """One unit of work. ``trace_id`` is 32 hex digits and ``span_id`` 16, as in OpenTelemetry."""

    name: str
    kind: str = "function"
    trace_id: str = field(default_factory=lambda: secrets.token_hex(16))
    span_id: str = field(default_factory=lambda: secrets.token_hex(8))
    parent_id: str | None = None
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    status: str = "ok"
    error: str | None = None
    input: Any = None
    output: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_output(self, value: Any) -> None:
        self.output = value

    def record_error(self, exc: BaseException) -> None:
        self.status = "error"
        self.error = f"{type(exc).__name__}: {exc}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_id": self.parent_id,
            "name": self.name,
            "kind": self.kind,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "status": self.status,
            "error": self.error,
            "input": _jsonable(self.input),
            "output": _jsonable(self.output),
            "attributes": {k: _jsonable(v) for k, v in self.attributes.items()},
        }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return repr(value)


class _Exporter:
    """Batches finished spans and posts them from a daemon thread."""

    def __init__(self, base_url: str, api_key: str, batch_size: int = 256) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.batch_size = batch_size
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="flywheel-span-exporter", daemon=True)
        self.thread.start()

    def export(self, span: Span) -> None:
        self.queue.put(span.to_dict())

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while True:
                item = self.queue.get()
                batch = [] if item is None else [item]
                while len(batch) < self.batch_size:
                    try:
                        nxt = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is not None:
                        batch.append(nxt)
                if batch:
                    self._post(client, batch)
                for _ in range(len(batch) + (item is None)):
                    self.queue.task_done()

    def _post(self, client: httpx.Client, batch: list[dict[str, Any]]) -> None:
        try:
            response = client.post(
                f"{self.base_url}/api/spans",
                json={"spans": batch},
                headers={"Authorization": f"Bearer {self.api_key}"},
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("flywheel: could not export %d spans: %s", len(batch), exc)

    def flush(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.queue.put(None)
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)


_exporter: _Exporter | None = None
_exporter_lock = threading.Lock()


def configure(base_url: str | None = None, api_key: str | None = None) -> None:
    """Send spans to a Flywheel server (defaults: ``FLYWHEEL_BASE_URL``, ``FLYWHEEL_API_KEY``)."""
    global _exporter
    url = base_url or os.environ.get("FLYWHEEL_BASE_URL")
    key = api_key or os.environ.get("FLYWHEEL_API_KEY")
    with _exporter_lock:
        if _exporter is not None:
            _exporter.flush()
        _exporter = _Exporter(url, key) if url and key else None


def _get_exporter() -> _Exporter | None:
    global _exporter
    if _exporter is None and os.environ.get("FLYWHEEL_BASE_URL"):
        configure()
    return _exporter


def flush(timeout: float = 10.0) -> None:
    """Wait until every finished span has been sent."""
    if _exporter is not None:
        _exporter.flush(timeout)


atexit.register(flush)


def current_span() -> Span | None:
    """The innermost open span of this thread or task."""
    return _current.get()


def traceparent() -> str | None:
    """The W3C ``traceparent`` header value for the current span, to join gateway traces."""
    active = _current.get()
    if active is None:
        return None
    return f"00-{active.trace_id}-{active.span_id}-01"


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: str = "function",
    input: Any = None,
    attributes: dict[str, Any] | None = None,
) -> Iterator[Span]:
    """Record a span around a block; it nests under the current span, if any."""
    parent = _current.get()
    opened = Span(name=name, kind=kind, input=input, attributes=dict(attributes or {}))
    if parent is not None:
        opened.trace_id, opened.parent_id = parent.trace_id, parent.span_id
    token = _current.set(opened)
    try:
        yield opened
    except BaseException as exc:
        opened.record_error(exc)
        raise
    finally:
        _current.reset(token)
        opened.end_time = time.time()
        exporter = _get_exporter()
        if exporter is not None:
            exporter.export(opened)


def _call_input(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return {"args": args, "kwargs": kwargs}
    return dict(bound.arguments)


@overload
def trace(fn: F) -> F: ...
@overload
def trace(
    fn: None = None, *, name: str | None = None, kind: str = "function", capture: bool = True
) -> Callable[[F], F]: ...
def trace(
    fn: F | None = None, *, name: str | None = None, kind: str = "function", capture: bool = True
) -> F | Callable[[F], F]:
    """Decorate a function (sync or async) so each call is a span with its arguments and result."""

    def decorate(func: F) -> F:
        span_name = name or func.__qualname__

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with span(span_name, kind=kind) as opened:
                    if capture:
                        opened.input = _call_input(func, args, kwargs)
                    result = await func(*args, **kwargs)
                    if capture:
                        opened.output = result
                    return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with span(span_name, kind=kind) as opened:
                if capture:
                    opened.input = _call_input(func, args, kwargs)
                result = func(*args, **kwargs)
                if capture:
                    opened.output = result
                return result

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate
