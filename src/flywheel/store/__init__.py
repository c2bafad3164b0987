"""Core persistence: SQLAlchemy models, engine set-up and Alembic migrations."""

from flywheel.store.db import Database
from flywheel.store.models import (
    DEFAULT_PROJECT_ID,
    ApiKey,
    ApprovalRequest,
    AuditEvent,
    Base,
    Project,
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
    "Database",
    "Project",
    "RoleBinding",
    "SpanRecord",
    "StoredSecret",
    "User",
]
