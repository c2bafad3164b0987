"""UI sessions: a signed cookie naming the user (or API key) and the project in use.

The cookie holds ids only, never a key or password, and is re-checked on every request, so
revoking a key, disabling a user or removing a membership ends their sessions at once.
Every state-changing form carries a CSRF token derived from the session's nonce.

Replicas share what sessions need (:mod:`flywheel.security.sessions`): the signing secret
is stored once in the database, and a logout revokes the session id on every replica.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from flywheel.security import AccessError, Permission, Principal
from flywheel.server.http import read_form, services
from flywheel.server.policy import required_permission

COOKIE_NAME = "flywheel_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
MAX_AGE_SECONDS = 12 * 3600
_SALT = "flywheel.ui.session"
# Where a request keeps its checked session (see session_data).
_CHECKED = "flywheel_session_checked"


class LoginRequired(Exception):
    """Raised when the request carries no valid session."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class Forbidden(Exception):
    """Raised when the logged-in principal lacks the page's permission."""

    def __init__(self, principal: Principal, permission: Permission | None) -> None:
        super().__init__(str(permission))
        self.principal = principal
        self.permission = permission


class CsrfFailed(Exception):
    """Raised when a state-changing request lacks the session's CSRF token."""


def _serializer(request: Request) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(services(request).secret, salt=_SALT)


def safe_next(value: str | None) -> str:
    """``value`` if it is a same-site relative path, else ``/`` (no open redirects)."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    if any(ord(c) < 0x20 or c == "\\" for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def _requested_page(request: Request) -> str:
    """Where to return after logging in: for an HTMX partial, the page it was made from."""
    current = request.headers.get("hx-current-url")
    if current:
        parts = urlsplit(current)
        if parts.netloc == request.url.netloc:
            return safe_next(parts.path + (f"?{parts.query}" if parts.query else ""))
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return safe_next(path)


def session_data(request: Request) -> dict[str, Any] | None:
    """The session cookie's contents, if its signature and age are valid and it was not
    ended by a logout (on any replica)."""
    token = request.cookies.get(COOKIE_NAME)
    if not token:
        return None
    # A page asks several times (principal, CSRF token): check the revocation once.
    known: tuple[str, dict[str, Any] | None] | None = getattr(request.state, _CHECKED, None)
    if known is not None and known[0] == token:
        return known[1]
    try:
        data: Any = _serializer(request).loads(token, max_age=MAX_AGE_SECONDS)
    except BadSignature:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sid"), str):
        return None
    valid = None if services(request).sessions.revocations.is_revoked(data["sid"]) else data
    setattr(request.state, _CHECKED, (token, valid))
    return valid


def session_principal(request: Request) -> Principal | None:
    """The principal of a valid session, still active and still a member of its project."""
    data = session_data(request)
    if data is None:
        return None
    svc = services(request)
    project = data.get("pid") if isinstance(data.get("pid"), str) else None
    if isinstance(data.get("uid"), str):
        tag = data.get("pwt") if isinstance(data.get("pwt"), str) else ""
        return svc.access.principal_for_user(data["uid"], project, tag)
    if isinstance(data.get("kid"), str):
        key = svc.keys.get_active(data["kid"])
        if key is None:
            return None
        try:
            return svc.access.principal_for_key(key, project)
        except AccessError:
            return None
    return None


def csrf_token(request: Request) -> str:
    """The CSRF token of the request's session ('' without one)."""
    data = session_data(request)
    if data is None:
        return ""
    secret = services(request).secret.encode()
    return hmac.new(secret, f"csrf:{data['sid']}".encode(), hashlib.sha256).hexdigest()


async def check_csrf(request: Request) -> None:
    """Refuse a state-changing request whose form field or header lacks the token."""
    expected = csrf_token(request)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        # Bounded: a form is read whole (files included) to find the token.
        form = await read_form(request)
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not expected or not sent or not hmac.compare_digest(expected, sent):
        raise CsrfFailed()


async def ui_authorize(request: Request) -> Principal:
    """Page dependency: a valid session, the route's permission (deny by default), and a
    CSRF token on anything but GET."""
    principal = session_principal(request)
    if principal is None:
        raise LoginRequired(_requested_page(request))
    route = request.scope.get("route")
    permission = required_permission(request.method, getattr(route, "path", ""))
    if permission is None or not principal.can(permission):
        raise Forbidden(principal, permission)
    if request.method not in ("GET", "HEAD"):
        await check_csrf(request)
    request.state.principal = principal
    return principal


def start_session(
    request: Request,
    response: Response,
    *,
    user_id: str | None = None,
    key_id: str | None = None,
    project_id: str | None = None,
    password_tag: str | None = None,
) -> None:
    """Set a new session cookie (a fresh nonce, so a new CSRF token) on ``response``; a
    user's session carries ``password_tag`` and ends when the password changes."""
    data: dict[str, Any] = {"sid": secrets.token_urlsafe(16)}
    if user_id:
        data["uid"] = user_id
        data["pwt"] = password_tag or ""
    if key_id:
        data["kid"] = key_id
    if project_id:
        data["pid"] = project_id
    _set_cookie(request, response, data)


def switch_project(request: Request, response: Response, project_id: str) -> None:
    """Keep the session, acting in ``project_id`` from now on."""
    data = dict(session_data(request) or {})
    data["pid"] = project_id
    _set_cookie(request, response, data)


def keep_session(request: Request, response: Response, password_tag: str) -> None:
    """Keep the session going after its user changed their own password."""
    data = dict(session_data(request) or {})
    data["pwt"] = password_tag
    _set_cookie(request, response, data)


def _set_cookie(request: Request, response: Response, data: dict[str, Any]) -> None:
    response.set_cookie(
        COOKIE_NAME,
        _serializer(request).dumps(data),
        max_age=MAX_AGE_SECONDS,
        path="/",
        httponly=True,
        samesite="lax",
        secure=services(request).settings.cookie_secure,
    )


def end_session(request: Request, response: Response) -> None:
    """Remove the session cookie (with the same attributes it was set with)."""
    response.delete_cookie(
        COOKIE_NAME,
        path="/",
        httponly=True,
        samesite="lax",
        secure=services(request).settings.cookie_secure,
    )


def revoke_session(request: Request) -> None:
    """End the request's session on every replica (a logout): its cookie, even if kept or
    copied, is refused from now on."""
    data = session_data(request)
    if data is not None:
        services(request).sessions.revocations.revoke(data["sid"], MAX_AGE_SECONDS)
        setattr(request.state, _CHECKED, None)


def login_redirect(request: Request, exc: LoginRequired) -> Response:
    """Send an unauthenticated request to the login page.

    A full page gets a 303; an HTMX request gets ``HX-Redirect`` instead, because the
    browser would follow a 303 inside the XHR and swap the login form into a fragment.
    """
    target = "/login" if exc.next_url == "/" else f"/login?next={quote(exc.next_url, safe='')}"
    response: Response
    if request.headers.get("hx-request") == "true":
        response = Response(status_code=401, headers={"HX-Redirect": target})
    else:
        response = RedirectResponse(target, status_code=303)
    if request.cookies.get(COOKIE_NAME):
        end_session(request, response)
    return response
