"""The UI's knowledge-base and pipeline pages: knowledge bases with their documents, uploads
(files or a whole folder, with a progress bar), URL ingestion, a retrieval test box comparing
dense, BM25 and hybrid rankings side by side, a document's chunks over its text, and the
pipelines with their YAML, a save form and a run form.

A thin edge over the services the API (:mod:`flywheel.server.routers.rag`) uses:
:class:`~flywheel.rag.knowledge.KnowledgeBases`, :class:`~flywheel.rag.search.Retriever`,
:class:`~flywheel.pipelines.store.PipelineStore` and ``Services.run_pipeline``, with the same
loaders and URL fetch policy. A service's refusal is shown on the page with its status code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from starlette.datastructures import UploadFile

from flywheel.errors import ServiceError
from flywheel.gateway import CallContext, GatewayError
from flywheel.pipelines.runner import PipelineRun
from flywheel.pipelines.spec import InputSpec, PipelineSpecError, parse_pipeline
from flywheel.rag.chunking import ChunkerConfig
from flywheel.rag.fetch import FetchError, FetchPolicy, fetch_url
from flywheel.rag.knowledge import IngestReport
from flywheel.rag.loaders import LoadedDocument, LoaderError, load_upload
from flywheel.security import Permission, Principal
from flywheel.server.http import limit_subjects, read_form, services
from flywheel.server.routers.rag import MAX_FILES_PER_UPLOAD
from flywheel.server.services import Services
from flywheel.ui.datasets import clip, error_page, form_fields, page_number, whole
from flywheel.ui.present import fmt_json
from flywheel.ui.prompts import PageError
from flywheel.ui.routes import _htmx_target as htmx_target
from flywheel.ui.routes import render
from flywheel.ui.session import ui_authorize

router = APIRouter(include_in_schema=False)

DOCUMENT_PAGE_SIZE = 50
MAX_SOURCE_QUERY = 200
MAX_QUERY_CHARS = 10_000
MAX_TOP_K = 50
SNIPPET_CHARS = 300
MAX_URLS = 100
"""As many URLs as one API call takes."""
MAX_SHOWN_TEXT = 400_000
"""A document page marks chunks over at most this many characters of the text."""
MAX_SPEC_FORM_CHARS = 1_000_000
MAX_INPUTS_JSON = 1_000_000
STRATEGIES = ("recursive", "markdown")
KB_FIELDS = ("name", "description", "chunk_tokens", "overlap_tokens", "strategy")
CHUNK_COLORS = 8
"""Hits of one chunk share one of this many colours across the three search columns."""
SAMPLE_PIPELINE = """\
name: answer
description: Answer a question from a knowledge base
inputs:
  question: {type: string}
steps:
  - {id: docs, type: retrieve, knowledge_base: handbook, query: "{{ question }}", top_k: 3}
  - id: reply
    type: llm
    model: default
    messages:
      - role: system
        content: |
          Answer from these passages:
          {% for d in docs %}[{{ loop.index }}] {{ d.text }}
          {% endfor %}
      - {role: user, content: "{{ question }}"}
