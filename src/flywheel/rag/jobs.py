"""The ``kb.ingest`` job kind: knowledge-base ingestion in a job worker.

``POST /api/kbs/{name}/documents?background=true`` (and ``/urls?background=true``) store what
was sent in the artifact store, under the project's upload area ``uploads/<project id>/``,
and queue a ``kb.ingest`` job naming those files; the worker reads (or fetches) each
document, ingests them with :meth:`~flywheel.rag.knowledge.KnowledgeBases.ingest` as the
synchronous endpoints do, and its result is the :class:`~flywheel.rag.knowledge.IngestReport`.
A file that cannot be read is reported under ``failed``; the others are ingested.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.config.schema import RESOURCE_NAME_PATTERN
from flywheel.errors import ServiceError
from flywheel.jobs.context import JobContext
from flywheel.jobs.kinds import JobKind, register_job_kind
from flywheel.rag.fetch import FetchError, FetchPolicy, fetch_url
from flywheel.rag.knowledge import KnowledgeBases
from flywheel.rag.loaders import LoadedDocument, LoaderError, load_upload
from flywheel.security import Permission
from flywheel.store.artifacts import ArtifactStore

KIND = "kb.ingest"
UPLOADS = "uploads"
# A key inside the project's upload area: up to four plain segments (no "..", no "/" start).
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
UPLOAD_KEY = rf"^{_SEGMENT}(/{_SEGMENT}){{0,3}}$"
# Share of the job's progress bar each phase fills: reading, storing documents, embedding.
LOAD_SHARE, STORE_SHARE, EMBED_SHARE = 0.3, 0.5, 0.15
# How often a job waiting for an earlier ingestion into the same knowledge base looks again.
TURN_POLL_SECONDS = 1.0


class IngestServices(Protocol):
    """What the job uses of the service layer (the worker builds it on first use)."""

    kbs: KnowledgeBases
    artifacts: ArtifactStore
    settings: Any
    writer: Any


@dataclass(frozen=True)
class Upload:
    """One sent document before it is read: a file's bytes, or (``text``) a document's text
    as given in a JSON body."""

    name: str
    data: bytes
    media_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    text: bool = False


def read_upload(upload: Upload) -> LoadedDocument | LoaderError:
    """A sent document as the ingestion takes it (a file parsed by its type; a text as is)."""
    if not upload.text:
        return load_upload(upload.name, upload.data, upload.media_type)
    # NUL cannot be stored in PostgreSQL text.
    return LoadedDocument(
        source=upload.name.replace("\x00", ""),
        text=upload.data.decode("utf-8", errors="replace").replace("\x00", ""),
        media_type=upload.media_type or "text/plain",
        metadata=upload.metadata,
    )


class ArtifactIn(BaseModel):
    """A file in the project's upload area, to ingest as the document ``name``."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(pattern=UPLOAD_KEY, description="Key under uploads/<project id>/.")
    name: str = Field(min_length=1, max_length=1000, description="The document's source.")
    media_type: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    text: bool = Field(default=False, description="The bytes are the text itself (UTF-8).")


class IngestJobParams(BaseModel):
    """A ``kb.ingest`` job's params: the knowledge base, URLs to fetch and/or stored files,
    metadata for every document, and a timeout."""

    model_config = ConfigDict(extra="forbid")

    knowledge_base: str = Field(pattern=RESOURCE_NAME_PATTERN)
    urls: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        default_factory=list, max_length=100
    )
    artifacts: list[ArtifactIn] = Field(default_factory=list, max_length=10_000)
    metadata: dict[str, Any] | None = None
    timeout: float | None = Field(default=None, gt=0, description="Seconds before it stops.")


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params as stored, or a 400 naming the field at fault (``params.urls.0``...)."""
    try:
        parsed = IngestJobParams.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["params", *(str(part) for part in first["loc"])])
        raise ServiceError(400, f"{where}: {first['msg']}", "invalid_value", where) from None
    if not parsed.urls and not parsed.artifacts:
        raise ServiceError(
            400, "params: give 'urls' and/or 'artifacts' to ingest.", "invalid_value", "params.urls"
        )
    return parsed.model_dump()


def upload_area(project_id: str) -> str:
    """Where a project's uploads for ingestion jobs are kept in the artifact store."""
    return f"{UPLOADS}/{project_id}"


def store_uploads(
    artifacts: ArtifactStore, project_id: str, uploads: Sequence[Upload]
) -> list[dict[str, Any]]:
    """Store sent documents in the project's upload area (one folder per request); returns
    them as a ``kb.ingest`` job's ``artifacts``."""
    batch = uuid.uuid4().hex
    area = upload_area(project_id)
    entries: list[dict[str, Any]] = []
    for index, upload in enumerate(uploads):
        # The key is ours (the name may be anything a client sent); the name is the source.
        key = f"{batch}/{index:05d}"
        artifacts.put(f"{area}/{key}", upload.data)
        entry: dict[str, Any] = {"key": key, "name": upload.name, "media_type": upload.media_type}
        if upload.text:
            entry.update(text=True, metadata=upload.metadata)
        entries.append(entry)
    return entries


def discard_uploads(artifacts: ArtifactStore, project_id: str, keys: Sequence[str]) -> None:
    """Remove stored uploads (after their job ingested them, or when it was refused), and
    each request's folder once nothing is left in it."""
    area = upload_area(project_id)
    for key in keys:
        artifacts.delete(f"{area}/{key}")
    for folder in sorted({key.split("/", 1)[0] for key in keys if "/" in key}):
        path = f"{area}/{folder}"
        if artifacts.exists(path) and artifacts.size(path) == 0:
            artifacts.delete(path)


