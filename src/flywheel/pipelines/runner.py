"""Running a pipeline: inputs checked, steps executed in order, one trace span per step.

The runner does no I/O of its own: LLM calls, retrieval and HTTP go through a
:class:`PipelineHost` (the server's gateway, knowledge bases and SSRF-checked client), and
spans go to ``host.record``. A failed step stops the run; :meth:`PipelineRunner.run` then
returns a run with ``status="error"`` and the step's message rather than raising.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from flywheel.pipelines.spec import (
    BranchStep,
    JsonStep,
    LLMStep,
    MapStep,
    PipelineSpec,
    PromptStep,
    RetrieveStep,
    Step,
    ToolStep,
    evaluate,
    input_type_problem,
    render_value,
)
from flywheel.pipelines.tools import get_tool
from flywheel.prompts.templates import TemplateError
from flywheel.tracing import new_span_id, new_trace_id

MAX_SPAN_JSON = 16_384
# As flywheel.gateway.schemas.PROMPT_PREFIX; not imported, since importing the gateway
# package loads the whole gateway service.
PROMPT_PREFIX = "prompt:"
_SECRET_HEADER = re.compile(r"auth|key|token|secret|cookie|password", re.IGNORECASE)


class PipelineHost(Protocol):
    """What a pipeline needs from the server; every call may raise any ``Exception``."""

    async def chat(self, body: dict[str, Any], *, trace_id: str, parent_id: str) -> dict[str, Any]:
        """An OpenAI chat completion through the gateway (``model`` may be
        ``prompt:NAME@LABEL`` with ``variables``); its span is a child of ``parent_id``."""
        ...

    async def retrieve(
        self,
        knowledge_base: str,
        query: str,
        *,
        top_k: int,
        mode: str,
        filters: dict[str, Any] | None,
        trace_id: str,
        parent_id: str,
    ) -> list[dict[str, Any]]:
        """Hits: ``{chunk_id, document_id, source, text, score, rank, metadata}``."""
        ...

    async def http(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        json: Any,
        content: str | None,
        timeout: float,
    ) -> tuple[int, Any]:
        """``(status, parsed JSON or text)``; the host applies its SSRF rules."""
        ...

    def record(self, span: dict[str, Any]) -> None:
        """Store one trace span row."""
        ...


class PipelineInputError(ValueError):
    """Inputs that do not match the pipeline's ``inputs``; ``input`` names the first one."""

    def __init__(self, message: str, input_name: str) -> None:
        super().__init__(message)
        self.message = message
        self.input = input_name


class PipelineStepError(Exception):
    """A step failed; ``str()`` is ``step 'ID' (TYPE): problem``."""

    def __init__(self, step_id: str, step_type: str, message: str) -> None:
        self.step_id = step_id
        self.step_type = step_type
        self.message = message
        super().__init__(f"step {step_id!r} ({step_type}): {message}")


@dataclass
class StepRecord:
    """One executed (or, after a failure, skipped top-level) step of a run."""

    id: str
    type: str
    status: Literal["ok", "error", "skipped"]
    latency_ms: float
    output: Any
    error: str | None
    span_id: str  # "" for a skipped step: it has no span
    parent_id: str | None = None  # the run's or the enclosing branch/map step's span


@dataclass
class PipelineRun:
    """The result of :meth:`PipelineRunner.run`."""

    pipeline: str
    trace_id: str
    span_id: str
    status: str
    output: Any
    variables: dict[str, Any]
    steps: list[StepRecord]
    latency_ms: float
    error: str | None


def bounded(value: Any, limit: int = MAX_SPAN_JSON) -> Any:
    """``value`` as JSON data for a span: a preview when its JSON is longer than ``limit``."""
    text = json.dumps(value, default=str, ensure_ascii=False)
    if len(text) <= limit:
        return json.loads(text)  # plain JSON types only (no tuples, datetimes or sets)
    return {"truncated": True, "json_chars": len(text), "preview": text[: limit - 200]}


