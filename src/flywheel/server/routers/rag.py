"""``/api/kbs``: knowledge bases (upload, browse, search, evaluate) and ``/api/pipelines``.

Handlers parse, call :class:`~flywheel.rag.knowledge.KnowledgeBases`,
:class:`~flywheel.rag.search.Retriever` or :class:`~flywheel.pipelines.store.PipelineStore`,
and shape the answer; everything acts in the caller's project only.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from flywheel.gateway import GatewayError
from flywheel.pipelines.spec import PipelineSpecError, parse_pipeline
from flywheel.rag.evaluate import DEFAULT_KS, evaluate_retrieval
from flywheel.rag.fetch import FetchError, FetchPolicy, fetch_url
from flywheel.rag.jobs import KIND as INGEST_KIND
from flywheel.rag.jobs import Upload, discard_uploads, read_upload, store_uploads
from flywheel.rag.knowledge import KbError, SearchMode
from flywheel.rag.loaders import LoadedDocument, LoaderError, supported_media_type
from flywheel.security import Permission
from flywheel.server.http import (
    ERROR_RESPONSES,
    MAX_FORM_FILES,
    MAX_SQL_INT,
    authorize,
    awaited,
    call_service,
    forbidden,
    form_schema,
    gateway_context,
    json_body,
    json_loads,
    model_schema,
    principal,
    read_body,
    read_form,
    read_json,
    request_body,
    services,
)

router = APIRouter(
    prefix="/api", tags=["rag"], dependencies=[Depends(authorize)], responses=ERROR_RESPONSES
)
MAX_FILES_PER_UPLOAD = MAX_FORM_FILES
ALL_MODES: tuple[SearchMode, ...] = ("dense", "bm25", "hybrid")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KnowledgeBaseIn(_Body):
    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=2000)
    settings: dict[str, Any] | None = None


class KnowledgeBasePatch(_Body):
    description: str | None = Field(default=None, max_length=2000)
    settings: dict[str, Any] | None = None


class DocumentIn(_Body):
    source: str = Field(min_length=1, max_length=1000)
    text: str = Field(min_length=1)
    media_type: str = "text/plain"
    metadata: dict[str, Any] = Field(default_factory=dict)


class DocumentsIn(_Body):
    documents: list[DocumentIn] = Field(min_length=1, max_length=10_000)
    metadata: dict[str, Any] | None = None


class UrlsIn(_Body):
    urls: list[str] = Field(min_length=1, max_length=100)
    metadata: dict[str, Any] | None = None


class SearchIn(_Body):
    query: str = Field(min_length=1, max_length=10_000)
    top_k: int | None = Field(default=None, ge=1, le=100)
    mode: SearchMode | None = None
    filters: dict[str, Any] | None = None
    rrf_k: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    rerank: bool | None = None


class EvalIn(_Body):
    items: list[dict[str, Any]] | None = Field(default=None, max_length=10_000)
    dataset: str | None = None
    version: int | None = Field(default=None, ge=1, le=MAX_SQL_INT)
    modes: list[SearchMode] = Field(default_factory=lambda: list(ALL_MODES))
    ks: list[int] = Field(default_factory=lambda: list(DEFAULT_KS), max_length=10)
    level: Literal["document", "chunk"] = "document"
    filters: dict[str, Any] | None = None


class RunIn(_Body):
    inputs: dict[str, Any] = Field(default_factory=dict)


# -- knowledge bases -----------------------------------------------------------------------


@router.get("/kbs")
async def list_kbs(request: Request) -> Any:
    """The project's knowledge bases with document and chunk counts."""
    return {"data": await call_service(services(request).kbs.list, principal(request).project_id)}


@router.post("/kbs", status_code=201, openapi_extra=json_body(KnowledgeBaseIn))
async def create_kb(request: Request) -> Any:
    """A new, empty knowledge base (409 when the name is taken)."""
    body = await read_json(request, KnowledgeBaseIn)
    caller = principal(request)
    return await call_service(
        services(request).kbs.create,
        caller.project_id,
        body.name,
        actor=caller.actor,
        description=body.description,
        settings=body.settings,
    )


@router.get("/kbs/{name}")
async def get_kb(request: Request, name: str) -> Any:
    """One knowledge base with its settings, counts and active index version."""
    return await call_service(services(request).kbs.get, principal(request).project_id, name)


