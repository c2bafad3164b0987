"""``flywheel loop ROUTE`` (start the loop on a route, optionally following it live) and
``flywheel loops list|show|resume|cancel``, through the server's API.

Registered in the main CLI as ``app.command("loop")(loop_command)`` and
``app.add_typer(loops_app, name="loops")``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from flywheel.cli.common import (
    DEFAULT_URL,
    KeyOption,
    ProjectOption,
    UrlOption,
    _client,
    _sdk_call,
    console,
    when,
)
from flywheel.sdk.loops import STOPPED
from flywheel.sdk.loops import summarize_step as step_summary

loops_app = typer.Typer(
    help="`flywheel loop` runs: list them, show one's timeline, resume a failed one, cancel."
)

STATUS_STYLES = {
    "pending": "dim",
    "running": "cyan",
    "waiting": "yellow",
    "succeeded": "green",
    "failed": "red",
    "promoted": "green",
    "rolled_back": "red",
    "rejected": "red",
    "not_enough_data": "yellow",
    "gate_failed": "red",
    "cancelled": "dim",
}
# The flags a spec file's values give way to: option name -> where it goes in the spec.
FLAG_FIELDS = {
    "--method": ("method",),
    "--min-examples": ("min_examples",),
    "--canary-share": ("canary", "share"),
    "--min-samples": ("canary", "min_samples"),
}


def _styled(status: str) -> str:
    style = STATUS_STYLES.get(status, "")
    return f"[{style}]{status}[/]" if style else status


def _duration(step: dict[str, Any]) -> str:
    started, finished = step.get("started_at"), step.get("finished_at")
    if not started:
        return "-"
    seconds = (finished or time.time()) - started
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def timeline(loop: dict[str, Any]) -> Table:
    """The loop's steps in order as a table: status, job, timing, what each found."""
    table = Table(
        title=f"loop {loop['id']} on route {loop['route']}: {_styled(loop['status'])}"
        + (f" ({loop['reason']})" if loop.get("reason") else ""),
        title_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("step")
    table.add_column("status")
    table.add_column("job", no_wrap=True)
    table.add_column("tries", justify="right")
    table.add_column("time", justify="right")
    table.add_column("result")
    for position, step in enumerate(loop["steps"], 1):
        current = step["name"] == loop["step"] and loop["status"] in ("running", "waiting")
        table.add_row(
            str(position),
            f"[bold]{step['name']}[/]" if current else step["name"],
            _styled(step["status"]),
            step.get("job_id") or "-",
            str(step.get("attempts") or 0),
            _duration(step),
            step_summary(step),
        )
    return table


def _waits_for_approval(loop: dict[str, Any]) -> bool:
    approval = next(s for s in loop["steps"] if s["name"] == "approval")
    return loop["step"] == "approval" and approval["status"] == "waiting"


def _approval_help(client: Any, loop: dict[str, Any]) -> None:
    approval = next(s for s in loop["steps"] if s["name"] == "approval")
    result = approval.get("result") or {}
    approval_id = result.get("approval_id")
    author = None
    try:
        author = client.approvals.get(approval_id).get("author")
    except Exception:  # approvals:read may be missing; the id is what matters
        author = None
    console.print(
        f"The loop waits for approval [bold]{approval_id}[/]: {result.get('model')} → "
        f"'{result.get('label')}'."
    )
    console.print(
        "A reviewer or admin of the project (approvals:decide) "
        + (f"other than {author} " if author else "other than the version's author ")
        + f"approves it on the Approvals page (/approvals) or with "
        f"POST /api/approvals/{approval_id}/approve; the loop then runs the canary. "
        f"Follow it with `flywheel loops show {loop['id']}`."
    )


def follow(client: Any, loop: dict[str, Any], poll: float = 2.0) -> dict[str, Any]:
    """Show the timeline live until the loop ends, fails, or waits for an approval."""
    with Live(timeline(loop), console=console, refresh_per_second=4) as live:
        while loop["status"] not in STOPPED and not _waits_for_approval(loop):
            time.sleep(poll)
            loop = _sdk_call(client.loops.get, loop["id"])
            live.update(timeline(loop))
    if _waits_for_approval(loop):
        _approval_help(client, loop)
    elif loop["status"] == "failed":
        console.print(
            f"[red]failed at {loop['step']}[/]: {loop.get('reason') or ''}\n"
            f"Resume it with `flywheel loops resume {loop['id']}`."
        )
    return loop


# -- the spec -------------------------------------------------------------------------------


def _spec_problem(text: str, filename: str, loc: tuple[str | int, ...], message: str) -> str:
    from flywheel.config import describe_problem

    return describe_problem(text, filename, loc, message)


def _file_problem(problem: str) -> typer.Exit:
    # Plain text (no wrapping), as `flywheel apply` prints a config file's problems.
    typer.echo(problem, err=True)
    return typer.Exit(1)


def read_spec_file(path: Path) -> tuple[str, dict[str, Any]]:
    """The spec file's text and mapping; a bad file exits naming the file, line and problem."""
    import yaml

    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise _file_problem(f"{path}:0: cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise _file_problem(f"{path}:0: the file is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise _file_problem(f"{path}:{line}: invalid YAML: {exc.problem or exc}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise _file_problem(f"{path}:1: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _file_problem(f"{path}:1: the top level must be a mapping of loop settings")
    return text, data


def build_spec(route: str, flags: dict[str, Any], spec_file: Path | None) -> dict[str, Any]:
    """The body of ``POST /api/loops``: the spec file (if any) with the given flags on top,
    checked here so a problem in the file names its line."""
    from pydantic import ValidationError

    from flywheel.loop import LoopSpec

    text, body = read_spec_file(spec_file) if spec_file is not None else ("", {})
    body["route"] = route
    given: set[tuple[str, ...]] = set()
    for option, value in flags.items():
        if value is None:
            continue
        where = FLAG_FIELDS[option]
        given.add(where)
        if len(where) == 1:
            body[where[0]] = value
        else:
            section = body.get(where[0])
            body[where[0]] = {**(section if isinstance(section, dict) else {}), where[1]: value}
    if spec_file is None:
        return body  # the server names the field at fault
    try:
        LoopSpec.model_validate(body)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            flag = next((o for o, w in FLAG_FIELDS.items() if loc[: len(w)] == w), None)
            if flag is not None and FLAG_FIELDS[flag] in given:
                problems.append(f"{flag}: {message}")
            elif loc == ("route",):
                problems.append(f"ROUTE: {message}")
            else:
                problems.append(_spec_problem(text, str(spec_file), loc, message))
        for problem in problems:
            typer.echo(problem, err=True)
        raise typer.Exit(1) from None
    return body


# -- commands -------------------------------------------------------------------------------


def loop_command(
    route: Annotated[str, typer.Argument(help="The route whose bad answers to learn from.")],
    method: Annotated[
        str | None, typer.Option("--method", help="sft (default) or dpo (chosen/rejected pairs).")
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option(
            "--spec",
            help="A YAML (or JSON) file with any loop settings (gate, canary, train, judge…); "
            "the flags override it.",
        ),
    ] = None,
    min_examples: Annotated[
        int | None,
        typer.Option("--min-examples", help="Fewest corrected bad answers to go on with."),
    ] = None,
    canary_share: Annotated[
        float | None,
        typer.Option("--canary-share", help="The candidate's share of the route's traffic."),
    ] = None,
    min_samples: Annotated[
        int | None,
        typer.Option("--min-samples", help="Rated calls before the canary's test may decide."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="Follow the loop live until it ends, fails or waits for an approval.",
        ),
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Start the loop on ROUTE: its bad answers and their corrections → a dataset version →
    LoRA SFT or DPO → a registered model → an eval gate against production → an approval →
    a canary experiment → promoted or rolled back. Prints the loop's id."""
    flags = {
        "--method": method,
        "--min-examples": min_examples,
        "--canary-share": canary_share,
        "--min-samples": min_samples,
    }
    body = build_spec(route, flags, spec)
    with _client(url, api_key, project) as client:
        loop = _sdk_call(client.loops.start, **body)
        console.print(f"loop [bold]{loop['id']}[/] started on route {loop['route']}")
        if not wait:
            return
        final = follow(client, loop)
    if final["status"] in ("failed", "rolled_back", "rejected", "gate_failed"):
        raise typer.Exit(1)


@loops_app.command("list")
def list_loops(
    status: Annotated[str | None, typer.Option("--status")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """The project's loops, newest first."""
    with _client(url, api_key, project) as client:
        rows = _sdk_call(client.loops.list, status=status)
    table = Table()
    # The whole id: it is what `show`, `resume` and `cancel` take.
    table.add_column("id", no_wrap=True, min_width=32)
    for column in ("route", "status", "step", "method", "started", "by", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["id"],
            row["route"],
            _styled(row["status"]),
            row["step"],
            (row.get("spec") or {}).get("method", "-"),
            when(row["created_at"]),
            row["created_by"],
            row.get("reason") or "",
        )
    console.print(table)


@loops_app.command("show")
def show(
    loop_id: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="The whole record as JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """One loop as a timeline: each step's status, job, tries, time and result."""
    with _client(url, api_key, project) as client:
        found = _sdk_call(client.loops.get, loop_id)
    if as_json:
        console.print_json(json.dumps(found, default=str))
        return
    console.print(timeline(found))
    console.print(
        f"started {when(found['created_at'])} by {found['created_by']}"
        + (f"; ended {when(found['finished_at'])}" if found.get("finished_at") else "")
        + f"; {sum(s['status'] == 'succeeded' for s in found['steps'])} of "
        f"{len(found['steps'])} steps done"
    )


@loops_app.command("resume")
def resume(
    loop_id: Annotated[str, typer.Argument()],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Run a failed loop's failed step again (everything before it is kept)."""
    with _client(url, api_key, project) as client:
        found = _sdk_call(client.loops.resume, loop_id)
    console.print(f"loop {found['id']} {found['status']} again at step {found['step']}")


@loops_app.command("cancel")
def cancel(
    loop_id: Annotated[str, typer.Argument()],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Cancel a loop with its running job, pending approval and running canary."""
    with _client(url, api_key, project) as client:
        found = _sdk_call(client.loops.cancel, loop_id)
    console.print(f"loop {found['id']} {found['status']} at step {found['step']}")
