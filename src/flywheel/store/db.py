"""The database: engine set-up (SQLite in WAL mode by default) and migrations at start."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config as AlembicConfig
from filelock import FileLock
from sqlalchemy import CursorResult, Engine, create_engine, event, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (UI, API) run while the trace writer commits; NORMAL is durable in WAL
    # except for the last transactions on power loss, not on process crash.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """One engine and session factory per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision. Processes migrating the same
        database at once (replicas started together) take turns instead of racing on
        CREATE TABLE."""
        script_location = resources.files("flywheel").joinpath("store/migrations")
        config = AlembicConfig()
        config.set_main_option("script_location", str(script_location))
        with self._migration_lock(), self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Held until the transaction ends.
                connection.execute(text("SELECT pg_advisory_xact_lock(7212026)"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def _migration_lock(self) -> AbstractContextManager[object]:
        """A lock file beside a SQLite database (SQLite is single-host); nothing elsewhere."""
        path = make_url(self.url).database
        if self.engine.dialect.name != "sqlite" or not path or path == ":memory:":
            return nullcontext()
        return FileLock(f"{path}.migrate.lock", timeout=300)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def lock_row(session: Session, column: Any, value: Any) -> None:
    """Hold the rows where ``column == value`` locked until the transaction ends, so writers
    that read and then write under them (e.g. "the next version number") queue instead of
    racing, and racers that all read the same number do not fail in lockstep until their
    retries run out.

    A no-op UPDATE (``column = column``) locks on both backends: PostgreSQL takes the
    rows' locks, and SQLite, which has no row locks, takes its database write lock (a
    SELECT ... FOR UPDATE would lock nothing there)."""
    table = column.class_
    session.execute(
        update(table)
        .where(column == value)
        .values({column.key: column})
        .execution_options(synchronize_session=False)
    )


def changed_rows(result: Any) -> int:
    """How many rows an UPDATE or DELETE changed (a guarded update's "did I win")."""
    return int(cast(CursorResult[Any], result).rowcount)
