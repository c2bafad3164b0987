"""The SDK's jobs (``client.jobs``), experiment runs (``client.runs``) and model registry
(``client.models``).

job = client.jobs.submit("tune.sft", {"base": "builtin:smollm2", "dataset": "support@3"})
client.jobs.wait(job["id"], on_log=print)["status"]
client.runs.compare([run_a, run_b])["params"]
client.models.card("support-bot@2")
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flywheel.sdk._paths import Transport as _Transport
from flywheel.sdk._paths import api_path
from flywheel.sdk._paths import clean as _clean

_Dicts = list[dict[str, Any]]
FINISHED = frozenset({"succeeded", "failed", "cancelled", "orphaned"})


class Jobs:
    """Submit, follow, cancel and retry long work: ``client.jobs``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def kinds(self) -> _Dicts:
        """The kinds of job the server runs."""
        data: _Dicts = self._client._request("GET", "/api/jobs/kinds")["data"]
        return data

    def list(
        self, *, status: str | None = None, kind: str | None = None, limit: int = 100
    ) -> _Dicts:
        """The project's jobs, newest first."""
        params = _clean({"status": status, "kind": kind, "limit": limit})
        data: _Dicts = self._client._request("GET", "/api/jobs", params=params)["data"]
        return data

    def submit(
        self,
        kind: str,
        params: dict[str, Any] | None = None,
        *,
        name: str = "",
        executor: str | None = None,
    ) -> dict[str, Any]:
        """Queue a job of ``kind`` (see :meth:`kinds`); bad params are refused now (400)."""
        body = _clean({"kind": kind, "params": params or {}, "name": name, "executor": executor})
        job: dict[str, Any] = self._client._request("POST", "/api/jobs", json=body)
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._client._request("GET", api_path("api", "jobs", job_id))
        return job

    def logs(self, job_id: str, after: int = 0) -> dict[str, Any]:
        """Log text after cursor ``after``: ``{"text", "next", "finished"}``."""
        found: dict[str, Any] = self._client._request(
            "GET", api_path("api", "jobs", job_id, "logs"), params={"after": after}
        )
        return found

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._client._request(
            "POST", api_path("api", "jobs", job_id, "cancel")
        )
        return job

    def retry(self, job_id: str) -> dict[str, Any]:
        """A new job with the same kind and params as a failed, cancelled or orphaned one."""
        job: dict[str, Any] = self._client._request(
            "POST", api_path("api", "jobs", job_id, "retry")
        )
        return job

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_log: Callable[[str], None] | None = None,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow a job until it ends and return it; ``on_log`` gets new log text as it
        arrives, ``on_update`` the job after every poll. ``TimeoutError`` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cursor = 0
        while True:
            job = self.get(job_id)
            if on_log is not None:
                while True:
                    chunk = self.logs(job_id, cursor)
                    if chunk["text"]:
                        on_log(chunk["text"])
                    if chunk["next"] == cursor:
                        break
                    cursor = chunk["next"]
            if on_update is not None:
                on_update(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)


class Runs:
    """Experiment-tracking runs: ``client.runs``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def list(
        self, *, experiment: str | None = None, job: str | None = None, limit: int = 100
    ) -> _Dicts:
        params = _clean({"experiment": experiment, "job": job, "limit": limit})
        data: _Dicts = self._client._request("GET", "/api/runs", params=params)["data"]
        return data

    def get(self, run_id: str) -> dict[str, Any]:
        """A run with params, summary, system info, packages and metric series."""
        run: dict[str, Any] = self._client._request("GET", api_path("api", "runs", run_id))
        return run

    def compare(self, run_ids: Sequence[str]) -> dict[str, Any]:
        """Runs side by side: ``params`` and ``summary`` rows (with ``differs``) and every
        run's metric series."""
        found: dict[str, Any] = self._client._request(
            "GET", "/api/runs/compare", params={"ids": ",".join(run_ids)}
        )
        return found

    def delete(self, run_id: str) -> None:
        self._client._request("DELETE", api_path("api", "runs", run_id))

    def export_mlflow(self, run_id: str) -> dict[str, Any]:
        """Copy a run to the server's configured MLflow tracking URI."""
        found: dict[str, Any] = self._client._request(
            "POST", api_path("api", "runs", run_id, "mlflow")
        )
        return found


