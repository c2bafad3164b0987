"""The migrations build exactly the schema the models declare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from flywheel.store import Database
from flywheel.store.models import Base
from tests.conftest import home_database_url


def test_the_migrated_schema_matches_the_models(database_url: str) -> None:
    """A model change without its migration (or the reverse) shows up here as a diff."""
    db = Database(database_url)
    db.migrate()
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    db.dispose()
    assert diff == []


def test_replicas_starting_together_migrate_an_empty_database_once(tmp_path: Path) -> None:
    """Three processes migrating the same empty database at once (replicas started together)
    all succeed; on PostgreSQL they used to race on CREATE TABLE."""
    url = home_database_url(tmp_path)
    code = "import sys; from flywheel.store import Database; Database(sys.argv[1]).migrate()"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for process in processes:
        _, errors = process.communicate(timeout=120)
        assert process.returncode == 0, errors[-2000:]
    db = Database(url)
    with db.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    db.dispose()
