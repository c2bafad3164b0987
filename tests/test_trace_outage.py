"""The database goes away for 10 s under load: the gateway keeps answering, traces wait in the
trace writer's bounded buffer, and once PostgreSQL is back every trace is stored; with a small
bound what was dropped is counted, and it is exactly what is missing.

Everything is real: a PostgreSQL server of this module's own (so stopping it disturbs no other
test), two ``flywheel up`` servers on it (one with the default 100,000-row buffer, one with a
200-row buffer), the fake upstream on loopback, and a fast shutdown of PostgreSQL (``SIGINT``:
every connection is cut, new ones are refused) restarted 10 s later on the same data and port.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine

from flywheel.store import SpanRecord
from flywheel.testing import FakeUpstream
from tests.conftest import RunningServer, start_server, stop_server
from tests.pg import SERVER_SETTINGS, PostgresServer, _run_as, postgres_bindir

CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - name: echo
    targets: [{{model: up-echo}}]
"""
OUTAGE_SECONDS = 10.0
SMALL_BUFFER = 200
_CLOSED_LINE = re.compile(
    r"trace writer closed: (\d+) spans and \d+ scores written, (\d+) spans and \d+ scores "
    r"dropped \((\d+) for a full buffer"
)


def _stop_postgres(pg: PostgresServer) -> None:
    """Fast shutdown, data kept: clients see their connections cut and new ones refused."""
    pg.process.send_signal(signal.SIGINT)
    pg.process.wait(30)


def _restart_postgres(pg: PostgresServer, timeout: float = 30) -> None:
    """Start ``postgres`` again on the same data directory and port (as pg.py first did)."""
    account = _run_as()
    user, group = (account.pw_uid, account.pw_gid) if account is not None else (None, None)
    settings = [f"--{k}={v}" for k, v in SERVER_SETTINGS.items()]
    pg.process = subprocess.Popen(
        [
            str(postgres_bindir() / "postgres"),
            "-D",
            str(pg.root / "data"),
            "-p",
            str(pg.port),
            "-k",
            str(pg.root / "sockets"),
            *settings,
        ],
        stdout=pg.log_path.open("ab"),
        stderr=subprocess.STDOUT,
        user=user,
        group=group,
        extra_groups=[] if account is not None else None,
        cwd=pg.root,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(pg.dsn("postgres"), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if pg.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not come back:\n{pg.log()}") from None
            time.sleep(0.1)


@dataclass
class Outcome:
    """What the load saw on one server."""

    statuses: list[int] = field(default_factory=list)
    trace_ids: set[str] = field(default_factory=set)
    during_outage: int = 0  # answered 200 while PostgreSQL was down
    errors: list[str] = field(default_factory=list)  # transport errors, first ones kept


async def _load(
    servers: list[RunningServer], outcomes: list[Outcome], down: list[float], stop: asyncio.Event
) -> None:
    """Eight workers, each alternating between the servers, until ``stop``."""

    async def worker(client: httpx.AsyncClient, offset: int) -> None:
        turn = offset
        while not stop.is_set():
            index = turn % len(servers)
            turn += 1
            server = servers[index]
            outcome = outcomes[index]
            try:
                response = await client.post(
                    f"{server.base_url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {server.admin_key}"},
                    json={"model": "echo", "messages": [{"role": "user", "content": f"n{turn}"}]},
                )
            except httpx.HTTPError as exc:
                outcome.statuses.append(0)  # no answer at all
                outcome.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            outcome.statuses.append(response.status_code)
            if response.status_code == 200:
                outcome.trace_ids.add(response.headers["x-flywheel-trace-id"])
                if down[0] <= time.monotonic() <= down[1]:
                    outcome.during_outage += 1

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client, i) for i in range(8)))


