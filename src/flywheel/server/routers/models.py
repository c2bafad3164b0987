"""``/api/registry``: the model registry (models, versions, aliases, model cards, lineage) and
serving a version as a local-provider target of a route."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from flywheel.registry import RegistryError
from flywheel.registry.store import MAX_VERSION
from flywheel.server.http import (
    ERROR_RESPONSES,
    authorize,
    call_service,
    file_response,
    form_schema,
    json_body,
    principal,
    read_form,
    read_json,
    request_body,
    service_error,
    services,
)

router = APIRouter(
    prefix="/api", tags=["models"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelIn(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=5000)
    license: str = Field(default="", max_length=200)
    intended_use: str = Field(default="", max_length=5000)
    limitations: str = Field(default="", max_length=5000)


class ModelPatch(_Body):
    description: str | None = Field(default=None, max_length=5000)
    license: str | None = Field(default=None, max_length=200)
    intended_use: str | None = Field(default=None, max_length=5000)
    limitations: str | None = Field(default=None, max_length=5000)


class AliasIn(_Body):
    version: int = Field(ge=1, le=MAX_VERSION)


class ServeIn(_Body):
    route: str = Field(min_length=1, max_length=128)
    provider: str = Field(default="local", min_length=1, max_length=128)
    weight: float | None = Field(default=None, gt=0)
    replace: bool = False
    status: Literal["approved", "experimental"] = "experimental"


def _ref(name: str, version: str) -> str:
    return f"{name}@{version}"


@router.get("/registry")
async def list_models(request: Request) -> Any:
    """The project's registered models with their newest version and aliases."""
    registry = services(request).registry
    return {"data": await call_service(registry.list_models, principal(request).project_id)}


@router.post("/registry", status_code=201, openapi_extra=json_body(ModelIn))
async def create_model(request: Request) -> Any:
    """A new registered model (409 when the name is taken)."""
    body = await read_json(request, ModelIn)
    caller = principal(request)
    fields = body.model_dump(exclude={"name"})
    return await call_service(
        services(request).registry.create_model,
        caller.project_id,
        body.name,
        caller.actor,
        **fields,
    )


@router.get("/registry/{name}")
async def get_model(request: Request, name: str) -> Any:
    """One model with all its versions and aliases."""
    registry = services(request).registry
    return await call_service(registry.get_model, principal(request).project_id, name)


@router.patch("/registry/{name}", openapi_extra=json_body(ModelPatch))
async def update_model(request: Request, name: str) -> Any:
    """Change the description, license, intended use or limitations (the card's text)."""
    body = await read_json(request, ModelPatch)
    caller = principal(request)
    fields = body.model_dump(exclude_none=True)
    return await call_service(
        services(request).registry.update_model, caller.project_id, name, caller.actor, **fields
    )


@router.delete("/registry/{name}", status_code=204)
async def delete_model(request: Request, name: str) -> Response:
    """Delete a model, its versions and their files (409 while another model builds on it
    or a route serves one of its versions)."""
    caller = principal(request)
    svc = services(request)
    found = await call_service(svc.registry.get_model, caller.project_id, name)
    served = {v["served_name"] for v in found["versions"]}
    routes = [
        route.name for route in svc.config.routes if any(t.model in served for t in route.targets)
    ]
    if routes:
        raise service_error(
            RegistryError(
                409,
                f"Route(s) {', '.join(routes)} serve versions of '{name}'; take them off first.",
                "in_use",
            )
        )
    await call_service(svc.registry.delete_model, caller.project_id, name, caller.actor)
    return Response(status_code=204)


