"""The server side of jobs: claim queued work, start it on an executor, watch it, end it.

Every replica runs a supervisor. A job is claimed by exactly one (a guarded update), runs as a
separate process (``local``) or a Ray task (``ray``), and is watched for a cancel request, a
timeout and its exit. Jobs whose process vanished (a killed server or worker) are marked
``orphaned``: at start for this host's dead processes, and on any replica once their heartbeat
is older than ``orphan_after``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from flywheel.jobs.store import CANCELLED, FAILED, RUNNING, JobStore, this_host

log = logging.getLogger("flywheel.jobs")


class RunningJob(Protocol):
    """A started job as its executor tracks it."""

    async def wait(self) -> str:
        """Wait for the end; return a description of how it ended (exit code, error)."""
        ...

    def terminate(self) -> None:
        """Ask it to stop now (the worker records the end it reached)."""
        ...

    def kill(self) -> None:
        """Stop it for good."""
        ...

    def output_tail(self) -> str:
        """What it wrote outside its log (a crash report), if anything."""
        ...


Launcher = Callable[[str], Awaitable[RunningJob]]


@dataclass
class LocalProcess:
    """A job running as ``python -m flywheel jobs work ID`` in its own process group."""

    process: asyncio.subprocess.Process
    output: Path

    async def wait(self) -> str:
        code = await self.process.wait()
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def output_tail(self) -> str:
        try:
            with self.output.open("rb") as handle:
                handle.seek(max(0, self.output.stat().st_size - 8192))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


def local_launcher(
    workdir_root: Path,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> Launcher:
    """Start each job as a worker process of its own (its own session, so a cancel reaches
    every process it started). Output outside the job log (a native crash) goes to a file in
    the job's folder."""

    async def launch(job_id: str) -> RunningJob:
        folder = Path(workdir_root) / job_id
        folder.mkdir(parents=True, exist_ok=True)
        output = folder / "process.out"
        argv = command or [sys.executable, "-m", "flywheel", "jobs", "work"]
        with output.open("ab") as sink:
            process = await asyncio.create_subprocess_exec(
                *argv,
                job_id,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        return LocalProcess(process, output)

    return launch


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class _Watched:
    job: RunningJob
    started: float
    timeout: float | None
    cancel_sent: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class JobSupervisor:
    """Claims queued jobs for its executors and sees each one to its end."""

    def __init__(
        self,
        store: JobStore,
        launchers: dict[str, Launcher],
        *,
        concurrency: int = 1,
        poll: float = 1.0,
        orphan_after: float = 60.0,
        cancel_grace: float = 10.0,
        timeout: float | None = None,
        host: str | None = None,
    ) -> None:
        self.store = store
        self.launchers = launchers
        self.concurrency = concurrency
        self.poll = poll
        self.orphan_after = orphan_after
        self.cancel_grace = cancel_grace
        self.timeout = timeout
        self.host = host or this_host()
        self._running: dict[str, _Watched] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def active(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())

    def wake(self) -> None:
        """Look for queued work now instead of at the next poll (a job was just submitted)."""
        self._wake.set()

    async def _loop(self) -> None:
        await asyncio.to_thread(self.recover)
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("job supervisor tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)
            self._wake.clear()

    def recover(self) -> list[str]:
        """At start: jobs this host was running whose process is gone are orphans."""
        dead = [
            row.id
            for row in self.store.running_on(self.host)
            if row.id not in self._running and (row.pid is None or not process_alive(row.pid))
        ]
        marked = self.store.mark_orphans(float("inf"), dead) if dead else []
        for job_id in marked:
            log.warning("job %s was orphaned: its process is gone", job_id)
        return marked

    async def tick(self) -> None:
        """One round: orphans, cancels and timeouts, then new work."""
        stale = await asyncio.to_thread(self.store.mark_orphans, self.orphan_after)
        for job_id in stale:
            log.warning("job %s was orphaned: no heartbeat for %ss", job_id, self.orphan_after)
        now = time.time()
        for job_id, watched in list(self._running.items()):
            row = await asyncio.to_thread(self.store.load, job_id)
            over_time = watched.timeout is not None and now - watched.started > watched.timeout
            if (row.cancel_requested or over_time) and watched.cancel_sent is None:
                watched.cancel_sent = now
                if over_time and not row.cancel_requested:
                    # Recorded first: the worker's own "cancelled" then changes nothing.
                    await asyncio.to_thread(
                        self.store.finish,
                        job_id,
                        FAILED,
                        error=f"timed out after {watched.timeout:g}s",
                    )
                watched.job.terminate()
            elif watched.cancel_sent is not None and now - watched.cancel_sent > self.cancel_grace:
                watched.job.kill()
        while len(self._running) < self.concurrency:
            candidates = await asyncio.to_thread(self.store.next_queued, list(self.launchers))
            claimed = None
            for job_id in candidates:
                if await asyncio.to_thread(self.store.claim, job_id, self.host):
                    claimed = job_id
                    break
            if claimed is None:
                return
            await self._launch(claimed)

    async def _launch(self, job_id: str) -> None:
        row = await asyncio.to_thread(self.store.load, job_id)
        timeout = (row.params or {}).get("timeout") or self.timeout
        try:
            job = await self.launchers[row.executor](job_id)
        except Exception as exc:
            log.exception("could not start job %s", job_id)
            await asyncio.to_thread(
                self.store.finish, job_id, FAILED, error=f"could not start: {exc}"
            )
            return
        watched = _Watched(job, time.time(), float(timeout) if timeout else None)
        self._running[job_id] = watched
        watched.task = asyncio.create_task(self._watch(job_id, watched))

    async def _watch(self, job_id: str, watched: _Watched) -> None:
        try:
            ended = await watched.job.wait()
        except Exception as exc:
            ended = f"executor error: {exc}"
        finally:
            self._running.pop(job_id, None)
            self._wake.set()
        row = await asyncio.to_thread(self.store.load, job_id)
        if row.status != RUNNING:
            return
        # The worker ended without recording how: it crashed, was killed, or timed out.
        tail = watched.job.output_tail()
        if tail:
            await asyncio.to_thread(self.store.append_log, job_id, tail)
        if row.cancel_requested:
            status, error = CANCELLED, None
        else:
            status, error = FAILED, f"the worker stopped unexpectedly ({ended})"
        await asyncio.to_thread(self.store.finish, job_id, status, error=error)

    async def close(self) -> None:
        """Stop claiming; stop this replica's running jobs (they can be retried)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        watched = list(self._running.items())
        for job_id, item in watched:
            await asyncio.to_thread(
                self.store.finish, job_id, FAILED, error="interrupted: the server stopped"
            )
            item.job.terminate()
        deadline = time.time() + self.cancel_grace
        for _, item in watched:
            if item.task is None:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(item.task), max(0.1, deadline - time.time()))
            if not item.task.done():
                item.job.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(item.task, 5)


__all__ = [
    "JobSupervisor",
    "Launcher",
    "LocalProcess",
    "RunningJob",
    "local_launcher",
    "process_alive",
]
