"""Retrieval evaluation: a knowledge base's rankings against labelled queries.

A labelled query is ``{"query": ..., "relevant": [...]}``. ``relevant`` lists document
sources (``level="document"``, the default: stable across re-chunking) or chunk ids
(``level="chunk"``), or maps them to graded relevance (``{"guide.md": 2, "faq.md": 1}``).
At document level, several chunks of one document count once, at the rank of the first.
Dataset items carry the query in ``variables.query`` (or ``variables.question``, or the last
user message) and the labels in ``metadata.relevant``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from flywheel.evals.retrieval import mean_metrics, retrieval_metrics
from flywheel.rag.knowledge import KbError, SearchMode
from flywheel.rag.search import Retriever
from flywheel.tracing.content import last_user_text

Level = Literal["document", "chunk"]
DEFAULT_KS = (1, 3, 5, 10)
CONCURRENCY = 8


def _object(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def labelled_query(item: Any, position: int) -> dict[str, Any]:
    """``{"query", "relevant"}`` from a plain labelled query or a dataset item; a 400 naming
    the item when either is missing or malformed."""
    where = f"items[{position}]"

    def refuse(problem: str) -> KbError:
        return KbError(400, f"{where}: {problem}", "invalid_value", where)

    if not isinstance(item, Mapping):
        raise refuse("must be an object.")
    variables = _object(item.get("variables"))
    meta = _object(item.get("metadata") or item.get("meta"))
    messages = item.get("messages")
    query = (
        item.get("query")
        or variables.get("query")
        or variables.get("question")
        or (last_user_text(messages) if isinstance(messages, list) else None)
    )
    if not isinstance(query, str) or not query.strip():
        raise refuse("no query (query, variables.query or a user message).")
    relevant = item.get("relevant", meta.get("relevant"))
    if isinstance(relevant, str):
        relevant = [relevant]
    labels: list[str] | dict[str, int]
    if isinstance(relevant, Mapping):
        grades = {str(k): v for k, v in relevant.items()}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in grades.values()):
            raise refuse("relevance grades must be integers.")
        labels = grades
    elif isinstance(relevant, list) and all(isinstance(r, (str, int)) for r in relevant):
        labels = [str(r) for r in relevant]
    else:
        raise refuse(
            "no relevance labels (relevant or metadata.relevant: a list of document sources "
            "or chunk ids, or a map of them to integer grades)."
        )
    return {"query": query, "relevant": labels}


def ranked_ids(hits: Sequence[Mapping[str, Any]], level: Level) -> list[str]:
    """The ids a ranking is judged on: chunk ids, or document sources at their first rank."""
    if level == "chunk":
        return [str(hit["chunk_id"]) for hit in hits]
    seen: dict[str, None] = {}
    for hit in hits:
        seen.setdefault(str(hit["source"]), None)
    return list(seen)


async def evaluate_retrieval(
    retriever: Retriever,
    project_id: str,
    knowledge_base: str,
    items: Sequence[Mapping[str, Any]],
    *,
    modes: Sequence[SearchMode] = ("dense", "bm25", "hybrid"),
    ks: Sequence[int] = DEFAULT_KS,
    level: Level = "document",
    filters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Mean hit@k, recall@k, precision@k, MRR and nDCG@k per search mode, plus each query's
    ranking and metrics. Queries without relevant ids are skipped (their metrics are
    undefined) and counted."""
    if not items:
        raise KbError(400, "No labelled queries to evaluate.", "invalid_value", "items")
    queries = [labelled_query(item, i) for i, item in enumerate(items)]
    ks = sorted({int(k) for k in ks if int(k) > 0}) or list(DEFAULT_KS)
    depth = max(ks)
    gate = asyncio.Semaphore(CONCURRENCY)
    searched_versions: list[int | None] = []

    async def ranking(query: str, mode: SearchMode) -> list[str]:
        async with gate:
            # Chunks of one document collapse at document level: fetch extra to fill k.
            top_k = depth if level == "chunk" else min(depth * 5, 100)
            found = await retriever.search(
                project_id,
                knowledge_base,
                query,
                top_k=top_k,
                mode=mode,
                filters=filters,
                rerank=False,
            )
        searched_versions.append(found["index_version"])
        return ranked_ids(found["hits"], level)[:depth]

    per_query: list[dict[str, Any]] = [
        {"query": q["query"], "relevant": q["relevant"], "modes": {}} for q in queries
    ]
    report: dict[str, Any] = {
        "knowledge_base": knowledge_base,
        "level": level,
        "ks": ks,
        "queries": len(queries),
        "skipped": 0,
        "modes": {},
        "per_query": per_query,
    }
    for mode in modes:
        rankings = await asyncio.gather(*(ranking(q["query"], mode) for q in queries))
        scored = []
        for row, query, ranked in zip(per_query, queries, rankings, strict=True):
            metrics = retrieval_metrics(ranked, query["relevant"], ks) if query["relevant"] else {}
            row["modes"][mode] = {"retrieved": ranked, "metrics": metrics}
            if metrics:
                scored.append(metrics)
        report["modes"][mode] = mean_metrics(scored)
        # Queries with no relevant id (none listed, or all graded 0) have no metrics.
        report["skipped"] = len(queries) - len(scored)
    report["index_version"] = searched_versions[-1] if searched_versions else None
    return report


__all__ = ["DEFAULT_KS", "Level", "evaluate_retrieval", "labelled_query", "ranked_ids"]
