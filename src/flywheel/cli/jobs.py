"""``flywheel jobs``, ``flywheel runs``, ``flywheel tune`` and the optimisation steps
``flywheel merge|quantize|prune`` (through the server's API), plus the hidden
``flywheel jobs work`` that a job process runs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
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

jobs_app = typer.Typer(help="Long work: list, follow logs, cancel and retry jobs.")
runs_app = typer.Typer(help="Experiment tracking: runs, their metrics, comparisons.")
tune_app = typer.Typer(help="Fine-tune a model: LoRA/QLoRA SFT, DPO, sweeps, distillation.")


def follow(client: Any, job: dict[str, Any], *, logs: bool) -> dict[str, Any]:
    """Follow a job to its end with a progress bar (and its log when ``logs``); exits
    non-zero when the job did not succeed."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{job['kind']} {job['id'][:8]}", total=1.0, message="queued")

        def update(current: dict[str, Any]) -> None:
            progress.update(task, completed=current["progress"], message=current["message"][:60])

        def show_log(text: str) -> None:
            progress.console.print(text, end="", markup=False, highlight=False)

        final: dict[str, Any] = _sdk_call(
            client.jobs.wait, job["id"], on_update=update, on_log=show_log if logs else None
        )
    status = final["status"]
    colour = "green" if status == "succeeded" else "red"
    console.print(f"job {final['id']} [{colour}]{status}[/]")
    if final.get("error"):
        console.print(f"[red]{final['error']}[/]")
    if final.get("result"):
        console.print_json(json.dumps(final["result"], default=str))
    if status != "succeeded":
        raise typer.Exit(1)
    return final


def _submit(
    url: str,
    api_key: str | None,
    project: str | None,
    kind: str,
    params: dict[str, Any],
    executor: str | None,
    wait: bool,
    logs: bool,
) -> None:
    client = _client(url, api_key, project)
    job = _sdk_call(client.jobs.submit, kind, params, executor=executor)
    console.print(f"job {job['id']} queued ({kind})")
    if wait:
        follow(client, job, logs=logs)


WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it ends.")]
LogsOption = Annotated[bool, typer.Option("--logs/--no-logs", help="Print its log as it runs.")]
ExecutorOption = Annotated[
    str | None, typer.Option("--executor", help="local or ray (default: the server's).")
]


