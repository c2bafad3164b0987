"""The gateway's response cache: semantic hit and false-hit rates, and exact hit latency.

1. **Semantic quality.** A small labelled set of question pairs: paraphrases that should be
   served the first question's answer, and near misses that must not (a different number,
   place, verb...). For each pair the first question's answer is stored through the real
   :class:`~flywheel.gateway.cache.RouteCache` (in-process store, real MiniLM embedder) and
   the second is looked up, at several similarity thresholds. "Hit rate" is the share of
   paraphrases served; "false hits" the share of near misses served. The column "cosine
   only" is what a bare cosine threshold would do without the cache's exact-match guard on
   the numbers of the question.
2. **Exact hit latency.** A fake upstream and ``flywheel up`` on loopback (tracing on), one
   route with an exact cache: latency of misses (every question new) and hits (the same
   question) at concurrency 1, in-process storage and, when ``redis-server`` is installed,
   Redis. The fake upstream answers at once, so a miss here is the cheapest possible one;
   against a real model the gap is the model's whole latency.

    python bench/gateway_cache.py [--requests 300] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe
from _stack import running_stack

from flywheel.config import RouteConfig
from flywheel.gateway.cache import RouteCache, minilm_vector
from flywheel.gateway.schemas import ChatCompletionRequest
from flywheel.testing.upstream import free_port

THRESHOLDS = (0.90, 0.95, 0.98)

# (stored question, new question): the new one should be served the stored answer.
PARAPHRASES = [
    ("How do I reset my password?", "How can I reset my password?"),
    ("What is the capital of France?", "What's the capital of France?"),
    ("Can I get a refund for my order?", "Can I get a refund on my order?"),
    ("How do I cancel my subscription?", "How can I cancel my subscription?"),
    ("What are your opening hours?", "What are your business hours?"),
    ("Where is my package?", "Where's my package?"),
    ("How do I change my email address?", "How can I change my email address?"),
    ("Do you ship to Canada?", "Do you deliver to Canada?"),
    ("How long does shipping take?", "How long does delivery take?"),
    ("What payment methods do you accept?", "Which payment methods do you accept?"),
    ("How do I contact customer support?", "How can I contact customer support?"),
    ("Is there a student discount?", "Do you offer a student discount?"),
    ("convert 5 km to m", "Convert 5 km to m."),
    ("What is the return policy?", "What's your return policy?"),
    ("How do I delete my account?", "How can I delete my account?"),
    ("Can I change my delivery address?", "Can I update my delivery address?"),
    ("Why was my card declined?", "Why did my card get declined?"),
    ("How do I track my order?", "How can I track my order?"),
    ("Does the app work offline?", "Can the app work offline?"),
    ("What is the warranty period?", "How long is the warranty period?"),
]
# (stored question, new question): a different question that must never get that answer.
NEAR_MISSES = [
    ("convert 5 km to m", "convert 50 km to m"),
    ("What is the capital of Austria?", "What is the capital of Australia?"),
    ("Is the store open on Sunday?", "Is the store open on Monday?"),
    ("How do I cancel my subscription?", "How do I renew my subscription?"),
    ("How do I reset my password?", "How do I reset my username?"),
    ("Do you ship to Canada?", "Do you ship to Mexico?"),
    ("What is 12 times 7?", "What is 12 times 8?"),
    ("Can I get a refund for my order?", "Can I get a replacement for my order?"),
    ("How do I enable dark mode?", "How do I disable dark mode?"),
    ("Book a table for 2 at 7pm", "Book a table for 4 at 7pm"),
    ('Translate "good morning" into French', 'Translate "good morning" into Spanish'),
    (
        "What is the boiling point of water in Celsius?",
        "What is the boiling point of water in Fahrenheit?",
    ),
    ("Is the product available in red?", "Is the product available in blue?"),
    ("How do I add a user to my team?", "How do I remove a user from my team?"),
    ("Set an alarm for 6 am", "Set an alarm for 7 am"),
    ("What time does the London office open?", "What time does the Paris office open?"),
    ("How do I upgrade to the Pro plan?", "How do I downgrade from the Pro plan?"),
    ("Is shipping free over $50?", "Is shipping free over $100?"),
    ("Summarize the report from 2022", "Summarize the report from 2023"),
    ("Who wrote Pride and Prejudice?", "Who wrote Sense and Sensibility?"),
]


def _request(question: str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "faq",
            "temperature": 0,
            "messages": [
                {"role": "system", "content": "You answer customer questions."},
                {"role": "user", "content": question},
            ],
        }
    )


async def _served(threshold: float, stored: str, asked: str) -> bool:
    """Whether the cache serves ``stored``'s answer to ``asked`` at ``threshold``."""
    route = RouteConfig.model_validate(
        {
            "name": "faq",
            "targets": [{"model": "m"}],
            "cache": {"mode": "semantic", "similarity": threshold},
        }
    )
    cache = RouteCache()
    project = uuid.uuid4().hex
    first = cache.plan(route, "fp", project, _request(stored))
    assert first is not None
    answer = {
        "choices": [{"message": {"role": "assistant", "content": stored}, "finish_reason": "stop"}]
    }
    assert await cache.save(first, answer, model="m", trace_id="t")
    second = cache.plan(route, "fp", project, _request(asked))
    assert second is not None
    return await cache.lookup(second) is not None


