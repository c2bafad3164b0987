"""Retrieval quality of dense, BM25 and hybrid search: nDCG@10 on Python's own reference text.

Corpus: the Python Language Reference topics that ship with CPython
(``pydoc_data.topics.topics``, the text ``help("assert")`` shows), one document per topic, its
source the topic name. Topics whose text repeats an earlier one's (``else`` and ``if``) are
dropped the way knowledge-base ingest drops duplicate content, and labels naming them are read
as the topic kept. Queries: ``bench/rag/data/pydoc_queries.jsonl``, natural-language questions
with graded labels (2 = the main answer, 1 = also answers it); see ``data/README.md``.

Everything runs through the product's own code: ``chunk_text`` (recursive, 256 tokens, 32
overlap), the bundled MiniLM embedder, ``VectorIndex`` / ``Bm25Index`` /
``reciprocal_rank_fusion`` (k=60), and the scoring of ``flywheel.rag.evaluate``: each query asks
for as many hits as a document-level evaluation at k=10 does (50, each ranker contributing
``max(50 x CANDIDATES_PER_HIT, MIN_CANDIDATES)`` candidates to fusion), chunks collapse to their
document at its first rank (``ranked_ids``), the list is cut to 10 and scored with
``retrieval_metrics`` (graded nDCG, trec_eval conventions; MRR is therefore MRR@10).

Reported per mode: mean nDCG@10, recall@10, MRR and hit@1, a percentile bootstrap 95% CI for
nDCG@10 and for the paired differences hybrid - dense and hybrid - BM25 (queries resampled,
the same resamples for every figure), nDCG@10 by query kind, and timings (chunking, embedding,
index build, per-query search).

    .venv/bin/python bench/rag/retrieval_quality.py [--queries PATH] [--resamples 1000]
                                                    [--seed 0] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import describe

from flywheel.evals.retrieval import mean_metrics, retrieval_metrics
from flywheel.providers.minilm import embed
from flywheel.rag.chunking import ChunkerConfig, chunk_text
from flywheel.rag.evaluate import DEFAULT_KS, ranked_ids
from flywheel.rag.index import Bm25Index, Hit, VectorIndex, reciprocal_rank_fusion
from flywheel.rag.search import CANDIDATES_PER_HIT, MIN_CANDIDATES

QUERIES = Path(__file__).resolve().parent / "data" / "pydoc_queries.jsonl"
MODES = ("dense", "bm25", "hybrid")
CUTOFF = 10
RRF_K = 60.0
HEADLINE = ("ndcg@10", "recall@10", "mrr", "hit@1")
# Per-query latencies: the query's embedding alone, then each mode end to end.
TIMED = ("query_embedding", *MODES)
# What flywheel.rag.evaluate asks the retriever for at document level: extra hits, because
# several chunks of one document collapse into one entry.
HITS_PER_QUERY = min(CUTOFF * 5, 100)
CANDIDATES = max(HITS_PER_QUERY * CANDIDATES_PER_HIT, MIN_CANDIDATES)


@dataclass(frozen=True)
class Corpus:
    """Documents by source (topic name), and the topics dropped as duplicates -> the kept one."""

    documents: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LabelledQuery:
    """One query with graded relevance: document source -> grade (2 main answer, 1 also)."""

    id: str
    query: str
    kind: str
    relevant: dict[str, int]


@dataclass(frozen=True)
class SearchIndexes:
    """The indexes over a corpus's chunks; chunk id ``i`` belongs to document ``sources[i]``."""

    sources: list[str]
    vectors: VectorIndex
    bm25: Bm25Index
    timings_s: dict[str, float]


def build_corpus(topics: Mapping[str, str] | None = None) -> Corpus:
    """One document per reference topic (default: ``pydoc_data.topics.topics``), by name.

    Topics are taken in name order; one whose text equals an earlier one's is dropped and
    recorded in ``aliases`` (knowledge-base ingest skips duplicate content the same way).
    """
    if topics is None:
        from pydoc_data.topics import topics as pydoc_topics

        topics = pydoc_topics
    documents: dict[str, str] = {}
    first_with_text: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for name in sorted(topics):
        text = topics[name]
        if not text.strip():
            continue
        kept = first_with_text.setdefault(text, name)
        if kept != name:
            aliases[name] = kept
            continue
        documents[name] = text
    return Corpus(documents=documents, aliases=aliases)


