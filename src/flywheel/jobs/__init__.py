"""Jobs: long work (fine-tunes, merges, quantization, batch evals, ingestion) that runs outside
the request, with its state, log and progress in the database."""

from flywheel.jobs.context import JobContext
from flywheel.jobs.kinds import JobKind, job_kind, job_kinds, register_job_kind
from flywheel.jobs.store import FINISHED, STATUSES, JobError, JobStore, job_to_dict
from flywheel.jobs.supervisor import JobSupervisor, local_launcher

__all__ = [
    "FINISHED",
    "STATUSES",
    "JobContext",
    "JobError",
    "JobKind",
    "JobStore",
    "JobSupervisor",
    "job_kind",
    "job_kinds",
    "job_to_dict",
    "local_launcher",
    "register_job_kind",
]
