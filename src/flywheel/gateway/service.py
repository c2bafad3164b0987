"""The gateway: routes each OpenAI-style call through retries and fallbacks, and traces it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from math import ceil
from typing import Any, Protocol, TypeVar

import numpy as np

from flywheel.config import CatalogModel, FlywheelConfig, RouteConfig, RouteTarget
from flywheel.errors import ServiceError
from flywheel.gateway.cache import HIT, CachePlan, RouteCache, route_fingerprint
from flywheel.gateway.errors import GatewayError, from_provider_error, from_service_error
from flywheel.gateway.limits import BudgetAlert, Limiter, LimitExceeded, Reservation, Subject
from flywheel.gateway.routing import RouteTable, Step
from flywheel.gateway.schemas import (
    PIPELINE_PREFIX,
    PROMPT_PREFIX,
    RAG_PREFIX,
    ChatCompletionRequest,
    EmbeddingRequest,
)
from flywheel.guards.policy import GuardBlocked, GuardPolicy, GuardVerdict, StreamGuard
from flywheel.guards.privacy import redact_content
from flywheel.providers import InvalidRequest, Provider, ProviderError, ProviderRegistry
from flywheel.tracing import TraceWriter, new_span_id, new_trace_id
from flywheel.tracing.content import last_user_text
from flywheel.tracing.metrics import GatewayMetrics

log = logging.getLogger("flywheel.gateway")
T = TypeVar("T")
UnaryCall = Callable[[CatalogModel, dict[str, Any], float], Awaitable[dict[str, Any]]]
AlertHandler = Callable[[BudgetAlert], Awaitable[None]]
# Called with every recorded chat call (its span row, with content even where the trace keeps
# none): online judging samples from here.
TracedHook = Callable[[dict[str, Any]], None]
# Reserved against budgets and tpm when a request sets no max_tokens and its model no context
# length: reservations must bound what a call can cost (docs: "Budgets and limits").
DEFAULT_MAX_OUTPUT_TOKENS = 4096
DEFAULT_ROUTE = "default"


class PromptVersion(Protocol):
    """What the gateway needs of a prompt version (``flywheel.prompts.VersionView``)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def model(self) -> str | None: ...
    @property
    def params(self) -> dict[str, Any]: ...
    @property
    def variables(self) -> dict[str, Any]: ...

    def render(self, variables: dict[str, Any]) -> list[dict[str, str]]: ...


# (project_id, "NAME@LABEL" | "NAME@VERSION" | "NAME") -> the version; raises ServiceError.
PromptResolver = Callable[[str, str], PromptVersion]


