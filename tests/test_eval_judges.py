"""LLM judges: reading replies, log-prob scoring, retries, refusals, and the real local model.

Unit tests drive a judge with a scripted ``complete`` (canned OpenAI responses, the caller's
contract); the last tests send real requests through a running ``flywheel up`` with SmolLM2.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from flywheel.errors import ServiceError
from flywheel.evals.base import Complete, Sample, Score, is_judge
from flywheel.evals.judges import (
    NO_VALID_CHOICE,
    PROMPT_VERSION,
    RETRY_TEMPERATURE,
    TOP_LOGPROBS,
    ChoiceJudge,
    CorrectnessJudge,
    GroundednessJudge,
    RelevanceJudge,
    RubricJudge,
    choice_distribution,
    parse_choice,
)

from .conftest import RunningServer

DIGITS = ["1", "2", "3", "4", "5"]
LETTERS = ["A", "B"]
YES_NO = ["yes", "no"]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def reply(text: str, content: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An OpenAI chat completion saying ``text``, with ``logprobs.content`` when given."""
    return {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None if content is None else {"content": content},
            }
        ],
    }


def token(text: str, p: float, top: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """A ``logprobs.content`` entry from probabilities (the wire carries their logs)."""
    return {
        "token": text,
        "logprob": math.log(p),
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": t, "logprob": math.log(q), "bytes": list(t.encode())} for t, q in top
        ],
    }


class Scripted:
    """A ``complete`` that answers with canned responses (or raises canned errors) in turn and
    keeps every request body it was sent."""

    def __init__(self, *answers: dict[str, Any] | Exception) -> None:
        self.answers = list(answers)
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def score(judge: ChoiceJudge, sample: Sample, complete: Complete) -> Score:
    return asyncio.run(judge.ascore(sample, complete))


FRANCE = Sample(
    "The capital of France is Paris.",
    expected="Paris",
    messages=user("What is the capital of France?"),
    context=["Paris is the capital and largest city of France."],
)


# -- reading replies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "choices", "expected"),
    [
        ("**A**", LETTERS, "A"),
        ("Answer: b.", LETTERS, "B"),
        ("Answer", LETTERS, None),
        ("4/5", DIGITS, "4"),
        ("I think 3", DIGITS, "3"),
        ("Score:4points", DIGITS, "4"),
        ("10", DIGITS, None),
        ("none", DIGITS, None),
        ("none", YES_NO, None),
        ("", YES_NO, None),
        ("`Yes`.", YES_NO, "yes"),
        ("NO!", YES_NO, "no"),
        ("Not sure, no.", [*YES_NO, "not sure"], "not sure"),
        ("nothing fits", [*YES_NO, "not sure"], None),
    ],
)
def test_parse_choice_reads_messy_replies(
    text: str, choices: list[str], expected: str | None
) -> None:
    assert parse_choice(text, choices) == expected


def test_logprob_expectation_over_the_scale() -> None:
    """'Score: 4' with 4 (0.5), 5 (0.3), 3 (0.1) at the digit: renormalised over the digits."""
    content = [
        token("Score", 0.7, [("Score", 0.7), ("The", 0.2)]),
        token(":", 0.9, [(":", 0.9)]),
        token(" 4", 0.5, [(" 4", 0.5), (" 5", 0.3), (" 3", 0.1), (" the", 0.05)]),
    ]
    complete = Scripted(reply("Score: 4", content))
    result = score(RubricJudge("The answer is polite."), FRANCE, complete)
    expected_score = (4 * 0.5 + 5 * 0.3 + 3 * 0.1) / 0.9
    assert result.error is None
    assert result.value == pytest.approx((expected_score - 1) / 4)
    assert result.detail is not None
    distribution = result.detail["distribution"]
    assert distribution == pytest.approx(
        {"1": 0.0, "2": 0.0, "3": 0.1 / 0.9, "4": 0.5 / 0.9, "5": 0.3 / 0.9}
    )
    assert sum(distribution.values()) == pytest.approx(1.0)
    assert result.detail["logprob_position"] == 2
    assert result.detail["choice_mass"] == pytest.approx(0.9)
    assert result.detail["score"] == 4 and result.detail["scale"] == [1, 5]
    assert result.detail["raw"] == ["Score: 4"]
    # The judge asked for the alternatives it reads.
    assert complete.bodies[0]["logprobs"] is True
    assert complete.bodies[0]["top_logprobs"] == TOP_LOGPROBS


