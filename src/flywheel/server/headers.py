"""Security headers on every response (UI pages add their stricter set themselves)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Bytes, built once: this runs on every gateway response.
API_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
NO_STORE = (b"cache-control", b"no-store")


class SecurityHeaders:
    """A pure ASGI middleware (no per-request task or body buffering, so streams flow):
    adds :data:`API_HEADERS` where a response has not set them, and ``Cache-Control:
    no-store`` on ``/api`` answers, which carry project data."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = (*API_HEADERS, NO_STORE) if scope["path"].startswith("/api/") else API_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in extra if name not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
