"""Knowledge-base search inside PostgreSQL: pgvector for dense vectors, full-text for keywords.

When the store is PostgreSQL and the ``vector`` extension can be created, an index version is
not a pair of files in the artifact store but rows in one table per (knowledge base,
embedder)::

    kb_vectors_<kb id>_<embedder digest> (
        chunk_id    bigint PRIMARY KEY REFERENCES kb_chunks (id) ON DELETE CASCADE,
        document_id varchar(32),      -- metadata filters select documents
        version     integer,          -- the index version whose build added the row
        embedding   vector(d),        -- HNSW (cosine) once the table reaches hnsw_threshold
        tsv         tsvector          -- to_tsvector('english', text), GIN
    )

Why a table per (knowledge base, embedder): a ``vector`` column has one dimension, and
embedders differ; and pgvector (0.6) applies a WHERE clause *after* the HNSW scan has picked
its ``ef_search`` candidates, so one shared table filtered by knowledge base would return too
few hits for a small knowledge base next to a big one. In its own table every HNSW graph holds
exactly the vectors a search may return, and dropping a knowledge base or an old embedder is a
``DROP TABLE``.

An index version is then a filter rather than a file: the embedder picks the table, rows whose
chunk is deleted (a document removed or re-chunked) go with it by the foreign key, and a search
reads only rows with ``version <= `` the active version, so rows that a build in progress has
added stay invisible until its version row commits (rows and version row commit together).

Keywords: ``to_tsvector('english', text)``, the closest built-in match to the bm25s tokeniser
(lower case, English stop words removed, English stemming as bm25s does with PyStemmer).
Postgres ranks without IDF, so dropping stop words matters more here than for BM25: with the
``simple`` configuration "the" and "my" would weigh as much as the words that matter. Query
terms are OR-ed (BM25 scores any matching term), ranked by ``ts_rank_cd`` normalised by
document length (flag 1: divide by 1 + log(length)).

All PostgreSQL-specific SQL of the knowledge-base code lives in this module. Its SQL strings
name tables through ``table_name`` (hex ids and a digest, never user text; the ``noqa: S608``
marks) and bind every value.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from flywheel.rag.index import FILTER_EXACT_LIMIT, Hit, ranked_hits
from flywheel.store import Database

__all__ = ["BACKEND", "TEXT_SEARCH_CONFIG", "PgVectorStore", "StaleTable", "is_pgvector_version"]

log = logging.getLogger("flywheel.rag")

#: ``KbIndexVersion.artifacts["backend"]`` of a version kept in PostgreSQL.
BACKEND: Final = "pgvector"
TEXT_SEARCH_CONFIG: Final = "english"
TABLE_PREFIX: Final = "kb_vectors_"
# The HNSW settings of the FAISS path (flywheel.rag.index.VectorIndex.build).
HNSW_M: Final = 32
HNSW_EF_CONSTRUCTION: Final = 80
EF_SEARCH: Final = 128
#: pgvector refuses a larger hnsw.ef_search.
MAX_EF_SEARCH: Final = 1000
_MAX_FILTER_EF_BOOST: Final = 16
_INSERT_BATCH: Final = 500
_KB_ID = re.compile(r"^[0-9a-f]{1,40}$")
# SQLSTATE undefined_table: a build on another replica dropped the table a search was using.
_UNDEFINED_TABLE: Final = "42P01"


class StaleTable(Exception):
    """The table of the version a search read is gone (a newer version replaced it)."""


def is_pgvector_version(artifacts: Any) -> bool:
    """Whether an index version's ``artifacts`` say it lives in PostgreSQL."""
    return isinstance(artifacts, dict) and artifacts.get("backend") == BACKEND


