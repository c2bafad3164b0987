"""The ``ray`` executor: jobs as Ray tasks on a cluster, and multi-worker training on it.

:func:`ray_launcher` connects the server to the cluster at ``FLYWHEEL_RAY_ADDRESS`` (once, on
the first job; it never starts a cluster of its own) and runs each job as a Ray task that
calls :func:`~flywheel.jobs.worker.run_job`, so a job's log, progress, cancel and end reach the
database exactly as they do from a local worker process. The task may run on another node:
it gets the server's settings as plain values and builds its own database connection.

:func:`train_distributed` runs the same LoRA SFT/DPO training as
:mod:`flywheel.tuning.train` on several workers with Ray Train's ``TorchTrainer``: DDP over
gloo, which the Hugging Face trainer inside each worker picks up from the process group Ray
Train set up. Rank 0's log, progress and metrics come back through a small actor to the
calling process, which forwards them to its reporter; rank 0 also ships the adapter back, so
the caller gets it even when rank 0 ran on another node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import ray
from pydantic import SecretStr

from flywheel.config.settings import Settings
from flywheel.jobs.store import JobStore
from flywheel.jobs.supervisor import Launcher, RunningJob

if TYPE_CHECKING:
    from flywheel.tuning.config import TrainSettings
    from flywheel.tuning.report import Reporter
    from flywheel.tuning.train import TrainResult

log = logging.getLogger("flywheel.jobs")

RAY_NAMESPACE = "flywheel"
# Environment a job needs besides its settings (which travel as a task argument, so that
# secrets such as the database URL never show in the cluster's runtime-env listings).
FORWARDED_ENV = (
    "PYTHONPATH",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    # Where an S3-compatible artifact store is; credentials stay with each node (or its role).
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
)
# FLYWHEEL_* variables named like these stay out of the runtime env (an SDK key, say).
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")
# How often the calling process forwards rank 0's reports (seconds).
FORWARD_INTERVAL = 0.5


# -- connecting ----------------------------------------------------------------------------

_connect_lock = threading.Lock()


def connect(address: str | None) -> None:
    """Connect this process to the Ray cluster at ``address`` unless it already is (inside a
    Ray task it always is). An address is required: this never starts a local cluster."""
    with _connect_lock:
        if ray.is_initialized():
            return
        if not address or address.strip().lower() == "local":
            raise RuntimeError(
                "No Ray cluster to run on: set FLYWHEEL_RAY_ADDRESS to a running cluster's "
                "address (e.g. 127.0.0.1:6379)."
            )
        ray.init(
            address=address,
            namespace=RAY_NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
        )
        log.info("connected to the Ray cluster at %s", address)


# -- the executor --------------------------------------------------------------------------


def settings_values(settings: Settings) -> dict[str, Any]:
    """The settings as plain values a process elsewhere rebuilds them from: secrets revealed,
    paths resolved to what this process uses (a job must see the same database and files)."""
    values: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        values[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
    config_file = settings.resolved_config_file
    values.update(
        home=str(settings.home_dir),
        database_url=settings.resolved_database_url,
        artifact_root=settings.resolved_artifact_root,
        model_cache=str(settings.resolved_model_cache),
        config_file=str(config_file.resolve()) if config_file else None,
    )
    return values


def job_env(settings: Settings) -> dict[str, str]:
    """The environment variables of a job's Ray task: the FLYWHEEL_* variables that are not
    settings (plugins, git commit), the import path, offline switches, and the same niceness
    and thread limits a local job process gets."""
    fields = {name.upper() for name in Settings.model_fields}
    env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith("FLYWHEEL_")
        and key.removeprefix("FLYWHEEL_") not in fields
        and not any(word in key for word in SECRET_WORDS)
    }
    env.update({key: os.environ[key] for key in FORWARDED_ENV if key in os.environ})
    env["FLYWHEEL_JOB_NICE"] = str(settings.job_nice)
    if settings.job_threads:
        threads = str(settings.job_threads)
        env.update(OMP_NUM_THREADS=threads, FLYWHEEL_LOCAL_THREADS=threads)
    return env


def _cancel_on_interrupt(ray_sigterm: Any) -> None:
    """A non-force ``ray.cancel`` interrupts the task's main thread as a SIGINT would; turn it
    into the same cooperative cancel a local worker gets from SIGTERM (``run_job`` installs
    that handler), instead of a KeyboardInterrupt that would skip recording the job's end."""

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        # Before run_job installed its handler, the job has not started: nothing to stop.
        if callable(handler) and handler is not ray_sigterm:
            handler(signal.SIGTERM, frame)

    signal.signal(signal.SIGINT, on_interrupt)


