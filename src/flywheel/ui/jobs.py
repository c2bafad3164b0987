"""The UI's job and experiment pages: the jobs list with the fine-tune form (and a generic
form for any kind), one job with its live log, progress and loss chart, cancel and retry; the
tracked runs, one run with every metric charted, and runs compared side by side.

A thin edge over :class:`~flywheel.jobs.store.JobStore`, ``Services.submit_job`` and
:class:`~flywheel.tuning.runs.RunTracker` (the services ``/api/jobs`` and ``/api/runs`` use),
so a job submitted here is validated by its kind exactly as through the API. A service's
refusal is shown on the page with its status code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response

from flywheel.errors import ServiceError
from flywheel.jobs import FINISHED, STATUSES, job_kinds
from flywheel.security import Permission, Principal
from flywheel.server.http import services
from flywheel.server.services import Services
from flywheel.tuning.config import LoraSettings, TrainSettings
from flywheel.ui.datasets import clip, error_page, form_fields, number, whole
from flywheel.ui.present import fmt_json
from flywheel.ui.prompts import PageError
from flywheel.ui.routes import _htmx_target as htmx_target
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

RECENT_JOBS = 100
RECENT_RUNS = 200
JOB_RUNS = 50
MAX_DATASETS = 100
VERSIONS_PER_DATASET = 20
MAX_PARAMS_JSON = 100_000
LOG_PAGE_CHARS = 200_000
"""The job page shows at most this much of the log's end; polling adds what follows."""
MAX_CHART_POINTS = 1500
"""Longer metric series are thinned to about this many points (the last one kept)."""
MAX_CHARTS = 16
MAX_COMPARE = 20
LIVE_KEYS = ("loss", "eval_loss")
"""The job page's live chart: the training and held-out loss of the job's newest run."""
FIRST_KEYS = ("loss", "eval_loss", "train_loss")
TUNE_METHODS = ("sft", "dpo")
RETRYABLE = frozenset({"failed", "cancelled", "orphaned"})
BUILTIN_BASE = "builtin:smollm2"
STATUS_CLASSES = {
    "queued": "status-pending",
    "running": "status-run-running",
    "succeeded": "status-ok",
    "finished": "status-ok",
    "failed": "status-error",
    "orphaned": "status-error",
    "cancelled": "status-cancelled",
}
TUNE_FIELDS = (
    "method",
    "dataset",
    "base",
    "name",
    "register",
    "learning_rate",
    "epochs",
    "max_steps",
    "batch_size",
    "max_length",
    "eval_steps",
    "lora_rank",
    "lora_alpha",
    "target_modules",
    "qlora",
)
# A kind's validation names the param at fault; the form names the field instead.
FIELD_LABELS = {
    "params.dataset": "Dataset version",
    "params.base": "Base model",
    "params.register": "Register as",
    "params.settings.learning_rate": "Learning rate",
    "params.settings.epochs": "Epochs",
    "params.settings.max_steps": "Max steps",
    "params.settings.batch_size": "Batch size",
    "params.settings.max_length": "Max length",
    "params.settings.eval_steps": "Evaluate every",
    "params.settings.lora.rank": "LoRA rank",
    "params.settings.lora.alpha": "LoRA alpha",
    "params.settings.lora.target_modules": "Target modules",
}


def job_url(job_id: str) -> str:
    """The page of a job."""
    return f"/jobs/{quote(job_id, safe='')}"


def run_url(run_id: str) -> str:
    """The page of a tracked run."""
    return f"/runs/{quote(run_id, safe='')}"


def compare_url(run_ids: Sequence[str]) -> str:
    """The side-by-side page of ``run_ids``."""
    return "/runs/compare?" + urlencode({"ids": ",".join(run_ids)})


def version_url(ref: str) -> str:
    """The registry page of a model version ``name@version``."""
    name, _, version = ref.partition("@")
    return f"/registry/{quote(name, safe='')}/versions/{quote(version, safe='')}"


def status_class(status: str) -> str:
    """The badge class of a job or run status."""
    return STATUS_CLASSES.get(status, "status-pending")


def job_row(job: Mapping[str, Any]) -> dict[str, Any]:
    """A job as the lists and the status panel show it."""
    progress = float(job.get("progress") or 0.0)
    return {
        **job,
        "short": job["id"][:8],
        "url": job_url(job["id"]),
        "running": job["status"] not in FINISHED,
        "pct": round(100 * progress),
        "status_class": status_class(job["status"]),
        "retryable": job["status"] in RETRYABLE,
    }


