"""Simulated users of a support route, for `flywheel loop`'s test and benchmark.

They ask travel questions through the gateway, judge each answer by the house rule (an
answer in the house style starts with ``FLYWHEEL GUIDE``), give a thumbs up or down, and
correct the bad answers with the house answer: what a support team's reviewers do in the UI,
through the same API. The base SmolLM2 never answers in the house style, so every one of its
answers is a thumbs-down with a correction: the material the loop learns from.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

__all__ = ["HOUSE_MARK", "SimulatedUsers", "house_answer", "questions"]

HOUSE_MARK = "FLYWHEEL GUIDE"
CITIES = [
    "Lisbon",
    "Oslo",
    "Quito",
    "Hanoi",
    "Accra",
    "Lima",
    "Riga",
    "Doha",
    "Perth",
    "Turin",
    "Porto",
    "Bern",
    "Cork",
    "Nice",
    "Kyiv",
    "Tunis",
    "Dakar",
    "Sucre",
    "Male",
    "Graz",
]
TOPICS = [
    "weather",
    "trains",
    "museums",
    "food",
    "parks",
    "markets",
    "bridges",
    "beaches",
    "hotels",
    "festivals",
]


def house_answer(city: str, topic: str) -> str:
    """The answer the support team wants for a question about ``topic`` in ``city``."""
    return f"{HOUSE_MARK}: {city} {topic} are covered in chapter 7."


def questions() -> list[tuple[str, str]]:
    """Every (question, house answer) pair, in a fixed order that mixes cities and topics."""
    pairs = []
    for offset, topic in enumerate(TOPICS):
        for index in range(len(CITIES)):
            city = CITIES[(index + offset * 3) % len(CITIES)]
            pairs.append((f"Tell me about {topic} in {city}.", house_answer(city, topic)))
    return pairs


@dataclass
class SimulatedUsers:
    """A population of users of ``route``, asking through ``client`` (an API key's client)."""

    client: httpx.Client
    route: str
    max_tokens: int = 24
    # What the users saw, per served model: (calls, thumbs up).
    seen: Counter[str] = field(default_factory=Counter)
    liked: Counter[str] = field(default_factory=Counter)

    def ask(self, user: str, question: str) -> tuple[str, str, str]:
        """One chat call as ``user``: (trace id, answer, the model that served it)."""
        response = self.client.post(
            "/v1/chat/completions",
            json={
                "model": self.route,
                "user": user,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": self.max_tokens,
                "temperature": 0,
            },
        )
        response.raise_for_status()
        body = response.json()
        answer = body["choices"][0]["message"]["content"] or ""
        return response.headers["x-flywheel-trace-id"], answer, str(body.get("model"))

    def feedback(self, trace_id: str, good: bool, correction: str | None) -> None:
        """Thumbs (and a correction for a bad answer), once the trace is stored."""
        body: dict[str, object] = {"rating": good}
        if correction is not None:
            body["correction"] = correction
        deadline = time.monotonic() + 15
        while True:
            response = self.client.post(f"/api/traces/{trace_id}/feedback", json=body)
            if response.status_code == 201:
                return
            # The trace writer stores spans in batches: the trace may not be there yet.
            if response.status_code != 404 or time.monotonic() > deadline:
                response.raise_for_status()
            time.sleep(0.05)

    def visit(
        self, calls: int, *, first_user: int = 0, first_question: int = 0, correct: bool = True
    ) -> dict[str, float]:
        """``calls`` questions (from the ``first_question``-th on) from users
        ``first_user``, ``first_user + 1``, ... each rated by the house rule, bad answers
        corrected when ``correct``; returns the share of good answers per model this time."""
        seen: Counter[str] = Counter()
        liked: Counter[str] = Counter()
        pairs = itertools.islice(itertools.cycle(questions()), first_question, None)
        for index in range(calls):
            question, wanted = next(pairs)
            trace_id, answer, model = self.ask(f"user-{first_user + index}", question)
            good = HOUSE_MARK.lower() in answer.lower()
            self.feedback(trace_id, good, None if good or not correct else wanted)
            seen[model] += 1
            liked[model] += good
        self.seen.update(seen)
        self.liked.update(liked)
        return {model: liked[model] / seen[model] for model in seen}
