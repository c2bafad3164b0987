"""Hypothesis on the parsers that read untrusted text: ``flywheel.yaml``, dataset files
(JSONL, CSV) and the server-sent events of upstream streams.

Each parser answers with its result or its own refusal (``ConfigError`` naming a line,
``DatasetFormatError``, ``ProviderError``), never another exception: arbitrary input and
structured input that is wrong in one place are both tried. The upstream stream is served by
a real HTTP server on loopback and read by the real provider.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel.config import CatalogModel, FlywheelConfig, ProviderConfig
from flywheel.config.files import ConfigError, load_config_text
from flywheel.datasets.io import (
    ITEM_KEYS,
    ROLES,
    DatasetFormatError,
    item_hash,
    read_items,
    write_jsonl,
)
from flywheel.providers.base import ProviderError
from flywheel.providers.openai_compat import OpenAICompatibleProvider

# Derandomized so CI sees the same examples every run; the counts keep the module to seconds.
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- values ------------------------------------------------------------------------------

# JSON scalars, including the awkward ones: huge and negative numbers, odd unicode.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Any text, lone surrogates and control characters included.
any_text = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=300)

# -- flywheel.yaml -----------------------------------------------------------------------

YAML_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
PROBLEM = re.compile(r"^flywheel\.yaml:(\d+): \S")
VALID_CONFIG: dict[str, Any] = {
    "providers": {
        "local": {"type": "local"},
        "up": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"},
    },
    "models": [
        {"name": "chat", "provider": "local", "source": "builtin:smollm2"},
        {"name": "remote", "provider": "up", "upstream_name": "echo"},
    ],
    "routes": [
        {"name": "default", "targets": [{"model": "chat"}]},
        {"name": "echo", "targets": [{"model": "remote", "weight": 2}], "fallbacks": ["chat"]},
    ],
}
# Pieces of YAML that are likely to meet the loader's corners: anchors and aliases, tags,
# complex keys, flow collections, document markers, tabs and odd scalars.
YAML_PIECES = [
    "providers:",
    "  local: {type: local}",
    "  up: {type: openai, base_url: 'http://x'}",
    "models:",
    "  - name: chat",
    "    provider: local",
    "routes:",
    "  - name: r",
    "    targets: [{model: chat}]",
    "    targets: &t [{model: chat}]",
    "    fallbacks: *t",
    "    retry: {attempts: 99}",
    "a: &a [x, x]",
    "b: [*a, *a]",
    "c: &c {d: *c}",
    "<<: *a",
    "? [a, b]",
    ": value",
    "!!python/object:os.system x",
    "!!binary aGVsbG8=",
    "key: !custom tag",
    "- item",
    "[",
    "{",
    "]",
    "}",
    "---",
    "...",
    "%YAML 1.1",
    "\tkey: tab",
    "x: 1e999",
    "x: ~",
    "x: 0x1F",
    "x: 2001-12-14",
    "x: 'unterminated",
    'x: "\\uD800"',
    "x: |",
    "  block",
    "x: >-",
    "",
]


def _yaml_lines(text: str) -> int:
    return len(YAML_LINE_BREAK.split(text))


def _check_config(text: str) -> FlywheelConfig | None:
    """Load ``text``: a config, or a ConfigError whose every problem names a line of it."""
    try:
        config = load_config_text(text)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError lists its problems"
        for problem in exc.problems:
            match = PROBLEM.match(problem)
            assert match, problem
            assert 1 <= int(match[1]) <= _yaml_lines(text) + 1, (problem, text)
        return None
    assert isinstance(config, FlywheelConfig)
    return config


@FUZZ
@given(any_text)
def test_config_loader_any_text(text: str) -> None:
    _check_config(text)


@FUZZ
@given(st.lists(st.sampled_from(YAML_PIECES), min_size=1, max_size=12))
def test_config_loader_yaml_pieces(pieces: list[str]) -> None:
    _check_config("\n".join(pieces))


def _replace_at(document: Any, path: list[int], value: Any) -> Any:
    """``document`` with the node ``path`` leads to (each step picks a child by index, modulo
    the children) replaced by ``value``."""
    if not path or not isinstance(document, dict | list) or not document:
        return value
    step, rest = path[0], path[1:]
    if isinstance(document, dict):
        key = sorted(document)[step % len(document)]
        return {**document, key: _replace_at(document[key], rest, value)}
    index = step % len(document)
    copy = list(document)
    copy[index] = _replace_at(copy[index], rest, value)
    return copy


@FUZZ
@given(
    path=st.lists(st.integers(min_value=0, max_value=7), max_size=5),
    value=st.one_of(json_values, st.floats(), st.sampled_from(["", "-1", "chat", "nope"])),
)
def test_config_loader_valid_config_wrong_in_one_place(path: list[int], value: Any) -> None:
    assert _check_config(yaml.safe_dump(VALID_CONFIG)) is not None  # the base is valid
    _check_config(yaml.safe_dump(_replace_at(VALID_CONFIG, path, value), allow_unicode=True))


def test_config_loader_regressions() -> None:
    """Inputs hypothesis found (or that are known to break YAML loaders): each is a
    ConfigError naming the line, not a ReaderError, RecursionError or endless walk."""
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
    )
    cases = {
        "providers: {}\n\x00": 2,  # a control character: yaml's ReaderError
        "\ud800": 1,  # a lone surrogate
        "[" * 5000: 1,  # nesting past the recursion limit
        "models: []\nroutes: &r [{name: a, targets: *r}]\n": 2,  # a recursive alias
        laughs: 1,  # a billion laughs: only the aliases' lines are indexed, once
    }
    for text, line in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config_text(text)
        assert info.value.problems[0].startswith(f"flywheel.yaml:{line}: "), info.value


# -- dataset files -----------------------------------------------------------------------

COLUMNS = [
    "messages",
    "input",
    "prompt",
    "question",
    "variables",
    "expected",
    "answer",
    "output",
    "context",
    "passages",
    "metadata",
    "chosen",
    "rejected",
    "extra",
    "",
]
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from([*ROLES, "wizard"]), "content": st.text(max_size=20)}
    ),
    max_size=3,
)
cell_values = st.one_of(json_values, messages, st.sampled_from([[], {}, "", "[1]", "{"]))
records = st.dictionaries(st.sampled_from(COLUMNS), cell_values, max_size=5)


def _check_items(items: list[dict[str, Any]]) -> None:
    """Every item read is normalised: exactly the item keys, the right types, JSON."""
    for item in items:
        assert tuple(item) == ITEM_KEYS
        assert item["messages"] is not None or item["variables"] is not None
        if item["messages"] is not None:
            assert item["messages"]
            for message in item["messages"]:
                assert set(message) == {"role", "content"}
                assert message["role"] in ROLES and isinstance(message["content"], str)
        assert item["variables"] is None or isinstance(item["variables"], dict)
        assert item["expected"] is None or isinstance(item["expected"], str)
        assert all(isinstance(passage, str) for passage in item["context"])
        assert isinstance(item["metadata"], dict)
        item_hash(item)  # canonical JSON: no NaN, nothing JSON cannot hold


def _read(data: bytes, filename: str, lines: int | None = None) -> list[dict[str, Any]] | None:
    try:
        items = read_items(data, filename)
    except DatasetFormatError as exc:
        assert exc.status_code == 400 and exc.code == "invalid_dataset"
        assert exc.message.startswith(filename)
        if exc.line is not None and lines is not None:
            assert 1 <= exc.line <= lines, (exc.line, lines)
        return None
    _check_items(items)
    # What was read writes back to JSON Lines that read back to the same items.
    assert read_items(write_jsonl(items), "again.jsonl") == items
    return items


@FUZZ
@given(data=st.binary(max_size=400), filename=st.sampled_from(["d.jsonl", "d.csv", "d.parquet"]))
def test_dataset_reader_any_bytes(data: bytes, filename: str) -> None:
    _read(data, filename)


@FUZZ
@given(any_text, st.sampled_from(["d.jsonl", "d.csv"]))
def test_dataset_reader_any_text(text: str, filename: str) -> None:
    _read(text.encode("utf-8", "surrogatepass"), filename)


@FUZZ
@given(
    st.lists(
        st.one_of(
            records.map(json.dumps),
            json_values.map(json.dumps),
            st.sampled_from(["", "{", '{"input": NaN}', '{"input": "x", "n": 1' + "0" * 5000]),
        ),
        max_size=6,
    )
)
def test_dataset_reader_jsonl_records(lines: list[str]) -> None:
    _read("\n".join(lines).encode(), "d.jsonl", lines=max(len(lines), 1))


@FUZZ
@given(
    header=st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=5),
    rows=st.lists(
        st.lists(
            st.one_of(st.text(max_size=20), cell_values.map(json.dumps)), min_size=0, max_size=6
        ),
        max_size=5,
    ),
)
def test_dataset_reader_csv_rows(header: list[str], rows: list[list[str]]) -> None:
    out = io.StringIO(newline="")
    csv.writer(out).writerows([header, *rows])
    text = out.getvalue()
    _read(text.encode(), "d.csv", lines=text.count("\n") + 1)


def test_dataset_reader_regressions() -> None:
    """Valid JSON that Python's json refuses or that nests past what later code can encode
    and decode: a DatasetFormatError naming the line, not a RecursionError or ValueError."""
    deep = "[" * 100_000
    cases = [
        (deep.encode(), "d.jsonl", 1),
        (b'{"input": "x"}\n{"input": "y", "n": ' + b"1" * 5000 + b"}", "d.jsonl", 2),
        (b'{"input": "x", "metadata": {"a": ' + b"[" * 80 + b"]" * 80 + b"}}", "d.jsonl", 1),
        (b"input,metadata\nx," + deep.encode(), "d.csv", 2),
        (b'input,metadata\nx,"{""a"": ' + b"1" * 5000 + b'}"', "d.csv", 2),
    ]
    for data, filename, line in cases:
        with pytest.raises(DatasetFormatError) as info:
            read_items(data, filename)
        assert info.value.line == line, info.value


# -- server-sent events from an upstream -------------------------------------------------


def _provider(base_url: str = "http://127.0.0.1:9/v1") -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider("up", ProviderConfig(type="openai", base_url=base_url))


def _parsed(line: bytes) -> dict[str, Any] | str | None:
    try:
        return _provider()._parse_line(line)
    except ProviderError as exc:
        assert exc.kind in ("protocol", "http")
        return "refused"


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(b"data:".__add__)))
def test_sse_line_any_bytes(line: bytes) -> None:
    result = _parsed(line)
    assert result is None or result in ("[DONE]", "refused") or isinstance(result, dict)
    if not line.startswith(b"data:"):
        assert result is None  # comments, event: and id: lines are skipped


@FUZZ
@given(value=json_values, space=st.sampled_from(["", " ", "  ", "\t"]))
def test_sse_line_json_values(value: Any, space: str) -> None:
    result = _parsed(f"data:{space}{json.dumps(value)}\r\n".encode())
    if isinstance(value, dict) and "error" not in value:
        assert result == value
    else:
        assert result == "refused"  # not an object, or an upstream error mid-stream


# One stream line of each kind, and what the provider must make of it: "chunk" is
# yielded, "skip" ignored, "done" ends the stream, "bad" refuses it (ProviderError).
_LONG_CHUNK = {"id": "x", "choices": [{"delta": {"content": "y" * 300_000}}]}
STREAM_LINES: list[tuple[str, bytes]] = [
    ("skip", b""),
    ("skip", b": keep-alive"),
    ("skip", b"event: message"),
    ("skip", b"id: 7"),
    ("skip", b"retry: 100"),
    ("done", b"data: [DONE]"),
    ("done", b"data:[DONE]\r"),
    ("bad", b"data: {"),
    ("bad", b"data: [1, 2]"),
    ("bad", b"data: " + b"[" * 50_000),
    ("bad", b'data: {"error": {"message": "overloaded"}}'),
    ("bad", b"data: \xff\xfe"),
    # Longer than aiohttp's default line limit (128 KiB): a real answer can be one big chunk.
    ("chunk", b"data: " + json.dumps(_LONG_CHUNK).encode()),
]
chunk_lines = st.dictionaries(st.sampled_from(["id", "choices", "model"]), json_values).map(
    lambda chunk: ("chunk", b"data: " + json.dumps(chunk).encode())
)


class _StreamHandler(BaseHTTPRequestHandler):
    body = b""
    status = 200

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(self.status)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sse_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StreamHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


async def _consume(base_url: str) -> tuple[list[dict[str, Any]], ProviderError | None]:
    provider = _provider(base_url)
    model = CatalogModel(name="m", provider="up")
    chunks: list[dict[str, Any]] = []
    try:
        async for chunk in provider.stream_chat(model, {"model": "m", "stream": True}, 10):
            chunks.append(chunk)
    except ProviderError as exc:
        return chunks, exc
    finally:
        await provider.aclose()
    return chunks, None


@settings(FUZZ, max_examples=60, suppress_health_check=list(HealthCheck))
@given(
    lines=st.lists(st.one_of(st.sampled_from(STREAM_LINES), chunk_lines), max_size=8),
    ending=st.sampled_from([b"\n", b"\r\n"]),
)
def test_sse_stream_over_loopback(
    sse_server: str, lines: list[tuple[str, bytes]], ending: bytes
) -> None:
    _StreamHandler.status = 200
    _StreamHandler.body = b"".join(line + ending for _, line in lines)
    chunks, error = asyncio.run(_consume(sse_server))
    # The oracle: chunks up to the first "done" or "bad" line; a stream without [DONE]
    # (cut mid-way) is refused too.
    expected: list[dict[str, Any]] = []
    outcome = "cut"
    for kind, line in lines:
        if kind in ("done", "bad"):
            outcome = kind
            break
        if kind == "chunk":
            expected.append(json.loads(line.removeprefix(b"data: ")))
    assert chunks == expected
    if outcome == "done":
        assert error is None
    else:
        assert error is not None and error.kind in ("protocol", "http"), error


@settings(FUZZ, max_examples=30, suppress_health_check=list(HealthCheck))
@given(status=st.sampled_from([400, 404, 429, 500, 503]), body=st.binary(max_size=200))
def test_sse_stream_upstream_error_any_body(sse_server: str, status: int, body: bytes) -> None:
    _StreamHandler.status = status
    _StreamHandler.body = body
    chunks, error = asyncio.run(_consume(sse_server))
    assert chunks == []
    assert error is not None and error.kind == "http" and error.status_code == status
    assert isinstance(error.message, str) and error.message