def test_logprob_variants_of_one_label_add_up() -> None:
    content = [token("Yes", 0.6, [("Yes", 0.6), ("No", 0.2), (" yes", 0.1), ("The", 0.05)])]
    found = choice_distribution(reply("Yes", content), YES_NO)
    assert found is not None
    position, distribution, mass = found
    assert position == 0
    assert distribution == pytest.approx({"yes": 0.7 / 0.9, "no": 0.2 / 0.9})
    assert mass == pytest.approx(0.9)
    result = score(CorrectnessJudge(), FRANCE, Scripted(reply("Yes", content)))
    assert result.value == pytest.approx(0.7 / 0.9)
    assert result.detail is not None and result.detail["choice"] == "yes"


def test_logprob_position_falls_back_to_the_alternatives() -> None:
    # No generated token is a label; the first position offering one is read, and a picked
    # token the provider left out of its top list still counts.
    content = [
        token("The", 0.3, [("No", 0.4), ("Yes", 0.1)]),
        token(" answer", 0.9, [(" answer", 0.9)]),
    ]
    found = choice_distribution(reply("The answer", content), YES_NO)
    assert found is not None
    assert found[0] == 0
    assert found[1] == pytest.approx({"yes": 0.2, "no": 0.8})
    picked_missing = [token(" no", 0.6, [("Yes", 0.2)])]
    found = choice_distribution(reply("no", picked_missing), YES_NO)
    assert found is not None and found[1] == pytest.approx({"yes": 0.25, "no": 0.75})


@pytest.mark.parametrize(
    "response",
    [
        reply("yes"),
        reply("yes", []),
        reply("yes", [token("Maybe", 0.9, [("Perhaps", 0.05)])]),
        {"choices": [{"logprobs": {"content": "not a list"}}]},
        {"choices": [{"logprobs": {"content": [None, {"token": 3}]}}]},
        {"choices": []},
        {},
    ],
)
def test_choice_distribution_without_usable_logprobs(response: dict[str, Any]) -> None:
    assert choice_distribution(response, YES_NO) is None


# -- retries and failures -------------------------------------------------------------------


def test_retry_with_firmer_reminder_then_valid_choice() -> None:
    complete = Scripted(reply("I cannot say."), reply("**Yes**."))
    result = score(CorrectnessJudge(retries=2), FRANCE, complete)
    assert result.value == 1.0 and result.error is None
    assert result.detail is not None
    assert result.detail["raw"] == ["I cannot say.", "**Yes**."]
    assert result.detail["choice"] == "yes"
    assert result.detail["prompt_version"] == PROMPT_VERSION
    assert result.detail["model"] == "default"
    first, second = complete.bodies
    assert first["temperature"] == 0.0 and "seed" not in first
    # The retry re-asks the same question with a reminder (not a reply to the bad answer) and
    # samples, reproducibly, so a greedy model does not repeat itself.
    assert second["temperature"] == RETRY_TEMPERATURE and second["seed"] == 1
    assert len(second["messages"]) == len(first["messages"])
    assert second["messages"][-1]["content"].startswith(first["messages"][-1]["content"])
    assert second["messages"][-1]["content"].endswith("exactly one word: yes or no. Nothing else.")
    assert "I cannot say." not in str(second["messages"])


def test_no_valid_choice_after_retries() -> None:
    complete = Scripted(reply("maybe"))
    result = score(RubricJudge("Be brief.", retries=1), FRANCE, complete)
    assert result.value is None
    assert result.error == NO_VALID_CHOICE
    assert result.detail is not None
    assert result.detail["raw"] == ["maybe", "maybe"]
    assert result.detail["choice"] is None
    assert len(complete.bodies) == 2
    assert complete.bodies[1]["messages"][-1]["content"].endswith(
        "exactly one digit from 1 to 5. Nothing else."
    )
    # A reply with no message at all counts as no choice, too.
    result = score(RelevanceJudge(retries=0), FRANCE, Scripted({"choices": []}))
    assert result.error == NO_VALID_CHOICE and result.detail is not None
    assert result.detail["raw"] == [""]


def test_refused_logprobs_are_remembered_per_model() -> None:
    refusal = ServiceError(400, "'logprobs' is not supported by local models", param="logprobs")

    class RefusesLogprobs(Scripted):
        async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
            self.bodies.append(body)
            if "logprobs" in body:
                raise refusal
            return reply("no")

    first = RefusesLogprobs(reply("no"))
    result = score(CorrectnessJudge(model="no-logprobs-model"), FRANCE, first)
    assert result.value == 0.0 and result.error is None
    assert ["logprobs" in b for b in first.bodies] == [True, False]
    # Another judge on the same model does not ask again; one on another model does.
    again = RefusesLogprobs(reply("no"))
    assert score(RelevanceJudge(model="no-logprobs-model"), FRANCE, again).value == 0.0
    assert ["logprobs" in b for b in again.bodies] == [False]
    other = Scripted(reply("yes"))
    score(RelevanceJudge(model="another-model"), FRANCE, other)
    assert other.bodies[0]["logprobs"] is True
    # Told to use log-probs, a judge reports the refusal instead of working around it.
    insisted = RefusesLogprobs(reply("no"))
    result = score(RelevanceJudge(model="insisting-model", logprobs=True), FRANCE, insisted)
    assert result.value is None
    assert result.error == f"judge call failed: {refusal}"
    assert len(insisted.bodies) == 1


