"""What the CLI's command groups share: consoles, the server options and the SDK client."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="FLYWHEEL_BASE_URL", help="Server URL.")]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="FLYWHEEL_API_KEY", help="API key.")
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _fmt(value: Any) -> str:
    """A table cell: ``-`` for nothing, four significant digits for a float."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def when(timestamp: float | None) -> str:
    """A table cell for a time: local date and minute, ``-`` for none."""
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M") if timestamp else "-"


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


ProjectOption = Annotated[
    str | None,
    typer.Option("--project", envvar="FLYWHEEL_PROJECT", help="Project (instance keys)."),
]


def _client(url: str, api_key: str | None, project: str | None) -> Any:
    from flywheel.sdk import Client

    if not api_key:
        raise _fail("no API key: pass --api-key or set FLYWHEEL_API_KEY")
    return Client(url, api_key, project=project, cache_ttl=0)


def _sdk_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    from flywheel.sdk import FlywheelError

    try:
        return function(*args, **kwargs)
    except FlywheelError as exc:
        raise _fail(exc.message) from None
