"""URL paths for the SDK's requests."""

from __future__ import annotations

from urllib.parse import quote


def api_path(*parts: str | int) -> str:
    """A URL path from segments, each percent-encoded (a name cannot add a segment)."""
    return "/" + "/".join(quote(str(p), safe="") for p in parts)
