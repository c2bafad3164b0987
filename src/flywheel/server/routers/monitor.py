"""Monitoring: ``/metrics`` for Prometheus, per-route series and drift checks, guard previews
and alert rules with their events."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.config.schema import DriftConfig, GuardPolicyConfig, parse_duration
from flywheel.gateway import GatewayError
from flywheel.guards.policy import GuardConfigError, GuardPolicy
from flywheel.monitor.alerts import RuleSpec, parse_rule
from flywheel.monitor.metrics import series
from flywheel.security.rbac import Permission
from flywheel.server.http import (
    ERROR_RESPONSES,
    authenticate,
    authorize,
    call_service,
    file_response,
    forbidden,
    json_body,
    principal,
    read_json,
    services,
    validation_error,
)
from flywheel.tracing.metrics import CONTENT_TYPE
from flywheel.tracing.retention import purge_expired

router = APIRouter(tags=["monitor"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES)
metrics_router = APIRouter(tags=["monitor"], responses=ERROR_RESPONSES)
MAX_SERIES_POINTS = 2000


@metrics_router.get(
    "/metrics", responses=file_response("Prometheus exposition.", CONTENT_TYPE.split(";")[0])
)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition: requests, latency, tokens, cost, guard hits and queue depths of
    this server. Needs a key with ``monitor:read`` unless FLYWHEEL_METRICS_PUBLIC is set."""
    svc = services(request)
    if not svc.settings.metrics_public:
        caller = await authenticate(request)
        if not caller.can(Permission.MONITOR_READ):
            raise forbidden(caller, Permission.MONITOR_READ)
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE)


def _seconds(value: str | None, default: float, param: str) -> float:
    if value is None:
        return default
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise GatewayError(400, str(exc), param=param, code="invalid_value") from None


@router.get("/api/monitor/routes")
async def monitored_routes(
    request: Request, since: str | None = Query(default=None, description="e.g. 7d")
) -> Any:
    """Every configured route and every route with traffic in the project, with its guard,
    capture, online-judging and drift settings."""
    svc, caller = services(request), principal(request)
    start = time.time() - _seconds(since, 7 * 86400, "since")
    routes = await call_service(svc.monitored_routes, caller.project_id, start)
    data = []
    for name, route, traffic in routes:
        data.append(
            {
                "route": name,
                "configured": route is not None,
                "traffic": traffic,
                "capture": (route.capture if route else None) or svc.settings.capture,
                "guards": route.guards.model_dump(mode="json") if route and route.guards else None,
                "online_eval": route.online_eval.model_dump(mode="json")
                if route and route.online_eval
                else None,
                "drift": route.drift.model_dump(mode="json") if route and route.drift else None,
            }
        )
    return {"data": data}


@router.get("/api/monitor/series")
async def route_series(
    request: Request,
    route: str | None = Query(default=None, max_length=128),
    since: str | None = Query(default=None, description="Window length, e.g. 24h (default)."),
    bucket: str | None = Query(default=None, description="Bucket length, e.g. 1h."),
) -> Any:
    """Per time bucket: requests, errors, latency percentiles, cost, tokens, guard hits, mean
    judge scores and drift p-values (of one route, or the whole project)."""
    svc, caller = services(request), principal(request)
    span = _seconds(since, 86400, "since")
    step = _seconds(bucket, max(60.0, span / 48), "bucket")
    if span / step > MAX_SERIES_POINTS:
        raise GatewayError(
            400,
            f"{span / step:.0f} buckets asked for; at most {MAX_SERIES_POINTS}: widen 'bucket'.",
            param="bucket",
            code="invalid_value",
        )
    end = time.time()
    points = await call_service(
        series,
        svc.db,
        caller.project_id,
        route=route,
        start=end - span,
        end=end,
        bucket_seconds=max(1, int(step)),
    )
    return {"route": route, "start": end - span, "end": end, "bucket": step, "data": points}


@router.get("/api/monitor/drift")
async def drift_events(
    request: Request,
    route: str | None = Query(default=None, max_length=128),
    since: str | None = Query(default=None),
    limit: int = Query(default=200, ge=1, le=5000),
) -> Any:
    """Recorded drift checks, newest first."""
    svc, caller = services(request), principal(request)
    start = time.time() - _seconds(since, 30 * 86400, "since")
    events = await call_service(
        svc.drift.events, caller.project_id, route=route, since=start, limit=limit
    )
    return {"data": events}


class DriftRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    route: str = Field(min_length=1, max_length=128)
    settings: dict[str, Any] | None = Field(
        default=None, description="Drift settings for this run; default: the route's."
    )


