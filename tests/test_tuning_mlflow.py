"""A tracked run exported to MLflow (mlflow-skinny, a local SQLite tracking store) reads back
with the same params, metric series, summary and tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.store import Database
from flywheel.tuning.runs import RunError, RunTracker, export_to_mlflow


@pytest.fixture
def finished_run(tmp_path: Path) -> dict:
    db = Database(f"sqlite:///{tmp_path / 'flywheel.db'}")
    db.migrate()
    tracker = RunTracker(db)
    run_id = tracker.start(
        "default",
        "sft guide@1",
        "tune.sft",
        {"learning_rate": 1e-3, "lora": {"rank": 8, "alpha": 16}},
        "key:test",
        experiment="guide-bot",
        inputs=["guide@1"],
    )
    for step, loss in enumerate((2.0, 1.5, 1.1), start=1):
        tracker.log_metrics(run_id, step, {"loss": loss, "learning_rate": 1e-3})
    tracker.finish(run_id, "finished", {"train_loss": 1.5, "steps": 3, "note": "text"})
    return tracker.get("default", run_id)


def test_a_run_exports_to_mlflow_and_reads_back(tmp_path: Path, finished_run: dict) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_id = export_to_mlflow(finished_run, uri)

    exported = MlflowClient(tracking_uri=uri).get_run(mlflow_id)
    assert exported.info.run_name == "sft guide@1"
    assert exported.data.params["learning_rate"] == "0.001"
    assert exported.data.params["lora.rank"] == "8"
    assert exported.data.tags["flywheel.run_id"] == finished_run["id"]
    assert exported.data.tags["flywheel.kind"] == "tune.sft"
    assert exported.data.metrics["summary.train_loss"] == 1.5
    assert "summary.note" not in exported.data.metrics
    history = MlflowClient(tracking_uri=uri).get_metric_history(mlflow_id, "loss")
    assert [(point.step, point.value) for point in history] == [(1, 2.0), (2, 1.5), (3, 1.1)]
    experiment = MlflowClient(tracking_uri=uri).get_experiment(exported.info.experiment_id)
    assert experiment.name == "guide-bot"


def test_without_mlflow_the_export_is_a_clear_400(
    finished_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an install without it looks like
    with pytest.raises(RunError) as caught:
        export_to_mlflow(finished_run, "sqlite:///unused.db")
    assert caught.value.status_code == 400 and "mlflow-skinny" in str(caught.value)
