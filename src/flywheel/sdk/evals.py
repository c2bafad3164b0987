"""The SDK's datasets, feedback and evals: ``client.datasets``, ``client.feedback`` and
``client.evals``.

    version = client.datasets.import_file("qa", "qa.jsonl")
    client.feedback.post(trace_id, rating="up", correction="A better answer.")
    baseline = client.evals.run("qa-suite", target="production", wait=True)
    candidate = client.evals.run("qa-suite", target="4", wait=True)
    report = client.evals.compare(baseline["id"], candidate["id"])
    assert report["gate"]["passed"]
    job = client.evals.run("qa-suite", background=True)  # an eval.run job
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flywheel.sdk._paths import Transport as _Transport
from flywheel.sdk._paths import api_path
from flywheel.sdk._paths import clean as _clean
from flywheel.sdk.jobs import Jobs

FINISHED = ("completed", "failed", "cancelled")
_Dicts = list[dict[str, Any]]


def _jsonl(data: bytes) -> Iterator[dict[str, Any]]:
    for line in data.decode().splitlines():
        if line.strip():
            yield json.loads(line)


class Datasets:
    """Versioned datasets: ``client.datasets``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def list(self) -> _Dicts:
        """Every dataset of the project with its newest version."""
        data: _Dicts = self._client._request("GET", "/api/datasets")["data"]
        return data

    def get(self, name: str, version: int | None = None) -> dict[str, Any]:
        """A version (the newest by default) and ``versions``, the list of all."""
        data: dict[str, Any] = self._client._request(
            "GET", api_path("api", "datasets", name), params=_clean({"version": version})
        )
        return data

    def create(
        self,
        name: str,
        items: _Dicts,
        *,
        message: str = "",
        description: str | None = None,
        test_fraction: float = 0.2,
    ) -> dict[str, Any]:
        """A new version holding ``items`` (``created`` is False when the content equals
        the newest version's, which is returned instead)."""
        body = _clean(
            {
                "name": name,
                "items": items,
                "message": message,
                "description": description,
                "test_fraction": test_fraction,
            }
        )
        data: dict[str, Any] = self._client._request("POST", "/api/datasets", json=body)
        return data

    def import_file(
        self,
        name: str,
        path: str | Path,
        *,
        format: str | None = None,
        message: str = "",
        test_fraction: float = 0.2,
    ) -> dict[str, Any]:
        """A new version from a JSONL, CSV or Parquet file (format from the suffix)."""
        file = Path(path)
        params = _clean(
            {
                "filename": file.name,
                "format": format,
                "message": message or None,
                "test_fraction": test_fraction,
            }
        )
        data: dict[str, Any] = self._client._request(
            "POST",
            api_path("api", "datasets", name, "import"),
            params=params,
            content=file.read_bytes(),
        )
        return data

    def from_traces(self, name: str, **selection: Any) -> dict[str, Any]:
        """A new version from chat traces: ``route``, ``model``, ``since``, ``until``,
        ``min_rating``, ``max_rating``, ``with_feedback``, ``with_correction``, ``flag``,
        ``expected`` ("correction", "output" or "correction_or_output"), ``limit``,
        ``message``, ``test_fraction``."""
        data: dict[str, Any] = self._client._request(
            "POST", api_path("api", "datasets", name, "from-traces"), json=_clean(selection)
        )
        return data

    def items(self, name: str, version: int | None = None, *, split: str | None = None) -> _Dicts:
        """Every item of a version (one split only, if given), in order."""
        out: _Dicts = []
        while True:
            page = self._client._request(
                "GET",
                api_path("api", "datasets", name, "items"),
                params=_clean(
                    {"version": version, "split": split, "offset": len(out), "limit": 1000}
                ),
            )
            out += page["data"]
            version = page["version"]["version"]
            if len(page["data"]) < 1000:
                return out

    def export(self, name: str, version: int | None = None, *, split: str | None = None) -> _Dicts:
        """A version's items in the JSONL shape the import reads."""
        raw = self._client._raw(
            api_path("api", "datasets", name, "export"),
            _clean({"version": version, "split": split}),
        )
        return list(_jsonl(raw))

    def profile(self, name: str, version: int | None = None) -> dict[str, Any]:
        """Data quality: duplicates, empty and overlong items, token lengths, PII."""
        data: dict[str, Any] = self._client._request(
            "GET", api_path("api", "datasets", name, "profile"), params=_clean({"version": version})
        )
        return data


