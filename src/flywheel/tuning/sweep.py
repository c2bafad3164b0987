"""Hyperparameter sweeps over :class:`~flywheel.tuning.config.TrainSettings`.

A search space maps a setting (dotted for nested ones: ``"lora.rank"``) to a list of values or
a range ``{"min", "max", "log"?}``. :func:`sweep_trials` turns it into override dicts (grid or
seeded random), :func:`apply_overrides` validates each against the settings model, and
:class:`MedianStopper` stops trials whose held-out loss trails the median of finished trials.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from flywheel.tuning.config import TrainSettings

SettingsT = TypeVar("SettingsT", bound=TrainSettings)


def _field_exists(model: type[BaseModel], dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    info = model.model_fields.get(head)
    if info is None:
        return False
    if not rest:
        return True
    nested = info.annotation
    return (
        isinstance(nested, type) and issubclass(nested, BaseModel) and _field_exists(nested, rest)
    )


def _check_space(space: Mapping[str, Any], settings_class: type[BaseModel]) -> None:
    if not space:
        raise ValueError("the search space is empty")
    for key, values in space.items():
        if not _field_exists(settings_class, key):
            raise ValueError(f"space.{key}: no such setting")
        if isinstance(values, list):
            if not values:
                raise ValueError(f"space.{key}: the list of values is empty")
        elif isinstance(values, Mapping):
            unknown = set(values) - {"min", "max", "log"}
            if unknown:
                raise ValueError(f"space.{key}: unknown range keys {sorted(unknown)}")
            low, high = values.get("min"), values.get("max")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
                raise ValueError(f"space.{key}: a range needs numeric min and max")
            assert isinstance(low, int | float) and isinstance(high, int | float)
            if low > high:
                raise ValueError(f"space.{key}: min is larger than max")
            if values.get("log") and low <= 0:
                raise ValueError(f"space.{key}: a log range needs min > 0")
        else:
            raise ValueError(f"space.{key}: give a list of values or {{min, max, log?}}")


def _sample(rng: random.Random, values: Any) -> Any:
    if isinstance(values, list):
        return values[rng.randrange(len(values))]
    low, high, log = values["min"], values["max"], bool(values.get("log"))
    integer = isinstance(low, int) and isinstance(high, int)
    if log:
        drawn = math.exp(rng.uniform(math.log(low), math.log(high)))
        return min(max(round(drawn), low), high) if integer else drawn
    return rng.randint(low, high) if integer else rng.uniform(low, high)


def sweep_trials(
    space: Mapping[str, list[Any] | Mapping[str, Any]],
    strategy: Literal["grid", "random"] = "grid",
    max_trials: int = 8,
    seed: int = 0,
    settings_class: type[BaseModel] = TrainSettings,
) -> list[dict[str, Any]]:
    """Override dicts, one per trial.

    ``grid`` enumerates the product of the value lists in key order (ranges are not allowed:
    a grid needs listed values), stopping at ``max_trials``. ``random`` draws ``max_trials``
    trials from lists (uniformly) and ranges (uniform, or log-uniform with ``"log": true``;
    integers when both bounds are integers), reproducibly for a ``seed``.
    """
    if max_trials < 1:
        raise ValueError("max_trials must be at least 1")
    _check_space(space, settings_class)
    keys = list(space)
    if strategy == "grid":
        ranges = [key for key in keys if not isinstance(space[key], list)]
        if ranges:
            raise ValueError(f"space.{ranges[0]}: a grid needs a list of values, not a range")
        lists = [list(space[key]) for key in keys]
        product = itertools.islice(itertools.product(*lists), max_trials)
        return [dict(zip(keys, combination, strict=True)) for combination in product]
    if strategy == "random":
        rng = random.Random(seed)
        return [{key: _sample(rng, space[key]) for key in keys} for _ in range(max_trials)]
    raise ValueError(f"strategy must be 'grid' or 'random', not {strategy!r}")


def apply_overrides(settings: SettingsT, overrides: Mapping[str, Any]) -> SettingsT:
    """A validated copy of ``settings`` with dotted ``overrides`` applied (``"lora.rank"``
    sets ``settings.lora.rank``); invalid or unknown values raise pydantic's
    ``ValidationError`` naming the field."""
    values = settings.model_dump()
    for dotted, value in overrides.items():
        target = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = target.get(part)
            if not isinstance(child, dict):
                child = {}
                target[part] = child
            target = child
        target[leaf] = value
    return type(settings).model_validate(values)


class MedianStopper(TrainerCallback):
    """The median stopping rule: a trial whose held-out loss at step ``s`` is worse than the
    median of the finished trials' losses at ``s`` is stopped.

    Use it as a plain object (:meth:`start_trial`, then :meth:`report` each evaluation; it
    returns whether to stop) or pass it to a trainer as a callback: each trainer built with it
    starts a trial, and every ``eval_loss`` it logs is reported. A finished trial's loss at
    ``s`` is its latest evaluation at or before ``s``. No trial is stopped before ``grace_steps``
    or while fewer than ``min_trials`` finished trials have a value to compare with.
    """

    def __init__(
        self, min_trials: int = 1, grace_steps: int = 0, metric: str = "eval_loss"
    ) -> None:
        self.min_trials = min_trials
        self.grace_steps = grace_steps
        self.metric = metric
        self.finished: list[dict[int, float]] = []
        self.current: dict[int, float] | None = None
        self.stopped: list[bool] = []

    def start_trial(self) -> None:
        """Begin a new trial (the previous one, if any, counts as finished)."""
        if self.current is not None:
            self.finish_trial()
        self.current = {}
        self.stopped.append(False)

    def finish_trial(self) -> None:
        """Keep the current trial's curve for comparison with later trials."""
        if self.current:
            self.finished.append(self.current)
        self.current = None

    def median_at(self, step: int) -> float | None:
        """The median loss of the finished trials at ``step`` (None without enough trials)."""
        values = []
        for curve in self.finished:
            earlier = [s for s in curve if s <= step]
            if earlier:
                values.append(curve[max(earlier)])
        if len(values) < self.min_trials:
            return None
        return statistics.median(values)

    def report(self, step: int, value: float) -> bool:
        """Record the current trial's loss at ``step``; True when the trial should stop."""
        if self.current is None:
            self.start_trial()
        assert self.current is not None
        self.current[step] = value
        if step < max(self.grace_steps, 1):
            return False
        median = self.median_at(step)
        stop = median is not None and value > median
        if stop:
            self.stopped[-1] = True
        return stop

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.start_trial()

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kw: Any,
    ) -> None:
        value = (metrics or {}).get(self.metric)
        if value is not None and self.report(state.global_step, float(value)):
            control.should_training_stop = True


def best_trial(
    results: Sequence[Mapping[str, Any]], metric: str = "eval_loss"
) -> dict[str, Any] | None:
    """The trial result with the best ``metric`` (lowest for losses, highest otherwise); a
    result's value is ``result[metric]`` or else ``result[metric + "_after"]`` (what
    :meth:`TrainResult.to_dict` holds). None when no result has a finite value."""
    lower_is_better = metric.endswith("loss")
    best: tuple[float, int] | None = None
    for index, result in enumerate(results):
        value = result.get(metric, result.get(f"{metric}_after"))
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            continue
        key = float(value) if lower_is_better else -float(value)
        if best is None or key < best[0]:
            best = (key, index)
    return dict(results[best[1]]) if best is not None else None
