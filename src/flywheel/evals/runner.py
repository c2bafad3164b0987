"""Eval runs: answer every item of a dataset version with a target, score, summarise.

A run has three phases. Answers come concurrently (``concurrency`` calls in flight) through
the gateway, so they are traced, limited and budgeted like any call; a response cache keyed
by the target, its parameters and the messages serves re-runs. Deterministic scorers then
run over all answers in a worker thread (batched where a scorer can batch), and LLM judges
run concurrently through the gateway. Per-item results and the summary (mean and 95%
bootstrap interval per scorer, threshold verdicts) are stored with the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from flywheel.datasets.store import DatasetStore
from flywheel.errors import ServiceError
from flywheel.evals.base import AnyScorer, Sample, Score, Scorer, is_judge
from flywheel.evals.stats import mean_ci
from flywheel.evals.suites import EvalError, SuiteSpec, is_prompt
from flywheel.store import Database, EvalResult, EvalRun, ResponseCache

log = logging.getLogger("flywheel.evals")

# (project id, chat-completion body) -> (response body, {"latency_ms", "cost", "trace_id"})
Caller = Callable[[str, dict[str, Any]], Awaitable[tuple[dict[str, Any], dict[str, Any]]]]
# (project id, target) -> the pinned target (a prompt label resolved to its version); raises
# ServiceError for a target the gateway does not know.
TargetResolver = Callable[[str, str], str]
# Whether a target renders a prompt (then items' variables are sent, not their messages).
PromptTargetCheck = Callable[[str], bool]

FINISHED = ("completed", "failed", "cancelled")
PROGRESS_SECONDS = 0.5
# A running run whose heartbeat is older than this lost its server (a restart, a crash).
STALE_SECONDS = 60.0
# How long a cancel of a run in another process waits for it to stop before answering.
CANCEL_WAIT_SECONDS = 10.0


@dataclass
class Answer:
    """What the target said to one item (or why it could not)."""

    output: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    cost: float | None = None
    trace_id: str | None = None
    cached: bool = False
    # The passages a rag target retrieved (its citations): context for groundedness judges.
    context: list[str] | None = None


def _cited_context(response: dict[str, Any]) -> list[str] | None:
    citations = response.get("citations")
    if not isinstance(citations, list):
        return None
    return [str(c.get("text") or "") for c in citations if isinstance(c, dict)]


@dataclass
class _Progress:
    done: int = 0
    failed: int = 0
    cache_hits: int = 0
    phase: str = "answering"


@dataclass
class _Job:
    run_id: str
    project_id: str
    spec: SuiteSpec
    target: str
    items: list[dict[str, Any]]
    # The chat request of each item, built (and so checked) when the run starts.
    bodies: list[dict[str, Any]]
    scorers: list[AnyScorer]
    progress: _Progress = field(default_factory=_Progress)


def run_to_dict(row: EvalRun) -> dict[str, Any]:
    return {
        "id": row.id,
        "suite": row.suite,
        "dataset": row.dataset,
        "dataset_version": row.dataset_version,
        "split": row.split,
        "target": row.target,
        "resolved_target": row.resolved_target,
        "status": row.status,
        "total": row.total,
        "done": row.done,
        "failed": row.failed,
        "cache_hits": row.cache_hits,
        "summary": row.summary,
        "error": row.error,
        "spec": row.spec,
        "created_at": row.created_at,
        "created_by": row.created_by,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "cancel_requested": row.cancel_requested_at is not None,
    }


def result_to_dict(row: EvalResult) -> dict[str, Any]:
    return {
        "position": row.position,
        "item_hash": row.item_hash,
        "output": row.output,
        "error": row.error,
        "latency_ms": row.latency_ms,
        "cost": row.cost,
        "cached": row.cached,
        "trace_id": row.trace_id,
        "scores": row.scores,
        "details": row.details,
    }


def cache_key(target: str, body: dict[str, Any]) -> str:
    """The response-cache key: target, parameters and messages (or variables)."""
    canonical = json.dumps({"target": target, **body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_body(
    target: str, item: dict[str, Any], params: dict[str, Any], prompt_target: bool
) -> dict[str, Any]:
    """The chat request for one item: a prompt target gets the item's variables (its
    template makes the messages); any other target gets the item's messages."""
    body: dict[str, Any] = {**params, "model": target}
    if prompt_target and item.get("variables") is not None:
        body["variables"] = item["variables"]
    elif item.get("messages"):
        body["messages"] = item["messages"]
        if prompt_target:
            body["variables"] = {}
    else:
        raise EvalError(400, "the item has no messages for a non-prompt target", "no_messages")
    return body