class Feedback:
    """Feedback on traces and the annotation queue: ``client.feedback``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def post(
        self,
        trace_id: str,
        *,
        rating: bool | str | float | None = None,
        comment: str | None = None,
        correction: str | None = None,
    ) -> dict[str, Any]:
        """Rate a trace (``"up"``/``"down"``, a bool, or 0-1), comment, or correct it."""
        body = _clean({"rating": rating, "comment": comment, "correction": correction})
        data: dict[str, Any] = self._client._request(
            "POST", api_path("api", "traces", trace_id, "feedback"), json=body
        )
        return data

    def for_trace(self, trace_id: str) -> _Dicts:
        data: _Dicts = self._client._request(
            "GET", api_path("api", "traces", trace_id, "feedback")
        )["data"]
        return data

    def export_sft(self, min_rating: float = 0.75) -> _Dicts:
        """Chat-format SFT examples from corrections and well-rated answers."""
        return list(
            _jsonl(
                self._client._raw(
                    "/api/feedback/export", {"format": "sft", "min_rating": min_rating}
                )
            )
        )

    def export_dpo(self, margin: float = 0.5) -> _Dicts:
        """DPO pairs (prompt, chosen, rejected) from corrections and rated answers."""
        return list(
            _jsonl(self._client._raw("/api/feedback/export", {"format": "dpo", "margin": margin}))
        )

    def enqueue(
        self, queue: str = "default", *, trace_ids: list[str] | None = None, **match: Any
    ) -> int:
        """Add traces to an annotation queue (the ones named, or the newest matching
        ``route``/``model``/``since``/``until``, up to ``limit``); returns how many."""
        body = _clean({"trace_ids": trace_ids, **match})
        data = self._client._request(
            "POST", api_path("api", "annotation", "queues", queue, "tasks"), json=body
        )
        return int(data["added"])

    def next_task(self, queue: str = "default") -> dict[str, Any] | None:
        """The caller's open task or the next free one, claimed; None when empty."""
        data = self._client._request("POST", api_path("api", "annotation", "queues", queue, "next"))
        task: dict[str, Any] | None = data["task"]
        return task

    def complete(self, task_id: int, **feedback: Any) -> dict[str, Any]:
        """Close a task with ``rating``, ``comment`` and/or ``correction``."""
        data: dict[str, Any] = self._client._request(
            "POST",
            api_path("api", "annotation", "tasks", task_id, "complete"),
            json=_clean(feedback),
        )
        return data

    def skip(self, task_id: int) -> None:
        self._client._request("POST", api_path("api", "annotation", "tasks", task_id, "skip"))


class Evals:
    """Suites, runs and comparisons: ``client.evals``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def suites(self) -> _Dicts:
        data: _Dicts = self._client._request("GET", "/api/evals/suites")["data"]
        return data

    def put_suite(self, name: str, **definition: Any) -> dict[str, Any]:
        """Create or replace a suite: ``dataset``, ``target``, ``scorers``, ``thresholds``
        and optionally ``dataset_version``, ``split``, ``params``, ``concurrency``…"""
        data: dict[str, Any] = self._client._request(
            "PUT", api_path("api", "evals", "suites", name), json={"name": name, **definition}
        )
        return data

    def run(
        self,
        suite: str | dict[str, Any],
        *,
        target: str | None = None,
        wait: bool = False,
        timeout: float = 3600,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        background: bool = False,
    ) -> dict[str, Any]:
        """Start a run of a stored suite (its name) or an inline one (a dict); ``target``
        overrides the suite's (for a prompt suite, a label or version number is enough).
        With ``wait``, poll until it finishes, calling ``on_progress`` with each state.

        With ``background``, an ``eval.run`` job runs it in a job worker instead: the job is
        returned (follow it with ``client.jobs``), or with ``wait`` the job once it ended,
        whose ``result`` holds the ``run_id`` and the run's ``summary``. A stored suite may
        then be ``NAME@N``: that suite on version N of its dataset."""
        body: dict[str, Any] = {"suite": suite} if isinstance(suite, str) else {"spec": suite}
        if target is not None:
            body["target"] = target
        if background:
            job: dict[str, Any] = self._client._request(
                "POST", "/api/jobs", json={"kind": "eval.run", "params": body}
            )
            return Jobs(self._client).wait(job["id"], timeout=timeout) if wait else job
        run: dict[str, Any] = self._client._request("POST", "/api/evals/runs", json=body)
        return self.wait(run["id"], timeout=timeout, on_progress=on_progress) if wait else run

    def wait(
        self,
        run_id: str,
        *,
        timeout: float = 3600,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 0.25,
    ) -> dict[str, Any]:
        """Poll a run until it is completed, failed or cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(run_id)
            if on_progress is not None:
                on_progress(run)
            if run["status"] in FINISHED:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"eval run {run_id} did not finish within {timeout:g} s")
            time.sleep(poll)

    def get(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self._client._request(
            "GET", api_path("api", "evals", "runs", run_id)
        )
        return data

    def runs(self, suite: str | None = None, limit: int = 50) -> _Dicts:
        data: _Dicts = self._client._request(
            "GET", "/api/evals/runs", params=_clean({"suite": suite, "limit": limit})
        )["data"]
        return data

    def results(self, run_id: str) -> _Dicts:
        """Per-item outputs, scores and scorer details."""
        data: _Dicts = self._client._request(
            "GET", api_path("api", "evals", "runs", run_id, "results")
        )["data"]
        return data

    def cancel(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self._client._request(
            "POST", api_path("api", "evals", "runs", run_id, "cancel")
        )
        return data

    def compare(
        self, baseline: str, candidate: str, *, test: str = "permutation"
    ) -> dict[str, Any]:
        """Per scorer: delta, paired CI, p-value and W/T/L; the regressions side by side;
        and ``gate`` (``passed`` and each check)."""
        data: dict[str, Any] = self._client._request(
            "GET",
            "/api/evals/compare",
            params={"baseline": baseline, "candidate": candidate, "test": test},
        )
        return data
