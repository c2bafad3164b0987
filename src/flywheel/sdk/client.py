"""A client for a Flywheel server: the prompt registry, approvals and the chat gateway.

``Client(base_url, api_key)`` needs nothing beyond httpx. Prompts fetched with
``client.prompts.get`` are cached for ``cache_ttl`` seconds; when the server cannot be
reached (a connection error, a timeout or a 5xx answer), the last version fetched is served
anyway, with a :class:`StalePromptWarning` and a warning on the ``flywheel.sdk`` logger, so
an application keeps running through a registry outage. Errors the server answers with
(4xx) are never hidden by the cache: they raise :class:`FlywheelError`.

    client = flywheel.Client("http://flywheel:8000", api_key="fw-...")
    prompt = client.prompts.get("greeter", label="production")
    messages = prompt.messages(name="Ada")
    reply = client.chat("prompt:greeter@production", variables={"name": "Ada"})
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from flywheel.sdk._paths import api_path as _path
from flywheel.sdk.evals import Datasets, Evals, Feedback
from flywheel.sdk.experiments import Experiments
from flywheel.sdk.jobs import Jobs, Models, Runs
from flywheel.sdk.loops import Loops
from flywheel.sdk.monitor import Alerts, Guards, Monitor
from flywheel.sdk.rag import KnowledgeBases, Pipelines

log = logging.getLogger("flywheel.sdk")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
Message = dict[str, str]
Template = str | list[Message]
# Aliases, because the classes below have methods named `list` that shadow the builtin.
_Dicts = list[dict[str, Any]]
_Messages = list[Message]


class FlywheelError(Exception):
    """An error answered by the server (its OpenAI-style ``error`` body), or none at all.

    ``status_code`` is the HTTP status; 0 when the server could not be reached (connection
    error or timeout). For an error event inside a stream, it is 502, the status the gateway
    gives a failure after the first token. A template refused by :meth:`Prompt.render`
    (rendered locally) raises it with status 400 and the code the server would give.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.type = type

    def __str__(self) -> str:
        status = f"HTTP {self.status_code}" if self.status_code else "unreachable"
        code = f", {self.code}" if self.code else ""
        return f"{self.message} ({status}{code})"

    def __repr__(self) -> str:
        return (
            f"FlywheelError(status_code={self.status_code}, message={self.message!r}, "
            f"code={self.code!r}, param={self.param!r})"
        )

    @classmethod
    def _from_response(cls, response: httpx.Response) -> FlywheelError:
        """The error a response carries; a body that is not Flywheel's shape is quoted."""
        error: Any = None
        with contextlib.suppress(ValueError, AttributeError):
            error = response.json().get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return cls(
                response.status_code,
                error["message"],
                code=error.get("code"),
                param=error.get("param"),
                type=error.get("type"),
            )
        text = response.text.strip()[:300] or response.reason_phrase
        request = response.request
        return cls(response.status_code, f"{request.method} {request.url}: {text}")


class StalePromptWarning(UserWarning):
    """A cached prompt was served because the server could not be reached."""


@dataclass(frozen=True)
class Prompt:
    """One immutable version of a prompt, as the registry returns it."""

    name: str
    version: int
    template: Template
    """Text, or chat messages (``{"role", "content"}``) whose contents are Jinja templates."""
    variables: dict[str, Any]
    """The JSON Schema the variables are validated against."""
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    author: str = ""
    created_at: float = 0.0
    labels: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Prompt:
        """A prompt from the API's version object."""
        return cls(
            name=data["name"],
            version=int(data["version"]),
            template=data["template"],
            variables=data.get("variables") or {"type": "object"},
            model=data.get("model"),
            params=data.get("params") or {},
            message=data.get("message") or "",
            author=data.get("author") or "",
            created_at=float(data.get("created_at") or 0.0),
            labels=tuple(data.get("labels") or ()),
        )

    @property
    def ref(self) -> str:
        """``NAME@VERSION``; ``client.chat(f"prompt:{p.ref}")`` calls exactly this version."""
        return f"{self.name}@{self.version}"

    def render(self, /, **variables: Any) -> Template:
        """The template rendered locally with ``variables``: a string for a text template,
        messages for a chat template. The rules are the server's (same sandbox, variables
        validated against :attr:`variables`); a refusal raises :class:`FlywheelError` (400)."""
        from flywheel.prompts.templates import TemplateError, render

        try:
            return render(self.template, variables, self.variables)
        except TemplateError as exc:
            raise FlywheelError(400, exc.message, code=exc.code, param=exc.param) from None

    def messages(self, /, **variables: Any) -> _Messages:
        """The chat messages the gateway would send (a text template is one user message)."""
        out = self.render(**variables)
        return [{"role": "user", "content": out}] if isinstance(out, str) else out


