"""Fine-tuning and model optimisation on local models: LoRA/QLoRA SFT and DPO with TRL,
adapter merging, quantization, pruning, before/after measurement and hyperparameter sweeps.

Pure ML code (no database, no HTTP): long functions take a :class:`Reporter` for logs,
progress, step metrics and cancellation. Heavy modules (torch, transformers, TRL) load on
first use of the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flywheel.tuning.config import DpoSettings, LoraSettings, TrainSettings
from flywheel.tuning.data import (
    TuningDataError,
    dpo_records,
    read_jsonl,
    sft_records,
    split_records,
)
from flywheel.tuning.report import Cancelled, RecordingReporter, Reporter

if TYPE_CHECKING:
    from flywheel.tuning.measure import (
        eval_loss,
        generation_speed,
        measure_model,
        size_on_disk,
    )
    from flywheel.tuning.merge import merge_adapter
    from flywheel.tuning.prune import prune_model
    from flywheel.tuning.quantize import QuantizationUnavailable, quantize_model
    from flywheel.tuning.sweep import MedianStopper, apply_overrides, best_trial, sweep_trials
    from flywheel.tuning.train import ReporterCallback, TrainResult, train_dpo, train_sft

# name -> module that defines it (imported on first attribute access)
_LAZY = {
    "eval_loss": "measure",
    "generation_speed": "measure",
    "measure_model": "measure",
    "size_on_disk": "measure",
    "merge_adapter": "merge",
    "prune_model": "prune",
    "QuantizationUnavailable": "quantize",
    "quantize_model": "quantize",
    "MedianStopper": "sweep",
    "apply_overrides": "sweep",
    "best_trial": "sweep",
    "sweep_trials": "sweep",
    "ReporterCallback": "train",
    "TrainResult": "train",
    "train_dpo": "train",
    "train_sft": "train",
}

__all__ = [
    "Cancelled",
    "DpoSettings",
    "LoraSettings",
    "MedianStopper",
    "QuantizationUnavailable",
    "RecordingReporter",
    "Reporter",
    "ReporterCallback",
    "TrainResult",
    "TrainSettings",
    "TuningDataError",
    "apply_overrides",
    "best_trial",
    "dpo_records",
    "eval_loss",
    "generation_speed",
    "measure_model",
    "merge_adapter",
    "prune_model",
    "quantize_model",
    "read_jsonl",
    "sft_records",
    "size_on_disk",
    "split_records",
    "sweep_trials",
    "train_dpo",
    "train_sft",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flywheel.tuning' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"flywheel.tuning.{module}"), name)
    globals()[name] = value
    return value
