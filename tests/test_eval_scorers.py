"""Deterministic scorers: values equal the reference libraries', and bad specs fail early."""

from __future__ import annotations

import importlib.util
import threading
from typing import Any

import numpy as np
import pytest
import sacrebleu
from profanity_check import predict_prob
from rouge_score import rouge_scorer

from flywheel.evals import scorers
from flywheel.evals.base import Sample, Score, ScorerError, build_scorer

HAS_JUDGES = importlib.util.find_spec("flywheel.evals.judges") is not None

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    (
        "The quick brown foxes were jumping over lazy dogs.",
        "A quick brown fox jumps over the lazy dog",
    ),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("completely unrelated words here", "the cat is on the mat"),
    ("", "non-empty reference"),
]


def sample(output: str, expected: str | None = None, **kwargs: Any) -> Sample:
    return Sample(output=output, expected=expected, **kwargs)


# --- SQuAD normalisation, exact match, token F1 ------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple,  a pear  ", "apple pear"),
        ("Theatre is THE answer.", "theatre is answer"),
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer_is_squad_normalisation(text: str, normalized: str) -> None:
    assert scorers.normalize_answer(text) == normalized


def test_exact_match_strict_and_normalized() -> None:
    strict = scorers.exact_match()
    loose = scorers.exact_match(normalize=True)
    assert (strict.name, loose.name) == ("exact_match", "exact_match_normalized")
    assert strict.higher_is_better is True
    assert strict.score(sample("Paris\n", "Paris")).value == 1.0
    assert strict.score(sample("paris", "Paris")).value == 0.0
    assert loose.score(sample("The Paris!", "paris")).value == 1.0
    assert loose.score(sample("Lyon", "Paris")).value == 0.0


def test_exact_match_without_expected_is_an_error_not_an_exception() -> None:
    result = scorers.exact_match().score(sample("Paris"))
    assert result.value is None
    assert result.error is not None and "needs an expected output" in result.error


@pytest.mark.parametrize(
    ("output", "expected", "f1"),
    [
        ("the cat sat", "a cat sat down", 2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3)),
        ("Paris", "paris.", 1.0),
        ("London", "Paris", 0.0),
        ("", "", 1.0),
        ("the", "Paris", 0.0),  # normalises to empty
        ("cat cat dog", "cat dog dog", 2 * (2 / 3) * (2 / 3) / (4 / 3)),
    ],
)
def test_token_f1_squad_values(output: str, expected: str, f1: float) -> None:
    assert scorers.token_f1_scorer().score(sample(output, expected)).value == pytest.approx(f1)


# --- contains and regex -------------------------------------------------------------------


def test_contains_defaults_to_expected_and_ignores_case() -> None:
    scorer = scorers.contains()
    assert scorer.score(sample("The answer is PARIS.", "paris")).value == 1.0
    assert scorer.score(sample("The answer is Lyon.", "paris")).value == 0.0
    missing = scorer.score(sample("anything"))
    assert missing.value is None and missing.error


def test_contains_value_and_case_sensitive() -> None:
    scorer = scorers.contains(value="Paris", case_sensitive=True)
    assert scorer.score(sample("in Paris", "ignored")).value == 1.0
    assert scorer.score(sample("in PARIS", "Paris")).value == 0.0


def test_regex_uses_search_semantics() -> None:
    scorer = scorers.regex(pattern=r"\d{4}-\d{2}")
    hit = scorer.score(sample("released in 2024-05, then"))
    assert hit.value == 1.0 and hit.detail == {"match": "2024-05"}
    assert scorer.score(sample("no date")).value == 0.0
    assert scorers.regex(pattern="paris", ignore_case=True).score(sample("PARIS")).value == 1.0


def test_regex_bad_pattern_names_it() -> None:
    with pytest.raises(ValueError, match=r"\(unclosed"):
        scorers.regex(pattern="(unclosed")


# --- JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "valid"),
    [
        ('{"a": 1}', 1.0),
        ("[1, 2, 3]", 1.0),
        ('Here you go:\n```json\n{"a": [1, 2]}\n```\nDone.', 1.0),
        ('```\n{"a": 1}\n```', 1.0),
        ("{'a': 1}", 0.0),
        ("```json\n{broken\n```", 0.0),
        ("", 0.0),
    ],
)
def test_json_valid(output: str, valid: float) -> None:
    assert scorers.json_valid().score(sample(output)).value == valid


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}


def test_json_schema_validates_and_explains() -> None:
    scorer = scorers.json_schema(schema=SCHEMA)
    assert scorer.score(sample('{"name": "Ada", "age": 36}')).value == 1.0
    assert scorer.score(sample('```json\n{"name": "Ada", "age": 36}\n```')).value == 1.0
    wrong = scorer.score(sample('{"name": "Ada", "age": -1}'))
    assert wrong.value == 0.0
    assert wrong.detail is not None and "-1 is less than the minimum of 0" in wrong.detail["error"]
    missing = scorer.score(sample('{"name": "Ada"}'))
    assert missing.value == 0.0 and "'age' is a required property" in missing.detail["error"]  # type: ignore[index]
    not_json = scorer.score(sample("name: Ada"))
    assert not_json.value == 0.0 and "not valid JSON" in not_json.detail["error"]  # type: ignore[index]