# -- jobs ----------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only jobs of this kind.")] = None,
    limit: int = 50,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """The project's jobs, newest first."""
    client = _client(url, api_key, project)
    table = Table("id", "kind", "name", "status", "progress", "created", "message")
    for job in _sdk_call(client.jobs.list, status=status, kind=kind, limit=limit):
        table.add_row(
            job["id"][:12],
            job["kind"],
            job["name"],
            job["status"],
            f"{job['progress']:.0%}",
            when(job["created_at"]),
            (job["error"] or job["message"] or "")[:60],
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: str,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """One job as JSON."""
    client = _client(url, api_key, project)
    console.print_json(json.dumps(_sdk_call(client.jobs.get, job_id), default=str))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow_log: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """A job's log (``--follow`` streams it live)."""
    client = _client(url, api_key, project)
    if follow_log:
        final = _sdk_call(
            client.jobs.wait, job_id, on_log=lambda text: sys.stdout.write(text) and None
        )
        console.print(f"job {job_id} {final['status']}")
        return
    cursor = 0
    while True:
        chunk = _sdk_call(client.jobs.logs, job_id, cursor)
        sys.stdout.write(chunk["text"])
        if chunk["next"] == cursor:
            break
        cursor = chunk["next"]


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Cancel a queued job, or ask a running one to stop."""
    client = _client(url, api_key, project)
    job = _sdk_call(client.jobs.cancel, job_id)
    console.print(f"job {job['id']}: {job['status']} ({job['message']})")


@jobs_app.command("retry")
def jobs_retry(
    job_id: str,
    wait: WaitOption = False,
    logs: LogsOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Run a failed, cancelled or orphaned job again."""
    client = _client(url, api_key, project)
    job = _sdk_call(client.jobs.retry, job_id)
    console.print(f"job {job['id']} queued (attempt {job['attempt']}, retry of {job_id})")
    if wait:
        follow(client, job, logs=logs)


@jobs_app.command("work", hidden=True)
def jobs_work(job_id: str) -> None:
    """Run one claimed job in this process (what the local executor starts)."""
    from flywheel.config import get_settings
    from flywheel.jobs.store import JobStore
    from flywheel.jobs.worker import apply_resource_limits, run_job
    from flywheel.security.audit import AuditLog
    from flywheel.store import Database

    apply_resource_limits(
        int(os.environ.get("FLYWHEEL_JOB_MEMORY_LIMIT_MB") or 0) or None,
        int(os.environ.get("FLYWHEEL_JOB_NICE") or 0),
    )
    settings = get_settings()
    db = Database(settings.resolved_database_url)
    store = JobStore(db, AuditLog(db))

    def services() -> Any:
        from flywheel.server.services import Services

        return Services.build(settings.model_copy(update={"preload_models": False}), worker=True)

    status = run_job(
        store,
        job_id,
        settings.jobs_dir,
        services=services,
        heartbeat_interval=settings.job_heartbeat,
        handle_sigterm=True,
    )
    raise typer.Exit(0 if status == "succeeded" else 3)


# -- runs ----------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(
    experiment: Annotated[str | None, typer.Option(help="Only this experiment.")] = None,
    job: Annotated[str | None, typer.Option(help="Only runs of this job.")] = None,
    limit: int = 50,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Runs, newest first, with their headline numbers."""
    client = _client(url, api_key, project)
    table = Table("id", "name", "kind", "status", "eval loss before", "after", "tokens/s")
    for run in _sdk_call(client.runs.list, experiment=experiment, job=job, limit=limit):
        summary = run["summary"] or {}
        table.add_row(
            run["id"][:12],
            run["name"],
            run["kind"],
            run["status"],
            _fmt(summary.get("eval_loss_before")),
            _fmt(summary.get("eval_loss_after")),
            _fmt(summary.get("tokens_per_second")),
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: str,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """One run as JSON (params, summary, system, packages, metric series)."""
    client = _client(url, api_key, project)
    console.print_json(json.dumps(_sdk_call(client.runs.get, run_id), default=str))


@runs_app.command("export-mlflow")
def runs_export_mlflow(
    run_id: str,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Copy a run to the MLflow tracking store the server is configured with
    (FLYWHEEL_MLFLOW_TRACKING_URI)."""
    client = _client(url, api_key, project)
    exported = _sdk_call(client.runs.export_mlflow, run_id)
    console.print(
        f"exported as MLflow run {exported['mlflow_run_id']} ({exported['tracking_uri']})"
    )


@runs_app.command("compare")
def runs_compare(
    run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Params and results of runs side by side (changed rows in bold)."""
    client = _client(url, api_key, project)
    found = _sdk_call(client.runs.compare, run_ids)
    table = Table("", *[run["name"] + f"\n{run['id'][:8]}" for run in found["runs"]])
    for section in ("params", "summary"):
        for row in found[section]:
            style = "bold" if row["differs"] else "dim"
            table.add_row(f"{section}.{row['key']}", *map(_fmt, row["values"]), style=style)
    console.print(table)


# -- tune ----------------------------------------------------------------------------------


def _train_settings(
    learning_rate: float | None,
    epochs: float | None,
    max_steps: int | None,
    rank: int | None,
    alpha: int | None,
    target_modules: str | None,
    batch_size: int | None,
    max_length: int | None,
    qlora: bool,
    settings_file: Path | None,
) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if settings_file is not None:
        import yaml

        try:
            loaded = yaml.safe_load(settings_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise _fail(f"{settings_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise _fail(f"{settings_file}: must hold a mapping of settings")
        settings.update(loaded)
    lora = dict(settings.get("lora") or {})
    for key, value in (("rank", rank), ("alpha", alpha)):
        if value is not None:
            lora[key] = value
    if target_modules:
        modules = [m.strip() for m in target_modules.split(",") if m.strip()]
        lora["target_modules"] = modules
    if lora:
        settings["lora"] = lora
    given: tuple[tuple[str, float | int | None], ...] = (
        ("learning_rate", learning_rate),
        ("epochs", epochs),
        ("max_steps", max_steps),
        ("batch_size", batch_size),
        ("max_length", max_length),
    )
    for key, number in given:
        if number is not None:
            settings[key] = number
    if qlora:
        settings["quantization"] = "nf4"
    return settings


def _tune(method: str) -> Any:
    def command(
        dataset: Annotated[str, typer.Option(help="Dataset version NAME@VERSION (or NAME).")],
        base: Annotated[
            str, typer.Option(help="Base: registry NAME@VERSION, catalog model or builtin:.")
        ] = "builtin:smollm2",
        register: Annotated[
            str | None, typer.Option(help="Register the adapter as this model.")
        ] = None,
        learning_rate: Annotated[float | None, typer.Option("--lr")] = None,
        epochs: Annotated[float | None, typer.Option()] = None,
        max_steps: Annotated[int | None, typer.Option()] = None,
        rank: Annotated[int | None, typer.Option(help="LoRA rank.")] = None,
        alpha: Annotated[int | None, typer.Option(help="LoRA alpha.")] = None,
        target_modules: Annotated[
            str | None, typer.Option(help="Comma-separated module names, or all-linear.")
        ] = None,
        batch_size: Annotated[int | None, typer.Option()] = None,
        max_length: Annotated[int | None, typer.Option()] = None,
        qlora: Annotated[bool, typer.Option("--qlora", help="4-bit NF4 base (QLoRA).")] = False,
        settings_file: Annotated[
            Path | None, typer.Option("--settings", help="YAML file of training settings.")
        ] = None,
        workers: Annotated[int, typer.Option(help="Ray Train workers (ray executor).")] = 1,
        executor: ExecutorOption = None,
        wait: WaitOption = True,
        logs: LogsOption = False,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = None,
        project: ProjectOption = None,
    ) -> None:
        settings = _train_settings(
            learning_rate,
            epochs,
            max_steps,
            rank,
            alpha,
            target_modules,
            batch_size,
            max_length,
            qlora,
            settings_file,
        )
        params = {"base": base, "dataset": dataset, "settings": settings, "num_workers": workers}
        if register:
            params["register"] = register
        _submit(url, api_key, project, f"tune.{method}", params, executor, wait, logs)

    command.__doc__ = {
        "sft": "Supervised fine-tuning with a LoRA (or QLoRA) adapter on a dataset version.",
        "dpo": "DPO on preference pairs: expected is chosen, metadata.rejected is rejected.",
    }[method]
    return command


tune_app.command("sft")(_tune("sft"))
tune_app.command("dpo")(_tune("dpo"))


@tune_app.command("sweep")
def tune_sweep(
    dataset: Annotated[str, typer.Option(help="Dataset version NAME@VERSION.")],
    space: Annotated[
        str,
        typer.Option(
            help='JSON search space, e.g. \'{"learning_rate": [1e-4, 3e-4], "lora.rank": [4, 8]}\''
        ),
    ],
    base: Annotated[str, typer.Option()] = "builtin:smollm2",
    strategy: Annotated[str, typer.Option(help="grid or random.")] = "grid",
    max_trials: int = 8,
    settings_file: Annotated[Path | None, typer.Option("--settings")] = None,
    executor: ExecutorOption = None,
    wait: WaitOption = True,
    logs: LogsOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """A hyperparameter sweep of SFT trials (each a run of one experiment)."""
    try:
        parsed = json.loads(space)
    except ValueError as exc:
        raise _fail(f"--space: not JSON: {exc}") from None
    settings = _train_settings(None, None, None, None, None, None, None, None, False, settings_file)
    params = {
        "base": base,
        "dataset": dataset,
        "space": parsed,
        "strategy": strategy,
        "max_trials": max_trials,
        "settings": settings,
    }
    _submit(url, api_key, project, "tune.sweep", params, executor, wait, logs)


@tune_app.command("distill")
def tune_distill(
    teacher: Annotated[str, typer.Option(help="Teacher route or catalog model.")],
    prompts: Annotated[str, typer.Option(help="Dataset of prompts NAME@VERSION.")],
    dataset: Annotated[str, typer.Option(help="Dataset to write the teacher's answers to.")],
    student: Annotated[str, typer.Option()] = "builtin:smollm2",
    register: Annotated[str | None, typer.Option()] = None,
    max_steps: Annotated[int | None, typer.Option()] = None,
    executor: ExecutorOption = None,
    wait: WaitOption = True,
    logs: LogsOption = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Generate a dataset from a teacher route, then SFT a student on it."""
    params: dict[str, Any] = {
        "teacher": teacher,
        "prompts": prompts,
        "dataset": dataset,
        "student": student,
        "settings": {"max_steps": max_steps} if max_steps else {},
    }
    if register:
        params["register"] = register
    _submit(url, api_key, project, "distill", params, executor, wait, logs)


def step_command(step: str) -> Any:
    """``flywheel merge|quantize|prune MODEL@VERSION``: an optimisation step as a job."""

    def command(
        model: Annotated[str, typer.Argument(help="Registry ref NAME@VERSION.")],
        method: Annotated[
            str | None,
            typer.Option(
                help="quantize: bnb-int8, bnb-nf4, torchao-int8, gptq, gguf; "
                "prune: magnitude or 2:4."
            ),
        ] = None,
        amount: Annotated[float | None, typer.Option(help="prune: fraction of weights.")] = None,
        register: Annotated[
            str | None, typer.Option(help="Register the result as this model.")
        ] = None,
        eval_dataset: Annotated[
            str | None, typer.Option(help="Dataset for before/after held-out loss.")
        ] = None,
        executor: ExecutorOption = None,
        wait: WaitOption = True,
        logs: LogsOption = False,
        url: UrlOption = DEFAULT_URL,
        api_key: KeyOption = None,
        project: ProjectOption = None,
    ) -> None:
        params: dict[str, Any] = {"model": model}
        if method is not None:
            params["method"] = method
        if amount is not None:
            params["amount"] = amount
        if register:
            params["register"] = register
        if eval_dataset:
            params["eval_dataset"] = eval_dataset
        _submit(url, api_key, project, step, params, executor, wait, logs)

    command.__doc__ = {
        "merge": "Merge a LoRA adapter version onto its dequantized base.",
        "quantize": "Quantize a model version for deployment (--method).",
        "prune": "Prune a model version by magnitude (--method magnitude or 2:4).",
    }[step]
    return command


# -- models (the registry) -----------------------------------------------------------------

models_app = typer.Typer(help="The model registry: versions, aliases, cards, lineage, serving.")


@models_app.command("list")
def models_list(
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Registered models with their newest version and aliases."""
    client = _client(url, api_key, project)
    table = Table("name", "versions", "latest", "aliases", "license")
    for model in _sdk_call(client.models.list):
        aliases = model.get("aliases") or {}
        table.add_row(
            model["name"],
            str(model.get("version_count", 0)),
            _fmt(model.get("latest_version")),
            ", ".join(f"{a}→{v}" for a, v in sorted(aliases.items())) or "-",
            model.get("license") or "-",
        )
    console.print(table)


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="A model, or a version NAME@VERSION.")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """A model's versions (lineage kind, size, parent), or one version as JSON."""
    client = _client(url, api_key, project)
    if "@" in name:
        console.print_json(json.dumps(_sdk_call(client.models.version, name), default=str))
        return
    model = _sdk_call(client.models.get, name)
    table = Table("version", "kind", "format", "parent", "size", "aliases", "created")
    for version in model["versions"]:
        table.add_row(
            str(version["version"]),
            version["kind"],
            version["format"],
            version.get("parent") or "-",
            f"{version['size_bytes'] / 1e6:.1f} MB",
            ", ".join(version.get("aliases") or []) or "-",
            when(version["created_at"]),
        )
    console.print(f"[bold]{model['name']}[/] {model.get('description') or ''}")
    console.print(table)


@models_app.command("card")
def models_card(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION or NAME@ALIAS.")],
    output: Annotated[Path | None, typer.Option("-o", help="Write it to a file.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """The generated model card (markdown)."""
    client = _client(url, api_key, project)
    text = _sdk_call(client.models.card, ref)
    if output is not None:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        sys.stdout.write(text)


@models_app.command("lineage")
def models_lineage(
    ref: str,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """The lineage graph of a version: each edge as ``source -relation-> target``."""
    client = _client(url, api_key, project)
    graph = _sdk_call(client.models.lineage, ref)
    labels = {node["id"]: f"{node['type']}:{node['label']}" for node in graph["nodes"]}
    for edge in graph["edges"]:
        console.print(
            f"{labels.get(edge['source'], edge['source'])} "
            f"-[{edge['relation']}]-> {labels.get(edge['target'], edge['target'])}",
            markup=False,
        )


@models_app.command("register")
def models_register(
    name: str,
    folder: Annotated[Path, typer.Argument(help="Model folder (or a .gguf file).")],
    kind: Annotated[str, typer.Option(help="base, adapter, merged, quantized or pruned.")] = "base",
    format: Annotated[str, typer.Option("--format")] = "safetensors",
    parent: Annotated[str | None, typer.Option(help="NAME@VERSION it was made from.")] = None,
    description: str = "",
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Upload a local model folder as a new version."""
    if not folder.exists():
        raise _fail(f"{folder}: no such file or folder")
    client = _client(url, api_key, project)
    version = _sdk_call(
        client.models.register,
        name,
        folder,
        kind=kind,
        format=format,
        parent=parent,
        description=description,
    )
    console.print(f"registered {name}@{version['version']} ({version['size_bytes']} bytes)")


@models_app.command("alias")
def models_alias(
    name: str,
    alias: str,
    version: Annotated[int | None, typer.Argument(help="Version (omit with --remove).")] = None,
    remove: Annotated[bool, typer.Option("--remove")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Point an alias (staging, …) at a version; production needs an approval request."""
    client = _client(url, api_key, project)
    if remove:
        _sdk_call(client.models.remove_alias, name, alias)
        console.print(f"removed {name}@{alias}")
        return
    if version is None:
        raise _fail("give the version the alias should point at")
    _sdk_call(client.models.set_alias, name, alias, version)
    console.print(f"{name}@{alias} → {version}")


@models_app.command("serve")
def models_serve(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION to serve.")],
    route: Annotated[str, typer.Option(help="Route to serve it on (created if new).")],
    weight: Annotated[float | None, typer.Option(help="Share next to other targets.")] = None,
    replace: Annotated[bool, typer.Option(help="Make it the route's only target.")] = False,
    approved: Annotated[bool, typer.Option(help="Catalog status approved.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    project: ProjectOption = None,
) -> None:
    """Serve a registered version as a local-provider target of a route."""
    client = _client(url, api_key, project)
    served = _sdk_call(
        client.models.serve,
        ref,
        route,
        weight=weight,
        replace=replace,
        status="approved" if approved else "experimental",
    )
    console.print(
        f"{ref} serves as model '{served['served_name']}' on route '{route}' "
        f"(config revision {served['revision']})"
    )
