"""Tuning data and settings: record conversion, errors that name the record and field,
deterministic splits, JSONL reading, and settings validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from flywheel.datasets.exports import RatedAnswer, dpo_pairs
from flywheel.datasets.io import normalize_item
from flywheel.tuning.config import DpoSettings, LoraSettings, TrainSettings
from flywheel.tuning.data import (
    TuningDataError,
    dpo_records,
    read_jsonl,
    sft_records,
    split_records,
)

USER = {"role": "user", "content": "What is 2 + 2?"}
ANSWER = {"role": "assistant", "content": "4"}


def test_sft_records_from_flywheel_items_and_trl_records() -> None:
    records = sft_records(
        [
            {"messages": [USER], "expected": "4", "variables": {}, "meta": {"source": "x"}},
            {"messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER]},
            {"prompt": "What is 2 + 2?", "completion": "4"},
            {"prompt": [USER], "completion": [ANSWER]},
            {"messages": [USER, ANSWER], "expected": None},
        ]
    )
    assert records[0] == {"messages": [USER, ANSWER]}
    assert records[1]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert records[1]["messages"][-1] == ANSWER
    assert records[2] == {"messages": [USER, ANSWER]}
    assert records[3] == {"messages": [USER, ANSWER]}
    assert records[4] == {"messages": [USER, ANSWER]}
    # extra item fields (meta, variables) are not carried into the training record
    assert set(records[0]) == {"messages"}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"messages": [USER], "expected": "4"}, {"messages": [USER]}], "record 1: no assistant"),
        ([{"messages": [{"role": "robot", "content": "x"}, ANSWER]}], "record 0.messages[0].role"),
        ([{"messages": [USER, {"role": "assistant", "content": 4}]}], "messages[1].content"),
        ([{"messages": [USER, ANSWER], "expected": "5"}], "record 0.expected: the messages"),
        ([{"messages": []}], "record 0.messages: must be a non-empty list"),
        ([{"messages": [ANSWER]}], "record 0.messages: no prompt before the answer"),
        ([{"prompt": "hi", "completion": ""}], "record 0.completion: is empty"),
        ([{"text": "free text"}], "record 0: needs 'messages'"),
        (["just a string"], "record 0: must be an object"),
    ],
)
def test_sft_errors_name_the_record_and_field(items: list, message: str) -> None:
    with pytest.raises(TuningDataError) as caught:
        sft_records(items)
    assert message in str(caught.value)


def test_dpo_records_accept_what_dpo_pairs_exports() -> None:
    prompt = [{"role": "user", "content": "Capital of France?"}]
    answers = [
        RatedAnswer("t1", prompt, "Lyon.", rating=0.0, correction="Paris."),
        RatedAnswer("t2", prompt, "Paris is the capital.", rating=1.0, correction=None),
        RatedAnswer("t3", prompt, "I don't know.", rating=0.0, correction=None),
    ]
    pairs = dpo_pairs(answers)
    assert pairs, "the export made no pairs"
    records = dpo_records(pairs)
    assert len(records) == len(pairs)
    correction = records[0]
    assert correction == {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    }
    # the export's bookkeeping fields (source, trace_ids) are dropped
    assert all(set(record) == {"prompt", "chosen", "rejected"} for record in records)


def test_dpo_records_accept_exported_pairs_imported_as_a_dataset() -> None:
    """``flywheel datasets import prefs feedback-dpo.jsonl`` folds chosen and rejected into
    metadata; DPO reads them back from there."""
    prompt = [{"role": "user", "content": "Capital of France?"}]
    pairs = dpo_pairs([RatedAnswer("t1", prompt, "Lyon.", rating=0.0, correction="Paris.")])
    items = [normalize_item(pair, f"feedback-dpo.jsonl:{n}") for n, pair in enumerate(pairs, 1)]
    assert items[0]["expected"] == "Paris."
    assert items[0]["metadata"] == {
        "rejected": "Lyon.",
        "source": "correction",
        "trace_ids": ["t1"],
    }
    assert dpo_records(items) == [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon."}],
        }
    ]


def test_dpo_records_from_text_and_flywheel_items() -> None:
    records = dpo_records(
        [
            {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
            {"messages": [USER], "expected": "4", "meta": {"rejected": "5"}},
            {"messages": [USER], "expected": "4", "metadata": {"rejected": "22"}},
        ]
    )
    assert records[0]["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert records[0]["chosen"] == [{"role": "assistant", "content": "Hi!"}]
    assert records[1] == {
        "prompt": [USER],
        "chosen": [ANSWER],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    assert records[2]["rejected"][0]["content"] == "22"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"messages": [USER], "expected": "4", "meta": {}}, "record 0.meta.rejected"),
        ({"messages": [USER], "meta": {"rejected": "5"}}, "record 0.expected"),
        ({"prompt": "hi", "chosen": "a"}, "record 0.rejected: is missing"),
        (
            {"prompt": "hi", "chosen": "same", "rejected": "same"},
            "chosen and rejected are the same",
        ),
        ({"prompt": [USER, ANSWER], "chosen": "a", "rejected": "b"}, "record 0.prompt: must end"),
        (
            {"prompt": "hi", "chosen": [ANSWER, ANSWER], "rejected": "b"},
            "record 0.chosen: must be text or exactly one assistant message",
        ),
    ],
)
def test_dpo_errors_name_the_record_and_field(item: dict, message: str) -> None:
    with pytest.raises(TuningDataError) as caught:
        dpo_records([item])
    assert message in str(caught.value)


def _records(count: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, ANSWER]} for i in range(count)]


def test_split_is_deterministic_order_free_and_stable() -> None:
    records = _records(200)
    train, held_out = split_records(records, 0.1, seed=3)
    assert len(train) + len(held_out) == 200
    assert 5 <= len(held_out) <= 40  # hash-based: about a tenth
    _, again_held = split_records(list(reversed(records)), 0.1, seed=3)
    assert sorted(map(json.dumps, again_held)) == sorted(map(json.dumps, held_out))
    # adding records never moves an existing record to the other side
    _, grown_held = split_records([*records, *_records(260)[200:]], 0.1, seed=3)
    assert {json.dumps(r) for r in held_out} <= {json.dumps(r) for r in grown_held}
    _, other_seed = split_records(records, 0.1, seed=4)
    assert other_seed != held_out


def test_split_keeps_both_sides_non_empty() -> None:
    train, held_out = split_records(_records(2), 0.01, seed=0)
    assert len(train) == 1 and len(held_out) == 1
    train, held_out = split_records(_records(3), 0.99, seed=0)
    assert len(train) >= 1 and len(held_out) >= 1
    assert split_records(_records(5), 0.0) == (_records(5), [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_records(_records(5), 1.0)


def test_read_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(TuningDataError, match=r"data\.jsonl:3: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(TuningDataError, match=r"data\.jsonl:2: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"prompt": "a", "completion": "b"}\n\n', encoding="utf-8")
    assert sft_records(read_jsonl(path)) == [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
            ]
        }
    ]


def test_settings_defaults() -> None:
    settings = TrainSettings()
    assert settings.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (settings.lora.rank, settings.lora.alpha, settings.batch_size) == (8, 16, 8)
    assert (settings.max_length, settings.quantization, settings.eval_fraction) == (
        256,
        "none",
        0.1,
    )
    assert LoraSettings(target_modules="all-linear").target_modules == "all-linear"
    dpo = DpoSettings(max_length=128, max_prompt_length=64)
    assert (dpo.beta, dpo.loss_type) == (0.1, "sigmoid")


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"lora": {"rank": 0}}, ("lora", "rank")),
        ({"learning_rate": -1}, ("learning_rate",)),
        ({"quantization": "int3"}, ("quantization",)),
        ({"batch_sise": 4}, ("batch_sise",)),
        ({"lora": {"target_modules": []}}, ("lora", "target_modules")),
        ({"lora": {"target_modules": ["q proj"]}}, ("lora", "target_modules")),
        ({"eval_fraction": 1.5}, ("eval_fraction",)),
    ],
)
def test_invalid_settings_name_the_field(values: dict, where: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        TrainSettings.model_validate(values)
    assert caught.value.errors()[0]["loc"] == where
    assert ".".join(where) in str(caught.value).replace("\n", ".")


def test_settings_that_contradict_each_other() -> None:
    with pytest.raises(ValidationError, match="early_stopping_patience needs eval_steps"):
        TrainSettings(early_stopping_patience=2)
    with pytest.raises(ValidationError, match="max_prompt_length must be smaller"):
        DpoSettings(max_length=64, max_prompt_length=64)
    with pytest.raises(ValidationError, match="extra"):
        DpoSettings.model_validate({"betta": 0.2})
