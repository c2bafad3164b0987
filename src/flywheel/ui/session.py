"""UI sessions: a signed cookie holding only the API key's id, re-checked on every request."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from flywheel.security import AuthenticatedKey
from flywheel.server.http import services

COOKIE_NAME = "flywheel_session"
MAX_AGE_SECONDS = 12 * 3600
_SALT = "flywheel.ui.session"


class LoginRequired(Exception):
    """Raised by :func:`current_key` when the request carries no valid session."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


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


def session_key_id(request: Request) -> str | None:
    """The key id in the request's session cookie, if the signature and age are valid."""
    token = request.cookies.get(COOKIE_NAME)
    if not token:
        return None
    try:
        data: Any = _serializer(request).loads(token, max_age=MAX_AGE_SECONDS)
    except BadSignature:
        return None
    key_id = data.get("kid") if isinstance(data, dict) else None
    return key_id if isinstance(key_id, str) else None


def current_key(request: Request) -> AuthenticatedKey:
    """FastAPI dependency: the logged-in key, still active; raises :class:`LoginRequired`."""
    key_id = session_key_id(request)
    key = services(request).keys.get_active(key_id) if key_id else None
    if key is None:
        raise LoginRequired(_requested_page(request))
    request.state.ui_key = key
    return key


def start_session(request: Request, response: Response, key: AuthenticatedKey) -> None:
    """Set the session cookie for ``key`` on ``response``."""
    response.set_cookie(
        COOKIE_NAME,
        _serializer(request).dumps({"kid": key.id}),
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
