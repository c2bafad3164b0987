"""Knowledge bases: documents in, chunks and embeddings kept, immutable index versions out.

Ingesting is idempotent: a document is keyed by its source (relative path, file name or
URL) and its content hash, so re-ingesting a folder changes only the documents whose text
changed, and a document whose text another source already holds is skipped as a duplicate.
After each change an **index version** is built over all documents: it records the
embedder, the chunker settings and every (source, hash) pair, and stores its FAISS and BM25
indexes in the artifact store. Embeddings are kept per chunk, so a new version re-embeds only
new chunks unless the embedder changed, and then everything (never a mix of two embedders).

On PostgreSQL with the pgvector extension an index version lives in the database instead
(``flywheel.rag.pgvector``): a table per (knowledge base, embedder) with a vector column and a
full-text column, which every replica searches directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from flywheel.config.schema import RESOURCE_NAME_PATTERN
from flywheel.errors import ServiceError
from flywheel.rag.chunking import Chunk, ChunkerConfig, chunk_text
from flywheel.rag.embedders import LOCAL_EMBEDDER, Embedder, RemoteEmbed
from flywheel.rag.index import Bm25Index, VectorIndex
from flywheel.rag.loaders import LoadedDocument, LoaderError
from flywheel.rag.pgvector import BACKEND, TEXT_SEARCH_CONFIG, PgVectorStore
from flywheel.security.audit import AuditLog
from flywheel.store import Database, KbChunk, KbDocument, KbIndexVersion, KnowledgeBase
from flywheel.store.artifacts import ArtifactStore
from flywheel.store.db import lock_row

SearchMode = Literal["dense", "bm25", "hybrid"]
NAME_PATTERN = re.compile(RESOURCE_NAME_PATTERN)
Progress = Callable[[str, int, int], None]


class KbError(ServiceError):
    """A refused knowledge-base operation."""


class RerankConfig(BaseModel):
    """Re-order the first ``top_n`` hits by asking ``model`` (a route or catalog model)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=300)
    top_n: int = Field(default=10, ge=2, le=50)


class KbSettings(BaseModel):
    """A knowledge base's chunker, embedder and search defaults."""

    model_config = ConfigDict(extra="forbid")
    chunker: ChunkerConfig = Field(default_factory=ChunkerConfig)
    embedder: str = Field(
        default=LOCAL_EMBEDDER,
        min_length=1,
        max_length=300,
        description="builtin:minilm, or a catalog embedding model (called through the gateway).",
    )
    top_k: int = Field(default=5, ge=1, le=100)
    mode: SearchMode = "hybrid"
    rrf_k: float = Field(
        default=60.0, gt=0, allow_inf_nan=False, description="Reciprocal rank fusion constant."
    )
    hnsw_threshold: int = Field(
        default=50_000, ge=1, description="Exact search below this many chunks, HNSW above."
    )
    rerank: RerankConfig | None = None


def parse_settings(data: Any, param: str = "settings") -> KbSettings:
    """``data`` as settings, or a 400 naming the first bad field."""
    try:
        return KbSettings.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in (param, *first["loc"]))
        raise KbError(400, f"Invalid {where}: {first['msg']}.", "invalid_value", where) from None