def _wait_turn(ctx: JobContext, knowledge_base: str) -> None:
    """Wait until no earlier ``kb.ingest`` job of the same knowledge base is running: an
    ingestion's lock is per process, and two building index versions at once would race."""
    me = ctx.store.load(ctx.job_id)
    mine = (me.created_at, me.id)
    waiting_for = None
    while not ctx.cancelled():
        ahead = [
            job
            for job in ctx.store.list_jobs(ctx.project_id, status="running", kind=KIND, limit=1000)
            if (job["params"] or {}).get("knowledge_base") == knowledge_base
            and (job["created_at"], job["id"]) < mine
        ]
        if not ahead:
            return
        if ahead[0]["id"] != waiting_for:
            waiting_for = ahead[0]["id"]
            ctx.log(f"waiting for job {waiting_for}, which is ingesting into {knowledge_base}")
        ctx.progress(0.0, f"waiting for job {waiting_for}")
        time.sleep(TURN_POLL_SECONDS)


def _load(
    ctx: JobContext, svc: IngestServices, params: dict[str, Any]
) -> list[LoadedDocument | LoaderError]:
    """Every document read or fetched, in order (a failure is kept as its LoaderError)."""
    entries: list[dict[str, Any]] = params["artifacts"]
    urls: list[str] = params["urls"]
    total = len(entries) + len(urls)
    area = upload_area(ctx.project_id)
    documents: list[LoadedDocument | LoaderError] = []

    def loaded(item: LoadedDocument | LoaderError) -> None:
        documents.append(item)
        if isinstance(item, LoaderError):
            ctx.log(f"could not read {item.source}: {item.problem}")
        else:
            ctx.log(f"read {item.source} ({len(item.text)} characters)")
        ctx.progress(LOAD_SHARE * len(documents) / total, f"read {len(documents)}/{total}")

    for entry in entries:
        if ctx.cancelled():
            return documents
        try:
            data = svc.artifacts.get(f"{area}/{entry['key']}")
        except FileNotFoundError:
            loaded(LoaderError(entry["name"], "the uploaded file is no longer stored"))
            continue
        upload = Upload(
            entry["name"],
            data,
            entry.get("media_type"),
            entry.get("metadata") or {},
            bool(entry.get("text")),
        )
        loaded(read_upload(upload))
    if urls:
        policy = FetchPolicy(allow_hosts=tuple(svc.settings.fetch_allow_hosts))
        for url in urls:
            if ctx.cancelled():
                return documents
            try:
                loaded(fetch_url(url, policy))
            except (FetchError, LoaderError) as exc:
                loaded(LoaderError(url, str(exc)))
    return documents


def run_ingest_job(ctx: JobContext) -> dict[str, Any] | None:
    """Read every document, ingest them into the knowledge base, and report what changed."""
    svc: IngestServices = ctx.services()
    params = ctx.params
    name = params["knowledge_base"]
    # A missing knowledge base fails the job at once, with the API's own message.
    svc.kbs.get(ctx.project_id, name)
    _wait_turn(ctx, name)
    documents = _load(ctx, svc, params)
    if ctx.cancelled():
        ctx.log(f"cancelled after reading {len(documents)} documents: nothing ingested")
        return None
    total = len(documents)
    ctx.log(f"ingesting {total} documents into {name}")

    def progress(stage: str, done: int, of: int) -> None:
        if stage == "documents":
            ctx.progress(LOAD_SHARE + STORE_SHARE * done / max(of, 1), f"stored {done}/{of}")
        elif stage == "embeddings":
            share = LOAD_SHARE + STORE_SHARE + EMBED_SHARE * done / max(of, 1)
            ctx.progress(share, f"embedded {done}/{of} chunks")
        else:
            ctx.progress(1.0 - 0.01, "index built")

    # A text upload's own metadata is in its document already; the job's applies to all.
    report = asyncio.run(
        svc.kbs.ingest(
            ctx.project_id,
            name,
            documents,
            actor=ctx.actor,
            metadata=params.get("metadata"),
            progress=progress,
        )
    )
    # Embeddings from a remote embedder are traced gateway calls: let them land.
    svc.writer.flush()
    result = report.as_dict()
    ctx.log(
        f"added {len(report.added)}, updated {len(report.updated)}, unchanged "
        f"{len(report.unchanged)}, duplicates {len(report.duplicates)}, failed "
        f"{len(report.failed)}; index version {report.index_version}"
    )
    ctx.progress(1.0, f"index version {report.index_version}")
    if not ctx.cancelled():
        # Ingested: a retry is only for jobs that did not finish, so the files can go.
        discard_uploads(svc.artifacts, ctx.project_id, [e["key"] for e in params["artifacts"]])
    return result


def register_kinds() -> None:
    """Make ``kb.ingest`` available (imported by the job registry on first use)."""
    register_job_kind(
        JobKind(
            KIND,
            run_ingest_job,
            validate_params,
            "Ingest uploaded files and URLs into a knowledge base; the result is what changed.",
            # Submitting it changes a knowledge base: what the ingestion endpoints need.
            permission=Permission.KB_WRITE.value,
        )
    )


register_kinds()