@router.post("/api/monitor/drift/run", openapi_extra=json_body(DriftRunIn))
async def run_drift(request: Request) -> Any:
    """Check a route for drift now (the route's drift settings, or the given ones)."""
    body = await read_json(request, DriftRunIn)
    svc, caller = services(request), principal(request)
    try:
        config = (
            DriftConfig.model_validate(body.settings)
            if body.settings is not None
            else svc.drift_settings(body.route)
        )
    except ValidationError as exc:
        raise validation_error(
            [{**e, "loc": ("settings", *e["loc"])} for e in exc.errors()]
        ) from None
    events = await call_service(svc.drift.check, caller.project_id, body.route, config)
    return {"route": body.route, "data": events}


class GuardCheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=200_000)
    stage: Literal["input", "output"] = "input"
    route: str | None = Field(default=None, description="Use this route's guards.")
    guards: dict[str, Any] | None = Field(
        default=None, description="Or these guards (a route's 'guards' section)."
    )


@router.post("/api/guards/check", openapi_extra=json_body(GuardCheckIn))
async def check_guards(request: Request) -> Any:
    """Try a route's guards (or draft ones) on a text: what the model or caller would see,
    which guard would block, and every finding. Nothing is recorded."""
    body = await read_json(request, GuardCheckIn)
    svc = services(request)
    if (body.route is None) == (body.guards is None):
        raise GatewayError(400, "Pass either 'route' or 'guards'.", param="route")
    if body.route is not None:
        found = svc.gateway.policies.get(body.route)
        if found is None:
            raise GatewayError(
                404, f"Route '{body.route}' has no guards.", param="route", code="not_found"
            )
        policy = found
    else:
        try:
            policy = GuardPolicy(GuardPolicyConfig.model_validate(body.guards))
        except ValidationError as exc:
            raise validation_error(
                [{**e, "loc": ("guards", *e["loc"])} for e in exc.errors()]
            ) from None
        except GuardConfigError as exc:
            where = ".".join(str(part) for part in ("guards", *exc.loc))
            raise GatewayError(400, f"{where}: {exc.message}", param=where) from None
    return await call_service(policy.preview, body.stage, body.text)


@router.post("/api/retention/purge")
async def purge_now(request: Request) -> Any:
    """Apply every project's trace retention now (the server also does so every
    FLYWHEEL_RETENTION_INTERVAL seconds); answers with what was deleted per project."""
    return {"purged": await call_service(purge_expired, services(request).db)}


# -- alerts --------------------------------------------------------------------------------


@router.get("/api/alerts/rules")
async def list_rules(request: Request) -> Any:
    return {
        "data": await call_service(
            services(request).alert_rules.list, principal(request).project_id
        )
    }


@router.get("/api/alerts/rules/{name}")
async def get_rule(request: Request, name: str) -> Any:
    return await call_service(
        services(request).alert_rules.get, principal(request).project_id, name
    )


class _AnyObject(BaseModel):
    model_config = ConfigDict(extra="allow")


@router.put("/api/alerts/rules/{name}", openapi_extra=json_body(RuleSpec, omit=("name",)))
async def put_rule(request: Request, name: str) -> Any:
    """Create or replace a rule: a metric over a window compared with a threshold, with a
    cooldown and an optional signed webhook."""
    body = dict((await read_json(request, _AnyObject)).model_extra or {})
    body.setdefault("name", name)
    if body["name"] != name:
        raise GatewayError(400, "The body's 'name' differs from the URL's.", param="name")
    spec = await call_service(parse_rule, body)
    caller = principal(request)
    view, created = await call_service(
        services(request).alert_rules.put, caller.project_id, spec, caller.actor
    )
    return {**view, "created": created}


@router.delete("/api/alerts/rules/{name}")
async def delete_rule(request: Request, name: str) -> Any:
    caller = principal(request)
    await call_service(services(request).alert_rules.delete, caller.project_id, name, caller.actor)
    return {"deleted": name}


@router.get("/api/alerts/events")
async def list_alert_events(
    request: Request,
    rule: str | None = Query(default=None, max_length=128),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    return {
        "data": await call_service(
            services(request).alert_rules.events,
            principal(request).project_id,
            rule=rule,
            limit=limit,
        )
    }


@router.post("/api/alerts/check")
async def check_alerts(request: Request) -> Any:
    """Check every rule now (the server also does so every FLYWHEEL_MONITOR_INTERVAL
    seconds); answers with the events this check recorded in the caller's project."""
    project_id = principal(request).project_id
    events = await services(request).alerts.check()
    return {"data": [e for e in events if e.get("project_id") == project_id]}
