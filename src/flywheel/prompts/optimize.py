"""Prompt optimisation (meta-prompting): the ``prompt.optimize`` job kind.

An LLM (the ``proposer`` route, called through the gateway) is shown a prompt version, the
dataset items it fails on (with the scorer's rationale where it gives one) and asked for a
full replacement template. Each valid proposal is evaluated on the same dataset version
with the same scorer as the baseline, by the ordinary :class:`~flywheel.evals.runner.EvalRunner`
(so every run is stored and shows with the other eval runs), and compared item by item with
the baseline (:func:`~flywheel.evals.compare.compare_runs`). The best variant that beats the
baseline becomes a NEW version of the prompt, whose message names the job; no label moves:
promoting it stays a human (or approval) decision. With no winner nothing is created.

A variant is not a stored version, so its runs go through a second runner whose "target" is
the variant: its caller renders the variant's template exactly as the gateway renders a
prompt target (the base version's variables schema, model and parameters) and sends the
rendered messages through the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.config.schema import RESOURCE_NAME_PATTERN
from flywheel.errors import ServiceError
from flywheel.evals.base import ScorerError, build_scorer
from flywheel.evals.compare import compare_runs
from flywheel.evals.runner import EvalRunner
from flywheel.evals.suites import SuiteSpec, parse_suite
from flywheel.jobs.context import JobContext
from flywheel.jobs.kinds import JobKind, register_job_kind
from flywheel.prompts.registry import VersionView
from flywheel.prompts.templates import (
    Template,
    TemplateError,
    check_template,
    render_messages,
    template_variables,
)
from flywheel.security import Permission

KIND = "prompt.optimize"
DATASET_REF = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]{1,9})?$"
BASE_REF = r"^([a-z][a-z0-9_-]{0,63}|[0-9]{1,9})$"
VARIANT_PREFIX = "optimize:"
POLL_SECONDS = 0.5
# What of a failing item the proposer sees (a long output is cut: it needs the gist).
MAX_SHOWN_CHARS = 600
MAX_TEMPLATE_CHARS = 50_000
PROPOSER_MAX_TOKENS = 1024
PROPOSER_TEMPERATURE = 0.7
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)

SYSTEM_PROMPT = """You improve prompt templates for a language-model application.
Templates are Jinja2: variables are written {{ name }}. You are given the current template,
the variables it may use, how it is scored, and the dataset items it does worst on.
Propose ONE improved template that will score better on items like these.
Reply with the full replacement template (not a diff) in a single fenced code block tagged
jinja; a chat template (a list of role/content messages) goes in a fenced code block tagged
json, as a JSON list. Use only the variables listed. Do not explain after the block."""


class OptimizeParams(BaseModel):
    """A ``prompt.optimize`` job's params."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(pattern=RESOURCE_NAME_PATTERN, description="The prompt's name.")
    base: str | None = Field(
        default=None,
        pattern=BASE_REF,
        description="The version (number or label) to improve; default: the latest.",
    )
    dataset: str = Field(pattern=DATASET_REF, description="A dataset, or NAME@N for version N.")
    split: Literal["train", "test"] | None = None
    scorer: str | dict[str, Any] = Field(description="A scorer spec, as in a suite.")
    variants: int = Field(default=3, ge=1, le=10, description="Proposals per round.")
    rounds: int = Field(default=1, ge=1, le=5, description="Rounds of proposals.")
    proposer: str = Field(
        default="default", min_length=1, max_length=256, description="Route or model."
    )
    instructions: str = Field(
        default="", max_length=4000, description="Extra guidance for the proposer."
    )
    max_failures: int = Field(default=5, ge=1, le=20, description="Failing items shown.")
    require_significant: bool = Field(
        default=False, description="Only a significant improvement (p < alpha) wins."
    )
    concurrency: int = Field(default=4, ge=1, le=64)


