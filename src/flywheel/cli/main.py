"""``flywheel``: run the server, chat through the gateway, browse traces and routes."""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from flywheel import __version__
from flywheel.cli.cache import cache_app
from flywheel.cli.common import (
    DEFAULT_URL,
    KeyOption,
    ProjectOption,
    UrlOption,
    _client,
    _fail,
    _sdk_call,
    console,
    err,
)
from flywheel.cli.evals import datasets_app, eval_app, feedback_app
from flywheel.cli.experiments import experiments_app
from flywheel.cli.jobs import jobs_app, models_app, runs_app, step_command, tune_app
from flywheel.cli.loops import loop_command, loops_app
from flywheel.cli.monitor import alerts_app, guards_app, monitor_app
from flywheel.cli.rag import kb_app, pipelines_app

app = typer.Typer(help="Flywheel: self-hosted LLMOps.", no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="API keys (works on the local database directly).")
config_app = typer.Typer(help="The flywheel.yaml config file.")
projects_app = typer.Typer(help="Projects (works on the local database directly).")
users_app = typer.Typer(help="Users and their project roles (local database).")
audit_app = typer.Typer(help="The hash-chained audit log (local database).")
secrets_app = typer.Typer(help="Encrypted secrets and the master key (local database).")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(projects_app, name="projects")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.add_typer(secrets_app, name="secrets")
app.add_typer(datasets_app, name="datasets")
app.add_typer(feedback_app, name="feedback")
app.add_typer(eval_app, name="eval")
app.add_typer(monitor_app, name="monitor")
app.add_typer(guards_app, name="guards")
app.add_typer(alerts_app, name="alerts")
app.add_typer(kb_app, name="kb")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(jobs_app, name="jobs")
app.add_typer(runs_app, name="runs")
app.add_typer(tune_app, name="tune")
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")
app.add_typer(experiments_app, name="experiments")
app.add_typer(loops_app, name="loops")
app.command("loop")(loop_command)
for _step in ("merge", "quantize", "prune"):
    app.command(_step)(step_command(_step))


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
        targets = ", ".join(
            f"{t['model'] or 'prompt:' + t['prompt']} ({t['weight']:g})" for t in route["targets"]
        )
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


# -- prompts and config as code (through the server's API, with the SDK) --------------------

prompts_app = typer.Typer(help="Versioned prompts (through the server's API).")
app.add_typer(prompts_app, name="prompts")


def _parse_ref(ref: str) -> tuple[str, str | int | None]:
    from flywheel.errors import ServiceError
    from flywheel.prompts.registry import parse_ref

    try:
        return parse_ref(ref)
    except ServiceError as exc:
        raise _fail(exc.message) from None


def _parse_vars(pairs: list[str]) -> dict[str, Any]:
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise _fail(f"--var '{pair}': expected NAME=VALUE")
        try:  # JSON values (numbers, lists) when they parse, else the text itself
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


@prompts_app.command("list")
def prompts_list(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, project: ProjectOption = None
) -> None:
    """Prompts of the project with their latest version and labels."""
    with _client(url, api_key, project) as client:
        rows = _sdk_call(client.prompts.list)
    table = Table(title="Prompts", header_style="bold")
    for column in ("name", "latest", "labels", "created by"):
        table.add_column(column)
    for row in rows:
        labels = ", ".join(f"{k}→v{v}" for k, v in sorted(row["labels"].items())) or "-"
        table.add_row(row["name"], f"v{row['latest_version']}", labels, row["created_by"])
    console.print(table)


