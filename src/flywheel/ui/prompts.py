"""The UI's prompt pages: the registry (list, versions, diffs, labels), the playground and
the approval queue.

Like the other pages, a thin edge over the services the API uses (the prompt registry, the
approval workflow and the gateway, called in-process), so their checks apply here too. A
service's refusal is shown on the page with its status code, never as a server error.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from flywheel.errors import ServiceError
from flywheel.gateway import CallContext, ChatCompletionRequest, GatewayError
from flywheel.gateway.schemas import PROMPT_PREFIX
from flywheel.prompts.registry import VersionView, diff_versions
from flywheel.prompts.templates import TemplateError, infer_schema
from flywheel.security import Permission, Principal
from flywheel.server.http import limit_subjects, services
from flywheel.server.services import Services
from flywheel.ui.routes import _htmx_target as htmx_target
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

VARIABLE_PREFIX = "var."
MAX_MESSAGES = 20
STREAM_MEDIA_TYPE = "application/x-ndjson"


class PageError(Exception):
    """A refusal of a form the page shows as a message (status code and text)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _selector(value: str | None) -> int | str | None:
    """A version picker's value: a version number, a label, or the latest (None)."""
    value = (value or "").strip()
    if not value or value == "latest":
        return None
    return int(value) if value.isdecimal() and len(value) <= 9 else value


def chat_models(svc: Services, user: Principal) -> list[str]:
    """The gateway's chat routes and models the user may call (prompt routes excluded: a
    prompt's model cannot be a prompt)."""
    gateway = svc.gateway
    models = gateway.routes.models
    names = []
    for item in gateway.list_models():
        name = item["id"]
        route = gateway.routes.routes.get(name)
        if route is not None:
            if route.prompt_targets or not route.targets:
                continue
            first = models.get(route.targets[0].model or "")
            kind = first.kind if first is not None else "chat"
        else:
            model = models.get(name)
            kind = model.kind if model is not None else "chat"
        if kind == "chat" and user.may_call(name):
            names.append(name)
    return names


def _float(value: str, field: str, low: float, high: float) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        raise PageError(400, f"{field} must be a number.") from None
    if not low <= number <= high:
        raise PageError(400, f"{field} must be between {low:g} and {high:g}.")
    return number


