"""Retrieval metrics: trec_eval (pytrec_eval) as the reference, hand-worked examples, the edge
cases (duplicates, empty lists, no relevant documents, grade 0, k past the end) and properties."""

from __future__ import annotations

import math
import random

import pytest
import pytrec_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from flywheel.evals.retrieval import (
    hit_at_k,
    mean_metrics,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    reciprocal_rank,
    retrieval_metrics,
)

KS = (1, 3, 5, 10, 20)
# Our name -> pytrec_eval's measure family.
TREC_NAMES = {"hit": "success", "recall": "recall", "precision": "P", "ndcg": "ndcg_cut"}


def _fixed_queries() -> list[tuple[str, list[str], dict[str, int]]]:
    """~30 seeded queries: graded and binary judgments (with grade-0 ones), rankings of 0..25
    ids mixing relevant, judged non-relevant and unjudged ids, some with repeated ids."""
    rng = random.Random(7)
    pool = [f"d{i}" for i in range(40)]
    queries = []
    for q in range(32):
        judged = rng.sample(pool, rng.randint(2, 12))
        graded = q % 2 == 0
        qrel = {doc: rng.choice([0, 1, 2, 3]) if graded else rng.choice([0, 1]) for doc in judged}
        if not any(grade > 0 for grade in qrel.values()):
            qrel[judged[0]] = 1  # every reference query has a relevant document
        ranking = rng.sample(pool, rng.randint(1, 25))
        if q % 5 == 0 and len(ranking) > 2:  # repeats: trec_eval keeps the best-scored one
            ranking.insert(rng.randrange(1, len(ranking)), ranking[0])
            ranking.append(ranking[1])
        queries.append((f"q{q}", ranking, qrel))
    return queries


def _trec_results(queries: list[tuple[str, list[str], dict[str, int]]]) -> dict[str, dict]:
    qrels = {qid: qrel for qid, _, qrel in queries}
    run: dict[str, dict[str, float]] = {}
    for qid, ranking, _ in queries:
        scores: dict[str, float] = {}
        for rank, doc in enumerate(ranking):
            # Strictly decreasing scores: trec_eval's score order is our rank order, and a
            # repeated id keeps its first (highest) score.
            scores.setdefault(doc, float(len(ranking) - rank))
        run[qid] = scores
    cutoffs = ",".join(map(str, KS))
    measures = {f"{name}.{cutoffs}" for name in TREC_NAMES.values()} | {"recip_rank"}
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def test_matches_pytrec_eval_on_fixed_queries() -> None:
    queries = _fixed_queries()
    reference = _trec_results(queries)
    assert len(reference) == len(queries) == 32
    compared = 0
    for qid, ranking, qrel in queries:
        ours = retrieval_metrics(ranking, qrel, ks=KS)
        trec = reference[qid]
        assert ours["mrr"] == pytest.approx(trec["recip_rank"], abs=1e-9)
        assert reciprocal_rank(ranking, qrel) == pytest.approx(trec["recip_rank"], abs=1e-9)
        for k in KS:
            for name, trec_name in TREC_NAMES.items():
                assert ours[f"{name}@{k}"] == pytest.approx(trec[f"{trec_name}_{k}"], abs=1e-9), (
                    qid,
                    name,
                    k,
                )
                compared += 1
            # The single-metric functions agree with retrieval_metrics.
            assert hit_at_k(ranking, qrel, k) == ours[f"hit@{k}"]
            assert recall_at_k(ranking, qrel, k) == ours[f"recall@{k}"]
            assert precision_at_k(ranking, qrel, k) == ours[f"precision@{k}"]
            assert ndcg_at_k(ranking, qrel, k) == pytest.approx(ours[f"ndcg@{k}"], abs=1e-12)
    assert compared == 32 * len(KS) * len(TREC_NAMES)
    # The reference isn't trivial: the metrics spread out across the queries.
    assert len({round(reference[qid]["ndcg_cut_5"], 6) for qid, _, _ in queries}) > 10
    assert 0 < sum(reference[qid]["success_1"] for qid, _, _ in queries) < 32


def test_means_match_pytrec_eval() -> None:
    queries = _fixed_queries()
    reference = _trec_results(queries)
    means = mean_metrics([retrieval_metrics(ranking, qrel, ks=KS) for _, ranking, qrel in queries])
    for k in KS:
        for name, trec_name in TREC_NAMES.items():
            expected = math.fsum(r[f"{trec_name}_{k}"] for r in reference.values()) / 32
            assert means[f"{name}@{k}"] == pytest.approx(expected, abs=1e-9)
    expected_mrr = math.fsum(r["recip_rank"] for r in reference.values()) / 32
    assert means["mrr"] == pytest.approx(expected_mrr, abs=1e-9)