def semantic_quality() -> dict[str, Any]:
    """Hit and false-hit rates per threshold, with and without the number guard."""
    cosine = {
        pair: float(minilm_vector(pair[0]) @ minilm_vector(pair[1]))  # type: ignore[operator]
        for pair in PARAPHRASES + NEAR_MISSES
    }
    rows = []
    for threshold in THRESHOLDS:
        hits = sum(asyncio.run(_served(threshold, a, b)) for a, b in PARAPHRASES)
        false = sum(asyncio.run(_served(threshold, a, b)) for a, b in NEAR_MISSES)
        bare = sum(cosine[p] >= threshold for p in NEAR_MISSES)
        rows.append(
            {
                "threshold": threshold,
                "hit_rate": hits / len(PARAPHRASES),
                "false_hit_rate": false / len(NEAR_MISSES),
                "false_hit_rate_cosine_only": bare / len(NEAR_MISSES),
            }
        )
    return {
        "paraphrases": len(PARAPHRASES),
        "near_misses": len(NEAR_MISSES),
        "rows": rows,
        "cosine": {f"{a} | {b}": round(c, 4) for (a, b), c in cosine.items()},
    }


# -- latency --------------------------------------------------------------------------------

CONFIG = """providers:
  up: {{type: openai, base_url: 'http://127.0.0.1:{port}/v1'}}
models:
  - {{name: up-echo, provider: up, upstream_name: echo}}
routes:
  - {{name: echo, targets: [{{model: up-echo}}]}}
  - {{name: cached, targets: [{{model: up-echo}}], cache: {{mode: exact, ttl: 1h}}}}
"""


@contextmanager
def _redis() -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def _pct(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _summary(latencies: list[float], results: dict[str, int]) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "results": results,
        "p50_ms": round(_pct(latencies, 50), 3),
        "p95_ms": round(_pct(latencies, 95), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
    }


def _measure(client: httpx.Client, total: int) -> dict[str, Any]:
    """The three kinds of call interleaved (so a load change on the machine hits all alike):
    the uncached route, a cache miss (a new question) and a hit (the same question)."""
    kinds = {"uncached route": ("echo", False), "miss": ("cached", False), "hit": ("cached", True)}
    latencies: dict[str, list[float]] = {name: [] for name in kinds}
    results: dict[str, dict[str, int]] = {name: {} for name in kinds}
    for i in range(total):
        for name, (route, same) in kinds.items():
            question = "How fast is a cached answer?" if same else f"q {uuid.uuid4().hex} {i}"
            body = {
                "model": route,
                "temperature": 0,
                "messages": [{"role": "user", "content": question}],
            }
            started = time.perf_counter()
            response = client.post("/v1/chat/completions", json=body)
            latencies[name].append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.text
            result = response.headers.get("x-flywheel-cache", "none")
            results[name][result] = results[name].get(result, 0) + 1
    return {name: _summary(latencies[name], results[name]) for name in kinds}


def latency(total: int) -> dict[str, Any]:
    """Exact-cache hit vs miss latency (and the uncached route) per storage."""
    out: dict[str, Any] = {}
    with _redis() as redis_url:
        storages = [("in-process", None)] + ([("redis", redis_url)] if redis_url else [])
        for name, url in storages:
            env = {"FLYWHEEL_REDIS_URL": url} if url else {}
            with (
                running_stack(CONFIG, env, ready_timeout=300) as stack,
                httpx.Client(base_url=stack.flywheel_url, headers=stack.auth, timeout=60) as client,
            ):
                _measure(client, 100)  # warm-up (and stores the answer the hits get)
                out[name] = _measure(client, total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300, help="per latency measurement")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": describe(), "semantic": semantic_quality()}
    if not args.skip_latency:
        results["latency"] = latency(args.requests)

    semantic = results["semantic"]
    print(f"machine: {results['machine']}\n")
    print(
        f"Semantic cache (MiniLM), {semantic['paraphrases']} paraphrase pairs and "
        f"{semantic['near_misses']} near-miss pairs:\n"
    )
    print("| similarity | paraphrase hit rate | false-hit rate | false hits, cosine only |")
    print("|---:|---:|---:|---:|")
    for row in semantic["rows"]:
        print(
            f"| {row['threshold']:.2f} | {row['hit_rate']:.0%} | {row['false_hit_rate']:.0%} "
            f"| {row['false_hit_rate_cosine_only']:.0%} |"
        )
    if "latency" in results:
        print(f"\nExact cache latency, concurrency 1, {args.requests} requests each:\n")
        print("| storage | call | p50 ms | p95 ms | mean ms | x-flywheel-cache |")
        print("|---|---|---:|---:|---:|---|")
        for storage, runs in results["latency"].items():
            for name, run in runs.items():
                seen = ", ".join(f"{k} {v}" for k, v in sorted(run["results"].items()))
                print(
                    f"| {storage} | {name} | {run['p50_ms']} | {run['p95_ms']} "
                    f"| {run['mean_ms']} | {seen} |"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
