"""kill -9 of a replica under load (a small run of bench/load.py --kill): no write the killed
replica acknowledged is lost, and the lost-trace window is bounded by what it still held.

Two real ``flywheel up`` replicas on one database (SQLite, or PostgreSQL with ``--db=postgres``)
serve the fake upstream; replica B acknowledges feedback, config applies and model registry
versions while both take chat calls, then gets SIGKILL half-way through the calls.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import new_database_url

BENCH = Path(__file__).resolve().parents[1] / "bench" / "load.py"
REQUESTS = 300


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_load", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


def test_kill_9_of_a_replica_loses_no_acknowledged_write(tmp_path: Path) -> None:
    bench = _load_bench()
    # Each replica migrates the database it is given; on PostgreSQL a fresh one of its own.
    database_url = new_database_url(tmp_path)
    with bench.running_replicas(2, database_url, home=tmp_path / "stack") as stack:
        summary, crash = asyncio.run(bench.run(stack, REQUESTS, 8, kill=True))
        victim, survivor = stack.replicas[1], stack.replicas[0]
        assert victim.process.returncode == -9
        assert survivor.process.poll() is None, survivor.log_path.read_text()[-3000:]
    print(bench._table({**summary, "concurrency": 8}, crash))
    assert crash is not None and "kill" in summary, summary
    # Every write B acknowledged before it died is readable through A.
    assert crash["lost"] == {"feedback": [], "prompts": [], "registry": []}
    assert min(crash["acked_feedback"], crash["acked_config_applies"]) > 0
    assert crash["acked_registry_versions"] > 0
    # The gateway never answered a 5xx of its own; callers saw errors only for calls that
    # were inside B when it died, and the balancer sent the rest to A.
    assert summary["gateway_5xx"] == 0
    assert summary["ok"] + summary["transport_errors"] == REQUESTS
    assert summary["transport_errors"] <= 8  # at most one per client worker
    kill = summary["kill"]
    # Only traces the killed replica still held in memory are lost: A loses none, and B's
    # window is its writer's batching delay (0.2 s) plus a batch being written.
    assert kill["lost_traces_of_survivor"] == 0
    assert summary["lost_traces"] == kill["lost_traces_of_killed_replica"]
    assert kill["lost_window_ms"] < 5000, kill
