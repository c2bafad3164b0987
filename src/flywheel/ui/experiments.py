"""The UI's experiment pages: every experiment of the project with its status, and one
experiment with its variants, decision, and charts over its looks: each variant's mean of
the primary metric with a 95 % interval, and the candidate-minus-control difference inside
its always-valid confidence sequence (what the decision is made on).

A thin edge over :class:`~flywheel.experiments.store.ExperimentStore`, the service
``/api/experiments`` uses; the charts are drawn by ``jobs.js`` from ``canvas[data-series]``.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from flywheel.errors import ServiceError
from flywheel.experiments.stats import ArmStats
from flywheel.security import Principal
from flywheel.server.http import services
from flywheel.ui.datasets import error_page
from flywheel.ui.jobs import series_chart
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

STATUS_CLASSES = {
    "running": "status-run-running",
    "promoting": "status-run-running",
    "promoted": "status-ok",
    "awaiting_approval": "status-pending",
    "rolled_back": "status-error",
    "stopped": "status-cancelled",
    # A shadow experiment decided: its outcome (recommend / reject) is shown beside it.
    "finished": "status-ok",
}
# The normal quantile of a two-sided 95 % interval, for each variant's own mean.
Z95 = 1.959964


def arm_interval(arm: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """An arm's mean and its 95 % normal interval (None where it has too few values)."""
    stats = ArmStats(
        int(arm.get("n") or 0), arm.get("total") or 0.0, arm.get("total_squares") or 0.0
    )
    mean, variance = stats.mean, stats.variance
    if mean is None or variance is None:
        return mean, None, None
    half = Z95 * math.sqrt(variance / stats.n)
    return mean, mean - half, mean + half


def charts(experiment: dict[str, Any]) -> dict[str, Any]:
    """The two charts over the looks, x in minutes since the experiment started."""
    start = experiment["created_at"]
    looks = experiment.get("looks") or []
    means = []
    for variant in experiment["variants"]:
        name = variant["name"]
        mean, low, high = [], [], []
        for look in looks:
            arm = ((look.get("arms") or {}).get(name) or {}).get("primary") or {}
            value, lower, upper = arm_interval(arm)
            x = round((look["at"] - start) / 60, 3)
            if value is not None:
                mean.append([x, value])
            if lower is not None and upper is not None:
                low.append([x, lower])
                high.append([x, upper])
        means += [(name, mean), (f"{name} 95% low", low), (f"{name} 95% high", high)]
    mean_chart = series_chart(means, experiment["metric"]["source"])
    for position, dataset in enumerate(mean_chart["datasets"]):
        dataset["color"] = position // 3  # a variant's interval in its own colour
    delta, low, high = [], [], []
    for look in looks:
        x = round((look["at"] - start) / 60, 3)
        arms = look.get("arms") or {}
        candidate = next(
            (v["name"] for v in experiment["variants"] if v["name"] != experiment["control"]), None
        )
        control_mean = arm_interval(((arms.get(experiment["control"]) or {}).get("primary")) or {})[
            0
        ]
        candidate_mean = arm_interval(((arms.get(candidate) or {}).get("primary")) or {})[0]
        if control_mean is not None and candidate_mean is not None:
            delta.append([x, candidate_mean - control_mean])
        if look.get("ci_low") is not None and look.get("ci_high") is not None:
            low.append([x, look["ci_low"]])
            high.append([x, look["ci_high"]])
    delta_chart = series_chart(
        [("difference", delta), ("sequence low", low), ("sequence high", high)],
        "candidate - control",
    )
    for chart in (mean_chart, delta_chart):
        chart["x_title"] = "minutes"
        chart["legend"] = True
    return {"means": mean_chart, "delta": delta_chart}


def _arms_table(experiment: dict[str, Any]) -> list[dict[str, Any]]:
    """Each variant's latest numbers."""
    looks = experiment.get("looks") or []
    latest = (looks[-1].get("arms") or {}) if looks else {}
    rows = []
    for variant in experiment["variants"]:
        arm = latest.get(variant["name"]) or {}
        mean, low, high = arm_interval(arm.get("primary") or {})
        errors = arm.get("error") or {}
        error_rate = (errors.get("total") or 0.0) / errors["n"] if errors.get("n") else None
        rows.append(
            {
                **variant,
                "control": variant["name"] == experiment["control"],
                "calls": errors.get("n") or 0,
                "rated": (arm.get("primary") or {}).get("n") or 0,
                "mean": mean,
                "low": low,
                "high": high,
                "error_rate": error_rate,
                "latency_p95": arm.get("latency_p95"),
            }
        )
    return rows


@router.get("/experiments")
def experiments_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Every experiment of the project, newest first."""
    rows = services(request).experiments.list_experiments(user.project_id)
    return render(
        request,
        "experiments.html",
        {"nav": "experiments", "experiments": rows, "status_classes": STATUS_CLASSES},
    )


@router.get("/experiments/{experiment_id}")
def experiment_page(
    request: Request, experiment_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """One experiment: variants, decision, and its metric charted over the looks."""
    try:
        experiment = services(request).experiments.get(user.project_id, experiment_id)
    except ServiceError as exc:
        return error_page(
            request, exc.status_code, "Experiment", exc.message, ("/experiments", "All experiments")
        )
    looks = experiment.get("looks") or []
    context = {
        "nav": "experiments",
        "experiment": experiment,
        "arms": _arms_table(experiment),
        "charts": charts(experiment),
        "last_look": looks[-1] if looks else None,
        "looks": len(looks),
        "status_classes": STATUS_CLASSES,
    }
    return render(request, "experiment.html", context)
