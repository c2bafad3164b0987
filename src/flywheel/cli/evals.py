"""``flywheel datasets``, ``flywheel feedback`` and ``flywheel eval`` (through the server's
API, with the SDK). ``flywheel eval gate`` is the CI gate: exit 1 when the candidate misses
a threshold or regresses significantly against the baseline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
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
    err,
)
from flywheel.cli.jobs import follow

datasets_app = typer.Typer(help="Versioned datasets (through the server's API).")
feedback_app = typer.Typer(help="Feedback on traces, exported as training data.")
eval_app = typer.Typer(help="Eval runs, comparisons and the CI gate.")
RUN_PREFIX = "run:"


# -- datasets -------------------------------------------------------------------------------


@datasets_app.command("list")
def datasets_list(
    url: UrlOption = DEFAULT_URL, api_key: KeyOption = None, project: ProjectOption = None
) -> None:
    """Datasets of the project with their newest version."""
    with _client(url, api_key, project) as client:
        rows = _sdk_call(client.datasets.list)
    table = Table("name", "version", "items", "hash", "message")
    for row in rows:
        latest = row["latest"]
        table.add_row(
            row["name"],
            str(latest["version"]),
            str(latest["items"]),
            latest["content_hash"][:12],
            latest["message"],
        )
    console.print(table)


@datasets_app.command("import")
def datasets_import(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    file: Annotated[Path, typer.Argument(help="A .jsonl, .csv or .parquet file.")],
    message: Annotated[str, typer.Option("--message", "-m", help="Version message.")] = "",
    test_fraction: Annotated[float, typer.Option(help="Share of items in the test split.")] = 0.2,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Import a file as a new version (nothing new when the content is unchanged)."""
    if not file.is_file():
        raise _fail(f"{file}:0: no such file")
    with _client(url, api_key, project) as client:
        view = _sdk_call(
            client.datasets.import_file, name, file, message=message, test_fraction=test_fraction
        )
    state = "created" if view["created"] else "unchanged, still"
    console.print(f"{name}: {state} version {view['version']} ({view['items']} items)")