def test_json_schema_rejects_invalid_schema_at_build_time() -> None:
    with pytest.raises(ValueError, match="invalid JSON schema"):
        scorers.json_schema(schema={"type": "no-such-type"})
    with pytest.raises(ValueError, match="schema"):
        scorers.json_schema(schema="not a dict")  # type: ignore[arg-type]


# --- sacrebleu / rouge --------------------------------------------------------------------


@pytest.mark.parametrize(("output", "expected"), PAIRS)
def test_bleu_and_chrf_equal_sacrebleu(output: str, expected: str) -> None:
    bleu = scorers.bleu().score(sample(output, expected)).value
    chrf = scorers.chrf().score(sample(output, expected)).value
    assert bleu == sacrebleu.sentence_bleu(output, [expected]).score
    assert chrf == sacrebleu.sentence_chrf(output, [expected]).score


def test_bleu_known_value_and_scale() -> None:
    # sacrebleu's own 0..100 scale: identical text is 100, not 1.
    assert scorers.bleu().score(sample("the cat is on the mat", "the cat is on the mat")).value == (
        pytest.approx(100.0)
    )
    assert scorers.bleu().score(
        sample("the cat sat on the mat", "the cat is on the mat")
    ).value == (pytest.approx(37.99178428257963))


@pytest.mark.parametrize("variant", ["1", "2", "L"])
@pytest.mark.parametrize(("output", "expected"), PAIRS)
def test_rouge_equals_rouge_score(variant: str, output: str, expected: str) -> None:
    key = f"rouge{variant}"
    reference = rouge_scorer.RougeScorer([key], use_stemmer=True).score(expected, output)[key]
    scorer = scorers.rouge(variant=variant)
    assert scorer.name == key
    assert scorer.score(sample(output, expected)).value == reference.fmeasure


def test_rouge_stemmer_option_and_int_variant() -> None:
    pair = sample("the cats are running", "the cat runs")
    stemmed = scorers.rouge(variant=1).score(pair).value
    plain = scorers.rouge(variant=1, use_stemmer=False).score(pair).value
    assert stemmed is not None and plain is not None and stemmed > plain
    assert (
        stemmed
        == rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
        .score("the cat runs", "the cats are running")["rouge1"]
        .fmeasure
    )


@pytest.mark.parametrize("factory", [scorers.bleu, scorers.chrf, scorers.rouge])
def test_overlap_metrics_need_expected(factory: Any) -> None:
    result = factory().score(sample("text"))
    assert result.value is None and "needs an expected output" in result.error


# --- toxicity, latency, cost --------------------------------------------------------------


def test_toxicity_equals_profanity_check() -> None:
    texts = ["You are a lovely person.", "fuck you, you stupid idiot", ""]
    scorer = scorers.toxicity()
    assert scorer.higher_is_better is False
    expected = predict_prob(texts)
    singles = [scorer.score(sample(text)).value for text in texts]
    batch = [s.value for s in scorer.score_many([sample(text) for text in texts])]
    assert singles == [float(p) for p in expected]
    assert batch == singles
    assert singles[1] > 0.9 > 0.2 > singles[0]  # type: ignore[operator]


def test_latency_and_cost() -> None:
    timed = sample("x", latency_ms=123.5, cost=0.0021)
    assert scorers.latency().score(timed).value == 123.5
    assert scorers.cost().score(timed).value == 0.0021
    assert scorers.latency().higher_is_better is False
    assert scorers.cost().higher_is_better is False
    assert scorers.latency().score(sample("x")).value is None
    assert scorers.cost().score(sample("x")).error


# --- semantic similarity ------------------------------------------------------------------


@pytest.fixture(scope="module")
def similarity() -> scorers.SemanticSimilarityScorer:
    scorer = scorers.semantic_similarity()
    scorers.load_minilm()  # the few-second load, once for the module
    return scorer


def test_semantic_similarity_orders_meaning(similarity: scorers.SemanticSimilarityScorer) -> None:
    same = similarity.score(sample("A cat sits on the mat.", "A cat sits on the mat.")).value
    related = similarity.score(sample("A kitten is resting on a rug.", "A cat sits on the mat."))
    unrelated = similarity.score(sample("Quarterly revenue fell 4%.", "A cat sits on the mat."))
    assert same == pytest.approx(1.0, abs=1e-5)
    assert related.value is not None and unrelated.value is not None
    assert related.value > unrelated.value + 0.2
    assert similarity.score(sample("no reference")).value is None


