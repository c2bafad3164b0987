"""Core persistence: SQLAlchemy models, engine set-up and Alembic migrations."""

from flywheel.store.db import Database
from flywheel.store.models import ApiKey, Base, SpanRecord

__all__ = ["ApiKey", "Base", "Database", "SpanRecord"]
