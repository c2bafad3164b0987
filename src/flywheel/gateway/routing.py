"""Routes: which targets to try, in what order, with what retries and timeouts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from flywheel.config import CatalogModel, FlywheelConfig, RetryPolicy, RouteConfig, RouteTarget
from flywheel.gateway.errors import GatewayError
from flywheel.providers.base import ProviderError


@dataclass(frozen=True)
class Step:
    """One target in a plan, with the timeout to use for it."""

    model: CatalogModel
    timeout: float


class RouteTable:
    """Resolves a requested ``model`` (a route or a catalog model) to an ordered plan."""

    def __init__(self, config: FlywheelConfig, rng: random.Random | None = None) -> None:
        self.models = {m.name: m for m in config.models}
        self.routes = {r.name: r for r in config.routes}
        self._rng = rng or random.Random()

    def resolve(self, name: str, kind: str) -> RouteConfig:
        """The route for ``name``; a bare catalog model is a one-target route."""
        route = self.routes.get(name)
        if route is None:
            model = self.models.get(name)
            if model is None:
                raise GatewayError(
                    404,
                    f"The model '{name}' does not exist; GET /v1/models lists routes and models.",
                    param="model",
                    code="model_not_found",
                )
            if model.status == "blocked":
                raise GatewayError(
                    403,
                    f"The model '{name}' is blocked in the model catalog; ask an admin to "
                    "approve it or use an approved model.",
                    param="model",
                    code="model_blocked",
                )
            route = RouteConfig(name=name, targets=[RouteTarget(model=name)])
        if route.prompt_targets:
            raise GatewayError(
                400, f"'{name}' routes to prompts; it cannot be used here", param="model"
            )
        first = self.models[route.targets[0].model or ""]
        if first.kind != kind:
            raise GatewayError(
                400, f"'{name}' is a {first.kind} model, not a {kind} model", param="model"
            )
        return route

    def pick(self, route: RouteConfig) -> RouteTarget:
        """One target, drawn by weight (how a prompt route picks its prompt version)."""
        return self._rng.choices(route.targets, weights=[t.weight for t in route.targets])[0]

    def plan(self, route: RouteConfig) -> list[Step]:
        """A weighted pick of the primary target, then the other targets by weight, then the
        fallbacks in their configured order; each model at most once."""
        targets = list(route.targets)
        ordered: list[RouteTarget] = []
        while targets:
            pick = self._rng.choices(targets, weights=[t.weight for t in targets])[0]
            ordered.append(pick)
            targets.remove(pick)
        steps: list[Step] = []
        seen: set[str] = set()
        for target in ordered:
            if target.model is not None and target.model not in seen:
                seen.add(target.model)
                steps.append(Step(self.models[target.model], target.timeout or route.timeout))
        for name in route.fallbacks:
            if name not in seen:
                seen.add(name)
                steps.append(Step(self.models[name], route.timeout))
        return steps

    def backoff(self, policy: RetryPolicy, retry: int, error: ProviderError) -> float | None:
        """Seconds before retry number ``retry`` (0-based), or None to stop retrying this target.

        Exponential with full jitter; an upstream ``Retry-After`` is honoured as a floor, and one
        longer than ``max_retry_after`` moves on to the next target instead of waiting.
        """
        if retry >= policy.attempts or error.trigger not in policy.on:
            return None
        delay = self._rng.uniform(0, min(policy.backoff_max, policy.backoff_initial * 2**retry))
        if error.retry_after is not None:
            if error.retry_after > policy.max_retry_after:
                return None
            delay = max(delay, error.retry_after)
        return delay
