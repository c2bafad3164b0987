"""Knowledge-base search in PostgreSQL (pgvector + full text) against FAISS + bm25s.

Both backends run through ``flywheel.rag.knowledge.KnowledgeBases`` on the same PostgreSQL 16
server (the ``pgserver`` wheel's binaries, started on loopback by ``tests/pg.py`` and removed
afterwards): one knowledge base with ``pgvector=False`` (FAISS and bm25s artifacts in a local
artifact folder) and one with pgvector. ``--n`` chunks of synthetic text (words drawn per
topic, so keyword queries have something to find) with clustered unit vectors (384
dimensions, as ``vector_search.py``) are written as already embedded, so the figures leave the
embedding model out; it costs the same on both paths.

* **Index build** (chunks/s): ``KnowledgeBases`` building an index version over all chunks:
  on FAISS reading the embeddings, building the vector and BM25 indexes and writing them to
  the artifact store; on pgvector copying the embeddings into the vector table with their
  ``to_tsvector`` and, above ``hnsw_threshold``, building the HNSW index. Measured twice:
  below the threshold (exact search) and above it (HNSW).
* **Incremental build**: the same after adding 1% more chunks (FAISS rebuilds everything;
  pgvector inserts the new rows).
* **Query latency** (p50 / p95 ms, one query at a time, ``--queries`` queries): dense exact,
  dense HNSW (with recall@10 against brute force), keywords, each at the backend (FAISS index
  in memory vs one SQL query), and what a replica's first search of a version costs more
  (FAISS loads the artifacts, pgvector nothing). Keyword queries come in two sets: three topic
  words (each in ~2% of chunks) and the first three words of a chunk, mostly common words
  found in almost every chunk: PostgreSQL ranks every matching row, so the second set is its
  worst case.

    python bench/rag/pgvector_search.py [--n 5000] [--queries 200] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.pg
from _machine import describe

from flywheel.rag.embedders import LOCAL_EMBEDDER
from flywheel.rag.index import Hit
from flywheel.rag.knowledge import KnowledgeBases
from flywheel.security.audit import AuditLog
from flywheel.store import DEFAULT_PROJECT_ID, Database, KbChunk, KbDocument
from flywheel.store.artifacts import ArtifactStore
from tests.pg import PostgresServer, pgserver_bindir

DIM = 384
K = 10
CHUNKS_PER_DOCUMENT = 10
TOPICS = 50
WORDS_PER_TOPIC = 40
WORDS_PER_CHUNK = 60


def _vectors(count: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((count, DIM), dtype=np.float32) / np.float32(np.sqrt(DIM))
    noise += centres[rng.integers(0, len(centres), count)]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return noise


def _texts(count: int, seed: int) -> list[str]:
    """Chunks of words from one topic's vocabulary plus common words."""
    rng = np.random.default_rng(seed)
    common = ["the", "a", "of", "and", "system", "report", "team", "data", "value", "process"]
    out = []
    for _ in range(count):
        topic = int(rng.integers(0, TOPICS))
        vocab = [f"t{topic}w{i}" for i in range(WORDS_PER_TOPIC)]
        words = [
            vocab[int(rng.integers(0, len(vocab)))]
            if rng.random() < 0.5
            else common[int(rng.integers(0, len(common)))]
            for _ in range(WORDS_PER_CHUNK)
        ]
        out.append(" ".join(words))
    return out


def _fill(db: Database, kb_id: str, texts: list[str], vectors: np.ndarray, start: int) -> None:
    """Write documents and already-embedded chunks straight into the store."""
    now = time.time()
    with db.session() as session:
        for offset in range(0, len(texts), CHUNKS_PER_DOCUMENT):
            doc_id = uuid.uuid4().hex
            part = texts[offset : offset + CHUNKS_PER_DOCUMENT]
            session.add(
                KbDocument(
                    id=doc_id,
                    kb_id=kb_id,
                    source=f"doc-{start + offset:07d}.txt",
                    content_hash=uuid.uuid4().hex,
                    version=1,
                    media_type="text/plain",
                    meta={},
                    text="\n".join(part),
                    chars=sum(len(t) for t in part),
                    chunk_count=len(part),
                    created_at=now,
                    updated_at=now,
                    updated_by="bench",
                )
            )
            session.flush()
            session.add_all(
                KbChunk(
                    kb_id=kb_id,
                    document_id=doc_id,
                    position=i,
                    start=0,
                    end=len(text),
                    text=text,
                    headings=[],
                    tokens=WORDS_PER_CHUNK,
                    embedder=LOCAL_EMBEDDER,
                    embedding=vectors[offset + i].astype("<f4").tobytes(),
                )
                for i, text in enumerate(part)
            )


