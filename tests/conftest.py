"""Shared fixtures: a fake upstream on loopback and one real Flywheel server per test run.

The server is a real subprocess (``flywheel up``) with the real local model, started once;
its model conversion is cached in ``.cache/models`` so later runs load in about a second.

``pytest --db=postgres`` (or ``FLYWHEEL_TEST_DB=postgres``) runs the same tests on a real
PostgreSQL server started on loopback for the session (tests/pg.py): every server home, and
every store a test builds through ``database_url``/``new_database_url``, gets a database of
its own there instead of a SQLite file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy.engine import make_url

from flywheel.store import Database
from flywheel.testing import FakeUpstream
from flywheel.testing.upstream import free_port
from tests.pg import PostgresServer

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", REPO / ".cache" / "models"))

TEST_CONFIG = """
providers:
  local: {{type: local}}
  up: {{type: openai, base_url: "{upstream}", api_key: upstream-secret-key}}
models:
  - {{name: smollm2-135m-instruct, provider: local, source: "builtin:smollm2", context_length: 8192}}
  - {{name: all-minilm-l6-v2, provider: local, kind: embedding, source: "builtin:minilm"}}
  - name: up-echo
    provider: up
    upstream_name: echo
    pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
  - {{name: up-echo-b, provider: up, upstream_name: echo}}
  - {{name: up-500, provider: up, upstream_name: fail-500}}
  - {{name: up-429, provider: up, upstream_name: rate-limit}}
  - {{name: up-hang, provider: up, upstream_name: hang}}
  - {{name: up-cut, provider: up, upstream_name: cut-stream}}
  - {{name: up-garbage, provider: up, upstream_name: garbage}}
  - {{name: up-flaky, provider: up, upstream_name: flaky-2}}
  - {{name: up-embed, provider: up, kind: embedding, upstream_name: echo}}
  - {{name: up-rerank, provider: up, upstream_name: rank-reverse}}
  - {{name: up-blocked, provider: up, upstream_name: echo, status: blocked}}
  - {{name: up-experimental, provider: up, upstream_name: echo, status: experimental}}
  - name: up-pricey
    provider: up
    upstream_name: echo
    pricing: {{input_per_mtok: 10000.0, output_per_mtok: 10000.0}}
  - name: up-cut-pricey
    provider: up
    upstream_name: cut-stream
    pricing: {{input_per_mtok: 10000.0, output_per_mtok: 10000.0}}
