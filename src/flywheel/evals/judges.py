"""LLM judges: a model grades an answer by picking one label from a small set.

Every judge asks for exactly one label (``yes``/``no``, or a digit of a rubric's scale), shows
two worked examples as earlier chat turns, and reads the reply leniently (:func:`parse_choice`),
so that even the tiny default model answers in form. (Its verdicts are barely better than
chance; a judge worth trusting needs a bigger model, named with the ``model`` option.) A reply
without a valid label is asked again, up to ``retries`` times, with a firmer reminder. Where
the provider reports log-probabilities, the value is the expectation over the labels'
probabilities at the answer position (:func:`choice_distribution`), a finer and steadier
signal than the one sampled label.

The judge prompts are plain strings versioned by :data:`PROMPT_VERSION`, which every score
records: change a prompt, bump the version, and scores from different prompts never mix
silently. Long fields are cut to ``max_chars`` so the prompt fits a small model's context.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from flywheel.evals.base import Complete, Sample, Score, register_scorer

__all__ = [
    "PROMPT_VERSION",
    "ChoiceJudge",
    "CorrectnessJudge",
    "GroundednessJudge",
    "MissingInput",
    "RelevanceJudge",
    "RubricJudge",
    "choice_distribution",
    "parse_choice",
]

PROMPT_VERSION = "judges-v1"
TOP_LOGPROBS = 10
RETRY_TEMPERATURE = 0.7
DEFAULT_MAX_CHARS = 2000
NO_VALID_CHOICE = "judge gave no valid choice"
Message = dict[str, str]

# Models whose provider refused `logprobs` (a 400 naming it): judges stop asking them for it.
_LOGPROBS_REFUSED: dict[str, bool] = {}
# Words are runs of letters or of digits, so "4/5", "**A**" and "Score:4" split where a
# reader would split them, and "4points" still yields "4".
_WORD = re.compile(r"[^\W\d_]+|\d+")
_YES_NO = {"yes": 1.0, "no": 0.0}


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The first of ``choices`` that ``text`` states, as spelled in ``choices``; ``None`` if
    it states none.

    Matching is case-insensitive and by whole words, ignoring punctuation and markdown:
    ``"**A**"`` and ``"Answer: b."`` choose from ``["A", "B"]``, ``"I think 3"`` and ``"4/5"``
    from ``["1", ..., "5"]``, while "Answer" does not count as "A" nor "10" as "1". A choice
    may be several words ("not sure"); the longest choice wins at one position.
    """
    words = _words(text)
    labels = sorted(
        ((tuple(_words(choice)), choice) for choice in choices if _words(choice)),
        key=lambda pair: -len(pair[0]),
    )
    for start in range(len(words)):
        for label_words, choice in labels:
            if tuple(words[start : start + len(label_words)]) == label_words:
                return choice
    return None


def _token_label(token: Any, lookup: Mapping[str, str]) -> str | None:
    """The choice a single token spells (" Yes", "4", "**B"), if any."""
    words = _words(token) if isinstance(token, str) else []
    return lookup.get(words[0]) if len(words) == 1 else None


def _alternatives(entry: Any) -> list[Mapping[str, Any]]:
    found = entry.get("top_logprobs") if isinstance(entry, Mapping) else None
    return [a for a in found if isinstance(a, Mapping)] if isinstance(found, list) else []


def _probability(logprob: Any) -> float:
    if isinstance(logprob, bool) or not isinstance(logprob, int | float):
        return 0.0
    return math.exp(min(float(logprob), 0.0)) if math.isfinite(logprob) else 0.0