def _int(value: str, field: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    if not value.isdecimal() or int(value) < 1:
        raise PageError(400, f"{field} must be a whole number of at least 1.")
    return int(value)


# -- the prompt list and the new-prompt form ------------------------------------------------


NEW_PROMPT_FIELDS = (
    "name",
    "kind",
    "system",
    "user_message",
    "text",
    "model",
    "temperature",
    "max_tokens",
    "message",
    "description",
)


def _prompts_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    form = {name: "" for name in NEW_PROMPT_FIELDS}
    form["kind"] = "chat"
    form.update(extra.pop("form", {}))
    return {
        "nav": "prompts",
        "prompts": svc.prompts.overview(user.project_id),
        "models": chat_models(svc, user),
        "form": form,
        "error": None,
        **extra,
    }


@router.get("/prompts")
def prompts_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's prompts with their latest version and labels; a form for a new one."""
    return render(request, "prompts.html", _prompts_context(request, user))


def _new_prompt_template(form: Mapping[str, str]) -> str | list[dict[str, str]]:
    if form.get("kind") == "text":
        text = form.get("text", "")
        if not text.strip():
            raise PageError(400, "Write the template text.")
        return text
    messages = [
        {"role": role, "content": form.get(field, "")}
        for role, field in (("system", "system"), ("user", "user_message"))
        if form.get(field, "").strip()
    ]
    if not messages:
        raise PageError(400, "Write a system message, a user message, or both.")
    return messages


@router.post("/prompts")
async def create_prompt(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Create a prompt (its version 1) and open its page."""
    form = await _form(request)
    svc = services(request)
    name = form.get("name", "").strip()
    kept = {k: form.get(k, "") for k in NEW_PROMPT_FIELDS}
    try:
        template = _new_prompt_template(form)
        params: dict[str, Any] = {}
        temperature = _float(form.get("temperature", ""), "Temperature", 0, 2)
        max_tokens = _int(form.get("max_tokens", ""), "Max tokens")
        if temperature is not None:
            params["temperature"] = temperature
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        model = form.get("model", "").strip() or None
        if model is not None and model not in chat_models(svc, user):
            raise PageError(400, f"'{model}' is not a chat model or route you may call.")
        # The registry checks the name itself; a new prompt must not add to an existing one.
        if await run_in_threadpool(svc.prompts.exists, user.project_id, name):
            raise PageError(
                409,
                f"A prompt named '{name}' already exists: open it to add a version in the "
                "playground.",
            )
        await run_in_threadpool(
            lambda: svc.prompts.create(
                user.project_id,
                name,
                template=template,
                author=user.actor,
                author_id=user.identity,
                model=model,
                params=params,
                message=form.get("message", "").strip()[:2000],
                description=form.get("description", "").strip()[:2000] or None,
            )
        )
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
        context = await run_in_threadpool(
            lambda: _prompts_context(request, user, form=kept, error=error)
        )
        return render(request, "prompts.html", context, status_code=status)
    return RedirectResponse(f"/prompts/{name}", status_code=303)


# -- one prompt: versions, diff, labels -----------------------------------------------------


def diff_lines(unified: str) -> list[dict[str, str]]:
    """A unified diff, line by line, each with the class that colours it (file headers,
    hunks, additions, deletions, context)."""
    lines = []
    in_hunks = False
    for line in unified.splitlines():
        if line.startswith("@@"):
            kind, in_hunks = "hunk", True
        elif not in_hunks:
            kind = "file"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "ctx"
        lines.append({"kind": kind, "text": line})
    return lines


def _diff_context(versions: list[VersionView], old: int, new: int) -> dict[str, Any]:
    by_number = {v.version: v for v in versions}
    if old not in by_number or new not in by_number:
        return {"diff": None, "diff_error": "Pick two versions of this prompt to compare."}
    diff = diff_versions(by_number[old], by_number[new])
    return {
        "diff": {
            "from": diff["from"],
            "to": diff["to"],
            "lines": diff_lines(diff["template"]),
            "changes": diff["changes"],
        },
        "diff_error": None,
    }


def _prompt_context(
    request: Request,
    user: Principal,
    name: str,
    old: int | None = None,
    new: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything the prompt page shows; raises ServiceError (404) for an unknown prompt."""
    svc = services(request)
    versions = svc.prompts.versions(user.project_id, name)
    if new is None and versions:
        new = versions[0].version
    if old is None and len(versions) > 1:
        old = versions[1].version
    diff: dict[str, Any] = {"diff": None, "diff_error": None}
    if old is not None and new is not None:
        diff = _diff_context(versions, old, new)
    labels = {label: v.version for v in versions for label in v.labels}
    approvals = [
        a
        for a in svc.approvals.list_requests(user.project_id)
        if a["resource_type"] == "prompt" and a["name"] == name
    ]
    summary = next((p for p in svc.prompts.overview(user.project_id) if p["name"] == name), {})
    optimize_form = {**OPTIMIZE_DEFAULTS, **extra.pop("optimize_form", {})}
    form = {
        "label": "",
        "version": str(versions[0].version) if versions else "",
        **extra.pop("form", {}),
    }
    return {
        "nav": "prompts",
        "name": name,
        "summary": summary,
        "versions": versions,
        "labels": labels,
        "label_choices": sorted(set(labels) | set(svc.prompts.protected_labels) | {"staging"}),
        "protected_labels": sorted(svc.prompts.protected_labels),
        "history": svc.prompts.label_history(user.project_id, name),
        "approvals": approvals,
        "pending": [a for a in approvals if a["status"] == "pending"],
        "old": old,
        "new": new,
        "form": form,
        "error": None,
        "notice": None,
        "requested": None,
        "optimize_form": optimize_form,
        "optimize_runs": optimize_runs(svc, user.project_id, name),
        "scorer_choices": OPTIMIZE_SCORERS,
        **diff,
        **extra,
    }


async def _prompt_page_with_error(
    request: Request, user: Principal, name: str, error: str, status: int, **extra: Any
) -> Response:
    """The prompt page again after a refused form (``extra`` keeps what was typed), or the
    missing-prompt page when the prompt itself is gone."""
    try:
        context = await run_in_threadpool(
            lambda: _prompt_context(request, user, name, error=error, **extra)
        )
    except ServiceError as missing:
        return _missing(request, name, missing)
    return render(request, "prompt.html", context, status_code=status)


def _missing(request: Request, name: str, exc: ServiceError) -> Response:
    return render(
        request,
        "prompt_missing.html",
        {"nav": "prompts", "name": name, "error": exc.message},
        status_code=exc.status_code,
    )


# -- optimisation (the prompt.optimize job) ---------------------------------------------------

OPTIMIZE_KIND = "prompt.optimize"
OPTIMIZE_DEFAULTS = {
    "dataset": "",
    "scorer": "exact_match",
    "variants": "3",
    "rounds": "1",
    "proposer": "default",
    "instructions": "",
}
OPTIMIZE_SCORERS = ("exact_match", "contains", "token_f1", "rouge", "bleu", "chrf")
# How many of a prompt's latest optimisation jobs the page lists.
OPTIMIZE_SHOWN = 5


def optimize_runs(svc: Services, project_id: str, name: str) -> list[dict[str, Any]]:
    """The prompt's latest ``prompt.optimize`` jobs, newest first, with their results (the
    comparison tables) when they have finished."""
    jobs = svc.jobs.list_jobs(project_id, kind=OPTIMIZE_KIND, limit=200)
    return [j for j in jobs if (j.get("params") or {}).get("prompt") == name][:OPTIMIZE_SHOWN]


def optimize_params(name: str, form: Mapping[str, str]) -> dict[str, Any]:
    """The job's params from the form (the kind validates them: a 400 names the field)."""
    params: dict[str, Any] = {
        "prompt": name,
        "dataset": form.get("dataset", "").strip(),
        "scorer": form.get("scorer", "").strip(),
        "proposer": form.get("proposer", "").strip() or "default",
    }
    for field in ("variants", "rounds"):
        value = _int(form.get(field, ""), field.capitalize())
        if value is not None:
            params[field] = value
    if instructions := form.get("instructions", "").strip():
        params["instructions"] = instructions
    return params


def _version_number(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdecimal() and len(value) <= 9 else None


@router.get("/prompts/{name}")
def prompt_page(
    request: Request,
    name: str,
    user: Principal = Depends(ui_authorize),
) -> Response:
    """A prompt's versions (newest first), a diff of two of them, its labels and their
    history; ``?from=&to=`` picks the diff (HTMX swaps only the diff)."""
    query = request.query_params
    old, new = _version_number(query.get("from")), _version_number(query.get("to"))
    svc = services(request)
    extra: dict[str, Any] = {}
    requested = query.get("requested")
    if requested and len(requested) <= 64:
        with contextlib.suppress(ServiceError):
            extra["requested"] = svc.approvals.get(user.project_id, requested)
    try:
        context = _prompt_context(request, user, name, old, new, **extra)
    except ServiceError as exc:
        return _missing(request, name, exc)
    moved = query.get("moved")
    if moved and moved in context["labels"]:
        context["notice"] = f"Moved the '{moved}' label to v{context['labels'][moved]}."
    if htmx_target(request) == "prompt-diff":
        url = f"/prompts/{name}?{urlencode({'from': context['old'], 'to': context['new']})}"
        return render(request, "_prompt_diff.html", context, headers={"HX-Push-Url": url})
    return render(request, "prompt.html", context)


@router.post("/prompts/{name}/labels")
async def move_label(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Point a label at a version; a protected label (production) is requested for approval
    instead, after an explicit confirmation."""
    form = await _form(request)
    svc = services(request)
    label = form.get("label", "").strip()
    version = _version_number(form.get("version"))
    try:
        if not label:
            raise PageError(400, "Name the label to move.")
        if version is None:
            raise PageError(400, "Pick the version the label should point at.")
        if svc.prompts.is_protected(label):
            if form.get("confirm") != "yes":
                raise PageError(
                    400,
                    f"Moving '{label}' needs an approval: tick the confirmation box to request "
                    "one.",
                )
            if not user.can(Permission.APPROVALS_REQUEST):
                raise PageError(
                    403,
                    f"Requesting '{label}' needs the approvals:request permission, which your "
                    "role does not have.",
                )
            approval = await run_in_threadpool(
                svc.approvals.request, user, "prompt", name, version, label
            )
            return RedirectResponse(
                f"/prompts/{name}?{urlencode({'requested': approval['id']})}", status_code=303
            )
        await run_in_threadpool(
            svc.prompts.set_label, user.project_id, name, label, version, user.actor
        )
    except (PageError, ServiceError) as exc:
        form_values = {"label": label, "version": str(version or "")}
        return await _prompt_page_with_error(
            request, user, name, exc.message, exc.status_code, form=form_values
        )
    return RedirectResponse(f"/prompts/{name}?{urlencode({'moved': label})}", status_code=303)


@router.post("/prompts/{name}/optimize")
async def optimize_prompt(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Start a ``prompt.optimize`` job for the prompt and open its job page."""
    from flywheel.ui.jobs import submit  # (flywheel.ui.jobs imports this module)

    form = await _form(request)
    svc = services(request)
    try:
        await run_in_threadpool(svc.prompts.get, user.project_id, name)
        params = optimize_params(name, form)
        job = await run_in_threadpool(submit, svc, user, OPTIMIZE_KIND, params, f"optimize {name}")
    except (PageError, ServiceError) as exc:
        kept = {k: form.get(k, "") for k in OPTIMIZE_DEFAULTS}
        return await _prompt_page_with_error(
            request, user, name, exc.message, exc.status_code, optimize_form=kept
        )
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


# -- the playground ---------------------------------------------------------------------------


def _schema_type(prop: Mapping[str, Any]) -> str:
    kind = prop.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else ""


def variable_fields(
    schemas: list[dict[str, Any]], values: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One input per property of the schemas (the union when two versions are compared),
    in schema order; required in any schema means required."""
    fields: dict[str, dict[str, Any]] = {}
    for schema in schemas:
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        for name, prop in properties.items():
            prop = prop if isinstance(prop, dict) else {}
            field = fields.get(name)
            if field is None:
                kind = _schema_type(prop)
                enum = prop.get("enum") if isinstance(prop.get("enum"), list) else None
                if enum is not None:
                    widget = "enum"
                elif kind == "boolean":
                    widget = "boolean"
                elif kind in ("integer", "number"):
                    widget = "number"
                elif kind in ("object", "array"):
                    widget = "json"
                else:
                    widget = "text"
                default = prop.get("default")
                field = fields[name] = {
                    "name": name,
                    "input": f"{VARIABLE_PREFIX}{name}",
                    "type": kind or "any",
                    "widget": widget,
                    "enum": [json.dumps(v) if not isinstance(v, str) else v for v in enum or []],
                    "description": str(prop.get("description") or ""),
                    "default": None
                    if default is None
                    else (default if isinstance(default, str) else json.dumps(default)),
                    "required": False,
                    "value": values.get(f"{VARIABLE_PREFIX}{name}", ""),
                }
            field["required"] = field["required"] or name in required
    return list(fields.values())


def _coerce(name: str, raw: str, prop: Any) -> Any:
    """A variable's form text as the JSON type its schema asks for."""
    prop = prop if isinstance(prop, dict) else {}
    enum = prop.get("enum")
    if isinstance(enum, list):
        for option in enum:
            if (option if isinstance(option, str) else json.dumps(option)) == raw:
                return option
    kind = _schema_type(prop)
    try:
        if kind == "integer":
            return int(raw.strip())
        if kind == "number":
            return float(raw.strip())
        if kind == "boolean":
            if raw.strip().lower() not in ("true", "false"):
                raise ValueError(raw)
            return raw.strip().lower() == "true"
        if kind in ("object", "array"):
            value = json.loads(raw)
            if not isinstance(value, dict if kind == "object" else list):
                raise ValueError(raw)
            return value
    except ValueError:
        wanted = {
            "integer": "a whole number",
            "number": "a number",
            "boolean": "true or false",
            "object": "a JSON object",
            "array": "a JSON array",
        }[kind]
        raise PageError(400, f"Variable '{name}' must be {wanted}.") from None
    return raw


def run_variables(view: VersionView, form: Mapping[str, str]) -> dict[str, Any]:
    """The variables of a run for ``view``: the filled-in inputs, typed by its schema. An
    empty input is left out (so a default applies, or the prompt says it is missing); a
    variable only the compared version takes is left out when this one's schema is closed."""
    schema = view.variables if isinstance(view.variables, dict) else {}
    properties = schema.get("properties") or {}
    closed = schema.get("additionalProperties") is False
    variables: dict[str, Any] = {}
    for key, raw in form.items():
        if not key.startswith(VARIABLE_PREFIX) or raw == "":
            continue
        name = key[len(VARIABLE_PREFIX) :]
        if closed and name not in properties:
            continue
        variables[name] = _coerce(name, raw, properties.get(name))
    return variables


def _editor(view: VersionView) -> dict[str, Any]:
    if isinstance(view.template, str):
        return {"kind": "text", "text": view.template, "messages": []}
    return {"kind": "chat", "text": "", "messages": [dict(m) for m in view.template]}


def _version_options(versions: list[VersionView]) -> list[dict[str, str]]:
    """The version picker: latest, each label, then each version (newest first)."""
    options = []
    if versions:
        options.append({"value": "latest", "text": f"latest (v{versions[0].version})"})
    for view in versions:
        for label in view.labels:
            options.append({"value": label, "text": f"{label} (v{view.version})"})
    for view in versions:
        message = f" · {view.message[:60]}" if view.message else ""
        options.append({"value": str(view.version), "text": f"v{view.version}{message}"})
    return options


def _playground_context(
    request: Request, user: Principal, query: Mapping[str, str], **extra: Any
) -> tuple[dict[str, Any], int]:
    """The playground for the prompt and versions picked in ``query``; with the status code
    to answer (404 when the prompt or a version is missing)."""
    svc = services(request)
    prompts = svc.prompts.overview(user.project_id)
    names = [p["name"] for p in prompts]
    name = query.get("prompt") or (names[0] if names else "")
    picks = {
        "a": query.get("a") or "latest",
        "b": query.get("b") or "",
        "model_a": query.get("model_a") or "",
        "model_b": query.get("model_b") or "",
    }
    context: dict[str, Any] = {
        "nav": "playground",
        "prompts": names,
        "name": name,
        "picks": picks,
        "models": chat_models(svc, user),
        "options": [],
        "columns": [],
        "fields": [],
        "editor": None,
        "base": None,
        "error": None,
        "saved": None,
        "can_run": user.can(Permission.GATEWAY_CALL),
        "can_save": user.can(Permission.PROMPTS_WRITE),
        "save_message": "",
    }
    status = 200
    if name:
        try:
            versions = svc.prompts.versions(user.project_id, name)
            context["options"] = options = _version_options(versions)
            # A pick this prompt lacks (left over when the prompt picker changed) starts over.
            values = {o["value"] for o in options}
            if picks["a"] not in values:
                picks["a"] = "latest"
            if picks["b"] not in values:
                picks["b"] = ""
            view_a = svc.prompts.get(user.project_id, name, _selector(picks["a"]))
            views = [("a", view_a, picks["model_a"])]
            if picks["b"]:
                view_b = svc.prompts.get(user.project_id, name, _selector(picks["b"]))
                views.append(("b", view_b, picks["model_b"]))
        except ServiceError as exc:
            context["error"], status = exc.message, exc.status_code
        else:
            context["columns"] = [
                {
                    "key": key,
                    "view": view,
                    "ref": str(view.version),
                    "model": model,
                    "effective_model": model or view.model or "default",
                }
                for key, view, model in views
            ]
            context["fields"] = variable_fields([v.variables for _, v, _ in views], query)
            context["editor"] = _editor(view_a)
            context["base"] = view_a
    saved = _version_number(query.get("saved"))
    if saved is not None and not extra.get("error"):
        context["saved"] = saved
    context.update(extra)
    return context, status


def _playground_url(context: Mapping[str, Any]) -> str:
    """The tidy URL of what the playground shows (no variables, no defaults)."""
    picks = {"prompt": context["name"], **context["picks"]}
    if picks["a"] == "latest":
        del picks["a"]
    kept = {k: v for k, v in picks.items() if v}
    return "/playground" + (f"?{urlencode(kept)}" if kept else "")


@router.get("/playground")
def playground(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Pick a prompt version (and a second one, or another model, to compare), fill its
    variables, run it through the gateway with the answer streamed, and save edits as a new
    version. HTMX swaps only the playground when a picker changes."""
    query = dict(request.query_params)
    context, status = _playground_context(request, user, query)
    if htmx_target(request) == "playground":
        headers = {"HX-Push-Url": _playground_url(context)}
        return render(request, "_playground.html", context, status_code=status, headers=headers)
    return render(request, "playground.html", context, status_code=status)


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


STREAM_HEADERS = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
    "X-Content-Type-Options": "nosniff",
}


def _run_error(status_code: int, message: str, code: str | None = None) -> Response:
    return Response(
        _line({"error": message, "code": code}),
        status_code=status_code,
        media_type=STREAM_MEDIA_TYPE,
        headers=STREAM_HEADERS,
    )


async def _relay(events: AsyncIterator[bytes], meta: dict[str, Any]) -> AsyncIterator[bytes]:
    """The gateway's server-sent events as JSON lines: ``meta`` first, then ``text`` pieces as
    they arrive, then ``done`` (or an ``error`` that cut the stream)."""
    yield _line({"meta": meta})
    failed = False
    try:
        async for raw in events:
            for block in raw.decode("utf-8", errors="replace").split("\n\n"):
                block = block.strip()
                if not block.startswith("data:"):
                    continue
                data = block[len("data:") :].strip()
                if data == "[DONE]":
                    continue
                try:
                    payload = json.loads(data)
                except ValueError:
                    continue
                if not isinstance(payload, dict):
                    continue
                if isinstance(payload.get("error"), dict):
                    failed = True
                    yield _line({"error": str(payload["error"].get("message") or "failed")})
                    continue
                text = "".join(
                    str((choice.get("delta") or {}).get("content") or "")
                    for choice in payload.get("choices") or []
                    if isinstance(choice, dict)
                )
                if text:
                    yield _line({"text": text})
        if not failed:
            yield _line({"done": True})
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


@router.post("/playground/run")
async def playground_run(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Run one version with the form's variables through the gateway, in-process, streaming
    the answer as JSON lines (read by app.js). With a model other than the version's, the
    version is rendered here and its messages and parameters sent to that model."""
    form = await _form(request)
    svc = services(request)
    if not user.can(Permission.PROMPTS_READ):
        return _run_error(403, "Running a prompt needs the prompts:read permission.")
    name = form.get("prompt", "")
    model = form.get("model", "").strip()
    try:
        view = await run_in_threadpool(
            svc.prompts.get, user.project_id, name, _selector(form.get("ref"))
        )
        variables = run_variables(view, form)
        if model and model != view.model:
            route = svc.gateway.routes.routes.get(model)
            if model.startswith(PROMPT_PREFIX) or (route is not None and route.prompt_targets):
                raise PageError(400, "Pick a chat model or route, not a prompt.")
            messages = await run_in_threadpool(view.render, variables)
            body: dict[str, Any] = {**view.params, "model": model, "messages": messages}
        else:
            body = {"model": f"{PROMPT_PREFIX}{view.ref}", "variables": variables}
        try:
            chat = ChatCompletionRequest.model_validate({**body, "stream": True})
        except ValueError as exc:
            raise PageError(400, f"The version's parameters cannot be sent: {exc}") from None
        ctx = CallContext(
            api_key_id=user.key_id,
            project_id=user.project_id,
            allowed_models=user.allowed_models,
            limit_subjects=await limit_subjects(svc, user),
        )
        events = await svc.gateway.stream_chat(chat, ctx)
    except (PageError, ServiceError) as exc:
        return _run_error(exc.status_code, exc.message, getattr(exc, "code", None))
    except GatewayError as exc:
        return _run_error(exc.status_code, exc.message, exc.code)
    meta = {
        "ref": view.ref,
        "model": model or view.model or "default",
        "trace_id": ctx.trace_id,
    }
    return StreamingResponse(
        _relay(events, meta), media_type=STREAM_MEDIA_TYPE, headers=STREAM_HEADERS
    )


def _edited_template(form: Mapping[str, str], base: VersionView) -> str | list[dict[str, str]]:
    if isinstance(base.template, str):
        text = form.get("template", "")
        if not text.strip():
            raise PageError(400, "The template is empty.")
        return text
    messages = []
    for i in range(MAX_MESSAGES):
        role = form.get(f"role.{i}")
        if role is None:
            break
        content = form.get(f"content.{i}", "")
        if content.strip():
            messages.append({"role": role, "content": content})
    if not messages:
        raise PageError(400, "Every message is empty: write at least one.")
    return messages


def _edited_schema(
    template: str | list[dict[str, str]], base: VersionView
) -> dict[str, Any] | None:
    """The variables schema of an edited template: inferred (None) when the base version's
    was; else the base's definitions kept for the variables the edit still uses."""
    try:
        inferred = infer_schema(template)
        if base.variables == infer_schema(base.template):
            return None
    except TemplateError as exc:
        raise PageError(400, exc.message) from None
    old = base.variables.get("properties") or {}
    properties = {n: old.get(n, {}) for n in inferred["properties"]}
    required = [
        n
        for n in inferred["required"]
        if not (isinstance(old.get(n), dict) and "default" in old[n])
    ]
    return {**inferred, "properties": properties, "required": required}


@router.post("/playground/save")
async def playground_save(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Save the edited template as a new version (the base version's model and parameters,
    or the model picked in the playground), then show it."""
    form = await _form(request)
    svc = services(request)
    name = form.get("prompt", "")
    base_number = _version_number(form.get("base"))
    query = {
        "prompt": name,
        "a": str(base_number or "latest"),
        "model_a": form.get("model", ""),
    }
    draft: dict[str, Any] | None = None
    try:
        if base_number is None:
            raise PageError(400, "Pick the version the edit starts from.")
        base = await run_in_threadpool(svc.prompts.get, user.project_id, name, base_number)
        draft = _editor(base)
        if draft["kind"] == "text":
            draft["text"] = form.get("template", "")
        else:
            for i, message in enumerate(draft["messages"]):
                message["content"] = form.get(f"content.{i}", message["content"])
        template = _edited_template(form, base)
        message = form.get("message", "").strip()[:2000]
        if not message:
            raise PageError(400, "Write a commit message: it tells reviewers what changed.")
        model = form.get("model", "").strip() or base.model
        if model != base.model and model not in chat_models(svc, user):
            raise PageError(400, f"'{model}' is not a chat model or route you may call.")
        schema = _edited_schema(template, base)
        view = await run_in_threadpool(
            lambda: svc.prompts.create(
                user.project_id,
                name,
                template=template,
                author=user.actor,
                author_id=user.identity,
                variables=schema,
                model=model,
                params=base.params,
                message=message,
            )
        )
    except (PageError, ServiceError) as exc:
        extra: dict[str, Any] = {"error": exc.message, "save_message": form.get("message", "")}
        if draft is not None:
            extra["editor"] = draft
        context, _ = await run_in_threadpool(
            lambda: _playground_context(request, user, query, **extra)
        )
        return render(request, "playground.html", context, status_code=exc.status_code)
    target = {"prompt": name, "a": str(view.version), "saved": str(view.version)}
    return RedirectResponse(f"/playground?{urlencode(target)}", status_code=303)


# -- approvals ----------------------------------------------------------------------------------


def _approvals_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    rows = services(request).approvals.list_requests(user.project_id)
    return {
        "nav": "approvals",
        "pending": [r for r in rows if r["status"] == "pending"],
        "decided": [r for r in rows if r["status"] != "pending"],
        "error": None,
        "error_code": None,
        "failed": None,
        "notice": None,
        **extra,
    }


@router.get("/approvals")
def approvals_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Approval requests of the project: pending first, then decided ones."""
    extra: dict[str, Any] = {}
    decided = request.query_params.get("decided", "")
    if decided and len(decided) <= 64:
        with contextlib.suppress(ServiceError):
            row = services(request).approvals.get(user.project_id, decided)
            extra["notice"] = (
                f"{row['status'].capitalize()}: {row['name']}@{row['version']} → '{row['label']}'."
            )
    return render(request, "approvals.html", _approvals_context(request, user, **extra))


async def _decide(request: Request, user: Principal, approval_id: str, decision: str) -> Response:
    form = await _form(request)
    approvals = services(request).approvals
    decide = approvals.approve if decision == "approve" else approvals.reject
    comment = form.get("comment", "").strip()[:2000]
    try:
        await run_in_threadpool(decide, user, approval_id, comment)
    except ServiceError as exc:
        error, code, status = exc.message, exc.code, exc.status_code
        context = await run_in_threadpool(
            lambda: _approvals_context(
                request, user, error=error, error_code=code, failed=approval_id
            )
        )
        return render(request, "approvals.html", context, status_code=status)
    return RedirectResponse(f"/approvals?{urlencode({'decided': approval_id})}", status_code=303)


@router.post("/approvals/{approval_id}/approve")
async def approve(
    request: Request, approval_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Approve a request (never the version's author) and move the label."""
    return await _decide(request, user, approval_id, "approve")


@router.post("/approvals/{approval_id}/reject")
async def reject(
    request: Request, approval_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    return await _decide(request, user, approval_id, "reject")
