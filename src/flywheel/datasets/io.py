"""Dataset files in and out: read JSONL, CSV or Parquet into normalised items, write JSONL back,
and the content hashes and train/test split that make dataset versions immutable.

A normalised item has exactly these keys::

    {"messages": [{"role": ..., "content": ...}, ...] | None, "variables": dict | None,
     "expected": str | None, "context": list[str], "metadata": dict}

and carries messages and/or variables. Files may use common column names from other tools
(``input``, ``prompt``, ``answer``, ``passages`` ...); :func:`normalize_item` maps them and folds
any other column into ``metadata``, so importing never drops data silently. Every refusal is a
:class:`DatasetFormatError` naming the file, the line (or row) and the field at fault.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from flywheel.errors import ServiceError

MAX_ITEMS = 100_000
# Nesting levels an item may have: deeper values would make JSON encoding and decoding
# (hashing, storage, reading back) exceed Python's recursion limit.
MAX_DEPTH = 64
FORMATS = ("jsonl", "csv", "parquet")
ROLES = ("system", "user", "assistant", "developer", "tool")
ITEM_KEYS = ("messages", "variables", "expected", "context", "metadata")

# The first alias present (not null, not an empty CSV cell) wins; any other alias present is
# kept in metadata under its own name rather than dropped.
_MESSAGES_ALIASES = ("messages", "input", "prompt", "question")
_EXPECTED_ALIASES = (
    "expected",
    "expected_output",
    "reference",
    "answer",
    "ideal",
    "output",
    "completion",
)
_CONTEXT_ALIASES = ("context", "contexts", "passages")
_KNOWN_COLUMNS = frozenset(
    (*_MESSAGES_ALIASES, *_EXPECTED_ALIASES, *_CONTEXT_ALIASES, "variables", "metadata")
)
# Columns whose text cells (CSV, Parquet strings) may hold JSON; for those with a plain-text
# meaning too, a cell that does not parse to the right shape stays text.
_JSON_COLUMNS = frozenset(("messages", "variables", "metadata"))
_JSON_OR_TEXT_COLUMNS = frozenset(("input", *_CONTEXT_ALIASES))
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Python's csv module refuses cells over 128 KiB by default; long RAG passages exceed that.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024
_WHERE = re.compile(r"^(?P<filename>.*):(?P<line>\d+)$")
# Builds the error for the item being normalised: (detail, field) -> error to raise.
_Fail = Callable[..., "DatasetFormatError"]


class DatasetFormatError(ServiceError):
    """A dataset file or item refused: HTTP 400, code ``invalid_dataset``.

    ``filename`` and ``line`` say where: the 1-based line for JSONL, the 1-based row for CSV
    counting the header as row 1, the 0-based row index for Parquet; ``line`` is None when the
    fault is the file as a whole. ``field`` (also ``param``) names the column at fault, if any.
    The message reads like ``items.csv:7: 'expected' must be text``.
    """

    def __init__(
        self,
        detail: str,
        filename: str,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = filename if line is None else f"{filename}:{line}"
        super().__init__(400, f"{where}: {detail}", code="invalid_dataset", param=field)
        self.detail = detail
        self.filename = filename
        self.line = line
        self.field = field


def read_items(data: bytes, filename: str, format: str | None = None) -> list[dict[str, Any]]:
    """Parse a dataset file into normalised items, in file order.

    ``format`` is one of ``"jsonl"``, ``"csv"``, ``"parquet"``; when None it is inferred from
    the filename suffix (``.jsonl``/``.json``/``.ndjson`` as JSON Lines, ``.csv``, ``.parquet``).
    Text formats must be UTF-8 (a BOM is accepted). Blank JSONL lines and blank CSV rows are
    skipped; an empty file gives ``[]``. More than :data:`MAX_ITEMS` items is refused.

    Raises:
        DatasetFormatError: unknown format, undecodable file, or any item refused by
            :func:`normalize_item` (the message names the line and field).
    """
    fmt = _resolve_format(filename, format)
    if fmt == "parquet":
        return _read_parquet(data, filename)
    text = _decode(data, filename)
    rows = _jsonl_rows(text, filename) if fmt == "jsonl" else _csv_rows(text, filename)
    items: list[dict[str, Any]] = []
    for line, raw in rows:
        if len(items) == MAX_ITEMS:
            raise DatasetFormatError(f"more than {MAX_ITEMS} items", filename, line)
        items.append(_normalize(raw, filename, line))
    return items


def normalize_item(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Map one raw record (a JSONL object, CSV row or Parquet row) to a normalised item.

    ``where`` locates the record in messages, as ``"file:line"`` (a bare name works too).
    Columns: ``messages`` (a list of ``{role, content}``; roles system, user, assistant,
    developer, tool; content text) or ``input``/``prompt``/``question`` as text, which becomes
    one user message (``input`` and ``prompt`` may also be a messages list); ``variables``
    (an object); ``expected`` or ``expected_output``/``reference``/``answer``/``ideal``/``output``/
    ``completion`` (text; any other JSON value is kept as its JSON text); ``context`` or
    ``contexts``/``passages`` (text or a list of texts); ``metadata`` (an object). Null values
    count as absent; every other column is folded into ``metadata``. A preference pair
    (``prompt``, ``chosen``, ``rejected``: TRL's format and the feedback DPO export) takes the
    chosen answer as ``expected`` and keeps the rejected one as ``metadata["rejected"]``.

    Raises:
        DatasetFormatError: wrong type or role, neither messages nor variables, or a value
            that is not JSON (non-finite numbers included); names the field.
    """
    match = _WHERE.match(where)
    if match is None:
        return _normalize(raw, where, None)
    return _normalize(raw, match["filename"], int(match["line"]))