@router.patch("/kbs/{name}", openapi_extra=json_body(KnowledgeBasePatch))
async def update_kb(request: Request, name: str) -> Any:
    """Change the description or settings; a new chunker or embedder rebuilds the index."""
    body = await read_json(request, KnowledgeBasePatch)
    caller = principal(request)
    kbs = services(request).kbs
    before = (await call_service(kbs.get, caller.project_id, name))["settings"]
    view, rebuild = await call_service(
        kbs.update,
        caller.project_id,
        name,
        actor=caller.actor,
        description=body.description,
        settings=body.settings,
    )
    if rebuild:
        try:
            await awaited(kbs.reindex(caller.project_id, name, actor=caller.actor))
        except GatewayError:
            # Settings no index can be built with (an unknown embedder, say) are not kept.
            await call_service(
                kbs.update, caller.project_id, name, actor=caller.actor, settings=before
            )
            raise
        view = await call_service(kbs.get, caller.project_id, name)
    return view


@router.delete("/kbs/{name}", status_code=204)
async def delete_kb(request: Request, name: str) -> Response:
    """The knowledge base with its documents, chunks and index versions."""
    caller = principal(request)
    await call_service(services(request).kbs.delete, caller.project_id, name, actor=caller.actor)
    return Response(status_code=204)


async def _uploaded(request: Request) -> tuple[list[Upload], Any]:
    """What was sent, not yet read: the files of a multipart upload (``files``, optional
    ``metadata`` JSON field) or the texts of a JSON body."""
    svc = services(request)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await read_form(request, svc.settings.max_upload_bytes, MAX_FILES_PER_UPLOAD)
        metadata: Any = None
        raw = form.get("metadata")
        if isinstance(raw, str) and raw.strip():
            try:
                metadata = json_loads(raw)
            except ValueError as exc:
                raise GatewayError(
                    400, f"The metadata field is not JSON: {exc}", param="metadata"
                ) from None
        files: list[Upload] = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                files.append(Upload(value.filename or "upload", data, value.content_type))
        if not files:
            raise GatewayError(
                400, "The upload holds no files (use the form field 'files').", param="files"
            )
        return files, metadata
    payload = await read_json(request, DocumentsIn)
    texts: list[Upload] = []
    for i, d in enumerate(payload.documents):
        supported = supported_media_type(d.media_type)
        if supported is None:
            raise GatewayError(
                400,
                f"documents[{i}].media_type: unsupported type '{d.media_type[:100]}'.",
                param=f"documents[{i}].media_type",
                code="invalid_value",
            )
        texts.append(
            Upload(d.source, d.text.encode(errors="replace"), supported, d.metadata, text=True)
        )
    return texts, payload.metadata


