"""The access policy: the one permission each route of the app needs.

Enforcement reads this table (``flywheel.server.http.authorize`` for the API, the UI's
session dependency for pages), so a route missing here is refused to everyone, and
``tests/test_rbac.py`` fails until it is added. Keys are ``(method, path template)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flywheel.security.rbac import Permission

P = Permission

POLICY: dict[tuple[str, str], Permission] = {
    # Ops, docs and static assets.
    ("GET", "/healthz"): P.PUBLIC,
    ("GET", "/readyz"): P.PUBLIC,
    ("GET", "/openapi.json"): P.PUBLIC,
    ("GET", "/docs"): P.PUBLIC,
    ("GET", "/docs/oauth2-redirect"): P.PUBLIC,
    ("GET", "/redoc"): P.PUBLIC,
    ("GET", "/static"): P.PUBLIC,
    # Prometheus: the handler asks for a key with monitor:read itself, unless the operator
    # made it public (FLYWHEEL_METRICS_PUBLIC), so the router-level policy is PUBLIC.
    ("GET", "/metrics"): P.PUBLIC,
    # OpenAI-compatible gateway.
    ("POST", "/v1/chat/completions"): P.GATEWAY_CALL,
    ("POST", "/v1/embeddings"): P.GATEWAY_CALL,
    ("GET", "/v1/models"): P.GATEWAY_CALL,
    ("GET", "/v1/models/{model_id:path}"): P.GATEWAY_CALL,
    # OTLP/HTTP trace ingest: an app's key (scope gateway) may report its spans.
    ("POST", "/v1/traces"): P.TRACES_WRITE,
    # Flywheel API: observe.
    ("GET", "/api/traces"): P.TRACES_READ,
    ("GET", "/api/traces/{trace_id}"): P.TRACES_READ,
    ("POST", "/api/spans"): P.TRACES_WRITE,
    ("GET", "/api/stats"): P.TRACES_READ,
    ("GET", "/api/costs"): P.COSTS_READ,
    ("GET", "/api/routes"): P.CONFIG_READ,
    # A route's response cache in the caller's project (purging all projects: instance
    # admins, checked by the handler).
    ("GET", "/api/routes/{route}/cache"): P.CONFIG_READ,
    ("DELETE", "/api/routes/{route}/cache"): P.MONITOR_WRITE,
    ("GET", "/api/models"): P.CONFIG_READ,
    # Flywheel API: prompts and approvals.
    ("GET", "/api/prompts"): P.PROMPTS_READ,
    ("POST", "/api/prompts"): P.PROMPTS_WRITE,
    ("GET", "/api/prompts/{name}"): P.PROMPTS_READ,
    ("GET", "/api/prompts/{name}/versions"): P.PROMPTS_READ,
    ("GET", "/api/prompts/{name}/diff"): P.PROMPTS_READ,
    ("POST", "/api/prompts/{name}/render"): P.PROMPTS_READ,
    ("GET", "/api/prompts/{name}/labels"): P.PROMPTS_READ,
    ("PUT", "/api/prompts/{name}/labels/{label}"): P.PROMPTS_WRITE,
    ("DELETE", "/api/prompts/{name}/labels/{label}"): P.PROMPTS_WRITE,
    ("GET", "/api/approvals"): P.APPROVALS_READ,
    ("POST", "/api/approvals"): P.APPROVALS_REQUEST,
    ("GET", "/api/approvals/{approval_id}"): P.APPROVALS_READ,
    ("POST", "/api/approvals/{approval_id}/approve"): P.APPROVALS_DECIDE,
    ("POST", "/api/approvals/{approval_id}/reject"): P.APPROVALS_DECIDE,
    ("POST", "/api/approvals/{approval_id}/cancel"): P.APPROVALS_REQUEST,
    # Flywheel API: datasets, feedback and the annotation queue.
    ("GET", "/api/datasets"): P.DATASETS_READ,
    ("POST", "/api/datasets"): P.DATASETS_WRITE,
    ("POST", "/api/datasets/{name}/import"): P.DATASETS_WRITE,
    ("POST", "/api/datasets/{name}/from-traces"): P.DATASETS_WRITE,
    ("GET", "/api/datasets/{name}"): P.DATASETS_READ,
    ("GET", "/api/datasets/{name}/items"): P.DATASETS_READ,
    ("GET", "/api/datasets/{name}/export"): P.DATASETS_READ,
    ("GET", "/api/datasets/{name}/profile"): P.DATASETS_READ,
    ("POST", "/api/traces/{trace_id}/feedback"): P.FEEDBACK_WRITE,
    ("GET", "/api/traces/{trace_id}/feedback"): P.TRACES_READ,
    ("GET", "/api/feedback"): P.TRACES_READ,
    ("GET", "/api/feedback/export"): P.TRACES_READ,
    ("GET", "/api/annotation/queues"): P.TRACES_READ,
    ("POST", "/api/annotation/queues/{queue}/tasks"): P.FEEDBACK_WRITE,
    ("POST", "/api/annotation/queues/{queue}/next"): P.FEEDBACK_WRITE,
    ("POST", "/api/annotation/tasks/{task_id}/complete"): P.FEEDBACK_WRITE,
    ("POST", "/api/annotation/tasks/{task_id}/skip"): P.FEEDBACK_WRITE,
    # Flywheel API: evaluation.
    ("GET", "/api/evals/scorers"): P.EVALS_READ,
    ("GET", "/api/evals/suites"): P.EVALS_READ,
    ("GET", "/api/evals/suites/{name}"): P.EVALS_READ,
    ("PUT", "/api/evals/suites/{name}"): P.EVALS_WRITE,
    ("DELETE", "/api/evals/suites/{name}"): P.EVALS_WRITE,
    ("POST", "/api/evals/runs"): P.EVALS_WRITE,
    ("GET", "/api/evals/runs"): P.EVALS_READ,
    ("GET", "/api/evals/runs/{run_id}"): P.EVALS_READ,
    ("GET", "/api/evals/runs/{run_id}/results"): P.EVALS_READ,
    ("POST", "/api/evals/runs/{run_id}/cancel"): P.EVALS_WRITE,
    ("GET", "/api/evals/compare"): P.EVALS_READ,
    # Flywheel API: monitoring, guards and alerts.
    ("GET", "/api/monitor/routes"): P.MONITOR_READ,
    ("GET", "/api/monitor/series"): P.MONITOR_READ,
    ("GET", "/api/monitor/drift"): P.MONITOR_READ,
    ("POST", "/api/monitor/drift/run"): P.MONITOR_WRITE,
    ("POST", "/api/guards/check"): P.MONITOR_READ,
    ("GET", "/api/alerts/rules"): P.MONITOR_READ,
    ("GET", "/api/alerts/rules/{name}"): P.MONITOR_READ,
    ("PUT", "/api/alerts/rules/{name}"): P.MONITOR_WRITE,
    ("DELETE", "/api/alerts/rules/{name}"): P.MONITOR_WRITE,
    ("GET", "/api/alerts/events"): P.MONITOR_READ,
    ("POST", "/api/alerts/check"): P.MONITOR_WRITE,
    ("POST", "/api/retention/purge"): P.PROJECTS_MANAGE,
    # Flywheel API: knowledge bases and pipelines.
    ("GET", "/api/kbs"): P.KB_READ,
    ("POST", "/api/kbs"): P.KB_WRITE,
    ("GET", "/api/kbs/{name}"): P.KB_READ,
    ("PATCH", "/api/kbs/{name}"): P.KB_WRITE,
    ("DELETE", "/api/kbs/{name}"): P.KB_WRITE,
    ("POST", "/api/kbs/{name}/documents"): P.KB_WRITE,
    ("POST", "/api/kbs/{name}/urls"): P.KB_WRITE,
    ("GET", "/api/kbs/{name}/documents"): P.KB_READ,
    ("GET", "/api/kbs/{name}/documents/{document_id}"): P.KB_READ,
    ("DELETE", "/api/kbs/{name}/documents/{document_id}"): P.KB_WRITE,
    ("POST", "/api/kbs/{name}/search"): P.KB_READ,
    ("GET", "/api/kbs/{name}/versions"): P.KB_READ,
    ("POST", "/api/kbs/{name}/reindex"): P.KB_WRITE,
    ("POST", "/api/kbs/{name}/eval"): P.KB_READ,
    ("GET", "/api/pipelines"): P.PIPELINES_READ,
    ("POST", "/api/pipelines/validate"): P.PIPELINES_READ,
    ("GET", "/api/pipelines/{name}"): P.PIPELINES_READ,
    ("PUT", "/api/pipelines/{name}"): P.PIPELINES_WRITE,
    ("DELETE", "/api/pipelines/{name}"): P.PIPELINES_WRITE,
    ("POST", "/api/pipelines/{name}/run"): P.GATEWAY_CALL,
    # Flywheel API: canary experiments on routes (a win may apply a config revision).
    ("GET", "/api/experiments"): P.CONFIG_READ,
    ("POST", "/api/experiments"): P.CONFIG_WRITE,
    ("GET", "/api/experiments/{experiment_id}"): P.CONFIG_READ,
    ("POST", "/api/experiments/{experiment_id}/stop"): P.CONFIG_WRITE,
    # Flywheel API: `flywheel loop` (each step is a job; the loop applies config and starts
    # experiments, so starting and steering it needs what experiments need).
    ("GET", "/api/loops"): P.JOBS_READ,
    ("POST", "/api/loops"): P.CONFIG_WRITE,
    ("GET", "/api/loops/{loop_id}"): P.JOBS_READ,
    ("POST", "/api/loops/{loop_id}/resume"): P.CONFIG_WRITE,
    ("POST", "/api/loops/{loop_id}/cancel"): P.CONFIG_WRITE,
    # Flywheel API: jobs and experiment tracking.
    ("GET", "/api/jobs/kinds"): P.JOBS_READ,
    ("GET", "/api/jobs"): P.JOBS_READ,
    ("POST", "/api/jobs"): P.JOBS_WRITE,
    ("GET", "/api/jobs/{job_id}"): P.JOBS_READ,
    ("GET", "/api/jobs/{job_id}/logs"): P.JOBS_READ,
    ("POST", "/api/jobs/{job_id}/cancel"): P.JOBS_WRITE,
    ("POST", "/api/jobs/{job_id}/retry"): P.JOBS_WRITE,
    ("GET", "/api/runs"): P.JOBS_READ,
    ("GET", "/api/runs/compare"): P.JOBS_READ,
    ("GET", "/api/runs/{run_id}"): P.JOBS_READ,
    ("DELETE", "/api/runs/{run_id}"): P.JOBS_WRITE,
    ("POST", "/api/runs/{run_id}/mlflow"): P.JOBS_WRITE,
    # Flywheel API: the model registry.
    ("GET", "/api/registry"): P.MODELS_READ,
    ("POST", "/api/registry"): P.MODELS_WRITE,
    ("GET", "/api/registry/{name}"): P.MODELS_READ,
    ("PATCH", "/api/registry/{name}"): P.MODELS_WRITE,
    ("DELETE", "/api/registry/{name}"): P.MODELS_WRITE,
    ("POST", "/api/registry/{name}/versions"): P.MODELS_WRITE,
    ("GET", "/api/registry/{name}/versions/{version}"): P.MODELS_READ,
    ("GET", "/api/registry/{name}/versions/{version}/card"): P.MODELS_READ,
    ("GET", "/api/registry/{name}/versions/{version}/lineage"): P.MODELS_READ,
    ("PUT", "/api/registry/{name}/aliases/{alias}"): P.MODELS_WRITE,
    ("DELETE", "/api/registry/{name}/aliases/{alias}"): P.MODELS_WRITE,
    ("GET", "/api/registry/{name}/aliases"): P.MODELS_READ,
    ("POST", "/api/registry/{name}/versions/{version}/serve"): P.CONFIG_WRITE,
    # Flywheel API: config as code (catalog and route changes also need config:write).
    ("GET", "/api/config/export"): P.CONFIG_READ,
    ("POST", "/api/config/plan"): P.CONFIG_READ,
    ("POST", "/api/config/apply"): P.PROMPTS_WRITE,
    # Flywheel API: access and governance.
    ("GET", "/api/me"): P.AUTHENTICATED,
    ("GET", "/api/projects"): P.AUTHENTICATED,
    ("POST", "/api/projects"): P.PROJECTS_MANAGE,
    ("GET", "/api/projects/{project_id}"): P.AUTHENTICATED,
    ("PATCH", "/api/projects/{project_id}"): P.PROJECTS_MANAGE,
    ("GET", "/api/users"): P.USERS_MANAGE,
    ("POST", "/api/users"): P.USERS_MANAGE,
    ("PATCH", "/api/users/{user_id}"): P.USERS_MANAGE,
    ("GET", "/api/members"): P.MEMBERS_MANAGE,
    ("PUT", "/api/members/{user_id}"): P.MEMBERS_MANAGE,
    ("DELETE", "/api/members/{user_id}"): P.MEMBERS_MANAGE,
    ("GET", "/api/keys"): P.KEYS_MANAGE,
    ("POST", "/api/keys"): P.KEYS_MANAGE,
    ("DELETE", "/api/keys/{key_id}"): P.KEYS_MANAGE,
    ("GET", "/api/secrets"): P.SECRETS_MANAGE,
    ("PUT", "/api/secrets/{name}"): P.SECRETS_MANAGE,
    ("DELETE", "/api/secrets/{name}"): P.SECRETS_MANAGE,
    ("GET", "/api/audit"): P.AUDIT_READ,
    ("GET", "/api/audit/export"): P.AUDIT_READ,
    ("GET", "/api/audit/verify"): P.AUDIT_READ,
    # Web UI.
    ("GET", "/login"): P.PUBLIC,
    ("POST", "/login"): P.PUBLIC,
    ("POST", "/logout"): P.PUBLIC,
    ("POST", "/project"): P.AUTHENTICATED,
    ("GET", "/"): P.TRACES_READ,
    ("GET", "/traces"): P.TRACES_READ,
    ("GET", "/traces/{trace_id}"): P.TRACES_READ,
    ("GET", "/routes"): P.CONFIG_READ,
    ("POST", "/routes/{route}/cache/purge"): P.MONITOR_WRITE,
    ("GET", "/costs"): P.COSTS_READ,
    ("GET", "/access"): P.MEMBERS_MANAGE,
    ("POST", "/access/members"): P.MEMBERS_MANAGE,
    ("POST", "/access/keys"): P.KEYS_MANAGE,
    ("POST", "/access/keys/{key_id}/revoke"): P.KEYS_MANAGE,
    ("GET", "/audit"): P.AUDIT_READ,
    # Web UI: prompts and the playground.
    ("GET", "/prompts"): P.PROMPTS_READ,
    ("POST", "/prompts"): P.PROMPTS_WRITE,
    ("GET", "/prompts/{name}"): P.PROMPTS_READ,
    ("POST", "/prompts/{name}/labels"): P.PROMPTS_WRITE,
    ("POST", "/prompts/{name}/optimize"): P.PROMPTS_WRITE,
    ("GET", "/playground"): P.PROMPTS_READ,
    ("POST", "/playground/run"): P.GATEWAY_CALL,
    ("POST", "/playground/save"): P.PROMPTS_WRITE,
    ("GET", "/approvals"): P.APPROVALS_READ,
    ("POST", "/approvals/{approval_id}/approve"): P.APPROVALS_DECIDE,
    ("POST", "/approvals/{approval_id}/reject"): P.APPROVALS_DECIDE,
    # Web UI: datasets, evals and annotation.
    ("GET", "/datasets"): P.DATASETS_READ,
    ("POST", "/datasets/import"): P.DATASETS_WRITE,
    ("POST", "/datasets/from-traces"): P.DATASETS_WRITE,
    ("GET", "/datasets/{name}"): P.DATASETS_READ,
    ("GET", "/datasets/{name}/export"): P.DATASETS_READ,
    ("GET", "/evals"): P.EVALS_READ,
    ("POST", "/evals/suites"): P.EVALS_WRITE,
    ("POST", "/evals/suites/{name}/delete"): P.EVALS_WRITE,
    ("POST", "/evals/runs"): P.EVALS_WRITE,
    ("GET", "/evals/runs/{run_id}"): P.EVALS_READ,
    ("POST", "/evals/runs/{run_id}/cancel"): P.EVALS_WRITE,
    ("GET", "/evals/compare"): P.EVALS_READ,
    ("GET", "/annotate"): P.TRACES_READ,
    ("POST", "/annotate/enqueue"): P.FEEDBACK_WRITE,
    ("GET", "/annotate/export"): P.TRACES_READ,
    ("GET", "/annotate/{queue}"): P.FEEDBACK_WRITE,
    ("POST", "/annotate/{queue}/tasks/{task_id}/complete"): P.FEEDBACK_WRITE,
    ("POST", "/annotate/{queue}/tasks/{task_id}/skip"): P.FEEDBACK_WRITE,
    # Web UI: knowledge bases and pipelines.
    ("GET", "/kbs"): P.KB_READ,
    ("POST", "/kbs"): P.KB_WRITE,
    ("GET", "/kbs/{name}"): P.KB_READ,
    ("POST", "/kbs/{name}/delete"): P.KB_WRITE,
    ("POST", "/kbs/{name}/documents"): P.KB_WRITE,
    ("POST", "/kbs/{name}/urls"): P.KB_WRITE,
    ("GET", "/kbs/{name}/documents/{document_id}"): P.KB_READ,
    ("POST", "/kbs/{name}/documents/{document_id}/delete"): P.KB_WRITE,
    # The retrieval test box records nothing (as POST /api/kbs/{name}/search): readers may.
    ("POST", "/kbs/{name}/search"): P.KB_READ,
    ("GET", "/pipelines"): P.PIPELINES_READ,
    ("POST", "/pipelines"): P.PIPELINES_WRITE,
    ("GET", "/pipelines/{name}"): P.PIPELINES_READ,
    ("POST", "/pipelines/{name}/run"): P.GATEWAY_CALL,
    ("POST", "/pipelines/{name}/delete"): P.PIPELINES_WRITE,
    # Web UI: monitoring and alerts.
    ("GET", "/monitor"): P.MONITOR_READ,
    ("GET", "/monitor/{route}"): P.MONITOR_READ,
    ("POST", "/monitor/{route}/drift"): P.MONITOR_WRITE,
    # Trying a route's guards records nothing (as POST /api/guards/check): readers may.
    ("POST", "/monitor/{route}/guards"): P.MONITOR_READ,
    ("GET", "/alerts"): P.MONITOR_READ,
    ("POST", "/alerts/rules"): P.MONITOR_WRITE,
    ("POST", "/alerts/rules/{name}/delete"): P.MONITOR_WRITE,
    ("POST", "/alerts/check"): P.MONITOR_WRITE,
    # Web UI: canary experiments.
    ("GET", "/experiments"): P.CONFIG_READ,
    ("GET", "/experiments/{experiment_id}"): P.CONFIG_READ,
    # Web UI: `flywheel loop` timelines.
    ("GET", "/loops"): P.JOBS_READ,
    ("POST", "/loops"): P.CONFIG_WRITE,
    ("GET", "/loops/{loop_id}"): P.JOBS_READ,
    ("POST", "/loops/{loop_id}/resume"): P.CONFIG_WRITE,
    ("POST", "/loops/{loop_id}/cancel"): P.CONFIG_WRITE,
    # Web UI: jobs, experiment tracking and the model registry.
    ("GET", "/jobs"): P.JOBS_READ,
    ("POST", "/jobs"): P.JOBS_WRITE,
    ("GET", "/jobs/{job_id}"): P.JOBS_READ,
    ("GET", "/jobs/{job_id}/log"): P.JOBS_READ,
    ("POST", "/jobs/{job_id}/cancel"): P.JOBS_WRITE,
    ("POST", "/runs/{run_id}/mlflow"): P.JOBS_WRITE,
    ("POST", "/jobs/{job_id}/retry"): P.JOBS_WRITE,
    ("GET", "/runs"): P.JOBS_READ,
    ("GET", "/runs/compare"): P.JOBS_READ,
    ("GET", "/runs/{run_id}"): P.JOBS_READ,
    ("GET", "/registry"): P.MODELS_READ,
    ("GET", "/registry/{name}"): P.MODELS_READ,
    ("POST", "/registry/{name}/aliases"): P.MODELS_WRITE,
    ("POST", "/registry/{name}/aliases/{alias}/delete"): P.MODELS_WRITE,
    ("GET", "/registry/{name}/versions/{version}"): P.MODELS_READ,
    # Merge, quantize and prune are jobs (which register what they make as their author).
    ("POST", "/registry/{name}/versions/{version}/jobs"): P.JOBS_WRITE,
    # Serving changes the instance's catalog and routes.
    ("POST", "/registry/{name}/versions/{version}/serve"): P.CONFIG_WRITE,
    # Web UI: administration.
    ("GET", "/admin/projects"): P.PROJECTS_MANAGE,
    ("POST", "/admin/projects"): P.PROJECTS_MANAGE,
    ("POST", "/admin/projects/{project_id}"): P.PROJECTS_MANAGE,
    ("GET", "/admin/users"): P.USERS_MANAGE,
    ("POST", "/admin/users"): P.USERS_MANAGE,
    ("POST", "/admin/users/{user_id}/password"): P.USERS_MANAGE,
    ("POST", "/admin/users/{user_id}/disabled"): P.USERS_MANAGE,
    ("GET", "/secrets"): P.SECRETS_MANAGE,
    ("POST", "/secrets"): P.SECRETS_MANAGE,
    ("POST", "/secrets/delete"): P.SECRETS_MANAGE,
    ("GET", "/account"): P.AUTHENTICATED,
    ("POST", "/account/password"): P.AUTHENTICATED,
}


# POSTs that compute without changing anything (their inputs do not fit a query string), so
# read-only callers may use them.
READ_ONLY_POSTS = frozenset(
    {
        ("POST", "/api/prompts/{name}/render"),
        ("POST", "/api/config/plan"),
        ("POST", "/api/guards/check"),
        ("POST", "/api/kbs/{name}/search"),
        ("POST", "/api/kbs/{name}/eval"),
        ("POST", "/api/pipelines/validate"),
        ("POST", "/kbs/{name}/search"),
    }
)


def required_permission(method: str, path: str) -> Permission | None:
    """The permission a route needs; None when the route has no policy (refuse it)."""
    return POLICY.get(("GET" if method == "HEAD" else method, path))


def iter_routes(app: Any) -> Iterator[tuple[str, str]]:
    """Every ``(method, path template)`` the app serves, including included routers and
    mounts (a mount is listed as GET of its prefix)."""
    for route in app.routes:
        contexts = (
            route.effective_route_contexts()
            if hasattr(route, "effective_route_contexts")
            else [route]
        )
        for context in contexts:
            methods = getattr(context, "methods", None)
            path = getattr(context, "path", None)
            if path is None:
                continue
            if methods is None:  # a Mount (static files)
                yield "GET", path
                continue
            for method in sorted(methods - {"HEAD"}):
                yield method, path
