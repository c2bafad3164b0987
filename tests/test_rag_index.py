"""Vector (faiss) and BM25 (bm25s) indexes, and reciprocal rank fusion."""

from __future__ import annotations

import itertools

import bm25s
import numpy as np
import pytest

from flywheel.rag import index as index_module
from flywheel.rag.index import Bm25Index, Hit, VectorIndex, reciprocal_rank_fusion


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _brute_force(
    ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int
) -> tuple[list[int], np.ndarray]:
    """Top k by inner product (float64), ties by id: the reference every search must match."""
    scores = vectors.astype(np.float64) @ query.astype(np.float64)
    order = np.lexsort((ids, -scores))[:k]
    return [int(i) for i in ids[order]], scores[order]


def _ids(hits: list[Hit]) -> list[int]:
    return [hit.id for hit in hits]


def _single(result: list[Hit] | list[list[Hit]]) -> list[Hit]:
    assert all(isinstance(hit, Hit) for hit in result)
    return result  # type: ignore[return-value]


def _batch(result: list[Hit] | list[list[Hit]]) -> list[list[Hit]]:
    assert all(isinstance(row, list) for row in result)
    return result  # type: ignore[return-value]


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray]:
    """20k random unit vectors (d=32) under shuffled, non-contiguous ids."""
    rng = np.random.default_rng(7)
    ids = rng.permutation(20_000).astype(np.int64) * 7 + 1_000_000_000_000
    return ids, _unit(rng, 20_000, 32)


@pytest.fixture(scope="module")
def hnsw(corpus: tuple[np.ndarray, np.ndarray]) -> VectorIndex:
    ids, vectors = corpus
    return VectorIndex.build(ids, vectors, hnsw_threshold=1_000)


@pytest.fixture(scope="module")
def exact(corpus: tuple[np.ndarray, np.ndarray]) -> VectorIndex:
    ids, vectors = corpus
    return VectorIndex.build(ids, vectors)


# --- VectorIndex: exact ---------------------------------------------------------------------


