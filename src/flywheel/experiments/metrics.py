"""Each variant's metrics, read from what the gateway already records.

A call served by an experiment carries ``flywheel.experiment`` (the id) and
``flywheel.experiment.variant`` in its span's attributes. From those spans come the guardrail
metrics (errors, latency, cost); the primary metric is each trace's feedback rating (the mean
of its ratings) or its online judge score of the named kind, joined by trace id.

In a shadow experiment the control's calls are the served ones and the candidate's are the
mirrored copies (``flywheel.shadow``); each is its own trace, scored by the online judges
like any other.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String, cast, select

from flywheel.experiments.stats import ArmStats
from flywheel.experiments.store import ATTR_EXPERIMENT, ATTR_SHADOW, ATTR_VARIANT
from flywheel.store import Database, Feedback, SpanRecord, TraceScore

__all__ = ["VariantMetrics", "collect", "p95"]


@dataclass
class VariantMetrics:
    """One variant's calls so far."""

    traces: set[str] = field(default_factory=set)
    errors: ArmStats = field(default_factory=ArmStats)
    latencies: list[float] = field(default_factory=list)
    cost: ArmStats = field(default_factory=ArmStats)
    primary: ArmStats = field(default_factory=ArmStats)
    # 1 for a call where a guard blocked, flagged or redacted something, else 0.
    guard_hits: ArmStats = field(default_factory=ArmStats)

    @property
    def latency(self) -> ArmStats:
        return ArmStats.of(self.latencies)

    def to_dict(self) -> dict[str, Any]:
        return {
            "primary": self.primary.to_dict(),
            "error": self.errors.to_dict(),
            "latency_ms": self.latency.to_dict(),
            "latency_p95": p95(self.latencies),
            "cost": self.cost.to_dict(),
            "guard_hits": self.guard_hits.to_dict(),
        }


def p95(values: list[float]) -> float | None:
    """The 95th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _failed(span: Any) -> bool:
    """A failed call, or one where a target failed before another answered (a fallback
    hides the failure from the caller, not from the guardrail)."""
    if span.status == "error":
        return True
    return any((attempt or {}).get("error") for attempt in span.attempts or [])


def _guard_hit(attributes: dict[str, Any]) -> bool:
    """A call where a guard found something: the gateway names the guards that did in
    ``flywheel.guard.flags`` (and the blocking one in ``flywheel.guard.blocked``)."""
    return bool(attributes.get("flywheel.guard.flags") or attributes.get("flywheel.guard.blocked"))


def collect(db: Database, experiment: dict[str, Any]) -> dict[str, VariantMetrics]:
    """Every variant's metrics since the experiment started (a variant without calls yet has
    empty stats)."""
    experiment_id = experiment["id"]
    project_id = experiment["project_id"]
    since = experiment["created_at"]
    shadow = experiment.get("mode") == "shadow"
    candidate = next(
        (v["name"] for v in experiment["variants"] if v["name"] != experiment["control"]), None
    )
    out: dict[str, VariantMetrics] = {v["name"]: VariantMetrics() for v in experiment["variants"]}
    variant_of: dict[str, str] = {}
    with db.session() as session:
        spans = session.execute(
            select(
                SpanRecord.trace_id,
                SpanRecord.status,
                SpanRecord.latency_ms,
                SpanRecord.cost,
                SpanRecord.attempts,
                SpanRecord.attributes,
            ).where(
                SpanRecord.project_id == project_id,
                SpanRecord.route == experiment["route"],
                SpanRecord.kind == "gateway.chat",
                SpanRecord.start_time >= since,
                # A cheap filter that both databases run on the JSON text; the exact check
                # on the parsed attributes follows.
                cast(SpanRecord.attributes, String).like(f"%{experiment_id}%"),
            )
        )
        for span in spans:
            attributes = span.attributes or {}
            if attributes.get(ATTR_EXPERIMENT) != experiment_id:
                continue
            name = str(attributes.get(ATTR_VARIANT))
            metrics = out.get(name)
            if metrics is None:
                continue
            if shadow and bool(attributes.get(ATTR_SHADOW)) != (name == candidate):
                continue  # a shadow experiment's candidate only answers mirrored copies
            variant_of[span.trace_id] = name
            metrics.traces.add(span.trace_id)
            metrics.errors = metrics.errors.add(1.0 if _failed(span) else 0.0)
            if span.status != "error" and span.latency_ms is not None:
                metrics.latencies.append(float(span.latency_ms))
            if span.cost is not None:
                metrics.cost = metrics.cost.add(float(span.cost))
            metrics.guard_hits = metrics.guard_hits.add(1.0 if _guard_hit(attributes) else 0.0)
        source = str(experiment["metric"]["source"])
        values: dict[str, list[float]] = defaultdict(list)
        if source == "feedback":
            rows = session.execute(
                select(Feedback.trace_id, Feedback.rating).where(
                    Feedback.project_id == project_id,
                    Feedback.created_at >= since,
                    Feedback.rating.is_not(None),
                )
            )
        else:
            rows = session.execute(
                select(TraceScore.trace_id, TraceScore.value).where(
                    TraceScore.project_id == project_id,
                    TraceScore.route == experiment["route"],
                    TraceScore.name == source.removeprefix("judge:"),
                    TraceScore.created_at >= since,
                )
            )
        for trace_id, value in rows:
            if trace_id in variant_of and value is not None:
                values[trace_id].append(float(value))
    for trace_id, found in values.items():
        # One value per trace: several ratings of one answer are one observation.
        out[variant_of[trace_id]].primary = out[variant_of[trace_id]].primary.add(
            math.fsum(found) / len(found)
        )
    return out
