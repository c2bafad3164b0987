"""Soak: steady load on two replicas for a long time, watching their memory.

The same stack as bench/load.py (two ``flywheel up`` replicas on one database, the fake
upstream as the model). Chat calls run at a steady concurrency for ``--minutes``; every
``--interval`` seconds the resident memory (RSS) of each replica is sampled. Reported per
replica: RSS at the start and end, the peak, and the slope of a least-squares line through
the samples after the warm-up (the first fifth of the run), in MiB per hour. Unbounded growth
shows as a slope that stays well above zero as the run gets longer. Not run in CI.

    python bench/soak.py [--minutes 30] [--interval 10] [--concurrency 8]
                         [--database-url URL] [--redis-url URL] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe
from load import Stack, running_replicas, stored_trace_ids


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per hour."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (m - mean_m) for t, m in samples) / spread * 3600


async def soak(stack: Stack, seconds: float, interval: float, concurrency: int) -> dict[str, Any]:
    stop = asyncio.Event()
    counts = {"requests": 0, "non_200": 0, "errors": 0}
    acked: set[str] = set()
    samples: list[list[tuple[float, float]]] = [[] for _ in stack.replicas]
    started = time.monotonic()

    async def worker(client: httpx.AsyncClient, offset: int) -> None:
        turn = offset
        while not stop.is_set():
            replica = stack.replicas[turn % len(stack.replicas)]
            turn += 1
            body = {"model": "echo", "messages": [{"role": "user", "content": f"soak {turn}"}]}
            try:
                response = await client.post(replica.url + "/v1/chat/completions", json=body)
            except httpx.HTTPError:
                counts["errors"] += 1
                continue
            counts["requests"] += 1
            if response.status_code == 200:
                acked.add(response.headers["x-flywheel-trace-id"])
            else:
                counts["non_200"] += 1

    async def sampler() -> None:
        while not stop.is_set():
            now = time.monotonic() - started
            for index, replica in enumerate(stack.replicas):
                samples[index].append((now, replica.rss_kib() / 1024))
            print(
                f"{now:7.0f}s  requests {counts['requests']:>8}  rss MiB "
                + "  ".join(f"{s[-1][1]:.1f}" for s in samples),
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(headers=stack.auth, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(worker(client, i)) for i in range(concurrency)]
        watch = asyncio.create_task(sampler())
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks, watch)
    elapsed = time.monotonic() - started
    replicas = []
    for replica, series in zip(stack.replicas, samples, strict=True):
        warm = [s for s in series if s[0] >= seconds / 5]
        replicas.append(
            {
                "replica": replica.name,
                "rss_start_mib": round(series[0][1], 1),
                "rss_end_mib": round(series[-1][1], 1),
                "rss_peak_mib": round(max(m for _, m in series), 1),
                "slope_mib_per_hour": round(slope_per_hour(warm), 1),
                "samples": len(series),
            }
        )
    await asyncio.sleep(2)  # let the writers flush
    lost = len(acked - await asyncio.to_thread(stored_trace_ids, stack.database_url))
    return {
        "seconds": round(elapsed),
        "requests": counts["requests"],
        "rps": round(counts["requests"] / elapsed, 1),
        "non_200": counts["non_200"],
        "transport_errors": counts["errors"],
        "lost_traces": lost,
        "replicas": replicas,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--database-url", help="shared database (default: a SQLite file)")
    parser.add_argument("--redis-url", help="shared Redis")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with running_replicas(2, args.database_url, args.redis_url) as stack:
        result = asyncio.run(soak(stack, args.minutes * 60, args.interval, args.concurrency))
    result["concurrency"] = args.concurrency
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print("\n| replica | RSS start MiB | RSS end MiB | peak MiB | slope MiB/h (after warm-up) |")
    print("|---|---|---|---|---|")
    for r in result["replicas"]:
        print(
            f"| {r['replica']} | {r['rss_start_mib']} | {r['rss_end_mib']} | "
            f"{r['rss_peak_mib']} | {r['slope_mib_per_hour']} |"
        )
    print(
        f"\n{result['requests']} requests in {result['seconds']} s ({result['rps']} req/s), "
        f"{result['non_200']} non-200, {result['transport_errors']} transport errors, "
        f"{result['lost_traces']} lost traces"
    )
    report = {"machine": describe(), "soak": result}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
