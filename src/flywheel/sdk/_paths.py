"""What the SDK's resource groups share: URL paths, the client they call, parameters."""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import quote


class Transport(Protocol):
    """What the SDK's resource groups need of :class:`flywheel.sdk.Client`."""

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
    ) -> Any: ...

    def _raw(self, path: str, params: dict[str, Any] | None = None) -> bytes: ...


def clean(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the keys whose value is None (left to the server's defaults)."""
    return {k: v for k, v in params.items() if v is not None}


def api_path(*parts: str | int) -> str:
    """A URL path from segments, each percent-encoded (a name cannot add a segment)."""
    return "/" + "/".join(quote(str(p), safe="") for p in parts)
