"""The ``eval.run`` job kind: an eval run in a job worker instead of the server's event loop.

The worker starts the run with the same :class:`~flywheel.evals.runner.EvalRunner` code path
as ``POST /api/evals/runs``, so the run row, its per-item results and its summary are stored
exactly as for a run started through the API (and show in ``/api/evals/runs`` and the UI).
The job follows the run: its progress is the run's ``done`` of ``total``, its log has a line
per stage, cancelling the job cancels the run, and its result is the run's id and summary.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.errors import ServiceError
from flywheel.evals.runner import EvalRunner
from flywheel.evals.suites import EvalSuites, SuiteSpec, expand_target, parse_suite
from flywheel.jobs.context import JobContext
from flywheel.jobs.kinds import JobKind, register_job_kind
from flywheel.security import Permission

KIND = "eval.run"
# A stored suite's name, or NAME@N: that suite on version N of its dataset (a suite itself
# has no versions; its dataset does).
SUITE_REF = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]{1,9})?$"
# How often the job looks at the run (progress, cancel).
POLL_SECONDS = 0.5
# Of the job's progress bar, the share the answering phase fills; scoring takes the rest.
ANSWERING_SHARE = 0.9


class EvalJobServices(Protocol):
    """What the job uses of the service layer (the worker builds it on first use)."""

    suites: EvalSuites
    evals: EvalRunner
    writer: Any


class EvalJobParams(BaseModel):
    """An ``eval.run`` job's params: the suite (stored, or inline as ``spec``), an optional
    target override (as ``POST /api/evals/runs`` takes it) and a timeout."""

    model_config = ConfigDict(extra="forbid")

    suite: str | None = Field(
        default=None,
        pattern=SUITE_REF,
        description="A stored suite's name; NAME@N runs it on version N of its dataset.",
    )
    spec: dict[str, Any] | None = Field(
        default=None, description="An inline suite (same fields as a stored one)."
    )
    target: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Overrides the suite's target; for a prompt suite a bare label or "
        "version ('production', '4') means that version of the suite's prompt.",
    )
    timeout: float | None = Field(default=None, gt=0, description="Seconds before it stops.")


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params as stored (an inline suite checked and normalized), or a 400 naming the
    field at fault (``params.suite``, ``params.spec.scorers``...)."""
    try:
        parsed = EvalJobParams.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["params", *(str(part) for part in first["loc"])])
        raise ServiceError(400, f"{where}: {first['msg']}", "invalid_value", where) from None
    if (parsed.suite is None) == (parsed.spec is None):
        raise ServiceError(
            400, "params: give either 'suite' or 'spec'.", "invalid_value", "params.suite"
        )
    data = parsed.model_dump()
    if parsed.spec is not None:
        try:
            data["spec"] = parse_suite(parsed.spec).model_dump(mode="json")
        except ServiceError as exc:
            where = f"params.spec.{exc.param}" if exc.param else "params.spec"
            raise ServiceError(
                400, f"params.spec: {exc.message}", exc.code or "invalid_value", where
            ) from None
    return data


def _suite(
    svc: EvalJobServices, project_id: str, params: dict[str, Any]
) -> tuple[SuiteSpec, str | None]:
    """The suite to run and its stored name (None for an inline one)."""
    if params.get("spec") is not None:
        return parse_suite(params["spec"]), None
    name, _, version = str(params["suite"]).partition("@")
    spec = svc.suites.get(project_id, name)
    if version:
        spec = spec.model_copy(update={"dataset_version": int(version)})
    return spec, name


