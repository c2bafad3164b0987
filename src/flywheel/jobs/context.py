"""What a running job sees: its params, a log, progress, cancellation and its work folder.

:class:`JobContext` satisfies the tuning :class:`~flywheel.tuning.report.Reporter` protocol,
so training code reports straight into the job. Log text is shipped to the database in
batches by a background thread, so any replica can stream the log of a job running anywhere.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from flywheel.jobs.store import JobStore

# Progress rows are rewritten at most this often (seconds); the last one always lands.
PROGRESS_INTERVAL = 0.5


class TextSink(Protocol):
    def write(self, text: str, /) -> int: ...


class LogShipper(io.TextIOBase):
    """A text stream whose writes reach the job's log in the database within ``interval``
    seconds; also usable as ``sys.stdout``/``sys.stderr`` of a worker."""

    def __init__(self, store: JobStore, job_id: str, interval: float = 0.5) -> None:
        self.store = store
        self.job_id = job_id
        self.interval = interval
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flywheel-job-log", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer.append(text)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            text, self._buffer = "".join(self._buffer), []
        if text:
            self.store.append_log(self.job_id, text)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # noqa: S112 - the database may be briefly away; keep the text
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        super().close()


class JobContext:
    """One running job, as its kind's ``run`` sees it."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        project_id: str,
        params: dict[str, Any],
        actor: str,
        workdir: Path,
        stream: TextSink,
        services: Callable[[], Any] | None = None,
        author_id: str | None = None,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.project_id = project_id
        self.params = params
        self.actor = actor
        self.author_id = author_id or actor
        self.workdir = workdir
        self.stream = stream
        self._services_factory = services
        self._services: Any = None
        self._cancel = threading.Event()
        self._last_progress = 0.0

    # -- Reporter ------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """One line in the job's log, time-stamped."""
        stamp = time.strftime("%H:%M:%S")
        self.stream.write(f"{stamp} {message}\n")

    def progress(self, fraction: float, message: str = "") -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        self.store.set_progress(self.job_id, fraction, message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Jobs without a tracking run keep no step metrics; tuning wraps this context."""

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- for the worker ------------------------------------------------------------------

    def request_cancel(self) -> None:
        self._cancel.set()

    def services(self) -> Any:
        """The full service layer (gateway, stores) for jobs that call models or stages;
        built once, on first use, in the worker process."""
        if self._services is None:
            if self._services_factory is None:
                raise RuntimeError("this job runner offers no services")
            self._services = self._services_factory()
        return self._services


__all__ = ["JobContext", "LogShipper"]