def _job_task(job_id: str, values: dict[str, Any]) -> str:
    """What runs in the Ray task: the job, to its recorded end; returns its final status."""
    from flywheel.jobs.worker import apply_resource_limits, run_job
    from flywheel.security.audit import AuditLog
    from flywheel.store import Database

    settings = Settings(**values)
    # No address-space limit here: a Ray worker maps the object store; Ray has its own
    # memory monitor. The lower priority still keeps serving first on a shared machine.
    apply_resource_limits(None, settings.job_nice)
    _cancel_on_interrupt(signal.getsignal(signal.SIGTERM))
    db = Database(settings.resolved_database_url)
    store = JobStore(db, AuditLog(db))
    context = ray.get_runtime_context()
    where = (
        f"Ray task {context.get_task_id()} (node {context.get_node_id()[:12]}, "
        f"{socket.gethostname()} pid {os.getpid()})"
    )

    def services() -> Any:
        from flywheel.server.services import Services

        return Services.build(settings.model_copy(update={"preload_models": False}), worker=True)

    try:
        return run_job(
            store,
            job_id,
            settings.jobs_dir,
            services=services,
            heartbeat_interval=settings.job_heartbeat,
            task_id=where,
            handle_sigterm=True,
        )
    finally:
        db.dispose()


# One fresh worker process per job (max_calls=1): nothing a job changed in its process (torch
# threads, signal handlers, imported plugins, niceness) carries over to the next one. No
# retries: running a job again is the user's decision (POST /retry), never Ray's.
_remote_job_task = ray.remote(max_calls=1, max_retries=0)(_job_task)


@dataclass
class RayTask:
    """A job running as a Ray task, as the supervisor watches it."""

    ref: ray.ObjectRef[str]
    store: JobStore
    job_id: str
    heartbeat: float

    @property
    def task_id(self) -> str:
        return str(self.ref.task_id().hex())

    async def wait(self) -> str:
        """Wait for the task, beating for the job meanwhile (a task waiting for free CPUs has
        no worker of its own yet); describe how it ended, never raise."""
        future = asyncio.ensure_future(self._result())
        while True:
            done, _ = await asyncio.wait({future}, timeout=self.heartbeat)
            if done:
                return future.result()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.store.heartbeat, self.job_id)

    async def _result(self) -> str:
        try:
            status = await self.ref
        except ray.exceptions.TaskCancelledError:
            return f"Ray task {self.task_id} was cancelled"
        except ray.exceptions.WorkerCrashedError:
            return f"the Ray worker running task {self.task_id} died"
        except ray.exceptions.NodeDiedError:
            return f"the Ray node running task {self.task_id} died"
        except ray.exceptions.OutOfMemoryError:
            return f"Ray task {self.task_id} was killed: its node ran out of memory"
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()
            return f"Ray task {self.task_id} failed: {first[0] if first else type(exc).__name__}"
        return f"Ray task {self.task_id} ended: {status}"

    def terminate(self) -> None:
        """Ask the task to stop: it sees a cancel (as from SIGTERM) and records its end; a
        task still waiting for resources is dropped. The job's heartbeat also notices a
        requested cancel on its own within one heartbeat interval."""
        with contextlib.suppress(Exception):
            ray.cancel(self.ref, force=False)

    def kill(self) -> None:
        """Stop it for good: Ray kills the worker process."""
        with contextlib.suppress(Exception):
            ray.cancel(self.ref, force=True)

    def output_tail(self) -> str:
        # The task's own output goes to its job log; the rest is in the Ray worker's log files.
        return ""


def ray_launcher(
    settings: Settings,
    store: JobStore,
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Launcher:
    """Start each job as a Ray task on the cluster at ``settings.ray_address`` (connected on
    the first launch), reserving ``num_cpus``/``num_gpus`` for it.

    The task gets the settings as values and the environment from :func:`job_env` (plugins
    load there as in a local job process); the job's base model and files must be on paths
    the task's node sees (one machine, or shared storage)."""
    address = settings.ray_address
    if not address:
        raise ValueError("the ray executor needs settings.ray_address")
    values = settings_values(settings)
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "runtime_env": {"env_vars": job_env(settings)},
    }

    async def launch(job_id: str) -> RunningJob:
        await asyncio.to_thread(connect, address)
        ref = _remote_job_task.options(name=f"flywheel-job-{job_id}", **options).remote(
            job_id, values
        )
        task = RayTask(ref, store, job_id, settings.job_heartbeat)
        line = f"{time.strftime('%H:%M:%S')} submitted to Ray at {address} as task {task.task_id}\n"
        await asyncio.to_thread(store.append_log, job_id, line)
        return task

    return launch