def _invalid(where: str, message: str, code: str = "invalid_value") -> ServiceError:
    return ServiceError(400, f"{where}: {message}", code, where)


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params as stored (defaults filled), or a 400 naming the field at fault."""
    try:
        parsed = OptimizeParams.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["params", *(str(part) for part in first["loc"])])
        raise _invalid(where, first["msg"]) from None
    try:
        build_scorer(parsed.scorer)
    except ScorerError as exc:
        raise _invalid("params.scorer", exc.message, exc.code or "invalid_scorer") from None
    return parsed.model_dump()


# -- proposals ---------------------------------------------------------------------------------


class ProposalError(ValueError):
    """Why a proposal was dropped."""


def parse_proposal(text: str, *, chat: bool) -> Template:
    """The template in a proposer's answer: a JSON object ``{"template": ...}``, or the last
    fenced block (a JSON list of messages for a chat template, else its text as is)."""
    stripped = text.strip()
    with contextlib.suppress(ValueError):
        data = json.loads(stripped)
        if isinstance(data, dict) and "template" in data:
            return _as_template(data["template"], chat=chat)
    blocks = _FENCE.findall(text)
    if not blocks:
        raise ProposalError("the answer has no fenced code block and no JSON template")
    language, body = blocks[-1]
    body = body.strip("\r\n")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and "template" in data:
        return _as_template(data["template"], chat=chat)
    if chat or language.lower() == "json":
        if data is None:
            raise ProposalError("a chat template must be a JSON list of messages")
        return _as_template(data, chat=chat)
    return body


def _as_template(value: Any, *, chat: bool) -> Template:
    if isinstance(value, str):
        if chat:
            raise ProposalError("the prompt is a chat template: a list of messages is needed")
        return value
    if isinstance(value, list):
        return value
    raise ProposalError(f"a template is text or a list of messages, not {type(value).__name__}")


def check_variant(template: Template, base: VersionView, items: list[dict[str, Any]]) -> Template:
    """A proposal checked as a version would be (shape, syntax, sandbox), against the base
    version's variables schema, and rendered with every item's variables."""
    size = len(template) if isinstance(template, str) else len(json.dumps(template))
    if size > MAX_TEMPLATE_CHARS:
        raise ProposalError(f"the template is longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        check_template(template)
        used = template_variables(template)
    except TemplateError as exc:
        raise ProposalError(f"invalid template: {exc.message}") from None
    schema = base.variables or {}
    declared = set((schema.get("properties") or {}).keys())
    if schema.get("additionalProperties") is False and (unknown := sorted(set(used) - declared)):
        raise ProposalError(
            f"uses variables the prompt does not declare: {', '.join(unknown)} "
            f"(declared: {', '.join(sorted(declared)) or 'none'})"
        )
    for item in items:
        try:
            render_messages(template, item.get("variables") or {}, schema)
        except TemplateError as exc:
            raise ProposalError(
                f"does not render dataset item {item['position']}: {exc.message}"
            ) from None
    return template


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "…"


def _shown_template(template: Template) -> str:
    if isinstance(template, str):
        return f"```jinja\n{template}\n```"
    return f"```json\n{json.dumps(template, indent=2, ensure_ascii=False)}\n```"


def proposal_messages(
    *,
    template: Template,
    base: VersionView,
    scorer: str,
    summary: dict[str, Any],
    failures: list[dict[str, Any]],
    previous: list[Template],
    instructions: str,
    index: int,
    count: int,
) -> list[dict[str, str]]:
    """The proposer's request: the template, its variables, its score, its failures (with
    the scorer's rationale), the proposals made already, then the user's guidance."""
    properties = (base.variables or {}).get("properties") or {}
    parts = [
        "## Current template",
        _shown_template(template),
        f"Variables: {', '.join(sorted(properties)) or 'none'}.",
        f"## Scorer\n{scorer}: mean {_fmt(summary.get('mean'))} over {summary.get('n')} items "
        f"({'higher' if summary.get('higher_is_better', True) else 'lower'} is better).",
        "## Items it does worst on",
    ]
    if not failures:
        parts.append("(none: every item gets the best score; make it more robust)")
    for failure in failures:
        lines = [f"### Item {failure['position']}"]
        if failure.get("variables") is not None:
            lines.append(f"variables: {_short(failure['variables'])}")
        elif failure.get("input"):
            lines.append(f"input: {_short(failure['input'])}")
        lines.append(f"output: {_short(failure.get('output') or failure.get('error') or '')}")
        if failure.get("expected") is not None:
            lines.append(f"expected: {_short(failure['expected'])}")
        lines.append(f"score: {_fmt(failure.get('score'))}")
        if failure.get("rationale"):
            lines.append(f"scorer's rationale: {_short(failure['rationale'])}")
        parts.append("\n".join(lines))
    if previous:
        parts.append("## Already proposed (propose something different)")
        parts += [_shown_template(t) for t in previous]
    parts.append(f"This is proposal {index} of {count}.")
    if instructions.strip():
        parts.append(f"## Guidance\n{instructions.strip()}")
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _digest(template: Template) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:12]


# -- evaluating variants -----------------------------------------------------------------------


class _Cancelled(Exception):
    pass


@dataclass
class _Variants:
    """The variants being evaluated, by their run target, and how to call one."""

    base: VersionView
    templates: dict[str, Template] = field(default_factory=dict)

    def target(self, template: Template) -> str:
        target = f"{VARIANT_PREFIX}{self.base.name}@{self.base.version}~{_digest(template)}"
        self.templates[target] = template
        return target

    def resolve(self, project_id: str, target: str) -> str:
        if target not in self.templates:
            raise ServiceError(400, f"No variant '{target}'.", "unknown_target", "target")
        return target


def _variant_runner(svc: Any, ctx: JobContext, variants: _Variants) -> EvalRunner:
    """A runner whose targets are the variants: each item is rendered with the variant as
    the gateway renders a prompt target, then sent through the gateway."""
    base = variants.base

    async def call(project_id: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        body = dict(body)
        target = str(body.pop("model"))
        template = variants.templates[target]
        variables = body.pop("variables", None) or {}
        try:
            rendered = render_messages(template, variables, base.variables)
        except TemplateError as exc:
            raise ServiceError(400, exc.message, exc.code, exc.param) from None
        request = {
            **base.params,
            **body,
            "messages": [*rendered, *body.get("messages", [])],
            "model": base.model or "default",
        }
        attributes = {
            "flywheel.eval": True,
            "flywheel.prompt.name": base.name,
            "flywheel.prompt.optimize.job": ctx.job_id,
            "flywheel.prompt.optimize.variant": target,
        }
        result: tuple[dict[str, Any], dict[str, Any]] = await svc.eval_call(
            project_id, request, attributes
        )
        return result

    return EvalRunner(svc.db, svc.datasets, call, variants.resolve, lambda _target: True)


async def _evaluate(
    ctx: JobContext, runner: EvalRunner, spec: SuiteSpec, target: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``spec`` on ``target`` to its end (cancelled with the job); the finished run and
    its per-item results."""
    run = await runner.start(ctx.project_id, spec, author=ctx.actor, target=target)
    waiter = asyncio.create_task(runner.wait(run["id"]))
    while not waiter.done():
        await asyncio.wait({waiter}, timeout=POLL_SECONDS)
        if not waiter.done() and ctx.cancelled():
            with contextlib.suppress(ServiceError):
                await runner.cancel(ctx.project_id, run["id"])
            raise _Cancelled
    final = await asyncio.to_thread(runner.get, ctx.project_id, run["id"])
    if final["status"] != "completed":
        raise ServiceError(
            500, f"eval run {run['id']} {final['status']}: {final['error']}", "eval_failed"
        )
    results = await asyncio.to_thread(runner.results, ctx.project_id, run["id"])
    return final, results


