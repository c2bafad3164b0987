"""The UI's administration pages: projects and users (instance admins), the project's secrets
(project admins) and one's own password (any logged-in user).

Like the other pages these are a thin edge over the services the JSON API uses, so the same
checks and the same audit entries apply. Secret values and password hashes never reach a
rendered page: forms that carry them are re-rendered empty after an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from flywheel.errors import ServiceError
from flywheel.gateway.limits import Limits
from flywheel.security import AccessError, Principal
from flywheel.security.access import project_to_dict, user_to_dict
from flywheel.server.http import services
from flywheel.ui.routes import render
from flywheel.ui.session import keep_session, ui_authorize

router = APIRouter(include_in_schema=False)

T = TypeVar("T")

# Form fields of the limits editor, in the order of the Limits model, with the labels that
# error messages use.
LIMIT_FIELDS: dict[str, str] = {
    "rpm": "Requests per minute",
    "tpm": "Tokens per minute",
    "max_concurrent": "Requests in flight",
    "budget_usd": "Budget (USD)",
    "budget_period": "Budget period",
    "soft_pct": "Soft alert share",
}
# Without one of these the project is unlimited, and the period or alert share mean nothing.
_LIMITING_FIELDS = ("rpm", "tpm", "max_concurrent", "budget_usd")


class FormError(ServiceError):
    """A form value the page refuses before any service is called."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(status_code, message, "invalid_value")


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def _call(function: Callable[..., T], *args: Any) -> T:
    """Run a blocking service call in a worker thread, like the API does."""
    return await run_in_threadpool(function, *args)


def parse_limits(form: dict[str, str]) -> dict[str, Any] | None:
    """The project limits a form describes, validated by :class:`Limits`; None (unlimited)
    when no limit is filled in. Raises :class:`FormError` naming the field at fault."""
    values = {name: form[name].strip() for name in LIMIT_FIELDS if form.get(name, "").strip()}
    if not any(name in values for name in _LIMITING_FIELDS):
        return None
    try:
        limits = Limits.model_validate(values)
    except ValidationError as exc:
        problems = [
            f"{LIMIT_FIELDS.get(str(err['loc'][0]), str(err['loc'][0]))}: {err['msg']}"
            for err in exc.errors()
            if err["loc"]
        ]
        raise FormError("; ".join(problems) or "The limits are not valid.") from None
    return limits.model_dump(exclude_none=True)


# -- projects ------------------------------------------------------------------------------


def _projects_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    projects = services(request).access.list_projects(user)
    return {
        "nav": "admin-projects",
        "projects": [project_to_dict(p) for p in projects],
        "error": None,
        "message": None,
        "draft": {"name": "", "description": ""},
        **extra,
    }


def _projects_error(request: Request, user: Principal, exc: ServiceError, **extra: Any) -> Response:
    context = _projects_context(request, user, error=exc.message, **extra)
    return render(request, "admin_projects.html", context, status_code=exc.status_code)


@router.get("/admin/projects")
def projects_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Every project with its limits, a form to create one and one to edit each."""
    return render(request, "admin_projects.html", _projects_context(request, user))


@router.post("/admin/projects")
async def create_project(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Create a project (its id is its name)."""
    form = await _form(request)
    name = form.get("name", "").strip()
    description = form.get("description", "").strip()
    try:
        if len(description) > 2000:
            raise FormError("A description is at most 2000 characters.")
        await _call(services(request).access.create_project, name, user.actor, description)
    except ServiceError as exc:
        draft = {"name": name, "description": description}
        return _projects_error(request, user, exc, draft=draft)
    return RedirectResponse(f"/admin/projects#project-{name}", status_code=303)


@router.post("/admin/projects/{project_id}")
async def update_project(
    project_id: str, request: Request, user: Principal = Depends(ui_authorize)
) -> Response:
    """Replace a project's description and limits (empty limit fields: unlimited)."""
    form = await _form(request)
    access = services(request).access
    description = form.get("description", "").strip()
    try:
        if len(description) > 2000:
            raise FormError("A description is at most 2000 characters.")
        limits = parse_limits(form)
        project = await _call(access.get_project, project_id)
        if project.description != description:
            await _call(access.set_project_description, project_id, description, user.actor)
        await _call(access.set_project_limits, project_id, limits, user.actor)
    except ServiceError as exc:
        return _projects_error(request, user, exc)
    return RedirectResponse(f"/admin/projects#project-{project_id}", status_code=303)


