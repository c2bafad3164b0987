"""The UI's pages: login, dashboard, traces explorer, trace detail, routes and models.

Handlers are a thin edge over the services: they read query parameters, call the trace
queries and the config, and render templates. A request made by HTMX gets only the
fragment it swaps (chosen by its ``HX-Target``); any other request gets the whole page.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from flywheel import __version__
from flywheel.security import Principal
from flywheel.security.access import session_tag
from flywheel.server.http import services
from flywheel.server.services import Services
from flywheel.tracing import TraceFilter
from flywheel.ui import present
from flywheel.ui.assets import STATIC_DIR, missing_vendor_files
from flywheel.ui.session import (
    CsrfFailed,
    Forbidden,
    LoginRequired,
    csrf_token,
    end_session,
    login_redirect,
    revoke_session,
    safe_next,
    session_principal,
    start_session,
    switch_project,
    ui_authorize,
)

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
PAGE_SIZE = 50
TRACE_STATUSES = ("ok", "error", "cancelled")
MAX_KEY_LENGTH = 512

# Scripts and styles come only from /static: no inline code, no third-party origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Vary": "HX-Request, HX-Target",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def static_url(name: str) -> str:
    """URL of a file under ``static/``, versioned by its modification time for caching."""
    try:
        version = int((STATIC_DIR / name).stat().st_mtime)
    except OSError:
        version = 0
    return f"/static/{name}?v={__version__}.{version}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(present.FILTERS)
    env.globals.update(static_url=static_url, version=__version__, windows=present.WINDOWS)
    return env


templates = Jinja2Templates(env=_environment())
router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    """Serve the UI on ``app``: static files at ``/static``, pages at ``/``."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)

    async def login_required(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, LoginRequired):  # registered for LoginRequired only
            raise exc
        return login_redirect(request, exc)

    async def forbidden(request: Request, exc: Exception) -> Response:
        if isinstance(exc, Forbidden):
            request.state.principal = exc.principal
            # A route without a policy is refused to everyone: say so, not which permission.
            problem = "permission" if exc.permission is not None else "policy"
            context = {"permission": str(exc.permission), "problem": problem}
        else:
            context = {"permission": "", "problem": "csrf"}
        return render(request, "forbidden.html", context, status_code=403)

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(Forbidden, forbidden)
    app.add_exception_handler(CsrfFailed, forbidden)


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """A template with the layout's common context and the UI's security headers."""
    missing = missing_vendor_files()
    names = {f.name for f in missing}
    user: Principal | None = getattr(request.state, "principal", None)
    full_context: dict[str, Any] = {
        "user": user,
        "can": (lambda permission: user.can(permission)) if user else (lambda _: False),
        "csrf_token": csrf_token(request) if user else "",
        "projects": _project_choices(request, user) if user else [],
        "nav": "",
        "vendor": {
            "htmx": "htmx.min.js" not in names,
            "chart": "chart.umd.min.js" not in names,
        },
        "missing_assets": [f.name for f in missing],
        **(context or {}),
    }
    response = templates.TemplateResponse(
        request, template, full_context, status_code=status_code, headers=PAGE_HEADERS
    )
    if headers:
        response.headers.update(headers)
    return response


def _project_choices(request: Request, user: Principal) -> list[str]:
    """Projects the switcher offers: a user's memberships (all for instance admins)."""
    access = services(request).access
    if user.kind == "user":
        return [m.project.id for m in access.memberships(user.id)]
    return [p.id for p in access.list_projects(user)]


def _htmx_target(request: Request) -> str | None:
    """The element an HTMX request will swap, or None for a full-page request."""
    if request.headers.get("hx-request") != "true":
        return None
    if request.headers.get("hx-history-restore-request") == "true":
        return None
    return request.headers.get("hx-target")


def _cross_site(request: Request) -> bool:
    # Browsers label every request with Sec-Fetch-Site; a form posted from another site
    # must not log anyone in or out.
    return request.headers.get("sec-fetch-site") == "cross-site"


def _options(*groups: list[str], selected: str | None = None) -> list[str]:
    """Sorted, de-duplicated choices for a filter, keeping a selected value that is absent."""
    values = {v for group in groups for v in group}
    if selected:
        values.add(selected)
    return sorted(values)


# -- login ---------------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, next: str | None = None) -> Response:
    """The login form; a visitor with a valid session goes straight on."""
    target = safe_next(next)
    if session_principal(request) is not None:
        return RedirectResponse(target, status_code=303)
    return render(request, "login.html", {"next": target, "error": None, "username": ""})


def _client(request: Request) -> str:
    return f"ip:{request.client.host if request.client else '?'}"


def _audit_login(
    svc: Services, actor: str, kind: str, resource_id: str, project_id: str | None = None
) -> None:
    svc.audit.record(
        actor=actor,
        action="login.success",
        resource_type=kind,
        resource_id=resource_id,
        project_id=project_id,
    )


