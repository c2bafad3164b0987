"""``flywheel``: run the server, chat through the gateway, browse traces and routes."""

from __future__ import annotations

import sys
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
projects_app = typer.Typer(help="Projects (works on the local database directly).")
users_app = typer.Typer(help="Users and their project roles (local database).")
audit_app = typer.Typer(help="The hash-chained audit log (local database).")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(projects_app, name="projects")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")

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


def _local_access() -> Any:
    """The access service over the local database (the operator's own machine)."""
    from flywheel.config import get_settings
    from flywheel.security import AccessService, ApiKeyStore
    from flywheel.security.audit import AuditLog
    from flywheel.store import Database

    db = Database(get_settings().resolved_database_url)
    db.migrate()
    keys = ApiKeyStore(db)
    return AccessService(db, keys, AuditLog(db))


def _operator(project: str = "default") -> Any:
    """The person at the terminal: an instance admin of the local database, acting in
    ``project``; audited as ``user:<login name>``."""
    import getpass

    from flywheel.security.rbac import ALL_PERMISSIONS, Principal

    return Principal(
        kind="user",
        id="cli",
        name=getpass.getuser(),
        project_id=project,
        role="admin",
        permissions=ALL_PERMISSIONS,
        instance_admin=True,
    )


def _access_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    from flywheel.security import AccessError

    try:
        return function(*args, **kwargs)
    except AccessError as exc:
        raise _fail(exc.message) from None


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label for the key.")] = "cli",
    project: Annotated[
        str | None, typer.Option(help="Project; omit for an instance-wide admin key.")
    ] = None,
    role: Annotated[str, typer.Option(help="viewer, reviewer, developer or admin.")] = "admin",
    scope: Annotated[str, typer.Option(help="gateway, feedback, read or admin.")] = "admin",
    allow: Annotated[
        list[str] | None, typer.Option(help="A route or model the key may call (repeat).")
    ] = None,
    expires_days: Annotated[float | None, typer.Option(help="Expire after N days.")] = None,
) -> None:
    """Create an API key in the local database and print it once."""
    access = _local_access()
    if project is None:
        raw, record = access.keys.create(name)
    else:
        _access_call(access.get_project, project)
        raw, record = _access_call(
            access.create_key,
            _operator(project),
            name,
            role=role,
            scope=scope,
            allowed_models=list(allow) if allow else None,
            expires_at=time.time() + expires_days * 86400 if expires_days else None,
        )
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
    for column in ("id", "name", "prefix", "project", "role", "scope", "created", "revoked"):
        table.add_column(column)
    for key in ApiKeyStore(db).list():
        table.add_row(
            key.id,
            key.name,
            key.prefix + "…",
            key.project_id or "(instance)",
            key.role,
            key.scope,
            _when(key.created_at),
            _when(key.revoked_at) if key.revoked_at else "",
        )
    console.print(table)


@projects_app.command("list")
def projects_list() -> None:
    """List projects."""
    access = _local_access()
    table = Table(title="Projects", header_style="bold")
    for column in ("name", "description", "limits", "created"):
        table.add_column(column)
    for project in access.list_projects(_operator()):
        limits = ", ".join(f"{k}={v}" for k, v in (project.limits or {}).items())
        table.add_row(project.name, project.description, limits, _when(project.created_at))
    console.print(table)


@projects_app.command("create")
def projects_create(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits, '-' and '_'.")],
    description: Annotated[str, typer.Option(help="What the project is for.")] = "",
) -> None:
    """Create a project."""
    access = _local_access()
    _access_call(access.create_project, name, _operator().actor, description)
    console.print(f"Created project [bold]{name}[/].")


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="The login name.")],
    admin: Annotated[bool, typer.Option("--admin", help="Instance admin.")] = False,
    password: Annotated[
        str | None,
        typer.Option(envvar="FLYWHEEL_NEW_PASSWORD", help="Asked for when omitted."),
    ] = None,
) -> None:
    """Create a user who logs in to the UI with a password."""
    access = _local_access()
    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    user = _access_call(access.create_user, username, password, _operator().actor, admin)
    console.print(f"Created user [bold]{user.username}[/] ({user.id}).")


@users_app.command("grant")
def users_grant(
    username: Annotated[str, typer.Argument(help="User name or id.")],
    project: Annotated[str, typer.Argument(help="Project name.")],
    role: Annotated[str, typer.Argument(help="viewer, reviewer, developer or admin.")],
) -> None:
    """Give a user a role in a project (or change it)."""
    access = _local_access()
    user = _access_call(access.find_user, username)
    _access_call(access.set_member, project, user.id, role, _operator().actor)
    console.print(f"[bold]{user.username}[/] is now {role} in project [bold]{project}[/].")


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit log's hash chain; exit 1 and name the first bad entry if broken."""
    result = _local_access().audit.verify()
    if not result.ok:
        raise _fail(f"audit log is NOT intact ({result.checked} entries checked): {result.problem}")
    console.print(f"audit log intact: {result.checked} entries, every hash matches")


@audit_app.command("export")
def audit_export(
    format: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File; default stdout.")
    ] = None,
) -> None:
    """Write the audit log (oldest first, with hashes) as JSON lines or CSV."""
    if format not in ("jsonl", "csv"):
        raise _fail("--format must be jsonl or csv")
    lines = _local_access().audit.export(format)
    with output.open("w", encoding="utf-8") if output else sys.stdout as out:
        for line in lines:
            out.write(line if line.endswith("\n") else line + "\n")


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
