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
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe

from flywheel.testing.upstream import free_port

BIN = Path(sys.executable).parent
KEY = "fw-bench-key"
BODY = {
    "model": "echo",
    "messages": [{"role": "user", "content": "How fast is the gateway today?"}],
}


def _wait(url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


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

    up_port, fw_port = free_port(), free_port()
    home = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    (home / "flywheel.yaml").write_text(
        "providers:\n"
        f"  up: {{type: openai, base_url: 'http://127.0.0.1:{up_port}/v1'}}\n"
        "models:\n  - {name: up-echo, provider: up, upstream_name: echo}\n"
        "routes:\n  - {name: echo, targets: [{model: up-echo}]}\n"
    )
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_CONFIG_FILE": str(home / "flywheel.yaml"),
        "FLYWHEEL_ADMIN_KEY": KEY,
        "FLYWHEEL_LOG_LEVEL": "warning",
    }
    upstream = subprocess.Popen(
        [sys.executable, "-m", "flywheel.testing.upstream", "--port", str(up_port)],
        stdout=subprocess.DEVNULL,
    )
    gateway = subprocess.Popen(
        [str(BIN / "flywheel"), "up", "--port", str(fw_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        _wait(f"http://127.0.0.1:{up_port}/calls")
        _wait(f"http://127.0.0.1:{fw_port}/readyz")
        targets = {
            "direct": f"http://127.0.0.1:{up_port}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{fw_port}/v1/chat/completions",
        }
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
    finally:
        for process in (gateway, upstream):
            process.send_signal(signal.SIGTERM)
            process.wait(30)

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
