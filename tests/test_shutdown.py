"""SIGTERM under concurrent load: every acknowledged call's trace is in the database."""

from __future__ import annotations

import asyncio
import secrets
import signal

import httpx

from flywheel.store import Database
from tests.conftest import start_server

CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - {{name: echo, targets: [{{model: up-echo}}]}}
"""


async def _load(base_url: str, key: str, stop: asyncio.Event, ok: list[str], workers: int) -> None:
    async def worker(client: httpx.AsyncClient, n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            stream = i % 3 == 0
            try:
                response = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "echo",
                        "stream": stream,
                        "messages": [{"role": "user", "content": f"worker {n} call {i}"}],
                    },
                )
                body = response.text
            except httpx.HTTPError:
                return  # the server stopped listening
            if response.status_code == 200 and (not stream or body.rstrip().endswith("[DONE]")):
                ok.append(response.headers["x-flywheel-trace-id"])

    limits = httpx.Limits(max_connections=workers)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30, limits=limits
    ) as client:
        await asyncio.gather(*(worker(client, n) for n in range(workers)))


def test_sigterm_under_load_loses_no_trace(tmp_path, upstream) -> None:
    server = start_server(
        tmp_path / "home",
        CONFIG.format(upstream=upstream.base_url),
        "fw-" + secrets.token_hex(8),
        # A slow flush interval keeps spans queued at the moment of SIGTERM.
        extra_env={"FLYWHEEL_TRACE_FLUSH_SECONDS": "2", "FLYWHEEL_PRELOAD_MODELS": "false"},
    )
    ok: list[str] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(server.base_url, server.admin_key, stop, ok, workers=16))
        while len(ok) < 300:
            await asyncio.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)
        stop.set()
        await load

    asyncio.run(scenario())
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
    assert server.process.wait(60) in (0, -signal.SIGTERM), server.log()
    # The server's own database: a SQLite file, or PostgreSQL with --db=postgres.
    database = Database(server.database_url)
    with database.engine.connect() as connection:
        stored = set(connection.exec_driver_sql("SELECT trace_id FROM spans").scalars())
    database.dispose()
    assert len(ok) >= 300
    missing = set(ok) - stored
    assert not missing, f"{len(missing)} of {len(ok)} acknowledged calls have no trace"