@datasets_app.command("export")
def datasets_export(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSONL file.")] = None,
    version: Annotated[int | None, typer.Option(help="Version (default: newest).")] = None,
    split: Annotated[str | None, typer.Option(help="train or test.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Write a version's items as JSONL."""
    with _client(url, api_key, project) as client:
        items = _sdk_call(client.datasets.export, name, version, split=split)
    _write_jsonl(items, output)


def _write_jsonl(rows: list[dict[str, Any]], output: Path | None) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text, "utf-8")
        err.print(f"wrote {len(rows)} rows to {output}")


@datasets_app.command("from-traces")
def datasets_from_traces(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    route: Annotated[str | None, typer.Option(help="Only this route.")] = None,
    since_hours: Annotated[float | None, typer.Option(help="Only the last N hours.")] = None,
    min_rating: Annotated[float | None, typer.Option(help="Newest rating at least (0-1).")] = None,
    with_correction: Annotated[bool, typer.Option(help="Only corrected traces.")] = False,
    expected: Annotated[
        str, typer.Option(help="correction, output or correction_or_output.")
    ] = "correction_or_output",
    limit: Annotated[int, typer.Option(help="At most this many traces.")] = 1000,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """A new version from chat traces (and their feedback)."""
    import time

    since = time.time() - since_hours * 3600 if since_hours is not None else None
    with _client(url, api_key, project) as client:
        view = _sdk_call(
            client.datasets.from_traces,
            name,
            route=route,
            since=since,
            min_rating=min_rating,
            with_correction=with_correction,
            expected=expected,
            limit=limit,
        )
    console.print(f"{name}: version {view['version']} ({view['items']} items)")


@datasets_app.command("profile")
def datasets_profile(
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    version: Annotated[int | None, typer.Option(help="Version (default: newest).")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Data quality of a version: duplicates, empty and overlong items, lengths, PII."""
    with _client(url, api_key, project) as client:
        report = _sdk_call(client.datasets.profile, name, version)
    tokens = report["tokens"]["input"]
    console.print(f"{name}@{report['version']['version']}: {report['items']} items")
    console.print(f"  exact duplicate groups: {len(report['exact_duplicates'])}")
    console.print(f"  near-duplicate pairs:   {len(report['near_duplicates'])}")
    console.print(f"  empty inputs:           {len(report['empty'])}")
    console.print(f"  overlong inputs:        {len(report['overlong'])}")
    console.print(
        f"  input tokens: mean {_fmt(tokens['mean'])}, p95 {_fmt(tokens['p95'])}, "
        f"max {_fmt(tokens['max'])}"
    )
    by_kind = ", ".join(f"{k} {n}" for k, n in report["pii"]["by_kind"].items()) or "none"
    console.print(f"  PII: {report['pii']['items']} items ({by_kind})")


# -- feedback -------------------------------------------------------------------------------


@feedback_app.command("export")
def feedback_export(
    format: Annotated[str, typer.Option("--format", help="sft or dpo.")] = "sft",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSONL file.")] = None,
    min_rating: Annotated[float, typer.Option(help="SFT: newest rating at least.")] = 0.75,
    margin: Annotated[float, typer.Option(help="DPO: rating gap between answers.")] = 0.5,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Feedback as SFT examples (chat format) or DPO pairs (prompt, chosen, rejected)."""
    if format not in ("sft", "dpo"):
        raise _fail("--format must be sft or dpo")
    with _client(url, api_key, project) as client:
        if format == "sft":
            rows = _sdk_call(client.feedback.export_sft, min_rating)
        else:
            rows = _sdk_call(client.feedback.export_dpo, margin)
    _write_jsonl(rows, output)


# -- evals ----------------------------------------------------------------------------------


def _run_with_progress(client: Any, suite: str, target: str | None) -> dict[str, Any]:
    """Start a run and follow it with a progress bar; a failed run is an error."""
    label = target or suite
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        bar = progress.add_task(label, total=None, note="")

        def show(run: dict[str, Any]) -> None:
            note = f"cached {run['cache_hits']}" if run["cache_hits"] else ""
            if run["failed"]:
                note += f" failed {run['failed']}"
            if run.get("phase") == "scoring":
                note += " scoring"
            progress.update(
                bar,
                total=run["total"],
                completed=run["done"],
                description=run["resolved_target"],
                note=note.strip(),
            )

        run: dict[str, Any] = _sdk_call(
            client.evals.run, suite, target=target, wait=True, on_progress=show
        )
    if run["status"] != "completed":
        raise _fail(f"run {run['id']} {run['status']}: {run['error']}")
    return run


def _print_summary(run: dict[str, Any]) -> None:
    table = Table("scorer", "mean", "95% CI", "n", "threshold", "")
    for name, info in run["summary"]["scorers"].items():
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: ""}[info["passed"]]
        table.add_row(
            name,
            _fmt(info["mean"]),
            f"[{_fmt(info['low'])}, {_fmt(info['high'])}]",
            str(info["n"]),
            _fmt(info["threshold"]),
            verdict,
        )
    console.print(
        f"run {run['id']}: {run['resolved_target']} on {run['dataset']}@{run['dataset_version']}"
    )
    console.print(table)


@eval_app.command("run")
def eval_run(
    suite: Annotated[str, typer.Option("--suite", "-s", help="A stored suite's name.")],
    target: Annotated[str | None, typer.Option(help="Override the suite's target.")] = None,
    background: Annotated[
        bool,
        typer.Option("--background", help="Run it as an eval.run job and print the job's id."),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="With --background: follow the job.")
    ] = False,
    logs: Annotated[
        bool, typer.Option("--logs/--no-logs", help="With --wait: print the job's log.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Run a suite, with a progress bar; exit 1 when a threshold fails. With --background a
    job runs it (--suite may then be NAME@N: version N of the suite's dataset)."""
    with _client(url, api_key, project) as client:
        if background:
            _run_in_background(client, suite, target, wait=wait, logs=logs)
            return
        run = _run_with_progress(client, suite, target)
    _print_summary(run)
    if not run["summary"]["passed"]:
        raise typer.Exit(1)


def _run_in_background(
    client: Any, suite: str, target: str | None, *, wait: bool, logs: bool
) -> None:
    """Submit an eval.run job; with ``wait``, follow it and print the run's summary (exit 1
    when the job did not succeed or a threshold fails)."""
    job = _sdk_call(client.evals.run, suite, target=target, background=True)
    console.print(f"job {job['id']} queued (eval.run)")
    if not wait:
        return
    final = follow(client, job, logs=logs)
    result = final.get("result") or {}
    if result.get("run_id"):
        run = _sdk_call(client.evals.get, result["run_id"])
        if run["summary"]:
            _print_summary(run)
    if not result.get("passed"):
        raise typer.Exit(1)


def _print_comparison(report: dict[str, Any]) -> None:
    table = Table("scorer", "baseline", "candidate", "delta [95% CI]", "p", "W/T/L", "")
    for name, r in report["scorers"].items():
        mark = (
            "[red]regressed[/]"
            if r["regressed"]
            else ("[green]improved[/]" if r["improved"] else "")
        )
        table.add_row(
            name,
            _fmt(r["baseline_mean"]),
            _fmt(r["candidate_mean"]),
            f"{_fmt(r['delta'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
            _fmt(r["p_value"]),
            f"{r['wins']}/{r['ties']}/{r['losses']}",
            mark,
        )
    console.print(
        f"baseline {report['baseline']['resolved_target']} vs candidate "
        f"{report['candidate']['resolved_target']} ({report['items']} items)"
    )
    console.print(table)


@eval_app.command("compare")
def eval_compare(
    baseline: Annotated[str, typer.Argument(help="Baseline run id.")],
    candidate: Annotated[str, typer.Argument(help="Candidate run id.")],
    test: Annotated[str, typer.Option(help="permutation or wilcoxon.")] = "permutation",
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Compare two runs of the same dataset version."""
    with _client(url, api_key, project) as client:
        report = _sdk_call(client.evals.compare, baseline, candidate, test=test)
    _print_comparison(report)


@eval_app.command("gate")
def eval_gate(
    suite: Annotated[str, typer.Option("--suite", "-s", help="A stored suite's name.")],
    candidate: Annotated[
        str,
        typer.Option(
            help="Target to check (a label or version of the suite's prompt, a "
            "route, a model), or run:ID for a finished run."
        ),
    ],
    baseline: Annotated[
        str, typer.Option(help="What the candidate must not be worse than.")
    ] = "production",
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here.")] = None,
    summary: Annotated[Path | None, typer.Option(help="Write a Markdown summary here.")] = None,
    test: Annotated[str, typer.Option(help="permutation or wilcoxon.")] = "permutation",
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """The CI gate: run baseline and candidate (served from the response cache when
    unchanged), compare them, write JUnit XML and Markdown, and exit 1 when a threshold
    fails or a scorer regressed significantly."""
    from flywheel.evals.compare import junit_xml, markdown

    with _client(url, api_key, project) as client:
        runs = {}
        for role, value in (("baseline", baseline), ("candidate", candidate)):
            if value.startswith(RUN_PREFIX):
                runs[role] = _sdk_call(client.evals.get, value[len(RUN_PREFIX) :])
            else:
                runs[role] = _run_with_progress(client, suite, value)
        report = _sdk_call(
            client.evals.compare, runs["baseline"]["id"], runs["candidate"]["id"], test=test
        )
    _print_comparison(report)
    text = markdown(report)
    if junit is not None:
        junit.write_text(junit_xml(report), "utf-8")
    if summary is not None:
        summary.write_text(text, "utf-8")
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(text)
    for check in report["gate"]["checks"]:
        state = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]"
        console.print(f"{state} {check['name']}: {check['message']}")
    if not report["gate"]["passed"]:
        err.print("[bold red]gate failed[/]")
        raise typer.Exit(1)
    console.print("[bold green]gate passed[/]")
