"""The eval gate on releases: a prompt or model version moves to ``production`` only when it
passed.

A prompt's suites target ``prompt:NAME@…``; a registered model's suites target one of its
served versions (``NAME-vN``, see :func:`flywheel.registry.serving.served_name`), and the gate
looks for runs on the requested version's served name. For every suite of the project whose
target is the prompt or model, the newest completed run of that
suite on the requested version must meet its thresholds, and, where a run of the version now
in production exists on the same dataset version, must show no significant regression
against it (:func:`flywheel.evals.compare.compare_runs`). A prompt with no suite is
``not_configured``; a suite with no run on the version is ``missing``, which blocks (run
``flywheel eval gate`` or ``POST /api/evals/runs`` first). The verdict is stored with the
approval request.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from flywheel.errors import ServiceError
from flywheel.evals.compare import compare_runs
from flywheel.evals.runner import EvalRunner, run_to_dict
from flywheel.evals.suites import PROMPT_PREFIX, EvalSuites
from flywheel.registry.serving import served_name
from flywheel.store import Database, EvalRun

# (project id, kind, name, label) -> the version the label points at, or None.
LabelLookup = Callable[[str, str, str, str], int | None]
BASELINE_LABEL = "production"


class ReleaseGate:
    """The approval service's ``gate``: checks stored eval runs, starts none."""

    def __init__(
        self, db: Database, suites: EvalSuites, runner: EvalRunner, label_version: LabelLookup
    ) -> None:
        self.db = db
        self.suites = suites
        self.runner = runner
        self.label_version = label_version

    @staticmethod
    def target(project_id: str, kind: str, name: str, version: int) -> str:
        """What an eval run of ``name@version`` names as its resolved target."""
        if kind == "model":
            return served_name(name, version, project_id=project_id)
        return f"{PROMPT_PREFIX}{name}@{version}"

    @staticmethod
    def _targets(project_id: str, kind: str, name: str, suite_target: str) -> bool:
        if kind == "model":
            base = re.escape(served_name(name, 1, project_id=project_id)[:-1])
            return re.fullmatch(f"{base}[0-9]+", suite_target) is not None
        return suite_target.partition("@")[0] == f"{PROMPT_PREFIX}{name}"

    def __call__(self, project_id: str, kind: str, name: str, version: int) -> dict[str, Any]:
        if kind not in {"prompt", "model"}:
            return {"status": "not_configured", "detail": f"no eval gate for {kind}s"}
        own = [
            suite.name
            for suite in self.suites.specs(project_id)
            if self._targets(project_id, kind, name, suite.target)
        ]
        if not own:
            return {"status": "not_configured", "detail": f"no eval suite targets {kind} '{name}'"}
        baseline_version = self.label_version(project_id, kind, name, BASELINE_LABEL)
        checks = [
            self._check_suite(project_id, kind, suite, name, version, baseline_version)
            for suite in own
        ]
        order = {"failed": 0, "missing": 1, "passed": 2}
        status = min((c["status"] for c in checks), key=order.__getitem__)
        return {"status": status, "suites": checks}

    def _newest_run(self, project_id: str, suite: str, target: str) -> dict[str, Any] | None:
        query = (
            select(EvalRun)
            .where(
                EvalRun.project_id == project_id,
                EvalRun.suite == suite,
                EvalRun.resolved_target == target,
                EvalRun.status == "completed",
            )
            .order_by(EvalRun.created_at.desc())
            .limit(1)
        )
        with self.db.session() as session:
            row = session.scalar(query)
            return run_to_dict(row) if row is not None else None

    def _check_suite(
        self,
        project_id: str,
        kind: str,
        suite: str,
        name: str,
        version: int,
        baseline: int | None,
    ) -> dict[str, Any]:
        target = self.target(project_id, kind, name, version)
        candidate = self._newest_run(project_id, suite, target)
        if candidate is None:
            return {
                "suite": suite,
                "status": "missing",
                "detail": f"no completed run of suite '{suite}' on {target}",
            }
        result: dict[str, Any] = {"suite": suite, "candidate_run": candidate["id"]}
        thresholds_met = bool((candidate.get("summary") or {}).get("passed"))
        prior = None
        if baseline is not None and baseline != version:
            prior = self._newest_run(
                project_id, suite, self.target(project_id, kind, name, baseline)
            )
        if prior is None or prior["dataset_version"] != candidate["dataset_version"]:
            result["status"] = "passed" if thresholds_met else "failed"
            result["detail"] = "thresholds " + ("met" if thresholds_met else "not met")
            return result
        try:
            comparison = compare_runs(
                prior,
                candidate,
                self.runner.results(project_id, prior["id"]),
                self.runner.results(project_id, candidate["id"]),
            )
        except ServiceError as exc:
            return {**result, "status": "failed", "detail": exc.message}
        failed = [c["name"] for c in comparison["gate"]["checks"] if not c["passed"]]
        result.update(
            baseline_run=prior["id"],
            status="failed" if failed else "passed",
            detail=("failed: " + ", ".join(failed)) if failed else "no regression, thresholds met",
        )
        return result