@prompts_app.command("show")
def prompts_show(
    name: Annotated[str, typer.Argument(help="NAME, NAME@LABEL or NAME@VERSION.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """One version: template, variables, model, params, labels."""
    import json

    prompt_name, selector = _parse_ref(name)
    with _client(url, api_key, project) as client:
        label = selector if isinstance(selector, str) else None
        version = selector if isinstance(selector, int) else None
        prompt = _sdk_call(client.prompts.get, prompt_name, label=label, version=version)
    console.print(
        f"[bold]{prompt.name}[/] v{prompt.version}  labels: {', '.join(prompt.labels) or '-'}\n"
        f"model: {prompt.model or '(default)'}  params: {json.dumps(prompt.params)}\n"
        f"by {prompt.author} at {_when(prompt.created_at)}: {prompt.message or '-'}"
    )
    if isinstance(prompt.template, str):
        console.print(prompt.template, markup=False, highlight=False)
    else:
        for message in prompt.template:
            console.print(f"[bold][{message['role']}][/]")
            console.print(message["content"], markup=False, highlight=False)


@prompts_app.command("diff")
def prompts_diff(
    name: str,
    old: Annotated[int, typer.Argument(help="From version.")],
    new: Annotated[int, typer.Argument(help="To version.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """A unified diff of two versions' templates, and their changed fields."""
    with _client(url, api_key, project) as client:
        diff = _sdk_call(client.prompts.diff, name, old, new)
    typer.echo(diff["template"] or "(templates are identical)")
    for field_name, (before, after) in diff["changes"].items():
        typer.echo(f"{field_name}: {before!r} -> {after!r}")


@prompts_app.command("create")
def prompts_create(
    name: str,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Template file (.txt, or .yaml/.json chat).")
    ] = None,
    template: Annotated[str | None, typer.Option("--template", "-t", help="Template text.")] = None,
    model: Annotated[str | None, typer.Option(help="Default route or model.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Temperature.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens to generate.")] = None,
    message: Annotated[str, typer.Option("--message", "-m", help="Commit message.")] = "",
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="Label it.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Store a new version from --template text or a --file (YAML/JSON list = chat)."""
    if (file is None) == (template is None):
        raise _fail("pass exactly one of --template and --file")
    content: Any = template
    if file is not None:
        try:
            text = file.read_text("utf-8")
        except OSError as exc:
            raise _fail(f"{file}: {exc.strerror}") from None
        content = text
        if file.suffix in (".yaml", ".yml", ".json"):
            import yaml

            try:
                content = yaml.safe_load(text)
            except yaml.MarkedYAMLError as exc:
                line = exc.problem_mark.line + 1 if exc.problem_mark else 1
                raise _fail(f"{file}:{line}: invalid YAML: {exc.problem}") from None
    params = {k: v for k, v in {"temperature": temperature, "max_tokens": max_tokens}.items()}
    with _client(url, api_key, project) as client:
        prompt = _sdk_call(
            client.prompts.create,
            name,
            content,
            model=model,
            params={k: v for k, v in params.items() if v is not None},
            message=message,
            labels=label or [],
        )
    console.print(f"{prompt.name} v{prompt.version} created")


@prompts_app.command("label")
def prompts_label(
    name: str,
    label: str,
    version: int,
    request: Annotated[
        bool, typer.Option("--request", help="Request approval (protected labels).")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Point LABEL at VERSION (rollback: point it back); --request asks for approval."""
    with _client(url, api_key, project) as client:
        if request:
            approval = _sdk_call(client.prompts.request_approval, name, version, label=label)
            console.print(f"approval {approval['id']} requested: {name}@{version} → {label}")
            return
        _sdk_call(client.prompts.set_label, name, label, version)
    console.print(f"{name}: {label} → v{version}")


@prompts_app.command("render")
def prompts_render(
    name: Annotated[str, typer.Argument(help="NAME, NAME@LABEL or NAME@VERSION.")],
    var: Annotated[list[str] | None, typer.Option("--var", help="NAME=VALUE (repeat).")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Render a version with variables (nothing is called)."""
    prompt_name, selector = _parse_ref(name)
    variables = _parse_vars(var or [])
    with _client(url, api_key, project) as client:
        label = selector if isinstance(selector, str) else None
        version = selector if isinstance(selector, int) else None
        prompt = _sdk_call(client.prompts.get, prompt_name, label=label, version=version)
        messages = _sdk_call(prompt.messages, **variables)
    for message in messages:
        console.print(f"[bold][{message['role']}][/]")
        console.print(message["content"], markup=False, highlight=False)


@prompts_app.command("optimize")
def prompts_optimize(
    name: str,
    dataset: Annotated[str, typer.Option(help="Dataset NAME or NAME@VERSION to score on.")],
    scorer: Annotated[str, typer.Option(help="Scorer (e.g. exact_match, contains).")],
    variants: Annotated[int, typer.Option(help="Variants proposed per round.")] = 3,
    rounds: Annotated[int, typer.Option(help="Rounds of proposals.")] = 1,
    proposer: Annotated[str, typer.Option(help="Route or model that proposes.")] = "default",
    base: Annotated[
        str | None, typer.Option(help="Version or label to improve (default: latest).")
    ] = None,
    instructions: Annotated[
        str | None, typer.Option(help="Extra guidance for the proposer.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job.")] = False,
    logs: Annotated[bool, typer.Option("--logs", help="With --wait: print its log.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Have an LLM propose better templates for NAME, score them on a dataset, and store
    the best one that beats the current version as a new version (no label moves)."""
    from flywheel.cli.jobs import follow

    with _client(url, api_key, project) as client:
        job = _sdk_call(
            client.prompts.optimize,
            name,
            dataset=dataset,
            scorer=scorer,
            variants=variants,
            rounds=rounds,
            proposer=proposer,
            base=base,
            instructions=instructions,
        )
        console.print(f"job {job['id']} queued (prompt.optimize)")
        if not wait:
            return
        final = follow(client, job, logs=logs)
    _print_optimize(final.get("result") or {})


def _print_optimize(result: dict[str, Any]) -> None:
    """The comparison table of a prompt.optimize job's result and its outcome."""
    from flywheel.cli.common import _fmt

    scorer = result.get("scorer", "score")
    table = Table("candidate", scorer, "95% CI", "delta", "p", "W/T/L", "")
    base = result.get("baseline") or {}
    if base:
        table.add_row(
            base.get("name", "baseline"),
            _fmt(base.get("mean")),
            f"[{_fmt(base.get('low'))}, {_fmt(base.get('high'))}]",
            "",
            "",
            "",
            "",
        )
    for row in result.get("variants") or []:
        paired = row.get("comparison") or {}
        table.add_row(
            row["name"],
            _fmt(row.get("mean")),
            f"[{_fmt(row.get('low'))}, {_fmt(row.get('high'))}]",
            _fmt(paired.get("delta")),
            _fmt(paired.get("p_value")),
            f"{paired.get('wins')}/{paired.get('ties')}/{paired.get('losses')}",
            "[green]beats baseline[/]" if row.get("beats_baseline") else "",
        )
    console.print(table)
    for dropped in result.get("dropped") or []:
        console.print(f"{dropped['name']} dropped: {dropped['reason']}", markup=False)
    if result.get("new_version") is not None:
        console.print(
            f"{result['prompt']} v{result['new_version']} created from {result.get('best')} "
            "(no label moved)"
        )
    else:
        console.print("no variant beat the baseline: no version created")


@app.command("apply")
def apply_command(
    file: Annotated[Path, typer.Option("--file", "-f", help="The config file.")] = Path(
        "flywheel.yaml"
    ),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    bypass_approvals: Annotated[
        bool,
        typer.Option("--bypass-approvals", help="Instance admins: move protected labels now."),
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Print the plan for a flywheel.yaml (create/update/unchanged), then apply it."""
    from flywheel.config import ConfigError, load_config_text

    try:
        text = file.read_text("utf-8")
    except OSError as exc:
        raise _fail(f"{file}:0: cannot read the file: {exc.strerror}") from None
    try:  # the file's own errors, with lines, before anything is sent
        load_config_text(text, str(file))
    except ConfigError as exc:
        for problem in exc.problems:
            typer.echo(problem, err=True)
        raise typer.Exit(1) from None
    with _client(url, api_key, project) as client:
        if dry_run:
            changes = _sdk_call(client.config.plan, text, str(file))
        else:
            result = _sdk_call(
                client.config.apply, text, str(file), bypass_approvals=bypass_approvals
            )
            changes = result["changes"]
    colours = {"create": "green", "update": "yellow", "delete": "red", "approval": "magenta"}
    for change in changes:
        action = change["action"]
        colour = colours.get(action, "dim")
        detail = f" ({change['detail']})" if change["detail"] else ""
        console.print(f"[{colour}]{action:>9}[/] {change['kind']} {change['name']}{detail}")
    if dry_run:
        console.print("dry run: nothing applied")
        return
    counts = {a: sum(c["action"] == a for c in changes) for a in ("create", "update", "delete")}
    summary = ", ".join(f"{n} {a}d" if a != "create" else f"{n} created" for a, n in counts.items())
    console.print(f"applied: {summary}; config revision {result['revision'] or 'unchanged'}")
    for approval in result["approvals"]:
        console.print(f"approval {approval} requested (protected label)")


@app.command("export")
def export_command(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Write the running config and the project's prompts as a flywheel.yaml."""
    with _client(url, api_key, project) as client:
        text = _sdk_call(client.config.export)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, "utf-8")
        err.print(f"wrote {output}")


@secrets_app.command("rotate-master-key")
def secrets_rotate_master_key() -> None:
    """Re-encrypt every stored secret under a new master key, in one transaction.

    With the key in <home>/master.key, the file is replaced (the old key is kept as
    master.key.old until you delete it). With FLYWHEEL_MASTER_KEY, the new key is printed:
    set it before restarting the servers. Run it with the servers stopped.
    """
    import base64
    import os
    import secrets as random

    from flywheel.config import get_settings
    from flywheel.security.audit import AuditLog
    from flywheel.security.secrets import (
        MasterKeyError,
        SecretBox,
        SecretStore,
        key_id_of,
        load_master_key,
    )
    from flywheel.store import Database

    settings = get_settings()
    home = settings.home_dir
    from_env = settings.master_key.get_secret_value() if settings.master_key else None
    try:
        old_key = load_master_key(home, from_env)
    except MasterKeyError as exc:
        raise _fail(str(exc)) from None
    db = Database(settings.resolved_database_url)
    db.migrate()
    new_key = random.token_bytes(32)
    encoded = base64.urlsafe_b64encode(new_key).decode()
    key_file = home / "master.key"
    if from_env is None:
        # The new key is on disk before any secret depends on it.
        staged = home / "master.key.new"
        staged.touch(mode=0o600)
        staged.write_text(encoded + "\n")
    store = SecretStore(db, SecretBox(old_key))
    count = store.rotate(SecretBox(new_key))
    AuditLog(db).record(
        actor=_operator().actor,
        action="secrets.rotate_master_key",
        resource_type="master_key",
        before={"key_id": key_id_of(old_key)},
        after={"key_id": key_id_of(new_key), "secrets": count},
    )
    if from_env is None:
        os.replace(key_file, home / "master.key.old")
        os.replace(home / "master.key.new", key_file)
        console.print(f"{count} secrets re-encrypted; new key in {key_file} (old: master.key.old)")
    else:
        console.print(f"{count} secrets re-encrypted. Set FLYWHEEL_MASTER_KEY={encoded}")