def _answer_text(response: dict[str, Any]) -> str:
    choices = response.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else ""


def summarize(
    scorers: Sequence[AnyScorer],
    thresholds: dict[str, float],
    scores: Sequence[dict[str, float | None]],
    answers: Sequence[Answer],
) -> dict[str, Any]:
    """Per scorer: mean, 95% bootstrap interval, n, errors and the threshold verdict."""
    by_scorer: dict[str, Any] = {}
    passed = True
    for scorer in scorers:
        values = [row.get(scorer.name) for row in scores]
        interval = mean_ci(values)
        threshold = thresholds.get(scorer.name)
        verdict: bool | None = None
        if threshold is not None:
            if interval.mean is None:
                verdict = False
            elif scorer.higher_is_better:
                verdict = interval.mean >= threshold
            else:
                verdict = interval.mean <= threshold
            passed = passed and verdict
        by_scorer[scorer.name] = {
            "mean": interval.mean,
            "low": interval.low,
            "high": interval.high,
            "n": interval.n,
            "errors": sum(1 for v in values if v is None),
            "higher_is_better": scorer.higher_is_better,
            "threshold": threshold,
            "passed": verdict,
        }
    latencies = sorted(a.latency_ms for a in answers if a.latency_ms is not None)
    costs = [a.cost for a in answers if a.cost is not None]
    return {
        "scorers": by_scorer,
        "passed": passed,
        "items": len(answers),
        "failed_items": sum(1 for a in answers if a.error is not None),
        "cache_hits": sum(1 for a in answers if a.cached),
        "latency_ms": {
            "mean": sum(latencies) / len(latencies) if latencies else None,
            "p50": latencies[len(latencies) // 2] if latencies else None,
            "p95": latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
            if latencies
            else None,
        },
        "cost": sum(costs) if costs else None,
    }


class EvalRunner:
    """Starts runs as background tasks of the server's event loop and answers queries."""

    def __init__(
        self,
        db: Database,
        datasets: DatasetStore,
        caller: Caller,
        resolve_target: TargetResolver,
        is_prompt_target: PromptTargetCheck = is_prompt,
    ) -> None:
        self.db = db
        self.datasets = datasets
        self.caller = caller
        self.resolve_target = resolve_target
        self.is_prompt_target = is_prompt_target
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._jobs: dict[str, _Job] = {}
        self._reaped: dict[str, float] = {}

    # -- starting -------------------------------------------------------------------------

    async def start(
        self,
        project_id: str,
        spec: SuiteSpec,
        *,
        author: str,
        target: str | None = None,
        suite_name: str | None = None,
    ) -> dict[str, Any]:
        """Check the run, store it as ``running`` and start it; returns the run."""
        scorers = spec.build_scorers()
        target = target or spec.target
        resolved = await asyncio.to_thread(self.resolve_target, project_id, target)
        version, items = await asyncio.to_thread(
            self.datasets.items, project_id, spec.dataset, spec.dataset_version, split=spec.split
        )
        if not items:
            raise EvalError(400, f"The {spec.split} split of that dataset is empty.", "empty")
        prompt_target = self.is_prompt_target(resolved)
        bodies = []
        for item in items:
            try:
                bodies.append(request_body(resolved, item, spec.params, prompt_target))
            except EvalError as exc:
                raise EvalError(
                    400,
                    f"Item {item['position']} of {spec.dataset}@{version['version']}: "
                    f"{exc.message}",
                    exc.code,
                    "dataset",
                ) from None
        now = time.time()
        row = EvalRun(
            id=uuid.uuid4().hex,
            project_id=project_id,
            suite=suite_name,
            dataset=spec.dataset,
            dataset_version=version["version"],
            split=spec.split,
            target=target,
            resolved_target=resolved,
            spec={**spec.model_dump(mode="json"), "dataset_version": version["version"]},
            status="running",
            total=len(items),
            created_at=now,
            created_by=author,
            started_at=now,
            heartbeat_at=now,
        )
        await asyncio.to_thread(self._insert, row)
        job = _Job(row.id, project_id, spec, resolved, items, bodies, scorers)
        self._jobs[row.id] = job
        task = asyncio.create_task(self._execute(job), name=f"eval-run-{row.id}")
        self._tasks[row.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(row.id, None))
        return run_to_dict(row)

    def _insert(self, row: EvalRun) -> None:
        with self.db.session() as session:
            session.add(row)

    async def wait(self, run_id: str) -> None:
        """Until a run this process started has finished (for tests and the CLI)."""
        task = self._tasks.get(run_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def cancel(self, project_id: str, run_id: str) -> dict[str, Any]:
        """Stop a running run; its finished items are kept."""
        run = await asyncio.to_thread(self.get, project_id, run_id)
        if run["status"] in FINISHED:
            raise EvalError(409, f"Run {run_id} has already {run['status']}.", "conflict")
        task = self._tasks.get(run_id)
        if task is not None:
            task.cancel()
            await self.wait(run_id)
            return await asyncio.to_thread(self.get, project_id, run_id)
        # Another process runs it (a replica, a job): it reads the request with its heartbeat.
        await asyncio.to_thread(self._request_cancel, run_id)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        while True:
            run = await asyncio.to_thread(self.get, project_id, run_id)
            if run["status"] in FINISHED or time.monotonic() >= deadline:
                return run
            await asyncio.sleep(PROGRESS_SECONDS / 2)

    def _request_cancel(self, run_id: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(EvalRun)
                .where(EvalRun.id == run_id, EvalRun.cancel_requested_at.is_(None))
                .values(cancel_requested_at=time.time())
            )

    async def close(self) -> None:
        """Cancel every run in flight (at shutdown); they are marked cancelled."""
        for task in list(self._tasks.values()):
            task.cancel()
        for run_id in list(self._tasks):
            await self.wait(run_id)

    # -- running --------------------------------------------------------------------------

    async def _execute(self, job: _Job) -> None:
        started = time.perf_counter()
        reporter = asyncio.create_task(self._report_progress(job))
        status, error = "completed", None
        answers: list[Answer] = []
        scores: list[dict[str, float | None]] = []
        details: list[dict[str, Any]] = []
        try:
            answers = await self._answer_all(job)
            job.progress.phase = "scoring"
            scores, details = await self._score_all(job, answers)
        except asyncio.CancelledError:
            status, error = "cancelled", "cancelled"
        except Exception as exc:  # a run must end in a stored state, whatever went wrong
            log.exception("eval run %s failed", job.run_id)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            reporter.cancel()
            summary = None
            if status == "completed":
                summary = summarize(job.scorers, job.spec.thresholds, scores, answers)
                summary["duration_s"] = round(time.perf_counter() - started, 3)
            await asyncio.shield(
                asyncio.to_thread(
                    self._finish, job, status, error, summary, answers, scores, details
                )
            )
            self._jobs.pop(job.run_id, None)

    async def _answer_all(self, job: _Job) -> list[Answer]:
        bodies = job.bodies
        keys = [cache_key(job.target, body) for body in bodies]
        cached = await asyncio.to_thread(self._cached, keys) if job.spec.cache else {}
        answers: list[Answer] = [Answer() for _ in job.items]
        gate = asyncio.Semaphore(job.spec.concurrency)
        fresh: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

        async def answer(index: int) -> None:
            hit = cached.get(keys[index])
            if hit is not None:
                answers[index] = Answer(
                    output=_answer_text(hit["response"]),
                    latency_ms=hit["meta"].get("latency_ms"),
                    cost=hit["meta"].get("cost"),
                    trace_id=hit["meta"].get("trace_id"),
                    cached=True,
                    context=_cited_context(hit["response"]),
                )
                job.progress.cache_hits += 1
                job.progress.done += 1
                return
            async with gate:
                try:
                    response, meta = await self.caller(job.project_id, bodies[index])
                except ServiceError as exc:
                    answers[index] = Answer(error=f"{exc.status_code}: {exc.message}")
                except Exception as exc:  # one item's failure never stops the run
                    answers[index] = Answer(error=f"{type(exc).__name__}: {exc}")
                else:
                    answers[index] = Answer(
                        output=_answer_text(response),
                        latency_ms=meta.get("latency_ms"),
                        cost=meta.get("cost"),
                        trace_id=meta.get("trace_id"),
                        context=_cited_context(response),
                    )
                    fresh.append((keys[index], response, meta))
            if answers[index].error is not None:
                job.progress.failed += 1
            job.progress.done += 1

        await asyncio.gather(*(answer(i) for i in range(len(job.items))))
        if fresh and job.spec.cache:
            await asyncio.to_thread(self._store_cache, job.target, fresh)
        return answers

    def _cached(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(keys))
        with self.db.session() as session:
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                for row in session.scalars(
                    select(ResponseCache).where(ResponseCache.key.in_(chunk))
                ):
                    found[row.key] = row.response
        return found

    def _store_cache(
        self, target: str, fresh: list[tuple[str, dict[str, Any], dict[str, Any]]]
    ) -> None:
        # A concurrent run may store the same answers first: theirs are as good.
        with contextlib.suppress(IntegrityError):
            self._insert_cache(target, fresh)

    def _insert_cache(
        self, target: str, fresh: list[tuple[str, dict[str, Any], dict[str, Any]]]
    ) -> None:
        now = time.time()
        with self.db.session() as session:
            present: set[str] = set()
            keys = [key for key, _, _ in fresh]
            for start in range(0, len(keys), 500):
                present.update(
                    session.scalars(
                        select(ResponseCache.key).where(
                            ResponseCache.key.in_(keys[start : start + 500])
                        )
                    )
                )
            for key, response, meta in fresh:
                if key not in present:
                    present.add(key)
                    session.add(
                        ResponseCache(
                            key=key,
                            target=target,
                            response={"response": response, "meta": meta},
                            created_at=now,
                        )
                    )

    def _samples(self, job: _Job, answers: list[Answer]) -> list[Sample]:
        return [
            Sample(
                output=answer.output or "",
                expected=item.get("expected"),
                messages=item.get("messages") or [],
                context=item.get("context") or answer.context or [],
                metadata={**(item.get("metadata") or {}), "variables": item.get("variables")},
                latency_ms=answer.latency_ms,
                cost=answer.cost,
            )
            for item, answer in zip(job.items, answers, strict=True)
        ]

    async def _score_all(
        self, job: _Job, answers: list[Answer]
    ) -> tuple[list[dict[str, float | None]], list[dict[str, Any]]]:
        samples = self._samples(job, answers)
        answered = [i for i, answer in enumerate(answers) if answer.error is None]
        scores: list[dict[str, float | None]] = [{} for _ in samples]
        details: list[dict[str, Any]] = [{} for _ in samples]

        def keep(index: int, name: str, score: Score) -> None:
            scores[index][name] = score.value
            if score.detail or score.error:
                details[index][name] = {**(score.detail or {}), "error": score.error}

        plain = [s for s in job.scorers if isinstance(s, Scorer) and not is_judge(s)]
        judges = [s for s in job.scorers if is_judge(s)]

        def run_plain() -> None:
            for scorer in plain:
                chosen = [samples[i] for i in answered]
                batch = getattr(scorer, "score_many", None)
                results = batch(chosen) if batch else [scorer.score(s) for s in chosen]
                for index, score in zip(answered, results, strict=True):
                    keep(index, scorer.name, score)

        await asyncio.to_thread(run_plain)
        if judges:
            gate = asyncio.Semaphore(job.spec.concurrency)

            async def complete(body: dict[str, Any]) -> dict[str, Any]:
                # Judges' calls are cached like answers: a re-run asks the judge again only
                # for answers it has not seen.
                key = cache_key(str(body.get("model")), body)
                if job.spec.cache:
                    hit = (await asyncio.to_thread(self._cached, [key])).get(key)
                    if hit is not None:
                        response: dict[str, Any] = hit["response"]
                        return response
                response, meta = await self.caller(job.project_id, body)
                if job.spec.cache:
                    await asyncio.to_thread(
                        self._store_cache, str(body.get("model")), [(key, response, meta)]
                    )
                return response

            async def judge(index: int, scorer: AnyScorer) -> None:
                async with gate:
                    try:
                        score = await scorer.ascore(samples[index], complete)  # type: ignore[union-attr]
                    except Exception as exc:  # a judge failing on one item scores it None
                        score = Score(None, error=f"{type(exc).__name__}: {exc}")
                keep(index, scorer.name, score)

            await asyncio.gather(*(judge(i, s) for s in judges for i in answered))
        for index, answer in enumerate(answers):
            if answer.error is not None:
                for scorer in job.scorers:
                    scores[index][scorer.name] = None
        return scores, details

    async def _report_progress(self, job: _Job) -> None:
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            progress = job.progress
            cancel_requested = await asyncio.to_thread(
                self._heartbeat,
                job.run_id,
                done=progress.done,
                failed=progress.failed,
                cache_hits=progress.cache_hits,
                heartbeat_at=time.time(),
            )
            task = self._tasks.get(job.run_id)
            if cancel_requested and task is not None:
                log.info("eval run %s: cancel requested elsewhere", job.run_id)
                task.cancel()
                return

    def _heartbeat(self, run_id: str, **values: Any) -> bool:
        """Store progress; True when a cancel was requested from another process."""
        with self.db.session() as session:
            session.execute(update(EvalRun).where(EvalRun.id == run_id).values(**values))
            requested = session.scalar(
                select(EvalRun.cancel_requested_at).where(EvalRun.id == run_id)
            )
        return requested is not None

    def _finish(
        self,
        job: _Job,
        status: str,
        error: str | None,
        summary: dict[str, Any] | None,
        answers: list[Answer],
        scores: list[dict[str, float | None]],
        details: list[dict[str, Any]],
    ) -> None:
        with self.db.session() as session:
            if answers and scores:
                session.add_all(
                    EvalResult(
                        run_id=job.run_id,
                        position=item["position"],
                        item_hash=item["hash"],
                        output=answer.output,
                        error=answer.error,
                        latency_ms=answer.latency_ms,
                        cost=answer.cost,
                        cached=answer.cached,
                        trace_id=answer.trace_id,
                        scores=score,
                        details=detail,
                    )
                    for item, answer, score, detail in zip(
                        job.items, answers, scores, details, strict=True
                    )
                )
            session.execute(
                update(EvalRun)
                .where(EvalRun.id == job.run_id)
                .values(
                    status=status,
                    error=error,
                    summary=summary,
                    done=job.progress.done,
                    failed=job.progress.failed,
                    cache_hits=job.progress.cache_hits,
                    finished_at=time.time(),
                )
            )

    # -- reading --------------------------------------------------------------------------

    def _reap(self, project_id: str) -> None:
        """Runs left ``running`` by a server that stopped are marked failed (looked for at
        most every few seconds per project: reads poll often)."""
        now = time.time()
        if now - self._reaped.get(project_id, 0.0) < STALE_SECONDS / 10:
            return
        self._reaped[project_id] = now
        stale = now - STALE_SECONDS
        with self.db.session() as session:
            session.execute(
                update(EvalRun)
                .where(
                    EvalRun.project_id == project_id,
                    EvalRun.status == "running",
                    EvalRun.heartbeat_at < stale,
                    EvalRun.id.not_in(list(self._jobs) or [""]),
                )
                .values(
                    status="failed",
                    error="interrupted: the server running it stopped",
                    finished_at=time.time(),
                )
                .execution_options(synchronize_session=False)
            )

    def get(self, project_id: str, run_id: str) -> dict[str, Any]:
        self._reap(project_id)
        with self.db.session() as session:
            row = session.get(EvalRun, run_id)
            if row is None or row.project_id != project_id:
                raise EvalError(404, f"No eval run '{run_id}'.", "not_found", "run_id")
            view = run_to_dict(row)
        job = self._jobs.get(run_id)
        if job is not None:  # fresher than the row, which is written twice a second
            view.update(
                done=job.progress.done,
                failed=job.progress.failed,
                cache_hits=job.progress.cache_hits,
                phase=job.progress.phase,
            )
        return view

    def recent(
        self, project_id: str, *, suite: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        self._reap(project_id)
        query = select(EvalRun).where(EvalRun.project_id == project_id)
        if suite is not None:
            query = query.where(EvalRun.suite == suite)
        query = query.order_by(EvalRun.created_at.desc()).limit(max(1, min(limit, 500)))
        with self.db.session() as session:
            return [run_to_dict(row) for row in session.scalars(query)]

    def results(self, project_id: str, run_id: str) -> list[dict[str, Any]]:
        """A run's per-item results, in dataset order."""
        self.get(project_id, run_id)
        query = select(EvalResult).where(EvalResult.run_id == run_id).order_by(EvalResult.position)
        with self.db.session() as session:
            return [result_to_dict(row) for row in session.scalars(query)]
