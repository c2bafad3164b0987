"""Prometheus metrics of the gateway: requests, latency, tokens, cost, guard hits, response
cache results, and the depth of the queues behind it (trace writer, local batcher, online
judging).

Each server builds its own :class:`GatewayMetrics` on its own registry, so several apps in one
process (tests, embedded use) never collide; ``/metrics`` renders that registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> (help, read the current values as {labels tuple: value}); label names alongside.
QueueReader = Callable[[], Mapping[tuple[str, ...], float]]


class _Queues(Collector):
    """Gauges read at scrape time, so the hot path never updates them."""

    def __init__(self) -> None:
        self.readers: dict[str, tuple[str, tuple[str, ...], QueueReader]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (documentation, labels, read) in self.readers.items():
            family = GaugeMetricFamily(name, documentation, labels=list(labels))
            try:
                values = read()
            except Exception:  # a scrape must not fail because one reader did
                values = {}
            for label_values, value in values.items():
                family.add_metric(list(label_values), float(value))
            yield family


class GatewayMetrics:
    """The collectors of one server, and :meth:`observe` to count a traced gateway call."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("route", "model", "status")
        self.requests = Counter(
            "flywheel_requests",
            "Gateway calls by route, answering model and status.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "flywheel_request_latency_seconds",
            "Gateway call latency (to the last byte) by route.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "flywheel_time_to_first_token_seconds",
            "Time to the first streamed token by route.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "flywheel_tokens",
            "Tokens by route, model and type (prompt or completion).",
            ("route", "model", "type"),
            registry=self.registry,
        )
        self.cost = Counter(
            "flywheel_cost_usd",
            "Dollars spent by route and model, at catalog prices.",
            ("route", "model"),
            registry=self.registry,
        )
        self.guard_hits = Counter(
            "flywheel_guard_hits",
            "Guards that found something, by route, guard, stage and action.",
            ("route", "guard", "stage", "action"),
            registry=self.registry,
        )
        self.cache_results = Counter(
            "flywheel_cache_requests",
            "Calls on cached routes by route and result (hit, miss or bypass).",
            ("route", "result"),
            registry=self.registry,
        )
        self.cache_errors = Counter(
            "flywheel_cache_errors",
            "Response cache store failures by operation (each one served as a miss).",
            ("operation",),
            registry=self.registry,
        )
        self._queues = _Queues()
        self.registry.register(self._queues)

    def add_queue(
        self, name: str, documentation: str, labels: tuple[str, ...], read: QueueReader
    ) -> None:
        """A gauge read when scraped, e.g. ``flywheel_trace_writer_pending``."""
        self._queues.readers[name] = (documentation, labels, read)

    def observe(self, span: Mapping[str, Any]) -> None:
        """Count one gateway span row (see ``Gateway._record``)."""
        route = span.get("route") or ""
        model = span.get("model") or ""
        self.requests.labels(route, model, str(span.get("status_code") or "")).inc()
        if span.get("latency_ms") is not None:
            self.latency.labels(route).observe(span["latency_ms"] / 1000)
        if span.get("ttft_ms") is not None:
            self.ttft.labels(route).observe(span["ttft_ms"] / 1000)
        cache = (span.get("attributes") or {}).get("flywheel.cache")
        if cache is not None:
            self.cache_results.labels(route, str(cache)).inc()
            if cache == "hit":
                return  # a served copy: no model processed tokens or cost anything
        for kind in ("prompt", "completion"):
            tokens = span.get(f"{kind}_tokens")
            if tokens:
                self.tokens.labels(route, model, kind).inc(tokens)
        if span.get("cost"):
            self.cost.labels(route, model).inc(span["cost"])

    def guard_hit(self, route: str, guard: str, stage: str, action: str) -> None:
        self.guard_hits.labels(route, guard, stage, action).inc()

    def cache_error(self, operation: str) -> None:
        """Count a response cache store failure (get, search, put, count)."""
        self.cache_errors.labels(operation).inc()

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "GatewayMetrics"]