def _numbers(values: Mapping[str, Any], keys: Sequence[str]) -> list[tuple[str, float]]:
    found = []
    for key in keys:
        value = values.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            found.append((key, float(value)))
    return found


def run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run as the lists show it, with its headline losses."""
    summary = run.get("summary") or {}
    return {
        **run,
        "short": run["id"][:8],
        "url": run_url(run["id"]),
        "job_url": job_url(run["job_id"]) if run.get("job_id") else None,
        "status_class": status_class(run["status"]),
        "headline": _numbers(summary, ("train_loss", "eval_loss", "loss")),
    }


def fmt_value(value: Any) -> str:
    """A param or summary value as one table cell."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def flatten(values: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``lora.rank``), as the comparison lists them."""
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# -- charts -------------------------------------------------------------------------------------


def thin(points: Sequence[Sequence[float]], limit: int = MAX_CHART_POINTS) -> list[list[float]]:
    """At most about ``limit`` evenly spaced points, always keeping the last one."""
    finite = [[p[0], p[1]] for p in points if math.isfinite(p[1])]
    if len(finite) <= limit:
        return finite
    stride = math.ceil(len(finite) / limit)
    kept = finite[::stride]
    if kept[-1] is not finite[-1]:
        kept.append(finite[-1])
    return kept


def metric_order(keys: Sequence[str]) -> list[str]:
    """The losses first, then the other metrics by name."""
    first = [k for k in FIRST_KEYS if k in keys]
    return first + sorted(k for k in set(keys) if k not in FIRST_KEYS)


def series_chart(
    datasets: Sequence[tuple[str, Sequence[Sequence[float]]]], y_title: str
) -> dict[str, Any]:
    """A line chart over steps, as ``jobs.js`` draws a ``canvas[data-series]``."""
    return {
        "datasets": [
            {"label": label, "points": thin(points), "color": index}
            for index, (label, points) in enumerate(datasets)
        ],
        "x_title": "step",
        "y_title": y_title,
        "legend": len(datasets) > 1,
    }


def live_chart(svc: Services, project: str, job_id: str) -> dict[str, Any]:
    """The loss chart of the job's newest run (empty until the run logs a step)."""
    runs = svc.runs.list_runs(project, job_id=job_id, limit=1)
    if not runs:
        return {**series_chart([], "loss"), "run": None}
    run = runs[0]
    series = svc.runs.series(run["id"], LIVE_KEYS)
    chart = series_chart([(key, series[key]) for key in LIVE_KEYS if key in series], "loss")
    chart["legend"] = True
    return {**chart, "run": {"id": run["id"], "url": run_url(run["id"]), "name": run["name"]}}


# -- the jobs list and the submit forms -------------------------------------------------------


def dataset_choices(svc: Services, project: str) -> list[dict[str, Any]]:
    """Every dataset version a job may train on (newest first per dataset)."""
    choices = []
    for dataset in svc.datasets.overview(project)[:MAX_DATASETS]:
        for version in svc.datasets.versions(project, dataset["name"])[:VERSIONS_PER_DATASET]:
            ref = f"{version['dataset']}@{version['version']}"
            choices.append({"ref": ref, "items": version["items"], "message": version["message"]})
    return choices


def base_choices(svc: Services, project: str) -> list[str]:
    """Suggested base models: the built-in model, local catalog models and the newest version
    of each registered model."""
    bases = [BUILTIN_BASE]
    for entry in svc.config.models:
        if entry.source and entry.kind == "chat" and entry.name not in bases:
            bases.append(entry.name)
    for model in svc.registry.list_models(project):
        if model.get("latest_version"):
            bases.append(f"{model['name']}@{model['latest_version']}")
    return bases


def _tune_defaults() -> dict[str, str]:
    settings, lora = TrainSettings(), LoraSettings()
    return {
        "method": "sft",
        "dataset": "",
        "base": BUILTIN_BASE,
        "name": "",
        "register": "",
        # Empty: the method's own default (SFT and DPO differ).
        "learning_rate": "",
        "epochs": f"{settings.epochs:g}",
        "max_steps": "",
        "batch_size": str(settings.batch_size),
        "max_length": str(settings.max_length),
        "eval_steps": "",
        "lora_rank": str(lora.rank),
        "lora_alpha": f"{lora.alpha:g}",
        "target_modules": "",
        "qlora": "",
    }


