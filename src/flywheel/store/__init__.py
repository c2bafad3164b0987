"""Core persistence: SQLAlchemy models, engine set-up and Alembic migrations."""

from flywheel.store.db import Database
from flywheel.store.models import (
    DEFAULT_PROJECT_ID,
    ApiKey,
    ApprovalRequest,
    AuditEvent,
    Base,
    ConfigRevision,
    LabelEvent,
    Project,
    Prompt,
    PromptLabel,
    PromptVersion,
    RoleBinding,
    SpanRecord,
    StoredSecret,
    User,
)

__all__ = [
    "DEFAULT_PROJECT_ID",
    "ApiKey",
    "ApprovalRequest",
    "AuditEvent",
    "Base",
    "ConfigRevision",
    "Database",
    "LabelEvent",
    "Project",
    "Prompt",
    "PromptLabel",
    "PromptVersion",
    "RoleBinding",
    "SpanRecord",
    "StoredSecret",
    "User",
]