@router.post("/login")
async def login(request: Request) -> Response:
    """Log in with a username and password, or with an API key; the session stores ids only.

    Failures are throttled per address and per username, and audited."""
    if _cross_site(request):
        error = "This login came from another site. Log in here instead."
        return render(
            request, "login.html", {"next": "/", "error": error, "username": ""}, status_code=403
        )
    svc = services(request)
    form = await request.form()
    username = str(form.get("username") or "").strip()[:100]
    password = str(form.get("password") or "")
    raw_key = str(form.get("api_key") or "").strip()
    target = safe_next(str(form.get("next") or "/"))
    address = _client(request)
    context = {"next": target, "username": username}
    wait = max(
        svc.address_throttle.retry_after(address),
        svc.account_throttle.retry_after(f"user:{username}") if username else 0.0,
    )
    if wait > 0:
        error = f"Too many failed logins. Try again in {int(wait) + 1} seconds."
        return render(
            request,
            "login.html",
            {**context, "error": error},
            status_code=429,
            headers={"Retry-After": str(int(wait) + 1)},
        )
    response = RedirectResponse(target, status_code=303)
    if username and password and len(password) <= 1024:
        user = await run_in_threadpool(svc.access.authenticate, username, password)
        if user is not None:
            await run_in_threadpool(_audit_login, svc, f"user:{user.username}", "user", user.id)
            start_session(request, response, user_id=user.id, password_tag=session_tag(user))
            return response
        error = "That username and password do not match an active user."
    elif raw_key and len(raw_key) <= MAX_KEY_LENGTH:
        key = await run_in_threadpool(svc.keys.verify, raw_key)
        if key is not None:
            await run_in_threadpool(
                _audit_login, svc, f"key:{key.name}", "api_key", key.id, key.project_id
            )
            start_session(request, response, key_id=key.id)
            return response
        error = "That API key is not valid, or it has expired or been revoked."
    else:
        error = "Enter a username and password, or an API key."
    svc.address_throttle.failed(address)
    if username:
        svc.account_throttle.failed(f"user:{username}")
    await run_in_threadpool(
        svc.audit.record,
        actor=f"user:{username}" if username else address,
        action="login.failure",
        resource_type="user" if username else "api_key",
        # Only a key's public prefix: whatever else was typed may be a pasted password.
        resource_id=username or (raw_key[:10] if raw_key.startswith("fw-") else None),
        after={"address": address},
    )
    return render(request, "login.html", {**context, "error": error}, status_code=401)


@router.post("/logout")
def logout(request: Request) -> Response:
    """End the session (on every replica: its id is revoked, not just its cookie removed)
    and return to the login page."""
    if _cross_site(request):
        return Response(status_code=403)
    response = RedirectResponse("/login", status_code=303)
    revoke_session(request)
    end_session(request, response)
    return response


