"""Experiments as stored: create (checked against the running config and the prompts), list,
show with the looks history, stop, and the status transitions the evaluator makes.

Every transition is a conditional UPDATE (``WHERE status = 'running'``): with several
replicas looking at the same experiment, exactly one of them decides it and acts. The
running experiments are also kept in memory for the gateway (:meth:`ExperimentStore.assign`
is on every chat call's path), refreshed at every evaluator tick and after every change made
through this replica.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select, update

from flywheel.config import FlywheelConfig
from flywheel.errors import ServiceError
from flywheel.experiments.assignment import assign
from flywheel.experiments.spec import ExperimentSpec
from flywheel.security.audit import AuditLog
from flywheel.store import Database
from flywheel.store.models import Experiment, ExperimentLook

__all__ = [
    "ATTR_EXPERIMENT",
    "ATTR_SHADOW",
    "ATTR_VARIANT",
    "Assignment",
    "ExperimentError",
    "ExperimentStore",
    "experiment_to_dict",
]

# "finished": a shadow experiment decided (it recommends or rejects; it never serves).
STATUSES = (
    "running",
    "promoting",
    "awaiting_approval",
    "promoted",
    "rolled_back",
    "stopped",
    "finished",
)
# The span attributes that say which experiment and variant served a call, and (true) that
# the call was a shadow experiment's mirrored copy, answered but never returned.
ATTR_EXPERIMENT = "flywheel.experiment"
ATTR_VARIANT = "flywheel.experiment.variant"
ATTR_SHADOW = "flywheel.shadow"
MAX_LOOKS_SHOWN = 2000


class ExperimentError(ServiceError):
    """A refused experiment operation."""


@dataclass(frozen=True)
class Assignment:
    """The variant a call was assigned to, and what it changes about the call.

    In a shadow experiment the call is always served by the control; ``mirror`` is the
    candidate (``shadow`` set) when the call's unit falls in the candidate's share: the
    gateway then sends it a copy of the call in the background."""

    experiment_id: str
    variant: str
    prompt: str | None
    model: str | None
    shadow: bool = False
    mirror: Assignment | None = None

    @property
    def attributes(self) -> dict[str, Any]:
        found: dict[str, Any] = {ATTR_EXPERIMENT: self.experiment_id, ATTR_VARIANT: self.variant}
        if self.shadow:
            found[ATTR_SHADOW] = True
        return found


@dataclass(frozen=True)
class _Active:
    """A running experiment as the gateway needs it."""

    id: str
    header: str | None
    allocation: tuple[tuple[str, float], ...]
    variants: Mapping[str, Assignment]
    mode: str = "canary"
    control: str = ""


def experiment_to_dict(row: Experiment) -> dict[str, Any]:
    return {
        "id": row.id,
        "project_id": row.project_id,
        "route": row.route,
        "name": row.name,
        "status": row.status,
        "mode": row.mode or "canary",
        "variants": row.variants,
        "control": row.control,
        "unit": row.unit,
        "metric": row.primary_metric,
        "guardrails": row.guardrails,
        "alpha": row.alpha,
        "tau": row.tau,
        "min_samples": row.min_samples,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "decided_at": row.decided_at,
        "decided_by": row.decided_by,
        "reason": row.reason,
        "outcome": row.outcome,
    }


def look_to_dict(row: ExperimentLook) -> dict[str, Any]:
    return {
        "at": row.at,
        "arms": row.arms,
        "p_value": row.p_value,
        "ci_low": row.ci_low,
        "ci_high": row.ci_high,
        "decision": row.decision,
    }


def _bad(message: str, param: str) -> ExperimentError:
    return ExperimentError(400, message, "invalid_value", param)


def _header_of(unit: str) -> str | None:
    if unit == "session":
        return "x-flywheel-session"
    if unit.startswith("header:"):
        return unit.removeprefix("header:").lower()
    return None


def _active(row: Experiment) -> _Active:
    variants = {
        v["name"]: Assignment(row.id, v["name"], v.get("prompt"), v.get("model"))
        for v in row.variants
    }
    allocation = tuple((v["name"], float(v["share"])) for v in row.variants)
    return _Active(
        row.id, _header_of(row.unit), allocation, variants, row.mode or "canary", row.control
    )


class ExperimentStore:
    """The ``experiments`` and ``experiment_looks`` tables, and the running ones in memory."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit
        # (project, route) -> the running experiment there; replaced whole on refresh.
        self._running: dict[tuple[str, str], _Active] = {}
        self._rng = random.Random()

    # -- the gateway's side ------------------------------------------------------------------

    def refresh(self) -> None:
        """Reload the running experiments (every tick, and after a change made here)."""
        with self.db.session() as session:
            rows = session.scalars(select(Experiment).where(Experiment.status == "running"))
            self._running = {(r.project_id, r.route): _active(r) for r in rows}

    def assign(
        self, project_id: str, route: str, user: str | None, headers: Mapping[str, str] | None
    ) -> Assignment | None:
        """The variant of the running experiment on ``route`` this call belongs to: sticky by
        the experiment's unit; a call without one gets a random variant."""
        active = self._running.get((project_id, route))
        if active is None:
            return None
        unit = user if active.header is None else (headers or {}).get(active.header)
        if not unit:
            unit = uuid.UUID(int=self._rng.getrandbits(128)).hex
        picked = active.variants[assign(active.id, unit, active.allocation)]
        if active.mode != "shadow":
            return picked
        control = active.variants[active.control]
        if picked.variant == control.variant:
            return control
        # Served by the control; the candidate answers a mirrored copy.
        return replace(control, mirror=replace(picked, shadow=True))

    # -- create, read, stop ------------------------------------------------------------------

    def _check(
        self,
        project_id: str,
        spec: ExperimentSpec,
        config: FlywheelConfig,
        prompt_version: Any,
    ) -> None:
        """The spec against the running config and the prompts (a 400 naming the field)."""
        route = next((r for r in config.routes if r.name == spec.route), None)
        if route is None:
            known = ", ".join(r.name for r in config.routes) or "none"
            raise _bad(f"No route '{spec.route}' in the running config; routes: {known}.", "route")
        if route.pipeline is not None:
            raise _bad(f"Route '{spec.route}' runs a pipeline; it has no variants.", "route")
        catalog = {m.name: m for m in config.models}
        prompt_targets = {}
        for target in route.targets:
            if target.prompt is not None:
                name, _, selector = target.prompt.partition("@")
                prompt_targets[name] = selector
        for index, variant in enumerate(spec.variants):
            where = f"variants.{index}"
            if variant.prompt is not None:
                name, _, version = variant.prompt.partition("@")
                if name not in prompt_targets:
                    raise _bad(
                        f"Route '{spec.route}' does not serve prompt '{name}': a prompt variant "
                        "is another version of a prompt the route targets.",
                        f"{where}.prompt",
                    )
                if not prompt_targets[name] or prompt_targets[name].isdigit():
                    raise _bad(
                        f"Route '{spec.route}' pins prompt '{name}' to a version; it must "
                        "target a label for a winning version to be promoted.",
                        f"{where}.prompt",
                    )
                try:
                    prompt_version(project_id, name, int(version))
                except ServiceError as exc:
                    raise _bad(exc.message, f"{where}.prompt") from None
            if variant.model is not None:
                model = catalog.get(variant.model)
                if model is None or model.status == "blocked" or model.kind != "chat":
                    raise _bad(
                        f"'{variant.model}' is no chat model of the catalog that may be called.",
                        f"{where}.model",
                    )
                if route.prompt_targets:
                    raise _bad(
                        f"Route '{spec.route}' routes to prompts, whose versions pick the model: "
                        "test a prompt version instead.",
                        f"{where}.model",
                    )
                if route.production and model.status != "approved":
                    raise _bad(
                        f"Production route '{spec.route}' may only use approved models; "
                        f"'{model.name}' is {model.status}.",
                        f"{where}.model",
                    )
        if spec.candidate.prompt is None and spec.candidate.model is None:
            raise _bad(
                "The candidate variant must change something: a prompt version or a model.",
                "variants",
            )

    def create(
        self,
        project_id: str,
        actor: str,
        spec: ExperimentSpec,
        config: FlywheelConfig,
        prompt_version: Any,
    ) -> dict[str, Any]:
        """Start an experiment on a route (one running experiment per route)."""
        spec.check()
        self._check(project_id, spec, config, prompt_version)
        with self.db.session() as session:
            running = session.scalar(
                select(Experiment.id).where(
                    Experiment.project_id == project_id,
                    Experiment.route == spec.route,
                    Experiment.status == "running",
                )
            )
            if running is not None:
                raise ExperimentError(
                    409,
                    f"Experiment {running} is already running on route '{spec.route}'; stop "
                    "it first.",
                    "conflict",
                    "route",
                )
            row = Experiment(
                id=uuid.uuid4().hex,
                project_id=project_id,
                route=spec.route,
                name=spec.name,
                status="running",
                mode=spec.mode,
                variants=[v.model_dump() for v in spec.variants],
                control=spec.control,
                unit=spec.unit,
                primary_metric=spec.metric.model_dump(),
                guardrails=spec.guardrails.model_dump(),
                alpha=spec.alpha,
                tau=spec.tau,
                min_samples=spec.min_samples,
                created_at=time.time(),
                created_by=actor,
            )
            session.add(row)
            session.flush()
            found = experiment_to_dict(row)
            self.audit.record(
                actor=actor,
                action="experiment.create",
                resource_type="experiment",
                resource_id=row.id,
                project_id=project_id,
                after=found,
                session=session,
            )
        self.refresh()
        return found

    def list_experiments(self, project_id: str, status: str | None = None) -> list[dict[str, Any]]:
        """The project's experiments, newest first."""
        if status is not None and status not in STATUSES:
            raise _bad(f"Unknown status '{status}'; statuses: {', '.join(STATUSES)}.", "status")
        query = select(Experiment).where(Experiment.project_id == project_id)
        if status is not None:
            query = query.where(Experiment.status == status)
        with self.db.session() as session:
            rows = session.scalars(query.order_by(Experiment.created_at.desc()))
            return [experiment_to_dict(r) for r in rows]

    def _row(self, session: Any, project_id: str, experiment_id: str) -> Experiment:
        row = session.get(Experiment, experiment_id)
        if row is None or row.project_id != project_id:
            raise ExperimentError(404, f"No experiment '{experiment_id}'.", "not_found")
        return row

    def get(self, project_id: str, experiment_id: str) -> dict[str, Any]:
        """One experiment with its looks, oldest first (the history the charts draw)."""
        with self.db.session() as session:
            found = experiment_to_dict(self._row(session, project_id, experiment_id))
            looks = session.scalars(
                select(ExperimentLook)
                .where(ExperimentLook.experiment_id == experiment_id)
                .order_by(ExperimentLook.at.desc(), ExperimentLook.id.desc())
                .limit(MAX_LOOKS_SHOWN)
            )
            found["looks"] = [look_to_dict(look) for look in reversed(list(looks))]
        return found

    def stop(self, project_id: str, experiment_id: str, actor: str) -> dict[str, Any]:
        """Stop a running experiment by hand: all traffic goes back to the route as
        configured, and nothing is promoted."""
        with self.db.session() as session:
            self._row(session, project_id, experiment_id)
        changed = self.transition(
            experiment_id, "stopped", f"stopped by {actor}", actor, {"action": "stop"}
        )
        if not changed:
            current = self.get(project_id, experiment_id)
            raise ExperimentError(
                409,
                f"Experiment {experiment_id} is {current['status']}, not running.",
                "conflict",
            )
        return self.get(project_id, experiment_id)

    # -- the evaluator's side ----------------------------------------------------------------

    def running(self) -> list[dict[str, Any]]:
        """Every running experiment, of every project."""
        return self.with_status("running")

    def with_status(self, status: str, decided_before: float | None = None) -> list[dict[str, Any]]:
        """Every experiment in ``status``, of every project (decided before a time: the
        promotions a replica left half done)."""
        query = select(Experiment).where(Experiment.status == status)
        if decided_before is not None:
            query = query.where(Experiment.decided_at < decided_before)
        with self.db.session() as session:
            return [experiment_to_dict(r) for r in session.scalars(query)]

    def claim(self, experiment_id: str, status: str, decided_at: float | None) -> bool:
        """Take over an experiment left in ``status`` since ``decided_at``: True for the one
        replica whose conditional UPDATE moved its ``decided_at`` to now."""
        with self.db.session() as session:
            result = session.execute(
                update(Experiment)
                .where(
                    Experiment.id == experiment_id,
                    Experiment.status == status,
                    Experiment.decided_at == decided_at,
                )
                .values(decided_at=time.time())
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def last_look(self, experiment_id: str) -> dict[str, Any] | None:
        with self.db.session() as session:
            row = session.scalar(
                select(ExperimentLook)
                .where(ExperimentLook.experiment_id == experiment_id)
                .order_by(ExperimentLook.at.desc(), ExperimentLook.id.desc())
                .limit(1)
            )
            return None if row is None else look_to_dict(row)

    def record_look(self, experiment_id: str, look: dict[str, Any]) -> None:
        with self.db.session() as session:
            session.add(ExperimentLook(experiment_id=experiment_id, **look))

    def transition(
        self,
        experiment_id: str,
        status: str,
        reason: str,
        actor: str,
        outcome: dict[str, Any],
        from_status: str = "running",
    ) -> bool:
        """Move an experiment from ``from_status`` (running) to ``status``, audited; False
        when it was no longer there (another replica, or a person, decided it first)."""
        now = time.time()
        with self.db.session() as session:
            result = session.execute(
                update(Experiment)
                .where(Experiment.id == experiment_id, Experiment.status == from_status)
                .values(
                    status=status,
                    reason=reason,
                    decided_at=now,
                    decided_by=actor,
                    outcome=outcome,
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            row = session.get(Experiment, experiment_id)
            assert row is not None
            self.audit.record(
                actor=actor,
                action=f"experiment.{status}",
                resource_type="experiment",
                resource_id=experiment_id,
                project_id=row.project_id,
                before={"status": from_status},
                after={"status": status, "reason": reason, "outcome": outcome},
                session=session,
            )
        self.refresh()
        return True

    def amend(self, experiment_id: str, status: str, reason: str, outcome: dict[str, Any]) -> None:
        """Record what acting on a decision did (or that it failed), audited."""
        with self.db.session() as session:
            row = session.get(Experiment, experiment_id)
            if row is None:
                return
            before = {"status": row.status, "outcome": row.outcome}
            row.status, row.reason, row.outcome = status, reason, outcome
            self.audit.record(
                actor="system:experiments",
                action=f"experiment.{status}",
                resource_type="experiment",
                resource_id=experiment_id,
                project_id=row.project_id,
                before=before,
                after={"status": status, "reason": reason, "outcome": outcome},
                session=session,
            )