_Prompts = list[Prompt]
_CacheKey = tuple[str, str | None, int | None]


@dataclass
class _Entry:
    prompt: Prompt
    fetched_at: float  # time.monotonic(); -inf once invalidated


class Prompts:
    """The prompt registry: ``client.prompts``."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._cache: dict[_CacheKey, _Entry] = {}
        self._lock = threading.Lock()

    def get(
        self,
        name: str,
        *,
        label: str | None = None,
        version: int | None = None,
        cache_ttl: float | None = None,
    ) -> Prompt:
        """A version of ``name``: by ``label``, by ``version``, or the latest.

        Served from the cache when fetched less than ``cache_ttl`` seconds ago (default: the
        client's). When the server is unreachable or answers 5xx, the last version fetched
        for the same name and selector is served, however old, with a
        :class:`StalePromptWarning`; with none, :class:`FlywheelError` is raised.
        """
        if label is not None and version is not None:
            raise ValueError("pass label or version, not both")
        key: _CacheKey = (name, label, version)
        ttl = self._client.cache_ttl if cache_ttl is None else cache_ttl
        with self._lock:
            entry = self._cache.get(key)
        if entry is not None and time.monotonic() - entry.fetched_at < ttl:
            return entry.prompt
        params: dict[str, str | int] = {}
        if label is not None:
            params["label"] = label
        if version is not None:
            params["version"] = version
        try:
            data = self._client._request("GET", _path("api", "prompts", name), params=params)
        except FlywheelError as exc:
            if exc.status_code and exc.status_code < 500:
                raise
            what = _describe(name, label, version)
            if entry is None:
                raise FlywheelError(
                    exc.status_code,
                    f"{exc.message}; no earlier copy of {what} to fall back on",
                    code=exc.code,
                    param=exc.param,
                    type=exc.type,
                ) from exc
            return self._stale(entry, what, exc)
        prompt = Prompt.from_dict(data)
        with self._lock:
            self._cache[key] = _Entry(prompt, time.monotonic())
        return prompt

    def _stale(self, entry: _Entry, what: str, error: FlywheelError) -> Prompt:
        fetched = entry.fetched_at
        age = "" if fetched == float("-inf") else f", fetched {time.monotonic() - fetched:.0f}s ago"
        text = (
            f"Flywheel at {self._client.base_url} is unavailable ({error}); serving the "
            f"cached {what}: version {entry.prompt.version}{age}"
        )
        log.warning("%s", text)
        warnings.warn(text, StalePromptWarning, stacklevel=3)
        return entry.prompt

    def invalidate(self, name: str | None = None) -> None:
        """Refetch on the next :meth:`get` of ``name`` (every prompt when ``None``).

        The entries are kept as stale copies to fall back on while the server is unavailable.
        """
        with self._lock:
            for key, entry in self._cache.items():
                if name is None or key[0] == name:
                    entry.fetched_at = float("-inf")

    def list(self) -> _Dicts:
        """Every prompt of the project: ``name``, ``description``, ``latest_version``,
        ``labels`` (label → version), ``created_at``, ``created_by``."""
        data: _Dicts = self._client._request("GET", "/api/prompts")["data"]
        return data

    def versions(self, name: str) -> _Prompts:
        """Every version of ``name``, newest first."""
        data = self._client._request("GET", _path("api", "prompts", name, "versions"))
        return [Prompt.from_dict(v) for v in data["data"]]

    def create(
        self,
        name: str,
        template: Template,
        *,
        variables: dict[str, Any] | None = None,
        model: str | None = None,
        params: dict[str, Any] | None = None,
        message: str = "",
        description: str | None = None,
        labels: Iterable[str] = (),
    ) -> Prompt:
        """Store a new version of ``name`` (creating the prompt on its first version).

        ``variables`` is the JSON Schema of the variables (default: inferred from the
        template); ``labels`` are pointed at the new version (not protected ones).
        """
        body: dict[str, Any] = {
            "name": name,
            "template": template,
            "message": message,
            "labels": list(labels),
        }
        optional = {
            "variables": variables,
            "model": model,
            "params": params,
            "description": description,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        try:
            data = self._client._request("POST", "/api/prompts", json=body)
        finally:
            self.invalidate(name)
        return Prompt.from_dict(data)

    def set_label(self, name: str, label: str, version: int) -> dict[str, Any]:
        """Point ``label`` at ``version``; returns the label move. A protected label
        (``production``) raises :class:`FlywheelError` with code ``approval_required``:
        use :meth:`request_approval`."""
        try:
            event: dict[str, Any] = self._client._request(
                "PUT", _path("api", "prompts", name, "labels", label), json={"version": version}
            )
        finally:
            self.invalidate(name)
        return event

    def remove_label(self, name: str, label: str) -> None:
        """Remove ``label`` from the prompt."""
        try:
            self._client._request("DELETE", _path("api", "prompts", name, "labels", label))
        finally:
            self.invalidate(name)

    def diff(self, name: str, old: int, new: int) -> dict[str, Any]:
        """``from``, ``to``, ``template`` (a unified diff) and ``changes`` between versions."""
        data: dict[str, Any] = self._client._request(
            "GET", _path("api", "prompts", name, "diff"), params={"from": old, "to": new}
        )
        return data

    def request_approval(
        self, name: str, version: int, *, label: str = "production", comment: str | None = None
    ) -> dict[str, Any]:
        """Ask for the protected ``label`` to move onto ``version``; returns the pending
        approval request (its ``id`` is what an approver approves)."""
        body: dict[str, Any] = {
            "resource_type": "prompt",
            "name": name,
            "version": version,
            "label": label,
        }
        if comment is not None:
            body["comment"] = comment
        data: dict[str, Any] = self._client._request("POST", "/api/approvals", json=body)
        return data

    def optimize(
        self,
        name: str,
        *,
        dataset: str,
        scorer: str | dict[str, Any],
        variants: int | None = None,
        rounds: int | None = None,
        proposer: str | None = None,
        base: str | int | None = None,
        instructions: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Start a ``prompt.optimize`` job: the ``proposer`` route (default ``default``)
        proposes ``variants`` templates per round from ``base`` (default the latest version)
        and its failures on ``dataset`` (``NAME`` or ``NAME@N``), each is scored with
        ``scorer``, and the best one that beats the base becomes a new version (no label
        moves). Returns the job, or with ``wait`` the finished job, whose ``result`` holds
        ``new_version`` (None when no variant won) and the comparison."""
        params: dict[str, Any] = {"prompt": name, "dataset": dataset, "scorer": scorer}
        optional = {
            "variants": variants,
            "rounds": rounds,
            "proposer": proposer,
            "base": None if base is None else str(base),
            "instructions": instructions,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        job: dict[str, Any] = self._client._request(
            "POST", "/api/jobs", json={"kind": "prompt.optimize", "params": params}
        )
        if not wait:
            return job
        try:
            return self._client.jobs.wait(job["id"], timeout=timeout)
        finally:
            self.invalidate(name)


class Approvals:
    """Approval requests for protected labels: ``client.approvals``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, status: str | None = None) -> _Dicts:
        """Requests of the project, newest first; ``status``: pending, approved, rejected or
        cancelled."""
        params = {"status": status} if status is not None else {}
        data: _Dicts = self._client._request("GET", "/api/approvals", params=params)["data"]
        return data

    def get(self, approval_id: str) -> dict[str, Any]:
        """One request."""
        data: dict[str, Any] = self._client._request("GET", _path("api", "approvals", approval_id))
        return data

    def approve(self, approval_id: str, comment: str = "") -> dict[str, Any]:
        """Approve a request (never one's own) and so move its label."""
        data = self._decide(approval_id, "approve", comment)
        if isinstance(data.get("name"), str):
            self._client.prompts.invalidate(data["name"])
        return data

    def reject(self, approval_id: str, comment: str = "") -> dict[str, Any]:
        """Reject a request."""
        return self._decide(approval_id, "reject", comment)

    def cancel(self, approval_id: str) -> dict[str, Any]:
        """Withdraw a pending request."""
        data: dict[str, Any] = self._client._request(
            "POST", _path("api", "approvals", approval_id, "cancel")
        )
        return data

    def _decide(self, approval_id: str, decision: str, comment: str) -> dict[str, Any]:
        data: dict[str, Any] = self._client._request(
            "POST", _path("api", "approvals", approval_id, decision), json={"comment": comment}
        )
        return data


class Config:
    """Config as code: ``client.config`` (what ``flywheel apply`` and ``export`` call)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def export(self) -> str:
        """The running providers, models and routes, and the project's prompts, as YAML."""
        request = self._client._http.build_request("GET", "/api/config/export")
        return self._client._send(request).text

    def plan(self, text: str, filename: str = "flywheel.yaml") -> _Dicts:
        """The changes applying ``text`` would make: ``{"kind","name","action","detail"}``."""
        body = {"yaml": text, "filename": filename}
        data: _Dicts = self._client._request("POST", "/api/config/plan", json=body)["changes"]
        return data

    def apply(
        self, text: str, filename: str = "flywheel.yaml", *, bypass_approvals: bool = False
    ) -> dict[str, Any]:
        """Apply ``text``; returns ``changes``, the config ``revision`` and the ``approvals``
        opened for protected labels (instance admins may ``bypass_approvals``)."""
        body = {"yaml": text, "filename": filename, "bypass_approvals": bypass_approvals}
        data: dict[str, Any] = self._client._request("POST", "/api/config/apply", json=body)
        self._client.prompts.invalidate()
        return data


class Client:
    """A Flywheel server: ``prompts``, ``approvals``, ``config``, ``datasets``,
    ``feedback``, ``evals``, ``monitor``, ``guards``, ``alerts``, ``kbs``, ``pipelines``,
    ``jobs``, ``runs``, ``models``, ``experiments``, ``loops`` and ``chat``.

    ``base_url`` defaults to ``FLYWHEEL_BASE_URL`` (else ``http://127.0.0.1:8000``) and
    ``api_key`` to ``FLYWHEEL_API_KEY``. ``project`` picks a project for keys that may act
    in several. ``cache_ttl`` is how long, in seconds, a fetched prompt is reused.
    ``transport`` is passed to httpx (tests, proxies, custom TLS).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        project: str | None = None,
        timeout: float = 60.0,
        cache_ttl: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = (
            base_url or os.environ.get("FLYWHEEL_BASE_URL") or DEFAULT_BASE_URL
        ).rstrip("/")
        self.cache_ttl = cache_ttl
        key = api_key or os.environ.get("FLYWHEEL_API_KEY")
        headers = {"User-Agent": "flywheel-python-sdk"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if project:
            headers["X-Flywheel-Project"] = project
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.prompts = Prompts(self)
        self.approvals = Approvals(self)
        self.config = Config(self)
        self.datasets = Datasets(self)
        self.feedback = Feedback(self)
        self.evals = Evals(self)
        self.monitor = Monitor(self)
        self.guards = Guards(self)
        self.alerts = Alerts(self)
        self.kbs = KnowledgeBases(self)
        self.pipelines = Pipelines(self)
        self.jobs = Jobs(self)
        self.experiments = Experiments(self)
        self.loops = Loops(self)
        self.runs = Runs(self)
        self.models = Models(self)

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @overload
    def chat(
        self,
        model: str,
        messages: _Dicts | None = None,
        *,
        variables: dict[str, Any] | None = None,
        stream: Literal[False] = False,
        **params: Any,
    ) -> dict[str, Any]: ...

    @overload
    def chat(
        self,
        model: str,
        messages: _Dicts | None = None,
        *,
        variables: dict[str, Any] | None = None,
        stream: Literal[True],
        **params: Any,
    ) -> Iterator[dict[str, Any]]: ...

    def chat(
        self,
        model: str,
        messages: _Dicts | None = None,
        *,
        variables: dict[str, Any] | None = None,
        stream: bool = False,
        **params: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """A chat completion through the gateway (``POST /v1/chat/completions``).

        ``model`` is a route, a model, or a prompt: ``prompt:NAME@LABEL``,
        ``prompt:NAME@VERSION`` or ``prompt:NAME``, rendered server-side with ``variables``
        (``messages`` are then appended to the prompt's). ``params`` are further OpenAI
        fields (``temperature``, ``max_tokens``...). Returns the completion object, or with
        ``stream=True`` an iterator of chunk objects; an error event in the stream raises
        :class:`FlywheelError`. Errors before the answer starts raise at this call.
        """
        body: dict[str, Any] = {"model": model, "messages": messages or [], **params}
        if variables is not None:
            body["variables"] = variables
        if not stream:
            data: dict[str, Any] = self._request("POST", "/v1/chat/completions", json=body)
            return data
        body["stream"] = True
        request = self._http.build_request("POST", "/v1/chat/completions", json=body)
        response = self._send(request, stream=True)
        return _events(response)

    def route_cache(self, route: str) -> dict[str, Any]:
        """A route's response cache in this project: ``enabled``, ``config``, ``hits``,
        ``misses``, ``bypassed``, ``hit_rate`` (None before any lookup) and ``entries``."""
        data: dict[str, Any] = self._request("GET", _path("api", "routes", route, "cache"))
        return data

    def clear_route_cache(self, route: str, *, all_projects: bool = False) -> dict[str, Any]:
        """Drop a route's cached answers in this project (``all_projects``: every project,
        instance admins only); returns ``{"removed": n, ...}``."""
        params = {"all_projects": "true"} if all_projects else None
        data: dict[str, Any] = self._request(
            "DELETE", _path("api", "routes", route, "cache"), params=params
        )
        return data

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            response = self._http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise FlywheelError(
                0, f"cannot reach Flywheel at {request.url}: {type(exc).__name__}: {exc}"
            ) from exc
        if response.is_error:
            with contextlib.suppress(httpx.TransportError):
                response.read()
            response.close()
            raise FlywheelError._from_response(response)
        return response

    def _raw(self, path: str, params: dict[str, Any] | None = None) -> bytes:
        """A GET's body as bytes (JSONL exports)."""
        return self._send(self._http.build_request("GET", path, params=params)).content

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
        files: Any = None,
        data: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send a request; return the decoded JSON answer (``None`` when empty)."""
        request = self._http.build_request(
            method,
            path,
            json=json,
            params=params,
            content=content,
            files=files,
            data=data,
            headers=headers,
        )
        response = self._send(request)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise FlywheelError(
                response.status_code, f"{method} {request.url}: the answer is not JSON"
            ) from exc


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, until ``[DONE]``."""
    data: list[str] = []
    try:
        for line in response.iter_lines():
            if line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
                continue
            if line or not data:
                continue  # other fields (event:, id:, comments) and blank keep-alives
            payload, data = "\n".join(data), []
            if payload == "[DONE]":
                return
            yield _event(payload)
        if data and (payload := "\n".join(data)) != "[DONE]":
            yield _event(payload)
    except httpx.TransportError as exc:
        raise FlywheelError(
            0, f"the stream from {response.request.url} broke: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        response.close()


def _event(payload: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise FlywheelError(502, f"the stream sent an invalid event: {payload[:200]!r}") from None
    if not isinstance(event, dict):
        raise FlywheelError(502, f"the stream sent an invalid event: {payload[:200]!r}")
    error = event.get("error")
    if isinstance(error, dict):
        raise FlywheelError(
            502,
            str(error.get("message") or "the stream failed"),
            code=error.get("code"),
            param=error.get("param"),
            type=error.get("type"),
        )
    return event


def _describe(name: str, label: str | None, version: int | None) -> str:
    if version is not None:
        return f"prompt '{name}' version {version}"
    if label is not None:
        return f"prompt '{name}' label '{label}'"
    return f"prompt '{name}' (latest)"