class VariantPick(Protocol):
    """What the gateway needs of an experiment's variant
    (``flywheel.experiments.store.Assignment``): ``mirror``, in a shadow experiment, is the
    candidate that answers a copy of the call in the background (never returned)."""

    @property
    def prompt(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def attributes(self) -> dict[str, Any]: ...
    @property
    def mirror(self) -> VariantPick | None: ...


# (project_id, route, the request's ``user``, the request's headers) -> the variant of the
# experiment running on the route that serves this call, or None (no experiment there).
AssignVariant = Callable[[str, str, str | None, Mapping[str, str] | None], VariantPick | None]
RETRIEVAL_OPTIONS = {"top_k": int, "mode": str, "filters": dict}
MAX_RETRIEVAL_TOP_K = 100


@dataclass
class CallContext:
    """Who called, from which project, what they may call, and which trace the call joins."""

    api_key_id: str | None = None
    project_id: str | None = None
    allowed_models: tuple[str, ...] | None = None
    limit_subjects: tuple[Subject, ...] = ()
    trace_id: str = field(default_factory=new_trace_id)
    parent_id: str | None = None
    span_id: str = field(default_factory=new_span_id)
    # Attributes the span records besides the gateway's own (an eval run's id, say).
    attributes: dict[str, Any] | None = None
    # Filled when the call is recorded: what it cost and how long it took, for callers
    # inside the server (eval runs) that need more than the OpenAI response says.
    outcome: dict[str, Any] | None = None
    # The route cache: whether the call may be answered from it and may fill it (the
    # client's Cache-Control), and what it did ("hit", "miss", "bypass"; None: no cache).
    cache_lookup: bool = True
    cache_store: bool = True
    cache_status: str | None = None
    # The request's headers (lower-case names), for experiments sticky by a header.
    headers: Mapping[str, str] | None = None


# (caller, knowledge base, question, options, capture mode) -> {"context": text for the
# model, "hits": [...], "citations": [...], "index_version": int | None}; records its
# retrieval span under the caller's span, keeping what the route's capture mode allows.
# Raises ServiceError.
Retrieve = Callable[["CallContext", str, str, dict[str, Any], str], Awaitable[dict[str, Any]]]
# (caller, pipeline name, messages) -> {"status", "output", "error", "usage"}; the pipeline's
# spans nest under the caller's span. Raises ServiceError (unknown pipeline, bad inputs).
RunPipeline = Callable[["CallContext", str, list[dict[str, Any]]], Awaitable[dict[str, Any]]]


@dataclass
class _Call:
    """What a trace records about one gateway call while it runs."""

    ctx: CallContext
    kind: str
    route: str
    stream: bool
    input: Any
    started: float = field(default_factory=time.time)
    perf_start: float = field(default_factory=time.perf_counter)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    model: CatalogModel | None = None
    ttft_ms: float | None = None
    reservation: Reservation | None = None
    # The usage reserved at admission; charged when a call produced output but no usage.
    estimate: dict[str, int] | None = None
    # A prompt call resolves to its version's model; ``route`` keeps what the caller asked.
    resolve_as: str | None = None
    attributes: dict[str, Any] | None = None
    guards: GuardVerdict | None = None
    # A rag call's sources, returned with the answer.
    citations: list[dict[str, Any]] | None = None
    # Variables a rag call offers its prompt (question, context, hits): each is passed only
    # when the prompt's schema declares it; the caller's own variables win.
    offered: dict[str, Any] | None = None
    # The route cache's plan for this call, and the stored answer it was served (a hit).
    cache: CachePlan | None = None
    cached: dict[str, Any] | None = None
    # The experiment variant serving this call, when its route runs an experiment.
    variant: VariantPick | None = None
    # A shadow experiment's candidate and the request as the caller sent it: mirrored to
    # the candidate once the call is admitted.
    mirror: tuple[VariantPick, ChatCompletionRequest] | None = None
    # Set once the call's span is recorded (a mirrored call's failure is recorded once).
    recorded: bool = False


def _has_content(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return False


def _guard_policies(config: FlywheelConfig) -> dict[str, GuardPolicy]:
    """A guard policy for every route that has guards (the config was checked on load)."""
    return {
        route.name: GuardPolicy(route.guards)
        for route in config.routes
        if route.guards is not None and (route.guards.input or route.guards.output)
    }


def _cache_fingerprints(config: FlywheelConfig) -> dict[str, str]:
    """What shapes the answers of each cached route (part of its cache keys)."""
    return {r.name: route_fingerprint(r) for r in config.routes if r.cache is not None}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _replay_cached(response: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A cached completion as a stream, shaped as a live one: the citations (rag), each
    choice's message then its finish, the usage when asked for, then ``[DONE]``."""
    base = {
        "id": response["id"],
        "object": "chat.completion.chunk",
        "created": response["created"],
        "model": response.get("model"),
    }
    if response.get("citations") is not None:
        yield sse({**base, "choices": [], "citations": response["citations"]})
    for position, choice in enumerate(response.get("choices") or []):
        index = choice.get("index", position)
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **tool} for i, tool in enumerate(message["tool_calls"])
            ]
        yield sse({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        finish = choice.get("finish_reason") or "stop"
        yield sse({**base, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]})
    if include_usage and response.get("usage"):
        yield sse({**base, "choices": [], "usage": response["usage"]})
    yield sse("[DONE]")


class Gateway:
    """OpenAI-compatible chat and embeddings over the configured routes and providers."""

    def __init__(
        self,
        config: FlywheelConfig,
        providers: ProviderRegistry,
        writer: TraceWriter,
        capture: str = "full",
        routes: RouteTable | None = None,
        limiter: Limiter | None = None,
        on_budget_alert: AlertHandler | None = None,
        prompts: PromptResolver | None = None,
        deadline: float | None = None,
        metrics: GatewayMetrics | None = None,
        on_traced: TracedHook | None = None,
        retrieve: Retrieve | None = None,
        run_pipeline: RunPipeline | None = None,
        cache: RouteCache | None = None,
        assign_variant: AssignVariant | None = None,
    ) -> None:
        self.config = config
        self.providers = providers
        self.writer = writer
        self.capture = capture
        self.routes = routes or RouteTable(config)
        self.policies = _guard_policies(config)
        self.limiter = limiter
        self.on_budget_alert = on_budget_alert
        self.prompts = prompts
        self.deadline = deadline
        self.metrics = metrics
        self.on_traced = on_traced
        self.retrieve = retrieve
        self.run_pipeline = run_pipeline
        # Routes with a ``cache:`` block share this (in-process unless given a Redis store).
        self.cache = cache or RouteCache()
        self.cache.metrics = metrics
        self._fingerprints = _cache_fingerprints(config)
        self.assign_variant = assign_variant
        # Mirrored calls of shadow experiments in flight (a reference keeps each task alive).
        self._shadows: set[asyncio.Task[None]] = set()

    def reconfigure(self, config: FlywheelConfig) -> None:
        """Serve a new catalog, routes and guards; calls in flight finish on the old ones."""
        self.config, self.routes = config, RouteTable(config)
        self.policies = _guard_policies(config)
        self._fingerprints = _cache_fingerprints(config)

    # -- discovery -------------------------------------------------------------------------

    def knows(self, model: str) -> bool:
        """Whether ``model`` names a route, a catalog model (not blocked), or a knowledge base
        or pipeline by prefix (those are checked when called)."""
        if model in self.routes.routes or model.startswith((RAG_PREFIX, PIPELINE_PREFIX)):
            return True
        return any(m.name == model and m.status != "blocked" for m in self.config.models)

    def is_prompt_target(self, model: str) -> bool:
        """Whether calls to ``model`` render a prompt (``prompt:…`` or a prompt route)."""
        if model.startswith(PROMPT_PREFIX):
            return True
        route = self.routes.routes.get(model)
        return route is not None and bool(route.prompt_targets)

    def list_models(self) -> list[dict[str, Any]]:
        """Routes first, then catalog models, in the OpenAI ``/v1/models`` shape."""
        out = [
            {"id": r.name, "object": "model", "created": 0, "owned_by": "flywheel-route"}
            for r in self.config.routes
        ]
        out += [
            {"id": m.name, "object": "model", "created": 0, "owned_by": m.provider}
            for m in self.config.models
            if m.status != "blocked"
        ]
        return out

    @staticmethod
    def _check_allowed(call: _Call, name: str) -> None:
        """A key with a model allow-list may call only what it lists (by the name it asked
        for, or the route that name resolves to)."""
        allowed = call.ctx.allowed_models
        if allowed is not None and call.route not in allowed and name not in allowed:
            raise GatewayError(
                403,
                f"This API key may not call '{call.route}'; it may call: "
                f"{', '.join(allowed) or 'nothing'}.",
                param="model",
                code="model_not_allowed",
                type="permission_error",
            )

    def _resolve(self, call: _Call, kind: str) -> RouteConfig:
        name = call.resolve_as or call.route
        try:
            self._check_allowed(call, name)
            route = self.routes.resolve(name, kind)
            if call.resolve_as is not None:
                self._check_prompt_model(call, route)
            model = call.variant.model if call.variant is not None else None
            found = self.routes.models.get(model or "")
            if found is not None and found.status != "blocked":
                # A model variant answers in the route's place, with its retries and fallbacks.
                route = route.model_copy(update={"targets": [RouteTarget(model=found.name)]})
            return route
        except GatewayError as exc:
            self._record(call, error=exc)
            raise

    def _check_prompt_model(self, call: _Call, route: RouteConfig) -> None:
        """A production route's prompt may only send its traffic to approved models."""
        requested = self.routes.routes.get(call.route)
        if requested is None or not requested.production:
            return
        for model in self._route_models(route):
            if model.status != "approved":
                raise GatewayError(
                    403,
                    f"Production route '{call.route}' may only use approved models; its prompt "
                    f"uses '{model.name}', which is {model.status}.",
                    param="model",
                    code="model_not_approved",
                )

    # -- prompts -----------------------------------------------------------------------------

    def _prompt_ref(self, model: str) -> str | None:
        if model.startswith(PROMPT_PREFIX):
            return model[len(PROMPT_PREFIX) :]
        route = self.routes.routes.get(model)
        if route is not None and route.prompt_targets:
            return self.routes.pick(route).prompt
        return None

    async def _expand_prompt(
        self, call: _Call, request: ChatCompletionRequest
    ) -> ChatCompletionRequest:
        """Render a prompt target into a plain request for its model: the version's messages
        then the caller's, the version's parameters overridden by the caller's."""
        ref = self._prompt_ref(request.model)
        if ref is None:
            if request.variables is not None:
                raise GatewayError(
                    400,
                    f"'variables' are for prompt targets; '{request.model}' is not a prompt.",
                    param="variables",
                    code="invalid_value",
                )
            if not request.messages:
                raise GatewayError(
                    400,
                    "Invalid value for 'messages': at least one message is needed.",
                    param="messages",
                    code="invalid_value",
                )
            return request
        try:
            if self.prompts is None:
                raise GatewayError(400, "Prompts are not available here.", param="model")
            resolve = self.prompts

            def resolve_and_render() -> tuple[PromptVersion, list[dict[str, str]]]:
                # Both off the event loop: a miss reads the database, and a template can be
                # costly to render.
                version = resolve(call.ctx.project_id or "", ref)
                variables = dict(request.variables or {})
                if call.offered:
                    declared = (version.variables or {}).get("properties") or {}
                    offered = {k: v for k, v in call.offered.items() if k in declared}
                    variables = {**offered, **variables}
                return version, version.render(variables)

            try:
                version, messages = await asyncio.to_thread(resolve_and_render)
            except ServiceError as exc:
                raise GatewayError(
                    exc.status_code,
                    exc.message,
                    param="variables" if exc.status_code == 400 else "model",
                    code=exc.code,
                ) from None
            target = version.model or DEFAULT_ROUTE
            if target.startswith(PROMPT_PREFIX):
                raise GatewayError(400, "A prompt's model cannot be a prompt.", param="model")
            params = dict(request.params)
            params["messages"] = [*messages, *params.get("messages", [])]
            expanded = ChatCompletionRequest.model_validate(
                {**version.params, **params, "model": target}
            )
        except GatewayError as exc:
            self._record(call, error=exc)
            raise
        call.resolve_as = target
        call.attributes = {
            "flywheel.prompt.name": version.name,
            "flywheel.prompt.version": version.version,
            "flywheel.prompt.ref": ref,
        }
        call.input = {**expanded.params, "variables": request.variables or {}}
        return expanded

    # -- experiments -------------------------------------------------------------------------

    def _experiment(self, call: _Call, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """On a route running an experiment, the call's variant: its prompt version replaces
        the route's prompt, its model the route's targets (in :meth:`_resolve`), and the span
        names both. Calls the server makes itself (evals, judges) are not part of it."""
        if self.assign_variant is None or call.ctx.attributes:
            return request
        if call.route not in self.routes.routes:
            return request
        picked = self.assign_variant(
            call.ctx.project_id or "", call.route, request.user, call.ctx.headers
        )
        if picked is None:
            return request
        call.variant = picked
        if picked.mirror is not None:
            call.mirror = (picked.mirror, request)
        # Each variant's own answers are measured: none served from, or stored in, the cache.
        call.ctx.cache_lookup = call.ctx.cache_store = False
        return self._variant_request(picked, request)

    @staticmethod
    def _variant_request(
        picked: VariantPick, request: ChatCompletionRequest
    ) -> ChatCompletionRequest:
        """The request as ``picked`` answers it: its prompt version in the route's place."""
        if picked.prompt is None:
            return request
        return ChatCompletionRequest.model_validate(
            {
                **request.params,
                "model": PROMPT_PREFIX + picked.prompt,
                "variables": request.variables,
                "retrieval": request.retrieval,
            }
        )

    def _start_mirror(self, call: _Call) -> None:
        """Send a shadow experiment's candidate its copy of an admitted call, in the
        background: the caller's answer never waits for it, nor fails with it."""
        if call.mirror is None:
            return
        (picked, request), call.mirror = call.mirror, None
        ctx = call.ctx
        shadow_ctx = CallContext(
            api_key_id=ctx.api_key_id,
            project_id=ctx.project_id,
            allowed_models=ctx.allowed_models,
            # No limit subjects: not billed to the caller's budgets, not counted against
            # their rate limits (the caller asked for one call, not two).
            limit_subjects=(),
            attributes={"flywheel.shadow.of": ctx.trace_id},
            cache_lookup=False,
            cache_store=False,
            headers=ctx.headers,
        )
        params = {k: v for k, v in request.params.items() if k not in ("stream", "stream_options")}
        # A streamed call is mirrored as a plain one: nobody reads the candidate's stream.
        mirrored = ChatCompletionRequest.model_validate(
            {
                **params,
                "model": request.model,
                "variables": request.variables,
                "retrieval": request.retrieval,
            }
        )
        task = asyncio.create_task(self._shadow_call(mirrored, shadow_ctx, picked))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow_call(
        self, request: ChatCompletionRequest, ctx: CallContext, picked: VariantPick
    ) -> None:
        """One mirrored call, traced like any chat call (its variant's attributes with
        ``flywheel.shadow``); a failure is recorded on its own span and goes no further."""
        call = _Call(ctx, "gateway.chat", request.model, False, request.params)
        call.variant = picked
        try:
            await self._complete(call, self._variant_request(picked, request))
        except Exception as exc:
            if not call.recorded:
                error = (
                    exc
                    if isinstance(exc, GatewayError)
                    else GatewayError(500, f"The mirrored call failed: {exc}", code="shadow_failed")
                )
                self._record(call, error=error)
            log.info("mirrored call %s failed: %s", ctx.trace_id, exc)

    async def drain_shadows(self, timeout: float = 10.0) -> None:
        """Wait for the mirrored calls in flight (shutdown, tests)."""
        if self._shadows:
            await asyncio.wait(set(self._shadows), timeout=timeout)

    # -- retrieval (rag) ---------------------------------------------------------------------

    def _rag_target(self, model: str) -> tuple[str, dict[str, Any], str | None] | None:
        """(knowledge base, retrieval options, prompt ref) when ``model`` retrieves first."""
        if model.startswith(RAG_PREFIX):
            return model[len(RAG_PREFIX) :], {}, None
        route = self.routes.routes.get(model)
        if route is None or route.rag is None:
            return None
        rag = route.rag
        options: dict[str, Any] = {"top_k": rag.top_k, "mode": rag.mode, "filters": rag.filters}
        return rag.knowledge_base, {k: v for k, v in options.items() if v}, rag.prompt

    @staticmethod
    def _retrieval_options(request: ChatCompletionRequest) -> dict[str, Any]:
        options = dict(request.retrieval or {})
        for key, value in options.items():
            kind = RETRIEVAL_OPTIONS.get(key)
            valid = kind is not None and isinstance(value, kind) and not isinstance(value, bool)
            if key == "top_k" and valid:
                valid = 1 <= value <= MAX_RETRIEVAL_TOP_K
            if key == "mode" and valid:
                valid = value in ("dense", "bm25", "hybrid")
            if not valid:
                raise GatewayError(
                    400,
                    f"Invalid 'retrieval.{key}': allowed are top_k (1 to "
                    f"{MAX_RETRIEVAL_TOP_K}), mode (dense, bm25 or hybrid) and filters (object).",
                    param=f"retrieval.{key}",
                    code="invalid_value",
                )
        return options

    async def _augment(self, call: _Call, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """For a rag target: search its knowledge base with the last user message, and give
        the model the hits (as a system message, or through the route's prompt)."""
        target = self._rag_target(request.model)
        try:
            if target is None:
                if request.retrieval is not None:
                    raise GatewayError(
                        400,
                        f"'retrieval' is for rag targets; '{request.model}' is not one.",
                        param="retrieval",
                        code="invalid_value",
                    )
                return request
            knowledge_base, options, prompt = target
            options = {**options, **self._retrieval_options(request)}
            messages = list(request.params.get("messages") or [])
            question = last_user_text(messages)
            if not question:
                raise GatewayError(
                    400,
                    "A rag call searches with the last user message; there is none.",
                    param="messages",
                    code="invalid_value",
                )
            if self.retrieve is None:
                raise GatewayError(400, "Retrieval is not available here.", param="model")
            try:
                found = await self.retrieve(
                    call.ctx, knowledge_base, question, options, self._capture(call)
                )
            except ServiceError as exc:
                raise from_service_error(exc, param="model") from None
        except GatewayError as exc:
            self._record(call, error=exc)
            raise
        call.citations = found["citations"]
        call.attributes = {
            **(call.attributes or {}),
            "flywheel.rag.knowledge_base": knowledge_base,
            "flywheel.rag.index_version": found.get("index_version"),
            "flywheel.rag.hits": len(found["hits"]),
        }
        params = dict(request.params)
        if prompt is not None:
            # The prompt is the whole conversation: it takes the question (and the history,
            # as ``messages``, when it declares it).
            call.offered = {
                "question": question,
                "context": found["context"],
                "hits": found["hits"],
                "messages": messages,
            }
            params["messages"] = []
            return ChatCompletionRequest.model_validate(
                {**params, "model": PROMPT_PREFIX + prompt, "variables": request.variables or {}}
            )
        params["messages"] = [{"role": "system", "content": found["context"]}, *messages]
        call.input = params
        if request.model.startswith(RAG_PREFIX):
            call.resolve_as = DEFAULT_ROUTE
        return ChatCompletionRequest.model_validate(
            {**params, "model": request.model, "variables": request.variables}
        )

    async def _prepare(self, call: _Call, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """Retrieval, then prompt rendering: the request as its target model gets it."""
        augmented = await self._augment(call, request)
        expanded = await self._expand_prompt(call, augmented)
        if augmented is not request and augmented.model.startswith(PROMPT_PREFIX):
            # A rag route's prompt shapes the messages; the route's own targets answer.
            call.resolve_as = None
            call.attributes = {**(call.attributes or {}), "flywheel.rag.prompt": augmented.model}
        return expanded

    # -- pipelines ---------------------------------------------------------------------------

    def _pipeline_name(self, model: str) -> str | None:
        if model.startswith(PIPELINE_PREFIX):
            return model[len(PIPELINE_PREFIX) :]
        route = self.routes.routes.get(model)
        return route.pipeline if route is not None else None

    async def _pipeline(
        self, call: _Call, name: str, request: ChatCompletionRequest
    ) -> dict[str, Any]:
        """Run a pipeline for a chat call and answer with its output as the message."""
        try:
            self._check_allowed(call, call.route)
            if self.run_pipeline is None:
                raise GatewayError(400, "Pipelines are not available here.", param="model")
            messages = list(request.params.get("messages") or [])
            try:
                result = await self.run_pipeline(call.ctx, name, messages)
            except ServiceError as exc:
                raise from_service_error(exc, param="model") from None
            if result.get("status") != "ok":
                raise GatewayError(
                    502,
                    f"Pipeline '{name}' failed: {result.get('error')}",
                    code="pipeline_failed",
                )
        except GatewayError as exc:
            self._record(call, error=exc)
            raise
        output = result.get("output")
        content = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
        usage = result.get("usage") or {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
        }
        call.attributes = {**(call.attributes or {}), "flywheel.pipeline.name": name}
        message = {"role": "assistant", "content": content}
        self._record(
            call,
            usage=usage,
            output={"choices": [{"message": message, "finish_reason": "stop"}]},
        )
        return {
            "id": f"chatcmpl-{call.ctx.trace_id}",
            "object": "chat.completion",
            "created": int(call.started),
            "model": request.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }

    # -- limits and budgets ----------------------------------------------------------------

    def _route_models(self, route: RouteConfig) -> list[CatalogModel]:
        names = [t.model for t in route.targets if t.model] + list(route.fallbacks)
        return [self.routes.models[name] for name in names]

    def _estimate(
        self, route: RouteConfig, request: ChatCompletionRequest | EmbeddingRequest
    ) -> tuple[dict[str, int], float]:
        """An upper bound of the call's usage and cost, reserved until it settles: UTF-8
        bytes bound the prompt's tokens, and the output is bounded by ``max_tokens`` (else
        the model's context length), priced at the dearest model the route may use."""
        models = self._route_models(route)
        if isinstance(request, EmbeddingRequest):
            prompt = len(json.dumps(request.input).encode())
            completion = 0
        else:
            messages = request.params.get("messages")
            prompt = len(json.dumps(messages, ensure_ascii=False).encode()) + 8 * len(
                request.messages
            )
            completion = request.max_completion_tokens or request.max_tokens or 0
            if not completion:
                completion = max(m.context_length or DEFAULT_MAX_OUTPUT_TOKENS for m in models)
        cost = max(m.pricing.cost(prompt, completion) for m in models)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        return usage, cost

    async def _admit(
        self,
        call: _Call,
        route: RouteConfig,
        request: ChatCompletionRequest | EmbeddingRequest,
    ) -> None:
        """Reserve against the caller's limits and budgets; a refusal is traced, then a 429.
        An admitted call of a shadow experiment starts its mirrored copy."""
        if self.limiter is None or not call.ctx.limit_subjects:
            self._start_mirror(call)
            return
        call.estimate, cost = self._estimate(route, request)
        try:
            call.reservation = await self.limiter.acquire(
                call.ctx.limit_subjects, call.estimate["total_tokens"], cost
            )
            self._start_mirror(call)
            return
        except LimitExceeded as exc:
            wait = exc.retry_after
            error = GatewayError(
                429,
                exc.message,
                code="insufficient_quota" if exc.kind == "budget" else "rate_limit_exceeded",
                headers={} if wait is None else {"Retry-After": str(max(1, ceil(wait)))},
            )
        except Exception as exc:
            # Budgets are a promise: without the limits store, refuse rather than overspend.
            log.error("limits store unavailable: %s", exc)
            error = GatewayError(
                503,
                "Flywheel cannot check this key's limits right now; retry shortly.",
                code="limits_unavailable",
                headers={"Retry-After": "1"},
            )
        self._record(call, error=error)
        raise error

    async def _settle(self, call: _Call, usage: dict[str, Any] | None) -> None:
        """Replace the reservation with what the call used: ``None`` releases it (the call
        failed before any output); output without reported usage is charged the estimate."""
        reservation, call.reservation = call.reservation, None
        if reservation is None or self.limiter is None:
            return
        try:
            if usage is None:
                await self.limiter.release(reservation)
                return
            usage = usage or call.estimate or {}
            tokens = int(usage.get("total_tokens") or 0) or int(
                (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
            )
            alerts = await self.limiter.settle(reservation, tokens, self._cost(call, usage) or 0.0)
        except Exception:
            # Accounting must never fail a call that already succeeded.
            log.exception("could not settle limits for trace %s", call.ctx.trace_id)
            return
        for alert in alerts:
            log.warning("budget alert: %s", alert.message)
            if self.on_budget_alert is not None:
                await self.on_budget_alert(alert)

    # -- the retry / fallback loop ---------------------------------------------------------

    async def _run(
        self,
        call: _Call,
        route: RouteConfig,
        attempt: Callable[[Provider, Step], Awaitable[T]],
    ) -> T:
        last: ProviderError | None = None
        last_model = ""
        for step in self.routes.plan(route):
            provider = self.providers.provider_for(step.model)
            retry = 0
            while True:
                started = time.perf_counter()
                try:
                    result = await attempt(provider, step)
                except InvalidRequest as exc:
                    raise GatewayError(400, str(exc), param=exc.param) from None
                except (ProviderError, TimeoutError) as exc:
                    error = (
                        exc
                        if isinstance(exc, ProviderError)
                        else ProviderError("timeout", f"no answer within {step.timeout:g}s")
                    )
                    call.attempts.append(self._attempt(step, started, error))
                    last, last_model = error, step.model.name
                    delay = self.routes.backoff(route.retry, retry, error)
                    if delay is None:
                        break
                    retry += 1
                    await asyncio.sleep(delay)
                    continue
                call.attempts.append(self._attempt(step, started, None))
                call.model = step.model
                return result
            if last.trigger not in route.fallback_on:
                break
        assert last is not None
        raise from_provider_error(last, last_model)

    async def _unary(
        self,
        call: _Call,
        kind: str,
        request: ChatCompletionRequest | EmbeddingRequest,
        method: Callable[[Provider], UnaryCall],
        route: RouteConfig | None = None,
    ) -> dict[str, Any]:
        """One JSON-in, JSON-out call through the route (``route`` when already resolved),
        within the caller's limits; a failure is traced, then raised."""
        route = route or self._resolve(call, kind)
        await self._admit(call, route, request)

        async def attempt(provider: Provider, step: Step) -> dict[str, Any]:
            body = request.upstream_body(step.model.wire_name)
            async with asyncio.timeout(step.timeout):
                return await method(provider)(step.model, body, step.timeout)

        response = await self._run_admitted(call, route, attempt)
        await self._settle(call, response.get("usage") or {})
        return response

    async def _run_admitted(
        self,
        call: _Call,
        route: RouteConfig,
        attempt: Callable[[Provider, Step], Awaitable[T]],
    ) -> T:
        """:meth:`_run` for an admitted call: a failure frees its reservation and is traced."""
        try:
            try:
                async with asyncio.timeout(self.deadline):
                    return await self._run(call, route, attempt)
            except TimeoutError:
                # Per-target timeouts are handled inside; this is the whole call's limit.
                raise GatewayError(
                    504,
                    f"No answer within the request deadline of {self.deadline:g} s "
                    "(all retries and fallbacks included).",
                    code="deadline_exceeded",
                ) from None
        except BaseException as exc:
            await self._settle(call, None)
            if isinstance(exc, GatewayError):
                self._record(call, error=exc)
            raise

    @staticmethod
    def _attempt(step: Step, started: float, error: ProviderError | None) -> dict[str, Any]:
        return {
            "model": step.model.name,
            "ms": round((time.perf_counter() - started) * 1000, 3),
            "error": None
            if error is None
            else {"trigger": error.trigger, "message": error.message},
        }

    # -- the route cache ---------------------------------------------------------------------

    async def _cache_lookup(
        self, call: _Call, request: ChatCompletionRequest
    ) -> dict[str, Any] | None:
        """The stored answer for a call on a cached route, traced as a hit; None (a miss or
        a bypass, noted on the call) otherwise. A hit reserves nothing against limits and
        costs nothing: no model is called."""
        route = self.routes.routes.get(call.route)
        if route is None or route.cache is None:
            return None
        plan = self.cache.plan(
            route,
            self._fingerprints.get(route.name, ""),
            call.ctx.project_id or "",
            request,
            lookup=call.ctx.cache_lookup,
            store=call.ctx.cache_store,
        )
        if plan is None:
            return None
        call.cache = plan
        entry = await self.cache.lookup(plan)
        call.ctx.cache_status = plan.status
        await self.cache.count(plan)
        if entry is None:
            return None
        call.cached = entry
        response = {
            **entry["response"],
            "id": f"chatcmpl-{call.ctx.trace_id}",
            "created": int(time.time()),
        }
        if call.stream:
            call.ttft_ms = (time.perf_counter() - call.perf_start) * 1000
        output = {
            "choices": [
                {"message": c.get("message"), "finish_reason": c.get("finish_reason")}
                for c in response.get("choices", [])
            ]
        }
        self._record(call, usage=response.get("usage") or {}, output=output)
        return response

    async def _cache_save(self, call: _Call, response: dict[str, Any]) -> None:
        """Store a call's finished answer when its plan allows; an answer any guard found
        something in (redacted, flagged) is never stored."""
        plan = call.cache
        if plan is None or not plan.store or plan.status == HIT:
            return
        if call.guards is not None and call.guards.hits:
            return
        model = call.model.name if call.model is not None else None
        await self.cache.save(plan, response, model=model, trace_id=call.ctx.trace_id)

    # -- guards ----------------------------------------------------------------------------

    async def _guard_input(
        self, call: _Call, policy: GuardPolicy, request: ChatCompletionRequest
    ) -> ChatCompletionRequest:
        """The request as the model may see it; a blocking input guard refuses it (400)."""
        messages = request.params.get("messages") or []
        try:
            checked, call.guards = await asyncio.to_thread(policy.check_input, messages)
        except GuardBlocked as blocked:
            call.guards = blocked.verdict
            error = GatewayError(
                400,
                f"{blocked} The request was not sent to the model.",
                param="messages",
                code="guard_blocked",
            )
            self._record(call, error=error)
            raise error from None
        if checked == messages:
            return request
        params = {**request.params, "messages": checked}
        call.input = {**(call.input or {}), **params} if isinstance(call.input, dict) else params
        return ChatCompletionRequest.model_validate({**params, "model": request.model})

    async def _guard_output(
        self, call: _Call, policy: GuardPolicy, response: dict[str, Any], usage: dict[str, Any]
    ) -> dict[str, Any]:
        """The answer as the caller may see it; a blocking output guard withholds it (422)."""
        verdict = call.guards or GuardVerdict()
        choices = []
        try:
            for choice in response.get("choices") or []:
                message = choice.get("message") or {}
                text = message.get("content")
                if isinstance(text, str) and text:
                    checked, found = await asyncio.to_thread(policy.check_output, text)
                    verdict.merge(found)
                    if checked != text:
                        choice = {**choice, "message": {**message, "content": checked}}
                choices.append(choice)
        except GuardBlocked as blocked:
            verdict.merge(blocked.verdict)
            call.guards = verdict
            error = GatewayError(422, f"{blocked} The answer was withheld.", code="guard_blocked")
            self._record(call, usage=usage, error=error)
            raise error from None
        call.guards = verdict
        return {**response, "choices": choices}

    def _policy(self, call: _Call) -> GuardPolicy | None:
        return self.policies.get(call.route)

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest, ctx: CallContext) -> dict[str, Any]:
        """A non-streamed completion."""
        call = _Call(ctx, "gateway.chat", request.model, False, request.params)
        pipeline = self._pipeline_name(request.model)
        if pipeline is not None:
            return await self._pipeline(call, pipeline, request)
        request = self._experiment(call, request)
        return await self._complete(call, request)

    async def _complete(self, call: _Call, request: ChatCompletionRequest) -> dict[str, Any]:
        """A non-streamed completion once its variant is known (a mirrored call starts here)."""
        request = await self._prepare(call, request)
        policy = self._policy(call)
        if policy is not None and policy.input:
            request = await self._guard_input(call, policy, request)
        route = self._resolve(call, "chat")
        cached = await self._cache_lookup(call, request)
        if cached is not None:
            return cached
        response = await self._unary(call, "chat", request, lambda p: p.chat, route)
        usage = response.get("usage") or {}
        if policy is not None and policy.output:
            response = await self._guard_output(call, policy, response, usage)
        output = {
            "choices": [
                {"message": c.get("message"), "finish_reason": c.get("finish_reason")}
                for c in response.get("choices", [])
            ]
        }
        self._record(call, usage=usage, output=output)
        if call.citations is not None:
            response = {**response, "citations": call.citations}
        await self._cache_save(call, response)
        return response

    async def stream_chat(
        self, request: ChatCompletionRequest, ctx: CallContext
    ) -> AsyncIterator[bytes]:
        """Open a stream: targets are tried until one yields its first token, so an error
        before that falls back; the returned iterator then yields SSE bytes. An error after
        the first token ends the stream with an OpenAI-style error event."""
        call = _Call(ctx, "gateway.chat", request.model, True, request.params)
        pipeline = self._pipeline_name(request.model)
        if pipeline is not None:
            response = await self._pipeline(call, pipeline, request)
            return self._replay(response)
        request = self._experiment(call, request)
        request = await self._prepare(call, request)
        policy = self._policy(call)
        if policy is not None and policy.input:
            request = await self._guard_input(call, policy, request)
        route = self._resolve(call, "chat")
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        cached = await self._cache_lookup(call, request)
        if cached is not None:
            return _replay_cached(cached, include_usage)
        await self._admit(call, route, request)

        async def attempt(
            provider: Provider, step: Step
        ) -> tuple[AsyncIterator[dict[str, Any]], list[dict[str, Any]]]:
            body = request.upstream_body(step.model.wire_name)
            body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
            chunks = aiter(provider.stream_chat(step.model, body, step.timeout))
            buffered: list[dict[str, Any]] = []
            try:
                async with asyncio.timeout(step.timeout):
                    async for chunk in chunks:
                        buffered.append(chunk)
                        if _has_content(chunk):
                            break
            except BaseException:
                await chunks.aclose()  # type: ignore[attr-defined]
                raise
            return chunks, buffered

        chunks, buffered = await self._run_admitted(call, route, attempt)
        call.ttft_ms = (time.perf_counter() - call.perf_start) * 1000
        output_policy = policy if policy is not None and policy.output else None
        return self._relay(call, chunks, buffered, include_usage, output_policy)

    @staticmethod
    async def _replay(response: dict[str, Any]) -> AsyncIterator[bytes]:
        """A finished completion as a stream: one content chunk, the finish, then usage."""
        base = {
            "id": response["id"],
            "object": "chat.completion.chunk",
            "created": response["created"],
            "model": response["model"],
        }
        message = response["choices"][0]["message"]
        yield sse({**base, "choices": [{"index": 0, "delta": message, "finish_reason": None}]})
        yield sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield sse({**base, "choices": [], "usage": response["usage"]})
        yield sse("[DONE]")

    async def _guarded(
        self, call: _Call, policy: GuardPolicy, source: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        """The chunks with each choice's text passed through an output
        :class:`StreamGuard`: text is released as its window clears, redacted where a guard
        says so, and flushed before the choice's finish."""
        guards: dict[int, StreamGuard] = {}
        verdict = call.guards = call.guards or GuardVerdict()

        def guard_for(index: int) -> StreamGuard:
            if index not in guards:
                guards[index] = policy.stream()
            return guards[index]

        try:
            async for chunk in source:
                choices = []
                for choice in chunk.get("choices") or []:
                    guard = guard_for(int(choice.get("index") or 0))
                    delta = dict(choice.get("delta") or {})
                    released = guard.feed(delta.get("content") or "")
                    if choice.get("finish_reason"):
                        released += guard.finish()
                    if "content" in delta or released:
                        delta["content"] = released
                    if not (released or choice.get("finish_reason") or set(delta) - {"content"}):
                        continue  # nothing to send yet: the window holds it
                    choices.append({**choice, "delta": delta})
                if choices or not chunk.get("choices"):
                    yield {**chunk, "choices": choices}
            for index, guard in guards.items():
                rest = guard.finish()
                if rest:
                    yield {
                        "object": "chat.completion.chunk",
                        "choices": [
                            {"index": index, "delta": {"content": rest}, "finish_reason": None}
                        ],
                    }
        finally:
            for guard in guards.values():
                verdict.merge(guard.verdict)

    async def _relay(
        self,
        call: _Call,
        chunks: AsyncIterator[dict[str, Any]],
        buffered: list[dict[str, Any]],
        include_usage: bool,
        output_policy: GuardPolicy | None = None,
    ) -> AsyncIterator[bytes]:
        text: list[str] = []
        usage: dict[str, Any] = {}
        finish_reason: str | None = None
        error: GatewayError | None = None
        status = "ok"
        first: dict[str, Any] | None = None
        tool_calls = False

        async def all_chunks() -> AsyncIterator[dict[str, Any]]:
            for chunk in buffered:
                yield chunk
            async for chunk in chunks:
                yield chunk

        source = all_chunks()
        if call.citations is not None:
            # A rag stream names its sources first, in a chunk without choices.
            yield sse(
                {
                    "id": (buffered[0].get("id") if buffered else None) or "chatcmpl-rag",
                    "object": "chat.completion.chunk",
                    "created": int(call.started),
                    "model": call.route,
                    "choices": [],
                    "citations": call.citations,
                }
            )
        if output_policy is not None:
            source = self._guarded(call, output_policy, source)
        try:
            async for chunk in source:
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not include_usage:
                        if not chunk.get("choices"):
                            continue
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text.append(delta.get("content") or "")
                    finish_reason = choice.get("finish_reason") or finish_reason
                    tool_calls = tool_calls or bool(delta.get("tool_calls"))
                if first is None and chunk.get("choices"):
                    first = chunk
                yield sse(chunk)
            if call.cache is not None and not tool_calls:
                # Stored before [DONE]: a client that got the whole answer finds it cached.
                await self._cache_save(
                    call,
                    {
                        "id": (first or {}).get("id") or f"chatcmpl-{call.ctx.trace_id}",
                        "object": "chat.completion",
                        "created": (first or {}).get("created") or int(call.started),
                        "model": (first or {}).get("model") or call.route,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "".join(text)},
                                "finish_reason": finish_reason,
                            }
                        ],
                        "usage": usage,
                        **({"citations": call.citations} if call.citations is not None else {}),
                    },
                )
            yield sse("[DONE]")
        except ProviderError as exc:
            # Tokens already reached the caller, so falling back would splice two answers.
            target = call.model.name if call.model else call.route
            error = GatewayError(
                502,
                f"upstream '{target}' failed mid-stream: {exc.message}",
                code="stream_interrupted",
            )
            call.attempts.append(
                {
                    "model": target,
                    "ms": None,
                    "error": {
                        "trigger": exc.trigger,
                        "message": exc.message,
                        "after_first_token": True,
                    },
                }
            )
            yield sse(error.body())
        except GuardBlocked as blocked:
            # What the caller got so far had cleared the guards; the rest is withheld.
            error = GatewayError(
                422, f"{blocked} The rest of the answer was withheld.", code="guard_blocked"
            )
            finish_reason = "content_filter"
            yield sse(error.body())
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            await source.aclose()  # type: ignore[attr-defined]
            await chunks.aclose()  # type: ignore[attr-defined]
            # A stream that produced output is charged, even when cut or cancelled.
            await self._settle(call, usage if usage or any(text) else None)
            output = {
                "choices": [
                    {
                        "message": {"role": "assistant", "content": "".join(text)},
                        "finish_reason": finish_reason,
                    }
                ]
            }
            self._record(call, usage=usage, output=output, error=error, status=status)

    # -- embeddings ------------------------------------------------------------------------

    async def embeddings(self, request: EmbeddingRequest, ctx: CallContext) -> dict[str, Any]:
        call = _Call(ctx, "gateway.embeddings", request.model, False, {"input": request.input})
        response = await self._unary(call, "embedding", request, lambda p: p.embed)
        if request.encoding_format == "base64":
            for item in response["data"]:
                if isinstance(item.get("embedding"), list):
                    vector = np.asarray(item["embedding"], dtype="<f4")
                    item["embedding"] = base64.b64encode(vector.tobytes()).decode("ascii")
        self._record(call, usage=response.get("usage") or {}, output=None)
        return response

    # -- tracing ---------------------------------------------------------------------------

    @staticmethod
    def _cost(call: _Call, usage: dict[str, Any]) -> float | None:
        """Dollars for ``usage`` at the answering model's catalog price."""
        if call.model is None or not usage:
            return None
        return call.model.pricing.cost(usage.get("prompt_tokens"), usage.get("completion_tokens"))

    def _capture(self, call: _Call) -> str:
        """What the call's traces may keep: its route's capture mode, else the server's."""
        route = self.routes.routes.get(call.route)
        return (route.capture if route is not None else None) or self.capture

    def _record(
        self,
        call: _Call,
        *,
        usage: dict[str, Any] | None = None,
        output: Any = None,
        error: GatewayError | None = None,
        status: str = "ok",
    ) -> None:
        call.recorded = True
        usage = usage or {}
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        total = usage.get("total_tokens")
        if total is None and (prompt is not None or completion is not None):
            total = (prompt or 0) + (completion or 0)
        model = call.model
        cached = call.cached
        # A cache hit called no model: it cost nothing.
        cost = 0.0 if cached is not None else self._cost(call, usage)
        end = time.time()
        latency_ms = (time.perf_counter() - call.perf_start) * 1000
        attributes = dict(call.attributes or {})
        if call.cache is not None:
            attributes.update(call.cache.attributes)
        if call.ctx.attributes:
            attributes.update(call.ctx.attributes)
        if call.variant is not None:
            attributes.update(call.variant.attributes)
        verdict = call.guards
        if verdict is not None and verdict.hits:
            attributes["flywheel.guard.flags"] = verdict.flags
            if verdict.blocked is not None:
                attributes["flywheel.guard.blocked"] = verdict.blocked.guard
        call.ctx.outcome = {"cost": cost, "latency_ms": latency_ms, "trace_id": call.ctx.trace_id}
        capture = self._capture(call)
        span: dict[str, Any] = {
            "trace_id": call.ctx.trace_id,
            "span_id": call.ctx.span_id,
            "parent_id": call.ctx.parent_id,
            "name": f"{call.kind.split('.')[-1]} {call.route}",
            "kind": call.kind,
            "start_time": call.started,
            "end_time": end,
            "latency_ms": latency_ms,
            "ttft_ms": call.ttft_ms,
            "status": "error" if error is not None else status,
            "status_code": error.status_code if error is not None else 200,
            "error": error.message if error is not None else None,
            "route": call.route,
            "model": model.name if model else (cached or {}).get("model"),
            "provider": model.provider if model else None,
            "stream": call.stream,
            "input": call.input,
            "output": output,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
            "cost": cost,
            "attempts": call.attempts,
            "api_key_id": call.ctx.api_key_id,
            "project_id": call.ctx.project_id,
            "attributes": attributes or None,
        }
        if (
            self.on_traced is not None
            and call.kind == "gateway.chat"
            and error is None
            and cached is None  # a served copy was judged when it was first answered
        ):
            self.on_traced(span)
        if capture == "metadata":
            span = {**span, "input": None, "output": None}
        elif capture == "redacted":
            span = {**span, "input": redact_content(call.input), "output": redact_content(output)}
        self.writer.record(span)
        if self.metrics is not None:
            self.metrics.observe(span)
        if verdict is not None:
            self._record_guards(call, verdict, end)

    def _record_guards(self, call: _Call, verdict: GuardVerdict, when: float) -> None:
        """Each guard that found something becomes a score on the trace (and a metric)."""
        for hit in verdict.hits:
            self.writer.record_score(
                {
                    **hit.as_score(),
                    "project_id": call.ctx.project_id,
                    "trace_id": call.ctx.trace_id,
                    "span_id": call.ctx.span_id,
                    "route": call.route,
                    "source": "guard",
                    "created_at": when,
                }
            )
            if self.metrics is not None:
                self.metrics.guard_hit(call.route, hit.guard, hit.stage, hit.action)


__all__ = ["CallContext", "Gateway", "sse"]
