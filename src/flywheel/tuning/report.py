"""How training and optimisation code reports while it runs, without knowing who listens.

A job worker passes a reporter that writes progress to the job row, step metrics to the
experiment-tracking run and log lines to the job log; tests pass :class:`RecordingReporter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Reporter(Protocol):
    """What long-running tuning code tells the outside world, and the one thing it asks."""

    def log(self, message: str) -> None:
        """One human-readable log line."""
        ...

    def progress(self, fraction: float, message: str = "") -> None:
        """Overall progress in [0, 1] with a short status message."""
        ...

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Step metrics (``loss``, ``learning_rate``, ``tokens_per_second``, ``eval_loss``…)."""
        ...

    def cancelled(self) -> bool:
        """True once someone asked the work to stop; long loops check it and stop early."""
        ...


class Cancelled(Exception):
    """Raised by tuning code that stopped because its reporter said it was cancelled."""


@dataclass
class RecordingReporter:
    """A reporter that keeps everything in memory (tests, scripts and benchmarks)."""

    lines: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    steps: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    stop: bool = False

    def log(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, fraction: float, message: str = "") -> None:
        self.fractions.append(fraction)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.steps.append((step, dict(values)))

    def cancelled(self) -> bool:
        return self.stop

    def series(self, key: str) -> list[float]:
        """Every reported value of one metric, in step order."""
        return [values[key] for _, values in self.steps if key in values]
