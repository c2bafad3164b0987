"""Experiment tracking: runs with params, step metrics, system info, artifacts, the code's git
commit and package versions; side-by-side comparison; optional export to MLflow."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import delete, select

from flywheel.errors import ServiceError
from flywheel.store import Database, Run, RunMetric

# Package versions a run records (what decides whether a result reproduces).
TRACKED_PACKAGES = (
    "flywheel-llmops",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "torchao",
    "safetensors",
)
RUN_STATUSES = ("running", "finished", "failed", "cancelled")


class RunError(ServiceError):
    """A refused experiment-tracking operation."""


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (absent ones are left out)."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the code being run: ``FLYWHEEL_GIT_COMMIT`` when set (an installed
    package has no checkout), else ``git rev-parse HEAD`` in ``where``."""
    if os.environ.get("FLYWHEEL_GIT_COMMIT"):
        return os.environ["FLYWHEEL_GIT_COMMIT"]
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = found.stdout.strip()
    return commit if found.returncode == 0 and len(commit) == 40 else None


def system_info() -> dict[str, Any]:
    """The machine a run ran on."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    return info


def run_to_dict(row: Run) -> dict[str, Any]:
    return {
        "id": row.id,
        "job_id": row.job_id,
        "experiment": row.experiment,
        "name": row.name,
        "kind": row.kind,
        "status": row.status,
        "params": row.params,
        "summary": row.summary,
        "system": row.system,
        "git_commit": row.git_commit,
        "packages": row.packages,
        "inputs": row.inputs,
        "artifacts": row.artifacts,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "finished_at": row.finished_at,
    }


class RunTracker:
    """Runs and their metrics in the database (what the API, UI and jobs share)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def start(
        self,
        project_id: str,
        name: str,
        kind: str,
        params: dict[str, Any],
        actor: str,
        *,
        job_id: str | None = None,
        experiment: str = "",
        inputs: Sequence[str] = (),
    ) -> str:
        """Open a run and record where and with what code it runs; returns its id."""
        row = Run(
            id=uuid.uuid4().hex,
            project_id=project_id,
            job_id=job_id,
            experiment=experiment,
            name=name,
            kind=kind,
            status="running",
            params=params,
            summary={},
            system=system_info(),
            git_commit=git_commit(),
            packages=package_versions(),
            inputs=list(inputs),
            artifacts=[],
            created_at=time.time(),
            created_by=actor,
        )
        with self.db.session() as session:
            session.add(row)
        return row.id

    def log_metrics(self, run_id: str, step: int, values: dict[str, float]) -> None:
        now = time.time()
        with self.db.session() as session:
            for key, value in values.items():
                if isinstance(value, int | float) and value == value:  # NaN is not a point
                    session.add(
                        RunMetric(
                            run_id=run_id, key=key, step=step, value=float(value), created_at=now
                        )
                    )

    def add_artifact(self, run_id: str, name: str, uri: str, size_bytes: int) -> None:
        with self.db.session() as session:
            row = session.get(Run, run_id)
            if row is not None:
                row.artifacts = [
                    *row.artifacts,
                    {"name": name, "uri": uri, "size_bytes": size_bytes},
                ]

    def finish(self, run_id: str, status: str, summary: dict[str, Any] | None = None) -> None:
        with self.db.session() as session:
            row = session.get(Run, run_id)
            if row is not None:
                row.status = status
                row.summary = {**row.summary, **(summary or {})}
                row.finished_at = time.time()

    def _row(self, project_id: str, run_id: str) -> Run:
        with self.db.session() as session:
            row = session.get(Run, run_id)
        if row is None or row.project_id != project_id:
            raise RunError(404, f"Run '{run_id}' not found.", "run_not_found")
        return row

    def get(self, project_id: str, run_id: str) -> dict[str, Any]:
        """A run with every metric series (``{key: [[step, value], ...]}``)."""
        found = run_to_dict(self._row(project_id, run_id))
        found["metrics"] = self.series(run_id)
        return found

    def series(self, run_id: str, keys: Sequence[str] = ()) -> dict[str, list[list[float]]]:
        query = select(RunMetric.key, RunMetric.step, RunMetric.value).where(
            RunMetric.run_id == run_id
        )
        if keys:
            query = query.where(RunMetric.key.in_(list(keys)))
        series: dict[str, list[list[float]]] = {}
        with self.db.session() as session:
            for key, step, value in session.execute(query.order_by(RunMetric.step, RunMetric.id)):
                series.setdefault(key, []).append([step, value])
        return series

    def list_runs(
        self,
        project_id: str,
        *,
        experiment: str | None = None,
        job_id: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        query = select(Run).where(Run.project_id == project_id)
        if experiment is not None:
            query = query.where(Run.experiment == experiment)
        if job_id is not None:
            query = query.where(Run.job_id == job_id)
        with self.db.session() as session:
            rows = session.scalars(
                query.order_by(Run.created_at.desc(), Run.id).limit(max(1, min(limit, 1000)))
            )
            return [run_to_dict(row) for row in rows]

    def compare(self, project_id: str, run_ids: Sequence[str]) -> dict[str, Any]:
        """Runs side by side: every param and summary value per run (``differs`` marks the
        keys whose values are not all equal), and their metric series for the charts."""
        if not 1 <= len(run_ids) <= 20:
            raise RunError(400, "Compare 1 to 20 runs.", "invalid_value", "runs")
        runs = [self.get(project_id, run_id) for run_id in run_ids]

        def table(field: str) -> list[dict[str, Any]]:
            keys = sorted({key for run in runs for key in _flatten(run[field])})
            rows = []
            for key in keys:
                values = [_flatten(run[field]).get(key) for run in runs]
                distinct = {repr(value) for value in values}
                rows.append({"key": key, "values": values, "differs": len(distinct) > 1})
            return rows

        return {
            "runs": [{k: v for k, v in run.items() if k != "metrics"} for run in runs],
            "params": table("params"),
            "summary": table("summary"),
            "metrics": {run["id"]: run["metrics"] for run in runs},
        }

    def export_mlflow(
        self, project_id: str, run_id: str, tracking_uri: str | None
    ) -> dict[str, Any]:
        """Copy the run to MLflow at ``tracking_uri`` (the ``mlflow_tracking_uri`` setting);
        400 when none is configured or mlflow is not installed, 404 for an unknown run."""
        if not tracking_uri:
            raise RunError(
                400, "Set FLYWHEEL_MLFLOW_TRACKING_URI to export runs.", "mlflow_not_configured"
            )
        run = self.get(project_id, run_id)
        mlflow_id = export_to_mlflow(run, tracking_uri)
        return {"run_id": run_id, "mlflow_run_id": mlflow_id, "tracking_uri": tracking_uri}

    def delete(self, project_id: str, run_id: str) -> None:
        self._row(project_id, run_id)
        with self.db.session() as session:
            session.execute(delete(RunMetric).where(RunMetric.run_id == run_id))
            session.execute(delete(Run).where(Run.id == run_id))


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class TrackedReporter:
    """A reporter that sends step metrics to a run and everything else to another reporter
    (the job): what tuning code gets when it runs as a tracked job."""

    def __init__(self, inner: Any, tracker: RunTracker, run_id: str) -> None:
        self.inner = inner
        self.tracker = tracker
        self.run_id = run_id
        self._lock = threading.Lock()

    def log(self, message: str) -> None:
        self.inner.log(message)

    def progress(self, fraction: float, message: str = "") -> None:
        self.inner.progress(fraction, message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        with self._lock:
            self.tracker.log_metrics(self.run_id, step, values)
        self.inner.metrics(step, values)

    def cancelled(self) -> bool:
        return bool(self.inner.cancelled())


def export_to_mlflow(run: dict[str, Any], tracking_uri: str) -> str:
    """Copy a finished run (params, summary, metric series, tags) to an MLflow tracking
    server or folder; returns the MLflow run id. Needs ``mlflow`` (or ``mlflow-skinny``)."""
    try:
        import mlflow
    except ImportError as exc:
        raise RunError(
            400,
            "MLflow export needs the mlflow package: pip install mlflow-skinny",
            "mlflow_missing",
        ) from exc
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(run["experiment"] or "flywheel")
    with mlflow.start_run(run_name=run["name"]) as active:
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(run["params"]).items()})
        mlflow.set_tags(
            {
                "flywheel.run_id": run["id"],
                "flywheel.kind": run["kind"],
                "mlflow.source.git.commit": run["git_commit"] or "",
            }
        )
        for key, points in run["metrics"].items():
            for step, value in points:
                mlflow.log_metric(key, value, step=int(step))
        for key, value in _flatten(run["summary"]).items():
            if isinstance(value, int | float):
                mlflow.log_metric(f"summary.{key}", float(value))
        return str(active.info.run_id)


__all__ = [
    "RUN_STATUSES",
    "RunError",
    "RunTracker",
    "TrackedReporter",
    "export_to_mlflow",
    "git_commit",
    "package_versions",
    "run_to_dict",
    "system_info",
]