def _latency(run: Callable[[int], Any], count: int) -> dict[str, float]:
    for i in range(min(5, count)):
        run(i)  # warm caches and connections
    timings = []
    for i in range(count):
        started = time.perf_counter()
        run(i)
        timings.append(1000 * (time.perf_counter() - started))
    timings.sort()
    return {
        "p50": round(statistics.median(timings), 2),
        "p95": round(timings[int(0.95 * (len(timings) - 1))], 2),
    }


async def _build(kbs: KnowledgeBases, name: str) -> tuple[int, float]:
    started = time.perf_counter()
    version = await kbs._build_index(DEFAULT_PROJECT_ID, name, "bench", None)
    return int(version or 0), time.perf_counter() - started


def _measure(
    label: str,
    kbs: KnowledgeBases,
    query_vectors: np.ndarray,
    keyword_queries: dict[str, list[str]],
) -> dict[str, Any]:
    """Query latency and HNSW recall of one backend's two knowledge bases."""
    queries = len(query_vectors)
    _, _, exact_row = kbs.active_index(DEFAULT_PROJECT_ID, f"{label}-exact")
    _, _, hnsw_row = kbs.active_index(DEFAULT_PROJECT_ID, f"{label}-hnsw")
    assert exact_row is not None and hnsw_row is not None
    row: dict[str, Any] = {}
    dense_exact: Callable[[int], list[Hit]]
    dense_hnsw: Callable[[int], list[Hit]]
    keyword: Callable[[int, str], list[Hit]]
    if label == "faiss":
        # What a replica does on its first search of a version: read both artifacts.
        started = time.perf_counter()
        exact_vectors, bm25 = kbs.load_indexes(exact_row)
        hnsw_vectors, _ = kbs.load_indexes(hnsw_row)
        row["replica_load_s"] = round((time.perf_counter() - started) / 2, 3)

        def dense_exact(i: int) -> list[Hit]:
            return exact_vectors.search_batch(query_vectors[i : i + 1], K)[0]

        def dense_hnsw(i: int) -> list[Hit]:
            return hnsw_vectors.search_batch(query_vectors[i : i + 1], K)[0]

        def keyword(i: int, kind: str) -> list[Hit]:
            return bm25.search(keyword_queries[kind][i], K)

    else:
        store = kbs.pg
        assert store is not None
        row["replica_load_s"] = 0.0
        exact_table = str(exact_row.artifacts["table"])
        hnsw_table = str(hnsw_row.artifacts["table"])
        ev, hv, total = exact_row.version, hnsw_row.version, hnsw_row.chunk_count

        def dense_exact(i: int) -> list[Hit]:
            return store.dense(exact_table, ev, query_vectors[i], K, hnsw=False)

        def dense_hnsw(i: int) -> list[Hit]:
            return store.dense(hnsw_table, hv, query_vectors[i], K, hnsw=True, total_chunks=total)

        def keyword(i: int, kind: str) -> list[Hit]:
            return store.keyword(exact_table, ev, keyword_queries[kind][i], K)

    # Recall against brute force over the HNSW knowledge base's stored embeddings.
    kb_id = kbs.active_index(DEFAULT_PROJECT_ID, f"{label}-hnsw")[0]
    ids, stored, _ = kbs._index_inputs(kb_id, LOCAL_EMBEDDER)
    best = np.argsort(-(query_vectors @ stored.T), axis=1)[:, :K]
    truth = [set(ids[row_best].tolist()) for row_best in best]
    found = [{h.id for h in dense_hnsw(i)} for i in range(queries)]
    row["recall_at_10_hnsw"] = round(
        statistics.fmean(len(f & t) / K for f, t in zip(found, truth, strict=True)), 3
    )
    row["dense_exact_ms"] = _latency(dense_exact, queries)
    row["dense_hnsw_ms"] = _latency(dense_hnsw, queries)
    for kind in keyword_queries:
        row[f"keyword_{kind}_ms"] = _latency(lambda i, kind=kind: keyword(i, kind), queries)
    return row


