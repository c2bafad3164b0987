"""Eval re-runs from the response cache: items per second for a 200-item suite.

A fake upstream and a Flywheel server run on loopback (``bench/_stack.py``). A 200-item
dataset is evaluated against the ``echo`` route with six deterministic scorers: once fresh
(every item calls the gateway), then again, every answer served from the response cache.
Items/s is measured by the client, from starting the run to seeing it completed.

    python bench/eval_cache.py [--items 200] [--repeats 3] [--json results.json]

Target (issue 5): a 200-item re-run served from the cache at >= 100 items/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe
from _stack import running_stack

from flywheel import Client

SCORERS = ["exact_match", "token_f1", "bleu", "chrf", {"type": "rouge", "variant": "L"}, "latency"]


def _timed_run(client: Client) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    run = client.evals.run("bench")
    run = client.evals.wait(run["id"], poll=0.02)
    return time.perf_counter() - started, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="cached re-runs to time")
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args()

    items = [
        {"input": f"question {i}: what is {i} plus {i}?", "expected": f"echo: question {i}"}
        for i in range(args.items)
    ]
    with running_stack() as stack, Client(stack.flywheel_url, stack.key, timeout=300) as client:
        client.datasets.create("bench", items)
        client.evals.put_suite(
            "bench", dataset="bench", target="echo", scorers=SCORERS, concurrency=16
        )
        fresh_s, fresh = _timed_run(client)
        cached = [_timed_run(client) for _ in range(args.repeats)]
    assert fresh["status"] == "completed" and fresh["cache_hits"] == 0, fresh
    assert all(run["cache_hits"] == args.items for _, run in cached), cached
    cached_s = [seconds for seconds, _ in cached]
    results = {
        "machine": describe(),
        "items": args.items,
        "fresh_items_per_s": round(args.items / fresh_s, 1),
        "cached_items_per_s": [round(args.items / s, 1) for s in cached_s],
        "cached_median_items_per_s": round(args.items / statistics.median(cached_s), 1),
        "server_duration_s": [run["summary"]["duration_s"] for _, run in cached],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