def test_exact_index_returns_the_true_top_k(
    exact: VectorIndex, corpus: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, vectors = corpus
    assert (exact.kind, exact.size, exact.dim, len(exact)) == ("exact", 20_000, 32, 20_000)
    queries = _unit(np.random.default_rng(1), 30, 32)
    results = _batch(exact.search(queries, 10))  # 30 queries: faiss's BLAS path
    for query, hits in zip(queries, results, strict=True):
        expected_ids, expected_scores = _brute_force(ids, vectors, query, 10)
        assert _ids(hits) == expected_ids
        assert [hit.score for hit in hits] == pytest.approx(expected_scores, abs=1e-5)
        assert [hit.rank for hit in hits] == list(range(1, 11))
    single = _single(exact.search(queries[0], 10))
    assert _ids(single) == _ids(results[0])


@pytest.mark.parametrize("queries", [1, 25])  # faiss scans differently below/above 20 queries
def test_exact_ties_are_ordered_and_cut_by_id(queries: int) -> None:
    rng = np.random.default_rng(3)
    shared = _unit(rng, 1, 16)[0]
    tied_ids = [50, 7, 33, 12, 90]
    other_ids = list(range(100, 300))
    ids = np.array(tied_ids + other_ids, dtype=np.int64)
    vectors = np.vstack([np.tile(shared, (5, 1)), _unit(rng, 200, 16)])
    index = VectorIndex.build(ids, vectors)
    for hits in _batch(index.search(np.tile(shared, (queries, 1)), 3)):
        assert _ids(hits) == [7, 12, 33]  # three of five equal scores: the smallest ids
        assert hits[0].score == hits[1].score == hits[2].score == pytest.approx(1.0, abs=1e-6)
    full = _single(index.search(shared, 6))
    assert _ids(full)[:5] == [7, 12, 33, 50, 90]
    assert full[5].score < full[4].score


def test_scores_are_cosine_whatever_the_vector_scale() -> None:
    rng = np.random.default_rng(4)
    vectors = _unit(rng, 50, 8)
    scales = rng.uniform(0.1, 30.0, size=(50, 1)).astype(np.float32)
    index = VectorIndex.build(np.arange(50), vectors * scales)
    hits = _single(index.search(vectors[9] * 5.0, 3))
    expected_ids, expected_scores = _brute_force(np.arange(50), vectors, vectors[9], 3)
    assert _ids(hits) == expected_ids
    assert [hit.score for hit in hits] == pytest.approx(expected_scores, abs=1e-5)


def test_exact_filter_matches_brute_force_over_allowed(
    exact: VectorIndex, corpus: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, vectors = corpus
    rng = np.random.default_rng(5)
    query = _unit(rng, 1, 32)[0]
    # Large filter (> FILTER_EXACT_LIMIT): the faiss IDSelectorBatch path.
    large = rng.choice(ids, size=12_000, replace=False)
    keep = np.isin(ids, large)
    expected_ids, _ = _brute_force(ids[keep], vectors[keep], query, 10)
    assert _ids(_single(exact.search(query, 10, allowed=set(large.tolist())))) == expected_ids
    # Small filter, as a list with an unknown id mixed in: the reconstruct path.
    small = [int(i) for i in ids[:40]] + [42]
    keep = np.isin(ids, small)
    expected_ids, _ = _brute_force(ids[keep], vectors[keep], query, 10)
    assert _ids(_single(exact.search(query, 10, allowed=small))) == expected_ids
    assert exact.search(query, 10, allowed=[42, 43]) == []
    assert exact.search(query, 10, allowed=set()) == []


def test_k_larger_than_available_and_non_positive_k() -> None:
    rng = np.random.default_rng(6)
    vectors = _unit(rng, 5, 8)
    for threshold in (50_000, 2):  # exact, then HNSW
        index = VectorIndex.build([10, 11, 12, 13, 14], vectors, hnsw_threshold=threshold)
        hits = _single(index.search(vectors[0], 10))
        assert sorted(_ids(hits)) == [10, 11, 12, 13, 14]
        assert _ids(hits) == _brute_force(np.arange(10, 15), vectors, vectors[0], 5)[0]
        assert _ids(_single(index.search(vectors[0], 10, allowed={11, 14, 99}))) in (
            [11, 14],
            [14, 11],
        )
        assert index.search(vectors[0], 0) == []
        assert index.search(vectors[0], -3) == []
        assert _batch(index.search(vectors[:2], 0)) == [[], []]


def test_empty_index_searches_to_nothing_and_round_trips() -> None:
    index = VectorIndex.build(np.zeros(0, dtype=np.int64), np.zeros((0, 8), dtype=np.float32))
    assert (index.kind, index.size, index.dim) == ("exact", 0, 8)
    assert index.search(np.ones(8, dtype=np.float32), 5) == []
    assert index.search(np.ones((2, 8), dtype=np.float32), 5) == [[], []]
    loaded = VectorIndex.from_bytes(index.to_bytes())
    assert (loaded.kind, loaded.size, loaded.dim) == ("exact", 0, 8)
    assert loaded.search(np.ones(8, dtype=np.float32), 5, allowed={1}) == []
    # A knowledge base with no chunks yet does not know its dimension: (0, 0) is accepted.
    unknown = VectorIndex.build(np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
    assert unknown.dim == 0
    assert VectorIndex.from_bytes(unknown.to_bytes()).search(np.ones(384), 5) == []


def test_invalid_input_is_rejected() -> None:
    vectors = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="unique"):
        VectorIndex.build([1, 2, 1], vectors)
    with pytest.raises(ValueError, match="3 ids for 2 vectors"):
        VectorIndex.build([1, 2, 3], vectors[:2])
    with pytest.raises(ValueError, match=">= 0"):
        VectorIndex.build([-1, 2, 3], vectors)
    with pytest.raises(ValueError, match="finite"):
        VectorIndex.build([1, 2, 3], vectors * np.nan)
    with pytest.raises(ValueError, match="n x d"):
        VectorIndex.build([1, 2, 3], np.zeros((3, 0), dtype=np.float32))
    index = VectorIndex.build([1, 2, 3], vectors)
    with pytest.raises(ValueError, match=r"\(q, 4\)"):
        index.search(np.ones(5, dtype=np.float32), 2)
    with pytest.raises(ValueError, match="bad magic"):
        VectorIndex.from_bytes(b"not an index at all")


# --- VectorIndex: HNSW ----------------------------------------------------------------------


def test_hnsw_recall_at_10_against_exact(hnsw: VectorIndex, exact: VectorIndex) -> None:
    assert hnsw.kind == "hnsw"
    queries = _unit(np.random.default_rng(8), 200, 32)
    approximate = _batch(hnsw.search(queries, 10))
    truth = _batch(exact.search(queries, 10))
    recall = np.mean(
        [
            len(set(_ids(got)) & set(_ids(want))) / 10
            for got, want in zip(approximate, truth, strict=True)
        ]
    )
    assert recall >= 0.95
    assert all(len(hits) == 10 for hits in approximate)


def test_round_trip_gives_identical_results(hnsw: VectorIndex, exact: VectorIndex) -> None:
    queries = _unit(np.random.default_rng(9), 5, 32)
    allowed = set(range(1_000_000_000_000, 1_000_000_000_000 + 7 * 20_000, 14))
    for original in (exact, hnsw):
        original.ef_search = 48
        data = original.to_bytes()
        loaded = VectorIndex.from_bytes(data)
        assert (loaded.kind, loaded.size, loaded.dim, loaded.ef_search) == (
            original.kind,
            original.size,
            original.dim,
            48,
        )
        assert np.array_equal(loaded.ids, original.ids)
        assert loaded.search(queries, 10) == original.search(queries, 10)
        assert loaded.search(queries, 10, allowed=allowed) == original.search(
            queries, 10, allowed=allowed
        )
        assert loaded.to_bytes() == data
        original.ef_search = 64


def test_hnsw_filter_is_respected_and_fills_k(
    hnsw: VectorIndex, corpus: tuple[np.ndarray, np.ndarray]
) -> None:
    ids, vectors = corpus
    rng = np.random.default_rng(10)
    queries = _unit(rng, 20, 32)
    # 10k allowed ids: the selector path with a boosted efSearch.
    allowed = set(rng.choice(ids, size=10_000, replace=False).tolist())
    keep = np.isin(ids, list(allowed))
    recalls = []
    for query, hits in zip(queries, _batch(hnsw.search(queries, 10, allowed=allowed)), strict=True):
        assert len(hits) == 10 and set(_ids(hits)) <= allowed
        expected_ids, _ = _brute_force(ids[keep], vectors[keep], query, 10)
        recalls.append(len(set(_ids(hits)) & set(expected_ids)) / 10)
    assert np.mean(recalls) >= 0.95
    # Very selective (25 of 20k ids): exact over the allowed vectors, so the true top 10.
    selective = [int(i) for i in rng.choice(ids, size=25, replace=False)]
    keep = np.isin(ids, selective)
    for query, hits in zip(
        queries, _batch(hnsw.search(queries, 10, allowed=selective)), strict=True
    ):
        assert _ids(hits) == _brute_force(ids[keep], vectors[keep], query, 10)[0]


@pytest.mark.parametrize("retries", [2, 0])
@pytest.mark.parametrize(("allowed_count", "k"), [(30, 10), (4, 3)])
def test_hnsw_selective_filter_fills_k_through_graph_search(
    hnsw: VectorIndex,
    corpus: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    retries: int,
    allowed_count: int,
    k: int,
) -> None:
    # Disable the small-filter shortcut so the graph is searched with a selector: a handful of
    # allowed ids out of 20k must still give k hits (boosted efSearch, retries with efSearch x4,
    # then exact search for any query still short; retries=0 forces that last step sooner).
    monkeypatch.setattr(index_module, "FILTER_EXACT_LIMIT", 0)
    monkeypatch.setattr(index_module, "_EF_RETRIES", retries)
    ids, _ = corpus
    rng = np.random.default_rng(11)
    selective = set(rng.choice(ids, size=allowed_count, replace=False).tolist())
    queries = _unit(rng, 20, 32)
    for hits in _batch(hnsw.search(queries, k, allowed=selective)):
        assert len(hits) == k
        assert set(_ids(hits)) <= selective
        assert [hit.rank for hit in hits] == list(range(1, k + 1))
        assert all(a.score >= b.score for a, b in itertools.pairwise(hits))


# --- Bm25Index ------------------------------------------------------------------------------

DOCS = {
    101: "Apple pie: apple, apple and more apple in every apple slice",
    102: "An apple a day keeps the doctor away, they say about apple orchards",
    103: "Banana bread with a single apple",
    104: "Cherry tart and cherry jam",
    105: "Banana split with banana ice cream",
}


@pytest.fixture(scope="module")
def bm25() -> Bm25Index:
    return Bm25Index.build(list(DOCS), list(DOCS.values()))


def test_bm25_orders_by_term_frequency(bm25: Bm25Index) -> None:
    assert bm25.size == 5
    hits = bm25.search("apple", 10)
    assert _ids(hits) == [101, 102, 103]  # five mentions, two, one; 104/105 have none
    assert [hit.rank for hit in hits] == [1, 2, 3]
    assert hits[0].score > hits[1].score > hits[2].score > 0
    assert _ids(bm25.search("banana", 10)) == [105, 103]
    assert _ids(bm25.search("banana apple", 1)) == [103]  # the only doc with both terms


def test_bm25_no_overlap_gives_nothing(bm25: Bm25Index) -> None:
    assert bm25.search("zebra quantum", 10) == []
    assert bm25.search("", 10) == []
    assert bm25.search("the and of", 10) == []  # stopwords only
    assert bm25.search("apple", 0) == []


def test_bm25_scores_equal_bm25s_own(bm25: Bm25Index) -> None:
    reference = bm25s.BM25(k1=1.5, b=0.75)
    reference.index(
        bm25s.tokenize(list(DOCS.values()), stopwords="en", show_progress=False),
        show_progress=False,
    )
    query_tokens = bm25s.tokenize(["banana apple pie"], stopwords="en", show_progress=False)
    positions, scores = reference.retrieve(query_tokens, k=5, show_progress=False)
    doc_ids = list(DOCS)
    expected = {doc_ids[p]: float(s) for p, s in zip(positions[0], scores[0], strict=True) if s > 0}
    hits = bm25.search("banana apple pie", 5)
    assert {hit.id: hit.score for hit in hits} == expected
    assert len(expected) == 4


def test_bm25_filter_applies_before_cutting_to_k(bm25: Bm25Index) -> None:
    assert _ids(bm25.search("apple", 1, allowed={102, 103, 104})) == [102]
    hits = bm25.search("apple", 10, allowed=np.array([103, 105, 999]))
    assert _ids(hits) == [103]
    assert hits[0] == Hit(id=103, score=bm25.search("apple", 10)[2].score, rank=1)
    assert bm25.search("apple", 10, allowed=[]) == []


def test_bm25_round_trip_is_exact(bm25: Bm25Index) -> None:
    loaded = Bm25Index.from_bytes(bm25.to_bytes())
    assert loaded.size == bm25.size
    for query in ("apple", "banana cherry", "apple pie jam", "nothing here"):
        assert loaded.search(query, 10) == bm25.search(query, 10)
        assert np.array_equal(loaded.scores(query), bm25.scores(query))
    assert loaded.search("apple", 10, allowed={103}) == bm25.search("apple", 10, allowed={103})


def test_bm25_ties_break_by_id() -> None:
    index = Bm25Index.build([9, 4, 6], ["red fox", "red fox", "blue whale"])
    hits = index.search("fox", 10)
    assert _ids(hits) == [4, 9] and hits[0].score == hits[1].score
    assert _ids(index.search("fox", 1)) == [4]


def test_bm25_empty_and_stopword_only_corpora() -> None:
    for ids, texts in (([], []), ([1, 2], ["the and", "a of"])):
        index = Bm25Index.build(ids, texts)
        assert index.size == len(ids)
        assert index.search("fox", 5) == []
        loaded = Bm25Index.from_bytes(index.to_bytes())
        assert loaded.size == len(ids)
        assert loaded.search("and fox", 5) == []


def test_bm25_without_stopwords_indexes_them() -> None:
    index = Bm25Index.build([1, 2], ["the cat", "a dog"], stopwords=None)
    assert _ids(index.search("the", 5)) == [1]
    assert _ids(Bm25Index.from_bytes(index.to_bytes()).search("the", 5)) == [1]


def test_bm25_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        Bm25Index.build([1, 1], ["a b", "c d"])
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        Bm25Index.build([1, 2], ["a b"])
    with pytest.raises(ValueError, match="bad magic"):
        Bm25Index.from_bytes(VectorIndex.build([1], np.ones((1, 2))).to_bytes())


# --- Reciprocal rank fusion -----------------------------------------------------------------


def _hits(*ids: int) -> list[Hit]:
    return [Hit(id=i, score=100.0 - rank, rank=rank) for rank, i in enumerate(ids, 1)]


def _fused(result: list[Hit]) -> list[tuple[int, float, int]]:
    return [(hit.id, round(hit.score, 12), hit.rank) for hit in result]


def test_rrf_two_rankings_k60() -> None:
    fused = reciprocal_rank_fusion([_hits(1, 2, 3), _hits(3, 1, 4)])
    assert _fused(fused) == [
        (1, round(1 / 61 + 1 / 62, 12), 1),
        (3, round(1 / 63 + 1 / 61, 12), 2),
        (2, round(1 / 62, 12), 3),
        (4, round(1 / 63, 12), 4),
    ]


def test_rrf_k1_weights_and_three_rankings() -> None:
    rankings = [_hits(1, 2, 3), _hits(3, 1, 4)]
    assert _fused(reciprocal_rank_fusion(rankings, k=1)) == [
        (1, round(1 / 2 + 1 / 3, 12), 1),
        (3, round(1 / 4 + 1 / 2, 12), 2),
        (2, round(1 / 3, 12), 3),
        (4, round(1 / 4, 12), 4),
    ]
    # Weight 2 on the first ranking, 0.5 on the second.
    assert _fused(reciprocal_rank_fusion(rankings, k=1, weights=[2, 0.5])) == [
        (1, round(2 / 2 + 0.5 / 3, 12), 1),
        (3, round(2 / 4 + 0.5 / 2, 12), 2),
        (2, round(2 / 3, 12), 3),
        (4, round(0.5 / 4, 12), 4),
    ]
    three = reciprocal_rank_fusion([_hits(5, 6), _hits(6, 7), _hits(7, 5, 6)], k=60)
    assert _fused(three) == [
        (6, round(1 / 62 + 1 / 61 + 1 / 63, 12), 1),
        (5, round(1 / 61 + 1 / 62, 12), 2),
        (7, round(1 / 62 + 1 / 61, 12), 3),
    ]


def test_rrf_tie_breaks_by_best_rank_then_id() -> None:
    # 5 and 7 score the same and both were ranked first somewhere: the smaller id wins.
    assert _ids(reciprocal_rank_fusion([_hits(7), _hits(5)])) == [5, 7]
    # k=0: 9 scores 1/1 (first in ranking A); 3 scores 2/2 (second in B, weight 2): equal sums,
    # and 9's best rank (1) beats 3's (2) despite the larger id.
    fused = reciprocal_rank_fusion([_hits(9), _hits(8, 3)], k=0, weights=[1, 2])
    assert _fused(fused) == [(8, 2.0, 1), (9, 1.0, 2), (3, 1.0, 3)]


def test_rrf_duplicates_empty_lists_and_limit() -> None:
    # An id repeated inside one ranking counts once, at its best position.
    assert _fused(reciprocal_rank_fusion([_hits(1, 2, 1, 1)], k=1)) == [
        (1, 0.5, 1),
        (2, round(1 / 3, 12), 2),
    ]
    assert reciprocal_rank_fusion([]) == []
    assert reciprocal_rank_fusion([[], []]) == []
    assert _fused(reciprocal_rank_fusion([[], _hits(4, 2)], k=1)) == [
        (4, 0.5, 1),
        (2, round(1 / 3, 12), 2),
    ]
    assert _ids(reciprocal_rank_fusion([_hits(1, 2, 3), _hits(3, 1, 4)], limit=2)) == [1, 3]
    assert reciprocal_rank_fusion([_hits(1)], limit=0) == []
    with pytest.raises(ValueError, match="2 weights for 1 rankings"):
        reciprocal_rank_fusion([_hits(1)], weights=[1, 2])
    with pytest.raises(ValueError, match="k must be"):
        reciprocal_rank_fusion([_hits(1)], k=-1)


def test_rrf_fuses_real_indexes(bm25: Bm25Index) -> None:
    rng = np.random.default_rng(12)
    vectors = _unit(rng, 5, 8)
    dense = VectorIndex.build(list(DOCS), vectors)
    dense_hits = _single(dense.search(vectors[3], 5))  # 104 first
    keyword_hits = bm25.search("cherry banana", 5)  # 104, then 105 / 103
    fused = reciprocal_rank_fusion([dense_hits, keyword_hits], limit=3)
    assert fused[0].id == 104
    assert fused[0].score == pytest.approx(2 / 61)
    assert [hit.rank for hit in fused] == [1, 2, 3]