def _summary_line(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "no summary"
    parts = []
    for name, info in (summary.get("scorers") or {}).items():
        mean = info.get("mean")
        shown = "n/a" if mean is None else f"{mean:.3f}"
        verdict = {True: " pass", False: " FAIL", None: ""}[info.get("passed")]
        parts.append(f"{name} {shown}{verdict}")
    state = "passed" if summary.get("passed") else "did not pass"
    return f"{', '.join(parts)}; {state}"


async def _follow(ctx: JobContext, svc: EvalJobServices) -> dict[str, Any]:
    params = ctx.params
    spec, suite_name = await asyncio.to_thread(_suite, svc, ctx.project_id, params)
    target = expand_target(spec.target, params["target"]) if params.get("target") else None
    if ctx.cancelled():
        ctx.log("cancelled before the run started")
        return {"run_id": None, "status": "cancelled"}
    run = await svc.evals.start(
        ctx.project_id, spec, author=ctx.actor, target=target, suite_name=suite_name
    )
    run_id, total = run["id"], run["total"]
    ctx.log(
        f"eval run {run_id} started: {suite_name or 'inline suite ' + spec.name} on "
        f"{run['dataset']}@{run['dataset_version']} ({total} items), "
        f"target {run['resolved_target']}"
    )
    await asyncio.to_thread(ctx.progress, 0.0, f"run {run_id}: 0/{total} answered")
    # ``wait`` ends with the run (completed, failed or cancelled) and never raises.
    waiter = asyncio.create_task(svc.evals.wait(run_id))
    phase = ""
    while not waiter.done():
        await asyncio.wait({waiter}, timeout=POLL_SECONDS)
        if waiter.done():
            break
        if ctx.cancelled():
            ctx.log(f"cancelling eval run {run_id}")
            # (It may have ended on its own meanwhile: then there is nothing to cancel.)
            with contextlib.suppress(ServiceError):
                await svc.evals.cancel(ctx.project_id, run_id)
            break
        view = await asyncio.to_thread(svc.evals.get, ctx.project_id, run_id)
        current = str(view.get("phase") or "answering")
        if current != phase:
            phase = current
            ctx.log(f"{phase} ({view['done']}/{total} answered)")
        if phase == "scoring":
            fraction, message = ANSWERING_SHARE, f"run {run_id}: scoring {total} answers"
        else:
            fraction = ANSWERING_SHARE * view["done"] / max(total, 1)
            message = f"run {run_id}: {view['done']}/{total} answered"
            if view["failed"]:
                message += f", {view['failed']} failed"
        await asyncio.to_thread(ctx.progress, fraction, message)
    await waiter
    # The run's gateway calls are traced by this process's writer: they must land first.
    await asyncio.to_thread(svc.writer.flush)
    final = await asyncio.to_thread(svc.evals.get, ctx.project_id, run_id)
    status = final["status"]
    if status == "failed":
        raise ServiceError(500, f"eval run {run_id} failed: {final['error']}", "eval_failed")
    summary = final["summary"]
    if status == "completed":
        ctx.log(f"eval run {run_id} completed: {_summary_line(summary)}")
        await asyncio.to_thread(ctx.progress, 1.0, f"run {run_id}: completed")
    else:
        ctx.log(f"eval run {run_id} {status} at {final['done']}/{total} answered")
    return {
        "run_id": run_id,
        "status": status,
        "suite": suite_name,
        "dataset": final["dataset"],
        "dataset_version": final["dataset_version"],
        "target": final["target"],
        "resolved_target": final["resolved_target"],
        "total": final["total"],
        "done": final["done"],
        "failed": final["failed"],
        "cache_hits": final["cache_hits"],
        "passed": summary.get("passed") if summary else None,
        "summary": summary,
    }


def run_eval_job(ctx: JobContext) -> dict[str, Any]:
    """Run the suite in this worker and follow the run to its end."""
    svc: EvalJobServices = ctx.services()
    return asyncio.run(_follow(ctx, svc))


def register_kinds() -> None:
    """Make ``eval.run`` available (imported by the job registry on first use)."""
    register_job_kind(
        JobKind(
            KIND,
            run_eval_job,
            validate_params,
            "Run an eval suite (stored or inline) as a job: the run is stored as any other.",
            # Submitting it starts an eval run: what POST /api/evals/runs needs.
            permission=Permission.EVALS_WRITE.value,
        )
    )


register_kinds()