def test_semantic_similarity_batch_equals_single(
    similarity: scorers.SemanticSimilarityScorer,
) -> None:
    batch = [
        sample("The weather is sunny.", "It is a bright day."),
        sample("missing expected"),
        sample("I like pizza.", "Pizza is my favourite food."),
    ]
    many = similarity.score_many(batch)
    singles = [similarity.score(s) for s in batch]
    assert many[1].value is None and many[1].error
    for one, other in zip(many, singles, strict=True):
        assert one.value == pytest.approx(other.value, abs=1e-5)


def test_semantic_similarity_model_loads_once_across_threads() -> None:
    loaded: list[object] = []
    threads = [
        threading.Thread(target=lambda: loaded.append(scorers.load_minilm())) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(model) for model in loaded}) == 1


# --- bad options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "options", "error"),
    [
        (scorers.exact_match, {"normalise": True}, TypeError),
        (scorers.exact_match, {"normalize": "yes"}, ValueError),
        (scorers.token_f1_scorer, {"normalize": True}, TypeError),
        (scorers.contains, {"value": 3}, ValueError),
        (scorers.regex, {}, TypeError),
        (scorers.json_schema, {}, TypeError),
        (scorers.rouge, {"variant": "Lsum"}, ValueError),
        (scorers.rouge, {"use_stemmer": "no"}, ValueError),
        (scorers.bleu, {"tokenize": "13a"}, TypeError),
        (scorers.semantic_similarity, {"model": "x"}, TypeError),
    ],
)
def test_factories_reject_bad_options(factory: Any, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        factory(**options)


@pytest.mark.skipif(not HAS_JUDGES, reason="build_scorer needs flywheel.evals.judges")
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "regex", "pattern": "(bad"}, "bad"),
        ({"type": "exact_match", "nope": 1}, "nope"),
        ({"type": "json_schema", "schema": {"type": 5}}, "invalid JSON schema"),
        ({"type": "rouge", "variant": "3"}, "variant"),
    ],
)
def test_build_scorer_turns_bad_options_into_400(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ScorerError, match=message) as caught:
        build_scorer(spec)
    assert caught.value.status_code == 400


@pytest.mark.skipif(not HAS_JUDGES, reason="build_scorer needs flywheel.evals.judges")
def test_build_scorer_builds_builtins_with_names() -> None:
    assert build_scorer("exact_match").name == "exact_match"
    renamed = build_scorer({"type": "rouge", "variant": "1", "name": "r1"})
    assert renamed.name == "r1" and isinstance(renamed, scorers.RougeScorer)


# --- FunctionScorer -----------------------------------------------------------------------


def length_ratio(sample: Sample, *, target: int = 10) -> float:
    return len(sample.output) / target


def returns(value: Any) -> Any:
    def function(sample: Sample) -> Any:
        return value

    return function


def boom(sample: Sample) -> float:
    raise RuntimeError("judge exploded")


@pytest.mark.parametrize(
    ("result", "value", "has_error"),
    [
        (0.25, 0.25, False),
        (3, 3.0, False),
        (True, 1.0, False),
        (False, 0.0, False),
        (np.float32(0.5), 0.5, False),
        (np.bool_(True), 1.0, False),
        (Score(0.7, detail={"why": "x"}), 0.7, False),
        ({"value": 0.4, "detail": {"k": 1}}, 0.4, False),
        ({"value": None, "error": "skipped"}, None, True),
        ({"detail": {}}, None, True),
        ({"value": "high"}, None, True),
        ("0.5", None, True),
        (None, None, True),
        (float("nan"), None, True),
        ([1.0], None, True),
    ],
)
def test_function_scorer_return_types(result: Any, value: float | None, has_error: bool) -> None:
    scored = scorers.FunctionScorer(returns(result), "custom", True, {}).score(sample("x"))
    assert scored.value == (pytest.approx(value) if value is not None else None)
    assert (scored.error is not None) is has_error
    if isinstance(result, dict) and "detail" in result and value is not None:
        assert scored.detail == result["detail"]


def test_function_scorer_passes_options_and_catches_exceptions() -> None:
    scorer = scorers.FunctionScorer(length_ratio, "ratio", False, {"target": 4})
    assert scorer.score(sample("abcdef")).value == 1.5
    assert scorer.higher_is_better is False
    failed = scorers.FunctionScorer(boom, "boom", True, {}).score(sample("x"))
    assert failed.value is None and failed.error == "RuntimeError: judge exploded"


def test_function_scorer_rejects_options_the_function_does_not_take() -> None:
    with pytest.raises(ScorerError, match="unknown"):
        scorers.FunctionScorer(length_ratio, "ratio", True, {"unknown": 1})


def test_build_scorer_python_function() -> None:
    scorer = build_scorer(
        {"type": "python", "function": "tests.test_eval_scorers:length_ratio", "target": 2}
    )
    assert isinstance(scorer, scorers.FunctionScorer)
    assert scorer.name == "length_ratio"
    assert scorer.score(sample("abc")).value == 1.5