def _metadata(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GatewayError(400, "metadata must be a JSON object.", param="metadata")
    return value


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


async def _can_ingest_in_background(request: Request, name: str) -> None:
    """A background ingestion is a job: the caller may submit jobs, and the knowledge base
    exists (checked before anything is stored)."""
    caller = principal(request)
    if not caller.can(Permission.JOBS_WRITE):
        raise forbidden(caller, Permission.JOBS_WRITE)
    await call_service(services(request).kbs.get, caller.project_id, name)


async def _submit_ingest(request: Request, params: dict[str, Any], label: str) -> Any:
    """Queue a ``kb.ingest`` job as the caller (the job, as ``POST /api/jobs`` answers)."""
    caller = principal(request)
    return await call_service(
        services(request).submit_job,
        caller.project_id,
        INGEST_KIND,
        params,
        caller.actor,
        name=label,
        author_id=caller.identity,
    )


@router.post(
    "/kbs/{name}/documents",
    openapi_extra=request_body(
        {
            "application/json": model_schema(DocumentsIn),
            "multipart/form-data": form_schema(["metadata"]),
        }
    ),
    responses={202: {"description": "background=true: the ingestion job."}},
)
async def upload_documents(
    request: Request, response: Response, name: str, background: bool = False
) -> Any:
    """Ingest uploaded files (multipart, field ``files``, any number) or JSON texts. Files
    that cannot be read are listed under ``failed``; the others are ingested. With
    ``background=true`` they are stored and ingested by a ``kb.ingest`` job: the answer is
    that job (202), whose result is this report."""
    caller = principal(request)
    svc = services(request)
    if background:
        await _can_ingest_in_background(request, name)
    uploads, metadata = await _uploaded(request)
    extra = _metadata(metadata)
    if background:
        entries = await call_service(store_uploads, svc.artifacts, caller.project_id, uploads)
        params = {"knowledge_base": name, "artifacts": entries, "metadata": extra}
        try:
            label = f"ingest {_count(len(entries), 'file')} into {name}"
            job = await _submit_ingest(request, params, label)
        except GatewayError:
            keys = [entry["key"] for entry in entries]
            await asyncio.to_thread(discard_uploads, svc.artifacts, caller.project_id, keys)
            raise
        response.status_code = 202
        return job
    documents = [await asyncio.to_thread(read_upload, upload) for upload in uploads]
    report = await awaited(
        svc.kbs.ingest(caller.project_id, name, documents, actor=caller.actor, metadata=extra)
    )
    return report.as_dict()


@router.post(
    "/kbs/{name}/urls",
    openapi_extra=json_body(UrlsIn),
    responses={202: {"description": "background=true: the ingestion job."}},
)
async def ingest_urls(
    request: Request, response: Response, name: str, background: bool = False
) -> Any:
    """Fetch and ingest web pages and files by URL (private addresses are refused unless the
    server allow-lists them). With ``background=true`` a ``kb.ingest`` job fetches and
    ingests them: the answer is that job (202)."""
    body = await read_json(request, UrlsIn)
    caller = principal(request)
    svc = services(request)
    if background:
        await _can_ingest_in_background(request, name)
        params = {"knowledge_base": name, "urls": body.urls, "metadata": body.metadata}
        label = f"ingest {_count(len(body.urls), 'URL')} into {name}"
        job = await _submit_ingest(request, params, label)
        response.status_code = 202
        return job
    policy = FetchPolicy(allow_hosts=tuple(svc.settings.fetch_allow_hosts))
    documents: list[LoadedDocument | LoaderError] = []
    for url in body.urls:
        try:
            documents.append(await asyncio.to_thread(fetch_url, url, policy))
        except (FetchError, LoaderError) as exc:
            documents.append(LoaderError(url, str(exc)))
    report = await awaited(
        svc.kbs.ingest(
            caller.project_id, name, documents, actor=caller.actor, metadata=body.metadata
        )
    )
    return report.as_dict()


@router.get("/kbs/{name}/documents")
async def list_documents(
    request: Request,
    name: str,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_SQL_INT),
    q: str = Query(default="", max_length=200),
) -> Any:
    """A page of documents (source containing ``q``), by source."""
    return await call_service(
        services(request).kbs.documents,
        principal(request).project_id,
        name,
        limit=limit,
        offset=offset,
        q=q,
    )


@router.get("/kbs/{name}/documents/{document_id}")
async def get_document(request: Request, name: str, document_id: str) -> Any:
    """One document with its text and its chunks (with offsets)."""
    return await call_service(
        services(request).kbs.document, principal(request).project_id, name, document_id
    )


@router.delete("/kbs/{name}/documents/{document_id}")
async def delete_document(request: Request, name: str, document_id: str) -> Any:
    """Remove a document; the index is rebuilt without it."""
    caller = principal(request)
    return await awaited(
        services(request).kbs.delete_document(
            caller.project_id, name, document_id, actor=caller.actor
        )
    )


@router.post("/kbs/{name}/search", openapi_extra=json_body(SearchIn))
async def search(request: Request, name: str) -> Any:
    """Hits for a query, with the dense and BM25 rankings beside the fused one."""
    body = await read_json(request, SearchIn)
    return await awaited(
        services(request).retriever.search(
            principal(request).project_id,
            name,
            body.query,
            top_k=body.top_k,
            mode=body.mode,
            filters=body.filters,
            rrf_k=body.rrf_k,
            rerank=body.rerank,
        )
    )


@router.get("/kbs/{name}/versions")
async def index_versions(request: Request, name: str) -> Any:
    """Index versions, newest first: embedder, chunker, documents and where they are stored."""
    return {
        "data": await call_service(
            services(request).kbs.index_versions, principal(request).project_id, name
        )
    }


@router.post("/kbs/{name}/reindex")
async def reindex(request: Request, name: str) -> Any:
    """Re-chunk and re-embed as the settings say; a new index version when anything changed."""
    caller = principal(request)
    version = await awaited(
        services(request).kbs.reindex(caller.project_id, name, actor=caller.actor)
    )
    return {"index_version": version}


