"""Load on two gateway replicas sharing one database, and kill -9 of one of them under load.

Two ``flywheel up`` processes (separate homes, one database: a SQLite file by default,
``--database-url`` for PostgreSQL; one Redis with ``--redis-url``) serve the fake upstream
(``flywheel.testing.upstream``, its own process) as the model. An httpx async client sends the
chat requests, alternating between the replicas like a round-robin load balancer.

Reported: requests/s, p50/p95/p99 latency, 5xx answered by the gateway itself, transport
errors, and lost traces: requests answered 200 with ``x-flywheel-trace-id`` whose gateway span
is not in the database once the writers have flushed.

``--kill``: half-way through, replica B is killed with SIGKILL. The "load balancer" sends a
request that cannot connect to B to A instead (a request already sent to B when it died is a
client-visible error, as behind a real balancer). Meanwhile a writer sends acknowledged writes
to B (feedback on a trace, a config apply, a model registry version); after the run every
acknowledged one must be readable through A. Traces B acknowledged but had not yet written are
the lost-trace window, reported as a count and in milliseconds before the kill.

    python bench/load.py [--requests 10000] [--concurrency 32] [--quick] [--kill]
                         [--database-url URL | --postgres] [--redis-url URL]
                         [--json results.json]

``--postgres`` starts a throwaway PostgreSQL on loopback from the machine's binaries (as the
test suite does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, select

from flywheel.store import SpanRecord
from flywheel.testing.upstream import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe

BIN = Path(sys.executable).parent
KEY = "fw-load-bench-key"
MASTER_KEY = "A" * 43  # every replica must decrypt the same stored secrets
CONFIG = """providers:
  up: {{type: openai, base_url: 'http://127.0.0.1:{port}/v1'}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - {{name: echo, targets: [{{model: up-echo}}]}}
"""


@dataclass
class Replica:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    killed_at: float | None = None  # time.monotonic() of the SIGKILL

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, nothing buffered in the process survives."""
        self.killed_at = time.monotonic()
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def rss_kib(self) -> int:
        """Resident memory of the replica process (Linux /proc)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


@dataclass
class Stack:
    replicas: list[Replica]
    database_url: str
    upstream_url: str
    home: Path
    key: str = KEY

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def _wait_until_up(url: str, process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout}s")


@contextmanager
def running_replicas(
    count: int = 2,
    database_url: str | None = None,
    redis_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    home: Path | None = None,
    timeout: float = 180,
) -> Iterator[Stack]:
    """The fake upstream and ``count`` replicas on one database (and one Redis if given);
    every process is stopped (SIGTERM, or SIGKILL after 30 s) on exit."""
    home = home or Path(tempfile.mkdtemp(prefix="flywheel-load-"))
    home.mkdir(parents=True, exist_ok=True)
    up_port = free_port()
    config = home / "flywheel.yaml"
    config.write_text(CONFIG.format(port=up_port))
    database_url = database_url or f"sqlite:///{home / 'flywheel.db'}"
    processes: list[subprocess.Popen[bytes]] = []
    upstream = subprocess.Popen(
        [sys.executable, "-m", "flywheel.testing.upstream", "--port", str(up_port)],
        stdout=subprocess.DEVNULL,
        stderr=(home / "upstream.log").open("wb"),
    )
    processes.append(upstream)
    replicas: list[Replica] = []
    try:
        _wait_until_up(f"http://127.0.0.1:{up_port}/calls", upstream, 60)
        for index in range(count):
            name = "AB"[index] if index < 2 else str(index)
            replica_home = home / f"replica-{name}"
            replica_home.mkdir(exist_ok=True)
            port = free_port()
            env = {
                **os.environ,
                "FLYWHEEL_HOME": str(replica_home),
                "FLYWHEEL_CONFIG_FILE": str(config),
                "FLYWHEEL_DATABASE_URL": database_url,
                "FLYWHEEL_ARTIFACT_ROOT": str(home / "artifacts"),
                "FLYWHEEL_ADMIN_KEY": KEY,
                "FLYWHEEL_MASTER_KEY": MASTER_KEY,
                "FLYWHEEL_PRELOAD_MODELS": "false",
                "FLYWHEEL_JOBS_ENABLED": "false",
                "FLYWHEEL_LOG_LEVEL": "warning",
                "HF_HUB_OFFLINE": "1",
                **({"FLYWHEEL_REDIS_URL": redis_url} if redis_url else {}),
                **(extra_env or {}),
            }
            log_path = replica_home / "server.log"
            process = subprocess.Popen(
                [str(BIN / "flywheel"), "up", "--port", str(port)],
                env=env,
                stdout=log_path.open("wb"),
                stderr=subprocess.STDOUT,
            )
            processes.append(process)
            url = f"http://127.0.0.1:{port}"
            # One at a time: the first runs the migrations, the next finds them done.
            _wait_until_up(url + "/healthz", process, timeout)
            replicas.append(Replica(name, url, process, log_path))
        yield Stack(replicas, database_url, f"http://127.0.0.1:{up_port}/v1", home)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# -- load ---------------------------------------------------------------------------------


@dataclass
class Answer:
    replica: int
    status: int  # 0: no HTTP answer (transport error)
    latency_ms: float
    acked_at: float  # time.monotonic() when the answer arrived
    trace_id: str | None = None
    gateway_error: bool = False  # a 5xx that is the gateway's own, not an upstream's
    error: str | None = None


@dataclass
class LoadResult:
    answers: list[Answer]
    elapsed: float
    rerouted: int = 0  # requests that could not connect to a dead replica, sent to another
    killed: Replica | None = None
    replicas: list[Replica] = field(default_factory=list)


# Codes of 5xx answers that report an upstream failure (the gateway did its job).
_UPSTREAM_CODES = {
    "upstream_timeout",
    "upstream_unreachable",
    "upstream_protocol_error",
    "stream_interrupted",
    "deadline_exceeded",
}


def _is_gateway_error(response: httpx.Response) -> bool:
    if response.status_code < 500:
        return False
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return True
    return code not in _UPSTREAM_CODES and not (response.status_code == 502 and code is None)


async def drive(
    stack: Stack,
    total: int,
    concurrency: int,
    kill_after: int | None = None,
    kill_when: Callable[[], bool] = lambda: True,
) -> LoadResult:
    """``total`` chat calls by ``concurrency`` workers, round robin over the live replicas;
    with ``kill_after``, replica B gets SIGKILL once that many calls were answered and
    ``kill_when()`` holds."""
    answers: list[Answer] = []
    next_index = 0
    rerouted = 0
    dead: set[int] = set()
    killed: Replica | None = None
    replicas = stack.replicas

    async def call(client: httpx.AsyncClient, index: int) -> None:
        nonlocal rerouted, killed
        body = {"model": "echo", "messages": [{"role": "user", "content": f"load {index}"}]}
        target = index % len(replicas)
        for _ in range(len(replicas)):
            if target in dead:
                target = (target + 1) % len(replicas)
                continue
            started = time.perf_counter()
            try:
                response = await client.post(
                    replicas[target].url + "/v1/chat/completions", json=body
                )
            except httpx.ConnectError:
                # Never reached the replica: a balancer marks it down and tries the next.
                dead.add(target)
                rerouted += 1
                target = (target + 1) % len(replicas)
                continue
            except httpx.HTTPError as exc:
                answers.append(
                    Answer(
                        target,
                        0,
                        (time.perf_counter() - started) * 1000,
                        time.monotonic(),
                        error=f"{type(exc).__name__}: {exc}",
                    )
                )
                return
            answers.append(
                Answer(
                    target,
                    response.status_code,
                    (time.perf_counter() - started) * 1000,
                    time.monotonic(),
                    response.headers.get("x-flywheel-trace-id")
                    if response.status_code == 200
                    else None,
                    _is_gateway_error(response),
                )
            )
            if (
                kill_after is not None
                and killed is None
                and len(answers) >= kill_after
                and kill_when()
            ):
                killed = replicas[1]
                await asyncio.to_thread(killed.kill)
            return
        answers.append(Answer(target, 0, 0.0, time.monotonic(), error="no replica left"))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total:
            index = next_index
            next_index += 1
            await call(client, index)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=stack.auth, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LoadResult(answers, elapsed, rerouted, killed, replicas)


def stored_trace_ids(database_url: str) -> set[str]:
    """Trace ids of the gateway chat spans in the database."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            query = select(SpanRecord.trace_id).where(SpanRecord.kind == "gateway.chat")
            return set(connection.scalars(query))
    finally:
        engine.dispose()


def wait_for_traces(database_url: str, wanted: set[str], timeout: float = 60) -> set[str]:
    """The wanted trace ids still missing once the writers had ``timeout`` s to flush (or
    found everything, or stopped making progress for 5 s)."""
    deadline = time.monotonic() + timeout
    missing = set(wanted)
    last_change = time.monotonic()
    while missing and time.monotonic() < deadline:
        still = missing - stored_trace_ids(database_url)
        if len(still) != len(missing):
            last_change = time.monotonic()
        missing = still
        if missing and time.monotonic() - last_change > 5:
            break
        if missing:
            time.sleep(0.25)
    return missing


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def summarise(result: LoadResult, missing: set[str]) -> dict[str, Any]:
    answers = result.answers
    ok = [a for a in answers if a.status == 200]
    latencies = [a.latency_ms for a in ok]
    acked = {a.trace_id for a in ok if a.trace_id}
    summary: dict[str, Any] = {
        "requests": len(answers),
        "ok": len(ok),
        "rps": round(len(answers) / result.elapsed, 1) if result.elapsed else 0.0,
        "p50_ms": round(_pct(latencies, 50), 2),
        "p95_ms": round(_pct(latencies, 95), 2),
        "p99_ms": round(_pct(latencies, 99), 2),
        "gateway_5xx": sum(a.gateway_error for a in answers),
        "other_non_200": sum(
            1 for a in answers if a.status not in (0, 200) and not a.gateway_error
        ),
        "transport_errors": sum(1 for a in answers if a.status == 0),
        "acked_traces": len(acked),
        "lost_traces": len(missing),
        "rerouted": result.rerouted,
    }
    if result.killed is not None and result.killed.killed_at is not None:
        killed_at = result.killed.killed_at
        index = result.replicas.index(result.killed)
        lost = [a for a in ok if a.trace_id in missing]
        summary["kill"] = {
            "replica": result.killed.name,
            "acked_by_killed_replica": sum(1 for a in ok if a.replica == index),
            "lost_traces_of_killed_replica": sum(1 for a in lost if a.replica == index),
            "lost_traces_of_survivor": sum(1 for a in lost if a.replica != index),
            # How long before the kill the oldest lost acknowledgement was sent.
            "lost_window_ms": round((killed_at - min(a.acked_at for a in lost)) * 1000, 1)
            if lost
            else 0.0,
            "in_flight_errors": summary["transport_errors"],
        }
    return summary


# -- acknowledged writes to the replica that will die ---------------------------------------


@dataclass
class Writes:
    """Writes a replica acknowledged (2xx), to look for afterwards."""

    feedback: list[str] = field(default_factory=list)  # comments on the seed trace
    prompts: list[str] = field(default_factory=list)  # prompts made by a config apply
    registry: list[str] = field(default_factory=list)  # models with an acknowledged version 1
    refused: int = 0  # answered, but not 2xx (not acknowledged)
    unanswered: int = 0  # no answer: not acknowledged, may or may not have happened


async def write_until_dead(replica: Replica, stack: Stack, seed_trace: str, writes: Writes) -> None:
    """Feedback, config applies and registry versions against ``replica`` in a loop until it
    stops answering; records in ``writes`` what it acknowledged."""
    run = os.urandom(3).hex()
    files = [
        ("files", ("config.json", b'{"model_type": "llama"}')),
        ("files", ("model.safetensors", b"\1" * 1024)),
    ]
    async with httpx.AsyncClient(base_url=replica.url, headers=stack.auth, timeout=30) as client:
        n = 0
        while replica.process.poll() is None:
            n += 1
            try:
                kind = n % 3
                if kind == 0:
                    comment = f"crash-{run}-{n}"
                    response = await client.post(
                        f"/api/traces/{seed_trace}/feedback",
                        json={"rating": "up", "comment": comment},
                    )
                    if response.status_code == 201:
                        writes.feedback.append(comment)
                elif kind == 1:
                    name = f"crash-{run}-{n}"
                    text = f"prompts:\n  - name: {name}\n    template: 'hi {n}'\n"
                    response = await client.post("/api/config/apply", json={"yaml": text})
                    if response.status_code == 200:
                        writes.prompts.append(name)
                else:
                    name = f"crash-{run}-{n}"
                    response = await client.post("/api/registry", json={"name": name})
                    if response.status_code == 201:
                        response = await client.post(
                            f"/api/registry/{name}/versions", files=files, data={"kind": "base"}
                        )
                        if response.status_code == 201:
                            writes.registry.append(name)
                if response.status_code >= 300:
                    writes.refused += 1
            except httpx.HTTPError:
                writes.unanswered += 1
                await asyncio.sleep(0.05)


def missing_writes(survivor: Replica, stack: Stack, seed_trace: str, writes: Writes) -> dict:
    """Acknowledged writes the survivor cannot read back (all lists must be empty)."""
    with httpx.Client(base_url=survivor.url, headers=stack.auth, timeout=30) as client:
        feedback = client.get(f"/api/traces/{seed_trace}/feedback").json()["data"]
        comments = {f["comment"] for f in feedback}
        lost_prompts = [
            name for name in writes.prompts if client.get(f"/api/prompts/{name}").status_code != 200
        ]
        lost_registry = [
            name
            for name in writes.registry
            if client.get(f"/api/registry/{name}/versions/1").status_code != 200
        ]
    return {
        "feedback": [c for c in writes.feedback if c not in comments],
        "prompts": lost_prompts,
        "registry": lost_registry,
    }


def seed_trace(stack: Stack) -> str:
    """One traced call, stored, for the feedback to point at."""
    with httpx.Client(headers=stack.auth, timeout=30) as client:
        response = client.post(
            stack.replicas[0].url + "/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "seed"}]},
        )
        response.raise_for_status()
        trace_id = response.headers["x-flywheel-trace-id"]
        deadline = time.monotonic() + 30
        while client.get(f"{stack.replicas[0].url}/api/traces/{trace_id}").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the seed trace was not stored")
            time.sleep(0.05)
    return trace_id


async def run(
    stack: Stack, total: int, concurrency: int, kill: bool = False
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One load run; with ``kill``, B dies half-way and the acknowledged writes are checked.
    Returns ``(load summary, crash report or None)``."""
    if not kill:
        result = await drive(stack, total, concurrency)
        acked = {a.trace_id for a in result.answers if a.status == 200 and a.trace_id}
        return summarise(result, wait_for_traces(stack.database_url, acked)), None
    seed = await asyncio.to_thread(seed_trace, stack)
    victim, survivor = stack.replicas[1], stack.replicas[0]
    writes = Writes()
    writer = asyncio.create_task(write_until_dead(victim, stack, seed, writes))
    # Not before B acknowledged a write of each kind, so that the check checks something.
    result = await drive(
        stack,
        total,
        concurrency,
        kill_after=total // 2,
        kill_when=lambda: min(len(writes.feedback), len(writes.prompts), len(writes.registry)) > 0,
    )
    await writer
    acked = {a.trace_id for a in result.answers if a.status == 200 and a.trace_id}
    missing = wait_for_traces(stack.database_url, acked)
    summary = summarise(result, missing)
    lost = await asyncio.to_thread(missing_writes, survivor, stack, seed, writes)
    crash = {
        "acked_feedback": len(writes.feedback),
        "acked_config_applies": len(writes.prompts),
        "acked_registry_versions": len(writes.registry),
        "unanswered_writes": writes.unanswered,
        "lost_acked_writes": sum(len(v) for v in lost.values()),
        "lost": lost,
    }
    return summary, crash


def _table(summary: dict[str, Any], crash: dict[str, Any] | None) -> str:
    rows = [
        "| requests | concurrency | req/s | p50 ms | p95 ms | p99 ms | gateway 5xx | "
        "transport errors | acked traces | lost traces |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {summary['requests']} | {summary['concurrency']} | {summary['rps']} | "
        f"{summary['p50_ms']} | {summary['p95_ms']} | {summary['p99_ms']} | "
        f"{summary['gateway_5xx']} | {summary['transport_errors']} | "
        f"{summary['acked_traces']} | {summary['lost_traces']} |",
    ]
    if crash is not None and "kill" in summary:
        kill = summary["kill"]
        rows += [
            "",
            "| killed | acked by it | its lost traces | lost window | in-flight errors | "
            "acked feedback / applies / versions | lost acked writes |",
            "|---|---|---|---|---|---|---|",
            f"| {kill['replica']} | {kill['acked_by_killed_replica']} | "
            f"{kill['lost_traces_of_killed_replica']} | {kill['lost_window_ms']} ms | "
            f"{kill['in_flight_errors']} | {crash['acked_feedback']} / "
            f"{crash['acked_config_applies']} / {crash['acked_registry_versions']} | "
            f"{crash['lost_acked_writes']} |",
        ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="1,000 requests")
    parser.add_argument("--kill", action="store_true", help="kill -9 replica B half-way")
    parser.add_argument("--database-url", help="shared database (default: a SQLite file)")
    parser.add_argument("--postgres", action="store_true", help="a throwaway local PostgreSQL")
    parser.add_argument("--redis-url", help="shared Redis for limits, cache and sessions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    total = 1000 if args.quick else args.requests

    pg = None
    database_url = args.database_url
    if args.postgres:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.pg import PostgresServer

        pg = PostgresServer.start()
        database_url = pg.create_database("load")
    try:
        with running_replicas(2, database_url, args.redis_url) as stack:
            summary, crash = asyncio.run(run(stack, total, args.concurrency, args.kill))
    finally:
        if pg is not None:
            pg.stop()
    summary["concurrency"] = args.concurrency
    summary["database"] = (database_url or "sqlite").split(":", 1)[0].split("+", 1)[0]
    summary["redis"] = bool(args.redis_url)
    summary["load_average_after"] = os.getloadavg()
    print(_table(summary, crash))
    report = {"machine": describe(), "load": summary, "crash": crash}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
