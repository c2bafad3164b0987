"""Hyperparameter sweeps: grid and random trials, validated overrides, the median stopping
rule (as an object and as a transformers callback) and picking the best trial."""

from __future__ import annotations

import itertools
import math

import pytest
from pydantic import ValidationError
from transformers import TrainerControl, TrainerState, TrainingArguments

from flywheel.tuning.config import DpoSettings, TrainSettings
from flywheel.tuning.sweep import MedianStopper, apply_overrides, best_trial, sweep_trials


def test_grid_enumerates_the_product_in_order() -> None:
    space = {"learning_rate": [1e-4, 2e-4, 5e-4], "lora.rank": [4, 8], "batch_size": [8]}
    trials = sweep_trials(space, "grid", max_trials=100)
    expected = [
        {"learning_rate": lr, "lora.rank": rank, "batch_size": 8}
        for lr, rank in itertools.product([1e-4, 2e-4, 5e-4], [4, 8])
    ]
    assert trials == expected
    assert sweep_trials(space, "grid", max_trials=4) == expected[:4]


def test_random_respects_bounds_types_and_seed() -> None:
    space = {
        "learning_rate": {"min": 1e-5, "max": 1e-2, "log": True},
        "lora.rank": {"min": 2, "max": 64},
        "lora.dropout": {"min": 0.0, "max": 0.2},
        "lora.alpha": [8, 16, 32],
    }
    trials = sweep_trials(space, "random", max_trials=60, seed=7)
    assert len(trials) == 60
    for trial in trials:
        assert 1e-5 <= trial["learning_rate"] <= 1e-2
        assert isinstance(trial["lora.rank"], int) and 2 <= trial["lora.rank"] <= 64
        assert 0.0 <= trial["lora.dropout"] <= 0.2
        assert trial["lora.alpha"] in (8, 16, 32)
    # log-uniform: about as many draws below the geometric middle (1e-3.5) as above
    low = sum(t["learning_rate"] < 10**-3.5 for t in trials)
    assert 15 <= low <= 45
    assert len({t["lora.rank"] for t in trials}) > 10
    assert sweep_trials(space, "random", max_trials=60, seed=7) == trials
    assert sweep_trials(space, "random", max_trials=60, seed=8) != trials
    for trial in trials:  # every drawn trial is a valid setting
        apply_overrides(TrainSettings(), trial)


@pytest.mark.parametrize(
    ("space", "strategy", "message"),
    [
        ({"lora.rnak": [4]}, "grid", "space.lora.rnak: no such setting"),
        ({"learning_rate": {"min": 1e-4, "max": 1e-3}}, "grid", "a grid needs a list"),
        ({"learning_rate": {"min": 0, "max": 1e-3, "log": True}}, "random", "log range"),
        ({"learning_rate": {"min": 1e-3, "max": 1e-4}}, "random", "min is larger"),
        ({"learning_rate": []}, "grid", "list of values is empty"),
        ({"learning_rate": "fast"}, "grid", "give a list"),
        ({}, "grid", "empty"),
        ({"learning_rate": [1e-4]}, "bayes", "strategy"),
    ],
)
def test_bad_spaces_are_refused(space: dict, strategy: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sweep_trials(space, strategy, max_trials=4)  # type: ignore[arg-type]


def test_apply_overrides_validates_and_keeps_the_rest() -> None:
    base = TrainSettings(max_steps=30, lora={"rank": 8, "dropout": 0.1})
    tuned = apply_overrides(base, {"lora.rank": 16, "learning_rate": 1e-3})
    assert tuned.lora.rank == 16 and tuned.lora.dropout == 0.1
    assert tuned.learning_rate == 1e-3 and tuned.max_steps == 30
    assert base.lora.rank == 8  # the original is untouched
    dpo = apply_overrides(DpoSettings(), {"beta": 0.3})
    assert isinstance(dpo, DpoSettings) and dpo.beta == 0.3
    with pytest.raises(ValidationError) as caught:
        apply_overrides(base, {"lora.rank": 0})
    assert caught.value.errors()[0]["loc"] == ("lora", "rank")
    with pytest.raises(ValidationError, match="extra"):
        apply_overrides(base, {"lora.rnak": 4})


def test_median_stopper_as_an_object() -> None:
    stopper = MedianStopper()
    stopper.start_trial()
    assert not stopper.report(10, 2.0)  # nothing finished to compare with
    assert not stopper.report(20, 1.0)
    stopper.start_trial()
    assert not stopper.report(10, 1.5)
    assert not stopper.report(20, 0.9)
    stopper.start_trial()
    assert stopper.median_at(10) == pytest.approx(1.75)  # of 2.0 and 1.5
    assert not stopper.report(10, 1.7)
    assert stopper.report(15, 1.9)  # finished trials at 15: 2.0, 1.5 -> median 1.75
    assert stopper.stopped == [False, False, True]
    assert stopper.median_at(5) is None  # no finished trial had been evaluated by step 5


def test_median_stopper_grace_and_minimum_trials() -> None:
    stopper = MedianStopper(min_trials=2, grace_steps=50)
    stopper.start_trial()
    stopper.report(10, 1.0)
    stopper.start_trial()
    assert not stopper.report(10, 5.0)  # only one finished trial
    stopper.start_trial()
    assert not stopper.report(10, 9.0)  # within the grace period
    assert stopper.report(60, 9.0)


def test_median_stopper_as_a_trainer_callback() -> None:
    stopper = MedianStopper()
    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    for losses in ([2.0, 1.0], [1.5, 0.8]):
        stopper.on_init_end(args, TrainerState(), TrainerControl())
        for step, loss in zip((5, 10), losses, strict=True):
            control = TrainerControl()
            stopper.on_evaluate(args, TrainerState(global_step=step), control, {"eval_loss": loss})
            assert not control.should_training_stop
    stopper.on_init_end(args, TrainerState(), TrainerControl())
    control = TrainerControl()
    stopper.on_evaluate(args, TrainerState(global_step=5), control, {"eval_loss": 1.7})
    assert not control.should_training_stop  # median of 2.0 and 1.5 is 1.75
    stopper.on_evaluate(args, TrainerState(global_step=10), control, {"eval_loss": 0.95})
    assert control.should_training_stop  # median of 1.0 and 0.8 is 0.9
    assert len(stopper.finished) == 2


def test_best_trial() -> None:
    results = [
        {"trial": 0, "eval_loss_after": 1.2},
        {"trial": 1, "eval_loss_after": 0.9},
        {"trial": 2, "eval_loss_after": math.nan},
        {"trial": 3, "eval_loss_after": None},
        {"trial": 4, "eval_loss": 1.0},
    ]
    assert best_trial(results) == {"trial": 1, "eval_loss_after": 0.9}
    assert best_trial(
        [{"trial": 0, "reward_accuracy": 0.5}, {"trial": 1, "reward_accuracy": 0.75}],
        "reward_accuracy",
    ) == {"trial": 1, "reward_accuracy": 0.75}
    assert best_trial([{"trial": 0, "eval_loss_after": None}]) is None
    assert best_trial([]) is None