routes:
  - name: default
    targets: [{{model: smollm2-135m-instruct}}]
  - name: echo
    targets: [{{model: up-echo}}]
  - name: fallback-500
    targets: [{{model: up-500}}]
    fallbacks: [up-echo]
    retry: {{attempts: 1, backoff_initial: 0.01}}
  - name: only-500
    targets: [{{model: up-500}}]
    retry: {{attempts: 2, backoff_initial: 0.01}}
  - name: retry-429
    targets: [{{model: up-429}}]
    retry: {{attempts: 1}}
  - name: fallback-429
    targets: [{{model: up-429}}]
    fallbacks: [up-echo]
    retry: {{attempts: 0}}
  - name: timeout
    targets: [{{model: up-hang, timeout: 1}}]
    fallbacks: [up-echo]
    retry: {{attempts: 0}}
  - name: only-timeout
    targets: [{{model: up-hang, timeout: 1}}]
    retry: {{attempts: 0}}
  - name: cut
    targets: [{{model: up-cut}}]
    fallbacks: [up-echo]
  - name: garbage
    targets: [{{model: up-garbage}}]
    fallbacks: [up-echo]
    retry: {{attempts: 0}}
  - name: flaky
    targets: [{{model: up-flaky}}]
    retry: {{attempts: 2, backoff_initial: 0.01}}
  - name: balanced
    targets: [{{model: up-echo, weight: 3}}, {{model: up-echo-b, weight: 1}}]
  - name: pricey
    targets: [{{model: up-pricey}}]
  - name: cut-pricey
    targets: [{{model: up-cut-pricey}}]
    retry: {{attempts: 0}}
  - name: production-echo
    production: true
    targets: [{{model: up-echo}}]
  - name: greeter-route
    targets: [{{prompt: "greeter@staging"}}]
  - name: guarded
    targets: [{{model: up-echo}}]
    guards:
      input:
        - {{type: injection, action: block}}
        - {{type: banned_terms, name: codenames, action: block, terms: [project nightingale]}}
        - {{type: pii, action: redact, entities: [EMAIL, CREDIT_CARD]}}
      output:
        - {{type: pii, name: answer-pii, action: redact}}
  - name: guarded-stream
    targets: [{{model: up-echo}}]
    guards:
      output:
        - {{type: pii, name: secret-leak, action: block, entities: [SECRET]}}
        - {{type: pii, name: contact-data, action: redact, entities: [EMAIL]}}
      stream_window: 64
  - name: private
    targets: [{{model: up-echo}}]
    capture: redacted
  - name: metadata-only
    targets: [{{model: up-echo}}]
    capture: metadata
  - name: judged
    targets: [{{model: up-echo}}]
    online_eval:
      sample_rate: 1.0
      judges: [{{type: judge.relevance, model: smollm2-135m-instruct, logprobs: true}}]
  - name: handbook-qa
    targets: [{{model: up-echo}}]
    rag: {{knowledge_base: handbook, top_k: 2}}
  - name: handbook-prompted
    targets: [{{model: up-echo}}]
    rag: {{knowledge_base: handbook, top_k: 2, prompt: "rag-answer@staging"}}
  - name: handbook-metadata
    targets: [{{model: up-echo}}]
    rag: {{knowledge_base: handbook, top_k: 2}}
    capture: metadata
  - name: support-pipeline
    pipeline: support-answer