@router.post("/kbs/{name}/eval", openapi_extra=json_body(EvalIn))
async def evaluate(request: Request, name: str) -> Any:
    """Retrieval metrics (hit@k, recall@k, precision@k, MRR, nDCG@k) per search mode, on
    labelled queries given inline or as a dataset version."""
    body = await read_json(request, EvalIn)
    svc = services(request)
    project_id = principal(request).project_id
    if (body.items is None) == (body.dataset is None):
        raise GatewayError(400, "Give either items or a dataset.", param="dataset")
    items = body.items
    if body.dataset is not None:
        caller = principal(request)
        if not caller.can(Permission.DATASETS_READ):
            raise forbidden(caller, Permission.DATASETS_READ)
        _, items = await call_service(svc.datasets.items, project_id, body.dataset, body.version)
    assert items is not None
    return await awaited(
        evaluate_retrieval(
            svc.retriever,
            project_id,
            name,
            items,
            modes=body.modes,
            ks=body.ks,
            level=body.level,
            filters=body.filters,
        )
    )


# -- pipelines -------------------------------------------------------------------------------


# A pipeline's YAML as the raw body, or as JSON {"spec": "<yaml>"}.
_PIPELINE_BODY = request_body(
    {
        "application/yaml": {"type": "string"},
        "application/json": {
            "type": "object",
            "properties": {"spec": {"type": "string"}},
            "required": ["spec"],
        },
    }
)


async def _pipeline_text(request: Request) -> str:
    """A pipeline's YAML: the raw body (YAML) or a JSON object ``{"spec": "..."}``."""
    body = await read_body(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = json_loads(body)
        except ValueError as exc:
            raise GatewayError(400, f"Invalid JSON body: {exc}", code="invalid_json") from None
        if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
            raise GatewayError(400, 'Send the YAML, or JSON {"spec": "<yaml>"}.', param="spec")
        return str(data["spec"])
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise GatewayError(400, "The pipeline is not UTF-8 text.", param="spec") from None


@router.get("/pipelines")
async def list_pipelines(request: Request) -> Any:
    """The project's pipelines."""
    return {
        "data": await call_service(services(request).pipelines.list, principal(request).project_id)
    }


@router.post("/pipelines/validate", openapi_extra=_PIPELINE_BODY)
async def validate_pipeline(request: Request) -> Any:
    """Check a pipeline without saving it: ``{"valid": bool, "problems": [...]}``."""
    text = await _pipeline_text(request)
    try:
        spec = await asyncio.to_thread(parse_pipeline, text, "pipeline.yaml")
    except PipelineSpecError as exc:
        return {"valid": False, "problems": exc.problems or [str(exc)]}
    return {"valid": True, "problems": [], "name": spec.name, "steps": spec.step_ids()}


@router.get("/pipelines/{name}")
async def get_pipeline(request: Request, name: str) -> Any:
    """One pipeline with its YAML."""
    return await call_service(services(request).pipelines.get, principal(request).project_id, name)


@router.put(
    "/pipelines/{name}",
    openapi_extra=_PIPELINE_BODY,
    responses={201: {"description": "The pipeline was created."}},
)
async def put_pipeline(request: Request, response: Response, name: str) -> Any:
    """Create (201) or replace (200) a pipeline from its YAML; problems name step and field."""
    text = await _pipeline_text(request)
    caller = principal(request)
    view, created = await call_service(
        services(request).pipelines.put, caller.project_id, name, text, actor=caller.actor
    )
    response.status_code = 201 if created else 200
    return view


@router.delete("/pipelines/{name}", status_code=204)
async def delete_pipeline(request: Request, name: str) -> Response:
    caller = principal(request)
    await call_service(
        services(request).pipelines.delete, caller.project_id, name, actor=caller.actor
    )
    return Response(status_code=204)


@router.post("/pipelines/{name}/run", openapi_extra=json_body(RunIn, required=False))
async def run_pipeline(request: Request, name: str) -> Any:
    """Run a pipeline with ``inputs``; the answer has its output, each step's status and the
    trace id (every step is a span)."""
    body = await read_json(request, RunIn, optional=True)
    ctx = await gateway_context(request)
    run = await awaited(services(request).run_pipeline(ctx, name, body.inputs))
    return {
        "pipeline": run.pipeline,
        "status": run.status,
        "output": run.output,
        "error": run.error,
        "trace_id": run.trace_id,
        "latency_ms": run.latency_ms,
        "steps": [
            {
                "id": step.id,
                "type": step.type,
                "status": step.status,
                "latency_ms": step.latency_ms,
                "error": step.error,
                "span_id": step.span_id,
            }
            for step in run.steps
        ],
    }


__all__ = ["KbError", "router"]