def test_other_failures_score_none_and_are_not_taken_for_refusals() -> None:
    unavailable = ServiceError(503, "upstream 'smollm2' timed out about logprobs")
    complete = Scripted(unavailable)
    result = score(GroundednessJudge(model="flaky-model"), FRANCE, complete)
    assert result.value is None
    assert result.error == "judge call failed: upstream 'smollm2' timed out about logprobs"
    assert len(complete.bodies) == 1
    # Not remembered as a refusal: the next call still asks for log-probs.
    later = Scripted(reply("yes"))
    assert score(GroundednessJudge(model="flaky-model"), FRANCE, later).value == 1.0
    assert later.bodies[0]["logprobs"] is True
    never = Scripted(reply("yes"))
    score(GroundednessJudge(model="flaky-model", logprobs=False), FRANCE, never)
    assert "logprobs" not in never.bodies[0] and "top_logprobs" not in never.bodies[0]


@pytest.mark.parametrize(
    ("judge", "sample", "error"),
    [
        (CorrectnessJudge(), Sample("Paris", messages=user("Capital?")), "no expected answer"),
        (CorrectnessJudge(), Sample("Paris", expected="  "), "no expected answer"),
        (GroundednessJudge(), Sample("Paris"), "no context passages"),
        (GroundednessJudge(), Sample("Paris", context=["", "  "]), "no context passages"),
        (RelevanceJudge(), Sample("Paris", expected="Paris"), "no question"),
    ],
)
def test_missing_inputs_make_no_call(judge: ChoiceJudge, sample: Sample, error: str) -> None:
    complete = Scripted(reply("yes"))
    result = score(judge, sample, complete)
    assert result.value is None
    assert result.error is not None and error in result.error
    assert complete.bodies == []


# -- prompts and options --------------------------------------------------------------------


