"""The SDK's ``flywheel loop`` (``client.loops``): a route's bad answers, through a dataset,
tuning, an eval gate, an approval and a canary, to a better model in production or an
automatic rollback.

loop = client.loops.start("support", method="sft", min_examples=20,
                          canary={"share": 0.1, "min_samples": 200})
client.loops.wait(loop["id"], until=("waiting",))      # stops at the approval
[(s["name"], s["status"]) for s in client.loops.get(loop["id"])["steps"]]
client.loops.cancel(loop["id"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from flywheel.sdk._paths import Transport as _Transport
from flywheel.sdk._paths import api_path
from flywheel.sdk._paths import clean as _clean

_Dicts = list[dict[str, Any]]

# Where a loop stops moving on its own: its ends, and a failure (until resumed).
ENDED = ("promoted", "rolled_back", "rejected", "not_enough_data", "gate_failed", "cancelled")
STOPPED = (*ENDED, "failed")


class Loops:
    """Start, follow, resume and cancel loops: ``client.loops``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def start(self, route: str, **spec: Any) -> dict[str, Any]:
        """Start the loop on ``route``. ``spec`` holds any other field of the loop spec
        (``method``, ``min_examples``, ``judge``, ``train``, ``gate={...}``,
        ``canary={...}``, ...); unset fields keep their defaults. Bad input is a 400 naming
        the field; a loop already active on the route is a 409."""
        body = {"route": route, **_clean(spec)}
        found: dict[str, Any] = self._client._request("POST", "/api/loops", json=body)
        return found

    def list(self, *, status: str | None = None, limit: int = 100) -> _Dicts:
        """The project's loops, newest first."""
        data: _Dicts = self._client._request(
            "GET", "/api/loops", params=_clean({"status": status, "limit": limit})
        )["data"]
        return data

    def get(self, loop_id: str) -> dict[str, Any]:
        """One loop with its ``steps`` in order (each: status, job, result, timing)."""
        found: dict[str, Any] = self._client._request("GET", api_path("api", "loops", loop_id))
        return found

    def resume(self, loop_id: str) -> dict[str, Any]:
        """Run a failed loop's failed step again (a 409 unless the loop failed)."""
        found: dict[str, Any] = self._client._request(
            "POST", api_path("api", "loops", loop_id, "resume")
        )
        return found

    def cancel(self, loop_id: str) -> dict[str, Any]:
        """Cancel the loop with its running job, pending approval and running canary."""
        found: dict[str, Any] = self._client._request(
            "POST", api_path("api", "loops", loop_id, "cancel")
        )
        return found

    def wait(
        self,
        loop_id: str,
        *,
        until: Iterable[str] = STOPPED,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow a loop until its status is one of ``until`` (by default: it ended or
        failed) and return it; ``on_update`` gets the loop after every poll. ``until`` may
        name ``"waiting"`` to stop at the approval. ``TimeoutError`` after ``timeout``."""
        wanted = frozenset(until)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            loop = self.get(loop_id)
            if on_update is not None:
                on_update(loop)
            if loop["status"] in wanted:
                return loop
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"loop {loop_id} still {loop['status']} at step {loop['step']} after {timeout}s"
                )
            time.sleep(poll)


def summarize_step(step: dict[str, Any]) -> str:
    """One line about what a loop step found or made (or why it failed), as the CLI's
    ``flywheel loops show`` and the UI's timeline print it."""
    if step.get("error") and step["status"] == "failed":
        return f"error: {step['error']}"
    result = step.get("result") or {}
    if not result:
        return ""
    name = step["name"]
    if name == "collect":
        return (
            f"{result.get('bad', 0)} bad answers ({result.get('by_feedback', 0)} by feedback, "
            f"{result.get('by_judge', 0)} by judge), {result.get('corrected', 0)} corrected "
            f"(need {result.get('needed', '?')}), {result.get('positive', 0)} well-rated; "
            f"base {result.get('base', '?')}"
        )
    if name == "dataset":
        return (
            f"{result.get('dataset')}: {result.get('items')} items ({result.get('corrections')} "
            f"corrections, {result.get('rated')} rated), {result.get('train')} train / "
            f"{result.get('test')} test"
        )
    if name == "train":
        run = result.get("run_id")
        return f"adapter {result.get('model')}" + (f", run {str(run)[:8]}" if run else "")
    if name == "register":
        return f"merged {result.get('model')}"
    if name == "gate":
        return str(result.get("summary") or ("passed" if result.get("passed") else "failed"))
    if name == "approval":
        if not result.get("approval_id"):
            return f"'{result.get('label')}' moved onto {result.get('model')} (unprotected)"
        by = result.get("approved_by")
        return f"approval {result['approval_id']} for {result.get('model')} → " + (
            f"'{result.get('label')}'" + (f", approved by {by}" if by else "")
        )
    if name == "canary":
        return f"experiment {result.get('experiment_id')} ({result.get('served_name', '-')})"
    if name == "decision":
        text = f"{result.get('outcome')}: {result.get('reason') or ''}".rstrip(": ")
        reverted = result.get("reverted")
        if reverted:
            text += f"; '{reverted.get('label')}' back to {reverted.get('to_version')}"
        return text
    return json.dumps(result, default=str)[:120]


__all__ = ["ENDED", "STOPPED", "Loops", "summarize_step"]
