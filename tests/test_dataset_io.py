"""Dataset files: JSONL/CSV/Parquet import, column aliases, errors, hashes and splits."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.datasets import io as dataset_io
from flywheel.datasets.io import (
    MAX_ITEMS,
    DatasetFormatError,
    item_hash,
    normalize_item,
    read_items,
    split_of,
    version_hash,
    write_jsonl,
)
from flywheel.errors import ServiceError

ITEMS: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of France?"},
        ],
        "variables": None,
        "expected": "Paris",
        "context": ["Paris is the capital of France.", "Lyon is in France."],
        "metadata": {"source": "geo", "difficulty": 2},
    },
    {
        "messages": None,
        "variables": {"city": "Zürich", "n": 3},
        "expected": None,
        "context": [],
        "metadata": {},
    },
    {
        "messages": [{"role": "user", "content": 'Quote "this", please,\nover two lines'}],
        "variables": {"tone": "formal"},
        "expected": "",
        "context": [],
        "metadata": {"tags": ["a", "b"]},
    },
]


def refusal(data: bytes, filename: str, format: str | None = None) -> DatasetFormatError:
    with pytest.raises(DatasetFormatError) as info:
        read_items(data, filename, format)
    return info.value


def to_csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def json_or_empty(value: Any) -> str:
    return "" if value in (None, [], {}) else json.dumps(value, ensure_ascii=False)


# --- round trips ------------------------------------------------------------------------------


def test_jsonl_round_trip_keeps_items_and_hashes() -> None:
    data = write_jsonl(ITEMS)
    assert data.count(b"\n") == 3
    assert "Zürich".encode() in data  # non-ASCII kept, not \u-escaped
    again = read_items(data, "items.jsonl")
    assert again == ITEMS
    assert [item_hash(item) for item in again] == [item_hash(item) for item in ITEMS]
    assert write_jsonl(again) == data


def test_csv_round_trip_with_json_cells() -> None:
    rows = [
        {
            "messages": json_or_empty(item["messages"]),
            "variables": json_or_empty(item["variables"]),
            "expected": item["expected"] or "",
            "context": json_or_empty(item["context"]),
            "metadata": json_or_empty(item["metadata"]),
        }
        for item in ITEMS
    ]
    got = read_items(to_csv(rows), "items.csv")
    # CSV cannot tell an empty expected from a missing one: the empty cell is absent.
    want = [dict(item) for item in ITEMS]
    want[2]["expected"] = None
    assert got == want
    assert [item_hash(i) for i in got[:2]] == [item_hash(i) for i in ITEMS[:2]]


def test_parquet_round_trip_with_nested_columns() -> None:
    table = pa.Table.from_pylist(
        [
            {
                "messages": item["messages"],
                "variables": item["variables"],
                "expected": item["expected"],
                "context": item["context"],
                # An all-empty struct column cannot be written, so metadata travels as JSON text.
                "metadata": json.dumps(item["metadata"]),
            }
            for item in ITEMS
        ]
    )
    assert pa.types.is_struct(table.schema.field("variables").type)
    got = read_items(to_parquet(table), "items.parquet")
    assert got == ITEMS
    assert [item_hash(i) for i in got] == [item_hash(i) for i in ITEMS]


def test_parquet_map_column_and_typed_values() -> None:
    import datetime

    table = pa.table(
        {
            "question": ["q1", "q2"],
            "answer": pa.array([42, None], type=pa.int64()),
            "variables": pa.array([[("k", "v")], None], type=pa.map_(pa.string(), pa.string())),
            "created": [datetime.date(2024, 1, 2), None],
        }
    )
    got = read_items(to_parquet(table), "x.parquet")
    assert got[0] == {
        "messages": [{"role": "user", "content": "q1"}],
        "variables": {"k": "v"},
        "expected": "42",
        "context": [],
        "metadata": {"created": "2024-01-02"},
    }
    assert got[1]["variables"] is None and got[1]["expected"] is None
    assert got[1]["metadata"] == {}


def test_format_inferred_from_suffix_or_given() -> None:
    line = b'{"input": "hi"}\n'
    for name in ("a.jsonl", "A.JSON", "b.ndjson"):
        assert read_items(line, name)[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert read_items(line, "upload.bin", "jsonl")[0]["messages"][0]["content"] == "hi"
    assert read_items(b"input\nhi\n", "upload", "CSV")[0]["messages"][0]["content"] == "hi"
    error = refusal(line, "items.txt")
    assert error.filename == "items.txt" and error.line is None
    assert ".jsonl, .csv or .parquet" in error.message
    assert "unknown format 'xlsx'" in refusal(line, "items.jsonl", "xlsx").message


# --- aliases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["input", "prompt", "question"])
def test_text_input_aliases_become_one_user_message(column: str) -> None:
    item = normalize_item({column: "Why?"}, "f.jsonl:1")
    assert item["messages"] == [{"role": "user", "content": "Why?"}]
    assert item["metadata"] == {}


def test_input_may_be_a_message_list() -> None:
    messages = [{"role": "developer", "content": "d"}, {"role": "user", "content": "u"}]
    assert normalize_item({"input": messages}, "f:1")["messages"] == messages
    with_null_extra = [{**messages[0], "name": None}, messages[1]]
    assert normalize_item({"messages": with_null_extra}, "f:1")["messages"] == messages
    csv_cell = json.dumps(messages)
    got = read_items(to_csv([{"input": csv_cell}]), "f.csv")
    assert got[0]["messages"] == messages
    # An input that merely starts with a bracket stays text.
    got = read_items(to_csv([{"input": "[INST] hello"}]), "f.csv")
    assert got[0]["messages"] == [{"role": "user", "content": "[INST] hello"}]


@pytest.mark.parametrize(
    "column",
    ["expected", "expected_output", "reference", "answer", "ideal", "output", "completion"],
)
def test_expected_aliases(column: str) -> None:
    item = normalize_item({"input": "q", column: "A"}, "f:1")
    assert item["expected"] == "A"
    assert item["metadata"] == {}


def test_expected_non_text_is_kept_as_json_text() -> None:
    assert normalize_item({"input": "q", "answer": 4}, "f:1")["expected"] == "4"
    assert normalize_item({"input": "q", "ideal": True}, "f:1")["expected"] == "true"
    got = normalize_item({"input": "q", "output": {"b": 1, "a": "é"}}, "f:1")["expected"]
    assert got == '{"a": "é", "b": 1}'


@pytest.mark.parametrize("column", ["context", "contexts", "passages"])
def test_context_aliases_text_or_list(column: str) -> None:
    assert normalize_item({"input": "q", column: "one"}, "f:1")["context"] == ["one"]
    assert normalize_item({"input": "q", column: ["a", "b"]}, "f:1")["context"] == ["a", "b"]


def test_first_alias_wins_and_the_others_fold_into_metadata() -> None:
    item = normalize_item(
        {"prompt": "p", "completion": "c", "answer": "a", "source": "s", "input": "i"}, "f:1"
    )
    assert item["messages"] == [{"role": "user", "content": "i"}]
    assert item["expected"] == "a"
    assert item["metadata"] == {"prompt": "p", "completion": "c", "source": "s"}


def test_nulls_are_absent_and_unknown_columns_fold_into_metadata() -> None:
    item = normalize_item(
        {"variables": {"x": 1}, "expected": None, "context": None, "id": 7, "note": None}, "f:1"
    )
    assert item == {
        "messages": None,
        "variables": {"x": 1},
        "expected": None,
        "context": [],
        "metadata": {"id": 7},
    }


def test_csv_empty_cells_are_absent_and_extra_columns_are_metadata() -> None:
    data = b"question,answer,context,lang\nWhy?,,[1] Because.,en\n,,,\nHow?,So.,,\n"
    got = read_items(data, "q.csv")
    assert got == [
        {
            "messages": [{"role": "user", "content": "Why?"}],
            "variables": None,
            "expected": None,
            "context": ["[1] Because."],  # not JSON: stays a passage
            "metadata": {"lang": "en"},
        },
        {
            "messages": [{"role": "user", "content": "How?"}],
            "variables": None,
            "expected": "So.",
            "context": [],
            "metadata": {},
        },
    ]


# --- errors -----------------------------------------------------------------------------------


def test_error_is_a_400_service_error_with_location() -> None:
    data = b'{"input": "ok"}\n\n{"messages": [{"role": "bot", "content": "x"}]}\n'
    error = refusal(data, "items.jsonl")
    assert isinstance(error, ServiceError)
    assert (error.status_code, error.code) == (400, "invalid_dataset")
    assert (error.filename, error.line, error.field, error.param) == (
        "items.jsonl",
        3,  # the blank line counts
        "messages",
        "messages",
    )
    assert error.message.startswith("items.jsonl:3: 'messages[0].role' must be one of")
    assert "'bot'" in error.message


def test_csv_error_names_row_counting_header_as_line_one() -> None:
    data = b'input,expected,variables\nq1,a,\nq2,b,"{""x"": 1}"\nq3,c,"[1, 2]"\n'
    error = refusal(data, "items.csv")
    assert error.line == 4 and error.field == "variables"
    assert error.message == "items.csv:4: 'variables' must be an object, got a list"


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        ('{"messages": "hi"}', "messages", "'messages' must be a list of messages, got text"),
        ('{"messages": []}', "messages", "'messages' must not be empty"),
        ('{"messages": [{"role": "user", "content": 5}]}', "messages", "'messages[0].content'"),
        ('{"messages": [{"role": "user", "content": "x", "name": "n"}]}', "messages", "name"),
        ('{"prompt": 3}', "prompt", "'prompt' must be text or a list of messages"),
        ('{"question": ["x"]}', "question", "'question' must be text, got a list"),
        ('{"input": 3}', "input", "'input' must be text or a list of messages"),
        ('{"input": "q", "variables": "x=1"}', "variables", "'variables' must be an object"),
        ('{"input": "q", "metadata": [1]}', "metadata", "'metadata' must be an object"),
        ('{"input": "q", "context": [1, 2]}', "context", "'context' must be text or a list"),
        ('{"input": "q", "expected": NaN}', "expected", "'expected' must be text or JSON"),
        ('{"input": "q", "metadata": {"x": 1}, "x": 2}', "x", "'x' is both a column"),
        ('{"expected": "only"}', "messages", "needs 'messages'"),
    ],
)
def test_jsonl_errors_name_line_and_field(line: str, field: str, fragment: str) -> None:
    data = ('{"input": "fine"}\n' + line + "\n").encode()
    error = refusal(data, "d.jsonl")
    assert error.message.startswith("d.jsonl:2: "), error.message
    assert error.line == 2 and error.field == field
    assert fragment in error.message


def test_jsonl_line_not_an_object_or_not_json() -> None:
    error = refusal(b'["a"]\n', "d.jsonl")
    assert error.line == 1 and "must be a JSON object, got a list" in error.message
    error = refusal(b'{"input": "a"}\n{"input": "b",}\n', "d.jsonl")
    assert error.line == 2 and error.message.startswith("d.jsonl:2: not valid JSON")


def test_normalize_item_where_forms() -> None:
    with pytest.raises(DatasetFormatError) as info:
        normalize_item({"messages": [{"role": "user"}]}, "api")
    assert info.value.filename == "api" and info.value.line is None
    assert info.value.message.startswith("api: 'messages[0].content' must be text")


def test_bom_and_crlf_are_accepted() -> None:
    data = "\ufeffquestion,answer\r\nWhat?,That.\r\n".encode()
    assert read_items(data, "bom.csv") == [
        {
            "messages": [{"role": "user", "content": "What?"}],
            "variables": None,
            "expected": "That.",
            "context": [],
            "metadata": {},
        }
    ]
    jsonl = "\ufeff" + '{"input": "x"}\r\n'
    assert read_items(jsonl.encode(), "bom.jsonl")[0]["messages"][0]["content"] == "x"


def test_non_utf8_input_is_refused_clearly() -> None:
    error = refusal("input\nok\ncafé\n".encode("latin-1"), "latin.csv")
    assert error.line == 3
    assert (
        "not UTF-8 text (byte 0xe9" in error.message and "save the file as UTF-8" in error.message
    )
    error = refusal('{"input": "x"}\n'.encode("utf-16"), "u16.jsonl")
    assert "UTF-16" in error.message


def test_csv_structure_errors() -> None:
    error = refusal(b"input,input\na,b\n", "dup.csv")
    assert error.line == 1 and "'input' appears twice" in error.message
    error = refusal(b"input,expected\na,b,c\n", "wide.csv")
    assert error.line == 2 and "3 cells but the header has 2 columns" in error.message
    error = refusal(b'input,metadata\na,"{bad json"\n', "j.csv")
    assert error.line == 2 and error.field == "metadata" and "invalid JSON" in error.message


def test_csv_long_cell_is_read() -> None:
    passage = "x" * 300_000  # above the csv module's default field limit
    got = read_items(to_csv([{"input": "q", "context": passage}]), "long.csv")
    assert got[0]["context"] == [passage]


def test_parquet_errors_name_row_index() -> None:
    table = pa.table({"input": ["a", "b", None], "expected": ["x", "y", "z"]})
    error = refusal(to_parquet(table), "rows.parquet")
    assert error.line == 2 and error.field == "messages"
    assert error.message.startswith("rows.parquet:2: ")
    error = refusal(b"not parquet at all", "bad.parquet")
    assert error.line is None and "not a readable Parquet file" in error.message


def test_item_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MAX_ITEMS == 100_000
    monkeypatch.setattr(dataset_io, "MAX_ITEMS", 3)
    assert len(read_items(b'{"input": "a"}\n' * 3, "ok.jsonl")) == 3
    error = refusal(b'{"input": "a"}\n' * 4, "big.jsonl")
    assert error.line == 4 and "more than 3 items" in error.message
    error = refusal(b"input\n" + b"a\n" * 4, "big.csv")
    assert error.line == 5
    table = pa.table({"input": ["a"] * 4})
    assert "at most 3 items" in refusal(to_parquet(table), "big.parquet").message


def test_empty_files_give_no_items() -> None:
    assert read_items(b"", "e.jsonl") == []
    assert read_items(b"\n\n", "e.jsonl") == []
    assert read_items(b"input,expected\n", "e.csv") == []
    assert write_jsonl([]) == b""


# --- hashes and splits ------------------------------------------------------------------------


def test_item_hash_is_canonical_sha256() -> None:
    item = ITEMS[0]
    canonical = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert item_hash(item) == hashlib.sha256(canonical.encode()).hexdigest()
    reordered = {key: item[key] for key in reversed(list(item))}
    reordered["metadata"] = {"difficulty": 2, "source": "geo"}
    assert item_hash(reordered) == item_hash(item)
    changed = json.loads(json.dumps(item))
    changed["messages"][1]["content"] = "Capital of Spain?"
    assert item_hash(changed) != item_hash(item)
    assert item_hash({**item, "expected": "paris"}) != item_hash(item)


def test_hash_is_the_same_across_formats() -> None:
    jsonl = read_items(b'{"question": "Q", "answer": "A", "lang": "en"}\n', "a.jsonl")
    csv_items = read_items(b"lang,answer,question\nen,A,Q\n", "a.csv")
    parquet = read_items(
        to_parquet(pa.table({"answer": ["A"], "lang": ["en"], "question": ["Q"]})), "a.parquet"
    )
    assert item_hash(jsonl[0]) == item_hash(csv_items[0]) == item_hash(parquet[0])


def test_version_hash_depends_on_order_and_content() -> None:
    hashes = [item_hash(item) for item in ITEMS]
    assert version_hash(hashes) == version_hash(list(hashes))
    assert version_hash(hashes) != version_hash(list(reversed(hashes)))
    assert version_hash(hashes) != version_hash(hashes[:2])
    assert version_hash(["ab", "c"]) != version_hash(["a", "bc"])
    assert len(version_hash([])) == 64


def test_split_is_deterministic_stable_and_near_the_fraction() -> None:
    hashes = [item_hash({"messages": None, "variables": {"i": i}}) for i in range(1000)]
    splits = [split_of(h, 0.2) for h in hashes]
    assert splits == [split_of(h, 0.2) for h in hashes]
    assert set(splits) == {"train", "test"}
    assert 150 <= splits.count("test") <= 250
    # An item's split never depends on the other items.
    assert [split_of(h, 0.2) for h in hashes[500:]] == splits[500:]
    # Another seed reshuffles; the extremes are all-train and all-test.
    assert [split_of(h, 0.2, seed=1) for h in hashes] != splits
    assert {split_of(h, 0.0) for h in hashes} == {"train"}
    assert {split_of(h, 1.0) for h in hashes} == {"test"}
    # A larger fraction only moves items from train to test.
    wider = [split_of(h, 0.5) for h in hashes]
    assert all(w == "test" for s, w in zip(splits, wider, strict=True) if s == "test")
    with pytest.raises(ValueError):
        split_of(hashes[0], 1.5)