class Models:
    """The model registry: ``client.models``. Refs are ``NAME@VERSION`` or ``NAME@ALIAS``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    @staticmethod
    def _split(ref: str) -> tuple[str, str]:
        name, _, selector = ref.partition("@")
        return name, selector or "latest"

    def list(self) -> _Dicts:
        """Registered models with their newest version and aliases."""
        data: _Dicts = self._client._request("GET", "/api/registry")["data"]
        return data

    def create(self, name: str, **fields: str) -> dict[str, Any]:
        """Register a model name; ``fields``: description, license, intended_use,
        limitations (the model card's text)."""
        found: dict[str, Any] = self._client._request(
            "POST", "/api/registry", json={"name": name, **fields}
        )
        return found

    def get(self, name: str) -> dict[str, Any]:
        """A model with its versions and aliases."""
        found: dict[str, Any] = self._client._request("GET", api_path("api", "registry", name))
        return found

    def update(self, name: str, **fields: str) -> dict[str, Any]:
        found: dict[str, Any] = self._client._request(
            "PATCH", api_path("api", "registry", name), json=fields
        )
        return found

    def delete(self, name: str) -> None:
        self._client._request("DELETE", api_path("api", "registry", name))

    def version(self, ref: str) -> dict[str, Any]:
        name, selector = self._split(ref)
        found: dict[str, Any] = self._client._request(
            "GET", api_path("api", "registry", name, "versions", selector)
        )
        return found

    def register(
        self,
        name: str,
        folder: str | Path,
        *,
        kind: str = "base",
        format: str = "safetensors",
        parent: str | None = None,
        description: str = "",
    ) -> dict[str, Any]:
        """Upload a local folder (or one file) as a new version of ``name``."""
        root = Path(folder)
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files = [
            ("files", (p.name if p == root else p.relative_to(root).as_posix(), p.read_bytes()))
            for p in paths
        ]
        data = _clean(
            {"kind": kind, "format": format, "parent": parent, "description": description}
        )
        found: dict[str, Any] = self._client._request(
            "POST", api_path("api", "registry", name, "versions"), files=files, data=data
        )
        return found

    def card(self, ref: str) -> str:
        """The generated model card (markdown)."""
        name, selector = self._split(ref)
        path = api_path("api", "registry", name, "versions", selector, "card")
        return self._client._raw(path).decode("utf-8")

    def lineage(self, ref: str) -> dict[str, Any]:
        """The lineage graph ``{"nodes", "edges"}`` of a version."""
        name, selector = self._split(ref)
        found: dict[str, Any] = self._client._request(
            "GET", api_path("api", "registry", name, "versions", selector, "lineage")
        )
        return found

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point an alias at a version (``production`` needs an approval request)."""
        found: dict[str, Any] = self._client._request(
            "PUT", api_path("api", "registry", name, "aliases", alias), json={"version": version}
        )
        return found

    def remove_alias(self, name: str, alias: str) -> None:
        self._client._request("DELETE", api_path("api", "registry", name, "aliases", alias))

    def serve(
        self,
        ref: str,
        route: str,
        *,
        weight: float | None = None,
        replace: bool = False,
        status: str = "experimental",
        provider: str = "local",
    ) -> dict[str, Any]:
        """Serve a version on ``route`` through the local provider (a new config revision)."""
        name, selector = self._split(ref)
        body = _clean(
            {
                "route": route,
                "weight": weight,
                "replace": replace,
                "status": status,
                "provider": provider,
            }
        )
        found: dict[str, Any] = self._client._request(
            "POST", api_path("api", "registry", name, "versions", selector, "serve"), json=body
        )
        return found