def _redacted(headers: dict[str, str]) -> dict[str, str]:
    return {k: "[redacted]" if _SECRET_HEADER.search(k) else v for k, v in headers.items()}


def _min_steps(steps: list[Step]) -> int:
    """The fewest steps running ``steps`` can execute (for the map's max_steps precheck)."""
    total = 0
    for step in steps:
        total += 1
        if isinstance(step, BranchStep):
            total += min(_min_steps(step.then), _min_steps(step.else_))
    return total


def _usage_tokens(usage: Any) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    return {
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }


def _answer_text(response: dict[str, Any]) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the completion has no choices[0].message") from None
    if not isinstance(content, str):
        raise ValueError("the completion's message has no text content")
    return content


def parse_json_text(text: str) -> Any:
    """JSON from model text: the whole text, a fenced block, or the first JSON value after
    leading prose. ``ValueError`` when there is none."""
    from flywheel.evals.scorers import extract_json  # the evals stack is heavy: load on use

    try:
        return extract_json(text)
    except ValueError as exc:
        first_error = exc
    decoder = json.JSONDecoder()
    # Bounded: each failed attempt may scan far, and model text can be long.
    for match in itertools.islice(re.finditer(r"[\[{]", text), 64):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        return value
    raise first_error


@dataclass
class _StepTrace:
    """What a step's executor reports for its span besides the output."""

    input: Any = None
    tokens: dict[str, Any] = field(default_factory=dict)
    model: str | None = None


@dataclass
class _Execution:
    spec: PipelineSpec
    trace_id: str
    run_span: str
    parent_id: str | None
    project_id: str | None
    attributes: dict[str, Any]
    records: list[StepRecord] = field(default_factory=list)
    executed: int = 0


