"""Smoke test of the retrieval-quality bench (bench/rag/retrieval_quality.py): its corpus and
labelled queries are consistent, and its core function scores a small run sensibly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "rag" / "retrieval_quality.py"
# Small topics only, so that the whole run (model load included) stays well under 30 s.
SMALL_TOPIC_CHARS = 1500


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_rag_retrieval_quality", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def corpus() -> Any:
    return bench.build_corpus()


@pytest.fixture(scope="module")
def queries(corpus: Any) -> list[Any]:
    return bench.load_queries(bench.QUERIES, corpus.aliases)


@pytest.fixture(scope="module")
def small_run(corpus: Any, queries: list[Any]) -> tuple[Any, list[Any], dict[str, Any]]:
    documents = {s: t for s, t in corpus.documents.items() if len(t) < SMALL_TOPIC_CHARS}
    small = bench.Corpus(documents=documents, aliases=corpus.aliases)
    chosen = [q for q in queries if set(q.relevant) <= set(documents)]
    results = bench.run_benchmark(small, chosen, resamples=200, seed=1)
    return small, chosen, results


def test_corpus_is_the_python_reference_topics_without_duplicates(corpus: Any) -> None:
    from pydoc_data.topics import topics

    assert len(corpus.documents) >= 70
    assert corpus.documents["assert"] == topics["assert"]
    # "else" and "if" share one text: one is kept, the other becomes an alias of it.
    assert corpus.aliases == {"if": "else"}
    assert len(set(corpus.documents.values())) == len(corpus.documents)


def test_build_corpus_drops_repeated_text_and_empty_topics() -> None:
    built = bench.build_corpus({"b": "same text", "a": "same text", "c": "other", "d": "  "})
    assert built.documents == {"a": "same text", "c": "other"}
    assert built.aliases == {"b": "a"}


def test_queries_load_and_every_label_is_in_the_corpus(corpus: Any, queries: list[Any]) -> None:
    assert 60 <= len(queries) <= 80
    assert len({q.id for q in queries}) == len(queries)
    assert {q.kind for q in queries} == {"general", "identifier", "paraphrase"}
    for query in queries:
        assert query.query.strip()
        assert 1 <= len(query.relevant) <= 4
        assert set(query.relevant) <= set(corpus.documents), query.id
        assert set(query.relevant.values()) <= {1, 2}
        assert 2 in query.relevant.values(), f"{query.id} has no main answer"


def test_a_topic_containing_a_labelled_topic_verbatim_is_labelled_too(
    corpus: Any, queries: list[Any]
) -> None:
    # The labelling rule (data/README.md): a chapter that repeats a relevant topic's text (e.g.
    # "compound" holds all of "try") answers the query as well, so it is relevant too.
    def paragraphs(text: str) -> list[str]:
        return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]

    containers: dict[str, set[str]] = {}
    for source, text in corpus.documents.items():
        own = paragraphs(text)
        containers[source] = {
            other
            for other, other_text in corpus.documents.items()
            if other != source and own and sum(p in other_text for p in own) >= 0.9 * len(own)
        }
    assert "compound" in containers["try"]
    for query in queries:
        for source in query.relevant:
            assert containers[source] <= set(query.relevant), (query.id, source)


def test_load_queries_maps_aliases_and_rejects_bad_grades(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"id": "a", "query": "q", "relevant": {"if": 1, "else": 2}}) + "\n",
        encoding="utf-8",
    )
    [query] = bench.load_queries(good, {"if": "else"})
    assert query.relevant == {"else": 2}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "query": "q", "relevant": {"x": 3}}) + "\n")
    with pytest.raises(ValueError, match="grade 3"):
        bench.load_queries(bad)


def test_bootstrap_ci_brackets_the_mean_and_is_seeded() -> None:
    values = np.array([0.0, 1.0] * 40)
    low, high = bench.bootstrap_ci(values, resamples=500, seed=3)
    assert low < 0.5 < high
    assert low > 0.35 and high < 0.65
    assert bench.bootstrap_ci(values, resamples=500, seed=3) == (low, high)
    assert bench.bootstrap_ci(np.full(10, 0.7), resamples=50) == pytest.approx((0.7, 0.7))


def test_run_rejects_labels_outside_the_corpus(queries: list[Any]) -> None:
    tiny = bench.Corpus(documents={"pass": "The pass statement does nothing."})
    with pytest.raises(ValueError, match="not in the corpus"):
        bench.run_benchmark(tiny, queries[:3])


def test_small_run_returns_metrics_in_range(
    small_run: tuple[Any, list[Any], dict[str, Any]],
) -> None:
    small, chosen, results = small_run
    assert len(chosen) >= 10
    assert results["queries"] == len(chosen)
    assert results["corpus"]["documents"] == len(small.documents)
    assert results["corpus"]["chunks"] >= len(small.documents)
    for mode in bench.MODES:
        means = results["modes"][mode]
        for name in bench.HEADLINE:
            assert 0.0 <= means[name] <= 1.0, (mode, name)
        low, high = results["ci"][mode]["ndcg@10"]
        assert 0.0 <= low <= means["ndcg@10"] <= high <= 1.0
        assert results["timings"]["search"][mode]["p50_ms"] > 0
    for name, diff in results["paired"].items():
        low, high = diff["ci95"]
        assert -1.0 <= low <= diff["mean"] <= high <= 1.0, name
        assert diff["wins"] + diff["ties"] + diff["losses"] == len(chosen)
    # Small, distinct topics: every mode finds most main answers, far above chance (~0.1).
    assert results["modes"]["hybrid"]["ndcg@10"] > 0.5
    assert results["modes"]["dense"]["recall@10"] > 0.7


def test_small_run_rankings_are_distinct_documents_of_the_corpus(
    small_run: tuple[Any, list[Any], dict[str, Any]],
) -> None:
    small, _, results = small_run
    for row in results["per_query"]:
        for mode in bench.MODES:
            retrieved = row[mode]["retrieved"]
            assert 1 <= len(retrieved) <= bench.CUTOFF
            assert len(set(retrieved)) == len(retrieved)
            assert set(retrieved) <= set(small.documents)
    by_id = {row["id"]: row for row in results["per_query"]}
    # "how to write a complex number directly in source code": the imaginary-literal topic.
    assert by_id["q20"]["dense"]["retrieved"][0] == "imaginary"


def test_markdown_table_lists_every_mode(
    small_run: tuple[Any, list[Any], dict[str, Any]],
) -> None:
    table = bench.markdown(small_run[2])
    for mode in bench.MODES:
        assert f"| {mode} |" in table
    assert "hybrid-dense" in table and "hybrid-bm25" in table