def choice_distribution(
    response: Mapping[str, Any], choices: Sequence[str]
) -> tuple[int, dict[str, float], float] | None:
    """The probability of each choice at the answer position of a chat completion, from
    ``choices[0].logprobs.content``; ``None`` when the response has no usable log-probs.

    The answer position is the first generated token that spells a choice (" Yes", "4",
    "**B"), else the first position whose ``top_logprobs`` hold one. Token variants of one
    choice ("Yes", " yes") add up, and the result is renormalised over the choices. Returns
    (position, {choice: probability}, the choices' probability mass before renormalising).
    Only single-word choices can be read this way: a longer one is never a single token.
    """
    try:
        content = response["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, list):
        return None
    lookup = {ws[0]: c for c in choices if len(ws := _words(c)) == 1}
    entries = [e if isinstance(e, Mapping) else {} for e in content]
    position = next(
        (i for i, e in enumerate(entries) if _token_label(e.get("token"), lookup)), None
    )
    if position is None:
        position = next(
            (
                i
                for i, e in enumerate(entries)
                if any(_token_label(a.get("token"), lookup) for a in _alternatives(e))
            ),
            None,
        )
    if position is None:
        return None
    entry = entries[position]
    # One probability per distinct token; the picked token counts even when the provider left
    # it out of its own top list.
    logprobs = {a.get("token"): a.get("logprob") for a in _alternatives(entry)}
    logprobs.setdefault(entry.get("token"), entry.get("logprob"))
    mass: dict[str, float] = {}
    for token, logprob in logprobs.items():
        if (label := _token_label(token, lookup)) is not None:
            mass[label] = mass.get(label, 0.0) + _probability(logprob)
    total = sum(mass.values())
    if not total > 0:
        return None
    distribution = {c: mass.get(c, 0.0) / total for c in lookup.values()}
    return position, distribution, total


def _message_text(response: Mapping[str, Any]) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return ""
    return content if isinstance(content, str) else ""


def _refuses_logprobs(exc: Exception) -> bool:
    """Whether a failed call was a 400 about ``logprobs``: a ServiceError, or any client
    error carrying ``status_code`` (or ``response.status_code``) and the message."""
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    if status != 400:
        return False
    text = f"{exc} {getattr(exc, 'message', '')}"
    # A streamed client response that was never read raises on `.text`; the rest still counts.
    with contextlib.suppress(Exception):
        text += f" {getattr(response, 'text', '')}"
    return "logprobs" in text


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rstrip() + " [...]"


def _check_options(retries: int, temperature: float, max_tokens: int, max_chars: int) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 2
    ):
        raise ValueError(f"temperature must be a number from 0 to 2, not {temperature!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, not {max_tokens!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 100:
        raise ValueError(f"max_chars must be an integer >= 100, not {max_chars!r}")


class MissingInput(Exception):
    """Raised by :meth:`ChoiceJudge.messages` when the sample lacks what the judge needs (a
    reference, context): the score is None with this message, and no call is made."""


def _with_examples(system: str, examples: Sequence[tuple[str, str]], prompt: str) -> list[Message]:
    """The system line, worked examples as earlier turns, then the real question. A tiny model
    copies the examples' one-word replies far more reliably than it follows an instruction."""
    messages = [{"role": "system", "content": system}]
    for question, reply in examples:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": prompt})
    return messages


class ChoiceJudge:
    """A judge that asks ``model`` to pick one of ``choices`` (label → value) and scores the
    pick, or the expectation over the labels when the provider reports log-probs.

    ``logprobs``: ``True`` always asks for them, ``False`` never, ``None`` asks unless the
    model's provider once refused them. A reply without a valid label is asked again (at most
    ``retries`` times) with a firmer reminder and, since a greedy model would only repeat
    itself, at ``RETRY_TEMPERATURE`` or more with a fixed seed per attempt (reproducible).
    Subclasses build the prompt in :meth:`messages`.
    """

    higher_is_better = True

    def __init__(
        self,
        name: str,
        choices: Mapping[str, float],
        *,
        model: str = "default",
        retries: int = 2,
        temperature: float = 0.0,
        max_tokens: int = 16,
        logprobs: bool | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        _check_options(retries, temperature, max_tokens, max_chars)
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ValueError(f"logprobs must be true, false or null, not {logprobs!r}")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a route or model name")
        self.name = name
        self.choices = dict(choices)
        self.model = model
        self.retries = retries
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self.max_chars = max_chars

    def messages(self, sample: Sample) -> list[Message]:
        """The judge prompt for ``sample``; raises :class:`MissingInput` when it cannot be
        asked."""
        raise NotImplementedError

    def reminder(self) -> str:
        """The firmer instruction added to the question after a reply without a valid label."""
        return f"Your reply must be exactly one word: {' or '.join(self.choices)}. Nothing else."

    def describe(self, choice: str, detail: dict[str, Any]) -> None:
        """Add judge-specific detail for the chosen label (the rubric adds its raw score)."""

    def _wants_logprobs(self) -> bool:
        if self.logprobs is None:
            return not _LOGPROBS_REFUSED.get(self.model, False)
        return self.logprobs

    async def _ask(self, complete: Complete, messages: list[Message], attempt: int) -> Any:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if attempt:
            body.update(temperature=max(self.temperature, RETRY_TEMPERATURE), seed=attempt)
        if not self._wants_logprobs():
            return await complete(body)
        try:
            return await complete({**body, "logprobs": True, "top_logprobs": TOP_LOGPROBS})
        except Exception as exc:
            if self.logprobs is not None or not _refuses_logprobs(exc):
                raise
        _LOGPROBS_REFUSED[self.model] = True
        return await complete(body)

    async def ascore(self, sample: Sample, complete: Complete) -> Score:
        """Ask the model (again, for replies without a valid label) and score its pick.

        The detail keeps every reply (``raw``), the ``choice``, ``prompt_version`` and
        ``model``, and with log-probs the ``distribution`` over the choices, the token
        ``logprob_position`` it was read at and ``choice_mass`` (the choices' share of the
        probability there: low means the model hardly considered any of them).
        """
        detail: dict[str, Any] = {
            "raw": [],
            "choice": None,
            "prompt_version": PROMPT_VERSION,
            "model": self.model,
        }
        try:
            messages = self.messages(sample)
        except MissingInput as exc:
            return Score(None, detail, error=str(exc))
        labels = list(self.choices)
        for attempt in range(self.retries + 1):
            if attempt == 1:
                # A fresh question with the reminder, not a reply to the bad answer: a small
                # model shown its own output tends to copy it.
                last = messages[-1]
                messages = [
                    *messages[:-1],
                    {**last, "content": f"{last['content']}\n\n{self.reminder()}"},
                ]
            try:
                response = await self._ask(complete, messages, attempt)
            except Exception as exc:  # a judge failure scores None; it must not end the run
                return Score(None, detail, error=f"judge call failed: {exc}")
            if not isinstance(response, Mapping):
                return Score(None, detail, error="judge call returned no chat completion")
            text = _message_text(response)
            detail["raw"].append(text)
            choice = parse_choice(text, labels)
            if choice is None:
                continue
            detail["choice"] = choice
            self.describe(choice, detail)
            found = choice_distribution(response, labels)
            if found is None:
                return Score(self.choices[choice], detail)
            position, distribution, mass = found
            detail.update(
                distribution=distribution, logprob_position=position, choice_mass=round(mass, 6)
            )
            value = sum(p * self.choices[label] for label, p in distribution.items())
            return Score(value, detail)
        return Score(None, detail, error=NO_VALID_CHOICE)


_YES_NO_SYSTEM = "You are a strict grader. You reply with yes or no and nothing else."
_RUBRIC_SYSTEM = "You are a strict grader. You reply with one digit and nothing else."
_RUBRIC_PROMPT = (
    "Rubric: {rubric}\n{question}Answer: {answer}\n"
    "How well does the answer meet the rubric, from {low} (not at all) to {high} (fully)? "
    "Reply with one digit."
)
_RUBRIC_EXAMPLE = ("The answer is short.", "What is the capital of Italy?")
_RUBRIC_EXAMPLE_ANSWERS = (
    "Rome.",
    "Well, Italy has many beautiful and historic cities, and which one is the capital has been "
    "debated for centuries, but since 1871 the capital has been Rome.",
)
_CORRECTNESS_PROMPT = (
    "{question}Reference answer: {reference}\nAnswer to grade: {answer}\n"
    "Does the answer to grade agree with the reference answer? Reply yes or no."
)
_CORRECTNESS_EXAMPLES = (
    ("Question: What is the largest planet?\n", "Jupiter", "Jupiter is the largest planet."),
    ("Question: What is the largest planet?\n", "Jupiter", "Mars is the largest planet."),
)
_GROUNDEDNESS_PROMPT = (
    "Context:\n{context}\nAnswer: {answer}\n"
    "Is every claim in the answer supported by the context? Reply yes or no."
)
_GROUNDEDNESS_EXAMPLES = (
    ("[1] The Nile is the longest river in Africa.", "The Nile is a river in Africa."),
    ("[1] The Nile is the longest river in Africa.", "The Nile is a river in Asia."),
)
_CONTEXT_RELEVANCE_PROMPT = (
    "Question: {question}\nRetrieved passages:\n{context}\nDo the passages contain the "
    "information needed to answer the question? Reply yes or no."
)
_CONTEXT_RELEVANCE_EXAMPLES = (
    ("How tall is Mount Everest?", "[1] Mount Everest is 8,849 metres tall."),
    ("How tall is Mount Everest?", "[1] The Nile is the longest river in Africa."),
)
_RELEVANCE_PROMPT = (
    "Question: {question}\nAnswer: {answer}\nDoes the answer address the question? Reply yes or no."
)
_RELEVANCE_EXAMPLES = (
    ("How tall is Mount Everest?", "Mount Everest is 8,849 metres tall."),
    ("How tall is Mount Everest?", "I like pizza with extra cheese."),
)


def _question_line(question: str, limit: int) -> str:
    return f"Question: {_truncate(question, limit)}\n" if question.strip() else ""


class RubricJudge(ChoiceJudge):
    """G-Eval style: a rubric, the question and the answer; the model gives one score of the
    scale, reported as 0..1 ((score - low) / (high - low)) with the raw score in detail."""

    def __init__(
        self,
        rubric: str,
        scale: Sequence[int] = (1, 5),
        name: str = "judge.rubric",
        **options: Any,
    ) -> None:
        if not isinstance(rubric, str) or not rubric.strip():
            raise ValueError("rubric must be a non-empty string")
        if (
            isinstance(scale, str)
            or not isinstance(scale, Sequence)
            or len(scale) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in scale)
        ):
            raise ValueError(f"scale must be two integers [low, high], not {scale!r}")
        low, high = scale
        # One digit per score: each is then a single token, which log-prob scoring needs.
        if not 0 <= low < high <= 9:
            raise ValueError(f"scale must satisfy 0 <= low < high <= 9, not {list(scale)}")
        choices = {str(s): (s - low) / (high - low) for s in range(low, high + 1)}
        super().__init__(name, choices, **options)
        self.rubric = rubric.strip()
        self.scale = (low, high)

    def messages(self, sample: Sample) -> list[Message]:
        low, high = self.scale
        rubric, question = _RUBRIC_EXAMPLE
        examples = [
            (
                _RUBRIC_PROMPT.format(
                    rubric=rubric,
                    question=f"Question: {question}\n",
                    answer=answer,
                    low=low,
                    high=high,
                ),
                str(score),
            )
            for answer, score in zip(_RUBRIC_EXAMPLE_ANSWERS, (high, low), strict=True)
        ]
        prompt = _RUBRIC_PROMPT.format(
            rubric=_truncate(self.rubric, self.max_chars),
            question=_question_line(sample.question, self.max_chars),
            answer=_truncate(sample.output, self.max_chars),
            low=low,
            high=high,
        )
        return _with_examples(_RUBRIC_SYSTEM, examples, prompt)

    def reminder(self) -> str:
        low, high = self.scale
        return f"Your reply must be exactly one digit from {low} to {high}. Nothing else."

    def describe(self, choice: str, detail: dict[str, Any]) -> None:
        detail["score"] = int(choice)
        detail["scale"] = list(self.scale)


class CorrectnessJudge(ChoiceJudge):
    """Does the answer agree with the reference (``sample.expected``)? 1 for yes, 0 for no."""

    def __init__(self, name: str = "judge.correctness", **options: Any) -> None:
        super().__init__(name, _YES_NO, **options)

    def messages(self, sample: Sample) -> list[Message]:
        if not (sample.expected or "").strip():
            raise MissingInput("the sample has no expected answer to judge correctness against")
        examples = [
            (_CORRECTNESS_PROMPT.format(question=q, reference=r, answer=a), reply)
            for (q, r, a), reply in zip(_CORRECTNESS_EXAMPLES, ("yes", "no"), strict=True)
        ]
        prompt = _CORRECTNESS_PROMPT.format(
            question=_question_line(sample.question, self.max_chars),
            reference=_truncate(sample.expected or "", self.max_chars),
            answer=_truncate(sample.output, self.max_chars),
        )
        return _with_examples(_YES_NO_SYSTEM, examples, prompt)


class GroundednessJudge(ChoiceJudge):
    """Is every claim of the answer supported by ``sample.context``? 1 for yes, 0 for no (a
    hallucination check)."""

    def __init__(self, name: str = "judge.groundedness", **options: Any) -> None:
        super().__init__(name, _YES_NO, **options)

    def messages(self, sample: Sample) -> list[Message]:
        passages = [p.strip() for p in sample.context if isinstance(p, str) and p.strip()]
        if not passages:
            raise MissingInput("the sample has no context passages to check the answer against")
        context = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
        examples = [
            (_GROUNDEDNESS_PROMPT.format(context=c, answer=a), reply)
            for (c, a), reply in zip(_GROUNDEDNESS_EXAMPLES, ("yes", "no"), strict=True)
        ]
        prompt = _GROUNDEDNESS_PROMPT.format(
            context=_truncate(context, self.max_chars),
            answer=_truncate(sample.output, self.max_chars),
        )
        return _with_examples(_YES_NO_SYSTEM, examples, prompt)


class RelevanceJudge(ChoiceJudge):
    """Does the answer address the question (the last user message)? 1 for yes, 0 for no."""

    def __init__(self, name: str = "judge.relevance", **options: Any) -> None:
        super().__init__(name, _YES_NO, **options)

    def messages(self, sample: Sample) -> list[Message]:
        if not sample.question.strip():
            raise MissingInput("the sample has no question (user message) to judge relevance")
        examples = [
            (_RELEVANCE_PROMPT.format(question=q, answer=a), reply)
            for (q, a), reply in zip(_RELEVANCE_EXAMPLES, ("yes", "no"), strict=True)
        ]
        prompt = _RELEVANCE_PROMPT.format(
            question=_truncate(sample.question, self.max_chars),
            answer=_truncate(sample.output, self.max_chars),
        )
        return _with_examples(_YES_NO_SYSTEM, examples, prompt)


class ContextRelevanceJudge(ChoiceJudge):
    """Do the retrieved passages (``sample.context``) hold what the question needs? 1 for
    yes, 0 for no: a retrieval check that needs no relevance labels."""

    def __init__(self, name: str = "judge.context_relevance", **options: Any) -> None:
        super().__init__(name, _YES_NO, **options)

    def messages(self, sample: Sample) -> list[Message]:
        if not sample.question.strip():
            raise MissingInput("the sample has no question (user message) to judge against")
        passages = [p.strip() for p in sample.context if isinstance(p, str) and p.strip()]
        if not passages:
            raise MissingInput("the sample has no context passages to judge")
        context = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
        examples = [
            (_CONTEXT_RELEVANCE_PROMPT.format(question=q, context=c), reply)
            for (q, c), reply in zip(_CONTEXT_RELEVANCE_EXAMPLES, ("yes", "no"), strict=True)
        ]
        prompt = _CONTEXT_RELEVANCE_PROMPT.format(
            question=_truncate(sample.question, self.max_chars),
            context=_truncate(context, self.max_chars),
        )
        return _with_examples(_YES_NO_SYSTEM, examples, prompt)


# Options are keyword arguments of the classes; an unknown one is a TypeError (a 400 naming it).
register_scorer("judge.rubric")(RubricJudge)
register_scorer("judge.correctness")(CorrectnessJudge)
register_scorer("judge.groundedness")(GroundednessJudge)
register_scorer("judge.faithfulness")(functools.partial(GroundednessJudge, "judge.faithfulness"))
register_scorer("judge.relevance")(RelevanceJudge)
register_scorer("judge.context_relevance")(ContextRelevanceJudge)
