"""The kinds of job Flywheel can run, registered by the stages that implement them.

A kind validates its params when the job is submitted (so bad input is a 400 then, not a
failed job later) and runs in a worker process with a :class:`~flywheel.jobs.context.JobContext`.
Stages register theirs with :func:`register_job_kind`; plugins through the
``flywheel.job_kinds`` entry-point group (each entry point is a module to import, whose import
registers its kinds), or by listing modules in ``FLYWHEEL_PLUGINS`` (comma-separated), which
the server and its job processes both import.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flywheel.jobs.context import JobContext

log = logging.getLogger("flywheel.jobs")

# Modules whose import registers Flywheel's own kinds; imported on first lookup so that core
# never imports a stage at import time.
BUILTIN_KIND_MODULES = ("flywheel.tuning.jobs", "flywheel.evals.jobs", "flywheel.rag.jobs")


@dataclass(frozen=True)
class JobKind:
    """One kind of job.

    ``validate`` turns submitted params into the stored params (normalized, defaults filled)
    or raises a 400 ``ServiceError`` naming the field; ``run`` does the work and returns the
    job's result (JSON-able). ``permission`` is what a caller needs to submit it.
    """

    name: str
    run: Callable[[JobContext], dict[str, Any] | None]
    validate: Callable[[dict[str, Any]], dict[str, Any]]
    description: str
    permission: str = "jobs:write"


_KINDS: dict[str, JobKind] = {}
_loaded = False
_lock = threading.Lock()


def register_job_kind(kind: JobKind) -> None:
    """Make a kind available to submit and run (a later registration replaces it)."""
    _KINDS[kind.name] = kind


def _load() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        import importlib

        for module in BUILTIN_KIND_MODULES:
            importlib.import_module(module)
        extra = [m.strip() for m in os.environ.get("FLYWHEEL_PLUGINS", "").split(",")]
        for module in filter(None, extra):
            try:
                importlib.import_module(module)
            except Exception:
                log.exception("could not import plugin module %s", module)
        for entry in entry_points(group="flywheel.job_kinds"):
            try:
                entry.load()
            except Exception:
                log.exception("could not load job kinds from %s", entry.value)


def job_kinds() -> dict[str, JobKind]:
    """Every registered kind, by name."""
    _load()
    return dict(_KINDS)


def job_kind(name: str) -> JobKind | None:
    _load()
    return _KINDS.get(name)


__all__ = ["JobKind", "job_kind", "job_kinds", "register_job_kind"]