def _failures(
    results: list[dict[str, Any]],
    items: dict[int, dict[str, Any]],
    scorer: str,
    higher: bool,
    limit: int,
) -> list[dict[str, Any]]:
    """The worst-scored items (errors first), those below the run's best score only."""
    scored = [r for r in results if r["scores"].get(scorer) is not None]
    values = [r["scores"][scorer] for r in scored]
    best = (max(values) if higher else min(values)) if values else None
    chosen: list[tuple[float, dict[str, Any]]] = []
    for result in results:
        value = result["scores"].get(scorer)
        if value is not None and value == best:
            continue
        rank = float("-inf") if value is None else (value if higher else -value)
        chosen.append((rank, result))
    chosen.sort(key=lambda pair: (pair[0], pair[1]["position"]))
    out = []
    for _, result in chosen[:limit]:
        item = items.get(result["position"], {})
        detail = (result.get("details") or {}).get(scorer) or {}
        rationale = detail.get("reason") or detail.get("rationale") or detail.get("raw")
        out.append(
            {
                "position": result["position"],
                "variables": item.get("variables"),
                "input": item.get("messages"),
                "expected": item.get("expected"),
                "output": result.get("output"),
                "error": result.get("error"),
                "score": result["scores"].get(scorer),
                "rationale": rationale or detail.get("error"),
            }
        )
    return out


def _row(run: dict[str, Any], scorer: str) -> dict[str, Any]:
    info = (run.get("summary") or {}).get("scorers", {}).get(scorer) or {}
    return {
        "run_id": run["id"],
        "mean": info.get("mean"),
        "low": info.get("low"),
        "high": info.get("high"),
        "n": info.get("n"),
        "errors": info.get("errors"),
    }