def load_queries(
    path: Path = QUERIES, aliases: Mapping[str, str] | None = None
) -> list[LabelledQuery]:
    """The labelled queries in ``path`` (JSON lines), labels mapped through ``aliases``.

    Raises ``ValueError`` for a line without a query, id or labels, a grade outside 1..2, or
    a repeated id.
    """
    aliases = aliases or {}
    queries: list[LabelledQuery] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            query_id, text, labels = row.get("id"), row.get("query"), row.get("relevant")
            if not isinstance(query_id, str) or query_id in seen:
                raise ValueError(f"{path}:{number}: missing or repeated id {query_id!r}")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{number}: no query")
            if not isinstance(labels, dict) or not labels:
                raise ValueError(f"{path}:{number}: no relevance labels")
            relevant: dict[str, int] = {}
            for source, grade in labels.items():
                if not isinstance(grade, int) or not 1 <= grade <= 2:
                    raise ValueError(f"{path}:{number}: grade {grade!r} for {source!r}")
                kept = aliases.get(source, source)
                relevant[kept] = max(relevant.get(kept, 0), grade)
            seen.add(query_id)
            queries.append(
                LabelledQuery(
                    id=query_id, query=text, kind=str(row.get("kind", "")), relevant=relevant
                )
            )
    return queries


def build_indexes(corpus: Corpus, config: ChunkerConfig | None = None) -> SearchIndexes:
    """Chunk, embed and index every document, timing each step."""
    config = config or ChunkerConfig()
    started = time.perf_counter()
    sources: list[str] = []
    texts: list[str] = []
    for source, text in corpus.documents.items():
        for chunk in chunk_text(text, config):
            sources.append(source)
            texts.append(chunk.text)
    chunked = time.perf_counter()
    vectors = embed(texts)
    embedded = time.perf_counter()
    ids = list(range(len(texts)))
    vector_index = VectorIndex.build(ids, vectors)
    bm25_index = Bm25Index.build(ids, texts)
    indexed = time.perf_counter()
    return SearchIndexes(
        sources=sources,
        vectors=vector_index,
        bm25=bm25_index,
        timings_s={
            "chunking": chunked - started,
            "embedding": embedded - chunked,
            "index_build": indexed - embedded,
        },
    )


def rank_documents(
    indexes: SearchIndexes, query: str
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """The top ``CUTOFF`` document sources for each mode, and how long each took (ms).

    The query is embedded once; dense and hybrid are each charged the embedding time, which is
    also reported on its own (``query_embedding``).
    """
    started = time.perf_counter()
    vector = embed([query])[0]
    embedded = time.perf_counter()
    dense = indexes.vectors.search_batch(vector[np.newaxis, :], CANDIDATES)[0]
    searched_dense = time.perf_counter()
    lexical = indexes.bm25.search(query, CANDIDATES)
    searched_bm25 = time.perf_counter()
    fused = reciprocal_rank_fusion([dense, lexical], k=RRF_K)
    fused_at = time.perf_counter()
    rankings: dict[str, list[Hit]] = {"dense": dense, "bm25": lexical, "hybrid": fused}
    documents = {
        mode: ranked_ids(
            [
                {"chunk_id": hit.id, "source": indexes.sources[hit.id]}
                for hit in hits[:HITS_PER_QUERY]
            ],
            "document",
        )[:CUTOFF]
        for mode, hits in rankings.items()
    }
    embed_ms = (embedded - started) * 1000
    dense_ms = (searched_dense - embedded) * 1000
    bm25_ms = (searched_bm25 - searched_dense) * 1000
    fusion_ms = (fused_at - searched_bm25) * 1000
    timings = {
        "query_embedding": embed_ms,
        "dense": embed_ms + dense_ms,
        "bm25": bm25_ms,
        "hybrid": embed_ms + dense_ms + bm25_ms + fusion_ms,
    }
    return documents, timings


def bootstrap_ci(
    values: Sequence[float] | NDArray[np.float64],
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (per-query scores or differences).

    The resampled query indices depend only on ``seed``, ``resamples`` and ``len(values)``, so
    paired differences and per-mode scores bootstrapped with one seed share their resamples.
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("values must be a non-empty 1-D sequence")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, data.size, size=(resamples, data.size))
    means = data[draws].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _latency_summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean_ms": statistics.fmean(ordered),
        "p50_ms": statistics.median(ordered),
        "p95_ms": float(np.percentile(ordered, 95)),
    }


