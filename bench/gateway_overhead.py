"""Gateway overhead: latency added by Flywheel (tracing on) over calling the upstream directly.

A fake OpenAI-compatible upstream and a Flywheel server run as separate processes on loopback;
this process drives both at concurrency 1 and 16 and reports p50/p95/p99 and requests/s.

    python bench/gateway_overhead.py [--requests 2000] [--json results.json]

Target (PRODUCT.md): added p50 <= 2 ms at concurrency 1, <= 10 ms at concurrency 16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe
from _stack import running_stack

BODY = {
    "model": "echo",
    "messages": [{"role": "user", "content": "How fast is the gateway today?"}],
}


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


async def _drive(url: str, headers: dict[str, str], concurrency: int, total: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    remaining = total

    async def worker(client: aiohttp.ClientSession) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with client.post(url, json=BODY, headers=headers) as response:
                await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            errors += response.status != 200

    # aiohttp: the lightest Python client, so the load generator steals less CPU from the
    # two servers sharing this machine's cores.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(_pct(latencies, 50), 3),
        "p95_ms": round(_pct(latencies, 95), 3),
        "p99_ms": round(_pct(latencies, 99), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per measurement")
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args()

    with running_stack() as stack:
        targets = {
            "direct": f"{stack.upstream_url}/v1/chat/completions",
            "gateway": f"{stack.flywheel_url}/v1/chat/completions",
        }
        auth = stack.auth
        results: dict[str, Any] = {"machine": describe(), "requests": args.requests, "runs": {}}
        for concurrency in (1, 16):
            for name, url in targets.items():
                asyncio.run(_drive(url, auth, concurrency, 200))  # warm-up
                run = asyncio.run(_drive(url, auth, concurrency, args.requests))
                results["runs"][f"{name}_c{concurrency}"] = run
            direct, via = (
                results["runs"][f"direct_c{concurrency}"],
                results["runs"][f"gateway_c{concurrency}"],
            )
            results["runs"][f"added_c{concurrency}"] = {
                k: round(via[k] - direct[k], 3) for k in ("p50_ms", "p95_ms", "p99_ms")
            }

    print(f"machine: {results['machine']}")
    print(f"{'run':<14}{'rps':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, run in results["runs"].items():
        if name.startswith("added"):
            print(f"{name:<14}{'':>9}{run['p50_ms']:>9}{run['p95_ms']:>9}{run['p99_ms']:>9}")
        else:
            print(
                f"{name:<14}{run['rps']:>9}{run['p50_ms']:>9}{run['p95_ms']:>9}{run['p99_ms']:>9}{run['errors']:>8}"
            )
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