def _beats(row: dict[str, Any], baseline: dict[str, Any], higher: bool, significant: bool) -> bool:
    paired = row.get("comparison") or {}
    if paired.get("regressed") or row.get("mean") is None or baseline.get("mean") is None:
        return False
    better = row["mean"] > baseline["mean"] if higher else row["mean"] < baseline["mean"]
    return better and (bool(paired.get("improved")) or not significant)


async def optimize(ctx: JobContext, svc: Any) -> dict[str, Any]:
    """Propose, evaluate and (on a win) store a new version; the job's result."""
    params = ctx.params
    name = str(params["prompt"])
    selector: str | int | None = params.get("base")
    if isinstance(selector, str) and selector.isdecimal():
        selector = int(selector)
    base: VersionView = await asyncio.to_thread(svc.prompts.get, ctx.project_id, name, selector)
    if not svc.gateway.knows(params["proposer"]):
        # Checked before the baseline runs: every proposal would fail the same way.
        raise ServiceError(
            400,
            f"params.proposer: '{params['proposer']}' is no route or model here.",
            "unknown_target",
            "params.proposer",
        )
    dataset, _, version = str(params["dataset"]).partition("@")
    spec = parse_suite(
        {
            "name": "optimize",
            "dataset": dataset,
            "dataset_version": int(version) if version else None,
            "split": params.get("split"),
            "target": f"prompt:{name}@{base.version}",
            "scorers": [params["scorer"]],
            "concurrency": params["concurrency"],
        }
    )
    scorer = spec.build_scorers()[0]
    higher = scorer.higher_is_better
    chat = not isinstance(base.template, str)
    total_steps = 1 + params["rounds"] * params["variants"]
    steps = 0

    def advance(message: str) -> None:
        nonlocal steps
        steps += 1
        ctx.progress(min(steps / total_steps, 0.99), message)

    ctx.log(f"optimising {base.ref} on {params['dataset']} with {scorer.name}")
    dataset_version, item_list = await asyncio.to_thread(
        svc.datasets.items, ctx.project_id, spec.dataset, spec.dataset_version, split=spec.split
    )
    spec = spec.model_copy(update={"dataset_version": dataset_version["version"]})
    items = {item["position"]: item for item in item_list}
    result: dict[str, Any] = {
        "prompt": name,
        "base_version": base.version,
        "dataset": spec.dataset,
        "dataset_version": spec.dataset_version,
        "split": spec.split,
        "scorer": scorer.name,
        "higher_is_better": higher,
        "proposer": params["proposer"],
        "status": "running",
        "new_version": None,
        "baseline": None,
        "variants": [],
        "dropped": [],
    }
    variants = _Variants(base)
    runner = _variant_runner(svc, ctx, variants)
    try:
        base_run, base_results = await _evaluate(ctx, svc.evals, spec, spec.target)
        baseline = {"name": f"v{base.version} (baseline)", "template": base.template}
        baseline.update(_row(base_run, scorer.name))
        result["baseline"] = baseline
        ctx.log(f"baseline v{base.version}: {scorer.name} {_fmt(baseline['mean'])}")
        advance(f"baseline {scorer.name} {_fmt(baseline['mean'])}")
        current, current_results = base.template, base_results
        current_summary = {**baseline, "higher_is_better": higher}
        seen = {_digest(base.template)}
        for round_number in range(1, params["rounds"] + 1):
            proposed: list[Template] = []
            failures = _failures(
                current_results, items, scorer.name, higher, params["max_failures"]
            )
            round_rows = []
            for index in range(1, params["variants"] + 1):
                if ctx.cancelled():
                    raise _Cancelled
                label = f"{round_number}.{index}"
                messages = proposal_messages(
                    template=current,
                    base=base,
                    scorer=scorer.name,
                    summary=current_summary,
                    failures=failures,
                    previous=proposed,
                    instructions=params["instructions"],
                    index=index,
                    count=params["variants"],
                )
                body = {
                    "model": params["proposer"],
                    "messages": messages,
                    "temperature": PROPOSER_TEMPERATURE,
                    "max_tokens": PROPOSER_MAX_TOKENS,
                }
                try:
                    answer, _ = await svc.eval_call(
                        ctx.project_id,
                        body,
                        {"flywheel.prompt.optimize.job": ctx.job_id, "flywheel.eval": True},
                    )
                    choices = answer.get("choices") or [{}]
                    text = str((choices[0].get("message") or {}).get("content") or "")
                    template = check_variant(
                        parse_proposal(text, chat=chat), base, list(items.values())
                    )
                    digest = _digest(template)
                    if digest in seen:
                        raise ProposalError("the same as the current template or a proposal")
                    seen.add(digest)
                except (ProposalError, ServiceError) as exc:
                    reason = exc.message if isinstance(exc, ServiceError) else str(exc)
                    ctx.log(f"proposal {label} dropped: {reason}")
                    result["dropped"].append({"name": f"variant {label}", "reason": reason})
                    advance(f"proposal {label} dropped")
                    continue
                proposed.append(template)
                run, run_results = await _evaluate(ctx, runner, spec, variants.target(template))
                paired = compare_runs(base_run, run, base_results, run_results)
                row: dict[str, Any] = {"name": f"variant {label}", "template": template}
                row.update(_row(run, scorer.name))
                row["comparison"] = paired["scorers"].get(scorer.name)
                row["beats_baseline"] = _beats(row, baseline, higher, params["require_significant"])
                result["variants"].append(row)
                round_rows.append((row, run_results))
                delta = (row["comparison"] or {}).get("delta")
                ctx.log(
                    f"variant {label}: {scorer.name} {_fmt(row['mean'])} "
                    f"(delta {_fmt(delta)}, p = {_fmt((row['comparison'] or {}).get('p_value'))})"
                )
                advance(f"variant {label}: {scorer.name} {_fmt(row['mean'])}")
            # The next round improves on this round's best, if it beat what came before.
            for row, run_results in round_rows:
                if _beats(row, current_summary, higher, False):
                    current, current_results = row["template"], run_results
                    current_summary = {**row, "higher_is_better": higher}
        winners = [r for r in result["variants"] if r["beats_baseline"]]
        if winners:
            best = max(winners, key=lambda r: r["mean"] if higher else -r["mean"])
            result["best"] = best["name"]
            created = await asyncio.to_thread(_store, svc, ctx, base, best, result)
            result["new_version"] = created.version
            result["status"] = "improved"
            ctx.log(f"{best['name']} stored as {created.ref} (no label moved)")
        else:
            result["best"] = None
            result["status"] = "no_improvement"
            ctx.log("no variant beat the baseline: nothing was created")
    except _Cancelled:
        ctx.log("cancelled")
        result["status"] = "cancelled"
    finally:
        with contextlib.suppress(Exception):  # traces of this process's calls must land
            await asyncio.to_thread(svc.writer.flush)
    ctx.progress(1.0, result["status"])
    return result