@router.post("/project")
async def choose_project(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Switch the project the session acts in (one the user belongs to)."""
    form = await request.form()
    project = str(form.get("project") or "")
    target = safe_next(str(form.get("next") or "/"))
    if project not in _project_choices(request, user):
        return render(
            request, "forbidden.html", {"permission": "", "problem": "project"}, status_code=403
        )
    response = RedirectResponse(target, status_code=303)
    switch_project(request, response, project)
    return response


# -- observe: dashboard ----------------------------------------------------------------------


@router.get("/")
def dashboard(
    request: Request,
    window: str | None = None,
    route: str | None = None,
    user: Principal = Depends(ui_authorize),
) -> Response:
    """Totals and time series of gateway traffic over the selected window."""
    svc = services(request)
    project = user.project_id
    selected = present.window_for(window) or present.DEFAULT_WINDOW
    route = route or None
    stats = svc.traces.timeseries(project, selected.seconds, selected.buckets, route)
    context = {
        "nav": "dashboard",
        "window": selected,
        "window_name": present.WINDOW_NAMES[selected.key],
        "route": route,
        "routes": _options(
            [r.name for r in svc.config.routes],
            svc.traces.distinct_values(project, "route"),
            selected=route,
        ),
        "totals": stats["totals"],
        "chart": present.chart_data(stats),
        "base_url": str(request.base_url).rstrip("/"),
        "example_route": svc.config.routes[0].name if svc.config.routes else "default",
    }
    if _htmx_target(request) == "dashboard-panel":
        query = {"window": selected.key, **({"route": route} if route else {})}
        return render(
            request,
            "_dashboard_panel.html",
            context,
            headers={"HX-Push-Url": f"/?{urlencode(query)}"},
        )
    return render(request, "dashboard.html", context)


# -- observe: traces -------------------------------------------------------------------------


@router.get("/traces")
def traces(
    request: Request,
    route: str | None = None,
    model: str | None = None,
    status: str | None = None,
    window: str | None = None,
    cursor: str | None = None,
    user: Principal = Depends(ui_authorize),
) -> Response:
    """Root spans, newest first, filtered and paged with a keyset cursor."""
    svc = services(request)
    project = user.project_id
    selected = present.window_for(window, default=None)
    filters = {
        "route": route or "",
        "model": model or "",
        "status": status if status in TRACE_STATUSES else "",
        "window": selected.key if selected else "",
    }
    flt = TraceFilter(
        route=filters["route"] or None,
        model=filters["model"] or None,
        status=filters["status"] or None,
        since=time.time() - selected.seconds if selected else None,
    )
    try:
        page = svc.traces.list_traces(project, flt, PAGE_SIZE, cursor or None)
    except ValueError:
        # A mangled cursor (hand-edited URL) restarts from the newest trace.
        page = svc.traces.list_traces(project, flt, PAGE_SIZE, None)
    query = {k: v for k, v in filters.items() if v}
    canonical = "/traces" + (f"?{urlencode(query)}" if query else "")
    context = {
        "nav": "traces",
        "filters": filters,
        "filtered": bool(query),
        "rows": page.items,
        "next_url": f"/traces?{urlencode({**query, 'cursor': page.next_cursor})}"
        if page.next_cursor
        else None,
        "routes": _options(
            [r.name for r in svc.config.routes],
            svc.traces.distinct_values(project, "route"),
            selected=filters["route"],
        ),
        "models": _options(
            [m.name for m in svc.config.models],
            svc.traces.distinct_values(project, "model"),
            selected=filters["model"],
        ),
        "statuses": TRACE_STATUSES,
        "paged": bool(cursor),
        "first_url": canonical,
    }
    target = _htmx_target(request)
    if target == "load-more":
        return render(request, "_trace_rows.html", context)
    if target == "trace-results":
        # The form's own URL lists empty fields; push the tidy one instead.
        return render(request, "_trace_results.html", context, headers={"HX-Push-Url": canonical})
    return render(request, "traces.html", context)


@router.get("/traces/{trace_id}")
def trace_detail(
    request: Request, trace_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """One trace: its span tree and, for gateway spans, the call in full."""
    traces = services(request).traces
    spans = traces.get_trace(user.project_id, trace_id) if len(trace_id) <= 64 else []
    if not spans:
        return render(
            request, "not_found.html", {"nav": "traces", "trace_id": trace_id}, status_code=404
        )
    return render(
        request, "trace.html", {"nav": "traces", "trace": present.trace_view(trace_id, spans)}
    )


# -- serve: routes and models ----------------------------------------------------------------


async def _cache_stats(svc: Services, route: str, project_id: str) -> dict[str, Any] | None:
    """A cached route's hit rate in the project (None when its store cannot answer)."""
    try:
        return await svc.gateway.cache.stats(route, project_id)
    except Exception:
        return None


@router.get("/routes")
async def routes_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The configured routes (with each cached route's hit rate in the project) and the
    model catalog with each model's readiness."""
    return render(request, "routes.html", await _routes_context(services(request), user))


@router.post("/routes/{route}/cache/purge")
async def purge_route_cache(
    request: Request, route: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Drop the route's cached answers in the session's project (audited)."""
    svc = services(request)
    status, notice, error = 200, None, None
    if not any(r.name == route for r in svc.config.routes):
        status, error = 404, f"No route '{route}'."
    else:
        try:
            removed = await svc.gateway.cache.purge(route, user.project_id)
        except Exception:
            status, error = 503, "The response cache store cannot be reached; retry shortly."
        else:
            await run_in_threadpool(
                svc.audit.record,
                actor=user.actor,
                action="route.cache_purge",
                resource_type="route",
                resource_id=route,
                project_id=user.project_id,
                after={"removed": removed, "all_projects": False},
            )
            answers = "answer" if removed == 1 else "answers"
            notice = f"Removed {removed} cached {answers} of route '{route}' in this project."
    context = await _routes_context(svc, user)
    return render(
        request, "routes.html", {**context, "notice": notice, "error": error}, status_code=status
    )


async def _routes_context(svc: Services, user: Principal) -> dict[str, Any]:
    routes = []
    for route in svc.config.routes:
        total_weight = sum(t.weight for t in route.targets)
        routes.append(
            {
                "route": route,
                "targets": [
                    {
                        "target": t,
                        "share": t.weight / total_weight,
                        "timeout": t.timeout or route.timeout,
                    }
                    for t in route.targets
                ],
                "cache": await _cache_stats(svc, route.name, user.project_id)
                if route.cache is not None
                else None,
            }
        )
    catalog = [
        {
            "model": m,
            "provider_type": svc.config.providers[m.provider].type
            if m.provider in svc.config.providers
            else "",
            "ready": svc.providers.provider_for(m).is_ready(m),
        }
        for m in svc.config.models
    ]
    return {"nav": "routes", "routes": routes, "catalog": catalog, "notice": None, "error": None}