class PipelineRunner:
    """Runs validated specs against a host; safe to share between concurrent runs."""

    def __init__(self, host: PipelineHost, *, max_steps: int = 1000) -> None:
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        self.host = host
        self.max_steps = max_steps

    # -- inputs ----------------------------------------------------------------------------

    @staticmethod
    def check_inputs(spec: PipelineSpec, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs with defaults applied; :class:`PipelineInputError` names a bad one."""
        if not isinstance(inputs, dict):
            raise PipelineInputError("inputs must be an object", "inputs")
        if extra := sorted(set(inputs) - set(spec.inputs)):
            takes = ", ".join(spec.inputs) or "no inputs"
            raise PipelineInputError(
                f"unknown input {extra[0]!r}; the pipeline takes: {takes}", extra[0]
            )
        values: dict[str, Any] = {}
        for name, declared in spec.inputs.items():
            if name not in inputs:
                if declared.required:
                    raise PipelineInputError(f"missing input {name!r} (type {declared.type})", name)
                values[name] = copy.deepcopy(declared.default)  # a default is never shared
                continue
            value = inputs[name]
            if problem := input_type_problem(declared.type, value):
                raise PipelineInputError(f"input {name!r}: {problem}", name)
            values[name] = value
        return values

    # -- the run ---------------------------------------------------------------------------

    async def run(
        self,
        spec: PipelineSpec,
        inputs: dict[str, Any],
        *,
        trace_id: str | None = None,
        parent_id: str | None = None,
        project_id: str | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> PipelineRun:
        """Run ``spec`` on ``inputs``. Bad inputs raise :class:`PipelineInputError`; a failed
        step does not raise: the run comes back with ``status="error"`` and its message."""
        variables = self.check_inputs(spec, inputs)
        checked_inputs = dict(variables)  # the steps add to `variables` as they run
        ex = _Execution(
            spec=spec,
            trace_id=trace_id or new_trace_id(),
            run_span=new_span_id(),
            parent_id=parent_id,
            project_id=project_id,
            attributes={**(attributes or {}), "flywheel.pipeline.name": spec.name},
        )
        start, perf = time.time(), time.perf_counter()
        output: Any = None
        error: str | None = None
        try:
            last = await self._steps(ex, spec.steps, variables, ex.run_span, top_level=True)
            output = self._output(spec, variables, last)
        except PipelineStepError as exc:
            error = str(exc)
        except TemplateError as exc:  # the pipeline's own output template
            error = f"{'output' if spec.output is not None else 'output_expr'}: {exc.message}"
        except asyncio.CancelledError:
            self._record_run(ex, start, perf, inputs=checked_inputs, output=None, error="cancelled")
            raise
        latency_ms = self._record_run(
            ex, start, perf, inputs=checked_inputs, output=output, error=error
        )
        return PipelineRun(
            pipeline=spec.name,
            trace_id=ex.trace_id,
            span_id=ex.run_span,
            status="ok" if error is None else "error",
            output=output,
            variables=variables,
            steps=ex.records,
            latency_ms=latency_ms,
            error=error,
        )

    @staticmethod
    def _output(spec: PipelineSpec, variables: dict[str, Any], last: Any) -> Any:
        if spec.output is not None:
            return render_value(spec.output, variables)
        if spec.output_expr is not None:
            return evaluate(spec.output_expr, variables)
        return last

    def _record_run(
        self,
        ex: _Execution,
        start: float,
        perf: float,
        *,
        inputs: dict[str, Any],
        output: Any,
        error: str | None,
    ) -> float:
        latency_ms = (time.perf_counter() - perf) * 1000
        self.host.record(
            self._span(
                ex,
                span_id=ex.run_span,
                parent_id=ex.parent_id,
                name=f"pipeline {ex.spec.name}",
                kind="pipeline.run",
                start=start,
                latency_ms=latency_ms,
                error=error,
                input=inputs,
                output=output,
                attributes=ex.attributes,
            )
        )
        return latency_ms

    def _span(
        self,
        ex: _Execution,
        *,
        span_id: str,
        parent_id: str | None,
        name: str,
        kind: str,
        start: float,
        latency_ms: float,
        error: str | None,
        input: Any,
        output: Any,
        attributes: dict[str, Any],
        tokens: dict[str, Any] | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        # Exactly the columns Gateway._record fills, so the trace views read both alike.
        tokens = tokens or {}
        return {
            "trace_id": ex.trace_id,
            "span_id": span_id,
            "parent_id": parent_id,
            "name": name[:200],
            "kind": kind,
            "start_time": start,
            "end_time": start + latency_ms / 1000,
            "latency_ms": latency_ms,
            "ttft_ms": None,
            "status": "error" if error is not None else "ok",
            "status_code": None,
            "error": error,
            "route": None,
            "model": model,
            "provider": None,
            "stream": False,
            "input": bounded(input),
            "output": bounded(output),
            "prompt_tokens": tokens.get("prompt_tokens"),
            "completion_tokens": tokens.get("completion_tokens"),
            "total_tokens": tokens.get("total_tokens"),
            "cost": None,  # priced on the gateway's own span, not counted twice
            "attempts": None,
            "api_key_id": None,
            "project_id": ex.project_id,
            "attributes": attributes,
        }

    # -- steps -----------------------------------------------------------------------------

    async def _steps(
        self,
        ex: _Execution,
        steps: list[Step],
        scope: dict[str, Any],
        parent_span: str,
        *,
        top_level: bool = False,
    ) -> Any:
        """Run ``steps`` in order in ``scope``; the last step's output."""
        last: Any = None
        for i, step in enumerate(steps):
            try:
                last = await self._step(ex, step, scope, parent_span)
            except PipelineStepError:
                if top_level:
                    ex.records.extend(
                        StepRecord(s.id, s.type, "skipped", 0.0, None, None, "", parent_span)
                        for s in steps[i + 1 :]
                    )
                raise
            scope[step.variable] = last
        return last

    async def _step(
        self, ex: _Execution, step: Step, scope: dict[str, Any], parent_span: str
    ) -> Any:
        ex.executed += 1
        if ex.executed > self.max_steps:
            raise PipelineStepError(
                step.id, step.type, f"the run exceeded max_steps ({self.max_steps} steps)"
            )
        span_id = new_span_id()
        record = StepRecord(step.id, step.type, "ok", 0.0, None, None, span_id, parent_span)
        ex.records.append(record)
        trace = _StepTrace()
        start, perf = time.time(), time.perf_counter()
        error: PipelineStepError | None = None
        output: Any = None
        try:
            output = await self._execute(ex, step, scope, span_id, trace)
        except PipelineStepError as exc:
            error = exc  # this step's own failure, or a nested step's inside a branch or map
        except TemplateError as exc:
            error = PipelineStepError(step.id, step.type, exc.message)
        except asyncio.CancelledError:
            error = PipelineStepError(step.id, step.type, "cancelled")
            raise
        except Exception as exc:
            error = PipelineStepError(step.id, step.type, str(exc) or type(exc).__name__)
        finally:
            record.latency_ms = (time.perf_counter() - perf) * 1000
            message = None if error is None else str(error)
            record.status = "ok" if error is None else "error"
            record.output, record.error = output, message
            self.host.record(
                self._span(
                    ex,
                    span_id=span_id,
                    parent_id=parent_span,
                    name=f"{step.type} {step.id}",
                    kind="pipeline.step",
                    start=start,
                    latency_ms=record.latency_ms,
                    error=message,
                    input=trace.input,
                    output=output,
                    attributes={
                        **ex.attributes,
                        "flywheel.pipeline.step": step.id,
                        "flywheel.pipeline.step_type": step.type,
                    },
                    tokens=trace.tokens,
                    model=trace.model,
                )
            )
        if error is not None:
            raise error
        return output

    async def _execute(
        self,
        ex: _Execution,
        step: Step,
        scope: dict[str, Any],
        span_id: str,
        trace: _StepTrace,
    ) -> Any:
        def render(value: Any, *where: str | int) -> Any:
            try:
                return render_value(value, scope, where)
            except TemplateError as exc:
                raise PipelineStepError(step.id, step.type, exc.message) from None

        if isinstance(step, RetrieveStep):
            query = render(step.query, "query")
            filters = render(step.filters, "filters")
            trace.input = {
                "knowledge_base": step.knowledge_base,
                "query": query,
                "top_k": step.top_k,
                "mode": step.mode,
                "filters": filters,
            }
            return await self.host.retrieve(
                step.knowledge_base,
                str(query),
                top_k=step.top_k,
                mode=step.mode,
                filters=filters,
                trace_id=ex.trace_id,
                parent_id=span_id,
            )
        if isinstance(step, LLMStep | PromptStep):
            if isinstance(step, LLMStep):
                messages = [
                    {"role": m.role, "content": str(render(m.content, "messages", i, "content"))}
                    for i, m in enumerate(step.messages)
                ]
                body = {**render(step.params, "params"), "model": step.model, "messages": messages}
            else:
                body = {
                    **render(step.params, "params"),
                    "model": PROMPT_PREFIX + step.prompt,
                    "variables": render(step.variables, "variables"),
                }
            trace.input = body
            response = await self.host.chat(body, trace_id=ex.trace_id, parent_id=span_id)
            trace.tokens = _usage_tokens(response.get("usage"))
            trace.model = response.get("model") or body["model"]
            return _answer_text(response)
        if isinstance(step, JsonStep):
            text = render(step.input, "input")
            trace.input = {"input": text}
            if isinstance(text, dict | list):
                return text  # already data: `{{ some_object }}`
            try:
                return parse_json_text(str(text))
            except ValueError as exc:
                raise PipelineStepError(step.id, step.type, f"input: {exc}") from None
        if isinstance(step, ToolStep):
            return await self._tool(step, render, trace)
        if isinstance(step, BranchStep):
            try:
                taken = bool(evaluate(step.if_, scope))
            except TemplateError as exc:
                raise PipelineStepError(step.id, step.type, f"if: {exc.message}") from None
            trace.input = {"if": step.if_, "value": taken, "arm": "then" if taken else "else"}
            arm = step.then if taken else step.else_
            return await self._steps(ex, arm, scope, span_id)
        return await self._map(ex, step, scope, span_id, trace)

    async def _tool(
        self,
        step: ToolStep,
        render: Callable[..., Any],
        trace: _StepTrace,
    ) -> Any:
        if step.http is not None:
            call = step.http
            url = str(render(call.url, "http", "url"))
            headers = {k: str(v) for k, v in render(call.headers, "http", "headers").items()}
            payload = render(call.json_body, "http", "json")
            body = None if call.body is None else str(render(call.body, "http", "body"))
            trace.input = {
                "method": call.method,
                "url": url,
                "headers": _redacted(headers),
                "json": payload,
                "body": body,
                "timeout": call.timeout,
            }
            status, answer = await self.host.http(
                call.method, url, headers=headers, json=payload, content=body, timeout=call.timeout
            )
            if status >= 400:
                detail = answer if isinstance(answer, str) else json.dumps(answer, default=str)
                raise PipelineStepError(
                    step.id, step.type, f"HTTP {status} from {call.method} {url}: {detail[:300]}"
                )
            return answer
        name = step.python or ""
        args = render(step.args, "args")
        trace.input = {"tool": name, "args": args}
        try:
            function = get_tool(name)
        except KeyError as exc:
            raise PipelineStepError(step.id, step.type, f"python: {exc}") from None
        try:
            if inspect.iscoroutinefunction(function):
                result = await function(**args)
            else:
                # A sync tool may block (files, CPU): keep it off the event loop.
                result = await asyncio.to_thread(function, **args)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            raise PipelineStepError(
                step.id, step.type, f"tool {name!r} failed: {type(exc).__name__}: {exc}"[:1000]
            ) from None
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            raise PipelineStepError(
                step.id,
                step.type,
                f"tool {name!r} returned {type(result).__name__}, which is not JSON data",
            ) from None
        return result

    async def _map(
        self,
        ex: _Execution,
        step: MapStep,
        scope: dict[str, Any],
        span_id: str,
        trace: _StepTrace,
    ) -> list[Any]:
        try:
            items = evaluate(step.over, scope)
        except TemplateError as exc:
            raise PipelineStepError(step.id, step.type, f"over: {exc.message}") from None
        if not isinstance(items, list):
            raise PipelineStepError(
                step.id, step.type, f"over: expected a list, got {type(items).__name__}"
            )
        trace.input = {"over": step.over, "items": items, "concurrency": step.concurrency}
        # Refuse up front what could never finish within max_steps (a map over 10k items),
        # rather than after doing a thousand steps of work.
        needed = len(items) * _min_steps(step.steps)
        if ex.executed + needed > self.max_steps:
            raise PipelineStepError(
                step.id,
                step.type,
                f"mapping over {len(items)} items needs at least {needed} more steps; "
                f"the run may execute at most max_steps={self.max_steps}",
            )
        results: list[Any] = [None] * len(items)
        pending = iter(range(len(items)))

        failed = False

        async def worker() -> None:
            # `concurrency` workers share one iterator: never more iterations in flight.
            nonlocal failed
            for index in pending:
                if failed:  # the task group's cancellation may come after a worker's next start
                    return
                iteration = {**scope, step.as_: items[index], "index": index}
                try:
                    results[index] = await self._steps(ex, step.steps, iteration, span_id)
                except PipelineStepError:
                    failed = True
                    raise

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(step.concurrency, len(items))):
                    group.create_task(worker())
        except* PipelineStepError as failures:
            # The first failure stops the map; the others were cancelled by the task group.
            first = failures.exceptions[0]
            raise first if isinstance(first, PipelineStepError) else failures from None
        return results


__all__ = [
    "PipelineHost",
    "PipelineInputError",
    "PipelineRun",
    "PipelineRunner",
    "PipelineStepError",
    "StepRecord",
    "bounded",
    "parse_json_text",
]