output: "{{ reply }}"
"""


def kb_url(name: str, **query: str | int) -> str:
    """The page of knowledge base ``name`` (any characters quoted)."""
    base = f"/kbs/{quote(name, safe='')}"
    return f"{base}?{urlencode(query)}" if query else base


def document_url(kb: str, document_id: str, chunk: int | None = None) -> str:
    """A document's page; with ``chunk``, that chunk's span is marked in the text."""
    base = f"{kb_url(kb)}/documents/{quote(document_id, safe='')}"
    return f"{base}?chunk={chunk}" if chunk is not None else base


def pipeline_url(name: str) -> str:
    """The page of pipeline ``name`` (any characters quoted)."""
    return f"/pipelines/{quote(name, safe='')}"


async def _kb_full_page(
    request: Request, user: Principal, name: str, status: int, **extra: Any
) -> Response:
    """The whole knowledge-base page with ``extra`` in it (a form's outcome, say)."""
    svc = services(request)
    try:
        context = await run_in_threadpool(lambda: _kb_context(svc, user, name, **extra))
    except ServiceError as exc:
        return _kb_error(request, exc)
    return render(request, "kb.html", context, status_code=status)


def _kb_error(request: Request, exc: PageError | ServiceError) -> Response:
    title = "Knowledge base not found" if exc.status_code == 404 else "Knowledge base"
    return error_page(request, exc.status_code, title, exc.message, ("/kbs", "All knowledge bases"))


def _pipeline_error(request: Request, exc: PageError | ServiceError) -> Response:
    title = "Pipeline not found" if exc.status_code == 404 else "Pipeline"
    return error_page(request, exc.status_code, title, exc.message, ("/pipelines", "All pipelines"))


# -- the knowledge-base list and the create form ---------------------------------------------------


def kb_row(kb: Mapping[str, Any]) -> dict[str, Any]:
    """A knowledge base as the list shows it."""
    settings = kb.get("settings") or {}
    chunker = settings.get("chunker") or {}
    return {
        "name": kb["name"],
        "url": kb_url(kb["name"]),
        "description": kb.get("description") or "",
        "document_count": kb.get("document_count", 0),
        "chunk_count": kb.get("chunk_count", 0),
        "index_version": kb.get("index_version"),
        "embedder": settings.get("embedder", ""),
        "strategy": chunker.get("strategy", ""),
        "chunk_tokens": chunker.get("chunk_tokens"),
        "updated_at": kb.get("updated_at"),
    }


def _kb_defaults() -> dict[str, str]:
    chunker = ChunkerConfig()
    return {
        "name": "",
        "description": "",
        "chunk_tokens": str(chunker.chunk_tokens),
        "overlap_tokens": str(chunker.overlap_tokens),
        "strategy": chunker.strategy,
    }


def _kbs_context(svc: Services, user: Principal, **extra: Any) -> dict[str, Any]:
    form = _kb_defaults() | extra.pop("form", {})
    return {
        "nav": "kbs",
        "rows": [kb_row(kb) for kb in svc.kbs.list(user.project_id)],
        "form": form,
        "strategies": STRATEGIES,
        "error": None,
        "deleted": "",
        **extra,
    }


@router.get("/kbs")
def kbs_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's knowledge bases (documents, chunks, active index version, embedder) and,
    for writers, a form for a new one."""
    deleted = request.query_params.get("deleted", "")[:128]
    context = _kbs_context(services(request), user, deleted=deleted)
    return render(request, "kbs.html", context)


def kb_settings(form: Mapping[str, str]) -> dict[str, Any]:
    """The create form's chunker settings (left-empty numbers keep the defaults); the service
    validates them (overlap below chunk size and the like)."""
    strategy = form.get("strategy", "recursive")
    if strategy not in STRATEGIES:
        raise PageError(400, "Pick the recursive or the markdown chunking strategy.")
    chunker: dict[str, Any] = {"strategy": strategy}
    tokens = whole(form.get("chunk_tokens", ""), "Chunk tokens", 16, 8192)
    overlap = whole(form.get("overlap_tokens", ""), "Overlap tokens", 0, 8191)
    if tokens is not None:
        chunker["chunk_tokens"] = tokens
    if overlap is not None:
        chunker["overlap_tokens"] = overlap
    return {"chunker": chunker}


@router.post("/kbs")
async def create_kb(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """A new, empty knowledge base with the form's chunker settings."""
    svc = services(request)
    form = await form_fields(request)
    name = form.get("name", "").strip()
    try:
        settings = kb_settings(form)
        await run_in_threadpool(
            lambda: svc.kbs.create(
                user.project_id,
                name,
                actor=user.actor,
                description=form.get("description", "").strip()[:2000],
                settings=settings,
            )
        )
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
        kept = {k: form.get(k, "") for k in KB_FIELDS}
        context = await run_in_threadpool(lambda: _kbs_context(svc, user, form=kept, error=error))
        return render(request, "kbs.html", context, status_code=status)
    return RedirectResponse(kb_url(name, created="1"), status_code=303)


@router.post("/kbs/{name}/delete")
async def delete_kb(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """The knowledge base with its documents, chunks and index versions."""
    svc = services(request)
    try:
        await run_in_threadpool(lambda: svc.kbs.delete(user.project_id, name, actor=user.actor))
    except ServiceError as exc:
        return _kb_error(request, exc)
    return RedirectResponse(f"/kbs?{urlencode({'deleted': name})}", status_code=303)


# -- one knowledge base: settings, index versions, documents --------------------------------------


def _documents_query(q: str, page: int) -> dict[str, str]:
    query = {"q": q} if q else {}
    if page > 1:
        query["page"] = str(page)
    return query


def _documents_context(
    svc: Services, user: Principal, name: str, q: str, page: int
) -> dict[str, Any]:
    """A page of the knowledge base's documents (source containing ``q``)."""
    offset = (page - 1) * DOCUMENT_PAGE_SIZE
    listed = svc.kbs.documents(user.project_id, name, limit=DOCUMENT_PAGE_SIZE, offset=offset, q=q)
    total = int(listed["total"])
    rows = [{**doc, "url": document_url(name, doc["id"])} for doc in listed["data"]]
    return {
        "name": name,
        "documents": rows,
        "documents_total": total,
        "q": q,
        "page": page,
        "refresh_url": kb_url(name, **_documents_query(q, page)),
        "prev_url": kb_url(name, **_documents_query(q, page - 1)) if page > 1 else None,
        "next_url": kb_url(name, **_documents_query(q, page + 1))
        if offset + len(rows) < total
        else None,
    }


def _kb_context(
    svc: Services, user: Principal, name: str, q: str = "", page: int = 1, **extra: Any
) -> dict[str, Any]:
    kb = svc.kbs.get(user.project_id, name)
    settings = kb.get("settings") or {}
    return {
        "nav": "kbs",
        "kb": kb,
        "url": kb_url(name),
        "settings": settings,
        "chunker": settings.get("chunker") or {},
        "versions": svc.kbs.index_versions(user.project_id, name),
        "search_form": {
            "query": "",
            "top_k": str(settings.get("top_k") or 5),
            # A knowledge base that reranks is tried as it serves, unless unticked.
            "rerank": "yes" if settings.get("rerank") else "",
        },
        "search": None,
        "search_error": None,
        "report": None,
        "report_error": None,
        "urls_text": "",
        "max_upload_mb": svc.settings.max_upload_bytes / 1024 / 1024,
        "max_files": MAX_FILES_PER_UPLOAD,
        "max_urls": MAX_URLS,
        "notice": None,
        "summary_oob": False,
        **_documents_context(svc, user, name, q, page),
        **extra,
    }


def _kb_notice(request: Request) -> str | None:
    params = request.query_params
    if params.get("created") == "1":
        return "Knowledge base created. Upload files or add URLs to index them."
    if params.get("deleted_document"):
        return f"Deleted {params['deleted_document'][:1000]}; the index was rebuilt without it."
    return None


@router.get("/kbs/{name}")
def kb_page(request: Request, name: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A knowledge base: its settings and index versions, the upload and URL forms, the
    retrieval test box and a page of its documents (``?q=`` filters by source). HTMX swaps
    only the documents table (and the counts above) when it asks for ``kb-documents``."""
    svc = services(request)
    q = request.query_params.get("q", "").strip()[:MAX_SOURCE_QUERY]
    page = page_number(request.query_params.get("page"))
    try:
        if htmx_target(request) == "kb-documents":
            context = _documents_context(svc, user, name, q, page)
            context["kb"] = svc.kbs.get(user.project_id, name)
            context["versions"] = svc.kbs.index_versions(user.project_id, name)
            context["summary_oob"] = True
            # The refresh after an upload (triggered by the table itself) is no navigation.
            refresh = request.headers.get("hx-trigger") == "kb-documents"
            headers = None if refresh else {"HX-Push-Url": context["refresh_url"]}
            return render(request, "_kb_documents.html", context, headers=headers)
        context = _kb_context(svc, user, name, q, page, notice=_kb_notice(request))
    except ServiceError as exc:
        return _kb_error(request, exc)
    return render(request, "kb.html", context)


# -- ingestion: uploads and URLs ------------------------------------------------------------------


def upload_source(filename: str) -> str:
    """An uploaded file's source: its relative path as the browser sent it (a folder upload
    sends ``sub/dir/file.md``), with backslashes, empty, ``.`` and ``..`` parts dropped."""
    parts = [p for p in filename.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts)[:1000] or "upload"


async def uploaded_documents(request: Request, limit: int) -> list[LoadedDocument | LoaderError]:
    """The form's files read as documents; unreadable ones as :class:`LoaderError` items,
    which the ingestion reports under ``failed``."""
    try:
        form = await read_form(request, limit, MAX_FILES_PER_UPLOAD)
    except GatewayError as exc:
        raise PageError(413, f"The upload is larger than {limit / 1024 / 1024:g} MiB.") from exc
    uploads = [
        value
        for key, value in form.multi_items()
        if key == "files" and isinstance(value, UploadFile) and value.filename
    ]
    if not uploads:
        raise PageError(400, "Choose one or more files, or a folder, to upload.")
    documents: list[LoadedDocument | LoaderError] = []
    for upload in uploads:
        source = upload_source(upload.filename or "")
        data = await upload.read()
        documents.append(await asyncio.to_thread(load_upload, source, data, upload.content_type))
    return documents


def report_view(report: IngestReport) -> dict[str, Any]:
    """The ingest report with its totals, as the report partial shows it."""
    data = report.as_dict()
    return {
        **data,
        "counts": {
            "added": len(report.added),
            "updated": len(report.updated),
            "unchanged": len(report.unchanged),
            "duplicates": len(report.duplicates),
            "failed": len(report.failed),
        },
    }


async def _after_ingest(
    request: Request,
    user: Principal,
    name: str,
    report: IngestReport | None,
    error: PageError | ServiceError | None,
    urls_text: str = "",
) -> Response:
    """The report: the partial for an in-page request (which also tells the documents table
    to refresh), else the whole knowledge-base page with the report in it."""
    view = report_view(report) if report is not None else None
    message = error.message if error is not None else None
    status = error.status_code if error is not None else 200
    if htmx_target(request) == "ingest-report":
        headers = {"HX-Trigger": "kb-changed"} if report is not None else None
        context = {"report": view, "report_error": message}
        return render(
            request, "_kb_ingest_report.html", context, status_code=status, headers=headers
        )
    return await _kb_full_page(
        request, user, name, status, report=view, report_error=message, urls_text=urls_text
    )


@router.post("/kbs/{name}/documents")
async def upload_documents(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Ingest uploaded files (field ``files``, any number; a folder's files carry their
    relative paths as names). Unreadable files are reported under ``failed``."""
    svc = services(request)
    try:
        documents = await uploaded_documents(request, svc.settings.max_upload_bytes)
        report = await svc.kbs.ingest(user.project_id, name, documents, actor=user.actor)
    except (PageError, ServiceError) as exc:
        return await _after_ingest(request, user, name, None, exc)
    return await _after_ingest(request, user, name, report, None)


def url_lines(text: str) -> list[str]:
    """The URL form's URLs: one a line, blank lines skipped, duplicates once."""
    urls = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not urls:
        raise PageError(400, "Type one or more URLs, one a line.")
    if len(urls) > MAX_URLS:
        raise PageError(400, f"At most {MAX_URLS} URLs at a time ({len(urls)} given).")
    return urls


@router.post("/kbs/{name}/urls")
async def ingest_urls(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Fetch and ingest web pages and files by URL (private addresses are refused unless the
    server allow-lists them); a URL that cannot be fetched is reported under ``failed``."""
    svc = services(request)
    form = await form_fields(request)
    text = form.get("urls", "")[:200_000]
    try:
        urls = url_lines(text)
        # Before fetching anything: an unknown knowledge base is a 404, not N failed fetches.
        await run_in_threadpool(svc.kbs.settings_of, user.project_id, name)
        policy = FetchPolicy(allow_hosts=tuple(svc.settings.fetch_allow_hosts))
        documents: list[LoadedDocument | LoaderError] = []
        for url in urls:
            try:
                documents.append(await asyncio.to_thread(fetch_url, url, policy))
            except (FetchError, LoaderError) as exc:
                documents.append(LoaderError(url, getattr(exc, "problem", str(exc))))
        report = await svc.kbs.ingest(user.project_id, name, documents, actor=user.actor)
    except (PageError, ServiceError) as exc:
        return await _after_ingest(request, user, name, None, exc, urls_text=text)
    return await _after_ingest(request, user, name, report, None)


@router.post("/kbs/{name}/documents/{document_id}/delete")
async def delete_document(
    request: Request, name: str, document_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Remove a document; the index is rebuilt without it."""
    svc = services(request)
    try:
        doc = await run_in_threadpool(svc.kbs.document, user.project_id, name, document_id)
        await svc.kbs.delete_document(user.project_id, name, document_id, actor=user.actor)
    except ServiceError as exc:
        return _kb_error(request, exc)
    return RedirectResponse(kb_url(name, deleted_document=doc["source"]), status_code=303)


# -- the retrieval test box ----------------------------------------------------------------------


def hit_view(kb: str, hit: Mapping[str, Any], colors: dict[int, int]) -> dict[str, Any]:
    """A search hit as a column lists it: rank, score, ``source#position`` and a snippet; the
    chunk's colour is the same in every column."""
    chunk_id = int(hit["chunk_id"])
    color = colors.setdefault(chunk_id, len(colors) % CHUNK_COLORS)
    return {
        "chunk_id": chunk_id,
        "label": f"{hit['source']}#{hit['position']}",
        "color": color,
        "rank": hit["rank"],
        "score": hit["score"],
        "source": hit["source"],
        "position": hit["position"],
        "headings": hit.get("headings") or [],
        "snippet": clip(" ".join(str(hit.get("text") or "").split()), SNIPPET_CHARS),
        "url": document_url(kb, hit["document_id"], hit["position"]),
        "dense_rank": hit.get("dense_rank"),
        "bm25_rank": hit.get("bm25_rank"),
        "retrieval_rank": hit.get("retrieval_rank"),
        "reranked": hit.get("reranked", False),
    }


def search_columns(kb: str, result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Dense, BM25 and hybrid rankings side by side; colours follow the hybrid order."""
    colors: dict[int, int] = {}
    hybrid = [hit_view(kb, h, colors) for h in result["hits"]]
    return [
        {"key": "dense", "title": "Dense", "hint": "embedding similarity (cosine)",
         "hits": [hit_view(kb, h, colors) for h in result["dense"]]},
        {"key": "bm25", "title": "BM25", "hint": "keyword relevance",
         "hits": [hit_view(kb, h, colors) for h in result["bm25"]]},
        {"key": "hybrid", "title": "Hybrid", "hint": "reciprocal rank fusion of both",
         "hits": hybrid},
    ]  # fmt: skip


@router.post("/kbs/{name}/search")
async def search_kb(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Search the knowledge base and show the dense, BM25 and hybrid rankings side by side
    (the hybrid hits with their dense and BM25 ranks). Records nothing."""
    svc = services(request)
    form = await form_fields(request)
    query = form.get("query", "")
    kept = {
        "query": query[:MAX_QUERY_CHARS],
        "top_k": form.get("top_k", ""),
        "rerank": "yes" if form.get("rerank") == "yes" else "",
    }
    search: dict[str, Any] | None = None
    error: str | None = None
    status = 200
    try:
        if not query.strip():
            raise PageError(400, "Type a query to search for.")
        if len(query) > MAX_QUERY_CHARS:
            raise PageError(413, f"The query is longer than {MAX_QUERY_CHARS:,} characters.")
        top_k = whole(kept["top_k"], "Top k", 1, MAX_TOP_K)
        result = await svc.retriever.search(
            user.project_id, name, query, top_k=top_k, mode="hybrid", rerank=bool(kept["rerank"])
        )
        search = {
            "query": query,
            "index_version": result["index_version"],
            "top_k": result["top_k"],
            "columns": search_columns(name, result),
            "empty": not (result["hits"] or result["dense"] or result["bm25"]),
        }
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
    if htmx_target(request) == "kb-search":
        context = {"search": search, "search_error": error}
        return render(request, "_kb_search.html", context, status_code=status)
    return await _kb_full_page(
        request, user, name, status, search=search, search_error=error, search_form=kept
    )


# -- one document: its text with the chunks marked -----------------------------------------------


@dataclass(frozen=True)
class Segment:
    """A stretch of a document's text inside the same chunks (positions), and the chunks
    that start where it starts."""

    text: str
    chunks: tuple[int, ...]
    starts: tuple[int, ...]


def chunk_segments(text: str, chunks: Sequence[Mapping[str, Any]]) -> list[Segment]:
    """``text`` cut at every chunk boundary, each piece naming the chunks covering it, so
    the page can mark any chunk's ``[start, end)`` span (overlaps are in two chunks)."""
    opening: dict[int, list[int]] = {}
    closing: dict[int, list[int]] = {}
    for chunk in chunks:
        start, end = int(chunk["start"]), int(chunk["end"])
        if 0 <= start < end <= len(text):
            opening.setdefault(start, []).append(int(chunk["position"]))
            closing.setdefault(end, []).append(int(chunk["position"]))
    points = sorted({0, len(text), *opening, *closing})
    active: set[int] = set()
    segments: list[Segment] = []
    for start, end in itertools.pairwise(points):
        active.difference_update(closing.get(start, ()))
        active.update(opening.get(start, ()))
        segments.append(
            Segment(text[start:end], tuple(sorted(active)), tuple(sorted(opening.get(start, ()))))
        )
    return segments


@router.get("/kbs/{name}/documents/{document_id}")
def document_page(
    request: Request, name: str, document_id: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """A document: its metadata, its chunks (offsets, tokens, heading path) and its text with
    the chunk boundaries marked; ``?chunk=N`` (or clicking a chunk) marks chunk N's span."""
    svc = services(request)
    try:
        doc = svc.kbs.document(user.project_id, name, document_id)
    except ServiceError as exc:
        return _kb_error(request, exc)
    selected_param = request.query_params.get("chunk", "")
    selected = (
        int(selected_param) if selected_param.isdecimal() and len(selected_param) < 9 else None
    )
    text = doc["text"]
    shown = text[:MAX_SHOWN_TEXT]
    chunks = [{**c, "url": document_url(name, document_id, c["position"])} for c in doc["chunks"]]
    context = {
        "nav": "kbs",
        "kb_name": name,
        "kb_url": kb_url(name),
        "doc": doc,
        "chunks": chunks,
        "segments": chunk_segments(shown, doc["chunks"]),
        "truncated": len(text) > len(shown),
        "shown_chars": len(shown),
        "selected": selected,
        "chunk_colors": CHUNK_COLORS,
    }
    return render(request, "kb_document.html", context)


# -- pipelines -----------------------------------------------------------------------------------


def _pipelines_context(svc: Services, user: Principal, **extra: Any) -> dict[str, Any]:
    rows = [{**p, "url": pipeline_url(p["name"])} for p in svc.pipelines.list(user.project_id)]
    return {
        "nav": "pipelines",
        "rows": rows,
        "spec_text": SAMPLE_PIPELINE if not rows else "",
        "problems": [],
        "error": None,
        "deleted": "",
        **extra,
    }


@router.get("/pipelines")
def pipelines_page(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """The project's pipelines and, for writers, a form to create or replace one from its
    YAML (``?edit=NAME`` fills in a stored pipeline's YAML)."""
    svc = services(request)
    extra: dict[str, Any] = {"deleted": request.query_params.get("deleted", "")[:128]}
    edit = request.query_params.get("edit", "")
    if edit:
        try:
            extra["spec_text"] = svc.pipelines.get(user.project_id, edit)["spec"]
        except ServiceError as exc:
            return _pipeline_error(request, exc)
    return render(request, "pipelines.html", _pipelines_context(svc, user, **extra))


def spec_problems(text: str) -> tuple[str | None, list[str]]:
    """The pipeline's name and its problems (each names the line, step and field); no name
    when the YAML is too broken to say."""
    try:
        spec = parse_pipeline(text, "pipeline.yaml")
    except PipelineSpecError as exc:
        return None, exc.problems or [str(exc)]
    return spec.name, []


@router.post("/pipelines")
async def save_pipeline(request: Request, user: Principal = Depends(ui_authorize)) -> Response:
    """Create or replace the pipeline the pasted YAML names; its problems are listed inline,
    each naming the step and field."""
    svc = services(request)
    form = await form_fields(request)
    # Browsers send textarea lines with CRLF.
    text = form.get("spec", "").replace("\r\n", "\n")
    problems: list[str] = []
    error: str | None = None
    status = 400
    try:
        if not text.strip():
            raise PageError(400, "Paste a pipeline's YAML.")
        if len(text) > MAX_SPEC_FORM_CHARS:
            raise PageError(413, f"The YAML is longer than {MAX_SPEC_FORM_CHARS:,} characters.")
        name, problems = await run_in_threadpool(spec_problems, text)
        if name is not None:
            view, created = await run_in_threadpool(
                lambda: svc.pipelines.put(user.project_id, name, text, actor=user.actor)
            )
            outcome = "created" if created else "saved"
            query = urlencode({outcome: view["version"]})
            return RedirectResponse(f"{pipeline_url(name)}?{query}", status_code=303)
    except (PageError, ServiceError) as exc:
        error, status = exc.message, exc.status_code
    context = await run_in_threadpool(
        lambda: _pipelines_context(svc, user, spec_text=text, problems=problems, error=error)
    )
    return render(request, "pipelines.html", context, status_code=status)


def input_fields(spec_inputs: Mapping[str, InputSpec]) -> list[dict[str, Any]]:
    """One run-form field per declared input: its type, whether required, its default."""
    return [
        {
            "name": name,
            "type": spec.type,
            "required": spec.required,
            "default": "" if spec.default is None
            else spec.default if isinstance(spec.default, str)
            else json.dumps(spec.default),
            "description": spec.description or "",
        }
        for name, spec in spec_inputs.items()
    ]  # fmt: skip


def form_inputs(form: Mapping[str, str], spec_inputs: Mapping[str, InputSpec]) -> dict[str, Any]:
    """The run form's inputs: the JSON object when one is given, else the fields converted by
    their declared type. An empty field is left out (its default applies, or the run names
    the missing input)."""
    raw = form.get("inputs_json", "").strip()
    if raw:
        if len(raw) > MAX_INPUTS_JSON:
            raise PageError(413, "The inputs JSON is too long.")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise PageError(400, f"The inputs are not JSON: {exc}.") from None
        if not isinstance(data, dict):
            raise PageError(400, 'The inputs must be a JSON object, e.g. {"question": "…"}.')
        return data
    inputs: dict[str, Any] = {}
    for name, spec in spec_inputs.items():
        value = form.get(f"input.{name}", "")
        if spec.type == "string":
            if value:
                inputs[name] = value.replace("\r\n", "\n")
            continue
        value = value.strip()
        if not value:
            continue
        if spec.type == "boolean":
            if value not in ("true", "false"):
                raise PageError(400, f"Input '{name}' must be true or false.")
            inputs[name] = value == "true"
            continue
        try:
            inputs[name] = json.loads(value)
        except ValueError:
            raise PageError(400, f"Input '{name}' must be JSON ({spec.type}).") from None
    return inputs


def _pipeline_context(svc: Services, user: Principal, name: str, **extra: Any) -> dict[str, Any]:
    view = svc.pipelines.get(user.project_id, name)
    spec = svc.pipelines.spec(user.project_id, name)
    return {
        "nav": "pipelines",
        "pipeline": view,
        "url": pipeline_url(name),
        "fields": input_fields(spec.inputs),
        "kept": {},
        "run": None,
        "run_error": None,
        "notice": None,
        **extra,
    }


@router.get("/pipelines/{name}")
def pipeline_page(request: Request, name: str, user: Principal = Depends(ui_authorize)) -> Response:
    """A pipeline: its YAML, its steps, and a form to run it (one field per declared input,
    or the inputs as JSON)."""
    params = request.query_params
    notice = None
    if params.get("created", "").isdecimal():
        notice = "Pipeline created."
    elif params.get("saved", "").isdecimal():
        notice = f"Saved as version {params['saved']}."
    try:
        context = _pipeline_context(services(request), user, name, notice=notice)
    except ServiceError as exc:
        return _pipeline_error(request, exc)
    return render(request, "pipeline.html", context)


def run_view(run: PipelineRun) -> dict[str, Any]:
    """A run as the result partial shows it: the steps (nested ones indented) with status,
    latency and error, the output and the trace link."""
    depths: dict[str | None, int] = {run.span_id: 0}
    steps = []
    for step in run.steps:
        depth = depths.get(step.parent_id, 0)
        if step.span_id:
            depths[step.span_id] = depth + 1
        steps.append(
            {
                "id": step.id,
                "type": step.type,
                "status": step.status,
                "latency_ms": step.latency_ms,
                "error": step.error,
                "depth": depth,
                "output": None if step.status != "ok" else clip(_as_text(step.output), 2000),
            }
        )
    return {
        "pipeline": run.pipeline,
        "status": run.status,
        "error": run.error,
        "output": _as_text(run.output),
        "latency_ms": run.latency_ms,
        "trace_id": run.trace_id,
        "trace_url": f"/traces/{run.trace_id}",
        "steps": steps,
    }


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else fmt_json(value)


@router.post("/pipelines/{name}/run")
async def run_pipeline(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Run the pipeline as the signed-in caller (its model calls go through the gateway with
    the caller's limits); shows each step's status, the output and the trace."""
    svc = services(request)
    form = await form_fields(request)
    kept = {k: v for k, v in form.items() if k.startswith("input.") or k == "inputs_json"}
    run: dict[str, Any] | None = None
    error: str | None = None
    status = 200
    try:
        if not user.can(Permission.PIPELINES_READ):
            raise PageError(403, "Running a pipeline needs the pipelines:read permission.")
        spec = await run_in_threadpool(svc.pipelines.spec, user.project_id, name)
        inputs = form_inputs(form, spec.inputs)
        ctx = CallContext(
            api_key_id=user.key_id,
            project_id=user.project_id,
            allowed_models=user.allowed_models,
            limit_subjects=await limit_subjects(svc, user),
        )
        run = run_view(await svc.run_pipeline(ctx, name, inputs))
    except (PageError, ServiceError, GatewayError) as exc:
        error, status = exc.message, exc.status_code
    if htmx_target(request) == "pipeline-run":
        context = {"run": run, "run_error": error}
        return render(request, "_pipeline_run.html", context, status_code=status)
    try:
        context = await run_in_threadpool(
            lambda: _pipeline_context(svc, user, name, run=run, run_error=error, kept=kept)
        )
    except ServiceError as exc:
        return _pipeline_error(request, exc)
    return render(request, "pipeline.html", context, status_code=status)


@router.post("/pipelines/{name}/delete")
async def delete_pipeline(
    request: Request, name: str, user: Principal = Depends(ui_authorize)
) -> Response:
    """Delete the pipeline (a route that serves it fails from then on)."""
    svc = services(request)
    try:
        await run_in_threadpool(
            lambda: svc.pipelines.delete(user.project_id, name, actor=user.actor)
        )
    except ServiceError as exc:
        return _pipeline_error(request, exc)
    return RedirectResponse(f"/pipelines?{urlencode({'deleted': name})}", status_code=303)
