"""The SDK's canary experiments on routes (``client.experiments``).

exp = client.experiments.create(
    "greeter-v3", route="greeter-route",
    variants=[{"name": "control", "share": 0.9},
              {"name": "v3", "prompt": "greeter@3", "share": 0.1}],
    metric={"source": "feedback"}, min_samples=200,
)
client.experiments.get(exp["id"])["looks"][-1]["p_value"]
client.experiments.stop(exp["id"])

# Shadow mode: the control serves every call; 20 % of them are mirrored to the candidate,
# whose answers an online judge scores. The outcome recommends or rejects it.
client.experiments.create(
    "greeter-v3-shadow", route="greeter-route", mode="shadow",
    variants=[{"name": "control", "share": 0.8},
              {"name": "v3", "prompt": "greeter@3", "share": 0.2}],
    metric={"source": "judge:relevance"},
)
"""

from __future__ import annotations

from typing import Any

from flywheel.sdk._paths import Transport as _Transport
from flywheel.sdk._paths import api_path
from flywheel.sdk._paths import clean as _clean

_Dicts = list[dict[str, Any]]


class Experiments:
    """Start, watch and stop experiments on routes: ``client.experiments``."""

    def __init__(self, client: _Transport) -> None:
        self._client = client

    def create(
        self,
        name: str,
        *,
        route: str,
        variants: list[dict[str, Any]],
        control: str | None = None,
        mode: str = "canary",
        unit: str = "user",
        metric: dict[str, Any] | None = None,
        guardrails: dict[str, Any] | None = None,
        alpha: float | None = None,
        tau: float | None = None,
        min_samples: int | None = None,
    ) -> dict[str, Any]:
        """Start an experiment on ``route``: ``variants`` are ``{name, share, prompt?,
        model?}`` (shares summing to 1); the first is the control unless ``control`` names
        another. ``mode="shadow"`` serves the control only and mirrors the candidate's share
        to it (the metric must then be ``judge:<score name>``). Bad input is a 400 naming
        the field."""
        body = _clean(
            {
                "name": name,
                "route": route,
                "variants": variants,
                "control": control,
                "mode": mode,
                "unit": unit,
                "metric": metric,
                "guardrails": guardrails,
                "alpha": alpha,
                "tau": tau,
                "min_samples": min_samples,
            }
        )
        found: dict[str, Any] = self._client._request("POST", "/api/experiments", json=body)
        return found

    def list(self, *, status: str | None = None) -> _Dicts:
        """The project's experiments, newest first."""
        data: _Dicts = self._client._request(
            "GET", "/api/experiments", params=_clean({"status": status})
        )["data"]
        return data

    def get(self, experiment_id: str) -> dict[str, Any]:
        """One experiment with its ``looks`` (each variant's metrics, p-value, interval)."""
        found: dict[str, Any] = self._client._request(
            "GET", api_path("api", "experiments", experiment_id)
        )
        return found

    def stop(self, experiment_id: str) -> dict[str, Any]:
        """Stop a running experiment: the route serves as configured; nothing is promoted."""
        found: dict[str, Any] = self._client._request(
            "POST", api_path("api", "experiments", experiment_id, "stop")
        )
        return found


__all__ = ["Experiments"]
