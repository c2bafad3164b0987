"""``/api/routes/{route}/cache``: a route's response cache in the caller's project: its hit
rate, and purging it (the logic is in :mod:`flywheel.gateway.cache`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from flywheel.config import RouteConfig
from flywheel.gateway import GatewayError
from flywheel.security.rbac import Permission
from flywheel.server.http import ERROR_RESPONSES, authorize, forbidden, principal, services
from flywheel.server.services import Services

log = logging.getLogger("flywheel.server")
router = APIRouter(
    prefix="/api", tags=["flywheel"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)


def _route(svc: Services, name: str) -> RouteConfig:
    route = next((r for r in svc.config.routes if r.name == name), None)
    if route is None:
        raise GatewayError(404, f"No route '{name}'.", param="route", code="not_found")
    return route


def _unavailable(exc: Exception) -> GatewayError:
    log.warning("response cache store unavailable: %s", exc)
    return GatewayError(
        503,
        "The response cache store cannot be reached right now; retry shortly.",
        code="cache_unavailable",
        headers={"Retry-After": "1"},
    )


async def cache_summary(svc: Services, route: RouteConfig, project_id: str) -> dict[str, Any]:
    """The route's cache settings and, in ``project_id``, its hits, misses, bypassed calls,
    hit rate and stored answers (raises when the store cannot answer)."""
    stats = await svc.gateway.cache.stats(route.name, project_id)
    return {
        "route": route.name,
        "enabled": route.cache is not None,
        "config": route.cache.model_dump(mode="json") if route.cache is not None else None,
        **stats,
    }


@router.get("/routes/{route}/cache")
async def route_cache(route: str, request: Request) -> Any:
    """The route's response cache in the caller's project: settings, hits, misses, bypassed
    calls, hit rate (hits over lookups) and stored answers."""
    svc = services(request)
    config = _route(svc, route)
    try:
        return await cache_summary(svc, config, principal(request).project_id)
    except Exception as exc:
        raise _unavailable(exc) from None


@router.delete("/routes/{route}/cache")
async def purge_route_cache(
    route: str,
    request: Request,
    all_projects: bool = Query(
        default=False, description="Every project's answers (instance admins only)."
    ),
) -> Any:
    """Drop the route's cached answers in the caller's project (``all_projects``: in every
    project); returns how many were removed. Audited."""
    svc, caller = services(request), principal(request)
    _route(svc, route)
    if all_projects and not caller.instance_admin:
        raise forbidden(caller, Permission.CONFIG_WRITE)
    project = None if all_projects else caller.project_id
    try:
        removed = await svc.gateway.cache.purge(route, project)
    except Exception as exc:
        raise _unavailable(exc) from None
    await asyncio.to_thread(
        svc.audit.record,
        actor=caller.actor,
        action="route.cache_purge",
        resource_type="route",
        resource_id=route,
        project_id=project,
        after={"removed": removed, "all_projects": all_projects},
    )
    return {"route": route, "project": project, "all_projects": all_projects, "removed": removed}
