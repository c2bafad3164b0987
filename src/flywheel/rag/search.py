"""Searching a knowledge base: dense (FAISS), BM25, or both fused by reciprocal rank, with
metadata filters and an optional LLM rerank.

Loaded indexes are cached per (knowledge base, index version): a replica that sees a newer
active version loads it from the artifact store on its next search. A version kept in
PostgreSQL (pgvector and full text, ``flywheel.rag.pgvector``) is searched in the database
instead, with nothing loaded: the rankings are fused here the same way.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from flywheel.errors import ServiceError
from flywheel.evals.scorers import extract_json
from flywheel.rag.embedders import Embedder
from flywheel.rag.index import Bm25Index, Hit, VectorIndex, reciprocal_rank_fusion
from flywheel.rag.knowledge import KbError, KbSettings, KnowledgeBases, SearchMode
from flywheel.rag.pgvector import StaleTable, is_pgvector_version
from flywheel.store import KbIndexVersion

log = logging.getLogger("flywheel.rag")
# (project_id, body) -> an OpenAI chat completion through the gateway.
ChatCall = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
# How many candidates each ranker contributes to fusion, per requested hit.
CANDIDATES_PER_HIT = 4
MIN_CANDIDATES = 20
CACHED_INDEXES = 16
# Dense hits, BM25 hits and the rows of the chunks they name.
Rankings = tuple[list[Hit], list[Hit], dict[int, dict[str, Any]]]


@dataclass
class LoadedIndex:
    kb_id: str
    version: int
    embedder: str
    vectors: VectorIndex
    bm25: Bm25Index
    chunks: dict[int, dict[str, Any]]


def matches(filters: dict[str, Any], chunk: dict[str, Any]) -> bool:
    """Whether a chunk's document passes every filter. A filter is ``key: value`` (equal),
    ``key: [values]`` (any of) or, for ``source``, a glob such as ``docs/*.md``. Keys are the
    document's metadata, plus ``source``, ``media_type`` and ``document_id``."""
    fields = {
        **chunk["metadata"],
        "source": chunk["source"],
        "media_type": chunk["media_type"],
        "document_id": chunk["document_id"],
    }
    for key, wanted in filters.items():
        value = fields.get(key)
        options = wanted if isinstance(wanted, list) else [wanted]
        if key == "source" and isinstance(value, str):
            if not any(fnmatch.fnmatchcase(value, str(o)) for o in options):
                return False
        elif value not in options and not (
            isinstance(value, list) and any(v in options for v in value)
        ):
            return False
    return True


def _hit_row(chunk: dict[str, Any], hit: Hit) -> dict[str, Any]:
    return {**chunk, "score": float(hit.score), "rank": hit.rank}


class Retriever:
    """Searches knowledge bases through their active index version."""

    def __init__(self, kbs: KnowledgeBases, chat: ChatCall | None = None) -> None:
        self.kbs = kbs
        self.chat = chat
        self._cache: OrderedDict[tuple[str, int], LoadedIndex] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self, kb_id: str, row: KbIndexVersion | None) -> LoadedIndex | None:
        if row is None:
            return None
        key = (kb_id, row.version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        vectors, bm25 = self.kbs.load_indexes(row)
        loaded = LoadedIndex(
            kb_id, row.version, row.embedder, vectors, bm25, self.kbs.chunk_table(kb_id)
        )
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > CACHED_INDEXES:
                self._cache.popitem(last=False)
        return loaded

    async def search(
        self,
        project_id: str,
        name: str,
        query: str,
        *,
        top_k: int | None = None,
        mode: SearchMode | None = None,
        filters: dict[str, Any] | None = None,
        rrf_k: float | None = None,
        rerank: bool | None = None,
    ) -> dict[str, Any]:
        """Hits for ``query`` with their chunk, document and score. The answer also lists the
        dense and BM25 rankings on their own, so that a caller can compare all three."""
        kb_id, settings, active = await asyncio.to_thread(self.kbs.active_index, project_id, name)
        top_k = top_k or settings.top_k
        mode = mode or settings.mode
        rrf_k = rrf_k if rrf_k is not None else settings.rrf_k
        if not query.strip():
            raise KbError(400, "The query is empty.", "invalid_value", "query")
        depth = max(top_k * CANDIDATES_PER_HIT, MIN_CANDIDATES)
        found: Rankings | None = None
        for attempt in range(2):
            try:
                if active is not None and is_pgvector_version(active.artifacts):
                    found = await self._rank_in_database(
                        project_id, kb_id, active, query, mode, depth, filters
                    )
                else:
                    found = await self._rank_loaded(
                        project_id, kb_id, active, query, mode, depth, filters
                    )
                break
            except StaleTable:
                # A build on another replica replaced the table between our reading the
                # active version and searching it: the new version is committed, so read again.
                if attempt:
                    raise KbError(
                        503, "The index changed during the search; try again.", "unavailable"
                    ) from None
                kb_id, settings, active = await asyncio.to_thread(
                    self.kbs.active_index, project_id, name
                )
        result: dict[str, Any] = {
            "knowledge_base": name,
            "query": query,
            "mode": mode,
            "top_k": top_k,
            "index_version": active.version if active else None,
            "hits": [],
            "dense": [],
            "bm25": [],
        }
        if found is None:
            return result
        dense, lexical, chunks = found
        if mode == "dense":
            ranked = dense
        elif mode == "bm25":
            ranked = lexical
        else:
            ranked = reciprocal_rank_fusion([dense, lexical], k=rrf_k)
        dense_by_id = {h.id: h for h in dense}
        bm25_by_id = {h.id: h for h in lexical}
        hits = []
        for hit in ranked[:top_k]:
            row = _hit_row(chunks[hit.id], hit)
            if hit.id in dense_by_id:
                row["dense_rank"], row["dense_score"] = (
                    dense_by_id[hit.id].rank,
                    float(dense_by_id[hit.id].score),
                )
            if hit.id in bm25_by_id:
                row["bm25_rank"], row["bm25_score"] = (
                    bm25_by_id[hit.id].rank,
                    float(bm25_by_id[hit.id].score),
                )
            hits.append(row)
        if (rerank is None or rerank) and settings.rerank is not None and hits:
            hits = await self._rerank(project_id, settings, query, hits)
        result["hits"] = hits
        result["dense"] = [_hit_row(chunks[h.id], h) for h in dense[:top_k]]
        result["bm25"] = [_hit_row(chunks[h.id], h) for h in lexical[:top_k]]
        return result

    async def _rank_loaded(
        self,
        project_id: str,
        kb_id: str,
        active: KbIndexVersion | None,
        query: str,
        mode: SearchMode,
        depth: int,
        filters: dict[str, Any] | None,
    ) -> Rankings | None:
        """Rankings from the version's FAISS and BM25 indexes (loaded, then cached)."""
        index = await asyncio.to_thread(self._load, kb_id, active)
        if index is None or not index.chunks:
            return None
        allowed = None
        if filters:
            allowed = {cid for cid, chunk in index.chunks.items() if matches(filters, chunk)}
            if not allowed:
                return None
        dense: list[Hit] = []
        lexical: list[Hit] = []
        if mode in ("dense", "hybrid"):
            embedder = Embedder(index.embedder, project_id, self.kbs.remote_embed)
            vector = (await embedder.embed([query]))[0]
            found = await asyncio.to_thread(index.vectors.search, vector, depth, allowed=allowed)
            dense = [h for h in found if isinstance(h, Hit) and h.id in index.chunks]
        if mode in ("bm25", "hybrid"):
            found_bm25 = await asyncio.to_thread(index.bm25.search, query, depth, allowed=allowed)
            lexical = [h for h in found_bm25 if h.id in index.chunks]
        return dense, lexical, index.chunks

    async def _rank_in_database(
        self,
        project_id: str,
        kb_id: str,
        active: KbIndexVersion,
        query: str,
        mode: SearchMode,
        depth: int,
        filters: dict[str, Any] | None,
    ) -> Rankings | None:
        """Rankings from PostgreSQL (pgvector and full text); only the hits' rows are read."""
        pg = self.kbs.pg
        if pg is None:
            raise KbError(
                409,
                f"Index version {active.version} is kept in PostgreSQL, but this server's "
                "store is not PostgreSQL: rebuild the index.",
                "index_unavailable",
            )
        if not active.chunk_count:
            return None
        table = str(active.artifacts["table"])
        documents: list[str] | None = None
        allowed_chunks: int | None = None
        if filters:
            fields = await asyncio.to_thread(self.kbs.document_fields, kb_id)
            chosen = [doc for doc in fields if matches(filters, doc)]
            if not chosen:
                return None
            documents = [doc["document_id"] for doc in chosen]
            allowed_chunks = sum(doc["chunk_count"] for doc in chosen)
        dense: list[Hit] = []
        lexical: list[Hit] = []
        if mode in ("dense", "hybrid"):
            embedder = Embedder(active.embedder, project_id, self.kbs.remote_embed)
            vector = (await embedder.embed([query]))[0]
            dense = await asyncio.to_thread(
                pg.dense,
                table,
                active.version,
                vector,
                depth,
                hnsw=active.vector_kind == "hnsw",
                documents=documents,
                allowed_chunks=allowed_chunks,
                total_chunks=active.chunk_count,
            )
        if mode in ("bm25", "hybrid"):
            lexical = await asyncio.to_thread(
                pg.keyword, table, active.version, query, depth, documents=documents
            )
        wanted = {h.id for h in dense} | {h.id for h in lexical}
        chunks = await asyncio.to_thread(self.kbs.chunk_table, kb_id, wanted) if wanted else {}
        # A chunk deleted since the ranking (its row went with it) is left out, as on FAISS.
        dense = [h for h in dense if h.id in chunks]
        lexical = [h for h in lexical if h.id in chunks]
        return dense, lexical, chunks

    async def _rerank(
        self, project_id: str, settings: KbSettings, query: str, hits: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Ask the rerank model to order the first ``top_n`` passages; an answer that is not a
        usable ordering keeps the retrieval order (and says so)."""
        assert settings.rerank is not None
        if self.chat is None:
            return hits
        head, tail = hits[: settings.rerank.top_n], hits[settings.rerank.top_n :]
        passages = "\n\n".join(f"[{i}] {hit['text'][:1500]}" for i, hit in enumerate(head, start=1))
        body = {
            "model": settings.rerank.model,
            "temperature": 0,
            "max_tokens": 200,
            "messages": [
                {
                    "role": "system",
                    "content": "You rank passages by how well they answer a question. Reply "
                    "with only a JSON list of passage numbers, most relevant first.",
                },
                {"role": "user", "content": f"Question: {query}\n\nPassages:\n{passages}"},
            ],
        }
        try:
            response = await self.chat(project_id, body)
            text = response["choices"][0]["message"]["content"] or ""
            order = extract_json(text)
        except ServiceError as exc:
            log.warning("rerank with %s failed: %s", settings.rerank.model, exc.message)
            order = None
        except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError):
            order = None
        if not isinstance(order, list):
            for hit in head:
                hit["reranked"] = False
            return hits
        seen: list[int] = []
        for number in order:
            if isinstance(number, int) and 1 <= number <= len(head) and number - 1 not in seen:
                seen.append(number - 1)
        seen += [i for i in range(len(head)) if i not in seen]
        reordered = [head[i] for i in seen] + tail
        for rank, hit in enumerate(reordered, start=1):
            hit["retrieval_rank"], hit["rank"] = hit["rank"], rank
            hit["reranked"] = True
        return reordered


__all__ = ["ChatCall", "Retriever", "matches"]