def run_benchmark(
    corpus: Corpus,
    queries: Sequence[LabelledQuery],
    *,
    config: ChunkerConfig | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Index ``corpus``, run every query in every mode and score the rankings.

    Returns means of every metric per mode (``modes``), the nDCG@10 CI per mode (``ci``), the
    paired differences with their CIs (``paired``), nDCG@10 per query kind (``by_kind``),
    timings, and each query's rankings and nDCG@10 (``per_query``). Raises ``ValueError`` when
    a label names a document the corpus lacks.
    """
    if not queries:
        raise ValueError("no queries")
    missing = sorted({s for q in queries for s in q.relevant if s not in corpus.documents})
    if missing:
        raise ValueError(f"labels name documents not in the corpus: {missing}")
    config = config or ChunkerConfig()
    indexes = build_indexes(corpus, config)
    per_mode: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    latency: dict[str, list[float]] = {name: [] for name in TIMED}
    per_query: list[dict[str, Any]] = []
    for query in queries:
        documents, timings = rank_documents(indexes, query.query)
        row: dict[str, Any] = {
            "id": query.id,
            "kind": query.kind,
            "query": query.query,
            "relevant": query.relevant,
        }
        for mode in MODES:
            metrics = retrieval_metrics(documents[mode], query.relevant, DEFAULT_KS)
            per_mode[mode].append(metrics)
            row[mode] = {"retrieved": documents[mode], "ndcg@10": metrics["ndcg@10"]}
        per_query.append(row)
        for name in TIMED:
            latency[name].append(timings[name])

    ndcg = {
        mode: np.array([m["ndcg@10"] for m in per_mode[mode]], dtype=np.float64) for mode in MODES
    }

    def ci(values: NDArray[np.float64]) -> list[float]:
        return list(bootstrap_ci(values, resamples=resamples, seed=seed))

    paired = {}
    for other in ("dense", "bm25"):
        difference = ndcg["hybrid"] - ndcg[other]
        paired[f"hybrid-{other}"] = {
            "mean": float(difference.mean()),
            "ci95": ci(difference),
            "wins": int((difference > 0).sum()),
            "ties": int((difference == 0).sum()),
            "losses": int((difference < 0).sum()),
        }
    kinds = sorted({q.kind for q in queries})
    by_kind = {
        kind: {
            "queries": sum(q.kind == kind for q in queries),
            **{
                mode: float(
                    np.mean([v for v, q in zip(ndcg[mode], queries, strict=True) if q.kind == kind])
                )
                for mode in MODES
            },
        }
        for kind in kinds
    }
    return {
        "corpus": {
            "documents": len(corpus.documents),
            "chunks": len(indexes.sources),
            "characters": sum(len(text) for text in corpus.documents.values()),
            "aliases": corpus.aliases,
        },
        "config": {
            "chunker": config.model_dump(mode="json"),
            "embedder": "builtin:minilm (all-MiniLM-L6-v2)",
            "rrf_k": RRF_K,
            "cutoff": CUTOFF,
            "hits_per_query": HITS_PER_QUERY,
            "candidates_per_ranker": CANDIDATES,
            "resamples": resamples,
            "seed": seed,
        },
        "queries": len(queries),
        "modes": {mode: mean_metrics(per_mode[mode]) for mode in MODES},
        "ci": {mode: {"ndcg@10": ci(ndcg[mode])} for mode in MODES},
        "paired": paired,
        "by_kind": by_kind,
        "timings": {
            "build_s": indexes.timings_s,
            "search": {name: _latency_summary(latency[name]) for name in TIMED},
        },
        "per_query": per_query,
    }


def markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown tables: metrics per mode, paired differences, kinds, timings."""
    lines = [
        f"{results['queries']} queries, {results['corpus']['documents']} documents, "
        f"{results['corpus']['chunks']} chunks",
        "",
        "| mode | nDCG@10 [95% CI] | recall@10 | MRR | hit@1 |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        means = results["modes"][mode]
        low, high = results["ci"][mode]["ndcg@10"]
        lines.append(
            f"| {mode} | {means['ndcg@10']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{means['recall@10']:.3f} | {means['mrr']:.3f} | {means['hit@1']:.3f} |"
        )
    lines += ["", "| paired nDCG@10 difference | mean [95% CI] | wins / ties / losses |"]
    lines.append("|---|---|---|")
    for name, diff in results["paired"].items():
        low, high = diff["ci95"]
        lines.append(
            f"| {name} | {diff['mean']:+.3f} [{low:+.3f}, {high:+.3f}] | "
            f"{diff['wins']} / {diff['ties']} / {diff['losses']} |"
        )
    lines += ["", "| query kind | queries | " + " | ".join(MODES) + " |", "|---|---|---|---|---|"]
    for kind, row in results["by_kind"].items():
        scores = " | ".join(f"{row[mode]:.3f}" for mode in MODES)
        lines.append(f"| {kind} | {row['queries']} | {scores} |")
    build = results["timings"]["build_s"]
    lines += [
        "",
        f"Build: chunking {build['chunking']:.2f} s, embedding {build['embedding']:.2f} s, "
        f"index build {build['index_build']:.2f} s.",
        "",
        "| per-query search | mean ms | p50 ms | p95 ms |",
        "|---|---|---|---|",
    ]
    for name in TIMED:
        t = results["timings"]["search"][name]
        lines.append(f"| {name} | {t['mean_ms']:.2f} | {t['p50_ms']:.2f} | {t['p95_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--queries", type=Path, default=QUERIES)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args()

    corpus = build_corpus()
    queries = load_queries(args.queries, corpus.aliases)
    results = run_benchmark(corpus, queries, resamples=args.resamples, seed=args.seed)
    results["machine"] = describe()
    results["corpus"]["source"] = f"pydoc_data.topics (Python {platform.python_version()})"
    print(markdown(results))
    print()
    print(json.dumps(results["machine"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
