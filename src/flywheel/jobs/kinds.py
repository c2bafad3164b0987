"""The kinds of job Flywheel can run, registered by the stages that implement them.

A kind validates its params when the job is submitted (so bad input is a 400 then, not a
failed job later) and runs in a worker process with a :class:`~flywheel.jobs.context.JobContext`.
Stages register theirs with :func:`register_job_kind`; plugins through the
``flywheel.job_kinds`` entry-point group (each entry point is a module to import, whose import
registers its kinds), or by listing modules in ``FLYWHEEL_PLUGINS`` (comma-separated), which
the server and its job processes both import.
"""

from __future__ import annotations

import functools
import importlib
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

# Flywheel's own kinds and the stage module whose import registers each. Imported on first
# lookup, so that core never imports a stage at import time, and a job process imports only
# its own kind's module (not every stage's dependencies).
BUILTIN_KINDS: dict[str, str] = {
    **dict.fromkeys(
        ("tune.sft", "tune.dpo", "tune.sweep", "merge", "quantize", "prune", "distill"),
        "flywheel.tuning.jobs",
    ),
    "eval.run": "flywheel.evals.jobs",
    "kb.ingest": "flywheel.rag.jobs",
    "prompt.optimize": "flywheel.prompts.optimize",
    "loop.step": "flywheel.loop.steps",
}


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
_loaded: set[str] = set()
_lock = threading.Lock()


def register_job_kind(kind: JobKind) -> None:
    """Make a kind available to submit and run (a later registration replaces it)."""
    _KINDS[kind.name] = kind


def _import_once(module: str, *, quiet: bool) -> None:
    """Import ``module`` (a stage's or a plugin's) unless done already; a plugin that fails
    to import is logged, not raised, so one broken plugin never hides the others."""
    with _lock:
        if module in _loaded:
            return
        _loaded.add(module)
    try:
        importlib.import_module(module)
    except Exception:
        if not quiet:
            raise
        log.exception("could not import plugin module %s", module)


@functools.cache
def _load_plugins() -> None:
    # Once per process: scanning entry points on every lookup would cost each submission.
    extra = [m.strip() for m in os.environ.get("FLYWHEEL_PLUGINS", "").split(",")]
    for module in filter(None, extra):
        _import_once(module, quiet=True)
    for entry in entry_points(group="flywheel.job_kinds"):
        _import_once(entry.module, quiet=True)


def job_kinds() -> dict[str, JobKind]:
    """Every registered kind, by name."""
    for module in dict.fromkeys(BUILTIN_KINDS.values()):
        _import_once(module, quiet=False)
    _load_plugins()
    return dict(_KINDS)


def job_kind(name: str) -> JobKind | None:
    """The kind called ``name``, importing only what may define it: its stage's module and
    the plugins."""
    if name in BUILTIN_KINDS:
        _import_once(BUILTIN_KINDS[name], quiet=False)
    # Plugins load after Flywheel's own kinds, as in job_kinds(), so one that replaces a
    # built-in kind replaces it in job processes too.
    _load_plugins()
    return _KINDS.get(name)


__all__ = ["JobKind", "job_kind", "job_kinds", "register_job_kind"]
