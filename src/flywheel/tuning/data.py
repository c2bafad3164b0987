"""Training records from Flywheel dataset items and TRL-format records.

SFT records come out in TRL's conversational format (``{"messages": [..., assistant]}``) and
preference records in TRL's conversational preference format (``{"prompt": [...messages],
"chosen": [assistant], "rejected": [assistant]}``). Errors name the record and the problem.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})


class TuningDataError(ValueError):
    """A record that cannot be used for training; the message names the record and why."""


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise TuningDataError(f"{where}: must be a non-empty list of messages")
    out = []
    for position, message in enumerate(value):
        at = f"{where}[{position}]"
        if not isinstance(message, Mapping):
            raise TuningDataError(f"{at}: must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TuningDataError(f"{at}.role: {role!r} is not one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise TuningDataError(f"{at}.content: must be a string")
        out.append({"role": str(role), "content": content})
    return out


def _answer(value: Any, where: str) -> list[dict[str, str]]:
    """An answer given as text or as a one-message assistant list."""
    if isinstance(value, str):
        if not value.strip():
            raise TuningDataError(f"{where}: is empty")
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise TuningDataError(f"{where}: must be text or exactly one assistant message")
    if not messages[0]["content"].strip():
        raise TuningDataError(f"{where}: is empty")
    return messages


def _prompt(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise TuningDataError(f"{where}: is empty")
        return [{"role": "user", "content": value}]
    messages = _messages(value, where)
    if messages[-1]["role"] == "assistant":
        raise TuningDataError(f"{where}: must end with a user (or tool) message, not the answer")
    return messages


def _record(item: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise TuningDataError(f"record {index}: must be an object, not {type(item).__name__}")
    return item


def sft_records(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Conversational SFT records (``{"messages": [..., {"role": "assistant", ...}]}``).

    Accepts Flywheel dataset items (``messages`` plus an optional ``expected`` answer: with it
    the answer is appended as the assistant turn, without it the last message must already be
    the assistant's) and TRL records (``{"messages": [...]}`` or ``{"prompt", "completion"}``
    as text or messages). Raises :class:`TuningDataError` naming the record and field.
    """
    records = []
    for index, raw in enumerate(items):
        item = _record(raw, index)
        where = f"record {index}"
        if "messages" in item:
            messages = _messages(item["messages"], f"{where}.messages")
            expected = item.get("expected")
            if expected is not None and not (isinstance(expected, str) and not expected.strip()):
                if messages[-1]["role"] == "assistant":
                    raise TuningDataError(
                        f"{where}.expected: the messages already end with an assistant answer"
                    )
                messages = [*messages, *_answer(expected, f"{where}.expected")]
            elif messages[-1]["role"] != "assistant":
                raise TuningDataError(
                    f"{where}: no assistant answer to learn (give 'expected' or end the "
                    "messages with an assistant message)"
                )
            if not messages[-1]["content"].strip():
                raise TuningDataError(f"{where}.messages: the assistant answer is empty")
            if all(message["role"] == "assistant" for message in messages):
                raise TuningDataError(f"{where}.messages: no prompt before the answer")
        elif "prompt" in item and "completion" in item:
            prompt = _prompt(item["prompt"], f"{where}.prompt")
            messages = [*prompt, *_answer(item["completion"], f"{where}.completion")]
        else:
            raise TuningDataError(
                f"{where}: needs 'messages' (with 'expected' or an assistant answer) or "
                "'prompt' and 'completion'"
            )
        records.append({"messages": messages})
    return records


def dpo_records(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Conversational preference records (``{"prompt": [...], "chosen": [assistant],
    "rejected": [assistant]}``).

    Accepts TRL preference records (prompt as text or messages, chosen/rejected as text or one
    assistant message; what :func:`flywheel.datasets.exports.dpo_pairs` produces) and Flywheel
    dataset items (``messages`` is the prompt, ``expected`` the chosen answer and
    ``meta["rejected"]`` (or ``metadata["rejected"]``) the rejected one).
    """
    records = []
    for index, raw in enumerate(items):
        item = _record(raw, index)
        where = f"record {index}"
        if "prompt" in item:
            prompt = _prompt(item["prompt"], f"{where}.prompt")
            for key in ("chosen", "rejected"):
                if key not in item:
                    raise TuningDataError(f"{where}.{key}: is missing")
            chosen = _answer(item["chosen"], f"{where}.chosen")
            rejected = _answer(item["rejected"], f"{where}.rejected")
        elif "messages" in item:
            prompt = _prompt(item["messages"], f"{where}.messages")
            if item.get("expected") is None:
                raise TuningDataError(f"{where}.expected: the chosen answer is missing")
            chosen = _answer(item["expected"], f"{where}.expected")
            meta_key = "meta" if "meta" in item else "metadata"
            meta = item.get(meta_key) or {}
            if not isinstance(meta, Mapping) or meta.get("rejected") is None:
                raise TuningDataError(
                    f"{where}.{meta_key}.rejected: the rejected answer is missing"
                )
            rejected = _answer(meta["rejected"], f"{where}.{meta_key}.rejected")
        else:
            raise TuningDataError(
                f"{where}: needs 'prompt', 'chosen' and 'rejected', or 'messages', 'expected' "
                "and meta.rejected"
            )
        if chosen[0]["content"].strip() == rejected[0]["content"].strip():
            raise TuningDataError(f"{where}: chosen and rejected are the same answer")
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def _position(record: Mapping[str, Any], seed: int) -> float:
    """Where a record falls in [0, 1), from a hash of its content and the seed."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    digest = hashlib.sha256(f"{seed}\0{canonical}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(
    records: Sequence[dict[str, Any]], eval_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and held-out records: a record is held out when the hash of its content and
    ``seed`` falls below ``eval_fraction``.

    The same records and seed always give the same split, whatever their order, and adding
    records does not move the others between sides. With at least two records and a positive
    fraction each side gets at least one record (the lowest or highest hash moves over).
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError("eval_fraction must be in [0, 1)")
    if eval_fraction == 0 or len(records) < 2:
        return list(records), []
    positions = [_position(record, seed) for record in records]
    held_out = {i for i, position in enumerate(positions) if position < eval_fraction}
    if not held_out:
        held_out = {min(range(len(records)), key=lambda i: (positions[i], i))}
    elif len(held_out) == len(records):
        held_out.discard(max(range(len(records)), key=lambda i: (positions[i], i)))
    train = [r for i, r in enumerate(records) if i not in held_out]
    evaluation = [r for i, r in enumerate(records) if i in held_out]
    return train, evaluation


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); errors name ``file:line``."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TuningDataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise TuningDataError(f"{path}:{number}: expected a JSON object")
            records.append(value)
    return records