def write_jsonl(items: Iterable[Mapping[str, Any]]) -> bytes:
    """Serialise items as UTF-8 JSON Lines, one object per line, each line newline-terminated.

    Items are written as given (normalised items read back to themselves through
    :func:`read_items`); non-ASCII text is kept as is rather than escaped.
    """
    lines = [json.dumps(dict(item), ensure_ascii=False, allow_nan=False) + "\n" for item in items]
    return "".join(lines).encode("utf-8")


def item_hash(item: Mapping[str, Any]) -> str:
    """The item's content address: SHA-256 hex of its canonical JSON.

    Canonical means sorted keys at every level, compact separators and unescaped non-ASCII, so
    key order never changes the hash and any content change does. Pass normalised items: the
    hash covers the mapping exactly as given.
    """
    return hashlib.sha256(_canonical_json(item).encode("utf-8")).hexdigest()


def version_hash(item_hashes: Sequence[str]) -> str:
    """The version's content address: SHA-256 hex over its item hashes, in order.

    Item order is part of a version, so reordering items gives another hash.
    """
    digest = hashlib.sha256()
    for value in item_hashes:
        # A separator keeps ["ab", "c"] and ["a", "bc"] apart even for malformed input.
        digest.update(value.encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


def split_of(item_hash: str, test_fraction: float, seed: int = 0) -> str:
    """Assign an item to ``"train"`` or ``"test"`` from its hash alone.

    The choice depends only on ``sha256(f"{seed}:{item_hash}")``, so an item keeps its split when
    other items are added or removed; about ``test_fraction`` of items land in ``"test"``.
    Another ``seed`` gives an independent split.

    Raises:
        ValueError: ``test_fraction`` outside [0, 1].
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    digest = hashlib.sha256(f"{seed}:{item_hash}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    return "test" if position < test_fraction else "train"


# --- reading ----------------------------------------------------------------------------------


def _resolve_format(filename: str, format: str | None) -> str:
    if format is not None:
        fmt = format.lower().lstrip(".")
        if fmt not in FORMATS:
            raise DatasetFormatError(
                f"unknown format {format!r}; expected one of {', '.join(FORMATS)}", filename
            )
        return fmt
    lowered = filename.lower()
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if lowered.endswith(suffix):
            return fmt
    raise DatasetFormatError(
        "cannot tell the format from the file name; use a .jsonl, .csv or .parquet file "
        "or name the format",
        filename,
    )


def _decode(data: bytes, filename: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetFormatError("the file is UTF-16 text; save it as UTF-8", filename)
    try:
        return data.decode("utf-8-sig")  # "-sig" drops a leading BOM, as Excel writes one
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start]
        raise DatasetFormatError(
            f"not UTF-8 text (byte 0x{byte:02x} at offset {exc.start}); save the file as UTF-8",
            filename,
            line,
        ) from exc


def _jsonl_rows(text: str, filename: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    # split("\n") rather than splitlines(): the latter also breaks on U+2028 and similar
    # characters, which are legal unescaped inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(
                f"not valid JSON: {exc.msg} (column {exc.colno})", filename, number
            ) from exc
        except (ValueError, RecursionError) as exc:
            raise DatasetFormatError(
                f"not usable JSON: {_json_problem(exc)}", filename, number
            ) from None
        if not isinstance(value, dict):
            hint = " (a JSON array file is not JSON Lines)" if isinstance(value, list) else ""
            raise DatasetFormatError(
                f"each line must be a JSON object, got {_json_type(value)}{hint}", filename, number
            )
        yield number, value


def _csv_rows(text: str, filename: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    # Rows are numbered as a spreadsheet shows them: the header is row 1, blank rows count.
    row_number = 0
    while True:
        row_number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DatasetFormatError(f"malformed CSV: {exc}", filename, row_number) from exc
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [name.strip() for name in row]
            _check_header(header, filename)
            continue
        if len(row) > len(header):
            raise DatasetFormatError(
                f"row has {len(row)} cells but the header has {len(header)} columns",
                filename,
                row_number,
            )
        raw: dict[str, Any] = {}
        for name, cell in zip(header, row, strict=False):
            if cell == "":
                continue  # empty cells are absent
            if name == "":
                raise DatasetFormatError(
                    "a value sits under a column with no name", filename, row_number
                )
            raw[name] = _cell_value(name, cell, filename, row_number)
        yield row_number, raw


def _check_header(header: list[str], filename: str) -> None:
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise DatasetFormatError(f"column {name!r} appears twice in the header", filename, 1)
        seen.add(name)


def _cell_value(name: str, cell: str, filename: str, line: int) -> Any:
    """A text cell from CSV or Parquet: JSON for the structured columns, else the text."""
    if name not in _JSON_COLUMNS and name not in _JSON_OR_TEXT_COLUMNS:
        return cell
    if not cell.lstrip().startswith(("[", "{")):
        return cell
    try:
        value = json.loads(cell)
    except json.JSONDecodeError as exc:
        if name in _JSON_OR_TEXT_COLUMNS:
            return cell  # e.g. a passage that merely starts with "[1]"
        raise DatasetFormatError(
            f"{name!r} holds invalid JSON: {exc.msg} (column {exc.colno})", filename, line, name
        ) from exc
    except (ValueError, RecursionError) as exc:
        if name in _JSON_OR_TEXT_COLUMNS:
            return cell
        raise DatasetFormatError(
            f"{name!r} holds unusable JSON: {_json_problem(exc)}", filename, line, name
        ) from None
    if name == "input" and not _is_message_list(value):
        return cell
    if name in _CONTEXT_ALIASES and not (
        isinstance(value, list) and all(isinstance(entry, str) for entry in value)
    ):
        return cell
    return value


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _read_parquet(data: bytes, filename: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise DatasetFormatError(f"not a readable Parquet file: {exc}", filename) from exc
    if table.num_rows > MAX_ITEMS:
        raise DatasetFormatError(
            f"{table.num_rows} rows; at most {MAX_ITEMS} items are allowed", filename
        )
    # Arrow gives every row of a struct column every field of the union, null where a row had
    # none; those nulls mean "absent", so they are dropped from struct-typed columns.
    struct_columns = {field.name for field in table.schema if pa.types.is_struct(field.type)}
    try:
        rows = table.to_pylist(maps_as_pydicts="strict")
    except pa.ArrowException as exc:
        raise DatasetFormatError(f"unreadable Parquet values: {exc}", filename) from exc
    items: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        raw: dict[str, Any] = {}
        for name, value in row.items():
            if isinstance(value, dict) and name in struct_columns:
                value = {key: entry for key, entry in value.items() if entry is not None}
            value = _plain(value)
            if isinstance(value, str):
                value = _cell_value(name, value, filename, index)
            raw[name] = value
        items.append(_normalize(raw, filename, index))
    return items


def _plain(value: Any) -> Any:
    """Arrow scalars that JSON lacks, as JSON values: dates and times as ISO text, decimals
    as their exact text, binary as UTF-8 text."""
    if isinstance(value, dict):
        return {key: _plain(entry) for key, entry in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(entry) for entry in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


# --- normalising ------------------------------------------------------------------------------


def _normalize(raw: Mapping[str, Any], filename: str, line: int | None) -> dict[str, Any]:
    def fail(detail: str, field: str | None = None) -> DatasetFormatError:
        return DatasetFormatError(detail, filename, line, field)

    if not isinstance(raw, Mapping):
        raise fail(f"an item must be an object, got {_json_type(raw)}")
    deep = _too_deep(raw)
    if deep is not None:
        raise fail(f"{deep!r} is nested more than {MAX_DEPTH} levels deep", deep)
    present = {key: value for key, value in raw.items() if value is not None}
    if (
        "chosen" in present
        and "rejected" in present
        and not any(name in present for name in _EXPECTED_ALIASES)
    ):
        # A preference pair (TRL's format, what the feedback DPO export writes): the chosen
        # answer is the item's expected answer, the rejected one stays in metadata.
        present["expected"] = _preference_answer(present.pop("chosen"))
        present["rejected"] = _preference_answer(present["rejected"])
    folded: dict[str, Any] = {}

    def pick(aliases: Sequence[str]) -> tuple[str, Any] | None:
        found = [name for name in aliases if name in present]
        for extra in found[1:]:
            folded[extra] = present[extra]
        return (found[0], present[found[0]]) if found else None

    messages = _messages(pick(_MESSAGES_ALIASES), fail)
    variables = _object(present.get("variables"), "variables", fail)
    expected = _expected(pick(_EXPECTED_ALIASES), fail)
    context = _context(pick(_CONTEXT_ALIASES), fail)
    metadata = _object(present.get("metadata"), "metadata", fail) or {}
    for key, value in present.items():
        if key not in _KNOWN_COLUMNS:
            folded[key] = value
    for key, value in folded.items():
        if key in metadata:
            raise fail(f"{key!r} is both a column and a metadata key", key)
        metadata[key] = value

    if messages is None and variables is None:
        raise fail(
            "an item needs 'messages' (or 'input', 'prompt', 'question') and/or 'variables'",
            "messages",
        )
    item = {
        "messages": messages,
        "variables": variables,
        "expected": expected,
        "context": context,
        "metadata": metadata,
    }
    for field in ("variables", "metadata"):
        try:
            _canonical_json(item[field])
        except (TypeError, ValueError) as exc:
            raise fail(f"{field!r} is not JSON: {exc}", field) from exc
    return item


def _preference_answer(value: Any) -> Any:
    """A preference answer as text when it is one assistant message (or already text)."""
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], Mapping)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        return value[0]["content"]
    return value


def _messages(picked: tuple[str, Any] | None, fail: _Fail) -> list[dict[str, str]] | None:
    if picked is None:
        return None
    name, value = picked
    if isinstance(value, str) and name != "messages":
        return [{"role": "user", "content": value}]
    if name not in ("messages", "input", "prompt") or not isinstance(value, list):
        expected_shape = "a list of messages" if name == "messages" else "text"
        if name in ("input", "prompt"):
            expected_shape = "text or a list of messages"
        raise fail(f"{name!r} must be {expected_shape}, got {_json_type(value)}", name)
    if not value:
        raise fail(f"{name!r} must not be empty", name)
    messages: list[dict[str, str]] = []
    for position, message in enumerate(value):
        at = f"{name}[{position}]"
        if not isinstance(message, Mapping):
            raise fail(f"{at!r} must be an object, got {_json_type(message)}", name)
        # Null extras are absent (Arrow gives every message struct the union of all fields).
        extra = sorted(
            key for key in message if key not in ("role", "content") and message[key] is not None
        )
        if extra:
            raise fail(f"{at!r} has unsupported keys {extra}; only role and content", name)
        role = message.get("role")
        if role not in ROLES:
            raise fail(f"'{at}.role' must be one of {', '.join(ROLES)}, got {role!r}", name)
        content = message.get("content")
        if not isinstance(content, str):
            raise fail(f"'{at}.content' must be text, got {_json_type(content)}", name)
        messages.append({"role": role, "content": content})
    return messages


def _object(value: Any, name: str, fail: _Fail) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise fail(f"{name!r} must be an object, got {_json_type(value)}", name)
    return dict(value)


def _expected(picked: tuple[str, Any] | None, fail: _Fail) -> str | None:
    if picked is None:
        return None
    name, value = picked
    if isinstance(value, str):
        return value
    # A structured answer (a number, an object for JSON-output tasks) is kept as its JSON text.
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise fail(f"{name!r} must be text or JSON: {exc}", name) from exc


def _context(picked: tuple[str, Any] | None, fail: _Fail) -> list[str]:
    if picked is None:
        return []
    name, value = picked
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(entry, str) for entry in value):
        return list(value)
    raise fail(f"{name!r} must be text or a list of texts, got {_json_type(value)}", name)


def _too_deep(raw: Mapping[str, Any]) -> str | None:
    """The first column whose value nests deeper than :data:`MAX_DEPTH`, if any."""
    for name, value in raw.items():
        stack: list[tuple[Any, int]] = [(value, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > MAX_DEPTH:
                return str(name)
            if isinstance(node, Mapping):
                stack.extend((child, depth + 1) for child in node.values())
            elif isinstance(node, list | tuple):
                stack.extend((child, depth + 1) for child in node)
    return None


def _json_problem(exc: ValueError | RecursionError) -> str:
    # Valid JSON that Python refuses: nesting deeper than the recursion limit, or an integer
    # longer than int()'s digit limit.
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _canonical_json(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number" if not isinstance(value, float) or math.isfinite(value) else "NaN"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__
