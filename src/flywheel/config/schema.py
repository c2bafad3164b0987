"""The shape of ``flywheel.yaml``: providers, the model catalog and routes."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from flywheel.config.settings import CaptureMode

Name = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
]
FallbackTrigger = int | Literal["timeout", "connection", "protocol"]
RETRY_ON: tuple[FallbackTrigger, ...] = (429, 500, 502, 503, 504, "timeout", "connection")
FALLBACK_ON: tuple[FallbackTrigger, ...] = (*RETRY_ON, "protocol")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"90s"``, ``"5m"``, ``"1h"``, ``"7d"``, ``"2w"``."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration: give seconds, or e.g. '5m', '1h', '7d'")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, not {value!r}")
    return seconds


# Seconds; YAML may say "15m" or "7d".
Duration = Annotated[float, BeforeValidator(parse_duration)]


class ProviderConfig(_Strict):
    """Where models are served from: in-process (``local``) or any OpenAI-compatible API."""

    type: Literal["local", "openai"]
    base_url: str | None = None
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the key."
    )
    api_key: SecretStr | None = Field(default=None, description="Inline key (prefer api_key_env).")
    api_key_secret: str | None = Field(
        default=None,
        description="Name of a stored secret (default project) holding the key, encrypted at rest.",
    )
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> ProviderConfig:
        if self.type == "openai" and not self.base_url:
            raise ValueError("an 'openai' provider needs base_url")
        return self


class Pricing(_Strict):
    """USD per million tokens."""

    input_per_mtok: float = Field(default=0.0, ge=0)
    output_per_mtok: float = Field(default=0.0, ge=0)

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        return (
            (prompt_tokens or 0) * self.input_per_mtok
            + (completion_tokens or 0) * self.output_per_mtok
        ) / 1_000_000


class CatalogModel(_Strict):
    """A model Flywheel knows: which provider serves it, what it costs, what it can do."""

    name: Name
    provider: Name
    kind: Literal["chat", "embedding"] = "chat"
    upstream_name: str | None = Field(
        default=None, description="Name sent upstream; default: name."
    )
    source: str | None = Field(
        default=None, description="Local models: 'builtin:smollm2', an HF folder or a .gguf file."
    )
    context_length: int | None = Field(default=None, gt=0)
    pricing: Pricing = Field(default_factory=Pricing)
    status: Literal["approved", "experimental", "blocked"] = "approved"

    @property
    def wire_name(self) -> str:
        return self.upstream_name or self.name


class RetryPolicy(_Strict):
    """Retries of one target before falling back: exponential backoff with full jitter."""

    attempts: int = Field(default=2, ge=0, le=10, description="Retries after the first try.")
    backoff_initial: float = Field(default=0.25, ge=0)
    backoff_max: float = Field(default=8.0, ge=0)
    max_retry_after: float = Field(
        default=30.0, ge=0, description="A longer Retry-After falls back instead of waiting."
    )
    on: list[FallbackTrigger] = Field(default_factory=lambda: list(RETRY_ON))

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_key(cls, data: Any) -> Any:
        # YAML 1.1 reads an unquoted `on:` key as the boolean true.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if key is True else key): value for key, value in data.items()}
        return data


RESOURCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PromptRef = Annotated[
    str,
    Field(
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9_-]+)?$",
        description="NAME@LABEL or NAME@VERSION: a prompt of the caller's project.",
    ),
]


class RouteTarget(_Strict):
    """One target of a route: a catalog model, or a prompt version (rendered with the
    request's ``variables``, then sent to the prompt's model). ``weight`` balances load."""

    model: Name | None = None
    prompt: PromptRef | None = None
    weight: float = Field(default=1.0, gt=0)
    timeout: float | None = Field(default=None, gt=0, description="Seconds; default: the route's.")

    @model_validator(mode="after")
    def _one_kind(self) -> RouteTarget:
        if (self.model is None) == (self.prompt is None):
            raise ValueError("a target names either a model or a prompt")
        return self


GuardAction = Literal["block", "redact", "flag"]


class GuardRule(BaseModel):
    """One guard of a route: a detector (``type``), what to do when it fires (``action``) and
    the detector's own options (``entities``, ``threshold``, ``terms``…), checked by
    ``flywheel.guards`` when the config is applied."""

    model_config = ConfigDict(extra="allow")

    type: Annotated[str, Field(min_length=1, max_length=64)]
    action: GuardAction = "flag"
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] | None = None

    @property
    def label(self) -> str:
        """The name the guard's scores and errors carry: ``name``, else ``type``."""
        return self.name or self.type

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GuardPolicyConfig(_Strict):
    """A route's guards: ``input`` guards check the caller's messages before the model sees
    them, ``output`` guards the answer (streamed answers over a sliding window)."""

    input: list[GuardRule] = Field(default_factory=list)
    output: list[GuardRule] = Field(default_factory=list)
    input_roles: list[str] = Field(
        default_factory=lambda: ["user", "tool"],
        description="Roles of the messages input guards check (the untrusted ones).",
    )
    stream_window: int = Field(
        default=128,
        ge=16,
        le=8192,
        description="Characters of a streamed answer held back so a guard sees them whole.",
    )