def _jobs_context(svc: Services, user: Principal, **extra: Any) -> dict[str, Any]:
    project = user.project_id
    status = extra.pop("status", "")
    kind = extra.pop("kind", "")
    tune = _tune_defaults() | extra.pop("tune", {})
    generic = {"kind": "", "name": "", "params": "{}"} | extra.pop("generic", {})
    kinds = job_kinds()
    jobs = svc.jobs.list_jobs(project, status=status or None, kind=kind or None, limit=RECENT_JOBS)
    return {
        "nav": "jobs",
        "jobs": [job_row(job) for job in jobs],
        "filters": {"status": status, "kind": kind},
        "filtered": bool(status or kind),
        "statuses": STATUSES,
        "kinds": [
            {"name": k.name, "description": k.description, "permission": k.permission}
            for k in sorted(kinds.values(), key=lambda k: k.name)
        ],
        "datasets": dataset_choices(svc, project),
        "bases": base_choices(svc, project),
        "methods": TUNE_METHODS,
        "tune": tune,
        "generic": generic,
        "counts": svc.jobs.counts(project),
        "error": None,
        "error_form": None,
        **extra,
    }


@router.get("/jobs")
def jobs_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's jobs, newest first (``?status=`` and ``?kind=`` filter; running ones
    update in place) and, for writers, the fine-tune form and a form for any other kind
    (``?dataset=NAME@VERSION`` preselects the dataset version to train on)."""
    svc = services(request)
    params = request.query_params
    status = params.get("status", "")
    status = status if status in STATUSES else ""
    kind = params.get("kind", "")[:64]
    tune = {"dataset": params.get("dataset", "")[:200]} if params.get("dataset") else {}
    context = _jobs_context(svc, user, status=status, kind=kind, tune=tune)
    return render(request, "jobs.html", context)


def _relabel(exc: ServiceError) -> PageError:
    """A kind's refusal with the form's name for the field at fault."""
    label = FIELD_LABELS.get(exc.param or "")
    if label is None:
        return PageError(exc.status_code, exc.message)
    _, _, reason = exc.message.partition(": ")
    return PageError(exc.status_code, f"{label}: {reason or exc.message}")


def _target_modules(text: str) -> list[str] | str | None:
    text = text.strip()
    if not text:
        return None
    if text == "all-linear":
        return text
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def tune_settings(form: Mapping[str, str]) -> dict[str, Any]:
    """The fine-tune form's training settings; an empty field keeps the method's default.
    Numbers are parsed here; their ranges are the kind's to check."""
    settings: dict[str, Any] = {}
    learning_rate = number(form.get("learning_rate", ""), "Learning rate", 0, 1)
    epochs = number(form.get("epochs", ""), "Epochs", 0, 100)
    fields = {
        "max_steps": whole(form.get("max_steps", ""), "Max steps", 1, 1_000_000),
        "batch_size": whole(form.get("batch_size", ""), "Batch size", 1, 1024),
        "max_length": whole(form.get("max_length", ""), "Max length", 8, 32768),
        "eval_steps": whole(form.get("eval_steps", ""), "Evaluate every", 1, 1_000_000),
    }
    if learning_rate is not None:
        settings["learning_rate"] = learning_rate
    if epochs is not None:
        settings["epochs"] = epochs
    settings.update({k: v for k, v in fields.items() if v is not None})
    lora: dict[str, Any] = {}
    rank = whole(form.get("lora_rank", ""), "LoRA rank", 1, 1024)
    alpha = number(form.get("lora_alpha", ""), "LoRA alpha", 0, 8192)
    modules = _target_modules(form.get("target_modules", ""))
    if rank is not None:
        lora["rank"] = rank
    if alpha is not None:
        lora["alpha"] = alpha
    if modules is not None:
        lora["target_modules"] = modules
    if lora:
        settings["lora"] = lora
    # QLoRA: the base loads in 4-bit NF4 and only the adapter trains.
    settings["quantization"] = "nf4" if form.get("qlora") == "yes" else "none"
    return settings


