"""``flywheel experiments``: canary and shadow experiments on routes, through the server's
API.

Registered in the main CLI as ``app.add_typer(experiments_app, name="experiments")``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flywheel.cli.common import (
    DEFAULT_URL,
    KeyOption,
    ProjectOption,
    UrlOption,
    _client,
    _fail,
    _fmt,
    _sdk_call,
    console,
    when,
)

experiments_app = typer.Typer(
    help="Canary and shadow experiments on routes: sticky splits, sequential tests, "
    "auto-promotion (canary) or a recommendation (shadow)."
)


@experiments_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for the experiment.")],
    route: Annotated[str, typer.Option("--route", help="The route to experiment on.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="The candidate's prompt version NAME@VERSION.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="The candidate's catalog model.")
    ] = None,
    share: Annotated[
        float, typer.Option("--share", help="The candidate's share of the traffic.")
    ] = 0.1,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="canary (the candidate serves its share) or shadow (the control serves "
            "everything; the candidate's share is mirrored to it and judged).",
        ),
    ] = "canary",
    unit: Annotated[
        str, typer.Option("--unit", help="Sticky by: user, session or header:<name>.")
    ] = "user",
    metric: Annotated[
        str, typer.Option("--metric", help="feedback or judge:<score name>.")
    ] = "feedback",
    lower_is_better: Annotated[
        bool, typer.Option("--lower-is-better", help="The metric is better lower.")
    ] = False,
    min_samples: Annotated[int, typer.Option("--min-samples")] = 100,
    alpha: Annotated[float, typer.Option("--alpha")] = 0.05,
    tau: Annotated[float, typer.Option("--tau")] = 0.1,
    spec: Annotated[
        Path | None,
        typer.Option("--spec", help="A JSON file with the whole body (variants, guardrails…)."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Start an experiment: the route as configured (control) against a candidate prompt
    version and/or model, or any body given with --spec."""
    if spec is not None:
        try:
            body = json.loads(spec.read_text())
        except (OSError, ValueError) as exc:
            raise _fail(f"cannot read {spec}: {exc}") from None
        if not isinstance(body, dict):
            raise _fail(f"{spec} must hold a JSON object")
        body.setdefault("name", name)
        body.setdefault("route", route)
        body.setdefault("mode", mode)
    else:
        if prompt is None and model is None:
            raise _fail("give the candidate a --prompt version, a --model, or both (or --spec)")
        candidate = {"name": "candidate", "share": share, "prompt": prompt, "model": model}
        body = {
            "name": name,
            "route": route,
            "variants": [
                {"name": "control", "share": round(1 - share, 9)},
                {k: v for k, v in candidate.items() if v is not None},
            ],
            "mode": mode,
            "unit": unit,
            "metric": {"source": metric, "higher_is_better": not lower_is_better},
            "min_samples": min_samples,
            "alpha": alpha,
            "tau": tau,
        }
    with _client(url, api_key, project) as client:
        found = _sdk_call(client.experiments.create, **body)
    shadow = " (shadow)" if found.get("mode") == "shadow" else ""
    console.print(f"experiment [bold]{found['id']}[/] running on route {found['route']}{shadow}")


@experiments_app.command("list")
def list_experiments(
    status: Annotated[str | None, typer.Option("--status")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """The project's experiments, newest first."""
    with _client(url, api_key, project) as client:
        rows = _sdk_call(client.experiments.list, status=status)
    table = Table()
    # The whole id: it is what `show` and `stop` take.
    table.add_column("id", no_wrap=True, min_width=32)
    for column in ("name", "route", "mode", "status", "variants", "started", "reason"):
        table.add_column(column, no_wrap=column in ("mode", "status"))
    for row in rows:
        variants = ", ".join(f"{v['name']} {v['share']:.0%}" for v in row["variants"])
        table.add_row(
            row["id"],
            row["name"],
            row["route"],
            row.get("mode") or "canary",
            row["status"],
            variants,
            when(row["created_at"]),
            row.get("reason") or "",
        )
    console.print(table)


@experiments_app.command("show")
def show(
    experiment_id: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json", help="The whole record as JSON.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """One experiment: its variants' latest numbers and its decision."""
    with _client(url, api_key, project) as client:
        found = _sdk_call(client.experiments.get, experiment_id)
    if as_json:
        console.print_json(json.dumps(found, default=str))
        return
    console.print(
        f"[bold]{found['name']}[/] ({found.get('mode') or 'canary'}) on route "
        f"{found['route']}: {found['status']}"
        + (f" ({found['reason']})" if found.get("reason") else "")
    )
    outcome = found.get("outcome") or {}
    if outcome.get("action") in ("recommend", "reject"):
        console.print(f"shadow outcome: {outcome['action']} '{outcome.get('variant')}'")
    looks = found.get("looks") or []
    last = looks[-1] if looks else {}
    table = Table("variant", "share", "prompt", "model", "calls", "rated", "mean", "errors")
    for variant in found["variants"]:
        arm = (last.get("arms") or {}).get(variant["name"]) or {}
        primary, errors = arm.get("primary") or {}, arm.get("error") or {}
        mean = primary["total"] / primary["n"] if primary.get("n") else None
        error_rate = errors["total"] / errors["n"] if errors.get("n") else None
        table.add_row(
            variant["name"] + (" (control)" if variant["name"] == found["control"] else ""),
            f"{variant['share']:.0%}",
            variant.get("prompt") or "-",
            variant.get("model") or "-",
            str(errors.get("n") or 0),
            str(primary.get("n") or 0),
            _fmt(mean),
            "-" if error_rate is None else f"{error_rate:.1%}",
        )
    console.print(table)
    if last:
        console.print(
            f"{len(looks)} looks; last p-value {_fmt(last['p_value'])}, "
            f"difference in [{_fmt(last['ci_low'])}, {_fmt(last['ci_high'])}]: {last['decision']}"
        )


@experiments_app.command("stop")
def stop(
    experiment_id: Annotated[str, typer.Argument()],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Stop a running experiment: the route serves as configured; nothing is promoted."""
    with _client(url, api_key, project) as client:
        found = _sdk_call(client.experiments.stop, experiment_id)
    console.print(f"experiment {found['id']} {found['status']}")