class OnlineEvalConfig(_Strict):
    """Judges run on a sample of a route's traffic after the answer is sent; their scores are
    attached to the traces."""

    sample_rate: float = Field(gt=0, le=1)
    judges: list[dict[str, Any]] = Field(min_length=1, description="Judge scorer specs.")
    max_pending: int = Field(default=1000, ge=1, description="Queued judgings beyond are dropped.")


class DriftConfig(_Strict):
    """Drift checks of a route: the last ``current`` window against the ``baseline`` window
    just before it, every ``every``."""

    enabled: bool = True
    baseline: Duration = 7 * 86400
    current: Duration = 86400
    every: Duration = 3600
    alpha: float = Field(default=0.01, gt=0, lt=1)
    min_samples: int = Field(default=30, ge=5)
    max_samples: int = Field(default=300, ge=10, le=5000)
    signals: list[str] | None = Field(
        default=None, description="Signals to check; default: all (see flywheel.monitor.drift)."
    )


class RagRouteConfig(_Strict):
    """Retrieval before the model: the route searches ``knowledge_base`` with the last user
    message, puts the hits in front of the conversation (or renders ``prompt`` with the
    variables ``question``, ``context`` and ``hits``) and answers with citations."""

    knowledge_base: Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN)]
    top_k: int | None = Field(default=None, ge=1, le=100)
    mode: Literal["dense", "bm25", "hybrid"] | None = None
    filters: dict[str, Any] = Field(default_factory=dict)
    prompt: PromptRef | None = None


class RouteCacheConfig(_Strict):
    """A route's response cache (opt-in). ``exact`` serves a stored answer to a request
    identical to an earlier one (same messages and output-changing parameters); ``semantic``
    also serves it when the last user message is a paraphrase (cosine similarity of MiniLM
    embeddings at least ``similarity``) and everything else matches exactly. Answers are
    scoped per project. Never cached: requests with tools (unless ``cache_tools``), with a
    temperature above ``max_temperature`` (an unset temperature counts as 1.0, the OpenAI
    default), with ``n`` > 1, errors, guard-flagged answers and streams that did not finish.
    """

    mode: Literal["exact", "semantic"] = "exact"
    ttl: Duration = Field(
        default=3600.0, description="How long an answer is served, in seconds (or '10m', '1d')."
    )
    similarity: float = Field(
        default=0.95,
        ge=0.5,
        le=1.0,
        description="Semantic mode: the least cosine similarity of the last user messages.",
    )
    max_temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=2.0,
        description="Requests sampling hotter than this are never cached (unset counts as 1.0).",
    )
    cache_tools: bool = Field(
        default=False, description="Also cache requests that offer tools or functions."
    )
    max_entries: int = Field(
        default=10_000,
        ge=1,
        le=100_000,
        description="Answers kept per route and project; the least recently used go first.",
    )


class RouteConfig(_Strict):
    """A named virtual model: weighted targets, ordered fallbacks, retries and timeouts."""

    name: Name
    description: str = ""
    targets: list[RouteTarget] = Field(
        default_factory=list, description="At least one, unless the route runs a pipeline."
    )
    fallbacks: list[Name] = Field(default_factory=list, description="Catalog models, in order.")
    fallback_on: list[FallbackTrigger] = Field(default_factory=lambda: list(FALLBACK_ON))
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: float = Field(default=120.0, gt=0, description="Per-target timeout in seconds.")
    production: bool = Field(
        default=False, description="Production routes may only target approved models."
    )
    capture: CaptureMode | None = Field(
        default=None,
        description="What traces keep of messages: full, redacted (PII masked) or metadata "
        "only; default: the server's FLYWHEEL_CAPTURE.",
    )
    guards: GuardPolicyConfig | None = None
    online_eval: OnlineEvalConfig | None = None
    drift: DriftConfig | None = None
    rag: RagRouteConfig | None = None
    cache: RouteCacheConfig | None = None
    pipeline: (
        Annotated[
            str,
            Field(
                pattern=RESOURCE_NAME_PATTERN,
                description="Run this pipeline of the caller's project for each call.",
            ),
        ]
        | None
    ) = None

    @property
    def prompt_targets(self) -> bool:
        return any(t.prompt is not None for t in self.targets)

    @model_validator(mode="after")
    def _targets_or_pipeline(self) -> RouteConfig:
        if self.pipeline is not None:
            if self.guards is not None or self.online_eval is not None or self.cache is not None:
                raise ValueError(
                    "a pipeline route takes no guards, online_eval or cache: put them on the "
                    "routes its steps call"
                )
            if self.targets or self.fallbacks or self.rag is not None:
                raise ValueError(
                    "a pipeline route has no targets, fallbacks or rag: its steps call models"
                )
        elif not self.targets:
            raise ValueError("a route needs at least one target")
        if self.rag is not None and self.rag.prompt is not None and self.prompt_targets:
            raise ValueError("a rag route renders rag.prompt; its targets must be models")
        return self

    @model_validator(mode="after")
    def _prompts_alone(self) -> RouteConfig:
        # A prompt target picks its own model (and that model's fallbacks), so it cannot
        # share a route with model targets or fallbacks.
        if self.prompt_targets and (
            any(t.model is not None for t in self.targets) or self.fallbacks
        ):
            raise ValueError(
                "a route's targets are all prompts or all models; prompt routes have no "
                "fallbacks (each prompt's model has its own)"
            )
        return self


