"""A throwaway PostgreSQL server on loopback for the test suite (``pytest --db=postgres``).

It runs from the machine's own binaries (Debian's ``postgresql`` package: ``initdb`` and
``postgres`` under ``/usr/lib/postgresql/<version>/bin``), in a fresh data directory under
/tmp, on a free port, with trust authentication on 127.0.0.1 only. Every Flywheel server or
store a test builds gets a database of its own (``create_database``), so tests stay as
independent as they are with one SQLite file each. ``stop`` ends the server (the one process
this module started, by its id) and removes the data directory.

The pgvector tests (tests/test_rag_pgvector.py) need the ``vector`` extension, which Debian 12
does not package: they start their own server from the binaries of the ``pgserver`` wheel (a
dev dependency: PostgreSQL 16 with pgvector, see ``pgserver_bindir``).

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` system user the Debian package creates (or ``nobody`` without it).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from flywheel.testing.upstream import free_port

SUPERUSER = "flywheel"
# Throwaway data: durability settings off make a test database several times faster to
# create and write. Connections: each Flywheel process pools up to 15, and a test run keeps
# several servers (and their job processes) up at once.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "400",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
}


def postgres_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``: ``FLYWHEEL_PG_BINDIR``, the newest
    Debian ``/usr/lib/postgresql/<version>/bin``, or wherever ``initdb`` is on PATH."""
    configured = os.environ.get("FLYWHEEL_PG_BINDIR")
    if configured:
        return Path(configured)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError(
        "PostgreSQL is not installed: `make browser` installs it (apt-get install postgresql), "
        "or set FLYWHEEL_PG_BINDIR to a directory holding initdb and postgres."
    )


def pgserver_bindir() -> Path | None:
    """The PostgreSQL binaries shipped by the ``pgserver`` wheel (PostgreSQL 16 built with
    pgvector), or None when it is not installed. Only its files are used: its own server
    manager is not, so these servers start and stop like any other here."""
    # Found, not imported: importing pgserver sets up its own server manager.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))).resolve() / "pginstall" / "bin"
    return bindir if (bindir / "initdb").exists() and (bindir / "postgres").exists() else None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no 'postgres' or 'nobody' user")


@dataclass
class PostgresServer:
    """A running server; ``create_database`` hands out fresh, empty databases."""

    root: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    bindir: Path = field(default_factory=postgres_bindir)
    databases: list[str] = field(default_factory=list)
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def start(cls, timeout: float = 60, bindir: Path | None = None) -> PostgresServer:
        """initdb into a new directory under /tmp and start ``postgres`` on a free port, from
        ``bindir`` (default ``postgres_bindir()``)."""
        bindir = bindir or postgres_bindir()
        account = _run_as()
        # Not under pytest's tmp dir: that is private to root, and the server's user must
        # reach its data directory and socket.
        root = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        data, sockets, log_path = root / "data", root / "sockets", root / "server.log"
        sockets.mkdir()
        log_path.touch()
        user = group = None
        if account is not None:
            user, group = account.pw_uid, account.pw_gid
            for path in (root, sockets, log_path):
                os.chown(path, user, group)
        try:
            subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=user,
                group=group,
                extra_groups=[] if account is not None else None,
                cwd=root,
            )
            port = free_port()
            settings = [f"--{k}={v}" for k, v in SERVER_SETTINGS.items()]
            process = subprocess.Popen(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-k",
                    str(sockets),
                    *settings,
                ],
                stdout=log_path.open("ab"),
                stderr=subprocess.STDOUT,
                user=user,
                group=group,
                extra_groups=[] if account is not None else None,
                cwd=root,
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        server = cls(root, port, process, log_path, bindir)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(server.dsn("postgres"), connect_timeout=2):
                    return server
            except psycopg.OperationalError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise RuntimeError(
                        f"PostgreSQL did not start on port {port}:\n{server.log()}"
                    ) from None
                time.sleep(0.1)

    def dsn(self, database: str) -> str:
        """A libpq connection string for ``database``."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL Flywheel takes in ``FLYWHEEL_DATABASE_URL``."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def create_database(self, prefix: str = "fw", template: str | None = None) -> str:
        """A new database, empty or a copy of the database ``template`` (which must have no
        open connections); returns its SQLAlchemy URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"{copy}')
        self.databases.append(name)
        return self.url(name)

    def copy_database(self, url: str, prefix: str = "copy") -> str:
        """A consistent copy of the database at ``url`` (pg_dump into a new database), for
        a test that must tamper with a live server's data without disturbing it."""
        source = make_url(url).database
        assert source, url
        target_url = self.create_database(prefix)
        target = make_url(target_url).database
        bindir = self.bindir
        dump = subprocess.run(
            [str(bindir / "pg_dump"), "--no-owner", self.dsn(source)],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [str(bindir / "psql"), "-q", "-v", "ON_ERROR_STOP=1", self.dsn(str(target))],
            input=dump.stdout,
            check=True,
            capture_output=True,
        )
        return target_url

    def drop_database(self, url: str) -> None:
        """Drop a database made here, ending any connections still open to it."""
        name = make_url(url).database
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def database_files(self, url: str) -> list[Path]:
        """Every file that may hold the data of the database at ``url``, once a checkpoint
        has written it out: the database's directory and the server's write-ahead log."""
        name = make_url(url).database
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            row = connection.execute(
                "SELECT oid FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            assert row is not None, f"no database {name}"
            connection.execute("CHECKPOINT")
        data = self.root / "data"
        return [
            path
            for folder in (data / "base" / str(row[0]), data / "pg_wal")
            for path in folder.rglob("*")
            if path.is_file()
        ]

    def stop(self) -> None:
        """Stop the server (fast shutdown: SIGINT) and remove its data directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
