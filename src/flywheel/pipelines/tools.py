"""Python tools a pipeline's ``tool`` step may call, by name.

Tools are registered with :func:`register_tool` (the built-ins below) or published by an
installed package as entry points of the group ``flywheel.pipeline_tools`` (``name =
"module:function"``), loaded once, the first time a tool is looked up. A tool gets the step's
rendered ``args`` as keyword arguments, may be sync (run in a worker thread) or async, and
returns a JSON-serialisable value.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any

log = logging.getLogger("flywheel.pipelines")

ToolFunction = Callable[..., Any]
ENTRY_POINT_GROUP = "flywheel.pipeline_tools"
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

_registry: dict[str, ToolFunction] = {}
_lock = threading.Lock()
_entry_points_loaded = False


class UnknownToolError(KeyError):
    """No tool of that name; the message lists the known names."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.message = f"unknown tool {name!r} (known: {', '.join(known) or 'none'})"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would show the message quoted, as a repr
        return self.message


def _add(name: str, function: ToolFunction) -> None:
    if not TOOL_NAME_PATTERN.match(name):
        raise ValueError(
            f"invalid tool name {name!r}: a letter or underscore, then letters, digits, "
            "'_', '.' or '-' (at most 64)"
        )
    if not callable(function):
        raise TypeError(f"tool {name!r} is not callable")
    existing = _registry.get(name)
    if existing is not None and existing is not function:
        raise ValueError(f"tool {name!r} is already registered")
    _registry[name] = function


def register_tool(name: str) -> Callable[[ToolFunction], ToolFunction]:
    """Decorator: make ``function`` callable from pipelines as ``python: NAME``.

    Registering another function under a taken name raises ``ValueError``.
    """

    def decorate(function: ToolFunction) -> ToolFunction:
        with _lock:
            _add(name, function)
        return function

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name in _registry:
                continue  # a registered tool wins over a plugin of the same name
            try:
                _add(point.name, point.load())
            except Exception:
                # One broken plugin must not take every pipeline down with it.
                log.exception("could not load pipeline tool %r (%s)", point.name, point.value)


def get_tool(name: str) -> ToolFunction:
    """The tool registered as ``name``; :class:`UnknownToolError` (a ``KeyError``) if none."""
    _load_entry_points()
    try:
        return _registry[name]
    except KeyError:
        raise UnknownToolError(name, tool_names()) from None


def tool_names() -> list[str]:
    """The sorted names of every available tool, plugins included."""
    _load_entry_points()
    return sorted(_registry)


@register_tool("word_count")
def word_count(text: str) -> int:
    """The number of whitespace-separated words in ``text``."""
    return len(str(text).split())


@register_tool("join")
def join(items: list[Any], sep: str = "\n") -> str:
    """``items`` as text, separated by ``sep``."""
    if isinstance(items, str | bytes) or not hasattr(items, "__iter__"):
        raise TypeError(f"join: items must be a list, got {type(items).__name__}")
    return sep.join(str(item) for item in items)


@register_tool("current_time")
def current_time() -> str:
    """The current UTC time in ISO 8601."""
    return datetime.now(UTC).isoformat()


__all__ = [
    "ENTRY_POINT_GROUP",
    "ToolFunction",
    "UnknownToolError",
    "get_tool",
    "register_tool",
    "tool_names",
]
