"""The driver: moves every active loop along, one step at a time, each step a job.

At every tick, for each loop that is running or waiting:

- a pending step gets its job (``loop.step`` for the loop's own steps, ``tune.sft`` /
  ``tune.dpo`` to train, ``merge`` to register a servable version);
- a finished job's result is stored on its step and the loop goes on (or ends: not enough
  corrected answers, a failed gate, a rejected approval, the canary's verdict);
- a failed or cancelled job fails the loop at that step (``resume`` runs it again); a job
  whose worker died (orphaned, e.g. a restart) is retried on its own, up to
  ``MAX_AUTO_RETRIES`` times;
- the approval step waits for the reviewer's decision, the decision step for the canary
  experiment to end.

Every replica runs a driver; each change is a compare-and-set on the loop's revision, so one
replica acts and the others see the new state at their next tick.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flywheel.errors import ServiceError
from flywheel.loop.spec import STEPS, LoopSpec
from flywheel.loop.steps import ACTOR, KIND, loop_principal
from flywheel.loop.store import LoopStore, step_states

__all__ = ["MAX_AUTO_RETRIES", "LoopDriver"]

log = logging.getLogger("flywheel.loop")
MAX_AUTO_RETRIES = 2
# (project_id, kind, params, actor, name, author_id) -> the job
SubmitJob = Callable[..., dict[str, Any]]
ENDED_EXPERIMENT = ("promoted", "rolled_back", "stopped", "finished")


@dataclass
class LoopDriver:
    """Advances loops; :meth:`tick` is called every few seconds by each replica."""

    loops: LoopStore
    jobs: Any  # JobStore
    submit_job: SubmitJob
    approvals: Any  # ApprovalService
    experiments: Any  # ExperimentStore

    def tick(self) -> None:
        for loop_id in self.loops.active_ids():
            try:
                self.advance(loop_id)
            except Exception:
                log.exception("loop %s: the driver failed", loop_id)

    def advance(self, loop_id: str) -> None:
        """Take the loop one move further, if it can move now."""
        loop = self.loops.load(loop_id)
        if loop["status"] not in ("running", "waiting"):
            return
        steps = step_states(loop)
        name = loop["step"]
        state = steps[name]
        if state["status"] == "pending":
            if name == "decision" and not self._canary_over(loop, steps):
                return
            self._start(loop, steps, name)
        elif state["status"] == "running":
            self._follow(loop, steps, name)
        elif state["status"] == "waiting" and name == "approval":
            self._await_approval(loop, steps)

    # -- submitting ---------------------------------------------------------------------------

    def _job_request(
        self, loop: dict[str, Any], steps: dict[str, Any], name: str
    ) -> tuple[str, dict[str, Any]]:
        spec = LoopSpec.model_validate(loop["spec"])
        if name == "train":
            found = steps["collect"]["result"] or {}
            params = {
                "base": found["base"],
                "dataset": steps["dataset"]["result"]["dataset"],
                "settings": spec.train,
                "register": f"{spec.registry_name}-adapter",
                "experiment": f"loop-{spec.route}",
            }
            return f"tune.{spec.method}", params
        if name == "register":
            # No before/after loss measurement here: the gate that follows evaluates the
            # merged model itself, and measuring would double the step's time.
            return "merge", {
                "model": steps["train"]["result"]["model"],
                "register": spec.registry_name,
            }
        return KIND, {"loop_id": loop["id"], "step": name}

    def _start(self, loop: dict[str, Any], steps: dict[str, Any], name: str) -> None:
        kind, params = self._job_request(loop, steps, name)
        state = steps[name]
        try:
            job = self.submit_job(
                loop["project_id"],
                kind,
                params,
                loop["created_by"],
                name=f"loop {loop['route']}: {name}",
                author_id=loop["author_id"],
            )
        except ServiceError as exc:
            state.update(status="failed", error=exc.message, finished_at=time.time())
            self.loops.save(
                loop,
                status="failed",
                steps=steps,
                reason=f"{name}: {exc.message}",
                action="loop.step.fail",
                audit_after={"error": exc.message},
            )
            return
        state.update(
            status="running",
            job_id=job["id"],
            jobs=[*state.get("jobs", []), job["id"]],
            attempts=state.get("attempts", 0) + 1,
            started_at=state.get("started_at") or time.time(),
            error=None,
        )
        if not self.loops.save(
            loop,
            status="running",
            steps=steps,
            action="loop.step.start",
            audit_after={"job_id": job["id"], "kind": kind},
        ):
            # Another replica moved the loop first: this job is not the loop's; stop it.
            self.jobs.cancel(loop["project_id"], job["id"], ACTOR)

    # -- following ---------------------------------------------------------------------------

    def _follow(self, loop: dict[str, Any], steps: dict[str, Any], name: str) -> None:
        state = steps[name]
        job = self.jobs.get(loop["project_id"], state["job_id"])
        status = job["status"]
        if status in ("queued", "running"):
            return
        now = time.time()
        if status == "orphaned" and state.get("attempts", 0) <= MAX_AUTO_RETRIES:
            state.update(status="pending", job_id=None, error=f"job {job['id']} orphaned")
            self.loops.save(
                loop, steps=steps, action="loop.step.retry", audit_after={"job_id": job["id"]}
            )
            return
        if status != "succeeded":
            error = job.get("error") or f"job {job['id']} {status}"
            state.update(status="failed", error=error, finished_at=now)
            self.loops.save(
                loop,
                status="failed",
                steps=steps,
                reason=f"{name}: {error}",
                action="loop.step.fail",
                audit_after={"job_id": job["id"], "error": error},
            )
            return
        result = dict(job.get("result") or {})
        state.update(status="succeeded", result=result, finished_at=now, error=None)
        self._after(loop, steps, name, result)

    def _after(
        self, loop: dict[str, Any], steps: dict[str, Any], name: str, result: dict[str, Any]
    ) -> None:
        """What a step's result means for the loop: the next step, a wait, or the end."""
        end: tuple[str, str] | None = None
        if name == "collect" and not result.get("enough"):
            end = (
                "not_enough_data",
                f"{result.get('corrected', 0)} bad answers with a correction; "
                f"{result.get('needed')} needed",
            )
        elif name == "train" and not result.get("model"):
            end = ("failed", "training registered no model (cancelled?)")
        elif name == "gate" and not result.get("passed"):
            end = ("gate_failed", f"eval gate: {result.get('summary')}")
        elif name == "decision":
            end = (str(result["outcome"]), str(result.get("reason") or ""))
        if end is not None:
            status, reason = end
            self.loops.save(
                loop,
                status=status,
                steps=steps,
                reason=reason,
                action=f"loop.{status}",
                audit_after={"step": name},
            )
            return
        if name == "approval" and result.get("approval_id"):
            steps[name]["status"] = "waiting"
            self.loops.save(
                loop,
                status="waiting",
                steps=steps,
                reason=f"waiting for approval {result['approval_id']}",
                action="loop.step.done",
                audit_after={"step": name, "approval_id": result["approval_id"]},
            )
            return
        following = STEPS[STEPS.index(name) + 1]
        waiting = following == "decision"
        self.loops.save(
            loop,
            status="waiting" if waiting else "running",
            step=following,
            steps=steps,
            reason=(f"canary experiment {result.get('experiment_id')} running" if waiting else ""),
            action="loop.step.done",
            audit_after={"step": name},
        )

    # -- waiting ------------------------------------------------------------------------------

    def _await_approval(self, loop: dict[str, Any], steps: dict[str, Any]) -> None:
        state = steps["approval"]
        approval_id = state["result"]["approval_id"]
        found = self.approvals.get(loop["project_id"], approval_id)
        if found["status"] == "pending":
            return
        now = time.time()
        if found["status"] == "approved":
            state.update(
                status="succeeded",
                finished_at=now,
                result={**state["result"], "approved_by": found.get("decided_by")},
            )
            self.loops.save(
                loop,
                status="running",
                step="canary",
                steps=steps,
                reason="",
                action="loop.step.done",
                audit_after={"step": "approval", "approved_by": found.get("decided_by")},
            )
            return
        state.update(status="failed", finished_at=now, error=f"approval {found['status']}")
        self.loops.save(
            loop,
            status="rejected",
            steps=steps,
            reason=f"approval {approval_id} {found['status']} by {found.get('decided_by')}",
            action="loop.rejected",
        )

    def _canary_over(self, loop: dict[str, Any], steps: dict[str, Any]) -> bool:
        experiment_id = (steps["canary"]["result"] or {}).get("experiment_id")
        experiment = self.experiments.get(loop["project_id"], experiment_id)
        return experiment["status"] in ENDED_EXPERIMENT

    # -- cancelling ---------------------------------------------------------------------------

    def cancel(self, project_id: str, loop_id: str, actor: str) -> dict[str, Any]:
        """Cancel a loop and what it has under way: its step's job, its pending approval
        request, its running canary experiment."""
        loop = self.loops.cancel(project_id, loop_id, actor)
        for step in loop["steps"]:
            if step["status"] == "running" and step.get("job_id"):
                with contextlib.suppress(ServiceError):  # it may have ended meanwhile
                    self.jobs.cancel(project_id, step["job_id"], actor)
            result = step.get("result") or {}
            if step["name"] == "approval" and step["status"] == "waiting":
                with contextlib.suppress(ServiceError):
                    self.approvals.cancel(loop_principal(project_id), result["approval_id"])
            if step["name"] == "canary" and result.get("experiment_id"):
                with contextlib.suppress(ServiceError):  # it may have ended already
                    self.experiments.stop(project_id, result["experiment_id"], actor)
        return self.loops.get(project_id, loop_id)