class PromptVersionSpec(_Strict):
    """The content of one prompt version (see ``flywheel.prompts``)."""

    template: str | list[dict[str, str]]
    variables: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the variables; default: inferred."
    )
    model: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    message: str = ""


class PromptSpec(_Strict):
    """A prompt of the project being applied: either its newest content inline (a new version
    is made when it differs) or its whole ``versions`` history (as ``flywheel export``
    writes it). ``labels`` name the labels on the newest version, or map label → version."""

    name: Annotated[str, Field(pattern=RESOURCE_NAME_PATTERN)]
    description: str = ""
    template: str | list[dict[str, str]] | None = None
    variables: dict[str, Any] | None = None
    model: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    message: str = ""
    versions: list[PromptVersionSpec] | None = Field(default=None, min_length=1)
    labels: list[str] | dict[str, int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_form(self) -> PromptSpec:
        if (self.template is None) == (self.versions is None):
            raise ValueError("a prompt has either 'template' or 'versions'")
        if isinstance(self.labels, dict):
            top = len(self.versions or [None])
            for label, version in self.labels.items():
                if not 1 <= version <= top:
                    raise ValueError(f"label '{label}' points at version {version}, not 1-{top}")
        return self

    def version_specs(self) -> list[PromptVersionSpec]:
        if self.versions is not None:
            return self.versions
        assert self.template is not None
        return [
            PromptVersionSpec(
                template=self.template,
                variables=self.variables,
                model=self.model,
                params=self.params,
                message=self.message,
            )
        ]


ConfigProblem = tuple[tuple[str | int, ...], str]
ConfigCheck = Callable[["FlywheelConfig"], list[ConfigProblem]]
_CHECKS: list[ConfigCheck] = []


def register_config_check(check: ConfigCheck) -> ConfigCheck:
    """Add a check to :meth:`FlywheelConfig.reference_errors`: stages that own part of a
    route's settings (guards, online judges) check it without core importing them."""
    _CHECKS.append(check)
    return check


class FlywheelConfig(_Strict):
    """The whole ``flywheel.yaml``. A section left out of a file is left as it is by
    ``flywheel apply``; ``prompts`` and ``suites`` belong to the project the file is
    applied to."""

    providers: dict[Name, ProviderConfig] = Field(default_factory=dict)
    models: list[CatalogModel] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    prompts: list[PromptSpec] = Field(default_factory=list)
    # Eval suites of the project (checked by ``flywheel.evals.suites.SuiteSpec`` on apply).
    suites: list[dict[str, Any]] = Field(default_factory=list)

    def instance_document(self) -> dict[str, Any]:
        """Providers, models and routes as stored (never an inline API key)."""
        data = self.model_dump(
            mode="json", include={"providers", "models", "routes"}, exclude_defaults=True
        )
        for provider in data.get("providers", {}).values():
            provider.pop("api_key", None)
        return data

    def reference_errors(self) -> list[ConfigProblem]:
        """Cross-references that pydantic cannot check: (location, problem) pairs."""
        errors: list[ConfigProblem] = []
        for check in _CHECKS:
            errors += check(self)
        model_names: set[str] = set()
        for i, model in enumerate(self.models):
            if model.name in model_names:
                errors.append((("models", i, "name"), f"duplicate model name '{model.name}'"))
            model_names.add(model.name)
            if model.provider not in self.providers:
                errors.append((("models", i, "provider"), f"unknown provider '{model.provider}'"))
        prompt_names: set[str] = set()
        for i, prompt in enumerate(self.prompts):
            if prompt.name in prompt_names:
                errors.append((("prompts", i, "name"), f"duplicate prompt '{prompt.name}'"))
            prompt_names.add(prompt.name)
        route_names: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in route_names or route.name in model_names:
                errors.append((("routes", i, "name"), f"name '{route.name}' is already used"))
            route_names.add(route.name)
            refs: list[tuple[tuple[str | int, ...], str]] = [
                (("routes", i, "targets", j, "model"), t.model)
                for j, t in enumerate(route.targets)
                if t.model is not None
            ]
            refs += [
                (("routes", i, "fallbacks", j), name) for j, name in enumerate(route.fallbacks)
            ]
            statuses = {m.name: m.status for m in self.models}
            for loc, name in refs:
                if name not in model_names:
                    errors.append((loc, f"unknown model '{name}'"))
                elif statuses[name] == "blocked":
                    errors.append((loc, f"model '{name}' is blocked in the catalog"))
                elif route.production and statuses[name] != "approved":
                    errors.append(
                        (
                            loc,
                            f"production route '{route.name}' may only target approved models; "
                            f"'{name}' is {statuses[name]}",
                        )
                    )
        return errors
