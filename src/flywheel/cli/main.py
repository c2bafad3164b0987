"""``flywheel``: run the server, chat through the gateway, browse traces and routes."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from flywheel import __version__

app = typer.Typer(help="Flywheel: self-hosted LLMOps.", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="API keys (works on the local database directly).")
config_app = typer.Typer(help="The flywheel.yaml config file.")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")

console = Console()
err = Console(stderr=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="FLYWHEEL_BASE_URL", help="Server URL.")]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="FLYWHEEL_API_KEY", help="API key.")
]
DEFAULT_URL = "http://127.0.0.1:8000"


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def _api(url: str, api_key: str | None, path: str, params: dict[str, Any] | None = None) -> Any:
    if not api_key:
        raise _fail("no API key: pass --api-key or set FLYWHEEL_API_KEY")
    try:
        response = httpx.get(
            f"{url.rstrip('/')}{path}",
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach {url}: {exc}") from None
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise _fail(f"{response.status_code}: {message}")
    return response.json()


@app.command()
def version() -> None:
    """Print the Flywheel version."""
    console.print(f"flywheel {__version__}")


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="flywheel.yaml")] = None,
) -> None:
    """Start the server: UI, API and gateway on one port."""
    import uvicorn

    from flywheel.config import ConfigError, Settings, load_config
    from flywheel.server.app import create_app

    overrides: dict[str, Any] = {}
    if host:
        overrides["host"] = host
    if port:
        overrides["port"] = port
    if config:
        overrides["config_file"] = config
    settings = Settings(**overrides)
    try:
        load_config(settings.resolved_config_file)
    except ConfigError as exc:
        typer.echo("\n".join(exc.problems), err=True)
        raise typer.Exit(1) from None
    console.print(
        f"Flywheel {__version__}: http://{settings.host}:{settings.port} (home {settings.home_dir})"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=30,
    )


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="Your message.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Route or model.")] = "default",
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    stream: Annotated[bool, typer.Option(help="Stream tokens as they come.")] = True,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Send one message through the gateway and print the answer (streamed)."""
    import openai

    if not api_key:
        raise _fail("no API key: pass --api-key or set FLYWHEEL_API_KEY")
    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=api_key, max_retries=0)
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    extra: dict[str, Any] = {} if temperature is None else {"temperature": temperature}
    try:
        if stream:
            for chunk in client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, stream=True, **extra
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    console.print(chunk.choices[0].delta.content, end="", highlight=False)
            console.print()
        else:
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, **extra
            )
            console.print(response.choices[0].message.content or "", highlight=False)
    except openai.APIStatusError as exc:
        raise _fail(f"{exc.status_code}: {exc.message}") from None
    except openai.APIConnectionError:
        raise _fail(f"cannot reach {url}") from None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@app.command()
def traces(
    route: Annotated[str | None, typer.Option(help="Only this route.")] = None,
    status: Annotated[str | None, typer.Option(help="ok, error or cancelled.")] = None,
    since: Annotated[float | None, typer.Option(help="Only the last N minutes.")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 20,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """List recent traces."""
    params = {
        "route": route,
        "status": status,
        "limit": limit,
        "since": time.time() - since * 60 if since else None,
    }
    page = _api(url, api_key, "/api/traces", params)
    table = Table(title="Traces", header_style="bold")
    for column in (
        "time",
        "trace",
        "route",
        "model",
        "status",
        "latency ms",
        "ttft ms",
        "tokens",
        "cost $",
    ):
        table.add_column(
            column, justify="right" if column[0] in "ltc" and column != "trace" else "left"
        )
    for span in page["data"]:
        table.add_row(
            _when(span["start_time"]),
            span["trace_id"][:12],
            span["route"] or span["name"],
            span["model"] or "",
            span["status"] if span["status"] == "ok" else f"[red]{span['status']}[/]",
            f"{span['latency_ms']:.0f}" if span["latency_ms"] is not None else "",
            f"{span['ttft_ms']:.0f}" if span["ttft_ms"] is not None else "",
            str(span["total_tokens"] or ""),
            f"{span['cost']:.6f}" if span["cost"] else "",
        )
    console.print(table)


@app.command()
def routes(url: UrlOption = DEFAULT_URL, api_key: KeyOption = None) -> None:
    """List the routes (virtual models) and their targets."""
    data = _api(url, api_key, "/api/routes")["data"]
    table = Table(title="Routes", header_style="bold")
    for column in ("route", "targets (weight)", "fallbacks", "retries", "timeout s"):
        table.add_column(column)
    for route in data:
        targets = ", ".join(f"{t['model']} ({t['weight']:g})" for t in route["targets"])
        table.add_row(
            route["name"],
            targets,
            ", ".join(route["fallbacks"]) or "-",
            str(route["retry"]["attempts"]),
            f"{route['timeout']:g}",
        )
    console.print(table)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key.")] = "cli",
) -> None:
    """Create an admin API key in the local database and print it once."""
    from flywheel.config import get_settings
    from flywheel.security import ApiKeyStore
    from flywheel.store import Database

    settings = get_settings()
    db = Database(settings.resolved_database_url)
    db.migrate()
    raw, record = ApiKeyStore(db).create(name)
    console.print(
        f"Created key [bold]{record.name}[/] ({record.id}). Store it now; it is not shown again:"
    )
    console.print(raw, highlight=False)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys in the local database (prefixes only)."""
    from flywheel.config import get_settings
    from flywheel.security import ApiKeyStore
    from flywheel.store import Database

    db = Database(get_settings().resolved_database_url)
    db.migrate()
    table = Table(title="API keys", header_style="bold")
    for column in ("id", "name", "prefix", "role", "created", "revoked"):
        table.add_column(column)
    for key in ApiKeyStore(db).list():
        table.add_row(
            key.id,
            key.name,
            key.prefix + "…",
            key.role,
            _when(key.created_at),
            _when(key.revoked_at) if key.revoked_at else "",
        )
    console.print(table)


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Option("--file", "-f", help="The config file.")] = Path(
        "flywheel.yaml"
    ),
) -> None:
    """Validate a flywheel.yaml; errors name the file, the line and the problem."""
    from flywheel.config import ConfigError, load_config

    try:
        config = load_config(file)
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(problem, err=True)
        raise typer.Exit(1) from None
    console.print(
        f"{file}: OK ({len(config.providers)} providers, {len(config.models)} models, "
        f"{len(config.routes)} routes)"
    )