def test_hand_worked_binary() -> None:
    retrieved = ["a", "x", "b", "y", "c"]
    relevant = {"a", "b", "z"}
    assert hit_at_k(retrieved, relevant, 1) == 1.0
    assert hit_at_k(["x", "a"], relevant, 1) == 0.0
    assert recall_at_k(retrieved, relevant, 3) == pytest.approx(2 / 3)
    assert precision_at_k(retrieved, relevant, 3) == pytest.approx(2 / 3)
    assert precision_at_k(retrieved, relevant, 5) == pytest.approx(2 / 5)
    assert reciprocal_rank(["x", "y", "b"], relevant) == pytest.approx(1 / 3)
    # DCG@3 = 1/log2(2) + 1/log2(4) = 1.5; ideal (3 relevant) = 1 + 1/log2(3) + 1/log2(4).
    ideal = 1 + 1 / math.log2(3) + 0.5
    assert ndcg_at_k(retrieved, relevant, 3) == pytest.approx(1.5 / ideal)


def test_hand_worked_graded() -> None:
    relevant = {"a": 3, "b": 1, "c": 0, "d": 2}
    retrieved = ["b", "c", "a"]
    # Gains 1, 0, 3 -> DCG = 1 + 0 + 3/2; ideal gains 3, 2, 1 -> 3 + 2/log2(3) + 1/2.
    expected = (1 + 3 / 2) / (3 + 2 / math.log2(3) + 1 / 2)
    assert ndcg_at_k(retrieved, relevant, 3) == pytest.approx(expected)
    assert recall_at_k(retrieved, relevant, 3) == pytest.approx(2 / 3)  # grade 0 isn't relevant
    assert reciprocal_rank(["c", "a"], relevant) == pytest.approx(1 / 2)
    assert retrieval_metrics(retrieved, relevant, ks=(2,)) == pytest.approx(
        {
            "hit@2": 1.0,
            "recall@2": 1 / 3,
            "precision@2": 1 / 2,
            "mrr": 1.0,
            "ndcg@2": 1 / (3 + 2 / math.log2(3)),
        }
    )


def test_duplicates_count_once_at_their_first_rank_and_take_no_slot() -> None:
    relevant = {"a", "b"}
    assert precision_at_k(["a", "a", "a"], relevant, 3) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "a", "a"], relevant, 3) == pytest.approx(1 / 2)
    # k counts distinct ids: "b" is the 2nd distinct id, so it is within k=2.
    assert recall_at_k(["a", "a", "b"], relevant, 2) == 1.0
    assert reciprocal_rank(["x", "x", "a"], relevant) == pytest.approx(1 / 2)
    assert ndcg_at_k(["a", "a", "b"], relevant, 2) == pytest.approx(1.0)
    assert retrieval_metrics(["x", "a", "x", "a"], relevant) == retrieval_metrics(
        ["x", "a"], relevant
    )


def test_empty_retrieved_scores_zero() -> None:
    metrics = retrieval_metrics([], {"a"}, ks=(1, 5))
    assert set(metrics) == {
        "hit@1",
        "hit@5",
        "recall@1",
        "recall@5",
        "precision@1",
        "precision@5",
        "mrr",
        "ndcg@1",
        "ndcg@5",
    }
    assert all(value == 0.0 for value in metrics.values())
    assert ndcg_at_k([], {"a": 2}, 3) == 0.0
    assert reciprocal_rank([], {"a"}) == 0.0


def test_k_past_the_end_of_the_list() -> None:
    assert recall_at_k(["a", "b"], {"a", "b"}, 100) == 1.0
    assert precision_at_k(["a", "b"], {"a", "b"}, 10) == pytest.approx(0.2)  # still / k
    assert ndcg_at_k(["a", "b"], {"a", "b"}, 50) == pytest.approx(1.0)
    assert reciprocal_rank(["x", "a"], {"a"}, k=1) == 0.0
    assert reciprocal_rank(["x", "a"], {"a"}, k=2) == pytest.approx(0.5)


@pytest.mark.parametrize("relevant", [set(), {}, {"a": 0, "b": 0}, {"a": -1}])
def test_no_relevant_documents(relevant: set[str] | dict[str, int]) -> None:
    for metric in (hit_at_k, recall_at_k, precision_at_k, ndcg_at_k):
        with pytest.raises(ValueError, match="no relevant documents"):
            metric(["a"], relevant, 1)
    with pytest.raises(ValueError, match="no relevant documents"):
        reciprocal_rank(["a"], relevant)
    assert retrieval_metrics(["a"], relevant) == {}


