"""The UI's governance pages: costs, access (members and API keys) and the audit log.

Like the other pages, these are a thin edge: forms post to handlers that call the same
services as the API, so the API's checks (role caps, project isolation, audit) apply here too.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from flywheel.security import AccessError, Principal
from flywheel.security.audit import to_dict as audit_to_dict
from flywheel.security.rbac import ROLES, SCOPES
from flywheel.server.http import services
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)
AUDIT_PAGE_SIZE = 100


@router.get("/costs")
def costs_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """This month's spend by route, model and key, with the month-end forecast."""
    svc = services(request)
    report = svc.traces.costs(user.project_id)
    key_names = {k.id: k.name for k in svc.keys.list(user.project_id)}
    for row in report["by_key"]:
        row["name"] = key_names.get(row["api_key_id"], row["api_key_id"] or "(none)")
    limits = svc.access.project_limits(user.project_id) or {}
    budget = limits.get("budget_usd")
    top = max((r["cost"] for r in report["by_route"]), default=0.0) or 1.0
    month = datetime.fromtimestamp(report["period_start"], UTC).strftime("%B %Y")
    return render(
        request,
        "costs.html",
        {"nav": "costs", "report": report, "budget": budget, "top": top, "month": month},
    )


# -- access: members and keys ---------------------------------------------------------------


def _access_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    svc = services(request)
    return {
        "nav": "access",
        "members": svc.access.list_members(user.project_id),
        "keys": svc.keys.list(user.project_id),
        "roles": ROLES,
        "scopes": SCOPES,
        "model_names": [r.name for r in svc.config.routes] + [m.name for m in svc.config.models],
        "new_key": None,
        "error": None,
        "now": time.time(),
        **extra,
    }


@router.get("/access")
def access_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's members with their roles, and its API keys."""
    return render(request, "access.html", _access_context(request, user))


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


@router.post("/access/members")
async def set_member(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Add a user to the project with a role, change the role, or remove them."""
    form = await _form(request)
    access = services(request).access
    try:
        member = await run_in_threadpool(access.find_user, form.get("username", "").strip())
        if form.get("role") == "remove":
            await run_in_threadpool(access.remove_member, user.project_id, member.id, user.actor)
        else:
            await run_in_threadpool(
                access.set_member, user.project_id, member.id, form.get("role", ""), user.actor
            )
    except AccessError as exc:
        context = _access_context(request, user, error=exc.message)
        return render(request, "access.html", context, status_code=exc.status_code)
    return RedirectResponse("/access", status_code=303)


@router.post("/access/keys")
async def create_key(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Create a key; the page shows it once."""
    form = await _form(request)
    access = services(request).access
    allowed = [m.strip() for m in form.get("allowed_models", "").split(",") if m.strip()]
    expires_days = form.get("expires_days", "").strip()
    try:
        expires_at = time.time() + float(expires_days) * 86400 if expires_days else None
        raw, record = await run_in_threadpool(
            lambda: access.create_key(
                user,
                form.get("name", ""),
                role=form.get("role", "developer"),
                scope=form.get("scope", "gateway"),
                expires_at=expires_at,
                allowed_models=allowed or None,
            )
        )
    except ValueError:
        context = _access_context(request, user, error="Expiry must be a number of days.")
        return render(request, "access.html", context, status_code=400)
    except AccessError as exc:
        context = _access_context(request, user, error=exc.message)
        return render(request, "access.html", context, status_code=exc.status_code)
    context = _access_context(request, user, new_key={"raw": raw, "name": record.name})
    return render(request, "access.html", context, status_code=201)


@router.post("/access/keys/{key_id}/revoke")
async def revoke_key(
    key_id: str, request: Request, user: Principal = Depends(ui_authorize)
) -> Response:
    try:
        await run_in_threadpool(services(request).access.revoke_key, user, key_id)
    except AccessError as exc:
        context = _access_context(request, user, error=exc.message)
        return render(request, "access.html", context, status_code=exc.status_code)
    return RedirectResponse("/access", status_code=303)


# -- audit ----------------------------------------------------------------------------------


@router.get("/audit")
def audit_page(
    request: Request,
    action: str | None = None,
    actor: str | None = None,
    before_seq: int | None = None,
    verify: bool = False,
    resource_type: str | None = None,
    resource_id: str | None = None,
    user: Principal = Depends(ui_authorize),
) -> Response:
    """The project's audit entries, newest first; the chain is verified on request (it walks
    the whole log)."""
    audit = services(request).audit
    events = audit.list(
        project_id=None if user.instance_admin else user.project_id,
        action=action or None,
        actor=actor or None,
        limit=AUDIT_PAGE_SIZE,
        before_seq=before_seq,
        resource_type=resource_type or None,
        resource_id=resource_id or None,
    )
    rows = [audit_to_dict(e) for e in events]
    more = len(rows) == AUDIT_PAGE_SIZE
    return render(
        request,
        "audit.html",
        {
            "nav": "audit",
            "rows": rows,
            "verification": audit.verify() if verify else None,
            "filters": {
                "action": action or "",
                "actor": actor or "",
                "resource_type": resource_type or "",
                "resource_id": resource_id or "",
            },
            "next_seq": rows[-1]["seq"] if more and rows else None,
        },
    )