def check_base(svc: Services, project: str, base: str) -> None:
    """Refuse a base the job could not load: a built-in model, a local catalog model or a
    version in this project's registry (checked now, not when the job runs)."""
    if not base:
        raise PageError(400, "Base model: name a base model to fine-tune.")
    if base.startswith("builtin:"):
        return
    catalog = {m.name: m for m in svc.config.models}
    if base in catalog:
        if not catalog[base].source:
            raise PageError(400, f"Base model: catalog model '{base}' is not a local model.")
        return
    try:
        svc.registry.resolve(project, base)
    except ServiceError as exc:
        raise PageError(exc.status_code, f"Base model: {exc.message}") from None


def check_dataset(svc: Services, project: str, ref: str) -> None:
    """Refuse a dataset version that does not exist (``NAME@VERSION``, or ``NAME``: newest)."""
    name, _, version = ref.partition("@")
    if version and (not version.isdecimal() or len(version) > 9):
        raise PageError(400, f"Dataset version: '{clip(ref, 80)}' is not NAME@VERSION.")
    try:
        svc.datasets.version(project, name, int(version) if version else None)
    except ServiceError as exc:
        raise PageError(exc.status_code, f"Dataset version: {exc.message}") from None


def tune_request(svc: Services, user: Principal, form: Mapping[str, str]) -> dict[str, Any]:
    """Validate the fine-tune form and queue its ``tune.sft`` or ``tune.dpo`` job."""
    method = form.get("method", "sft")
    if method not in TUNE_METHODS:
        raise PageError(400, "Pick SFT or DPO.")
    dataset = form.get("dataset", "").strip()
    if not dataset:
        raise PageError(400, "Dataset version: pick the dataset version to train on.")
    check_dataset(svc, user.project_id, dataset)
    base = form.get("base", "").strip()
    check_base(svc, user.project_id, base)
    params: dict[str, Any] = {
        "base": base,
        "dataset": dataset,
        "settings": tune_settings(form),
    }
    register = form.get("register", "").strip()
    if register:
        params["register"] = register
    name = form.get("name", "").strip()[:200] or f"{method} {dataset}"
    return submit(svc, user, f"tune.{method}", params, name)


def generic_request(svc: Services, user: Principal, form: Mapping[str, str]) -> dict[str, Any]:
    """Queue a job of any registered kind with params given as a JSON object."""
    kind = form.get("kind", "").strip()
    if not kind:
        raise PageError(400, "Pick the kind of job to run.")
    raw = form.get("params", "").strip() or "{}"
    if len(raw) > MAX_PARAMS_JSON:
        raise PageError(413, f"The params are longer than {MAX_PARAMS_JSON:,} characters.")
    try:
        params = json.loads(raw)
    except ValueError as exc:
        raise PageError(400, f"The params are not JSON: {exc}.") from None
    if not isinstance(params, dict):
        raise PageError(400, 'The params must be a JSON object, e.g. {"steps": 5}.')
    return submit(svc, user, kind, params, form.get("name", "").strip()[:200])


def submit(
    svc: Services, user: Principal, kind_name: str, params: dict[str, Any], name: str
) -> dict[str, Any]:
    """Queue a job as ``user`` after the kind's own permission check (as ``POST /api/jobs``)."""
    kind = job_kinds().get(kind_name)
    if kind is not None and not user.can(Permission(kind.permission)):
        raise PageError(403, f"Running a {kind_name} job needs the {kind.permission} permission.")
    try:
        job: dict[str, Any] = svc.submit_job(
            user.project_id, kind_name, params, user.actor, name=name, author_id=user.identity
        )
    except ServiceError as exc:
        raise _relabel(exc) from None
    return job


