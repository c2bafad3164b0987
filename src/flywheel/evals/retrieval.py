"""Retrieval metrics for one query, and their means over a query set.

Each per-query function takes ``retrieved`` (document ids, best first) and ``relevant``: either
a collection of relevant ids (binary relevance) or a mapping ``id -> grade`` (graded relevance).
The numbers match trec_eval (checked against ``pytrec_eval`` in the tests): ``hit@k`` is its
``success_k``, ``recall@k`` ``recall_k``, ``precision@k`` ``P_k``, ``mrr`` ``recip_rank`` and
``ndcg@k`` ``ndcg_cut_k``.

Conventions:

* **Relevance.** A grade ``> 0`` is relevant; a grade ``<= 0`` is judged non-relevant, exactly
  like an id missing from ``relevant``. A plain collection gives every id in it grade 1.
* **Duplicates in** ``retrieved`` count once, at their first (best) rank, and are removed
  *before* cutting to ``k``: ``k`` counts distinct ids, so a repeat neither scores twice nor
  takes a slot. (trec_eval reads a run as ``{id: score}``, which collapses repeats the same way.)
* **Cutoffs.** ``k`` must be ``>= 1``; ``k`` larger than the list simply takes the whole list.
  ``precision@k`` always divides by ``k`` (the TREC convention), even when fewer than ``k`` ids
  were retrieved.
* **nDCG.** Gain is the grade itself (linear, as trec_eval's ``ndcg_cut``), discount
  ``log2(rank + 1)``; the ideal DCG comes from the relevance judgments (all relevant grades,
  best first, cut at ``k``), not from what was retrieved.
* **Empty** ``retrieved``: every metric is 0.
* **No relevant documents** (``relevant`` empty or all grades ``<= 0``): every metric is
  undefined. Per-query functions raise ``ValueError``; :func:`retrieval_metrics` returns
  ``{}``; :func:`mean_metrics` skips such queries, so they don't drag the means to 0.
* Passing a single ``str`` as ``retrieved`` or ``relevant`` is a ``TypeError`` (it would
  otherwise be read as a collection of one-character ids).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

__all__ = [
    "hit_at_k",
    "mean_metrics",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "reciprocal_rank",
    "retrieval_metrics",
]

Relevance = Collection[str] | Mapping[str, int]


def hit_at_k(retrieved: Sequence[str], relevant: Relevance, k: int) -> float:
    """1.0 when a relevant id is among the first ``k`` distinct retrieved ids, else 0.0."""
    top, grades = _top_k(retrieved, k), _grades(relevant)
    return 1.0 if any(doc in grades for doc in top) else 0.0


def recall_at_k(retrieved: Sequence[str], relevant: Relevance, k: int) -> float:
    """The share of the relevant ids found among the first ``k`` distinct retrieved ids."""
    top, grades = _top_k(retrieved, k), _grades(relevant)
    return _hits(top, grades) / len(grades)


def precision_at_k(retrieved: Sequence[str], relevant: Relevance, k: int) -> float:
    """Relevant ids among the first ``k`` distinct retrieved ids, divided by ``k`` (always ``k``,
    even when fewer were retrieved: the TREC ``P_k`` convention)."""
    top, grades = _top_k(retrieved, k), _grades(relevant)
    return _hits(top, grades) / k


def reciprocal_rank(retrieved: Sequence[str], relevant: Relevance, k: int | None = None) -> float:
    """``1 / rank`` of the first relevant id (ranks over distinct ids, from 1); 0.0 when none is
    retrieved, or none within the first ``k`` when ``k`` is given. Its mean is the MRR."""
    ranking = _ranking(retrieved) if k is None else _top_k(retrieved, k)
    return _reciprocal_rank(ranking, _grades(relevant))


def ndcg_at_k(retrieved: Sequence[str], relevant: Relevance, k: int) -> float:
    """Normalised DCG of the first ``k`` distinct retrieved ids, with gain = grade (1 for binary
    relevance) and the ideal DCG taken from the relevance judgments."""
    top, grades = _top_k(retrieved, k), _grades(relevant)
    return _ndcg(top, grades, k)


def retrieval_metrics(
    retrieved: Sequence[str], relevant: Relevance, ks: Sequence[int] = (1, 3, 5, 10)
) -> dict[str, float]:
    """Every metric for one query: ``hit@k``, ``recall@k``, ``precision@k``, ``ndcg@k`` for each
    ``k`` in ``ks``, and ``mrr`` (the reciprocal rank over the whole list, no cutoff).

    A query with no relevant documents gives ``{}`` (see :func:`mean_metrics`).
    """
    for k in ks:
        _check_k(k)
    ranking = _ranking(retrieved)
    grades = _positive_grades(relevant)
    if not grades:
        return {}
    hits = {k: _hits(ranking[:k], grades) for k in ks}
    metrics = {f"hit@{k}": 1.0 if hits[k] else 0.0 for k in ks}
    metrics |= {f"recall@{k}": hits[k] / len(grades) for k in ks}
    metrics |= {f"precision@{k}": hits[k] / k for k in ks}
    metrics["mrr"] = _reciprocal_rank(ranking, grades)
    metrics |= {f"ndcg@{k}": _ndcg(ranking[:k], grades, k) for k in ks}
    return metrics


def mean_metrics(per_query: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric over the queries, e.g. over :func:`retrieval_metrics` results.

    Empty entries (queries with no relevant documents) are skipped; all the others must report
    the same metric names (``ValueError`` otherwise). No scored queries gives ``{}``.
    """
    scored = [metrics for metrics in per_query if metrics]
    if not scored:
        return {}
    names = list(scored[0])
    expected = set(names)
    for index, metrics in enumerate(scored):
        if set(metrics) != expected:
            raise ValueError(
                f"query {index} (of the non-empty ones) reports {sorted(metrics)}, "
                f"expected {sorted(expected)}"
            )
    return {name: math.fsum(metrics[name] for metrics in scored) / len(scored) for name in names}


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _ranking(retrieved: Sequence[str]) -> list[str]:
    """Distinct ids in order of first appearance."""
    if isinstance(retrieved, str):
        raise TypeError("retrieved must be a sequence of ids, not a single str")
    return list(dict.fromkeys(retrieved))


def _top_k(retrieved: Sequence[str], k: int) -> list[str]:
    _check_k(k)
    return _ranking(retrieved)[:k]


def _positive_grades(relevant: Relevance) -> dict[str, float]:
    if isinstance(relevant, str):
        raise TypeError("relevant must be a collection or mapping of ids, not a single str")
    if isinstance(relevant, Mapping):
        return {doc: float(grade) for doc, grade in relevant.items() if grade > 0}
    return dict.fromkeys(relevant, 1.0)


def _grades(relevant: Relevance) -> dict[str, float]:
    grades = _positive_grades(relevant)
    if not grades:
        raise ValueError("no relevant documents: the metric is undefined for this query")
    return grades


def _hits(ranking: Iterable[str], grades: Mapping[str, float]) -> int:
    return sum(1 for doc in ranking if doc in grades)


def _reciprocal_rank(ranking: Sequence[str], grades: Mapping[str, float]) -> float:
    for rank, doc in enumerate(ranking, start=1):
        if doc in grades:
            return 1.0 / rank
    return 0.0


def _dcg(gains: Iterable[float]) -> float:
    return math.fsum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


def _ndcg(top: Sequence[str], grades: Mapping[str, float], k: int) -> float:
    ideal = _dcg(sorted(grades.values(), reverse=True)[:k])
    return _dcg(grades.get(doc, 0.0) for doc in top) / ideal