def run(n: int, queries: int) -> dict[str, Any]:
    bindir = pgserver_bindir()
    if bindir is None:
        raise SystemExit("pgserver is not installed: pip install pgserver==0.1.4")
    pg = PostgresServer.start(bindir=bindir)
    results: dict[str, Any] = {"machine": describe(), "n": n, "dim": DIM, "queries": queries}
    try:
        db = Database(pg.create_database("bench"))
        db.migrate()
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((max(n // 1000, 1) * 5, DIM), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        vectors = _vectors(n, 1, centres)
        texts = _texts(n, 2)
        extra = max(n // 100, CHUNKS_PER_DOCUMENT)
        more_vectors, more_texts = _vectors(extra, 3, centres), _texts(extra, 4)
        query_vectors = _vectors(queries, 5, centres)
        qrng = np.random.default_rng(6)
        picked = [texts[int(qrng.integers(0, n))].split() for _ in range(queries)]
        # Topic words (each in ~2% of chunks), and the first three words of a chunk, which
        # mostly include common words found in almost every chunk: the worst case for a
        # ranking that scores every match.
        keyword_queries = {
            "rare": [" ".join([w for w in words if w.startswith("t")][:3]) for words in picked],
            "common": [" ".join(words[:3]) for words in picked],
        }
        with tempfile.TemporaryDirectory() as folder:
            audit = AuditLog(db)
            faiss_kbs = KnowledgeBases(db, audit, ArtifactStore(folder), pgvector=False)
            pg_kbs = KnowledgeBases(db, audit, ArtifactStore(folder), pgvector=True)
            rows: dict[str, dict[str, Any]] = {}
            for label, kbs in (("faiss", faiss_kbs), ("pgvector", pg_kbs)):
                row: dict[str, Any] = {}
                for kind, threshold in (("exact", n * 10), ("hnsw", 1)):
                    name = f"{label}-{kind}"
                    kb = kbs.create(
                        DEFAULT_PROJECT_ID,
                        name,
                        actor="bench",
                        settings={"hnsw_threshold": threshold},
                    )
                    _fill(db, kb["id"], texts, vectors, 0)
                    _, seconds = asyncio.run(_build(kbs, name))
                    row[f"build_{kind}_chunks_per_s"] = round(n / seconds)
                    row[f"build_{kind}_s"] = round(seconds, 2)
                    if kind == "hnsw":
                        _fill(db, kb["id"], more_texts, more_vectors, n)
                        _, seconds = asyncio.run(_build(kbs, name))
                        row["add_1pct_s"] = round(seconds, 2)
                rows[label] = row

            # Query latency at the backend: FAISS indexes in memory, one SQL query each.
            for label, kbs in (("faiss", faiss_kbs), ("pgvector", pg_kbs)):
                rows[label].update(_measure(label, kbs, query_vectors, keyword_queries))
            results["backends"] = rows
        db.dispose()
    finally:
        pg.stop()
    return results


def _table(results: dict[str, Any]) -> str:
    header = [
        "backend",
        "build exact (chunks/s)",
        "build HNSW (chunks/s)",
        "add 1% (s)",
        "replica load (s)",
        "dense exact p50/p95 ms",
        "dense HNSW p50/p95 ms",
        "HNSW recall@10",
        "keywords, topic words p50/p95 ms",
        "keywords, common words p50/p95 ms",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for label, row in results["backends"].items():
        cells = [
            label,
            row["build_exact_chunks_per_s"],
            row["build_hnsw_chunks_per_s"],
            row["add_1pct_s"],
            row["replica_load_s"],
            f"{row['dense_exact_ms']['p50']} / {row['dense_exact_ms']['p95']}",
            f"{row['dense_hnsw_ms']['p50']} / {row['dense_hnsw_ms']['p95']}",
            row["recall_at_10_hnsw"],
            f"{row['keyword_rare_ms']['p50']} / {row['keyword_rare_ms']['p95']}",
            f"{row['keyword_common_ms']['p50']} / {row['keyword_common_ms']['p95']}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="chunks per knowledge base")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args()
    results = run(args.n, args.queries)
    print(_table(results))
    print(json.dumps(results["machine"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