@router.post("/jobs")
async def submit_job(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Queue the fine-tune form's job (``form=tune``) or the generic form's (``form=generic``)
    and open it."""
    svc = services(request)
    form = await form_fields(request)
    which = "generic" if form.get("form") == "generic" else "tune"
    try:
        if which == "tune":
            job = await run_in_threadpool(tune_request, svc, user, form)
        else:
            job = await run_in_threadpool(generic_request, svc, user, form)
    except PageError as exc:
        error, status = exc.message, exc.status_code
        if which == "tune":
            kept: dict[str, Any] = {"tune": {k: form.get(k, "") for k in TUNE_FIELDS}}
        else:
            kept = {"generic": {k: form.get(k, "") for k in ("kind", "name", "params")}}
        context = await run_in_threadpool(
            lambda: _jobs_context(svc, user, error=error, error_form=which, **kept)
        )
        return render(request, "jobs.html", context, status_code=status)
    return RedirectResponse(f"{job_url(job['id'])}?submitted=1", status_code=303)


# -- one job --------------------------------------------------------------------------------


def result_links(result: Any) -> list[dict[str, str]]:
    """Pages a job's result points at: its run and the model version it registered."""
    if not isinstance(result, Mapping):
        return []
    links = []
    if isinstance(result.get("run_id"), str):
        run_id = result["run_id"]
        links.append({"kind": "run", "text": f"run {run_id[:8]}", "url": run_url(run_id)})
    if isinstance(result.get("model"), str) and "@" in result["model"]:
        model = result["model"]
        links.append({"kind": "model", "text": model, "url": version_url(model)})
    if isinstance(result.get("dataset"), str) and "@" in result["dataset"]:
        name, _, version = result["dataset"].partition("@")
        query = urlencode({"version": version})
        url = f"/datasets/{quote(name, safe='')}?{query}"
        links.append({"kind": "dataset", "text": result["dataset"], "url": url})
    return links


def _job_context(svc: Services, user: Principal, job_id: str, **extra: Any) -> dict[str, Any]:
    project = user.project_id
    job = job_row(svc.jobs.get(project, job_id))
    log = svc.jobs.logs(project, job_id, 0)
    text = log["text"]
    runs = [run_row(r) for r in svc.runs.list_runs(project, job_id=job_id, limit=JOB_RUNS)]
    retry_of = job.get("retry_of")
    return {
        "nav": "jobs",
        "job": job,
        "params_json": fmt_json(job["params"]),
        "result_json": fmt_json(job["result"]) if job["result"] is not None else "",
        "links": result_links(job["result"]),
        "retry_of_url": job_url(retry_of) if retry_of else None,
        "log_text": text[-LOG_PAGE_CHARS:],
        "log_cut": len(text) > LOG_PAGE_CHARS,
        "log_next": log["next"],
        "log_url": f"{job_url(job_id)}/log",
        "chart": live_chart(svc, project, job_id),
        "runs": runs,
        "compare_url": compare_url([r["id"] for r in runs]) if len(runs) >= 2 else None,
        "error": None,
        "notice": None,
        **extra,
    }


def _job_error(request: Request, exc: ServiceError | PageError) -> Response:
    title = "Job not found" if exc.status_code == 404 else "Job"
    return error_page(request, exc.status_code, title, exc.message, ("/jobs", "All jobs"))


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A job: its status and progress (polled while it runs), params, result, the runs it
    tracked with a live loss chart, and its log, followed live; cancel and retry buttons."""
    svc = services(request)
    target = htmx_target(request)
    try:
        if target in ("job-status", f"job-row-{job_id}"):
            job = job_row(svc.jobs.get(user.project_id, job_id))
            partial = {"job": job, "links": result_links(job["result"])}
            if target != "job-status":
                return render(request, "_job_row.html", partial)
            # Once finished, the page gains its result and runs: reload it whole.
            headers = {} if job["running"] else {"HX-Refresh": "true"}
            return render(request, "_job_status.html", partial, headers=headers)
        context = _job_context(svc, user, job_id)
        # The page reloads itself when the job ends: by then these notices are stale.
        if context["job"]["running"]:
            if request.query_params.get("submitted") == "1":
                context["notice"] = "Job queued. Its log and progress update below as it runs."
            elif request.query_params.get("cancelled") == "1":
                context["notice"] = "Cancel requested: the job stops at its next check."
    except ServiceError as exc:
        return _job_error(request, exc)
    return render(request, "job.html", context)


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


@router.get("/jobs/{job_id}/log")
def job_log(request: Request, job_id: str, user: Principal = Depends(ui_authorize)) -> Response:
    """The job's log after cursor ``?after=N``: as JSON (``Accept: application/json``) with
    the cursor to ask with next, the job's status and its live loss chart, which is what the
    job page polls; otherwise as an HTML fragment of the new text."""
    svc = services(request)
    after_param = request.query_params.get("after", "0")
    after = int(after_param) if after_param.isdecimal() and len(after_param) <= 18 else 0
    try:
        log = svc.jobs.logs(user.project_id, job_id, after)
        job = svc.jobs.get(user.project_id, job_id)
        chart = live_chart(svc, user.project_id, job_id)
    except ServiceError as exc:
        if _wants_json(request):
            return JSONResponse({"error": exc.message}, status_code=exc.status_code)
        return _job_error(request, exc)
    if _wants_json(request):
        payload = {
            "text": log["text"],
            "next": log["next"],
            "finished": log["finished"],
            "status": job["status"],
            "progress": job["progress"],
            "message": job["message"],
            "chart": chart,
        }
        return JSONResponse(payload, headers={"Cache-Control": "no-store"})
    context = {"text": log["text"], "next": log["next"], "finished": log["finished"]}
    return render(request, "_job_log.html", context)


async def _job_refusal(
    request: Request, user: Principal, job_id: str, exc: ServiceError
) -> Response:
    """The job page with a refused cancel or retry explained on it."""
    svc = services(request)
    error, status = exc.message, exc.status_code
    try:
        context = await run_in_threadpool(lambda: _job_context(svc, user, job_id, error=error))
    except ServiceError as missing:
        return _job_error(request, missing)
    return render(request, "job.html", context, status_code=status)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(
    request: Request, job_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Cancel a queued job at once, or ask a running one to stop (refused once it ended)."""
    svc = services(request)
    try:
        await run_in_threadpool(svc.jobs.cancel, user.project_id, job_id, user.actor)
    except ServiceError as exc:
        return await _job_refusal(request, user, job_id, exc)
    return RedirectResponse(f"{job_url(job_id)}?cancelled=1", status_code=303)


@router.post("/jobs/{job_id}/retry")
async def retry_job(
    request: Request, job_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Run a failed, cancelled or orphaned job again as a new job, and open that one."""
    svc = services(request)
    try:
        job = await run_in_threadpool(
            svc.jobs.retry, user.project_id, job_id, user.actor, user.identity
        )
    except ServiceError as exc:
        return await _job_refusal(request, user, job_id, exc)
    if svc.supervisor is not None:
        svc.supervisor.wake()
    return RedirectResponse(f"{job_url(job['id'])}?submitted=1", status_code=303)


# -- runs -----------------------------------------------------------------------------------


@router.get("/runs")
def runs_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The tracked runs, newest first (``?experiment=`` groups a sweep's trials, ``?job=``
    one job's runs), with checkboxes to compare them."""
    svc = services(request)
    params = request.query_params
    experiment = params.get("experiment", "")[:200]
    job = params.get("job", "")[:64]
    runs = svc.runs.list_runs(
        user.project_id,
        experiment=experiment or None,
        job_id=job or None,
        limit=RECENT_RUNS,
    )
    context = {
        "nav": "runs",
        "runs": [run_row(r) for r in runs],
        "experiment": experiment,
        "job": job,
        "filtered": bool(experiment or job),
        "max_compare": MAX_COMPARE,
    }
    return render(request, "runs.html", context)


def compare_ids(request: Request) -> list[str]:
    """The runs to compare: ``?ids=a,b`` or ``?ids=a&ids=b`` (the list's checkboxes)."""
    ids: list[str] = []
    for value in request.query_params.getlist("ids"):
        for part in value.split(","):
            part = part.strip()[:64]
            if part and part not in ids:
                ids.append(part)
    return ids


def compare_view(report: Mapping[str, Any], only_differs: bool) -> dict[str, Any]:
    """The comparison as the page shows it: a column per run, rows of params and summary
    values (those that differ marked), and one overlaid chart per metric."""
    runs = [run_row(r) for r in report["runs"]]
    labels = {r["id"]: f"{r['name'] or r['short']} ({r['short']})" for r in runs}

    def rows(table: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "key": row["key"],
                "differs": row["differs"],
                "cells": [fmt_value(v) for v in row["values"]],
            }
            for row in table
            if row["differs"] or not only_differs
        ]

    metrics: Mapping[str, Mapping[str, list[list[float]]]] = report["metrics"]
    keys = metric_order([key for series in metrics.values() for key in series])[:MAX_CHARTS]
    charts: list[dict[str, Any]] = [
        {
            "key": key,
            "chart": series_chart(
                [(labels[r["id"]], metrics[r["id"]][key]) for r in runs if key in metrics[r["id"]]],
                key,
            ),
        }
        for key in keys
    ]
    for item in charts:
        item["chart"]["legend"] = True
    facts: list[dict[str, Any]] = [
        {"key": "status", "cells": [r["status"] for r in runs]},
        {"key": "kind", "cells": [r["kind"] for r in runs]},
        {"key": "experiment", "cells": [r["experiment"] or "—" for r in runs]},
        {"key": "git commit", "cells": [(r["git_commit"] or "—")[:12] for r in runs]},
    ]
    for fact in facts:
        fact["differs"] = len(set(fact["cells"])) > 1
    return {
        "runs": runs,
        "facts": facts,
        "params": rows(report["params"]),
        "summary": rows(report["summary"]),
        "charts": charts,
        "differing": sum(r["differs"] for r in [*report["params"], *report["summary"]]),
    }


@router.get("/runs/compare")
def compare_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Runs side by side: their params and summaries with the differing rows marked
    (``?only=differs`` hides the rest), and every metric's curves overlaid."""
    svc = services(request)
    ids = compare_ids(request)
    only_differs = request.query_params.get("only") == "differs"
    context: dict[str, Any] = {
        "nav": "runs",
        "ids": ids,
        "only_differs": only_differs,
        "view": None,
        "error": None,
        "all_url": compare_url(ids),
        "differs_url": compare_url(ids) + "&only=differs",
    }
    status = 200
    try:
        if len(ids) < 2:
            raise PageError(400, "Pick at least two runs to compare.")
        if len(ids) > MAX_COMPARE:
            raise PageError(400, f"Compare at most {MAX_COMPARE} runs at a time.")
        report = svc.runs.compare(user.project_id, ids)
        context["view"] = compare_view(report, only_differs)
    except (PageError, ServiceError) as exc:
        context["error"], status = exc.message, exc.status_code
    return render(request, "runs_compare.html", context, status_code=status)


@router.post("/runs/{run_id}/mlflow")
async def export_run_to_mlflow(
    request: Request, run_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Copy the run to the configured MLflow tracking store and show where it went."""
    svc = services(request)
    try:
        exported = await run_in_threadpool(
            svc.runs.export_mlflow, user.project_id, run_id, svc.settings.mlflow_tracking_uri
        )
    except ServiceError as exc:
        return _run_page(request, run_id, user, error=exc.message, status_code=exc.status_code)
    return RedirectResponse(
        f"{run_url(run_id)}?mlflow={quote(exported['mlflow_run_id'], safe='')}", status_code=303
    )


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A run: its params, summary, inputs and artifacts, the system it ran on, the package
    versions and git commit, and a chart of every metric it logged."""
    return _run_page(request, run_id, user)


def _run_page(
    request: Request, run_id: str, user: Principal, error: str | None = None, status_code: int = 200
) -> Response:
    svc = services(request)
    try:
        run = svc.runs.get(user.project_id, run_id)
    except ServiceError as exc:
        title = "Run not found" if exc.status_code == 404 else "Run"
        return error_page(request, exc.status_code, title, exc.message, ("/runs", "All runs"))
    series: Mapping[str, list[list[float]]] = run["metrics"]
    keys = metric_order(list(series))
    charts = [
        {
            "key": key,
            "chart": series_chart([(key, series[key])], key),
            "points": len(series[key]),
            "last": series[key][-1][1] if series[key] else None,
        }
        for key in keys[:MAX_CHARTS]
    ]
    context = {
        "nav": "runs",
        "run": run_row(run),
        "params": [(k, fmt_value(v)) for k, v in flatten(run["params"]).items()],
        "summary": [(k, fmt_value(v)) for k, v in flatten(run["summary"]).items()],
        "system": [(k, fmt_value(v)) for k, v in flatten(run["system"]).items()],
        "packages": sorted((run["packages"] or {}).items()),
        "inputs": [clip(str(ref), 300) for ref in run["inputs"] or []],
        "artifacts": [
            {**a, "url": version_url(a["name"]) if "@" in str(a.get("name", "")) else None}
            for a in run["artifacts"] or []
            if isinstance(a, Mapping)
        ],
        "charts": charts,
        "more_metrics": max(0, len(keys) - MAX_CHARTS),
        "mlflow_configured": bool(svc.settings.mlflow_tracking_uri),
        "mlflow_run_id": request.query_params.get("mlflow"),
        "error": error,
    }
    return render(request, "run.html", context, status_code=status_code)