"""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--db",
        choices=("sqlite", "postgres"),
        default=os.environ.get("FLYWHEEL_TEST_DB", "sqlite"),
        help="database backend for servers and stores under test (env FLYWHEEL_TEST_DB)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"flywheel database: {config.getoption('--db')}"


# The session's PostgreSQL server when the run uses one (set by the ``postgres`` fixture);
# module-level so ``start_server`` and helpers called outside fixtures can reach it.
_postgres: PostgresServer | None = None
# One database per server home, so a server restarted on the same home finds its data.
_home_databases: dict[Path, str] = {}
# The database ``new_database_url`` copies on PostgreSQL, made on first use.
_migrated_template: str | None = None


@pytest.fixture(scope="session", autouse=True)
def postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer | None]:
    """The session's PostgreSQL server with ``--db=postgres``, else None; stopped and its
    data directory removed at the end of the session."""
    global _postgres, _migrated_template
    if request.config.getoption("--db") != "postgres":
        yield None
        return
    running = PostgresServer.start()
    _postgres = running
    try:
        yield running
    finally:
        _postgres = _migrated_template = None
        _home_databases.clear()
        running.stop()


def new_database_url(directory: Path, filename: str = "flywheel.db") -> str:
    """A fresh database for a store under test (call ``migrate()`` on it as usual): a SQLite
    file in ``directory``, or with ``--db=postgres`` a new database on the session's server.

    On PostgreSQL it is a copy of one migrated once per session, ten times faster than
    migrating each (the servers' own databases still migrate from empty at start)."""
    global _migrated_template
    if _postgres is None:
        return f"sqlite:///{directory / filename}"
    if _migrated_template is None:
        url = _postgres.create_database("template")
        template = Database(url)
        template.migrate()
        template.dispose()  # a template must have no open connections
        _migrated_template = make_url(url).database
    return _postgres.create_database(template=_migrated_template)


def home_database_url(home: Path) -> str:
    """The database a server on ``home`` uses: its home's SQLite file, or (on PostgreSQL)
    a database made for that home on first use and reused when a server restarts there."""
    if _postgres is None:
        return f"sqlite:///{home / 'flywheel.db'}"
    key = home.resolve()
    if key not in _home_databases:
        _home_databases[key] = _postgres.create_database("home")
    return _home_databases[key]


def copy_database(url: str, directory: Path) -> str:
    """A consistent copy of a live server's database (to tamper with without disturbing
    the server): SQLite's online backup into ``directory``, or pg_dump into a new database."""
    if url.startswith("sqlite:///"):
        copy = directory / "copy.db"
        source_path = url.removeprefix("sqlite:///")
        with sqlite3.connect(source_path) as source, sqlite3.connect(copy) as target:
            source.backup(target)
        return f"sqlite:///{copy}"
    assert _postgres is not None, url
    return _postgres.copy_database(url)


def database_files(url: str) -> list[Path]:
    """The files on disk holding a database's data, for tests that scan them for secrets:
    a SQLite file with its WAL and journal, or the PostgreSQL database's files and WAL."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return [p for p in path.parent.glob(path.name + "*") if p.is_file()]
    assert _postgres is not None, url
    return _postgres.database_files(url)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A fresh database URL for this test, to ``migrate()`` (see ``new_database_url``)."""
    return new_database_url(tmp_path)


@dataclass
class RunningServer:
    base_url: str
    admin_key: str
    home: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    # What FLYWHEEL_DATABASE_URL the server runs on (its home's SQLite file by default).
    database_url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    home: Path,
    config_text: str,
    admin_key: str,
    extra_env: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    timeout: float = 600,
) -> RunningServer:
    """Start ``flywheel up`` in a subprocess and wait until ``ready_path`` answers 200.

    The server's database is ``extra_env``'s FLYWHEEL_DATABASE_URL if given, else the
    home's own (see ``home_database_url``: a PostgreSQL database with ``--db=postgres``).
    """
    home.mkdir(parents=True, exist_ok=True)
    config = home / "flywheel.yaml"
    config.write_text(config_text)
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_CONFIG_FILE": str(config),
        "FLYWHEEL_ADMIN_KEY": admin_key,
        "FLYWHEEL_MODEL_CACHE": str(MODEL_CACHE),
        "FLYWHEEL_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        # The job-system tests' plugin kind, importable by the server and its job processes.
        "FLYWHEEL_PLUGINS": "tests.plugins.slow_job",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "FLYWHEEL_JOB_CONCURRENCY": "2",
        # Runs export to a local MLflow store (mlflow-skinny is a dev dependency).
        "FLYWHEEL_MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        **(extra_env or {}),
    }
    if "FLYWHEEL_DATABASE_URL" not in (extra_env or {}):
        env["FLYWHEEL_DATABASE_URL"] = home_database_url(home)
    log_path = home / "server.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "flywheel"), "up", "--port", str(port)],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = RunningServer(
        f"http://127.0.0.1:{port}",
        admin_key,
        home,
        process,
        log_path,
        env["FLYWHEEL_DATABASE_URL"],
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + ready_path, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: `make test` installs it "
            "(apt-get install redis-server); the Redis limiter tests need a real server."
        )
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.02)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(10)


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as running:
        yield running


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    postgres: PostgresServer | None,
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("flywheel-home")
    running = start_server(
        home, TEST_CONFIG.format(upstream=upstream.base_url), "fw-test-" + secrets.token_hex(16)
    )
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def auth(server: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.admin_key}"}


@pytest.fixture
def api(server: RunningServer, auth: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=auth, timeout=120) as client:
        yield client


def wait_for_trace(
    api: httpx.Client, trace_id: str, timeout: float = 10, kinds: tuple[str, ...] = ()
) -> dict:
    """The trace once the background writer has flushed it, with a span of each of ``kinds``
    (the writer stores spans in batches, so a trace's spans may arrive apart)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = api.get(f"/api/traces/{trace_id}")
        if response.status_code == 200:
            trace = response.json()
            if set(kinds) <= {span["kind"] for span in trace["spans"]}:
                return trace
        time.sleep(0.05)
    raise AssertionError(f"trace {trace_id} was not recorded within {timeout}s")
