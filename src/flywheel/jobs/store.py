"""Job state in the database: submit, claim, report, cancel, retry, and find orphans.

Every transition is a guarded ``UPDATE … WHERE status = …``, so two replicas (or a replica and
a worker) racing for one job never both win: the loser sees zero rows changed.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, update

from flywheel.errors import ServiceError
from flywheel.security.audit import AuditLog
from flywheel.store import Database, Job, JobLog
from flywheel.store.db import changed_rows

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED, ORPHANED = "succeeded", "failed", "cancelled", "orphaned"
FINISHED = frozenset({SUCCEEDED, FAILED, CANCELLED, ORPHANED})
STATUSES = (QUEUED, RUNNING, *sorted(FINISHED))
EXECUTORS = ("local", "ray")
# One log row holds at most this much text; a chatty job's lines are split across rows.
MAX_LOG_CHUNK = 64 * 1024


class JobError(ServiceError):
    """A refused job operation."""


def this_host() -> str:
    """The name workers and supervisors record as where a job runs."""
    return socket.gethostname()


def job_to_dict(row: Job) -> dict[str, Any]:
    """A job as the API shows it."""
    return {
        "id": row.id,
        "kind": row.kind,
        "name": row.name,
        "params": row.params,
        "executor": row.executor,
        "status": row.status,
        "progress": row.progress,
        "message": row.message,
        "result": row.result,
        "error": row.error,
        "cancel_requested": row.cancel_requested,
        "attempt": row.attempt,
        "retry_of": row.retry_of,
        "host": row.host,
        "pid": row.pid,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "author_id": row.author_id,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "heartbeat_at": row.heartbeat_at,
    }


class JobStore:
    """The jobs table and its log: what the API, the supervisor and the workers share."""

    def __init__(self, db: Database, audit: AuditLog) -> None:
        self.db = db
        self.audit = audit

    # -- what callers do ---------------------------------------------------------------

    def submit(
        self,
        project_id: str,
        kind: str,
        params: dict[str, Any],
        actor: str,
        *,
        name: str = "",
        executor: str = "local",
        retry_of: Job | None = None,
        author_id: str | None = None,
    ) -> dict[str, Any]:
        """Queue a job (its params already validated by its kind) and return it;
        ``author_id`` is the submitter's identity (what the job registers is theirs)."""
        if executor not in EXECUTORS:
            raise JobError(
                400,
                f"Unknown executor '{executor}'; use one of: {', '.join(EXECUTORS)}.",
                "invalid_value",
                "executor",
            )
        row = Job(
            id=uuid.uuid4().hex,
            project_id=project_id,
            kind=kind,
            name=name or kind,
            params=params,
            executor=executor,
            status=QUEUED,
            progress=0.0,
            message="queued",
            cancel_requested=False,
            attempt=retry_of.attempt + 1 if retry_of else 1,
            retry_of=retry_of.id if retry_of else None,
            created_at=time.time(),
            created_by=actor,
            author_id=author_id or actor,
        )
        with self.db.session() as session:
            session.add(row)
            session.flush()
            self.audit.record(
                actor=actor,
                action="job.retry" if retry_of else "job.create",
                resource_type="job",
                resource_id=row.id,
                project_id=project_id,
                after={"kind": kind, "name": row.name, "executor": executor, "params": params},
                session=session,
            )
        return job_to_dict(row)

    def _row(self, project_id: str, job_id: str) -> Job:
        with self.db.session() as session:
            row = session.get(Job, job_id)
        if row is None or row.project_id != project_id:
            raise JobError(404, f"Job '{job_id}' not found.", "job_not_found")
        return row

    def get(self, project_id: str, job_id: str) -> dict[str, Any]:
        return job_to_dict(self._row(project_id, job_id))

    def list_jobs(
        self,
        project_id: str,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The project's jobs, newest first."""
        query = select(Job).where(Job.project_id == project_id)
        if status:
            if status not in STATUSES:
                raise JobError(
                    400,
                    f"Unknown status '{status}'; use one of: {', '.join(STATUSES)}.",
                    "invalid_value",
                    "status",
                )
            query = query.where(Job.status == status)
        if kind:
            query = query.where(Job.kind == kind)
        with self.db.session() as session:
            rows = session.scalars(
                query.order_by(Job.created_at.desc(), Job.id).limit(max(1, min(limit, 1000)))
            )
            return [job_to_dict(row) for row in rows]

    def cancel(self, project_id: str, job_id: str, actor: str) -> dict[str, Any]:
        """Cancel a queued job at once; ask a running one to stop (its worker and supervisor
        both watch the flag). Cancelling a finished job is refused."""
        row = self._row(project_id, job_id)
        now = time.time()
        with self.db.session() as session:
            done = changed_rows(
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == QUEUED)
                    .values(
                        status=CANCELLED,
                        cancel_requested=True,
                        finished_at=now,
                        message="cancelled before it started",
                    )
                )
            )
            if not done:
                done = changed_rows(
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == RUNNING)
                        .values(cancel_requested=True, message="cancelling")
                    )
                )
            if not done:
                raise JobError(
                    409,
                    f"Job '{job_id}' already {row.status}; only queued or running jobs cancel.",
                    "job_finished",
                )
            self.audit.record(
                actor=actor,
                action="job.cancel",
                resource_type="job",
                resource_id=job_id,
                project_id=project_id,
                before={"status": row.status},
                session=session,
            )
        return self.get(project_id, job_id)

    def retry(
        self, project_id: str, job_id: str, actor: str, author_id: str | None = None
    ) -> dict[str, Any]:
        """A new job with the same kind, params and executor as a failed, cancelled or
        orphaned one (``retry_of`` links them; ``attempt`` counts)."""
        row = self._row(project_id, job_id)
        if row.status not in {FAILED, CANCELLED, ORPHANED}:
            raise JobError(
                409,
                f"Job '{job_id}' is {row.status}; only failed, cancelled or orphaned jobs retry.",
                "job_not_retryable",
            )
        return self.submit(
            project_id,
            row.kind,
            row.params,
            actor,
            name=row.name,
            executor=row.executor,
            retry_of=row,
            author_id=author_id,
        )

    def logs(self, project_id: str, job_id: str, after: int = 0) -> dict[str, Any]:
        """The job's log text after cursor ``after``, and the cursor to ask with next."""
        row = self._row(project_id, job_id)
        with self.db.session() as session:
            chunks = list(
                session.execute(
                    select(JobLog.id, JobLog.text)
                    .where(JobLog.job_id == job_id, JobLog.id > after)
                    .order_by(JobLog.id)
                    .limit(1000)
                )
            )
        return {
            "text": "".join(text for _, text in chunks),
            "next": chunks[-1][0] if chunks else after,
            "finished": row.status in FINISHED,
        }

    # -- what workers and supervisors do -------------------------------------------------

    def load(self, job_id: str) -> Job:
        """The job row by id alone (workers are trusted: the supervisor started them)."""
        with self.db.session() as session:
            row = session.get(Job, job_id)
        if row is None:
            raise JobError(404, f"Job '{job_id}' not found.", "job_not_found")
        return row

    def next_queued(self, executors: Iterable[str]) -> list[str]:
        """Ids of queued jobs for these executors, oldest first."""
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(Job.id)
                    .where(Job.status == QUEUED, Job.executor.in_(list(executors)))
                    .order_by(Job.created_at, Job.id)
                    .limit(50)
                )
            )

    def claim(self, job_id: str, host: str) -> bool:
        """Move a queued job to running on ``host``; False when another replica won."""
        now = time.time()
        with self.db.session() as session:
            return bool(
                changed_rows(
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == QUEUED)
                        .values(
                            status=RUNNING,
                            host=host,
                            started_at=now,
                            heartbeat_at=now,
                            message="starting",
                        )
                    )
                )
            )

    def started(self, job_id: str, pid: int | None) -> None:
        with self.db.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(pid=pid))

    def heartbeat(self, job_id: str) -> bool:
        """Record that the job is alive; returns whether a cancel was asked for."""
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == RUNNING)
                .values(heartbeat_at=time.time())
            )
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def set_progress(self, job_id: str, fraction: float, message: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == RUNNING)
                .values(
                    progress=min(1.0, max(0.0, fraction)),
                    message=message[:2000],
                    heartbeat_at=time.time(),
                )
            )

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        result: Any = None,
        error: str | None = None,
        message: str = "",
    ) -> bool:
        """End a running job; False when it had already ended (first writer wins)."""
        values: dict[str, Any] = {
            "status": status,
            "finished_at": time.time(),
            "error": error,
            "message": message or status,
        }
        if status == SUCCEEDED:
            values["progress"] = 1.0
        if result is not None:
            values["result"] = result
        with self.db.session() as session:
            return bool(
                changed_rows(
                    session.execute(
                        update(Job).where(Job.id == job_id, Job.status == RUNNING).values(**values)
                    )
                )
            )

    def append_log(self, job_id: str, text: str) -> None:
        """Add text to the job's log (split into rows of bounded size)."""
        if not text:
            return
        now = time.time()
        with self.db.session() as session:
            for start in range(0, len(text), MAX_LOG_CHUNK):
                session.add(
                    JobLog(job_id=job_id, text=text[start : start + MAX_LOG_CHUNK], created_at=now)
                )

    def running_on(self, host: str) -> list[Job]:
        with self.db.session() as session:
            return list(session.scalars(select(Job).where(Job.status == RUNNING, Job.host == host)))

    def mark_orphans(self, stale_after: float, dead: Iterable[str] = ()) -> list[str]:
        """Mark running jobs orphaned: those in ``dead`` (their process is known gone) and
        those whose heartbeat is older than ``stale_after`` seconds. Returns their ids."""
        cutoff = time.time() - stale_after
        dead_ids = list(dead)
        with self.db.session() as session:
            candidates = list(
                session.scalars(
                    select(Job.id).where(
                        Job.status == RUNNING,
                        (Job.heartbeat_at < cutoff) | Job.id.in_(dead_ids),
                    )
                )
            )
        marked = []
        for job_id in candidates:
            if self.finish(
                job_id,
                ORPHANED,
                error="its process stopped without reporting how the job ended "
                "(the server or worker was killed); retry it",
                message="orphaned",
            ):
                self.append_log(job_id, "\n[flywheel] job marked orphaned: its process is gone\n")
                marked.append(job_id)
        return marked

    def counts(self, project_id: str) -> dict[str, int]:
        """How many of the project's jobs are in each status."""
        with self.db.session() as session:
            rows = session.execute(
                select(Job.status, func.count())
                .where(Job.project_id == project_id)
                .group_by(Job.status)
            )
            return {status: count for status, count in rows}


__all__ = [
    "CANCELLED",
    "EXECUTORS",
    "FAILED",
    "FINISHED",
    "ORPHANED",
    "QUEUED",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "JobError",
    "JobStore",
    "job_to_dict",
    "this_host",
]
