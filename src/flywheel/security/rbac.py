"""Who may do what: roles, key scopes, permissions and the principal making a request.

A request acts in one project. What it may do there is the intersection of two sets:
the permissions of its **role** in that project (viewer ⊂ reviewer/developer ⊂ admin) and,
for an API key, the permissions of the key's **scope** (gateway, feedback, read, admin).
Instance admins (the bootstrap key, users with ``is_admin``) may do everything in every
project, plus manage projects and users.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal


class Permission(StrEnum):
    """One thing a principal may do; the route policy maps every route to one of these."""

    PUBLIC = "public"  # no authentication (health, login page, static files)
    AUTHENTICATED = "authenticated"  # any valid principal (e.g. "who am I")
    GATEWAY_CALL = "gateway:call"
    TRACES_READ = "traces:read"
    TRACES_WRITE = "traces:write"
    FEEDBACK_WRITE = "feedback:write"
    CONFIG_READ = "config:read"
    COSTS_READ = "costs:read"
    PROMPTS_READ = "prompts:read"
    PROMPTS_WRITE = "prompts:write"
    CONFIG_WRITE = "config:write"
    APPROVALS_READ = "approvals:read"
    APPROVALS_REQUEST = "approvals:request"
    APPROVALS_DECIDE = "approvals:decide"
    KEYS_MANAGE = "keys:manage"
    MEMBERS_MANAGE = "members:manage"
    SECRETS_MANAGE = "secrets:manage"
    AUDIT_READ = "audit:read"
    PROJECTS_MANAGE = "projects:manage"
    USERS_MANAGE = "users:manage"
    DATASETS_READ = "datasets:read"
    DATASETS_WRITE = "datasets:write"
    EVALS_READ = "evals:read"
    EVALS_WRITE = "evals:write"
    MONITOR_READ = "monitor:read"
    MONITOR_WRITE = "monitor:write"
    KB_READ = "kb:read"
    KB_WRITE = "kb:write"
    PIPELINES_READ = "pipelines:read"
    PIPELINES_WRITE = "pipelines:write"
    JOBS_READ = "jobs:read"
    JOBS_WRITE = "jobs:write"
    MODELS_READ = "models:read"
    MODELS_WRITE = "models:write"


Role = Literal["viewer", "reviewer", "developer", "admin"]
Scope = Literal["gateway", "feedback", "read", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "reviewer", "developer", "admin")
SCOPES: tuple[Scope, ...] = ("gateway", "feedback", "read", "admin")

P = Permission
READ = frozenset(
    {
        P.AUTHENTICATED,
        P.TRACES_READ,
        P.CONFIG_READ,
        P.COSTS_READ,
        P.PROMPTS_READ,
        P.APPROVALS_READ,
        P.DATASETS_READ,
        P.EVALS_READ,
        P.MONITOR_READ,
        P.KB_READ,
        P.PIPELINES_READ,
        P.JOBS_READ,
        P.MODELS_READ,
    }
)
ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "viewer": READ,
    # Reviewers label traces and turn them into dataset versions.
    "reviewer": READ | {P.APPROVALS_DECIDE, P.FEEDBACK_WRITE, P.DATASETS_WRITE},
    "developer": READ
    | {
        P.GATEWAY_CALL,
        P.TRACES_WRITE,
        P.FEEDBACK_WRITE,
        P.PROMPTS_WRITE,
        P.APPROVALS_REQUEST,
        P.DATASETS_WRITE,
        P.EVALS_WRITE,
        P.MONITOR_WRITE,
        P.KB_WRITE,
        P.PIPELINES_WRITE,
        P.JOBS_WRITE,
        P.MODELS_WRITE,
    },
    "admin": READ
    | {
        P.GATEWAY_CALL,
        P.TRACES_WRITE,
        P.FEEDBACK_WRITE,
        P.PROMPTS_WRITE,
        P.APPROVALS_REQUEST,
        P.APPROVALS_DECIDE,
        P.DATASETS_WRITE,
        P.EVALS_WRITE,
        P.MONITOR_WRITE,
        P.KB_WRITE,
        P.PIPELINES_WRITE,
        P.JOBS_WRITE,
        P.MODELS_WRITE,
        P.KEYS_MANAGE,
        P.MEMBERS_MANAGE,
        P.SECRETS_MANAGE,
        P.AUDIT_READ,
    },
}
# The catalog and routes serve every project, so changing them is for instance admins.
INSTANCE_ONLY = frozenset({P.PROJECTS_MANAGE, P.USERS_MANAGE, P.CONFIG_WRITE})
ALL_PERMISSIONS = frozenset(Permission) - {P.PUBLIC}
SCOPE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    # What an application needs: the gateway, its prompts, knowledge-base search, and its
    # own spans from the SDK.
    "gateway": frozenset(
        {P.AUTHENTICATED, P.GATEWAY_CALL, P.PROMPTS_READ, P.TRACES_WRITE, P.KB_READ}
    ),
    "feedback": frozenset({P.AUTHENTICATED, P.FEEDBACK_WRITE}),
    "read": READ,
    "admin": ALL_PERMISSIONS,
}
ROLE_RANK: dict[str, int] = {role: rank for rank, role in enumerate(ROLES)}


def permissions_for(role: str | None, scope: str | None = None) -> frozenset[Permission]:
    """What ``role`` may do in a project, narrowed by a key's ``scope`` (None: a user)."""
    granted = ROLE_PERMISSIONS.get(role or "", frozenset())
    if scope is not None:
        granted &= SCOPE_PERMISSIONS.get(scope, frozenset())
    return granted


def role_covers(granter: str, granted: str) -> bool:
    """Whether someone holding ``granter`` may hand out ``granted`` (never more than own)."""
    return ROLE_RANK.get(granter, -1) >= ROLE_RANK.get(granted, 99)


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do in the project the request acts in."""

    kind: Literal["key", "user"]
    id: str
    name: str
    project_id: str
    role: str | None
    permissions: frozenset[Permission]
    instance_admin: bool = False
    scope: str | None = None
    key_id: str | None = None
    user_id: str | None = None
    allowed_models: tuple[str, ...] | None = None
    limits: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    @property
    def actor(self) -> str:
        """How the audit log names this principal."""
        return f"{self.kind}:{self.name}"

    @property
    def identity(self) -> str:
        """The person or key behind the call, for four-eyes checks: a user's keys and their
        UI sessions are the same identity."""
        return f"user:{self.user_id}" if self.user_id else f"key:{self.key_id or self.id}"

    def can(self, permission: Permission) -> bool:
        if permission is Permission.PUBLIC:
            return True
        return self.instance_admin or permission in self.permissions

    def may_call(self, model: str) -> bool:
        """Whether the key's allow-list (if any) includes the route or model ``model``."""
        return self.allowed_models is None or model in self.allowed_models