# -- users ---------------------------------------------------------------------------------


def _users_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    # user_to_dict leaves the password hash out, so no template can render it.
    users = services(request).access.list_users()
    return {
        "nav": "admin-users",
        "users": [user_to_dict(u) for u in users],
        "error": None,
        "message": None,
        "draft": {"username": "", "is_admin": False},
        **extra,
    }


def _users_error(request: Request, user: Principal, exc: ServiceError, **extra: Any) -> Response:
    context = _users_context(request, user, error=exc.message, **extra)
    return render(request, "admin_users.html", context, status_code=exc.status_code)


@router.get("/admin/users")
def users_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Every user: admin flag, status and creation time, with password and status forms."""
    return render(request, "admin_users.html", _users_context(request, user))


@router.post("/admin/users")
async def create_user(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Create a user who logs in with a password."""
    form = await _form(request)
    username = form.get("username", "").strip()
    is_admin = form.get("is_admin") in ("on", "true", "1")
    try:
        created = await _call(
            services(request).access.create_user,
            username,
            form.get("password", ""),
            user.actor,
            is_admin,
        )
    except ServiceError as exc:
        draft = {"username": username, "is_admin": is_admin}
        return _users_error(request, user, exc, draft=draft)
    return RedirectResponse(f"/admin/users#user-{created.id}", status_code=303)


@router.post("/admin/users/{user_id}/password")
async def set_user_password(
    user_id: str, request: Request, user: Principal = Depends(ui_authorize)
) -> Response:
    """Give a user a new password (it is never shown back)."""
    form = await _form(request)
    access = services(request).access
    try:
        target = await _call(access.find_user, user_id)
        await _call(access.set_password, target.id, form.get("password", ""), user.actor)
    except ServiceError as exc:
        return _users_error(request, user, exc)
    message = f"The password of '{target.username}' was changed."
    context = _users_context(request, user, message=message)
    return render(request, "admin_users.html", context)


@router.post("/admin/users/{user_id}/disabled")
async def set_user_disabled(
    user_id: str, request: Request, user: Principal = Depends(ui_authorize)
) -> Response:
    """Disable a user (their sessions and keys stop working at once) or enable them again."""
    form = await _form(request)
    access = services(request).access
    disabled = form.get("disabled", "").lower()
    try:
        if disabled not in ("true", "false"):
            raise FormError("Say whether to disable the user (disabled=true or false).")
        target = await _call(access.find_user, user_id)
        if disabled == "true" and target.id == user.user_id and user.kind == "user":
            # The API allows it, but from this page it would lock the admin out mid-click.
            raise FormError("You cannot disable your own account here.", 409)
        await _call(access.set_user_disabled, target.id, disabled == "true", user.actor)
    except ServiceError as exc:
        return _users_error(request, user, exc)
    return RedirectResponse(f"/admin/users#user-{target.id}", status_code=303)


# -- secrets -------------------------------------------------------------------------------


def _secrets_context(request: Request, user: Principal, **extra: Any) -> dict[str, Any]:
    infos = services(request).secrets.list(user.project_id)
    return {
        "nav": "secrets",
        "secrets": [info.to_dict() for info in infos],
        "error": None,
        "message": None,
        "draft_name": "",
        **extra,
    }


def _secrets_error(request: Request, user: Principal, exc: ServiceError, **extra: Any) -> Response:
    context = _secrets_context(request, user, error=exc.message, **extra)
    return render(request, "secrets.html", context, status_code=exc.status_code)


async def _audit_secret(request: Request, user: Principal, action: str, name: str) -> None:
    # The store does not audit (the API's handlers do), so this edge records the same entry.
    await run_in_threadpool(
        lambda: services(request).audit.record(
            actor=user.actor,
            action=action,
            resource_type="secret",
            resource_id=name,
            project_id=user.project_id,
        )
    )