async def _run_outage(
    pg: PostgresServer, servers: list[RunningServer]
) -> tuple[list[Outcome], float]:
    outcomes = [Outcome() for _ in servers]
    down = [float("inf"), float("inf")]
    stop = asyncio.Event()
    load = asyncio.create_task(_load(servers, outcomes, down, stop))
    await asyncio.sleep(2)  # steady state first
    down[0] = time.monotonic()
    await asyncio.to_thread(_stop_postgres, pg)
    await asyncio.sleep(OUTAGE_SECONDS)
    await asyncio.to_thread(_restart_postgres, pg)
    down[1] = time.monotonic()
    await asyncio.sleep(3)  # load continues while the backlog is written
    stop.set()
    await load
    return outcomes, down[1] - down[0]


def _stored(engine: Engine) -> set[str]:
    """The trace ids of the gateway's chat spans in a server's database."""
    with engine.connect() as connection:
        query = select(SpanRecord.trace_id).where(SpanRecord.kind == "gateway.chat")
        return set(connection.scalars(query))


@pytest.fixture(scope="module")
def outage_pg() -> Iterator[PostgresServer]:
    pg = PostgresServer.start()
    yield pg
    pg.stop()


def test_a_10s_database_outage_under_load(
    tmp_path: Path, outage_pg: PostgresServer, upstream: FakeUpstream
) -> None:
    config = CONFIG.format(upstream=upstream.base_url)
    urls = [outage_pg.create_database("outage"), outage_pg.create_database("outage_small")]
    common = {"FLYWHEEL_PRELOAD_MODELS": "false", "FLYWHEEL_LOG_LEVEL": "warning"}
    key = "fw-outage-" + secrets.token_hex(16)
    servers = [
        start_server(
            tmp_path / "big",
            config,
            key,
            {**common, "FLYWHEEL_DATABASE_URL": urls[0]},
            ready_path="/healthz",
        ),
        start_server(
            tmp_path / "small",
            config,
            key,
            {
                **common,
                "FLYWHEEL_DATABASE_URL": urls[1],
                "FLYWHEEL_TRACE_BUFFER_SPANS": str(SMALL_BUFFER),
            },
            ready_path="/healthz",
        ),
    ]
    try:
        outcomes, lasted = asyncio.run(_run_outage(outage_pg, servers))
        assert lasted >= OUTAGE_SECONDS
        for server, outcome in zip(servers, outcomes, strict=True):
            # The gateway never needed the database to answer.
            assert set(outcome.statuses) == {200}, (
                sorted(set(outcome.statuses)),
                outcome.errors[:3],
                server.log()[-3000:],
            )
            # Enough calls while it was down to overflow the small buffer.
            assert outcome.during_outage > 2 * SMALL_BUFFER, outcome.during_outage
        # The backlog is written once PostgreSQL is back.
        big, small = servers
        engine = create_engine(urls[0])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            missing = outcomes[0].trace_ids - _stored(engine)
            if not missing:
                break
            time.sleep(0.5)
        engine.dispose()
        assert not missing, f"{len(missing)} of {len(outcomes[0].trace_ids)} traces lost"
        metrics = httpx.get(
            big.base_url + "/metrics", headers={"Authorization": f"Bearer {key}"}
        ).text
        assert "flywheel_trace_writer_pending 0.0" in metrics
        # The small buffer dropped what did not fit, and says how much: a graceful stop
        # flushes the rest and logs the final counts.
        for server in servers:
            stop_server(server)
        for server, expect_drops in ((big, False), (small, True)):
            # A graceful stop (uvicorn re-raises the SIGTERM it handled).
            assert server.process.returncode in (0, -signal.SIGTERM), server.log()[-3000:]
            found = _CLOSED_LINE.search(server.log())
            if not expect_drops:
                assert found is None, found  # nothing lost: logged at info, below warning
                continue
            assert found is not None, server.log()[-3000:]
            written, dropped, overflowed = map(int, found.groups())
            engine = create_engine(urls[1])
            stored = _stored(engine)
            engine.dispose()
            missing = outcomes[1].trace_ids - stored
            assert dropped == overflowed == len(missing) > 0
            assert written == len(stored)
            assert "database unavailable for traces" in server.log()
            assert "database back for traces" in server.log()
    finally:
        for server in servers:
            stop_server(server)
