"""Running one claimed job to its end, in whatever process an executor gave it.

The local executor starts ``python -m flywheel jobs work JOB_ID`` (a process of its own, with
its own resource limits); the Ray executor calls :func:`run_job` inside a Ray task. Either way
the job's output goes to its log in the database, a heartbeat thread keeps the job alive and
notices a cancel, and the worker itself records how the job ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.errors import ServiceError
from flywheel.jobs.context import JobContext, LogShipper
from flywheel.jobs.kinds import job_kind
from flywheel.jobs.store import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobStore, this_host

log = logging.getLogger("flywheel.jobs")


def apply_resource_limits(memory_mb: int | None, niceness: int) -> None:
    """Limit this (worker) process: address space in MiB, and a lower CPU priority so that a
    training job never starves the gateway on the same machine."""
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if niceness:
        with contextlib.suppress(OSError):
            os.nice(niceness)


def _heartbeat(store: JobStore, ctx: JobContext, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            if store.heartbeat(ctx.job_id):
                if not ctx.cancelled():
                    ctx.log("cancel requested: stopping")
                ctx.request_cancel()
        except Exception:  # noqa: S112 - a missed beat is retried on the next one
            continue


def run_job(
    store: JobStore,
    job_id: str,
    workdir_root: Path,
    *,
    services: Callable[[], Any] | None = None,
    heartbeat_interval: float = 5.0,
    task_id: str | None = None,
    handle_sigterm: bool = False,
) -> str:
    """Run a claimed (running) job and record its end; returns the final status.

    ``task_id`` names where it runs when that is not a local process (a Ray task).
    ``handle_sigterm`` (a worker process of its own) turns SIGTERM into a cancel the job's
    code sees at its next check, so it can stop cleanly; the supervisor kills it after a
    grace period if it does not."""
    row = store.load(job_id)
    if row.status != RUNNING:
        return row.status
    store.started(job_id, os.getpid() if task_id is None else None)
    workdir = Path(workdir_root) / job_id
    workdir.mkdir(parents=True, exist_ok=True)
    shipper = LogShipper(store, job_id)
    handler = logging.StreamHandler(shipper)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    ctx = JobContext(
        store,
        job_id,
        row.project_id,
        row.params or {},
        row.created_by,
        workdir,
        shipper,
        services,
        author_id=row.author_id,
    )
    if handle_sigterm:
        signal.signal(signal.SIGTERM, lambda _signum, _frame: ctx.request_cancel())
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(store, ctx, stop, heartbeat_interval), daemon=True
    )
    beat.start()
    status, result, error = FAILED, None, None
    try:
        with contextlib.redirect_stdout(shipper), contextlib.redirect_stderr(shipper):
            kind = job_kind(row.kind)
            if kind is None:
                raise ServiceError(400, f"unknown job kind '{row.kind}'")
            where = task_id or f"{this_host()} pid {os.getpid()}"
            ctx.log(f"job {job_id} ({row.kind}) attempt {row.attempt} started on {where}")
            result = kind.run(ctx)
            status = CANCELLED if ctx.cancelled() else SUCCEEDED
    except Exception as exc:
        if ctx.cancelled():
            status, error = CANCELLED, None
        else:
            if isinstance(exc, ServiceError):
                error = exc.message  # already written for the person who submitted the job
            else:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not isinstance(exc, ServiceError | ValueError):
                shipper.write(traceback.format_exc())
    finally:
        stop.set()
        beat.join(timeout=heartbeat_interval + 1)
        ctx.log(f"job ended: {status}" + (f": {error}" if error else ""))
        root.removeHandler(handler)
        shipper.close()
    store.finish(job_id, status, result=result, error=error)
    return status


__all__ = ["apply_resource_limits", "run_job"]