def test_mean_metrics_skips_queries_without_relevant_documents() -> None:
    per_query = [
        retrieval_metrics(["a"], {"a"}, ks=(1,)),
        retrieval_metrics(["a"], set(), ks=(1,)),
        retrieval_metrics(["x", "b"], {"b"}, ks=(1,)),
    ]
    assert per_query[1] == {}
    means = mean_metrics(per_query)
    assert means["hit@1"] == pytest.approx(0.5)
    assert means["mrr"] == pytest.approx((1 + 0.5) / 2)
    assert mean_metrics([]) == {}
    assert mean_metrics([{}, {}]) == {}


def test_mean_metrics_refuses_mismatched_metric_names() -> None:
    with pytest.raises(ValueError, match="expected"):
        mean_metrics([{"hit@1": 1.0}, {"hit@5": 1.0}])


def test_bad_arguments() -> None:
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be"):
            precision_at_k(["a"], {"a"}, k)
        with pytest.raises(ValueError, match="k must be"):
            retrieval_metrics(["a"], {"a"}, ks=(5, k))
    with pytest.raises(ValueError, match="k must be"):
        reciprocal_rank(["a"], {"a"}, k=0)
    with pytest.raises(TypeError, match="single str"):
        recall_at_k("abc", {"a"}, 1)
    with pytest.raises(TypeError, match="single str"):
        recall_at_k(["abc"], "abc", 1)


ids = st.sampled_from([f"d{i}" for i in range(12)])
rankings = st.lists(ids, max_size=15)
binary_judgments = st.sets(ids, min_size=1, max_size=8)
graded_judgments = st.dictionaries(ids, st.integers(0, 3), min_size=1, max_size=8).filter(
    lambda grades: any(grade > 0 for grade in grades.values())
)
judgments = st.one_of(binary_judgments, graded_judgments)


@settings(max_examples=200, deadline=None)
@given(rankings, judgments, st.integers(1, 20))
def test_metrics_lie_in_the_unit_interval(
    ranking: list[str], relevant: set[str] | dict[str, int], k: int
) -> None:
    metrics = retrieval_metrics(ranking, relevant, ks=(k,))
    assert len(metrics) == 5
    assert all(0.0 <= value <= 1.0 + 1e-12 for value in metrics.values())
    # Precision and recall count the same hits.
    if isinstance(relevant, set):
        num_relevant = len(relevant)
    else:
        num_relevant = sum(1 for grade in relevant.values() if grade > 0)
    assert metrics[f"precision@{k}"] * k == pytest.approx(metrics[f"recall@{k}"] * num_relevant)
    assert (metrics[f"hit@{k}"] == 1.0) == (metrics[f"recall@{k}"] > 0)


@settings(max_examples=200, deadline=None)
@given(rankings, judgments)
def test_recall_and_hit_never_drop_as_k_grows(
    ranking: list[str], relevant: set[str] | dict[str, int]
) -> None:
    recalls = [recall_at_k(ranking, relevant, k) for k in range(1, 18)]
    hits = [hit_at_k(ranking, relevant, k) for k in range(1, 18)]
    assert recalls == sorted(recalls)
    assert hits == sorted(hits)


@settings(max_examples=200, deadline=None)
@given(graded_judgments, st.lists(ids, max_size=5), st.integers(1, 20))
def test_a_perfect_ranking_has_ndcg_one(relevant: dict[str, int], tail: list[str], k: int) -> None:
    # Best grade first, then anything (judged or not) after the relevant ones.
    perfect = sorted((doc for doc in relevant if relevant[doc] > 0), key=lambda doc: -relevant[doc])
    ranking = perfect + [doc for doc in tail if doc not in perfect]
    assert ndcg_at_k(ranking, relevant, k) == pytest.approx(1.0)
    assert ndcg_at_k(ranking, set(perfect), k) == pytest.approx(1.0)
    assert reciprocal_rank(ranking, relevant) == 1.0


@settings(max_examples=100, deadline=None)
@given(rankings, judgments)
def test_repeats_change_nothing(ranking: list[str], relevant: set[str] | dict[str, int]) -> None:
    distinct = list(dict.fromkeys(ranking))
    assert retrieval_metrics(ranking + ranking[::-1], relevant) == retrieval_metrics(
        distinct, relevant
    )
