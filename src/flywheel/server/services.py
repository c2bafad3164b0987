"""The composition root: builds every service of a running server from the settings."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from flywheel.config import FlywheelConfig, RouteConfig, Settings, load_config
from flywheel.config.revisions import ConfigRevisions
from flywheel.config.schema import DriftConfig
from flywheel.datasets.store import DatasetStore
from flywheel.errors import ServiceError
from flywheel.evals.release import ReleaseGate
from flywheel.evals.runner import EvalRunner
from flywheel.evals.suites import EvalError, EvalSuites, is_prompt
from flywheel.experiments.evaluator import ExperimentEvaluator
from flywheel.experiments.store import ExperimentStore
from flywheel.gateway import (
    CallContext,
    ChatCompletionRequest,
    EmbeddingRequest,
    Gateway,
    GatewayError,
)
from flywheel.gateway.cache import RouteCache, make_cache_store
from flywheel.gateway.limits import BudgetAlert, Limiter, Limits, Subject, make_limiter
from flywheel.jobs import JobError, JobStore, JobSupervisor, job_kind, job_kinds, local_launcher
from flywheel.jobs.supervisor import Launcher
from flywheel.loop import LoopStore, parse_loop_spec
from flywheel.loop.driver import LoopDriver
from flywheel.loop.steps import route_base
from flywheel.monitor.alerts import AlertEvaluator, AlertRules
from flywheel.monitor.drift import DriftMonitor
from flywheel.monitor.metrics import route_names
from flywheel.monitor.online import OnlineJudging
from flywheel.pipelines.runner import PipelineInputError, PipelineRun, PipelineRunner
from flywheel.pipelines.store import PipelineStore
from flywheel.prompts import PromptRegistry
from flywheel.prompts.declare import PromptDeclarations
from flywheel.providers import Provider, ProviderRegistry
from flywheel.rag.knowledge import KnowledgeBases
from flywheel.rag.search import Retriever
from flywheel.rag.serving import RagAnswering
from flywheel.registry import ModelRegistry
from flywheel.security import AccessService, ApiKeyStore, Principal
from flywheel.security.approvals import ApprovalService
from flywheel.security.audit import AuditLog
from flywheel.security.secrets import SecretBox, SecretStore, load_master_key
from flywheel.security.sessions import SessionStore
from flywheel.security.throttle import LoginThrottle
from flywheel.server.configuration import ConfigService
from flywheel.server.pipeline_host import GatewayPipelineHost
from flywheel.store import DEFAULT_PROJECT_ID, Database
from flywheel.store.artifacts import ArtifactStore
from flywheel.tracing import TraceQueries, TraceWriter
from flywheel.tracing.content import last_user_text
from flywheel.tracing.feedback import FeedbackStore
from flywheel.tracing.metrics import GatewayMetrics
from flywheel.tracing.otlp import OtlpExporter
from flywheel.tracing.retention import purge_expired
from flywheel.tuning.runs import RunTracker

log = logging.getLogger("flywheel.server")
# Span attributes of calls the server makes on a project's behalf (reranks, embeddings).
INTERNAL_CALL = {"flywheel.internal": True}


def _with_stored_provider_keys(config: FlywheelConfig, store: SecretStore) -> FlywheelConfig:
    """Providers naming ``api_key_secret`` get the decrypted key from the secret store (the
    default project's secrets). A missing secret is logged, not fatal: the server must start
    so that an admin can store it."""
    providers = dict(config.providers)
    for name, provider in config.providers.items():
        if provider.api_key_secret:
            try:
                key = store.reveal(DEFAULT_PROJECT_ID, provider.api_key_secret)
            except KeyError:
                log.error(
                    "provider '%s': no stored secret '%s'; store it with PUT /api/secrets/%s "
                    "and restart",
                    name,
                    provider.api_key_secret,
                    provider.api_key_secret,
                )
                continue
            providers[name] = provider.model_copy(update={"api_key": SecretStr(key)})
    return config.model_copy(update={"providers": providers})


def _startup_config(
    settings: Settings, revisions: ConfigRevisions, *, stored_first: bool = False
) -> tuple[FlywheelConfig, int]:
    """The config to start with: a config file, when there is one, is applied (as a new
    revision if it differs); otherwise the newest stored revision runs, or on a fresh home
    the built-in defaults. ``stored_first`` (job workers) takes the newest stored revision
    even when there is a file: a worker must never re-apply the file over changes made
    since the server started."""
    path = settings.resolved_config_file
    latest = revisions.latest()
    if (path is None or stored_first) and latest is not None:
        return FlywheelConfig.model_validate(latest[1]), latest[0]
    config = load_config(path)
    revision, created = revisions.save(
        config, str(path) if path else "built-in defaults", "system:startup"
    )
    if created and latest is not None:
        log.warning(
            "config file %s differs from revision %d: applied as %d", path, latest[0], revision
        )
    return config, revision


def _settle_heap() -> None:
    """Move everything alive now (modules, torch, loaded models) out of the garbage
    collector's reach. Otherwise each full collection walks those ~300k long-lived objects
    and stalls every in-flight request for about 100 ms (seen as the gateway's p99)."""
    gc.collect()
    gc.freeze()


@dataclass
class Services:
    """Everything the routers call into; one instance per server process."""

    settings: Settings
    config: FlywheelConfig
    db: Database
    keys: ApiKeyStore
    audit: AuditLog
    access: AccessService
    secrets: SecretStore
    prompts: PromptRegistry
    approvals: ApprovalService
    revisions: ConfigRevisions
    config_revision: int
    writer: TraceWriter
    traces: TraceQueries
    providers: ProviderRegistry
    limiter: Limiter
    gateway: Gateway
    secret: str
    sessions: SessionStore
    datasets: DatasetStore
    feedback: FeedbackStore
    suites: EvalSuites
    metrics: GatewayMetrics
    drift: DriftMonitor
    alert_rules: AlertRules
    artifacts: ArtifactStore
    pipelines: PipelineStore
    jobs: JobStore
    runs: RunTracker
    registry: ModelRegistry
    configs: ConfigService = field(init=False)
    kbs: KnowledgeBases = field(init=False)
    retriever: Retriever = field(init=False)
    rag: RagAnswering = field(init=False)
    evals: EvalRunner = field(init=False)
    online: OnlineJudging = field(init=False)
    alerts: AlertEvaluator = field(init=False)
    experiments: ExperimentStore = field(init=False)
    experiment_evaluator: ExperimentEvaluator = field(init=False)
    loops: LoopStore = field(init=False)
    loop_driver: LoopDriver = field(init=False)
    new_admin_key: str | None = None
    exporter: OtlpExporter | None = None
    supervisor: JobSupervisor | None = None
    # Failed logins: per account, and (looser, for shared addresses) per client address.
    account_throttle: LoginThrottle = field(default_factory=lambda: LoginThrottle(10))
    address_throttle: LoginThrottle = field(default_factory=lambda: LoginThrottle(50))
    _preload: asyncio.Task[None] | None = field(default=None, repr=False)
    _watch: asyncio.Task[None] | None = field(default=None, repr=False)
    _monitor: asyncio.Task[None] | None = field(default=None, repr=False)
    _retention: asyncio.Task[None] | None = field(default=None, repr=False)
    _experiment_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _loop_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _retired: list[Provider] = field(default_factory=list, repr=False)

    # How often a replica looks for a config revision applied elsewhere.
    CONFIG_POLL_SECONDS = 3.0

    def __post_init__(self) -> None:
        self.configs = ConfigService(
            self.revisions,
            PromptDeclarations(self.prompts),
            self.approvals,
            self.audit,
            running=lambda: self.config,
            activate=self.activate,
            suites=self.suites,
        )
        self.evals = EvalRunner(
            self.db,
            self.datasets,
            self.eval_call,
            self.resolve_eval_target,
            self.gateway.is_prompt_target,
        )
        # Protected labels move only for versions that passed their eval suites.
        self.approvals.gate = ReleaseGate(self.db, self.suites, self.evals, self.label_version)
        self.online = OnlineJudging(self.judge_call, self.writer.record_score)
        self.online.configure(self.config)
        self.gateway.on_traced = self.online.offer
        self.alerts = AlertEvaluator(self.db, self.alert_rules, self.secrets.reveal)
        self.kbs = KnowledgeBases(self.db, self.audit, self.artifacts, self.embed_call)
        self.retriever = Retriever(
            self.kbs, lambda project_id, body: self.judge_call(project_id, body, INTERNAL_CALL)
        )
        self.rag = RagAnswering(self.retriever, self.writer)
        self.gateway.retrieve = self.rag_retrieve
        self.gateway.run_pipeline = self.pipeline_call
        self.experiments = ExperimentStore(self.db, self.audit)
        self.gateway.assign_variant = self.experiments.assign
        self.experiment_evaluator = ExperimentEvaluator(
            self.db,
            self.experiments,
            self.prompts,
            self.approvals,
            self.configs.apply,
            lambda: self.config,
        )
        self.loops = LoopStore(self.db, self.audit)
        self.loop_driver = LoopDriver(
            self.loops, self.jobs, self.submit_job, self.approvals, self.experiments
        )
        self.metrics.add_queue(
            "flywheel_trace_writer_pending",
            "Span and score rows waiting for the trace writer.",
            (),
            lambda: {(): self.writer.pending},
        )
        self.metrics.add_queue(
            "flywheel_trace_writer_dropped",
            "Trace rows the writer dropped since start (buffer full, database down at "
            "shutdown, refused rows), by type.",
            ("type",),
            lambda: {("span",): self.writer.dropped, ("score",): self.writer.dropped_scores},
        )
        self.metrics.add_queue(
            "flywheel_trace_writer_database_down",
            "1 while the trace writer cannot reach the database (it buffers and retries).",
            (),
            lambda: {(): self.writer.stats["database_down"]},
        )
        self.metrics.add_queue(
            "flywheel_online_judging_pending",
            "Sampled calls waiting for their online judges.",
            (),
            lambda: {(): self.online.pending},
        )
        self.metrics.add_queue(
            "flywheel_local_batch_waiting",
            "Requests waiting for a slot in a local model's batch.",
            ("model",),
            lambda: {(m,): w for m, (_, w) in self.providers.batch_depths().items()},
        )
        self.metrics.add_queue(
            "flywheel_local_batch_active",
            "Rows in a local model's running batch.",
            ("model",),
            lambda: {(m,): a for m, (a, _) in self.providers.batch_depths().items()},
        )

    def label_version(self, project_id: str, kind: str, name: str, label: str) -> int | None:
        """The version a prompt's label (or a model's alias) points at now, or None."""
        try:
            if kind == "model":
                return int(self.registry.version(project_id, name, label)["version"])
            return self.prompts.get(project_id, name, label).version
        except ServiceError:
            return None

    async def judge_call(
        self, project_id: str, body: dict[str, Any], attributes: dict[str, Any]
    ) -> dict[str, Any]:
        """An online judge's call through the gateway, as the project."""
        response, _ = await self.eval_call(project_id, body, attributes)
        return response

    async def embed_call(self, project_id: str, model: str, texts: list[str]) -> list[list[float]]:
        """Embeddings from a catalog model through the gateway, as the project."""
        ctx = CallContext(
            project_id=project_id,
            limit_subjects=await self.project_limit_subjects(project_id),
            attributes=INTERNAL_CALL,
        )
        try:
            response = await self.gateway.embeddings(
                EmbeddingRequest(model=model, input=texts), ctx
            )
        except GatewayError as exc:
            raise ServiceError(exc.status_code, exc.message, exc.code, exc.param) from None
        rows = sorted(response["data"], key=lambda item: item["index"])
        return [row["embedding"] for row in rows]

    async def rag_retrieve(
        self,
        ctx: CallContext,
        knowledge_base: str,
        question: str,
        options: dict[str, Any],
        capture: str = "full",
    ) -> dict[str, Any]:
        """A gateway rag call's retrieval, recorded under the call's span."""
        return await self.rag.retrieve(
            ctx.project_id or DEFAULT_PROJECT_ID,
            knowledge_base,
            question,
            options,
            trace_id=ctx.trace_id,
            parent_id=ctx.span_id,
            api_key_id=ctx.api_key_id,
            capture=capture,
        )

    async def run_pipeline(
        self, ctx: CallContext, name: str, inputs: dict[str, Any]
    ) -> PipelineRun:
        """Run a pipeline of the caller's project as the caller (a 400 for bad inputs)."""
        spec = await asyncio.to_thread(self.pipelines.spec, ctx.project_id or "", name)
        runner = PipelineRunner(GatewayPipelineHost(self, ctx))
        try:
            return await runner.run(
                spec,
                inputs,
                trace_id=ctx.trace_id,
                parent_id=ctx.parent_id,
                project_id=ctx.project_id,
                attributes=ctx.attributes,
            )
        except PipelineInputError as exc:
            raise ServiceError(400, str(exc), "invalid_value", "inputs") from None

    async def pipeline_call(
        self, ctx: CallContext, name: str, messages: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A pipeline behind a chat route: its ``question`` input is the last user message and
        its ``messages`` input (when declared) the conversation; its output is the answer."""
        spec = await asyncio.to_thread(self.pipelines.spec, ctx.project_id or "", name)
        declared = set(spec.inputs)
        inputs: dict[str, Any] = {}
        if "question" in declared:
            inputs["question"] = last_user_text(messages) or ""
        if "messages" in declared:
            inputs["messages"] = messages
        run_ctx = CallContext(
            api_key_id=ctx.api_key_id,
            project_id=ctx.project_id,
            allowed_models=None,
            limit_subjects=ctx.limit_subjects,
            trace_id=ctx.trace_id,
            parent_id=ctx.span_id,
            attributes=ctx.attributes,
        )
        run = await self.run_pipeline(run_ctx, name, inputs)
        return {"status": run.status, "output": run.output, "error": run.error}

    async def eval_call(
        self,
        project_id: str,
        body: dict[str, Any],
        attributes: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One eval or judge call through the gateway, as the project (its budget and
        limits apply); returns the response and its cost, latency and trace id."""
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise EvalError(400, f"invalid eval request: {exc.errors()[0]['msg']}") from None
        ctx = CallContext(
            project_id=project_id,
            limit_subjects=await self.project_limit_subjects(project_id),
            attributes=attributes or {"flywheel.eval": True},
            # Evals and judges measure the route's models: never a cached answer.
            cache_lookup=False,
            cache_store=False,
        )
        try:
            response = await self.gateway.chat(request, ctx)
        except GatewayError as exc:
            raise ServiceError(exc.status_code, exc.message, exc.code, exc.param) from None
        return response, ctx.outcome or {}

    async def project_limit_subjects(self, project_id: str) -> tuple[Subject, ...]:
        """The project's own limits as a gateway subject (none when it has none)."""
        cached, limits = self.access.cached_project_limits(project_id)
        if not cached:
            # A miss reads the database; keep that off the event loop.
            limits = await asyncio.to_thread(self.access.project_limits, project_id)
        return (Subject("project", project_id, Limits(**limits)),) if limits else ()

    def resolve_eval_target(self, project_id: str, target: str) -> str:
        """A run's target pinned: a prompt label resolved to its version now, so that the
        run (and its cache) says exactly what was evaluated."""
        if is_prompt(target):
            version = self.prompts.resolve(project_id, target[len("prompt:") :])
            return f"prompt:{version.name}@{version.version}"
        if not self.gateway.knows(target):
            raise EvalError(
                400, f"The target '{target}' is no route or model here.", "unknown_target", "target"
            )
        return target

    def activate(self, config: FlywheelConfig, revision: int) -> None:
        """Run ``config`` from now on (stored provider keys resolved); unchanged providers
        keep their loaded models."""
        config = _with_stored_provider_keys(config, self.secrets)
        self._retired += self.providers.reconfigure(config)
        self.gateway.reconfigure(config)
        self.online.configure(config)
        self.config, self.config_revision = config, revision
        log.info("config revision %d is running", revision)

    @classmethod
    def build(cls, settings: Settings, *, worker: bool = False) -> Services:
        """Open the database (migrating it), make sure an admin key exists, load the config.

        ``worker`` builds them for a job process: it runs the newest stored config revision
        rather than applying the config file."""
        home = settings.home_dir
        home.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        db.migrate()
        revisions = ConfigRevisions(db)
        config, revision = _startup_config(settings, revisions, stored_first=worker)
        keys = ApiKeyStore(db)
        audit = AuditLog(db)
        master_key = settings.master_key.get_secret_value() if settings.master_key else None
        secrets_store = SecretStore(db, SecretBox(load_master_key(home, master_key)))
        sessions = SessionStore(db, secrets_store.box, settings.redis_url)
        config = _with_stored_provider_keys(config, secrets_store)
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        new_admin_key = keys.ensure_admin(admin_key)
        writer = TraceWriter(
            db,
            settings.trace_batch_size,
            settings.trace_flush_seconds,
            settings.trace_buffer_spans,
        )
        metrics = GatewayMetrics()
        exporter = None
        if settings.otlp_endpoint:
            exporter = OtlpExporter(
                settings.otlp_endpoint, settings.otlp_headers, service_name="flywheel"
            )
            sink = exporter

            def export(rows: list[dict[str, Any]]) -> None:
                # Spans an app sent over OTLP are its own; only Flywheel's go back out.
                sink.export([r for r in rows if not str(r.get("kind", "")).startswith("otel.")])

            writer.listeners.append(export)
        providers = ProviderRegistry(
            config,
            settings.resolved_model_cache,
            settings.local_dtype,
            settings.local_max_batch_size,
            settings.local_threads,
        )
        traces = TraceQueries(db)
        prompts = PromptRegistry(db, audit, settings.approval_labels)
        approvals = ApprovalService(db, audit)
        approvals.register("prompt", prompts)
        artifacts = ArtifactStore(settings.resolved_artifact_root)
        registry = ModelRegistry(
            db, audit, artifacts, settings.resolved_model_cache, settings.approval_labels
        )
        approvals.register("model", registry)

        def spent(subject: Subject, since: float) -> float:
            return traces.spend_since(subject.kind, subject.id, since)

        limiter = make_limiter(settings.redis_url, spent_loader=spent)

        async def budget_alert(alert: BudgetAlert) -> None:
            kind, _, subject_id = alert.subject.partition(":")
            await asyncio.to_thread(
                audit.record,
                actor="system:budget",
                action="budget.soft_limit",
                resource_type=kind,
                resource_id=subject_id,
                project_id=subject_id if kind == "project" else None,
                after={"spent": alert.spent, "budget": alert.budget, "period": alert.period},
            )

        return cls(
            settings=settings,
            config=config,
            db=db,
            keys=keys,
            audit=audit,
            access=AccessService(db, keys, audit),
            secrets=secrets_store,
            prompts=prompts,
            approvals=approvals,
            revisions=revisions,
            config_revision=revision,
            writer=writer,
            traces=traces,
            providers=providers,
            limiter=limiter,
            gateway=Gateway(
                config,
                providers,
                writer,
                settings.capture,
                limiter=limiter,
                on_budget_alert=budget_alert,
                prompts=prompts.resolve,
                deadline=settings.request_deadline,
                metrics=metrics,
                # Answers of routes with a ``cache:`` block: shared through Redis when set.
                cache=RouteCache(make_cache_store(settings.redis_url)),
            ),
            secret=sessions.secret,
            sessions=sessions,
            account_throttle=sessions.login_throttle("account", 10),
            address_throttle=sessions.login_throttle("address", 50),
            new_admin_key=new_admin_key,
            datasets=DatasetStore(db, audit),
            feedback=FeedbackStore(db, traces),
            suites=EvalSuites(db, audit),
            metrics=metrics,
            exporter=exporter,
            drift=DriftMonitor(db),
            alert_rules=AlertRules(db, audit),
            artifacts=artifacts,
            pipelines=PipelineStore(db, audit),
            jobs=JobStore(db, audit),
            runs=RunTracker(db),
            registry=registry,
        )

    def start_background(self) -> None:
        _settle_heap()
        if self.settings.preload_models:
            self._preload = asyncio.create_task(self._preload_models())
        self._watch = asyncio.create_task(self._watch_config())
        self.online.start()
        self._monitor = asyncio.create_task(self._monitor_loop())
        self._retention = asyncio.create_task(self._retention_loop())
        self._experiment_task = asyncio.create_task(self._experiment_loop())
        if self.settings.jobs_enabled:
            self._loop_task = asyncio.create_task(self._drive_loops())
        if self.settings.jobs_enabled and self.settings.job_concurrency > 0:
            self.supervisor = JobSupervisor(
                self.jobs,
                self.job_launchers(),
                concurrency=self.settings.job_concurrency,
                orphan_after=self.settings.job_orphan_after,
                timeout=self.settings.job_timeout,
            )
            self.supervisor.start()

    def serve_model(
        self,
        caller: Principal,
        ref: str,
        *,
        route: str | None,
        provider: str = "local",
        weight: float | None = None,
        replace: bool = False,
        status: str = "experimental",
    ) -> dict[str, Any]:
        """Make a registered version a local-provider target of ``route`` by applying a new
        config revision (validated, audited, followed by every replica)."""
        patched = self.registry.serve(
            caller.project_id,
            ref,
            self.config.instance_document(),
            route=route,
            provider=provider,
            weight=weight,
            replace=replace,
            status=status,  # type: ignore[arg-type]
        )
        document = {key: patched["document"][key] for key in ("providers", "models", "routes")}
        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
        applied = self.configs.apply(caller, text, f"serve {ref}")
        return {
            "served_name": patched["served_name"],
            "route": route,
            "version": patched["version"],
            "revision": applied.get("revision"),
        }

    def job_launchers(self) -> dict[str, Launcher]:
        """How this replica starts jobs: local processes, and Ray tasks when a cluster is
        configured."""
        settings = self.settings
        env = {"FLYWHEEL_JOB_NICE": str(settings.job_nice)}
        if settings.job_memory_limit_mb:
            env["FLYWHEEL_JOB_MEMORY_LIMIT_MB"] = str(settings.job_memory_limit_mb)
        if settings.job_threads:
            threads = str(settings.job_threads)
            env.update(OMP_NUM_THREADS=threads, FLYWHEEL_LOCAL_THREADS=threads)
        launchers: dict[str, Launcher] = {"local": local_launcher(settings.jobs_dir, env)}
        if settings.ray_address:
            from flywheel.jobs.ray_executor import ray_launcher

            launchers["ray"] = ray_launcher(settings, self.jobs)
        return launchers

    def submit_job(
        self,
        project_id: str,
        kind_name: str,
        params: dict[str, Any],
        actor: str,
        *,
        name: str = "",
        executor: str | None = None,
        author_id: str | None = None,
    ) -> dict[str, Any]:
        """Validate ``params`` for the kind and queue the job on an executor."""
        kind = job_kind(kind_name)
        if kind is None:
            known = ", ".join(sorted(job_kinds()))
            raise JobError(
                400, f"Unknown job kind '{kind_name}'; known: {known}.", "invalid_value", "kind"
            )
        chosen = executor or self.settings.job_executor
        if chosen == "ray" and not self.settings.ray_address:
            raise JobError(
                400,
                "The 'ray' executor needs FLYWHEEL_RAY_ADDRESS (a Ray cluster address).",
                "ray_not_configured",
                "executor",
            )
        job = self.jobs.submit(
            project_id,
            kind_name,
            kind.validate(params),
            actor,
            name=name,
            executor=chosen,
            author_id=author_id,
        )
        if self.supervisor is not None:
            self.supervisor.wake()
        return job

    async def _monitor_loop(self) -> None:
        """Check alert rules and run the drift checks that are due, every monitor tick."""
        while True:
            await asyncio.sleep(self.settings.monitor_interval)
            try:
                await asyncio.to_thread(self.run_due_drift_checks)
            except Exception:
                log.exception("drift checks failed")
            await self.alerts.check()

    def monitored_routes(
        self, project_id: str, since: float
    ) -> list[tuple[str, RouteConfig | None, bool]]:
        """Every configured route and every route with traffic in the project since
        ``since``, by name: ``(name, its config or None, whether it had traffic)``."""
        configured = {route.name: route for route in self.config.routes}
        active = set(route_names(self.db, project_id, since))
        return [
            (name, configured.get(name), name in active)
            for name in sorted(set(configured) | active)
        ]

    def drift_settings(self, route: str) -> DriftConfig:
        """The route's drift settings, or the defaults for a route without any (a route seen
        only in traffic, e.g. one an OpenTelemetry app reports)."""
        found = next((r for r in self.config.routes if r.name == route), None)
        return found.drift if found is not None and found.drift is not None else DriftConfig()

    def run_due_drift_checks(self, now: float | None = None) -> int:
        """Run each route's drift check for every project with traffic on it, where the last
        check is older than the route's ``drift.every``; returns how many ran."""
        now = time.time() if now is None else now
        ran = 0
        for route in self.config.routes:
            drift = route.drift
            if drift is None or not drift.enabled:
                continue
            for project_id in self.drift.projects_with_traffic(route.name, now - drift.current):
                last = self.drift.last_checked(project_id, route.name)
                if last is None or now - last >= drift.every:
                    self.drift.check(project_id, route.name, drift, now)
                    ran += 1
        return ran

    async def _experiment_loop(self) -> None:
        """Look at every running experiment each tick: guardrails, the sequential test, and
        promotion or rollback (see flywheel.experiments.evaluator)."""
        try:
            await asyncio.to_thread(self.experiments.refresh)
        except Exception:
            log.exception("could not load the running experiments")
        interval = self.settings.experiment_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.experiment_evaluator.tick)
            except Exception:
                log.exception("experiment evaluation failed")

    async def _drive_loops(self) -> None:
        """Move every active `flywheel loop` along (see flywheel.loop.driver)."""
        while True:
            await asyncio.sleep(self.settings.loop_interval)
            try:
                await asyncio.to_thread(self.loop_driver.tick)
            except Exception:
                log.exception("the loop driver failed")

    def start_loop(self, caller: Principal, body: dict[str, Any]) -> dict[str, Any]:
        """Start `flywheel loop` on a route (checked against the running config: a route
        whose targets are models, and jobs enabled on this instance)."""
        spec = parse_loop_spec(body)
        if not self.settings.jobs_enabled:
            raise ServiceError(
                400,
                "Jobs are disabled on this instance (FLYWHEEL_JOBS_ENABLED): the loop runs "
                "each step as a job.",
                "jobs_disabled",
            )
        try:
            route_base(self, spec.route)
        except ServiceError as exc:
            raise ServiceError(400, exc.message, "invalid_value", "route") from None
        return self.loops.create(caller.project_id, spec, caller.actor, caller.identity)

    async def _retention_loop(self) -> None:
        while True:
            try:
                purged = await asyncio.to_thread(purge_expired, self.db)
                for project_id, counts in purged.items():
                    log.info("retention purge of project %s: %s", project_id, counts)
            except Exception:
                log.exception("retention purge failed")
            await asyncio.sleep(self.settings.retention_interval)

    async def _watch_config(self) -> None:
        """Follow revisions applied through another replica (or the CLI on this home)."""
        while True:
            await asyncio.sleep(self.CONFIG_POLL_SECONDS)
            try:
                newest = await asyncio.to_thread(self.revisions.latest_number)
                if newest > self.config_revision:
                    latest = await asyncio.to_thread(self.revisions.latest)
                    if latest is not None:
                        self.activate(FlywheelConfig.model_validate(latest[1]), latest[0])
                for provider in self._retired:
                    await provider.aclose()
                self._retired.clear()
            except Exception:
                log.exception("could not follow the stored config")

    async def _preload_models(self) -> None:
        await self.providers.preload()
        if any(r.cache is not None and r.cache.mode == "semantic" for r in self.config.routes):
            from flywheel.providers.minilm import load_minilm

            await asyncio.to_thread(load_minilm)  # the semantic cache's embedder
        for policy in self.gateway.policies.values():
            try:
                await asyncio.to_thread(policy.warm)
            except Exception:
                log.exception("could not warm up guard detectors")
        _settle_heap()

    async def close(self) -> None:
        """Stop accepting model work, then flush every trace to the database."""
        if self.supervisor is not None:
            await self.supervisor.close()
        for task in (
            self._preload,
            self._watch,
            self._monitor,
            self._retention,
            self._experiment_task,
            self._loop_task,
        ):
            if task is not None and not task.done():
                task.cancel()
        # Shadow calls still running finish (and are traced) before the writer's last flush.
        await self.gateway.drain_shadows(5.0)
        await self.online.close()
        await self.evals.close()
        await self.providers.aclose()
        await self.limiter.aclose()
        await self.gateway.cache.aclose()
        self.sessions.close()
        self.writer.close()
        if self.exporter is not None:
            await asyncio.to_thread(self.exporter.close)
        self.db.dispose()