@router.get("/secrets")
def secrets_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's secret names and dates; values are never shown."""
    return render(request, "secrets.html", _secrets_context(request, user))


@router.post("/secrets")
async def set_secret(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Store or replace a secret, encrypted with the master key."""
    form = await _form(request)
    name = form.get("name", "").strip()
    value = form.get("value", "")
    try:
        if len(value) > 65_536:
            raise FormError("A secret value is at most 65536 characters.")
        try:
            await _call(services(request).secrets.set, user.project_id, name, value, user.actor)
        except ValueError as exc:
            # The store's messages name the secret and the problem, never the value.
            raise FormError(str(exc)) from None
    except ServiceError as exc:
        return _secrets_error(request, user, exc, draft_name=name)
    await _audit_secret(request, user, "secret.set", name)
    context = _secrets_context(request, user, message=f"Secret '{name}' saved.")
    return render(request, "secrets.html", context)


@router.post("/secrets/delete")
async def delete_secret(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Delete a secret; routes that use it fail until it is set again. The name is a form
    field, not a path segment, so a name like '..' cannot change the URL."""
    name = (await _form(request)).get("name", "")
    deleted = await _call(services(request).secrets.delete, user.project_id, name)
    if not deleted:
        error = AccessError(404, f"No secret '{name}'.", "secret_not_found")
        return _secrets_error(request, user, error)
    await _audit_secret(request, user, "secret.delete", name)
    context = _secrets_context(request, user, message=f"Secret '{name}' deleted.")
    return render(request, "secrets.html", context)


# -- account -------------------------------------------------------------------------------


def _account_context(**extra: Any) -> dict[str, Any]:
    return {"nav": "account", "error": None, "message": None, **extra}


def _account_error(request: Request, exc: ServiceError, **headers: str) -> Response:
    context = _account_context(error=exc.message)
    return render(
        request, "account.html", context, status_code=exc.status_code, headers=headers or None
    )


@router.get("/account")
def account_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Who is logged in, and a form to change one's own password."""
    return render(request, "account.html", _account_context())


@router.post("/account/password")
async def change_own_password(
    request: Request, user: Principal = Depends(ui_authorize)
) -> Response:
    """Change one's own password: the current one is checked first (wrong answers count
    towards the same throttle as failed logins, so a left-open session cannot be used to
    guess it)."""
    if user.kind != "user" or user.user_id is None:
        error = FormError("You are signed in with an API key, which has no password.", 403)
        return _account_error(request, error)
    svc = services(request)
    form = await _form(request)
    current = form.get("current_password", "")
    new = form.get("new_password", "")
    throttle_key = f"user:{user.name}"
    wait = svc.account_throttle.retry_after(throttle_key)
    if wait > 0:
        error = FormError(f"Too many wrong passwords. Try again in {int(wait) + 1} seconds.", 429)
        return _account_error(request, error, **{"Retry-After": str(int(wait) + 1)})
    if not current or not new:
        return _account_error(request, FormError("Fill in your current and new password."))
    if new != form.get("confirm_password", ""):
        return _account_error(request, FormError("The two new passwords do not match."))
    if len(current) > 1024:
        return _account_error(request, FormError("Your current password is not correct."))
    checked = await _call(svc.access.authenticate, user.name, current)
    if checked is None or checked.id != user.user_id:
        svc.account_throttle.failed(throttle_key)
        return _account_error(request, FormError("Your current password is not correct."))
    if new == current:
        return _account_error(request, FormError("The new password is the same as the old one."))
    try:
        await _call(svc.access.set_password, user.user_id, new, user.actor)
    except ServiceError as exc:
        return _account_error(request, exc)
    message = "Your password was changed. Your other sessions have ended."
    response = render(request, "account.html", _account_context(message=message))
    tag = await _call(svc.access.password_tag, user.user_id)
    if tag is not None:
        keep_session(request, response, tag)
    return response
