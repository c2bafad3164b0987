"""The evaluator: looks at every running experiment, records the look, and decides.

At each look the guardrails come first (a breach rolls back at once, whatever the primary
metric says), then the mSPRT on the primary metric: a significant win promotes the
candidate, a significant loss rolls it back. A decision is claimed with a conditional UPDATE
(:meth:`ExperimentStore.transition`), so with several replicas only one acts on it.

Promoting a prompt variant moves the route's prompt label onto the variant's version through
the prompt registry, or, when that label is protected, requests the approval (the
experiment then waits in ``awaiting_approval``). Promoting a model variant applies a config
revision that makes the model the route's target. Rolling back is only the status change: a
finished experiment gets no more traffic, so the route serves as configured.

A shadow experiment never changes what is served: a win ends it ``finished`` with the
outcome ``recommend`` (the variant, the numbers), a loss or a breach ``finished`` with
``reject``.

Each tick also follows up what earlier decisions left: an experiment ``awaiting_approval``
becomes ``promoted`` once its approval request is approved (``rolled_back`` when it is
rejected or cancelled), and one left ``promoting`` for over :data:`STALE_PROMOTION`
seconds (its replica died mid-promotion) is taken over and its promotion finished: each
step checks what is already done before acting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from flywheel.config import FlywheelConfig
from flywheel.errors import ServiceError
from flywheel.experiments.metrics import VariantMetrics, collect, p95
from flywheel.experiments.stats import SequentialResult, sequential_test
from flywheel.experiments.store import ExperimentStore
from flywheel.prompts import PromptRegistry
from flywheel.security.approvals import ApprovalService
from flywheel.security.rbac import ALL_PERMISSIONS, Principal
from flywheel.store import Database

__all__ = ["ACTOR", "STALE_PROMOTION", "ExperimentEvaluator", "guardrail_breach"]

log = logging.getLogger("flywheel.experiments")
ACTOR = "system:experiments"
# (caller, config YAML, source) -> {"revision": ...}: ConfigService.apply.
ApplyConfig = Callable[[Principal, str, str], dict[str, Any]]
# A promotion takes well under a second; one "promoting" this long lost its replica.
STALE_PROMOTION = 60.0


def _system(project_id: str) -> Principal:
    """Who the evaluator acts as in a project: it requests approvals and applies config
    revisions, and the audit log names it ``key:experiments``."""
    return Principal(
        kind="key",
        id="experiments",
        name="experiments",
        project_id=project_id,
        role="admin",
        permissions=ALL_PERMISSIONS,
    )


def guardrail_breach(
    guardrails: dict[str, Any], control: VariantMetrics, candidate: VariantMetrics
) -> str | None:
    """Why the candidate breaches a guardrail against the control, or None (also None until
    both arms have ``min_samples`` calls)."""
    needed = int(guardrails.get("min_samples") or 1)
    if control.errors.n < needed or candidate.errors.n < needed:
        return None
    limit = guardrails.get("max_error_rate_increase")
    control_rate, candidate_rate = control.errors.mean or 0.0, candidate.errors.mean or 0.0
    if limit is not None and candidate_rate - control_rate > limit:
        return (
            f"error rate {candidate_rate:.1%} against the control's {control_rate:.1%} "
            f"(allowed: +{limit:.1%})"
        )
    ratio = guardrails.get("max_latency_p95_ratio")
    control_p95, candidate_p95 = (
        p95(control.latencies),
        p95(candidate.latencies),
    )
    slack = float(guardrails.get("min_latency_increase_ms") or 0.0)
    slower = (
        control_p95 is not None
        and candidate_p95 is not None
        and candidate_p95 > (ratio or 0) * control_p95
        and candidate_p95 - control_p95 > slack
    )
    if ratio is not None and slower:
        return (
            f"p95 latency {candidate_p95:.0f} ms against the control's {control_p95:.0f} ms "
            f"(allowed: {ratio:g}x)"
        )
    ratio = guardrails.get("max_cost_ratio")
    control_cost, candidate_cost = control.cost.mean, candidate.cost.mean
    if (
        ratio is not None
        and control_cost
        and candidate_cost
        and candidate_cost > ratio * control_cost
    ):
        return (
            f"mean cost ${candidate_cost:.6f} against the control's ${control_cost:.6f} "
            f"(allowed: {ratio:g}x)"
        )
    limit = guardrails.get("max_guard_hit_rate_increase")
    control_hits, candidate_hits = control.guard_hits.mean or 0.0, candidate.guard_hits.mean or 0.0
    if limit is not None and candidate_hits - control_hits > limit:
        return (
            f"guard hit rate {candidate_hits:.1%} against the control's {control_hits:.1%} "
            f"(allowed: +{limit:.1%})"
        )
    return None


@dataclass
class ExperimentEvaluator:
    """Looks at the running experiments; :meth:`tick` is called every few seconds."""

    db: Database
    store: ExperimentStore
    prompts: PromptRegistry
    approvals: ApprovalService
    apply_config: ApplyConfig
    running_config: Callable[[], FlywheelConfig]
    # Two replicas ticking together record one look: a look younger than this is enough.
    min_look_gap: float = 0.5
    stale_promotion: float = STALE_PROMOTION

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Look at every running experiment, follow up the ones awaiting an approval or left
        promoting; returns the decisions made (not "continue")."""
        self.store.refresh()
        decided = []
        clock = time.time() if now is None else now
        steps: list[tuple[Callable[[dict[str, Any]], dict[str, Any] | None], str, float | None]]
        steps = [
            (lambda e: self.look(e, now), "running", None),
            (self.follow_approval, "awaiting_approval", None),
            (self.recover, "promoting", clock - self.stale_promotion),
        ]
        for step, status, before in steps:
            for experiment in self.store.with_status(status, before):
                try:
                    found = step(experiment)
                except Exception:
                    log.exception("experiment %s: the %s step failed", experiment["id"], status)
                    continue
                if found is not None:
                    decided.append(found)
        return decided

    def look(self, experiment: dict[str, Any], now: float | None = None) -> dict[str, Any] | None:
        """One look: metrics, guardrails, the sequential test, the look recorded, and the
        decision acted on; returns the decision unless it is to continue."""
        now = time.time() if now is None else now
        previous = self.store.last_look(experiment["id"])
        if previous is not None and now - previous["at"] < self.min_look_gap:
            return None
        control_name = experiment["control"]
        candidate_name = next(
            v["name"] for v in experiment["variants"] if v["name"] != control_name
        )
        arms = collect(self.db, experiment)
        control, candidate = arms[control_name], arms[candidate_name]
        breach = guardrail_breach(experiment["guardrails"] or {}, control, candidate)
        result = sequential_test(
            control.primary,
            candidate.primary,
            alpha=experiment["alpha"],
            tau=experiment["tau"],
            min_samples=experiment["min_samples"],
            higher_is_better=bool(experiment["metric"].get("higher_is_better", True)),
            previous_p=previous["p_value"] if previous is not None else 1.0,
        )
        decision = "breach" if breach is not None else result.decision
        self.store.record_look(
            experiment["id"],
            {
                "at": now,
                "arms": {name: metrics.to_dict() for name, metrics in arms.items()},
                "p_value": result.p_value,
                "ci_low": result.ci_low,
                "ci_high": result.ci_high,
                "decision": decision,
            },
        )
        if decision == "continue":
            return None
        summary = self._summary(result)
        if experiment.get("mode") == "shadow":
            return self._finish_shadow(experiment, candidate_name, decision, breach, summary)
        if breach is not None:
            reason = f"guardrail breached by '{candidate_name}': {breach}"
            return self._roll_back(experiment, reason, decision, summary)
        if decision == "loss":
            reason = f"'{candidate_name}' is significantly worse than '{control_name}' ({summary})"
            return self._roll_back(experiment, reason, decision, summary)
        return self._promote(experiment, candidate_name, summary)

    @staticmethod
    def _summary(result: SequentialResult) -> str:
        delta = result.delta or 0.0
        return (
            f"delta {delta:+.3f}, CI [{result.ci_low or 0.0:+.3f}, {result.ci_high or 0.0:+.3f}], "
            f"p {result.p_value:.4f}, n {result.control_n}/{result.candidate_n}"
        )

    def _finish_shadow(
        self,
        experiment: dict[str, Any],
        candidate: str,
        decision: str,
        breach: str | None,
        summary: str,
    ) -> dict[str, Any] | None:
        """A shadow experiment's decision: it recommends the candidate or rejects it;
        nothing served changes (promoting it is a person's call, or a canary's)."""
        control = experiment["control"]
        if decision == "win":
            action = "recommend"
            reason = f"'{candidate}' would win against '{control}' ({summary}); recommended"
        elif breach is not None:
            action = "reject"
            reason = f"guardrail breached by '{candidate}': {breach}"
        else:
            action = "reject"
            reason = f"'{candidate}' is significantly worse than '{control}' ({summary})"
        outcome = {"action": action, "variant": candidate, "decision": decision, "summary": summary}
        if not self.store.transition(experiment["id"], "finished", reason, ACTOR, outcome):
            return None
        log.warning("shadow experiment %s finished: %s", experiment["id"], reason)
        return {"id": experiment["id"], "status": "finished", "reason": reason, "outcome": outcome}

    def _roll_back(
        self, experiment: dict[str, Any], reason: str, decision: str, summary: str
    ) -> dict[str, Any] | None:
        outcome = {"action": "rollback", "decision": decision, "summary": summary}
        if not self.store.transition(experiment["id"], "rolled_back", reason, ACTOR, outcome):
            return None
        log.warning("experiment %s rolled back: %s", experiment["id"], reason)
        return {"id": experiment["id"], "status": "rolled_back", "reason": reason}

    def _promote(
        self, experiment: dict[str, Any], variant_name: str, summary: str
    ) -> dict[str, Any] | None:
        reason = f"'{variant_name}' won ({summary})"
        outcome: dict[str, Any] = {"action": "promote", "variant": variant_name, "summary": summary}
        # Claimed first: only the replica whose UPDATE took it acts; "promoting" until done.
        if not self.store.transition(experiment["id"], "promoting", reason, ACTOR, outcome):
            return None
        return self._act(experiment, variant_name, reason, outcome)

    def _act(
        self, experiment: dict[str, Any], variant_name: str, reason: str, outcome: dict[str, Any]
    ) -> dict[str, Any]:
        """Carry out a claimed promotion. Each step checks first whether it is done already
        (the label on the version, an approval pending, the route on the model), so a
        promotion that a dead replica left half done is finished, never done twice."""
        variant = next(v for v in experiment["variants"] if v["name"] == variant_name)
        label = None
        if variant.get("prompt"):
            label = self._route_label(experiment, variant["prompt"].partition("@")[0])
        protected = label is not None and self.prompts.is_protected(label)
        status = "awaiting_approval" if protected else "promoted"
        caller = _system(experiment["project_id"])
        project_id = experiment["project_id"]
        try:
            if variant.get("prompt"):
                name, _, version = variant["prompt"].partition("@")
                if label is None:
                    raise ServiceError(
                        409, f"Route '{experiment['route']}' no longer targets a label of '{name}'."
                    )
                if self._label_version(project_id, name, label) == int(version):
                    status = "promoted"  # moved already (approved, or by the lost replica)
                elif protected:
                    pending = self._pending_approval(project_id, name, int(version), label)
                    if pending is None:
                        pending = self.approvals.request(
                            caller,
                            "prompt",
                            name,
                            int(version),
                            label,
                            comment=(
                                f"Experiment '{experiment['name']}' ({experiment['id']}): {reason}"
                            ),
                        )
                    outcome["approval_id"] = pending["id"]
                else:
                    self.prompts.set_label(project_id, name, label, int(version), caller.actor)
                outcome["label"] = label
            if variant.get("model"):
                revision = self._serve_model(experiment, variant["model"], caller)
                if revision is not None or "revision" not in outcome:
                    outcome["revision"] = revision
        except ServiceError as exc:
            reason = f"{reason}; promoting failed: {exc.message}"
            self.store.amend(experiment["id"], "stopped", reason, {**outcome, "error": exc.message})
            log.error("experiment %s: %s", experiment["id"], reason)
            return {"id": experiment["id"], "status": "stopped", "reason": reason}
        self.store.amend(experiment["id"], status, reason, outcome)
        log.warning("experiment %s %s: %s", experiment["id"], status, reason)
        return {"id": experiment["id"], "status": status, "reason": reason, "outcome": outcome}

    def follow_approval(self, experiment: dict[str, Any]) -> dict[str, Any] | None:
        """An experiment awaiting its approval: ``promoted`` once the request is approved
        (the approval moved the label), ``rolled_back`` once it is rejected or cancelled."""
        approval_id = (experiment.get("outcome") or {}).get("approval_id")
        if not approval_id:
            return None
        try:
            approval = self.approvals.get(experiment["project_id"], approval_id)
        except ServiceError:
            approval = {"status": "deleted", "decided_by": None}
        state = approval.get("status")
        if state == "pending":
            return None
        who = f" by {approval['decided_by']}" if approval.get("decided_by") else ""
        outcome = {**(experiment.get("outcome") or {}), "approval_status": state}
        if state == "approved":
            status, reason = (
                "promoted",
                f"{experiment['reason']}; approval {approval_id} approved{who}",
            )
        else:
            status = "rolled_back"
            reason = f"approval {approval_id} was {state}{who}: the label was not moved"
            outcome["action"] = "rollback"
        changed = self.store.transition(
            experiment["id"], status, reason, ACTOR, outcome, from_status="awaiting_approval"
        )
        if not changed:
            return None
        log.warning("experiment %s %s: %s", experiment["id"], status, reason)
        return {"id": experiment["id"], "status": status, "reason": reason, "outcome": outcome}

    def recover(self, experiment: dict[str, Any]) -> dict[str, Any] | None:
        """An experiment left ``promoting`` (its replica died mid-promotion): claimed by one
        replica, which finishes the promotion (checking each step first), or stops it with
        the reason when that fails."""
        if not self.store.claim(experiment["id"], "promoting", experiment["decided_at"]):
            return None
        outcome = dict(experiment.get("outcome") or {})
        variant = outcome.get("variant")
        if variant not in {v["name"] for v in experiment["variants"]}:
            reason = "stopped: left promoting by a replica that stopped, with no variant to promote"
            self.store.amend(experiment["id"], "stopped", reason, {**outcome, "action": "stop"})
            return {"id": experiment["id"], "status": "stopped", "reason": reason}
        log.warning("experiment %s: finishing a promotion left half done", experiment["id"])
        reason = f"{experiment.get('reason') or ''} (promotion resumed after a replica stopped)"
        return self._act(experiment, str(variant), reason.strip(), {**outcome, "resumed": True})

    def _label_version(self, project_id: str, name: str, label: str) -> int | None:
        """The version ``name@label`` points at, or None."""
        try:
            return int(self.prompts.get(project_id, name, label).version)
        except ServiceError:
            return None

    def _pending_approval(
        self, project_id: str, name: str, version: int, label: str
    ) -> dict[str, Any] | None:
        """A pending approval request for ``name@version`` onto ``label``, if one exists."""
        for found in self.approvals.list_requests(project_id, "pending"):
            if (found["resource_type"], found["name"], found["version"], found["label"]) == (
                "prompt",
                name,
                version,
                label,
            ):
                return found
        return None

    def _route_label(self, experiment: dict[str, Any], prompt: str) -> str | None:
        """The label of ``prompt`` the route serves (``greeter@production`` -> production)."""
        route = next(
            (r for r in self.running_config().routes if r.name == experiment["route"]), None
        )
        for target in route.targets if route is not None else []:
            name, _, selector = (target.prompt or "").partition("@")
            if name == prompt and selector and not selector.isdigit():
                return selector
        return None

    def _serve_model(self, experiment: dict[str, Any], model: str, caller: Principal) -> Any:
        """A config revision whose route targets the winning model (fallbacks, retries and
        the rest of the route unchanged)."""
        routes = self.running_config().instance_document().get("routes", [])
        for route in routes:
            if route["name"] == experiment["route"]:
                if route.get("targets") == [{"model": model}]:
                    return None  # served already (a promotion resumed after its revision)
                route["targets"] = [{"model": model}]
                break
        else:
            raise ServiceError(409, f"Route '{experiment['route']}' is no longer configured.")
        text = yaml.safe_dump({"routes": routes}, sort_keys=False, allow_unicode=True)
        applied = self.apply_config(caller, text, f"experiment {experiment['id']}")
        return applied.get("revision")