@dataclass
class IngestReport:
    """What one ingestion changed."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    chunks: int = 0
    index_version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "chunks": self.chunks,
            "index_version": self.index_version,
        }


def _now() -> float:
    return time.time()


def _digest(pairs: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()


def kb_to_dict(kb: KnowledgeBase, **extra: Any) -> dict[str, Any]:
    return {
        "id": kb.id,
        "name": kb.name,
        "description": kb.description,
        "settings": kb.settings,
        "index_version": kb.index_version,
        "created_at": kb.created_at,
        "created_by": kb.created_by,
        "updated_at": kb.updated_at,
        **extra,
    }


def document_to_dict(doc: KbDocument, *, text: bool = False) -> dict[str, Any]:
    out = {
        "id": doc.id,
        "source": doc.source,
        "content_hash": doc.content_hash,
        "version": doc.version,
        "media_type": doc.media_type,
        "metadata": doc.meta,
        "chars": doc.chars,
        "chunk_count": doc.chunk_count,
        "created_at": doc.created_at,
        "updated_at": doc.updated_at,
        "updated_by": doc.updated_by,
    }
    if text:
        out["text"] = doc.text
    return out


def chunk_to_dict(chunk: KbChunk) -> dict[str, Any]:
    return {
        "id": chunk.id,
        "document_id": chunk.document_id,
        "position": chunk.position,
        "start": chunk.start,
        "end": chunk.end,
        "text": chunk.text,
        "headings": chunk.headings,
        "tokens": chunk.tokens,
        "embedder": chunk.embedder,
    }


def version_to_dict(row: KbIndexVersion) -> dict[str, Any]:
    return {
        "version": row.version,
        "embedder": row.embedder,
        "dim": row.dim,
        "chunker": row.chunker,
        "digest": row.digest,
        "document_count": len(row.documents or []),
        "chunk_count": row.chunk_count,
        "vector_kind": row.vector_kind,
        "artifacts": row.artifacts,
        "created_at": row.created_at,
        "created_by": row.created_by,
    }


def _document_pairs(session: Session, kb_id: str) -> list[tuple[str, str]]:
    """(source, content hash) of every document, by source: what an index version is of."""
    return [
        (source, digest)
        for source, digest in session.execute(
            select(KbDocument.source, KbDocument.content_hash)
            .where(KbDocument.kb_id == kb_id)
            .order_by(KbDocument.source)
        )
    ]


class KnowledgeBases:
    """Knowledge bases of every project: create, ingest, browse and index."""

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        artifacts: ArtifactStore,
        remote_embed: RemoteEmbed | None = None,
        *,
        pgvector: bool | None = None,
    ) -> None:
        """``pgvector``: None uses PostgreSQL's pgvector and full-text search when the store is
        PostgreSQL and the extension can be created, False always builds FAISS and bm25s
        artifacts, True requires pgvector (an error on first use without it)."""
        self.db = db
        self.audit = audit
        self.artifacts = artifacts
        self.remote_embed = remote_embed
        self._pgvector = pgvector
        self.pg: PgVectorStore | None = None
        if pgvector is not False and db.engine.dialect.name == "postgresql":
            self.pg = PgVectorStore(db)
        elif pgvector:
            raise ValueError("pgvector needs a PostgreSQL store")
        # One ingestion or rebuild at a time per knowledge base in this process; replicas
        # are kept apart by the unique (kb, version) constraint.
        self._locks: dict[str, asyncio.Lock] = {}

    def uses_pgvector(self) -> bool:
        """Whether new index versions go to PostgreSQL (pgvector + full text)."""
        if self.pg is None:
            return False
        if self.pg.available():
            return True
        if self._pgvector:
            raise KbError(
                503, "The pgvector extension is not available on this database.", "unavailable"
            )
        return False

    # -- knowledge bases --------------------------------------------------------------------

    def _kb(self, session: Session, project_id: str, name: str) -> KnowledgeBase:
        kb = session.scalar(
            select(KnowledgeBase).where(
                KnowledgeBase.project_id == project_id, KnowledgeBase.name == name
            )
        )
        if kb is None:
            raise KbError(404, f"No knowledge base '{name}'.", "not_found", "knowledge_base")
        return kb

    def get(self, project_id: str, name: str) -> dict[str, Any]:
        """One knowledge base with its counts and active index version."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            docs, chunks = session.execute(
                select(func.count(), func.coalesce(func.sum(KbDocument.chunk_count), 0)).where(
                    KbDocument.kb_id == kb.id
                )
            ).one()
            index = self._index_row(session, kb)
            return kb_to_dict(
                kb,
                document_count=int(docs),
                chunk_count=int(chunks),
                index=version_to_dict(index) if index is not None else None,
            )

    def create(
        self,
        project_id: str,
        name: str,
        *,
        actor: str,
        description: str = "",
        settings: Any = None,
    ) -> dict[str, Any]:
        """A new, empty knowledge base; 409 when the name is taken."""
        if not NAME_PATTERN.match(name):
            raise KbError(
                400,
                f"Invalid knowledge base name '{name}': use letters, digits, '.', '_' and '-'.",
                "invalid_value",
                "name",
            )
        parsed = parse_settings(settings)
        now = _now()
        kb = KnowledgeBase(
            id=uuid.uuid4().hex,
            project_id=project_id,
            name=name,
            description=description,
            settings=parsed.model_dump(mode="json"),
            index_version=None,
            created_at=now,
            created_by=actor,
            updated_at=now,
        )
        try:
            with self.db.session() as session:
                session.add(kb)
                session.flush()
                self.audit.record(
                    actor=actor,
                    action="create",
                    resource_type="knowledge_base",
                    resource_id=name,
                    project_id=project_id,
                    after=kb_to_dict(kb),
                    session=session,
                )
        except IntegrityError:
            raise KbError(
                409, f"A knowledge base '{name}' exists already.", "already_exists", "name"
            ) from None
        return kb_to_dict(kb, document_count=0, chunk_count=0, index=None)

    def update(
        self,
        project_id: str,
        name: str,
        *,
        actor: str,
        description: str | None = None,
        settings: Any = None,
    ) -> tuple[dict[str, Any], bool]:
        """Change the description and/or settings (merged over the current ones); returns the
        knowledge base and whether its index must be rebuilt (chunker or embedder changed)."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            before = kb_to_dict(kb)
            rebuild = False
            if settings is not None:
                merged = {**kb.settings, **settings}
                parsed = parse_settings(merged)
                old = KbSettings.model_validate(kb.settings)
                rebuild = (
                    parsed.chunker.fingerprint() != old.chunker.fingerprint()
                    or parsed.embedder != old.embedder
                )
                kb.settings = parsed.model_dump(mode="json")
            if description is not None:
                kb.description = description
            kb.updated_at = _now()
            self.audit.record(
                actor=actor,
                action="update",
                resource_type="knowledge_base",
                resource_id=name,
                project_id=project_id,
                before=before,
                after=kb_to_dict(kb),
                session=session,
            )
        return self.get(project_id, name), rebuild

    def delete(self, project_id: str, name: str, *, actor: str) -> None:
        """The knowledge base, its documents, chunks, index versions and artifacts."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            kb_id = kb.id
            before = kb_to_dict(kb)
            if self.pg is not None:
                self.pg.drop(session, kb_id)
            session.execute(delete(KbChunk).where(KbChunk.kb_id == kb_id))
            session.execute(delete(KbDocument).where(KbDocument.kb_id == kb_id))
            session.execute(delete(KbIndexVersion).where(KbIndexVersion.kb_id == kb_id))
            session.delete(kb)
            self.audit.record(
                actor=actor,
                action="delete",
                resource_type="knowledge_base",
                resource_id=name,
                project_id=project_id,
                before=before,
                session=session,
            )
        self.artifacts.delete(f"kb/{kb_id}")

    def settings_of(self, project_id: str, name: str) -> tuple[str, KbSettings, int | None]:
        """The knowledge base's id, settings and active index version."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            return kb.id, KbSettings.model_validate(kb.settings), kb.index_version

    # -- documents --------------------------------------------------------------------------

    def documents(
        self, project_id: str, name: str, *, limit: int = 100, offset: int = 0, q: str = ""
    ) -> dict[str, Any]:
        """A page of documents (source contains ``q``, ignoring case, when given), by source."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            query = select(KbDocument).where(KbDocument.kb_id == kb.id)
            if q:
                # icontains: LIKE ignores case on SQLite but not on PostgreSQL; lower() on
                # both sides makes the two agree.
                query = query.where(KbDocument.source.icontains(q, autoescape=True))
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(KbDocument.source).limit(limit).offset(offset))
            return {"data": [document_to_dict(d) for d in rows], "total": int(total)}

    def document(self, project_id: str, name: str, document_id: str) -> dict[str, Any]:
        """One document with its text and chunks (with their offsets)."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            doc = session.scalar(
                select(KbDocument).where(KbDocument.kb_id == kb.id, KbDocument.id == document_id)
            )
            if doc is None:
                raise KbError(404, f"No document '{document_id}' in '{name}'.", "not_found")
            chunks = session.scalars(
                select(KbChunk).where(KbChunk.document_id == doc.id).order_by(KbChunk.position)
            )
            return {
                **document_to_dict(doc, text=True),
                "chunks": [chunk_to_dict(c) for c in chunks],
            }

    def chunks(self, project_id: str, name: str, chunk_ids: Iterable[int]) -> list[dict[str, Any]]:
        """Chunks by id, with their document's source."""
        ids = list(chunk_ids)
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            rows = session.execute(
                select(KbChunk, KbDocument.source)
                .join(KbDocument, KbDocument.id == KbChunk.document_id)
                .where(KbChunk.kb_id == kb.id, KbChunk.id.in_(ids))
            ).all()
            return [{**chunk_to_dict(c), "source": source} for c, source in rows]

    async def delete_document(
        self, project_id: str, name: str, document_id: str, *, actor: str
    ) -> dict[str, Any]:
        """Remove one document and rebuild the index without it."""
        async with self._lock(project_id, name):
            with self.db.session() as session:
                kb = self._kb(session, project_id, name)
                doc = session.scalar(
                    select(KbDocument).where(
                        KbDocument.kb_id == kb.id, KbDocument.id == document_id
                    )
                )
                if doc is None:
                    raise KbError(404, f"No document '{document_id}' in '{name}'.", "not_found")
                before = document_to_dict(doc)
                session.execute(delete(KbChunk).where(KbChunk.document_id == doc.id))
                session.delete(doc)
                self.audit.record(
                    actor=actor,
                    action="delete",
                    resource_type="kb_document",
                    resource_id=f"{name}/{before['source']}",
                    project_id=project_id,
                    before=before,
                    session=session,
                )
            version = await self._build_index(project_id, name, actor, None)
        return {"deleted": document_id, "index_version": version}

    # -- ingestion ----------------------------------------------------------------------------

    def _lock(self, project_id: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault(f"{project_id}/{name}", asyncio.Lock())

    async def ingest(
        self,
        project_id: str,
        name: str,
        documents: Iterable[LoadedDocument | LoaderError],
        *,
        actor: str,
        metadata: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> IngestReport:
        """Add or update ``documents`` (their chunks and embeddings), then build a new index
        version when anything changed. Loader errors are reported, not raised, so one bad
        file never loses the others."""
        report = IngestReport()
        async with self._lock(project_id, name):
            kb_id, settings, _ = await asyncio.to_thread(self.settings_of, project_id, name)
            items = list(documents)
            for done, item in enumerate(items, start=1):
                if isinstance(item, LoaderError):
                    report.failed.append({"source": item.source, "problem": item.problem})
                    continue
                document = item
                if metadata:
                    document = LoadedDocument(
                        source=item.source,
                        text=item.text,
                        media_type=item.media_type,
                        metadata={**item.metadata, **metadata},
                    )
                await asyncio.to_thread(
                    self._store_document, kb_id, project_id, name, document, settings, actor, report
                )
                if progress is not None:
                    progress("documents", done, len(items))
            if report.added or report.updated:
                self._audit_ingest(project_id, name, actor, report)
            report.index_version = await self._build_index(project_id, name, actor, progress)
        return report

    def _store_document(
        self,
        kb_id: str,
        project_id: str,
        name: str,
        document: LoadedDocument,
        settings: KbSettings,
        actor: str,
        report: IngestReport,
    ) -> None:
        digest = document.content_hash
        source = document.source[:1000]
        with self.db.session() as session:
            existing = session.scalar(
                select(KbDocument).where(KbDocument.kb_id == kb_id, KbDocument.source == source)
            )
            if existing is not None and existing.content_hash == digest:
                report.unchanged.append(source)
                return
            twin = session.scalar(
                select(KbDocument.source).where(
                    KbDocument.kb_id == kb_id,
                    KbDocument.content_hash == digest,
                    KbDocument.source != source,
                )
            )
            if twin is not None:
                report.duplicates.append({"source": source, "duplicate_of": twin})
                return
            pieces = chunk_text(document.text, settings.chunker)
            now = _now()
            if existing is None:
                doc = KbDocument(
                    id=uuid.uuid4().hex,
                    kb_id=kb_id,
                    source=source,
                    version=1,
                    created_at=now,
                )
                session.add(doc)
                report.added.append(source)
            else:
                doc = existing
                doc.version += 1
                session.execute(delete(KbChunk).where(KbChunk.document_id == doc.id))
                report.updated.append(source)
            doc.content_hash = digest
            doc.media_type = document.media_type
            doc.meta = document.metadata
            doc.text = document.text
            doc.chars = len(document.text)
            doc.chunk_count = len(pieces)
            doc.updated_at = now
            doc.updated_by = actor
            session.flush()
            session.add_all(self._chunk_rows(kb_id, doc.id, pieces))
            report.chunks += len(pieces)

    @staticmethod
    def _chunk_rows(kb_id: str, document_id: str, pieces: Sequence[Chunk]) -> list[KbChunk]:
        return [
            KbChunk(
                kb_id=kb_id,
                document_id=document_id,
                position=piece.position,
                start=piece.start,
                end=piece.end,
                text=piece.text,
                headings=list(piece.headings),
                tokens=piece.tokens,
            )
            for piece in pieces
        ]

    def _audit_ingest(self, project_id: str, name: str, actor: str, report: IngestReport) -> None:
        self.audit.record(
            actor=actor,
            action="ingest",
            resource_type="knowledge_base",
            resource_id=name,
            project_id=project_id,
            after={
                "added": report.added[:200],
                "updated": report.updated[:200],
                "chunks": report.chunks,
            },
        )

    async def reindex(
        self, project_id: str, name: str, *, actor: str, progress: Progress | None = None
    ) -> int | None:
        """Re-chunk every document with the current chunker settings and build a new index
        version (when the chunker, the embedder or the documents changed)."""
        async with self._lock(project_id, name):
            kb_id, settings, _ = await asyncio.to_thread(self.settings_of, project_id, name)
            await asyncio.to_thread(self._rechunk, kb_id, settings)
            return await self._build_index(project_id, name, actor, progress)

    def _rechunk(self, kb_id: str, settings: KbSettings) -> None:
        fingerprint = settings.chunker.fingerprint()
        with self.db.session() as session:
            current = session.scalar(
                select(KbIndexVersion.chunker)
                .where(KbIndexVersion.kb_id == kb_id)
                .order_by(KbIndexVersion.version.desc())
                .limit(1)
            )
            if current is not None and current.get("fingerprint") == fingerprint:
                return
            for doc in session.scalars(select(KbDocument).where(KbDocument.kb_id == kb_id)):
                pieces = chunk_text(doc.text, settings.chunker)
                session.execute(delete(KbChunk).where(KbChunk.document_id == doc.id))
                session.add_all(self._chunk_rows(kb_id, doc.id, pieces))
                doc.chunk_count = len(pieces)

    # -- index versions -------------------------------------------------------------------------

    @staticmethod
    def _index_row(session: Session, kb: KnowledgeBase) -> KbIndexVersion | None:
        if kb.index_version is None:
            return None
        return session.scalar(
            select(KbIndexVersion).where(
                KbIndexVersion.kb_id == kb.id, KbIndexVersion.version == kb.index_version
            )
        )

    def index_versions(self, project_id: str, name: str) -> list[dict[str, Any]]:
        """Every index version, newest first; ``active`` marks the one searches use."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            rows = session.scalars(
                select(KbIndexVersion)
                .where(KbIndexVersion.kb_id == kb.id)
                .order_by(KbIndexVersion.version.desc())
            )
            return [
                {**version_to_dict(row), "active": row.version == kb.index_version} for row in rows
            ]

    def active_index(
        self, project_id: str, name: str
    ) -> tuple[str, KbSettings, KbIndexVersion | None]:
        """What a search needs, in one read: the knowledge base's id, its settings and its
        active index version row."""
        with self.db.session() as session:
            kb = self._kb(session, project_id, name)
            return kb.id, KbSettings.model_validate(kb.settings), self._index_row(session, kb)

    async def _build_index(
        self, project_id: str, name: str, actor: str, progress: Progress | None
    ) -> int | None:
        kb_id, settings, active = await asyncio.to_thread(self.settings_of, project_id, name)
        chunker = {
            **settings.chunker.model_dump(mode="json"),
            "fingerprint": settings.chunker.fingerprint(),
        }
        pairs = await asyncio.to_thread(self._document_pairs, kb_id)
        digest = _digest(pairs)
        if active is not None:
            row = await asyncio.to_thread(self._version_row, kb_id, active)
            if (
                row is not None
                and row.digest == digest
                and row.embedder == settings.embedder
                and (row.chunker or {}).get("fingerprint") == chunker["fingerprint"]
            ):
                return active
        await self._embed_missing(project_id, kb_id, settings.embedder, progress)
        if await asyncio.to_thread(self.uses_pgvector):
            version = await asyncio.to_thread(
                self._save_pg_version, kb_id, settings, chunker, digest, pairs, actor
            )
            if progress is not None:
                progress("index", 1, 1)
            return version
        ids, vectors, texts = await asyncio.to_thread(self._index_inputs, kb_id, settings.embedder)
        vector_index = await asyncio.to_thread(
            VectorIndex.build, ids, vectors, hnsw_threshold=settings.hnsw_threshold
        )
        bm25 = await asyncio.to_thread(Bm25Index.build, [int(i) for i in ids], texts)
        saved = await asyncio.to_thread(
            self._save_version,
            kb_id,
            settings.embedder,
            int(vectors.shape[1]) if len(ids) else 0,
            chunker,
            digest,
            pairs,
            vector_index,
            bm25,
            actor,
        )
        if progress is not None:
            progress("index", 1, 1)
        # None: the documents changed while this build ran; the build of the ingest that
        # changed them (it reads the documents after writing them) is the one to keep.
        return saved if saved is not None else active

    def _version_row(self, kb_id: str, version: int) -> KbIndexVersion | None:
        with self.db.session() as session:
            return session.scalar(
                select(KbIndexVersion).where(
                    KbIndexVersion.kb_id == kb_id, KbIndexVersion.version == version
                )
            )

    def _document_pairs(self, kb_id: str) -> list[tuple[str, str]]:
        with self.db.session() as session:
            return _document_pairs(session, kb_id)

    async def _embed_missing(
        self, project_id: str, kb_id: str, embedder_name: str, progress: Progress | None
    ) -> None:
        """Embed the chunks that have no embedding from this embedder, in batches, saving
        each batch (an interrupted build resumes where it stopped)."""
        embedder = Embedder(embedder_name, project_id, self.remote_embed)

        def pending() -> list[tuple[int, str]]:
            with self.db.session() as session:
                return [
                    (cid, text)
                    for cid, text in session.execute(
                        select(KbChunk.id, KbChunk.text)
                        .where(
                            KbChunk.kb_id == kb_id,
                            (KbChunk.embedder.is_(None)) | (KbChunk.embedder != embedder_name),
                        )
                        .order_by(KbChunk.id)
                    )
                ]

        def save(rows: list[tuple[int, str]], vectors: np.ndarray) -> None:
            with self.db.session() as session:
                for (cid, _), vector in zip(rows, vectors, strict=True):
                    chunk = session.get(KbChunk, cid)
                    if chunk is not None:
                        chunk.embedder = embedder_name
                        chunk.embedding = np.asarray(vector, dtype="<f4").tobytes()

        todo = await asyncio.to_thread(pending)
        batch = 256
        for start in range(0, len(todo), batch):
            rows = todo[start : start + batch]
            try:
                vectors = await embedder.embed([text for _, text in rows])
            except ServiceError:
                raise
            except Exception as exc:
                raise KbError(
                    502, f"Embedder '{embedder_name}' failed: {exc}", "embedder_failed"
                ) from exc
            await asyncio.to_thread(save, rows, vectors)
            if progress is not None:
                progress("embeddings", min(start + batch, len(todo)), len(todo))

    def _index_inputs(self, kb_id: str, embedder: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        with self.db.session() as session:
            rows = session.execute(
                select(KbChunk.id, KbChunk.embedding, KbChunk.text)
                .where(KbChunk.kb_id == kb_id, KbChunk.embedder == embedder)
                .order_by(KbChunk.id)
            ).all()
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        if not rows:
            return ids, np.zeros((0, 0), dtype=np.float32), []
        vectors = np.vstack([np.frombuffer(r[1] or b"", dtype="<f4") for r in rows])
        return ids, vectors, [r[2] for r in rows]

    def _save_version(
        self,
        kb_id: str,
        embedder: str,
        dim: int,
        chunker: dict[str, Any],
        digest: str,
        pairs: list[tuple[str, str]],
        vector_index: VectorIndex,
        bm25: Bm25Index,
        actor: str,
    ) -> int | None:
        """Store a built index as the next version and make it active, unless the knowledge
        base's documents no longer match ``pairs`` (then None, and nothing is stored)."""
        with self.db.session() as session:
            # Builds of one knowledge base (a job and a request, two replicas) queue here.
            lock_row(session, KnowledgeBase.id, kb_id)
            if _document_pairs(session, kb_id) != pairs:
                return None
            newest = session.scalar(
                select(func.max(KbIndexVersion.version)).where(KbIndexVersion.kb_id == kb_id)
            )
            version = int(newest or 0) + 1
            prefix = f"kb/{kb_id}/v{version}"
            artifacts = {
                "vectors": self.artifacts.put(f"{prefix}/vectors.faiss", vector_index.to_bytes()),
                "bm25": self.artifacts.put(f"{prefix}/bm25.bin", bm25.to_bytes()),
            }
            session.add(
                KbIndexVersion(
                    kb_id=kb_id,
                    version=version,
                    embedder=embedder,
                    dim=dim,
                    chunker=chunker,
                    digest=digest,
                    documents=[list(p) for p in pairs],
                    chunk_count=vector_index.size,
                    vector_kind=vector_index.kind,
                    artifacts={"vectors": f"{prefix}/vectors.faiss", "bm25": f"{prefix}/bm25.bin"}
                    | {"urls": artifacts},
                    created_at=_now(),
                    created_by=actor,
                )
            )
            kb = session.get(KnowledgeBase, kb_id)
            assert kb is not None
            kb.index_version = version
            kb.updated_at = _now()
        return version

    def _save_pg_version(
        self,
        kb_id: str,
        settings: KbSettings,
        chunker: dict[str, Any],
        digest: str,
        pairs: list[tuple[str, str]],
        actor: str,
    ) -> int:
        """Fill the pgvector table and record the version in one transaction: searches see
        the new rows and the new active version together."""
        assert self.pg is not None
        with self.db.session() as session:
            # Builds of one knowledge base on several replicas queue here.
            lock_row(session, KnowledgeBase.id, kb_id)
            newest = session.scalar(
                select(func.max(KbIndexVersion.version)).where(KbIndexVersion.kb_id == kb_id)
            )
            version = int(newest or 0) + 1
            table, count, dim, kind = self.pg.sync(
                session, kb_id, settings.embedder, version, settings.hnsw_threshold
            )
            session.add(
                KbIndexVersion(
                    kb_id=kb_id,
                    version=version,
                    embedder=settings.embedder,
                    dim=dim,
                    chunker=chunker,
                    digest=digest,
                    documents=[list(p) for p in pairs],
                    chunk_count=count,
                    vector_kind=kind,
                    artifacts={
                        "backend": BACKEND,
                        "table": table,
                        "text_search": TEXT_SEARCH_CONFIG,
                    },
                    created_at=_now(),
                    created_by=actor,
                )
            )
            kb = session.get(KnowledgeBase, kb_id)
            assert kb is not None
            kb.index_version = version
            kb.updated_at = _now()
        return version

    def load_indexes(self, row: KbIndexVersion) -> tuple[VectorIndex, Bm25Index]:
        """The stored indexes of an index version (read from the artifact store)."""
        keys = row.artifacts
        return (
            VectorIndex.from_bytes(self.artifacts.get(keys["vectors"])),
            Bm25Index.from_bytes(self.artifacts.get(keys["bm25"])),
        )

    def chunk_table(
        self, kb_id: str, ids: Iterable[int] | None = None
    ) -> dict[int, dict[str, Any]]:
        """Every chunk of a knowledge base (or those of ``ids``) with its document's source
        and metadata: what search hits and filters need, keyed by chunk id."""
        with self.db.session() as session:
            query = (
                select(
                    KbChunk.id,
                    KbChunk.document_id,
                    KbChunk.position,
                    KbChunk.start,
                    KbChunk.end,
                    KbChunk.text,
                    KbChunk.headings,
                    KbDocument.source,
                    KbDocument.version,
                    KbDocument.media_type,
                    KbDocument.meta,
                )
                .join(KbDocument, KbDocument.id == KbChunk.document_id)
                .where(KbChunk.kb_id == kb_id)
            )
            if ids is not None:
                query = query.where(KbChunk.id.in_(list(ids)))
            rows = session.execute(query).all()
        return {
            row[0]: {
                "chunk_id": row[0],
                "document_id": row[1],
                "position": row[2],
                "start": row[3],
                "end": row[4],
                "text": row[5],
                "headings": row[6] or [],
                "source": row[7],
                "document_version": row[8],
                "media_type": row[9],
                "metadata": row[10] or {},
            }
            for row in rows
        }

    def document_fields(self, kb_id: str) -> list[dict[str, Any]]:
        """Each document's filterable fields (what ``search.matches`` reads) and its chunk
        count: a filtered search on PostgreSQL selects documents, not chunks."""
        with self.db.session() as session:
            rows = session.execute(
                select(
                    KbDocument.id,
                    KbDocument.source,
                    KbDocument.media_type,
                    KbDocument.meta,
                    KbDocument.chunk_count,
                ).where(KbDocument.kb_id == kb_id)
            ).all()
        return [
            {
                "document_id": row[0],
                "source": row[1],
                "media_type": row[2],
                "metadata": row[3] or {},
                "chunk_count": int(row[4] or 0),
            }
            for row in rows
        ]

    # Last in the class: the name 'list' would shadow the builtin in annotations below it.
    def list(self, project_id: str) -> list[dict[str, Any]]:
        """The project's knowledge bases with their document and chunk counts."""
        with self.db.session() as session:
            rows = session.execute(
                select(
                    KnowledgeBase,
                    func.count(KbDocument.id),
                    func.coalesce(func.sum(KbDocument.chunk_count), 0),
                )
                .outerjoin(KbDocument, KbDocument.kb_id == KnowledgeBase.id)
                .where(KnowledgeBase.project_id == project_id)
                .group_by(KnowledgeBase.id)
                .order_by(KnowledgeBase.name)
            ).all()
            return [
                kb_to_dict(kb, document_count=int(documents), chunk_count=int(chunks))
                for kb, documents, chunks in rows
            ]


__all__ = [
    "IngestReport",
    "KbError",
    "KbSettings",
    "KnowledgeBases",
    "RerankConfig",
    "SearchMode",
    "parse_settings",
]