# -- multi-worker training -----------------------------------------------------------------


@ray.remote(num_cpus=0)
class ReportChannel:
    """Between the training workers and the process that started them: rank 0's reports and
    final payload go one way, a cancel request the other."""

    def __init__(self) -> None:
        self._events: list[tuple[Any, ...]] = []
        self._cancel = False
        self._payload: dict[str, Any] | None = None

    def put(self, event: tuple[Any, ...]) -> None:
        self._events.append(event)

    def take(self) -> list[tuple[Any, ...]]:
        events, self._events = self._events, []
        return events

    def request_cancel(self) -> None:
        self._cancel = True

    def cancelled(self) -> bool:
        return self._cancel

    def finish(self, payload: dict[str, Any]) -> None:
        self._payload = payload

    def payload(self) -> dict[str, Any] | None:
        return self._payload


class WorkerReporter:
    """The :class:`~flywheel.tuning.report.Reporter` each training worker trains with.

    Only rank 0 reports (every rank sees the same steps). ``cancelled`` is a collective: rank
    0 asks the channel and every rank adopts its answer, so all ranks stop after the same step
    instead of some waiting forever in the next all-reduce. The training code asks it at the
    same points on every rank (before training, after each step)."""

    def __init__(self, channel: Any, rank: int, world_size: int) -> None:
        self.channel = channel
        self.rank = rank
        self.world_size = world_size
        self._cancelled = False

    def send(self, *event: Any) -> None:
        self.channel.put.remote(event)

    def log(self, message: str) -> None:
        if self.rank == 0:
            self.send("log", message)

    def progress(self, fraction: float, message: str = "") -> None:
        if self.rank == 0:
            self.send("progress", fraction, message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.rank == 0:
            self.send("metrics", step, dict(values))

    def cancelled(self) -> bool:
        if self._cancelled:
            return True
        asked = self.rank == 0 and bool(ray.get(self.channel.cancelled.remote()))
        import torch
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([1 if asked else 0], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        self._cancelled = asked
        return asked


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: train with the process group Ray Train set up (the Hugging Face
    trainer finds it through RANK/WORLD_SIZE/LOCAL_RANK), rank 0 ships the adapter back."""
    import ray.train
    import torch.distributed as dist

    from flywheel.tuning.report import Cancelled
    from flywheel.tuning.train import train_dpo, train_sft

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    reporter = WorkerReporter(config["channel"], rank, world_size)
    group = (
        f"torch.distributed world size {dist.get_world_size()} ({dist.get_backend()})"
        if dist.is_initialized()
        else "no process group"
    )
    reporter.send(
        "log",
        f"Ray Train worker rank {rank} of {world_size} on {socket.gethostname()} "
        f"pid {os.getpid()}: {group}",
    )
    scratch = Path(tempfile.mkdtemp(prefix=f"flywheel-train-rank{rank}-"))
    output = scratch / "adapter"
    train = train_sft if config["method"] == "sft" else train_dpo
    try:
        try:
            result = train(
                Path(config["base_dir"]),
                config["train"],
                config["held_out"],
                config["settings"],
                output,
                reporter,
            )
        except Cancelled as exc:
            if rank == 0:
                ray.get(config["channel"].finish.remote({"cancelled": str(exc)}))
            return
        if rank != 0:
            return
        files = {
            str(path.relative_to(output)): path.read_bytes()
            for path in sorted(output.rglob("*"))
            if path.is_file()
        }
        values = result.to_dict()
        values.pop("output_dir", None)
        ray.get(config["channel"].finish.remote({"result": values, "files": files}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _forward(channel: Any, reporter: Reporter, stop: threading.Event) -> None:
    """In the calling process: pass rank 0's reports on, and a cancel the other way."""
    cancel_sent = False
    while True:
        stopping = stop.wait(FORWARD_INTERVAL)
        try:
            events = ray.get(channel.take.remote(), timeout=30)
        except ray.exceptions.RayError:
            events = []
        for kind, *args in events:
            try:
                if kind == "log":
                    reporter.log(args[0])
                elif kind == "progress":
                    reporter.progress(args[0], args[1])
                elif kind == "metrics":
                    reporter.metrics(args[0], args[1])
            except Exception:
                log.exception("could not forward a training report")
        if not cancel_sent and reporter.cancelled():
            channel.request_cancel.remote()
            cancel_sent = True
        if stopping:
            return


def _worker_error(exc: Exception) -> BaseException:
    """The first worker's own exception when Ray Train has it (so a data error reads the same
    as in a single-process run), else Ray Train's."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        cause = getattr(first, "cause", None)
        if isinstance(cause, BaseException):
            return cause
        if isinstance(first, BaseException):
            return first
    return exc


def train_distributed(
    method: Literal["sft", "dpo"],
    base_dir: Path,
    train: Sequence[dict[str, Any]],
    held_out: Sequence[dict[str, Any]],
    settings: TrainSettings,
    output_dir: Path,
    reporter: Reporter,
    num_workers: int,
    *,
    use_gpu: bool = False,
    ray_address: str | None = None,
) -> TrainResult:
    """LoRA SFT or DPO (as :func:`~flywheel.tuning.train.train_sft`/``train_dpo``) on
    ``num_workers`` Ray Train workers with DDP (gloo on CPU).

    Runs on the cluster this process belongs to (a job in a Ray task), or connects to
    ``ray_address`` (default: ``FLYWHEEL_RAY_ADDRESS``). Each worker sees the whole data; the
    Hugging Face trainer shards it by rank, so a step covers ``num_workers * batch_size``
    examples. The base model folder must be on a path every worker's node sees. Rank 0's
    adapter lands in ``output_dir``; raises :class:`~flywheel.tuning.report.Cancelled` when
    the reporter cancels, and a worker's own exception when training fails."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from flywheel.tuning.report import Cancelled
    from flywheel.tuning.train import TrainResult

    if num_workers < 1:
        raise ValueError("num_workers must be at least 1")
    if not ray.is_initialized():
        from flywheel.config.settings import get_settings

        connect(ray_address or get_settings().ray_address)
    reporter.log(
        f"distributed {method}: {num_workers} Ray Train workers, DDP over "
        f"{'nccl' if use_gpu else 'gloo'} (world size {num_workers})"
    )
    channel = ReportChannel.remote()  # type: ignore[attr-defined]
    storage = Path(tempfile.mkdtemp(prefix="flywheel-ray-train-"))

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            """Keep the job's own SIGINT handler: Ray Train's would abort the run (and exit
            the task) where the job's turns a ``ray.cancel`` into a cooperative cancel that
            stops every rank after the same step."""

    trainer = Trainer(
        _train_worker,
        train_loop_config={
            "method": method,
            "base_dir": str(base_dir),
            "train": list(train),
            "held_out": list(held_out),
            "settings": settings,
            "channel": channel,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"flywheel-{method}-{uuid.uuid4().hex[:12]}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    stop = threading.Event()
    forwarder = threading.Thread(
        target=_forward, args=(channel, reporter, stop), name="flywheel-train-reports"
    )
    forwarder.start()
    try:
        # On the calling thread: inside a Ray task, only a main-thread wait gives the task's
        # CPU back to the workers it waits for.
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise _worker_error(exc) from exc
        except KeyboardInterrupt as exc:
            # A non-force ray.cancel of the job's task: the job's handler has recorded the
            # cancel, and Ray also breaks the wait. The workers go with this task.
            raise Cancelled("cancelled while training") from exc
        payload = ray.get(channel.payload.remote())
    finally:
        stop.set()
        forwarder.join()
        with contextlib.suppress(Exception):
            ray.kill(channel)
        shutil.rmtree(storage, ignore_errors=True)
    if payload is None:
        raise RuntimeError("distributed training ended without a result from rank 0")
    if "cancelled" in payload:
        raise Cancelled(payload["cancelled"])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, data in payload["files"].items():
        target = output_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    reporter.log(f"rank 0's adapter ({len(payload['files'])} files) written to {output_dir}")
    return TrainResult(output_dir=output_dir, **payload["result"])


__all__ = [
    "RAY_NAMESPACE",
    "RayTask",
    "ReportChannel",
    "WorkerReporter",
    "connect",
    "job_env",
    "ray_launcher",
    "settings_values",
    "train_distributed",
]
