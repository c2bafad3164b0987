"""The FastAPI application: UI, Flywheel API and OpenAI-compatible gateway on one port."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flywheel import __version__
from flywheel.config import Settings, get_settings
from flywheel.gateway import GatewayError, error_body
from flywheel.security.secrets import install_redactor
from flywheel.server.headers import SecurityHeaders
from flywheel.server.http import allowed_methods, database_unavailable, validation_error
from flywheel.server.routers import (
    access,
    api,
    cache,
    config,
    datasets,
    evals,
    experiments,
    jobs,
    loops,
    models,
    monitor,
    openai,
    otlp,
    prompts,
    rag,
)
from flywheel.server.services import Services
from flywheel.ui import admin as ui_admin
from flywheel.ui import datasets as ui_datasets
from flywheel.ui import evals as ui_evals
from flywheel.ui import experiments as ui_experiments
from flywheel.ui import govern
from flywheel.ui import jobs as ui_jobs
from flywheel.ui import loops as ui_loops
from flywheel.ui import monitor as ui_monitor
from flywheel.ui import prompts as ui_prompts
from flywheel.ui import rag as ui_rag
from flywheel.ui import registry as ui_registry
from flywheel.ui import routes as ui

log = logging.getLogger("flywheel.server")


def _announce_admin_key(key: str) -> None:
    # Printed once, to the console only: the database keeps nothing but its hash.
    banner = "=" * 72
    print(
        f"\n{banner}\nFlywheel admin API key (shown only once; store it now):\n\n    {key}\n\n"
        f"Use it as 'Authorization: Bearer <key>', OPENAI_API_KEY, or to log in to the UI.\n"
        f"{banner}\n",
        file=sys.stderr,
        flush=True,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; services start in the lifespan so importing stays cheap."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Secret values the server learns are masked in every log line from here on.
        for name in (None, "uvicorn", "uvicorn.error", "uvicorn.access"):
            install_redactor(logging.getLogger(name) if name else None)
        svc = Services.build(settings)
        if svc.new_admin_key:
            _announce_admin_key(svc.new_admin_key)
        app.state.services = svc
        svc.start_background()
        log.info("Flywheel %s ready on http://%s:%d", __version__, settings.host, settings.port)
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(
        title="Flywheel",
        version=__version__,
        description="Self-hosted LLMOps: gateway, traces, evals, prompts, tuning, governance.",
        lifespan=lifespan,
        # Flywheel traces every call itself; FastAPI's own OpenTelemetry hooks would add
        # per-request cost to the gateway's hot path for spans nobody exports.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.add_middleware(SecurityHeaders)
    app.include_router(openai.router)
    app.include_router(otlp.router)
    app.include_router(api.router)
    app.include_router(cache.router)
    app.include_router(access.router)
    app.include_router(prompts.router)
    app.include_router(config.router)
    app.include_router(datasets.router)
    app.include_router(evals.router)
    app.include_router(monitor.router)
    app.include_router(monitor.metrics_router)
    app.include_router(rag.router)
    app.include_router(jobs.router)
    app.include_router(experiments.router)
    app.include_router(loops.router)
    app.include_router(models.router)
    ui.install(app)
    app.include_router(govern.router)
    app.include_router(ui_prompts.router)
    app.include_router(ui_datasets.router)
    app.include_router(ui_evals.router)
    app.include_router(ui_monitor.router)
    app.include_router(ui_rag.router)
    app.include_router(ui_jobs.router)
    app.include_router(ui_experiments.router)
    app.include_router(ui_loops.router)
    app.include_router(ui_registry.router)
    app.include_router(ui_admin.router)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get(
        "/readyz",
        tags=["ops"],
        responses={503: {"description": 'A local model is still loading: `{"ready": false}`.'}},
    )
    def readyz(request: Request) -> Any:
        """Readiness: every local model is loaded."""
        ready = request.app.state.services.providers.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await gateway_error(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        kind = "invalid_request_error" if status < 500 else "server_error"
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 405:
            headers["Allow"] = allowed_methods(request)
        return JSONResponse(
            error_body(str(exc.detail), kind, code="not_found" if status == 404 else None),
            status_code=status,
            headers=headers or None,
        )

    @app.exception_handler(OperationalError)
    async def database_down(request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable for %s %s: %s", request.method, request.url.path, exc)
        return await gateway_error(request, database_unavailable())

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(
            error_body("The server had an error while processing your request.", "server_error"),
            status_code=500,
        )

    return app