@router.post(
    "/registry/{name}/versions",
    status_code=201,
    openapi_extra=request_body(
        {"multipart/form-data": form_schema(["kind", "format", "parent", "description"])}
    ),
)
async def register_version(request: Request, name: str) -> Any:
    """Register uploaded files (a model folder: config and safetensors, a PEFT adapter, or a
    GGUF file) as a new version. Form fields: ``kind``, ``format``, optional ``parent``,
    ``description``; each file's name is its path inside the folder."""
    svc = services(request)
    caller = principal(request)
    form = await read_form(request, svc.settings.max_upload_bytes)
    uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    if not uploads:
        raise service_error(RegistryError(400, "Upload the version's files.", "invalid_value"))
    with tempfile.TemporaryDirectory(prefix="flywheel-upload-") as scratch:
        folder = Path(scratch) / "version"
        for upload in uploads:
            relative = PurePosixPath(upload.filename or "")
            if not relative.parts or relative.is_absolute() or ".." in relative.parts:
                raise service_error(
                    RegistryError(
                        400, f"Invalid file name '{upload.filename}'.", "invalid_value", "files"
                    )
                )
            target = folder.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(await upload.read())
        return await call_service(
            svc.registry.register_version,
            caller.project_id,
            name,
            kind=fields.get("kind", "base"),
            source=folder,
            format=fields.get("format", "safetensors"),
            actor=caller.actor,
            author_id=caller.identity,
            parent=fields.get("parent") or None,
            description=fields.get("description", ""),
        )


@router.get("/registry/{name}/versions/{version}")
async def get_version(request: Request, name: str, version: str) -> Any:
    """One version by number or alias."""
    registry = services(request).registry
    return await call_service(registry.resolve, principal(request).project_id, _ref(name, version))


@router.get(
    "/registry/{name}/versions/{version}/card",
    responses=file_response("The model card.", "text/markdown"),
)
async def model_card(request: Request, name: str, version: str) -> Response:
    """The generated model card (markdown, Hugging Face layout)."""
    svc = services(request)
    routes = [route.model_dump(mode="json") for route in svc.config.routes]
    text = await call_service(
        svc.registry.card, principal(request).project_id, _ref(name, version), routes
    )
    return Response(text, media_type="text/markdown; charset=utf-8")


@router.get("/registry/{name}/versions/{version}/lineage")
async def model_lineage(request: Request, name: str, version: str) -> Any:
    """The lineage graph: dataset versions → jobs/runs → this version (and its parents) →
    eval runs → routes."""
    svc = services(request)
    routes = [route.model_dump(mode="json") for route in svc.config.routes]
    return await call_service(
        svc.registry.lineage, principal(request).project_id, _ref(name, version), routes
    )


@router.put("/registry/{name}/aliases/{alias}", openapi_extra=json_body(AliasIn))
async def set_alias(request: Request, name: str, alias: str) -> Any:
    """Point an alias at a version (``production`` moves only through an approval)."""
    body = await read_json(request, AliasIn)
    caller = principal(request)
    return await call_service(
        services(request).registry.set_alias,
        caller.project_id,
        name,
        alias,
        body.version,
        caller.actor,
    )


@router.delete("/registry/{name}/aliases/{alias}", status_code=204)
async def remove_alias(request: Request, name: str, alias: str) -> Response:
    caller = principal(request)
    await call_service(
        services(request).registry.remove_alias, caller.project_id, name, alias, caller.actor
    )
    return Response(status_code=204)


@router.get("/registry/{name}/aliases")
async def alias_history(request: Request, name: str) -> Any:
    """Every alias move of the model, newest first."""
    registry = services(request).registry
    return {"data": await call_service(registry.alias_history, principal(request).project_id, name)}


@router.post("/registry/{name}/versions/{version}/serve", openapi_extra=json_body(ServeIn))
async def serve_version(request: Request, name: str, version: str) -> Any:
    """Serve a version through the local provider on a route: adds it to the catalog and to
    the route (or makes a new route) as a new config revision."""
    body = await read_json(request, ServeIn)
    return await call_service(
        services(request).serve_model,
        principal(request),
        _ref(name, version),
        route=body.route,
        provider=body.provider,
        weight=body.weight,
        replace=body.replace,
        status=body.status,
    )