def table_name(kb_id: str, embedder: str) -> str:
    """The table holding ``kb_id``'s chunks as embedded by ``embedder``."""
    if not _KB_ID.match(kb_id):
        # Knowledge-base ids are uuid4 hex; anything else must not reach an identifier.
        raise ValueError(f"unexpected knowledge base id {kb_id!r}")
    digest = hashlib.sha256(embedder.encode()).hexdigest()[:12]
    return f"{TABLE_PREFIX}{kb_id}_{digest}"


def _vector_literal(vector: npt.ArrayLike) -> str:
    """pgvector's text form, ``[x,y,...]``; float32 values print exactly as float64 reprs."""
    values = np.asarray(vector, dtype=np.float32).astype(np.float64)
    if not bool(np.isfinite(values).all()):
        raise ValueError("vectors must be finite")
    return "[" + ",".join(map(repr, values.tolist())) + "]"


def _undefined_table(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == _UNDEFINED_TABLE


class PgVectorStore:
    """The knowledge bases' tables in one PostgreSQL database (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._available: bool | None = None
        self._probe_lock = threading.Lock()

    # -- availability -------------------------------------------------------------------------

    def available(self) -> bool:
        """Whether the ``vector`` extension is installed or can be created here (checked once
        per process; a failure is logged and the knowledge bases use FAISS and bm25s)."""
        with self._probe_lock:
            if self._available is None:
                self._available = self._probe()
            return self._available

    def _probe(self) -> bool:
        try:
            with self.db.session() as session:
                installed = session.scalar(
                    text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                )
                if installed is not None:
                    return True
                offered = session.scalar(
                    text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")
                )
                if offered is None:
                    log.info("pgvector is not installed on this PostgreSQL server: RAG uses FAISS")
                    return False
                session.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
            return True
        except DBAPIError as exc:
            log.warning("cannot create the pgvector extension (%s): RAG uses FAISS", exc.orig)
            return False

    # -- writing --------------------------------------------------------------------------------

    def sync(
        self,
        session: Session,
        kb_id: str,
        embedder: str,
        version: int,
        hnsw_threshold: int,
    ) -> tuple[str, int, int, str]:
        """Bring the (knowledge base, embedder) table up to date with ``kb_chunks`` inside
        ``session``'s transaction, so that it commits with the version row.

        Adds a row (tagged ``version``) for every chunk embedded by ``embedder`` that the table
        lacks, builds the HNSW index once the table holds ``hnsw_threshold`` rows, and drops the
        knowledge base's tables of other embedders. Returns the table name, the number of rows,
        the dimension (0 while empty) and the search kind (``exact`` or ``hnsw``)."""
        table = table_name(kb_id, embedder)
        exists = self._table_exists(session, table)
        missing = (
            "SELECT c.id, c.document_id, c.embedding FROM kb_chunks c "
            "WHERE c.kb_id = :kb AND c.embedder = :embedder"
        )
        if exists:
            missing += f' AND NOT EXISTS (SELECT 1 FROM "{table}" v WHERE v.chunk_id = c.id)'  # noqa: S608
        pending = session.execute(
            text(missing + " ORDER BY c.id"), {"kb": kb_id, "embedder": embedder}
        ).all()
        dim = self._dimension(session, table) if exists else 0
        if pending and not dim:
            dim = len(pending[0][2] or b"") // 4
        if pending and not exists:
            self._create(session, table, dim)
            exists = True
        for start in range(0, len(pending), _INSERT_BATCH):
            rows = []
            for chunk_id, document_id, blob in pending[start : start + _INSERT_BATCH]:
                vector = np.frombuffer(blob or b"", dtype="<f4")
                if vector.size != dim:
                    raise ValueError(f"chunk {chunk_id} has {vector.size} dimensions, not {dim}")
                rows.append(
                    {
                        "id": chunk_id,
                        "doc": document_id,
                        "version": version,
                        "embedding": _vector_literal(vector),
                    }
                )
            # One INSERT ... SELECT per row, sent as a batch: the text comes from kb_chunks in
            # the database rather than travelling back and forth.
            session.execute(
                text(
                    f'INSERT INTO "{table}" (chunk_id, document_id, version, embedding, tsv) '  # noqa: S608
                    f"SELECT c.id, :doc, :version, CAST(:embedding AS vector), "
                    f"to_tsvector('{TEXT_SEARCH_CONFIG}', c.text) FROM kb_chunks c WHERE c.id = :id"
                ),
                rows,
            )
        count = 0
        if exists:
            count = int(session.scalar(text(f'SELECT count(*) FROM "{table}"')) or 0)  # noqa: S608
        kind = "hnsw" if count >= hnsw_threshold else "exact"
        if kind == "hnsw":
            # Built once, over the rows already there (faster than growing it row by row);
            # later rows are added to it as they are inserted. The graph builds much faster
            # when it fits in maintenance_work_mem (64 MB by default; this transaction only).
            session.execute(text("SELECT set_config('maintenance_work_mem', '256MB', true)"))
            session.execute(
                text(
                    f'CREATE INDEX IF NOT EXISTS "{table}_hnsw" ON "{table}" '
                    f"USING hnsw (embedding vector_cosine_ops) "
                    f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
                )
            )
        for other in self.tables(session, kb_id):
            if other != table:
                session.execute(text(f'DROP TABLE IF EXISTS "{other}"'))
        return table, count, dim, kind

    @staticmethod
    def _table_exists(session: Session, table: str) -> bool:
        return (
            session.scalar(text("SELECT to_regclass(:name) IS NOT NULL"), {"name": table}) is True
        )

    @staticmethod
    def _dimension(session: Session, table: str) -> int:
        # A vector(d) column stores d as its type modifier.
        found = session.scalar(
            text(
                "SELECT atttypmod FROM pg_attribute "
                "WHERE attrelid = to_regclass(:name) AND attname = 'embedding'"
            ),
            {"name": table},
        )
        return max(int(found or 0), 0)

    @staticmethod
    def _create(session: Session, table: str, dim: int) -> None:
        if dim < 1:
            raise ValueError("cannot create a vector table without a dimension")
        session.execute(
            text(
                f'CREATE TABLE IF NOT EXISTS "{table}" ('
                "chunk_id bigint PRIMARY KEY REFERENCES kb_chunks (id) ON DELETE CASCADE, "
                "document_id varchar(32) NOT NULL, "
                "version integer NOT NULL, "
                f"embedding vector({int(dim)}) NOT NULL, "
                "tsv tsvector NOT NULL)"
            )
        )
        session.execute(
            text(f'CREATE INDEX IF NOT EXISTS "{table}_tsv" ON "{table}" USING gin (tsv)')
        )
        session.execute(
            text(f'CREATE INDEX IF NOT EXISTS "{table}_doc" ON "{table}" (document_id)')
        )

    def tables(self, session: Session, kb_id: str) -> list[str]:
        """The knowledge base's vector tables (one per embedder it has used)."""
        prefix = table_name(kb_id, "")[: len(TABLE_PREFIX) + len(kb_id) + 1]
        return list(
            session.scalars(
                text(
                    "SELECT tablename FROM pg_tables "
                    "WHERE schemaname = current_schema() AND starts_with(tablename, :prefix)"
                ),
                {"prefix": prefix},
            )
        )

    def drop(self, session: Session, kb_id: str) -> None:
        """Drop the knowledge base's tables (before its chunks go: no cascade row by row)."""
        for table in self.tables(session, kb_id):
            session.execute(text(f'DROP TABLE IF EXISTS "{table}"'))

    # -- searching ------------------------------------------------------------------------------

    def dense(
        self,
        table: str,
        version: int,
        vector: npt.ArrayLike,
        k: int,
        *,
        hnsw: bool,
        documents: Sequence[str] | None = None,
        allowed_chunks: int | None = None,
        total_chunks: int = 0,
    ) -> list[Hit]:
        """Top ``k`` chunks by cosine similarity (the score), best first.

        Exact (a sequential scan) when the version is ``exact``, or when a ``documents`` filter
        leaves at most ``FILTER_EXACT_LIMIT`` chunks; otherwise the HNSW index with
        ``hnsw.ef_search`` raised like the FAISS path's (x size / allowed, up to 16), and an
        exact scan when the filtered HNSW walk comes back short (pgvector filters after the
        walk)."""
        if k <= 0 or (documents is not None and not documents):
            return []
        literal = _vector_literal(vector)
        filtered = documents is not None
        exact = not hnsw or (
            filtered and allowed_chunks is not None and allowed_chunks <= FILTER_EXACT_LIMIT
        )
        where = "v.version <= :version" + (" AND v.document_id = ANY(:docs)" if filtered else "")
        params: dict[str, Any] = {"q": literal, "version": version, "k": k}
        if filtered:
            params["docs"] = list(documents or [])
        score = "1 - (v.embedding <=> CAST(:q AS vector))"
        # The exact query orders by an expression the HNSW index cannot serve, so PostgreSQL
        # scans every row; the HNSW query orders by the distance operator itself.
        exact_sql = (
            f'SELECT v.chunk_id, {score} AS score FROM "{table}" v WHERE {where} '  # noqa: S608
            "ORDER BY score DESC, v.chunk_id LIMIT :k"
        )
        hnsw_sql = (
            f'SELECT v.chunk_id, {score} AS score FROM "{table}" v WHERE {where} '  # noqa: S608
            "ORDER BY v.embedding <=> CAST(:q AS vector) LIMIT :k"
        )
        with self._reading() as session:
            if exact:
                rows = session.execute(text(exact_sql), params).all()
            else:
                boost = 1
                if filtered and allowed_chunks:
                    boost = min(math.ceil(total_chunks / allowed_chunks), _MAX_FILTER_EF_BOOST)
                ef = min(max(EF_SEARCH, k) * max(boost, 1), MAX_EF_SEARCH)
                session.execute(
                    text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": str(ef)}
                )
                rows = session.execute(text(hnsw_sql), params).all()
                want = min(k, allowed_chunks if allowed_chunks is not None else total_chunks)
                if len(rows) < want:
                    rows = session.execute(text(exact_sql), params).all()
        return ranked_hits([(float(s), int(i)) for i, s in rows])

    def keyword(
        self,
        table: str,
        version: int,
        query: str,
        k: int,
        *,
        documents: Sequence[str] | None = None,
    ) -> list[Hit]:
        """Top ``k`` chunks by ``ts_rank_cd`` over the OR of the query's lexemes."""
        if k <= 0 or (documents is not None and not documents):
            return []
        where = "v.tsv @@ q.query AND v.version <= :version"
        params: dict[str, Any] = {"text": query, "version": version, "k": k}
        if documents is not None:
            where += " AND v.document_id = ANY(:docs)"
            params["docs"] = list(documents)
        # plainto_tsquery AND-s the lexemes; BM25 scores any of them, so make it an OR. A
        # lexeme never holds a space, so ' & ' only ever matches the operator.
        sql = (
            f"SELECT v.chunk_id, ts_rank_cd(v.tsv, q.query, 1) AS score "  # noqa: S608
            f'FROM "{table}" v, (SELECT CAST(replace(CAST(plainto_tsquery('
            f"'{TEXT_SEARCH_CONFIG}', :text) AS text), ' & ', ' | ') AS tsquery) AS query) q "
            f"WHERE {where} ORDER BY score DESC, v.chunk_id LIMIT :k"
        )
        with self._reading() as session:
            rows = session.execute(text(sql), params).all()
        return ranked_hits([(float(s), int(i)) for i, s in rows if float(s) > 0])

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        """A read transaction that turns "the table is gone" into ``StaleTable``."""
        try:
            with self.db.session() as session:
                yield session
        except DBAPIError as exc:
            if _undefined_table(exc):
                raise StaleTable(str(exc.orig)) from exc
            raise