def test_prompts_hold_the_sample_and_truncate_long_fields() -> None:
    long_answer = "word " * 2000
    sample = Sample(long_answer, expected="Paris", messages=user("What is the capital?"))
    complete = Scripted(reply("yes"))
    score(CorrectnessJudge(max_chars=500, model="judge-route"), sample, complete)
    body = complete.bodies[0]
    assert body["model"] == "judge-route" and body["max_tokens"] == 16
    question = body["messages"][-1]["content"]
    assert "Reference answer: Paris" in question and "What is the capital?" in question
    assert "[...]" in question and len(question) < 800
    # Two worked examples (yes, then no) come first, so a small model replies in form.
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert [body["messages"][i]["content"] for i in (2, 4)] == ["yes", "no"]
    complete = Scripted(reply("7"))
    result = score(RubricJudge("Is it concise?", scale=[0, 9]), FRANCE, complete)
    assert result.value == pytest.approx(7 / 9)
    rubric_prompt = complete.bodies[0]["messages"][-1]["content"]
    assert "Rubric: Is it concise?" in rubric_prompt and "from 0 (not at all) to 9" in rubric_prompt
    assert [complete.bodies[0]["messages"][i]["content"] for i in (2, 4)] == ["9", "0"]
    grounded = Scripted(reply("no"))
    score(GroundednessJudge(), Sample("x", context=["first", "second"]), grounded)
    assert "[1] first\n[2] second" in grounded.bodies[0]["messages"][-1]["content"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rubric": ""}, "rubric"),
        ({"rubric": "ok", "scale": [1, 10]}, "scale"),
        ({"rubric": "ok", "scale": [3, 3]}, "scale"),
        ({"rubric": "ok", "scale": "1-5"}, "scale"),
        ({"rubric": "ok", "retries": -1}, "retries"),
        ({"rubric": "ok", "temperature": 3}, "temperature"),
        ({"rubric": "ok", "max_tokens": 0}, "max_tokens"),
        ({"rubric": "ok", "logprobs": "yes"}, "logprobs"),
        ({"rubric": "ok", "max_chars": 10}, "max_chars"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RubricJudge(**options)


def test_judges_build_from_suite_specs() -> None:
    # build_scorer loads the deterministic scorers too (another module); skip until it exists.
    pytest.importorskip("flywheel.evals.scorers")
    from flywheel.evals.base import ScorerError, build_scorer, scorer_types

    assert {
        "judge.rubric",
        "judge.correctness",
        "judge.groundedness",
        "judge.faithfulness",
        "judge.relevance",
    } <= set(scorer_types())
    rubric = build_scorer({"type": "judge.rubric", "rubric": "Polite?", "scale": [1, 3]})
    assert isinstance(rubric, RubricJudge) and is_judge(rubric) and rubric.scale == (1, 3)
    faithful = build_scorer({"type": "judge.faithfulness", "model": "big", "logprobs": False})
    assert isinstance(faithful, GroundednessJudge)
    assert faithful.name == "judge.faithfulness" and faithful.model == "big"
    named = build_scorer({"type": "judge.relevance", "name": "on_topic"})
    assert named.name == "on_topic" and named.higher_is_better
    for spec in (
        {"type": "judge.rubric"},
        {"type": "judge.correctness", "colour": "blue"},
        {"type": "judge.rubric", "rubric": "x", "scale": [0, 12]},
    ):
        with pytest.raises(ScorerError):
            build_scorer(spec)


# -- the real local model through the gateway -----------------------------------------------


class GatewayComplete:
    """``complete`` over HTTP to a running server, keeping every response it got."""

    def __init__(self, server: RunningServer, auth: dict[str, str]) -> None:
        self.url = f"{server.base_url}/v1/chat/completions"
        self.auth = auth
        self.responses: list[dict[str, Any]] = []

    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=120) as client:
            response = await client.post(self.url, json=body, headers=self.auth)
        if response.status_code != 200:
            error = response.json().get("error") or {}
            raise ServiceError(response.status_code, str(error.get("message")), error.get("code"))
        answer: dict[str, Any] = response.json()
        self.responses.append(answer)
        return answer

    def texts(self) -> list[str]:
        return [r["choices"][0]["message"]["content"] for r in self.responses]


def test_judges_on_the_local_model(server: RunningServer, auth: dict[str, str]) -> None:
    """Each judge type on SmolLM2 (at most 10 calls): a value in range with the model's own
    replies in detail, scored from log-probs that form a distribution."""
    judges: list[ChoiceJudge] = [
        CorrectnessJudge(retries=1),
        GroundednessJudge(retries=1),
        RelevanceJudge(retries=1),
        RubricJudge("The answer is polite and helpful.", retries=1),
    ]
    answered = 0
    for judge in judges:
        complete = GatewayComplete(server, auth)
        result = asyncio.run(judge.ascore(FRANCE, complete))
        assert result.detail is not None
        assert result.detail["raw"] == complete.texts() and complete.texts()
        assert result.detail["prompt_version"] == PROMPT_VERSION
        if result.value is None:
            assert result.error == NO_VALID_CHOICE
            continue
        answered += 1
        assert result.error is None
        assert 0.0 <= result.value <= 1.0
        assert (
            parse_choice(result.detail["raw"][-1], list(judge.choices)) == result.detail["choice"]
        )
        # The local provider reports log-probs, so the value is an expectation over the labels.
        distribution = result.detail["distribution"]
        assert set(distribution) == set(judge.choices)
        assert sum(distribution.values()) == pytest.approx(1.0)
        assert all(0.0 <= p <= 1.0 for p in distribution.values())
        expected = sum(p * judge.choices[label] for label, p in distribution.items())
        assert result.value == pytest.approx(expected)
        assert 0.0 < result.detail["choice_mass"] <= 1.0 + 1e-6
        assert complete.responses[-1]["choices"][0]["logprobs"]["content"]
    # The worked examples keep even this tiny model to the format (it answers in one word).
    assert answered >= 3


def test_rubric_judge_without_logprobs_on_the_local_model(
    server: RunningServer, auth: dict[str, str]
) -> None:
    complete = GatewayComplete(server, auth)
    judge = RubricJudge("The answer names a city.", logprobs=False, retries=1)
    result = asyncio.run(judge.ascore(FRANCE, complete))
    assert result.detail is not None
    assert result.detail["raw"] == complete.texts()
    assert all(r["choices"][0]["logprobs"] is None for r in complete.responses)
    assert "distribution" not in result.detail
    if result.value is None:
        assert result.error == NO_VALID_CHOICE
    else:
        # Without log-probs the value is the picked score itself, on the 0..1 grid.
        assert result.value in {0.0, 0.25, 0.5, 0.75, 1.0}
        assert result.value == (result.detail["score"] - 1) / 4