def _store(
    svc: Any, ctx: JobContext, base: VersionView, best: dict[str, Any], result: dict[str, Any]
) -> VersionView:
    """The winning variant as a new version of the prompt (base's schema, model and
    parameters; no labels), its message naming the job and the comparison."""
    paired = best.get("comparison") or {}
    message = (
        f"Proposed by the prompt optimiser (job {ctx.job_id}) from v{base.version}: "
        f"{result['scorer']} {_fmt(result['baseline']['mean'])} -> {_fmt(best['mean'])} on "
        f"{result['dataset']}@{result['dataset_version']} (delta {_fmt(paired.get('delta'))}, "
        f"p = {_fmt(paired.get('p_value'))}, W/T/L {paired.get('wins')}/{paired.get('ties')}/"
        f"{paired.get('losses')}). Not promoted: no label was moved."
    )
    view: VersionView = svc.prompts.create(
        ctx.project_id,
        base.name,
        template=best["template"],
        variables=base.variables,
        model=base.model,
        params=base.params,
        message=message,
        author=ctx.actor,
        author_id=ctx.author_id,
    )
    return view


def run_optimize_job(ctx: JobContext) -> dict[str, Any]:
    """Run the optimisation in this worker."""
    return asyncio.run(optimize(ctx, ctx.services()))


def register_kinds() -> None:
    """Make ``prompt.optimize`` available (imported by the job registry on first use)."""
    register_job_kind(
        JobKind(
            KIND,
            run_optimize_job,
            validate_params,
            "Propose prompt variants with an LLM, evaluate them on a dataset and store the "
            "best one as a new version (no label moves).",
            # It creates a prompt version: what POST /api/prompts needs.
            permission=Permission.PROMPTS_WRITE.value,
        )
    )


register_kinds()
