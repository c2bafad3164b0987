"""Tables. Portable types only: the same models run on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


DEFAULT_PROJECT_ID = "default"


class Project(Base):
    """A workspace: every resource belongs to exactly one, and nothing crosses over."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    limits: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    # Traces (and their scores and feedback) older than this many days are purged; None keeps.
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)


class User(Base):
    """A person who logs in to the UI; ``is_admin`` administers the whole instance."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    disabled_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class RoleBinding(Base):
    """A user's role in one project: admin, developer, reviewer or viewer."""

    __tablename__ = "role_bindings"
    __table_args__ = (UniqueConstraint("project_id", "user_id", name="uq_role_project_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)


class ApiKey(Base):
    """An API key; only its SHA-256 is stored (keys are random, so a slow hash adds nothing).

    A key acts in one project with a role, narrowed by its scope; a key without a project is
    an instance admin key (the bootstrap key). ``allowed_models`` lists the routes and models
    it may call (None: all); ``limits`` caps its traffic and spend.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32), default="admin")
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    project_id: Mapped[str | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True, index=True
    )
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    scope: Mapped[str] = mapped_column(String(16), default="admin")
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    allowed_models: Mapped[Any] = mapped_column(JSON, nullable=True)
    limits: Mapped[Any] = mapped_column(JSON, nullable=True)


class StoredSecret(Base):
    """A secret (e.g. a provider key), encrypted with the master key; never returned."""

    __tablename__ = "secrets"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_secrets_project_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str | None] = mapped_column(String(200), nullable=True)


class AuditEvent(Base):
    """One entry of the append-only audit log. ``hash`` covers the entry and ``prev_hash``,
    so editing, deleting or reordering any entry breaks the chain from there on."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64), index=True)
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    project_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    before: Mapped[Any] = mapped_column(JSON, nullable=True)
    after: Mapped[Any] = mapped_column(JSON, nullable=True)
    # Unique: two writers that read the same tail cannot both extend it (no forked chain).
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class ApprovalRequest(Base):
    """A request to move a label (e.g. ``production``) onto a prompt or model version."""

    __tablename__ = "approval_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_name: Mapped[str] = mapped_column(String(200))
    resource_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    # The identity (``Principal.identity``) of the version's author: never its approver.
    author: Mapped[str | None] = mapped_column(String(200), nullable=True)
    requested_by: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    gate: Mapped[Any] = mapped_column(JSON, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    decided_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    decided_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Prompt(Base):
    """A named prompt in a project; its content lives in immutable versions."""

    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_prompts_project_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))


class PromptVersion(Base):
    """One immutable version: template, variables schema, default model and parameters."""

    __tablename__ = "prompt_versions"
    __table_args__ = (UniqueConstraint("prompt_id", "version", name="uq_prompt_versions"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    template: Mapped[Any] = mapped_column(JSON)
    variables: Mapped[Any] = mapped_column(JSON)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    params: Mapped[Any] = mapped_column(JSON)
    message: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(200))
    author_id: Mapped[str] = mapped_column(String(64))
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class PromptLabel(Base):
    """Where a label (``production``, ``staging``…) of a prompt points now."""

    __tablename__ = "prompt_labels"

    prompt_id: Mapped[str] = mapped_column(
        ForeignKey("prompts.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(200))


class LabelEvent(Base):
    """One move of a label: the history behind rollbacks and the release timeline."""

    __tablename__ = "label_events"
    __table_args__ = (Index("ix_label_events_resource", "project_id", "resource_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(32))
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_name: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str] = mapped_column(String(200))
    approval_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ts: Mapped[float] = mapped_column(Float)


class ConfigRevision(Base):
    """One applied revision of the instance config (providers, catalog, routes); the newest
    is the running one, older ones are its history."""

    __tablename__ = "config_revisions"

    revision: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document: Mapped[Any] = mapped_column(JSON)
    content_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(200))
    applied_by: Mapped[str] = mapped_column(String(200))
    applied_at: Mapped[float] = mapped_column(Float)


class SpanRecord(Base):
    """A span; a trace is the spans sharing ``trace_id``, its root has no parent.

    Gateway calls are root spans (or children of a caller's span via ``traceparent``) carrying
    the route, the target that answered, tokens, cost, latency and time to first token.
    """

    __tablename__ = "spans"
    __table_args__ = (
        UniqueConstraint("trace_id", "span_id", name="uq_spans_trace_span"),
        Index("ix_spans_root_start", "parent_id", "start_time"),
        Index("ix_spans_route_start", "route", "start_time"),
        Index("ix_spans_project_start", "project_id", "start_time"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trace_id: Mapped[str] = mapped_column(String(32), index=True)
    span_id: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(64))
    start_time: Mapped[float] = mapped_column(Float, index=True)
    end_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="ok")
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    route: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    provider: Mapped[str | None] = mapped_column(String(128), nullable=True)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    input: Mapped[Any] = mapped_column(JSON, nullable=True)
    output: Mapped[Any] = mapped_column(JSON, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[Any] = mapped_column(JSON, nullable=True)
    attributes: Mapped[Any] = mapped_column(JSON, nullable=True)
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    project_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Dataset(Base):
    """A named dataset in a project; its items live in immutable versions."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_datasets_project_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))


class DatasetVersion(Base):
    """One immutable version: its items, their content hash and where they came from."""

    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version", name="uq_dataset_versions"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    item_count: Mapped[int] = mapped_column(Integer)
    test_fraction: Mapped[float] = mapped_column(Float, default=0.2)
    message: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))


class DatasetItem(Base):
    """One item of one version: input messages and/or variables, the expected output, context
    passages and metadata; ``split`` is derived from the item's hash, so it is stable."""

    __tablename__ = "dataset_items"
    __table_args__ = (Index("ix_dataset_items_version", "version_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    item_hash: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(8))
    messages: Mapped[Any] = mapped_column(JSON, nullable=True)
    variables: Mapped[Any] = mapped_column(JSON, nullable=True)
    expected: Mapped[str | None] = mapped_column(Text, nullable=True)
    context: Mapped[Any] = mapped_column(JSON)
    meta: Mapped[Any] = mapped_column(JSON)


class Feedback(Base):
    """A rating, comment and/or correction (the preferred answer) on a trace."""

    __tablename__ = "feedback"
    __table_args__ = (
        Index("ix_feedback_project_trace", "project_id", "trace_id"),
        Index("ix_feedback_project_created", "project_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(32))
    trace_id: Mapped[str] = mapped_column(String(32))
    rating: Mapped[float | None] = mapped_column(Float, nullable=True)
    rating_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str] = mapped_column(String(16))
    author: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class AnnotationTask(Base):
    """A trace waiting in a project's annotation queue, taken by one reviewer at a time."""

    __tablename__ = "annotation_tasks"
    __table_args__ = (
        UniqueConstraint("project_id", "queue", "trace_id", name="uq_annotation_task"),
        Index("ix_annotation_tasks_status", "project_id", "queue", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(32))
    queue: Mapped[str] = mapped_column(String(64))
    trace_id: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    assignee: Mapped[str | None] = mapped_column(String(200), nullable=True)
    claimed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    done_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class EvalSuite(Base):
    """A named evaluation: a dataset (version), a target, scorers and thresholds."""

    __tablename__ = "eval_suites"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_eval_suites_project_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    definition: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(200))


class EvalRun(Base):
    """One evaluation of a target on a dataset version, with its summary once finished."""

    __tablename__ = "eval_runs"
    __table_args__ = (Index("ix_eval_runs_project_created", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(32))
    suite: Mapped[str | None] = mapped_column(String(128), nullable=True)
    dataset: Mapped[str] = mapped_column(String(128))
    dataset_version: Mapped[int] = mapped_column(Integer)
    split: Mapped[str | None] = mapped_column(String(8), nullable=True)
    target: Mapped[str] = mapped_column(String(300))
    resolved_target: Mapped[str] = mapped_column(String(300))
    spec: Mapped[Any] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    cache_hits: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[Any] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Written while the run goes; a running run whose heartbeat stopped lost its server.
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Set by a cancel that reached another process (a replica, a job); the process running
    # the run reads it with its heartbeat and stops the run.
    cancel_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class EvalResult(Base):
    """One item's answer in a run, with every scorer's value and detail."""

    __tablename__ = "eval_results"
    __table_args__ = (UniqueConstraint("run_id", "position", name="uq_eval_results_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    item_hash: Mapped[str] = mapped_column(String(64))
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    cost: Mapped[float | None] = mapped_column(Float, nullable=True)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    trace_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    scores: Mapped[Any] = mapped_column(JSON)
    details: Mapped[Any] = mapped_column(JSON)


class ResponseCache(Base):
    """Eval responses keyed by the hash of target, parameters and messages: re-runs are fast."""

    __tablename__ = "response_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    target: Mapped[str] = mapped_column(String(300))
    response: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class TraceScore(Base):
    """A named score on a trace: a guard's verdict, an online judge's grade, an imported
    OpenTelemetry evaluation. ``route`` is copied from the trace so monitors aggregate scores
    per route without a join."""

    __tablename__ = "trace_scores"
    __table_args__ = (
        Index("ix_trace_scores_trace", "trace_id"),
        Index("ix_trace_scores_project_route", "project_id", "route", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(32))
    trace_id: Mapped[str] = mapped_column(String(32))
    span_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    route: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # "guard.pii", "guard.injection", "judge.relevance"…
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    # What the score says in words: "block", "redact", "flag" for guards; a judge's choice.
    label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source: Mapped[str] = mapped_column(String(16))
    detail: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class DriftEvent(Base):
    """One drift check of a route's signal: a baseline window against a current window."""

    __tablename__ = "drift_events"
    __table_args__ = (Index("ix_drift_events_project_route", "project_id", "route", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(32))
    route: Mapped[str] = mapped_column(String(128))
    # "prompt_embedding", "response_embedding", "latency_ms", "response_length"…
    signal: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(16))
    statistic: Mapped[float] = mapped_column(Float)
    p_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    drifted: Mapped[bool] = mapped_column(Boolean)
    n_baseline: Mapped[int] = mapped_column(Integer)
    n_current: Mapped[int] = mapped_column(Integer)
    baseline_start: Mapped[float] = mapped_column(Float)
    baseline_end: Mapped[float] = mapped_column(Float)
    current_start: Mapped[float] = mapped_column(Float)
    current_end: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class AlertRule(Base):
    """A condition on a metric over a window; when it holds, an event fires (at most once per
    cooldown) and is delivered to the rule's webhook, signed with a stored secret."""

    __tablename__ = "alert_rules"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_alert_rules_project_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    metric: Mapped[str] = mapped_column(String(128))
    route: Mapped[str | None] = mapped_column(String(128), nullable=True)
    window_seconds: Mapped[int] = mapped_column(Integer)
    operator: Mapped[str] = mapped_column(String(2))
    threshold: Mapped[float] = mapped_column(Float)
    cooldown_seconds: Mapped[int] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Name of a project secret holding the HMAC key that signs webhook deliveries.
    webhook_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # "ok" or "firing": an event fires on the change to firing, not on every check.
    state: Mapped[str] = mapped_column(String(16), default="ok")
    last_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_checked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_fired_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(200))


class AlertEvent(Base):
    """A rule that fired (or resolved), and how its webhook delivery went."""

    __tablename__ = "alert_events"
    __table_args__ = (
        Index("ix_alert_events_project_created", "project_id", "created_at"),
        UniqueConstraint("rule_id", "dedup_key", name="uq_alert_events_dedup"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule_id: Mapped[str] = mapped_column(ForeignKey("alert_rules.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(String(32))
    # "firing" or "resolved".
    status: Mapped[str] = mapped_column(String(16))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
    # Rule id, status and window start: a replica re-checking the same window adds nothing.
    dedup_key: Mapped[str] = mapped_column(String(128))
    # "pending", "delivered", "failed" or "none" (no webhook).
    delivery: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class KnowledgeBase(Base):
    """A project's searchable collection of documents; ``settings`` holds its chunker,
    embedder and search defaults, and ``index_version`` the index that searches use."""

    __tablename__ = "knowledge_bases"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_knowledge_bases_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[Any] = mapped_column(JSON)
    index_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[float] = mapped_column(Float)


class KbDocument(Base):
    """One document of a knowledge base, by source (path or URL). Re-ingesting a source with
    new content makes a new ``version`` and new chunks; the same content changes nothing."""

    __tablename__ = "kb_documents"
    __table_args__ = (
        UniqueConstraint("kb_id", "source", name="uq_kb_documents_source"),
        Index("ix_kb_documents_hash", "kb_id", "content_hash"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kb_id: Mapped[str] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(1000))
    content_hash: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(128))
    meta: Mapped[Any] = mapped_column(JSON)
    text: Mapped[str] = mapped_column(Text)
    chars: Mapped[int] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(200))


class KbChunk(Base):
    """A passage of a document with its character offsets; its id is the index's vector id.
    The embedding is kept (float32 bytes) so that a new index version re-embeds only what
    changed; ``embedder`` says which model made it."""

    __tablename__ = "kb_chunks"
    __table_args__ = (
        Index("ix_kb_chunks_kb", "kb_id", "document_id", "position"),
        Index("ix_kb_chunks_document", "document_id"),
        # An index version's vector ids are chunk ids: a reused id would point a stored
        # index at another passage, so SQLite must never hand out a deleted id again.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kb_id: Mapped[str] = mapped_column(String(32))
    document_id: Mapped[str] = mapped_column(ForeignKey("kb_documents.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    headings: Mapped[Any] = mapped_column(JSON)
    tokens: Mapped[int] = mapped_column(Integer)
    embedder: Mapped[str | None] = mapped_column(String(300), nullable=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class KbIndexVersion(Base):
    """An immutable index build: which embedder and chunker made it over which documents
    (source and content hash), and where its vector and BM25 indexes are stored."""

    __tablename__ = "kb_index_versions"
    __table_args__ = (UniqueConstraint("kb_id", "version", name="uq_kb_index_versions"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kb_id: Mapped[str] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    embedder: Mapped[str] = mapped_column(String(300))
    dim: Mapped[int] = mapped_column(Integer)
    chunker: Mapped[Any] = mapped_column(JSON)
    # sha256 over the sorted (source, content hash) pairs; the pairs themselves in documents.
    digest: Mapped[str] = mapped_column(String(64))
    documents: Mapped[Any] = mapped_column(JSON)
    chunk_count: Mapped[int] = mapped_column(Integer)
    vector_kind: Mapped[str] = mapped_column(String(16))
    artifacts: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))


class Pipeline(Base):
    """A declarative pipeline of a project: its YAML as written and a version counter."""

    __tablename__ = "pipelines"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_pipelines_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    spec: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(200))


class Job(Base):
    """A unit of long work (fine-tune, merge, quantize, batch eval, ingestion) run by an
    executor outside the request. ``status``: queued, running, succeeded, failed, cancelled,
    or orphaned (its process vanished without saying how it ended)."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_project_created", "project_id", "created_at"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    params: Mapped[Any] = mapped_column(JSON)
    executor: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[Any] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set by a cancel from any replica; the worker and its supervisor both watch it.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    retry_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Who runs it: host name and process id (local) or the Ray task id.
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    # Who submitted it, as four-eyes checks name people: what it registers is theirs.
    author_id: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Written while the job runs; a running job whose heartbeat stopped lost its process.
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobLog(Base):
    """A batch of a job's log lines, in order: kept in the database so that any replica can
    stream any job's log, whichever machine ran it."""

    __tablename__ = "job_logs"
    __table_args__ = (Index("ix_job_logs_job", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Run(Base):
    """An experiment-tracking run: params, step metrics, system info and artifacts of one
    training or optimisation step; ``experiment`` groups runs (a sweep's trials)."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_project_created", "project_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    experiment: Mapped[str] = mapped_column(String(200), default="")
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    params: Mapped[Any] = mapped_column(JSON)
    # Final values (held-out loss before/after, tokens/s, peak memory, size on disk).
    summary: Mapped[Any] = mapped_column(JSON)
    system: Mapped[Any] = mapped_column(JSON)
    git_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    packages: Mapped[Any] = mapped_column(JSON)
    # Lineage: "dataset@version" strings and model version ids this run read.
    inputs: Mapped[Any] = mapped_column(JSON)
    artifacts: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class RunMetric(Base):
    """One value of one metric at one step of a run (loss, learning rate, tokens/s…)."""

    __tablename__ = "run_metrics"
    __table_args__ = (Index("ix_run_metrics_run_key", "run_id", "key", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class RegisteredModel(Base):
    """A named model of a project in the registry; its weights live in versions."""

    __tablename__ = "registered_models"
    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_registered_models_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    license: Mapped[str] = mapped_column(String(200), default="")
    intended_use: Mapped[str] = mapped_column(Text, default="")
    limitations: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))


class ModelVersion(Base):
    """One immutable version of a registered model: base, adapter, merged, quantized or
    pruned weights at ``uri`` (an HF folder: safetensors, a PEFT adapter, or GGUF), with where
    it came from (parent version, run, job, dataset) for the lineage graph."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    uri: Mapped[str] = mapped_column(String(1000))
    format: Mapped[str] = mapped_column(String(32))
    # The version this one was made from (the base of an adapter, the merge of a quantization).
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # "dataset@version" strings it was trained on.
    datasets: Mapped[Any] = mapped_column(JSON)
    params: Mapped[Any] = mapped_column(JSON)
    metrics: Mapped[Any] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    # The person or key behind it (a user's keys and sessions are one identity): four-eyes
    # approvals compare this, never the display name.
    author_id: Mapped[str] = mapped_column(String(64))


class ModelAlias(Base):
    """An alias (``production``, ``staging``…) pointing at one version of a model."""

    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("model_id", "alias", name="uq_model_aliases"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("registered_models.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    updated_at: Mapped[float] = mapped_column(Float)
    updated_by: Mapped[str] = mapped_column(String(200))


class SharedState(Base):
    """Small values every replica must agree on (e.g. the UI session secret, revoked UI
    sessions); a row with ``expires_at`` in the past no longer counts."""

    __tablename__ = "shared_state"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)


class Experiment(Base):
    """A canary experiment on a route: variants (prompt versions and/or catalog models) with
    traffic shares, the unit that keeps a caller in one variant, the primary metric tested
    sequentially, the guardrails that roll back at once, and how it was decided."""

    __tablename__ = "experiments"
    __table_args__ = (Index("ix_experiments_project_status", "project_id", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    route: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(200))
    # running | promoting | awaiting_approval | promoted | rolled_back | stopped
    status: Mapped[str] = mapped_column(String(24))
    # [{name, prompt: "name@version" | null, model: catalog model | null, share}]
    variants: Mapped[Any] = mapped_column(JSON)
    control: Mapped[str] = mapped_column(String(64))
    # "user" | "session" | "header:<name>"
    unit: Mapped[str] = mapped_column(String(128))
    # {source: "feedback" | "judge:<name>", higher_is_better}
    primary_metric: Mapped[Any] = mapped_column(JSON)
    guardrails: Mapped[Any] = mapped_column(JSON)
    alpha: Mapped[float] = mapped_column(Float)
    tau: Mapped[float] = mapped_column(Float)
    min_samples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    decided_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # What the decision did: the winning variant, the approval request, the config revision.
    outcome: Mapped[Any] = mapped_column(JSON, nullable=True)
    # "canary": variants share the traffic; "shadow": the control serves every call and the
    # candidate answers a mirrored copy that is scored but never returned.
    mode: Mapped[str] = mapped_column(String(16), default="canary", server_default="canary")


class ExperimentLook(Base):
    """One look of an experiment's evaluator: each variant's running sums of the primary and
    guardrail metrics, the always-valid p-value and confidence sequence, and the decision."""

    __tablename__ = "experiment_looks"
    __table_args__ = (Index("ix_experiment_looks_experiment", "experiment_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    at: Mapped[float] = mapped_column(Float)
    # {variant: {"primary": ArmStats, "error": ArmStats, "latency_ms": ArmStats,
    #  "latency_p95": float | None, "cost": ArmStats}}
    arms: Mapped[Any] = mapped_column(JSON)
    p_value: Mapped[float] = mapped_column(Float)
    ci_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    # continue | win | loss | breach
    decision: Mapped[str] = mapped_column(String(16))


class Loop(Base):
    """One run of ``flywheel loop``: a route's bad answers, step by step, to a gated, approved
    canary of a better model. Each step runs as a job; ``steps`` keeps every step's job, its
    result and its state, so a loop resumes at the step that failed or was cut off."""

    __tablename__ = "loops"
    __table_args__ = (Index("ix_loops_project_status", "project_id", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    route: Mapped[str] = mapped_column(String(128))
    # running | waiting | failed | promoted | rolled_back | rejected | cancelled | stopped
    status: Mapped[str] = mapped_column(String(24))
    # The step the loop is at (collect, dataset, train, ...).
    step: Mapped[str] = mapped_column(String(32))
    spec: Mapped[Any] = mapped_column(JSON)
    # {step: {status, job_id, attempts, result, error, started_at, finished_at}}
    steps: Mapped[Any] = mapped_column(JSON)
    # Bumped by every change: replicas advancing one loop update it only when it is unchanged.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    # Whose identity the loop's jobs and versions carry (the four-eyes rule's author).
    author_id: Mapped[str] = mapped_column(String(200))
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
