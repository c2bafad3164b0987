"""The loop's own steps, as the ``loop.step`` job kind: collect, dataset, gate, approval,
canary and decision. (Training and registering are the tuning stage's ``tune.sft`` /
``tune.dpo`` and ``merge`` jobs; :mod:`flywheel.loop.driver` submits those.)

Each step reads the loop (its spec and what earlier steps found), does its work in a job
worker with the full service layer, and returns its result, which the driver stores on the
loop. Every step can run again after a failure: it starts from the stored state, and the
things it creates are new versions or checked first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select

from flywheel.datasets.store import TraceSelection
from flywheel.errors import ServiceError
from flywheel.evals.compare import compare_runs
from flywheel.evals.suites import SuiteSpec
from flywheel.experiments.spec import ExperimentSpec
from flywheel.jobs.context import JobContext
from flywheel.jobs.kinds import JobKind, register_job_kind
from flywheel.loop.spec import LoopSpec
from flywheel.security.rbac import ALL_PERMISSIONS, Principal
from flywheel.store.models import SpanRecord, TraceScore

__all__ = ["KIND", "loop_principal", "register_kinds"]

KIND = "loop.step"
ACTOR = "system:loop"
# Well-rated answers (at least this) are kept as training targets when include_positive.
POSITIVE_RATING = 0.75
# After serving the candidate in the catalog, how long the canary waits before it starts
# the experiment: replicas load a new config revision within their poll interval (3 s), and
# a call assigned to a model a replica does not know yet would count as an error.
CONFIG_SETTLE_SECONDS = 7.0


def loop_principal(project_id: str) -> Principal:
    """Who the loop acts as: it applies config revisions, requests approvals and starts
    experiments; the audit log names it ``key:loop``."""
    return Principal(
        kind="key",
        id="loop",
        name="loop",
        project_id=project_id,
        role="admin",
        permissions=ALL_PERMISSIONS,
    )


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loop_id: str = Field(min_length=1, max_length=32)
    step: str = Field(pattern=r"^(collect|dataset|gate|approval|canary|decision)$")


def _validate(params: dict[str, Any]) -> dict[str, Any]:
    try:
        return StepParams.model_validate(params).model_dump()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["params", *(str(part) for part in first["loc"])])
        raise ServiceError(400, f"{where}: {first['msg']}", "invalid_value", where) from None


def _result(loop: dict[str, Any], step: str) -> dict[str, Any]:
    for entry in loop["steps"]:
        if entry["name"] == step:
            return dict(entry.get("result") or {})
    return {}


# -- 1. collect -----------------------------------------------------------------------------


def route_base(svc: Any, route_name: str) -> str:
    """The model a route serves (its one model target, or its first), for the loop to tune;
    400 for a route that renders prompts or runs a pipeline."""
    route = next((r for r in svc.config.routes if r.name == route_name), None)
    if route is None:
        known = ", ".join(r.name for r in svc.config.routes) or "none"
        raise ServiceError(
            400, f"No route '{route_name}' in the running config; routes: {known}.", "route"
        )
    if route.pipeline is not None or route.prompt_targets:
        raise ServiceError(
            400,
            f"Route '{route_name}' renders prompts or runs a pipeline; the loop tunes the model "
            "of a route whose targets are models (optimise a prompt with "
            "`flywheel prompts optimize`).",
            "invalid_value",
            "route",
        )
    models = [t.model for t in route.targets if t.model]
    if not models:
        raise ServiceError(400, f"Route '{route_name}' has no model target.", "route")
    return str(models[0])


def _judged_bad(svc: Any, project_id: str, spec: LoopSpec, since: float) -> set[str]:
    """Traces of the route an online judge scored at or below the threshold."""
    if not spec.judge:
        return set()
    with svc.db.session() as session:
        rows = session.scalars(
            select(TraceScore.trace_id).where(
                TraceScore.project_id == project_id,
                TraceScore.name == spec.judge,
                TraceScore.value <= spec.judge_threshold,
                TraceScore.trace_id.in_(
                    select(SpanRecord.trace_id).where(
                        SpanRecord.project_id == project_id,
                        SpanRecord.route == spec.route,
                        SpanRecord.start_time >= since,
                    )
                ),
            )
        )
        return set(rows)


def collect(ctx: JobContext, svc: Any, loop: dict[str, Any], spec: LoopSpec) -> dict[str, Any]:
    """The route's bad answers in the window: thumbs-down (or ratings at or below
    ``max_rating``) and low judge scores; how many carry a correction; the well-rated answers
    kept as targets; and the base model to tune."""
    project_id = loop["project_id"]
    until = time.time()
    since = until - spec.window_hours * 3600
    base = spec.base or route_base(svc, spec.route)
    window = TraceSelection(
        route=spec.route, since=since, until=until, limit=spec.max_examples, expected="correction"
    )
    rated_bad = svc.datasets.trace_items(
        project_id, dataclasses.replace(window, max_rating=spec.max_rating)
    )
    judged = _judged_bad(svc, project_id, spec, since)
    seen = {item["metadata"]["trace_id"] for item in rated_bad}
    judged_items = []
    if judged - seen:
        judged_items = svc.datasets.trace_items(
            project_id,
            dataclasses.replace(window, trace_ids=sorted(judged - seen)[: spec.max_examples]),
        )
    bad = rated_bad + judged_items
    corrected = [item for item in bad if item.get("expected")]
    positive: list[dict[str, Any]] = []
    if spec.include_positive and spec.method == "sft":
        positive = svc.datasets.trace_items(
            project_id,
            dataclasses.replace(window, min_rating=POSITIVE_RATING, expected="output"),
        )
    ctx.log(
        f"route {spec.route}: {len(bad)} bad answers ({len(rated_bad)} by feedback, "
        f"{len(judged_items)} by judge {spec.judge or '-'}), {len(corrected)} with a "
        f"correction; {len(positive)} well-rated answers"
    )
    return {
        "base": base,
        "since": since,
        "until": until,
        "bad": len(bad),
        "by_feedback": len(rated_bad),
        "by_judge": len(judged_items),
        "corrected": len(corrected),
        "positive": len(positive),
        "enough": len(corrected) >= spec.min_examples,
        "needed": spec.min_examples,
        "corrected_trace_ids": [item["metadata"]["trace_id"] for item in corrected],
        "positive_trace_ids": [item["metadata"]["trace_id"] for item in positive],
        "uncorrected_trace_ids": [
            item["metadata"]["trace_id"] for item in bad if not item.get("expected")
        ][:200],
    }


# -- 2. dataset -----------------------------------------------------------------------------


def dataset(ctx: JobContext, svc: Any, loop: dict[str, Any], spec: LoopSpec) -> dict[str, Any]:
    """A new version of the loop's dataset: each corrected bad answer with its correction as
    the target (and the bad answer as ``metadata.rejected``, DPO's rejected side), plus the
    well-rated answers as targets for SFT."""
    project_id = loop["project_id"]
    found = _result(loop, "collect")
    corrected = svc.datasets.trace_items(
        project_id,
        TraceSelection(
            trace_ids=found["corrected_trace_ids"], expected="correction", limit=100_000
        ),
    )
    items = []
    for item in corrected:
        metadata = dict(item.get("metadata") or {})
        metadata.update(rejected=metadata.get("answer"), source="correction")
        items.append({**item, "metadata": metadata})
    if found.get("positive_trace_ids"):
        positive = svc.datasets.trace_items(
            project_id,
            TraceSelection(trace_ids=found["positive_trace_ids"], expected="output", limit=100_000),
        )
        items += [
            {**i, "metadata": {**(i.get("metadata") or {}), "source": "rated"}} for i in positive
        ]
    name = spec.registry_name
    version, created = svc.datasets.create_version(
        project_id,
        name,
        items,
        author=ctx.actor,
        message=f"loop {loop['id'][:8]} on route {spec.route}: {len(corrected)} corrected bad "
        f"answers, {len(items) - len(corrected)} well-rated answers",
        source={"kind": "loop", "loop": loop["id"], "route": spec.route},
        test_fraction=spec.test_fraction,
    )
    ref = f"{version['dataset']}@{version['version']}"
    _, stored = svc.datasets.items(project_id, name, version["version"])
    held_out = sum(1 for item in stored if item["split"] == "test")
    if not held_out:
        raise ServiceError(
            400, f"{ref} has no held-out (test) items for the eval gate; raise test_fraction."
        )
    ctx.log(f"dataset {ref}: {version['items']} items ({'new' if created else 'unchanged'})")
    return {
        "dataset": ref,
        "items": version["items"],
        "corrections": len(corrected),
        "rated": len(items) - len(corrected),
        "created": created,
        "train": len(stored) - held_out,
        "test": held_out,
    }


# -- 5. gate --------------------------------------------------------------------------------


async def _run_both(
    svc: Any, project_id: str, spec: SuiteSpec, targets: dict[str, str], actor: str
) -> dict[str, dict[str, Any]]:
    started = {
        side: await svc.evals.start(project_id, spec, author=actor, target=target)
        for side, target in targets.items()
    }
    await asyncio.gather(*(svc.evals.wait(run["id"]) for run in started.values()))
    await asyncio.to_thread(svc.writer.flush)
    return {side: svc.evals.get(project_id, run["id"]) for side, run in started.items()}


def gate(ctx: JobContext, svc: Any, loop: dict[str, Any], spec: LoopSpec) -> dict[str, Any]:
    """Serve the candidate in the catalog (experimental: callable by name, on no route), then
    let it and the production route answer the dataset's held-out items, and compare."""
    project_id = loop["project_id"]
    candidate_ref = _result(loop, "register")["model"]
    data = _result(loop, "dataset")["dataset"]
    served = svc.serve_model(
        loop_principal(project_id), candidate_ref, route=None, status="experimental"
    )
    ctx.log(f"{candidate_ref} is served as catalog model {served['served_name']}")
    name, _, version = data.partition("@")
    suite = SuiteSpec(
        name=f"loop-gate-{loop['id'][:8]}",
        dataset=name,
        dataset_version=int(version),
        split="test",
        target=spec.route,
        params={"temperature": 0, "max_tokens": spec.gate.max_tokens},
        scorers=[spec.gate.scorer],
        alpha=spec.gate.alpha,
        cache=False,
    )
    scorer_name = suite.build_scorers()[0].name
    runs = asyncio.run(
        _run_both(
            svc,
            project_id,
            suite,
            {"production": spec.route, "candidate": served["served_name"]},
            ctx.actor,
        )
    )
    for side, run in runs.items():
        if run["status"] != "completed":
            raise ServiceError(
                500, f"the {side} eval run {run['id']} {run['status']}: {run.get('error')}"
            )
    results = {side: svc.evals.results(project_id, run["id"]) for side, run in runs.items()}
    comparison = compare_runs(
        runs["production"],
        runs["candidate"],
        results["production"],
        results["candidate"],
        alpha=spec.gate.alpha,
    )
    primary = comparison["scorers"].get(scorer_name, {})
    delta = primary.get("delta")
    improved = delta is not None and delta >= spec.gate.min_improvement
    passed = bool(comparison["gate"]["passed"]) and improved
    production_mean = (
        ((runs["production"]["summary"] or {}).get("scorers") or {})
        .get(scorer_name, {})
        .get("mean")
    )
    candidate_mean = (
        ((runs["candidate"]["summary"] or {}).get("scorers") or {}).get(scorer_name, {}).get("mean")
    )
    summary = (
        f"{scorer_name} {_fmt(production_mean)} → {_fmt(candidate_mean)} "
        f"(delta {_fmt(delta)}, p {_fmt(primary.get('p_value'))}, "
        f"{comparison['items']} held-out items): {'passed' if passed else 'failed'}"
    )
    ctx.log(f"gate {summary}")
    return {
        "passed": passed,
        "summary": summary,
        "scorer": scorer_name,
        "delta": delta,
        "p_value": primary.get("p_value"),
        "production_mean": production_mean,
        "candidate_mean": candidate_mean,
        "min_improvement": spec.gate.min_improvement,
        "checks": comparison["gate"]["checks"],
        "items": comparison["items"],
        "production_run": runs["production"]["id"],
        "candidate_run": runs["candidate"]["id"],
        "served_name": served["served_name"],
        "revision": served.get("revision"),
    }


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# -- 6. approval ----------------------------------------------------------------------------


def approval(ctx: JobContext, svc: Any, loop: dict[str, Any], spec: LoopSpec) -> dict[str, Any]:
    """Ask a reviewer to put the approval label on the candidate version (the driver then
    waits for the decision); an unprotected label moves at once."""
    project_id = loop["project_id"]
    ref = _result(loop, "register")["model"]
    name, _, version = ref.partition("@")
    gate_result = _result(loop, "gate")
    caller = loop_principal(project_id)
    previous = svc.label_version(project_id, "model", name, spec.approval_label)
    if not svc.registry.is_protected(spec.approval_label):
        svc.registry.set_alias(project_id, name, spec.approval_label, int(version), caller.actor)
        ctx.log(f"'{spec.approval_label}' is not protected: moved onto {ref}")
        return {
            "approval_id": None,
            "model": ref,
            "label": spec.approval_label,
            "previous": previous,
        }
    try:
        requested = svc.approvals.request(
            caller,
            "model",
            name,
            int(version),
            spec.approval_label,
            comment=f"Loop {loop['id']} on route '{spec.route}': eval gate "
            f"{gate_result.get('summary')}. On approval, {ref} runs as a "
            f"{spec.canary.share:.0%} canary before it serves the route.",
        )
    except ServiceError as exc:
        if exc.code != "conflict":
            raise
        # A retried step whose request was filed by the earlier attempt: wait on that one.
        pending = [
            a
            for a in svc.approvals.list_requests(project_id, "pending")
            if a["resource_type"] == "model"
            and a["resource_name"] == name
            and str(a["resource_version"]) == version
        ]
        if not pending:
            raise
        requested = pending[0]
    ctx.log(f"approval {requested['id']} requested: {ref} → '{spec.approval_label}'")
    return {
        "approval_id": requested["id"],
        "model": ref,
        "label": spec.approval_label,
        "previous": previous,
    }


# -- 7. canary ------------------------------------------------------------------------------


def canary(ctx: JobContext, svc: Any, loop: dict[str, Any], spec: LoopSpec) -> dict[str, Any]:
    """Mark the approved candidate approved in the catalog and start the canary experiment:
    the route as configured against the candidate on ``canary.share`` of the traffic."""
    project_id = loop["project_id"]
    ref = _result(loop, "register")["model"]
    caller = loop_principal(project_id)
    existing = _result(loop, "canary").get("experiment_id")
    if existing:  # a retried step: the experiment exists already
        return {"experiment_id": existing}
    served = svc.serve_model(caller, ref, route=None, status="approved")
    ctx.log(f"{served['served_name']} is approved in the catalog; waiting for replicas")
    time.sleep(CONFIG_SETTLE_SECONDS)
    canary_spec = spec.canary
    experiment = ExperimentSpec.model_validate(
        {
            "name": f"loop {spec.route} {ref}",
            "route": spec.route,
            "variants": [
                {"name": "production", "share": round(1 - canary_spec.share, 6)},
                {"name": "candidate", "model": served["served_name"], "share": canary_spec.share},
            ],
            "control": "production",
            "unit": canary_spec.unit,
            "metric": {"source": canary_spec.metric},
            "guardrails": canary_spec.guardrails.model_dump(),
            "alpha": canary_spec.alpha,
            "min_samples": canary_spec.min_samples,
        }
    )
    created = svc.experiments.create(
        project_id, caller.actor, experiment, svc.config, svc.prompts.get
    )
    ctx.log(f"canary experiment {created['id']} started on route {spec.route}")
    return {
        "experiment_id": created["id"],
        "served_name": served["served_name"],
        "revision": served.get("revision"),
    }


# -- 8. decision ----------------------------------------------------------------------------


def decision(ctx: JobContext, svc: Any, loop: dict[str, Any], spec: LoopSpec) -> dict[str, Any]:
    """Act on the canary's verdict: a win already serves the candidate (the experiment applied
    the config revision); a loss or a breach puts the approval label back where it was."""
    project_id = loop["project_id"]
    experiment = svc.experiments.get(project_id, _result(loop, "canary")["experiment_id"])
    status = experiment["status"]
    outcome = experiment.get("outcome") or {}
    if status == "promoted":
        ctx.log(f"canary won: {experiment.get('reason')}")
        return {
            "outcome": "promoted",
            "reason": experiment.get("reason"),
            "revision": outcome.get("revision"),
            "experiment_id": experiment["id"],
        }
    approved = _result(loop, "approval")
    reverted = None
    if approved.get("approval_id") or approved.get("label"):
        name, _, _ = approved["model"].partition("@")
        previous = approved.get("previous")
        if approved.get("approval_id"):
            svc.registry.revert_label(
                project_id, name, approved["label"], previous, ACTOR, approved["approval_id"]
            )
        elif previous is not None:
            svc.registry.set_alias(project_id, name, approved["label"], previous, ACTOR)
        reverted = {"label": approved["label"], "to_version": previous}
        ctx.log(f"canary lost: '{approved['label']}' of {name} back to {previous}")
    return {
        "outcome": "rolled_back",
        "reason": experiment.get("reason"),
        "experiment_id": experiment["id"],
        "reverted": reverted,
    }


STEP_FUNCTIONS: dict[str, Callable[[JobContext, Any, dict[str, Any], LoopSpec], dict[str, Any]]] = {
    "collect": collect,
    "dataset": dataset,
    "gate": gate,
    "approval": approval,
    "canary": canary,
    "decision": decision,
}


def run_step(ctx: JobContext) -> dict[str, Any]:
    """Run one of the loop's own steps in this worker."""
    svc = ctx.services()
    loop = svc.loops.load(ctx.params["loop_id"])
    if loop["project_id"] != ctx.project_id:
        raise ServiceError(404, f"No loop '{ctx.params['loop_id']}'.", "not_found")
    spec = LoopSpec.model_validate(loop["spec"])
    return STEP_FUNCTIONS[ctx.params["step"]](ctx, svc, loop, spec)


def register_kinds() -> None:
    """Make ``loop.step`` available (imported by the job registry on first use)."""
    register_job_kind(
        JobKind(
            name=KIND,
            run=run_step,
            validate=_validate,
            description="One step of `flywheel loop` (collect, dataset, gate, approval, "
            "canary, decision).",
        )
    )


register_kinds()
