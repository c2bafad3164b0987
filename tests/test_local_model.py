"""The local chat model and its batching engine, on the real SmolLM2 weights (no mocks).

The model is converted once into the model cache (``FLYWHEEL_MODEL_CACHE`` or
``.cache/models``) and loaded once for the module. It runs in float32: greedy decoding in
bfloat16 is not batch-invariant (Hugging Face ``generate`` itself picks different tokens for a
prompt alone and in a padded batch), so exact token comparisons need float32.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flywheel.config import CatalogModel
from flywheel.providers.base import InvalidRequest
from flywheel.providers.local import LocalProvider
from flywheel.providers.local_engine import (
    BatchingEngine,
    EngineClosedError,
    EngineStepError,
    TokenEvent,
)
from flywheel.providers.local_model import (
    LocalChatModel,
    SamplingParams,
    TextDelta,
    _IncrementalDecoder,
    materialize_model,
    resolve_model_source,
)

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("FLYWHEEL_MODEL_CACHE", REPO / ".cache" / "models"))
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model() -> Iterator[LocalChatModel]:
    folder = materialize_model("builtin:smollm2", MODEL_CACHE)
    chat = LocalChatModel(folder, dtype="float32", max_batch_size=8)
    chat.start()
    yield chat
    chat.close()
    chat.close()
    assert not chat.engine.running


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def greedy(max_tokens: int, stop: list[str] | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, stop=stop or [])


async def collect(
    model: LocalChatModel, messages: list[dict[str, str]], params: SamplingParams
) -> tuple[str, list[TextDelta]]:
    deltas = [d async for d in model.generate(messages, params)]
    return "".join(d.text for d in deltas), deltas


async def token_ids(
    model: LocalChatModel,
    messages: list[dict[str, str]],
    params: SamplingParams,
    started: asyncio.Event | None = None,
) -> list[TokenEvent]:
    events = []
    async for event in model.submit(model.encode_chat(messages, params.max_tokens), params):
        events.append(event)
        if started is not None and len(events) == 3:
            started.set()
    return events


async def wait_idle(model: LocalChatModel, timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.02)):
        if model.engine.active == 0 and model.engine.waiting == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"engine still busy: {model.engine.active} active, {model.engine.waiting} waiting"
    )


def test_greedy_answer_names_paris(model: LocalChatModel) -> None:
    text, deltas = asyncio.run(collect(model, FRANCE, greedy(24)))
    assert "Paris" in text
    assert deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert "<|im_end|>" not in text and "<|im_start|>" not in text


def test_batched_output_matches_alone(model: LocalChatModel) -> None:
    """Continuous batching must not change a request's tokens: the target runs alone, then
    with five other requests that join while it is decoding (different prompt lengths, one
    longer than everything running, some finishing early so rows leave the batch)."""
    target = (user("Write a haiku about the sea."), greedy(20))
    others = [
        (FRANCE, greedy(14)),
        (user("List three colors."), greedy(4)),
        (user("What is 2+2?"), greedy(8)),
        (
            [
                {"role": "system", "content": "You are terse. " * 12 + "Answer in one line."},
                {"role": "user", "content": "Who wrote Hamlet?"},
            ],
            greedy(12),
        ),
        (user("Tell me a joke about cats and dogs."), greedy(16)),
    ]

    async def scenario() -> tuple[list[list[TokenEvent]], list[list[TokenEvent]]]:
        alone = [await token_ids(model, m, p) for m, p in [target, *others]]
        started = asyncio.Event()
        first = asyncio.create_task(token_ids(model, *target, started=started))
        await started.wait()
        rest = await asyncio.gather(*(token_ids(model, m, p) for m, p in others))
        return alone, [await first, *rest]

    alone, batched = asyncio.run(scenario())
    # Alone, the engine agrees with Hugging Face's own greedy generation (an independent check of
    # positions and masks), run on the engine thread between steps.
    prompt = model.encode_chat(target[0])
    reference = model.engine.call(
        lambda: model.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=target[1].max_tokens,
            do_sample=False,
        )[0, len(prompt) :].tolist()
    ).result()
    assert [e.token_id for e in alone[0]] == reference
    for single, together in zip(alone, batched, strict=True):
        assert [e.token_id for e in together] == [e.token_id for e in single]
        assert together[-1].finish_reason == single[-1].finish_reason


def test_seed_makes_sampling_reproducible(model: LocalChatModel) -> None:
    prompt = user("Write a sentence about the moon.")

    async def ids(params: SamplingParams) -> list[int]:
        return [e.token_id for e in await token_ids(model, prompt, params)]

    async def run(seed: int) -> list[int]:
        return await ids(SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=seed))

    async def scenario() -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        # top_p=0 keeps only the likeliest token, so sampling then equals greedy decoding.
        nucleus = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.0, seed=3)
        return await run(7), await run(7), await run(8), await ids(nucleus), await ids(greedy(8))

    first, again, other, top_only, greedy_ids = asyncio.run(scenario())
    assert first == again
    assert first != other
    assert top_only == greedy_ids


def test_max_tokens_ends_with_length(model: LocalChatModel) -> None:
    messages = user("Write a long story about a dragon who learns to paint.")
    text, deltas = asyncio.run(collect(model, messages, greedy(5)))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 5
    assert text


def test_token_counts(model: LocalChatModel) -> None:
    prompt = model.encode_chat(FRANCE)
    assert model.count_tokens(FRANCE) == len(prompt)
    assert model.count_tokens("Hello world") == 2
    rendered = model.tokenizer.apply_chat_template(
        FRANCE, add_generation_prompt=True, tokenize=False
    )
    assert isinstance(rendered, str)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert model.tokenizer.decode(prompt) == rendered

    async def scenario() -> tuple[list[TokenEvent], list[TextDelta]]:
        events = await token_ids(model, FRANCE, greedy(24))
        _, deltas = await collect(model, FRANCE, greedy(24))
        return events, deltas

    events, deltas = asyncio.run(scenario())
    assert events[-1].token_id in model.eos_token_ids
    assert all(d.prompt_tokens == len(prompt) for d in deltas)
    # completion_tokens counts every generated token, the end-of-sequence token included.
    assert deltas[-1].completion_tokens == len(events)
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts)
    text = "".join(d.text for d in deltas)
    ids = [e.token_id for e in events[:-1]]
    assert text == model.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_truncate_output(model: LocalChatModel) -> None:
    full, _ = asyncio.run(collect(model, FRANCE, greedy(24)))
    assert len(full) > 20
    # A stop string from the middle of the answer spans several tokens.
    stop = full[8:19]
    expected = full[: full.find(stop)]

    async def scenario() -> list[tuple[str, list[TextDelta]]]:
        return [
            await collect(model, FRANCE, greedy(24, stop=[stop])),
            # The earliest match wins among several stop strings.
            await collect(model, FRANCE, greedy(24, stop=["no such text", full[-6:], stop])),
            # Text held back as a possible stop prefix is released when the stop never completes.
            await collect(model, FRANCE, greedy(24, stop=[full[-3:] + "@@@"])),
        ]

    (cut, deltas), (cut_many, _), (whole, whole_deltas) = asyncio.run(scenario())
    assert cut == expected
    assert cut_many == expected
    assert deltas[-1].finish_reason == "stop"
    assert stop not in "".join(d.text for d in deltas)
    assert whole == full
    assert whole_deltas[-1].finish_reason == "stop"


def test_cancelling_frees_batch_slots(model: LocalChatModel) -> None:
    async def scenario() -> str:
        long = SamplingParams(max_tokens=400, temperature=0.8, seed=1)
        story = user("Write a very long story about a lighthouse.")
        # Ten requests for eight slots: eight run, two wait; cancel them all in both states.
        streams = [model.generate(story, long) for _ in range(10)]
        tasks = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.gather(*tasks[:2])
        for task in tasks[2:]:
            task.cancel()
        await asyncio.gather(*tasks[2:], return_exceptions=True)
        # Streams whose task was cancelled mid-wait are already closed; the others close here.
        for stream in streams:
            await stream.aclose()
        await wait_idle(model)
        # The engine is free again: a new request runs to completion.
        text, _ = await collect(model, FRANCE, greedy(24))
        return text

    assert "Paris" in asyncio.run(scenario())


def test_prompt_too_long_is_rejected(model: LocalChatModel) -> None:
    huge = user("word " * (model.context_length + 10))
    with pytest.raises(ValueError, match="context"):
        model.encode_chat(huge)
    with pytest.raises(ValueError, match="max_tokens=8190"):
        model.encode_chat(FRANCE, max_tokens=model.context_length - 2)

    async def scenario() -> None:
        async for _ in model.generate(huge, greedy(4)):
            pass

    with pytest.raises(ValueError, match="context"):
        asyncio.run(scenario())


def test_bad_messages_and_params_are_rejected(model: LocalChatModel) -> None:
    with pytest.raises(ValueError, match="role"):
        model.encode_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        model.encode_chat([{"role": "user", "content": cast(str, ["x"])}])
    with pytest.raises(ValueError, match="non-empty"):
        model.encode_chat([])
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=4, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_tokens=4, temperature=-1)


def test_failed_step_reaches_the_request_and_engine_keeps_serving(model: LocalChatModel) -> None:
    async def scenario() -> str:
        # A token id outside the vocabulary makes the embedding lookup raise inside the engine.
        bad = model.submit([1, model.model.config.vocab_size + 5, 2], greedy(4))
        with pytest.raises(EngineStepError):
            async for _ in bad:
                pass
        text, _ = await collect(model, FRANCE, greedy(24))
        return text

    assert "Paris" in asyncio.run(scenario())


def test_incremental_decoding_never_splits_characters(model: LocalChatModel) -> None:
    text = "Café ☕ naïve 🌍🚀 日本語のテキスト — done"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = _IncrementalDecoder(model.tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert len(ids) > len(text.split())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_engine_lifecycle(model: LocalChatModel) -> None:
    engine = BatchingEngine(
        model.model, eos_token_ids=model.eos_token_ids, context_length=model.context_length
    )

    async def submit() -> None:
        engine.submit([1, 2, 3], greedy(2))

    with pytest.raises(EngineClosedError):
        asyncio.run(submit())
    engine.start()
    engine.start()
    assert engine.running
    engine.close()
    engine.close()
    assert not engine.running
    with pytest.raises(EngineClosedError):
        asyncio.run(submit())


def test_model_sources(tmp_path: Path, model: LocalChatModel) -> None:
    gguf = resolve_model_source("builtin:smollm2")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    assert resolve_model_source(str(model.folder)) == model.folder.resolve()
    assert materialize_model(str(model.folder), tmp_path) == model.folder.resolve()
    # The conversion is cached: materializing again returns the same, complete folder.
    assert materialize_model("builtin:smollm2", MODEL_CACHE) == model.folder
    assert {"config.json", "model.safetensors", "chat_template.jinja"} <= {
        p.name for p in model.folder.iterdir()
    }
    with pytest.raises(ValueError, match="builtin:nope"):
        resolve_model_source("builtin:nope")
    with pytest.raises(FileNotFoundError, match="missing-model"):
        resolve_model_source(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"config\.json"):
        resolve_model_source(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="gguf"):
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_bfloat16_model_with_packed_weights(model: LocalChatModel) -> None:
    """The serving default on CPUs with bf16 support: bfloat16 with oneDNN-packed linears."""
    chat = LocalChatModel(model.folder, dtype="bfloat16", max_batch_size=4)
    chat.start()
    try:
        # q, k, v, o, gate, up and down in every layer, plus the output head.
        every_linear = 7 * chat.model.config.num_hidden_layers + 1
        if torch.backends.mkldnn.is_available() and (
            torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        ):
            assert chat.packed_linears == every_linear
        else:
            # oneDNN's bf16 packing needs AVX-512 (or AVX-NE-CONVERT): all or nothing.
            assert chat.packed_linears in (0, every_linear)
        text, deltas = asyncio.run(collect(chat, FRANCE, greedy(16)))
    finally:
        chat.close()
    assert "Paris" in text
    assert deltas[-1].finish_reason == "stop"


def scored(max_tokens: int, top: int = 5) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=True, top_logprobs=top)


def test_logprobs_are_the_models_own(model: LocalChatModel) -> None:
    """Each token's log-probability and top alternatives agree with one plain forward pass
    over the prompt and the generated tokens."""
    events = asyncio.run(token_ids(model, FRANCE, scored(10)))
    prompt = model.encode_chat(FRANCE)
    ids = [e.token_id for e in events]

    def reference() -> torch.Tensor:
        logits = model.model(torch.tensor([prompt + ids])).logits[0].float()
        return torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)

    expected = model.engine.call(reference).result()
    for i, event in enumerate(events):
        assert event.logprob is not None
        assert event.logprob == pytest.approx(expected[i, event.token_id].item(), abs=1e-3)
        assert len(event.top_logprobs) == 5
        values = [v for _, v in event.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy decoding picks the likeliest token: the first alternative.
        assert event.top_logprobs[0] == (event.token_id, pytest.approx(event.logprob))
        top_ids = expected[i].topk(5).indices.tolist()
        assert [t for t, _ in event.top_logprobs] == top_ids


def test_logprobs_only_for_requests_that_ask(model: LocalChatModel) -> None:
    async def scenario() -> tuple[list[TokenEvent], list[TokenEvent]]:
        with_scores, plain = await asyncio.gather(
            token_ids(model, FRANCE, scored(12, top=0)), token_ids(model, FRANCE, greedy(12))
        )
        return with_scores, plain

    with_scores, plain = asyncio.run(scenario())
    # Batched together, both rows decode the same tokens; only the asking row is scored.
    assert [e.token_id for e in with_scores] == [e.token_id for e in plain]
    assert all(e.logprob is not None and e.logprob <= 0 for e in with_scores)
    assert all(e.top_logprobs == () for e in with_scores)
    assert all(e.logprob is None and e.top_logprobs == () for e in plain)


def test_text_deltas_carry_token_logprobs(model: LocalChatModel) -> None:
    text, deltas = asyncio.run(collect(model, FRANCE, scored(24, top=3)))
    tokens = [t for d in deltas for t in d.logprobs]
    assert deltas[-1].finish_reason == "stop"
    # Every generated token but the end-of-sequence one, whose bytes spell the text.
    assert len(tokens) == deltas[-1].completion_tokens - 1
    assert b"".join(bytes(t.token_bytes) for t in tokens).decode() == text
    assert "".join(t.token for t in tokens) == text
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens)
    # A character split across tokens: each token holds some of its bytes, exactly.
    ids = model.tokenizer("🌍", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert b"".join(bytes(model.token_text(i)[1]) for i in ids) == "🌍".encode()


def test_logprob_params_are_checked() -> None:
    with pytest.raises(ValueError, match="top_logprobs must be between 0 and 20"):
        SamplingParams(max_tokens=4, logprobs=True, top_logprobs=21)
    with pytest.raises(ValueError, match="needs logprobs"):
        SamplingParams(max_tokens=4, top_logprobs=2)
    with pytest.raises(ValueError, match="logprobs must be a boolean"):
        SamplingParams(max_tokens=4, logprobs=cast(bool, "yes"))
    assert SamplingParams(max_tokens=4, logprobs=True, top_logprobs=20).top_logprobs == 20


def test_provider_returns_openai_logprobs(model: LocalChatModel) -> None:
    provider = LocalProvider("local", MODEL_CACHE, dtype="float32", max_batch_size=2)
    catalog = CatalogModel(name="smol", provider="local", source=str(model.folder))
    body = {"messages": FRANCE, "temperature": 0, "max_tokens": 12}

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        try:
            asked = await provider.chat(catalog, {**body, "logprobs": True, "top_logprobs": 3}, 60)
            plain = await provider.chat(catalog, body, 60)
            chunks = [
                c async for c in provider.stream_chat(catalog, {**body, "logprobs": True}, 60)
            ]
            for bad, param in (
                ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
                ({"logprobs": "yes"}, "logprobs"),
            ):
                with pytest.raises(InvalidRequest) as refused:
                    await provider.chat(catalog, {**body, **bad}, 60)
                assert refused.value.param == param
            return asked, plain, chunks
        finally:
            await provider.aclose()

    asked, plain, chunks = asyncio.run(scenario())
    choice = asked["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    assert "Paris" in choice["message"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}
    assert plain["choices"][0]["logprobs"] is None
    assert plain["choices"][0]["message"]["content"] == choice["message"]["content"]
    streamed = [
        e
        for c in chunks
        for ch in c["choices"]
        for e in (ch.get("logprobs") or {}).get("content", [])
    ]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert all(e["top_logprobs"] == [] for e in streamed)
