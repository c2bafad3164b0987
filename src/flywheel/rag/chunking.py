"""Token-aware chunking of documents for retrieval.

:func:`chunk_text` splits a document into :class:`Chunk` s of at most
``ChunkerConfig.chunk_tokens`` tokens, counted with the embedder's own tokenizer (no special
tokens), so a chunk never gets truncated by the embedding model. The splitting itself is
`text-splitter <https://github.com/benbrandt/text-splitter>`_ (``semantic-text-splitter``):

* ``recursive``: the largest semantic units that fit, falling back from paragraphs (runs of
  newlines) to lines, sentences, words, graphemes and characters; neighbours are merged while
  they fit.
* ``markdown``: the same, but the units are Markdown's (sections under headings, blocks, list
  items, code fences, ...), so a heading stays with its section; small neighbouring sections
  are still merged into one chunk. Each chunk carries the header path in force where it starts.

Overlap is the splitter's: consecutive chunks cut from the same oversized unit (a paragraph
split into sentences, say) share up to ``overlap_tokens`` tokens of whole smaller units. Chunks
that meet at a boundary the splitter didn't have to cut through (between paragraphs or
sections that each fit) don't overlap.

Every chunk is stripped of surrounding whitespace and its offsets always index the original
text: ``text[chunk.start:chunk.end] == chunk.text``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from markdown_it.token import Token
    from semantic_text_splitter import MarkdownSplitter, TextSplitter
    from tokenizers import Tokenizer

__all__ = [
    "BUILTIN_TOKENIZER",
    "Chunk",
    "ChunkerConfig",
    "chunk_text",
    "count_tokens",
]

BUILTIN_TOKENIZER = "builtin:minilm"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line breaks markdown-it counts lines by


class ChunkerConfig(BaseModel):
    """How a knowledge base splits its documents; stored as JSON and part of the index version.

    ``tokenizer`` is ``"builtin:minilm"`` (the bundled MiniLM embedder's tokenizer) or, like an
    embedder spec, a local sentence-transformers folder that holds a ``tokenizer.json``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["recursive", "markdown"] = "recursive"
    chunk_tokens: int = Field(256, ge=16, le=8192)
    overlap_tokens: int = Field(32, ge=0)
    tokenizer: str = BUILTIN_TOKENIZER

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("tokenizer must not be empty")
        if value.startswith("builtin:") and value != BUILTIN_TOKENIZER:
            raise ValueError(
                f"unknown built-in tokenizer {value!r}; the only one is 'builtin:minilm'"
            )
        return value

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> ChunkerConfig:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"overlap_tokens ({self.overlap_tokens}) must be less than "
                f"chunk_tokens ({self.chunk_tokens})"
            )
        return self

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON: sorted keys, no whitespace, every field."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: ``document_text[start:end] == text``.

    ``headings`` is the Markdown header path in force at ``start`` (outermost first, e.g.
    ``("Install", "On Linux")``) for the ``markdown`` strategy, and ``()`` for ``recursive``.
    ``tokens`` is the chunk's size in the config's tokenizer, without special tokens.
    """

    text: str
    start: int
    end: int
    position: int
    headings: tuple[str, ...]
    tokens: int


# Loaded once per tokenizer spec / per config and shared across threads: the Rust objects
# are immutable once built and only borrowed while splitting or encoding.
_cache_lock = threading.Lock()
_tokenizers: dict[str, Tokenizer] = {}
_splitters: dict[tuple[str, int, int, str], TextSplitter | MarkdownSplitter] = {}


def _tokenizer_file(spec: str) -> Path:
    # Imported here: the providers package is heavy and only needed on first load.
    from flywheel.providers.local import resolve_embedder_source

    path = resolve_embedder_source(spec) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in the model folder for {spec!r}: {path}")
    return path


def _get_tokenizer(spec: str) -> Tokenizer:
    tokenizer = _tokenizers.get(spec)
    if tokenizer is not None:
        return tokenizer
    with _cache_lock:
        tokenizer = _tokenizers.get(spec)
        if tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(_tokenizer_file(spec)))
            # The embedder's file truncates and pads to 128 tokens; counting needs neither.
            tokenizer.no_truncation()
            tokenizer.no_padding()
            _tokenizers[spec] = tokenizer
        return tokenizer


def _get_splitter(config: ChunkerConfig) -> TextSplitter | MarkdownSplitter:
    key = (config.strategy, config.chunk_tokens, config.overlap_tokens, config.tokenizer)
    splitter = _splitters.get(key)
    if splitter is not None:
        return splitter
    tokenizer = _get_tokenizer(config.tokenizer)
    with _cache_lock:
        splitter = _splitters.get(key)
        if splitter is None:
            from semantic_text_splitter import MarkdownSplitter, TextSplitter

            splitter_class = MarkdownSplitter if config.strategy == "markdown" else TextSplitter
            splitter = splitter_class.from_huggingface_tokenizer(
                tokenizer, config.chunk_tokens, overlap=config.overlap_tokens, trim=True
            )
            _splitters[key] = splitter
        return splitter


def count_tokens(text: str, tokenizer: str = BUILTIN_TOKENIZER) -> int:
    """How many tokens ``text`` is in ``tokenizer`` (a :class:`ChunkerConfig` spec), with no
    special tokens and no truncation."""
    return len(_get_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids)


def chunk_text(text: str, config: ChunkerConfig) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``config.chunk_tokens`` tokens, in document order.

    Whitespace-only (or empty) text gives ``[]``.
    """
    if not text.strip():
        return []
    tokenizer = _get_tokenizer(config.tokenizer)
    pieces = _get_splitter(config).chunk_indices(text)
    heading_paths = _HeadingPaths(text) if config.strategy == "markdown" else None
    chunks: list[Chunk] = []
    for offset, raw in pieces:
        # The splitter trims Unicode White_Space (and keeps indentation in Markdown); Python's
        # notion of whitespace is a little wider, so strip again and move the offset with it.
        stripped = raw.strip()
        if not stripped:
            continue
        start = offset + (len(raw) - len(raw.lstrip()))
        chunks.append(
            Chunk(
                text=stripped,
                start=start,
                end=start + len(stripped),
                position=len(chunks),
                headings=heading_paths.at(start) if heading_paths is not None else (),
                tokens=len(tokenizer.encode(stripped, add_special_tokens=False).ids),
            )
        )
    return chunks


class _HeadingPaths:
    """The header path in force at any offset of a Markdown document.

    Headings are found by a CommonMark parser (markdown-it), so ``#`` lines inside fenced or
    indented code and HTML blocks are not headings, and setext headings (``Title`` over
    ``===``/``---``) are. Only top-level headings count: one inside a blockquote or list item
    doesn't open a section. A heading applies from the start of its first line. An empty
    heading (a bare ``#``) closes the sections at its level and below but adds no title.
    """

    def __init__(self, text: str) -> None:
        from markdown_it import MarkdownIt

        line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(text)]
        self._offsets: list[int] = []
        self._paths: list[tuple[str, ...]] = []
        stack: list[tuple[int, str]] = []  # (level, title), outermost first
        tokens = MarkdownIt("commonmark").parse(text)
        for index, token in enumerate(tokens):
            if token.type != "heading_open" or token.level != 0 or token.map is None:
                continue
            level = int(token.tag[1:])
            title = _plain_text(tokens[index + 1].children or [])
            while stack and stack[-1][0] >= level:
                stack.pop()
            if title:
                stack.append((level, title))
            self._offsets.append(line_starts[token.map[0]])
            self._paths.append(tuple(title for _, title in stack))

    def at(self, offset: int) -> tuple[str, ...]:
        index = bisect.bisect_right(self._offsets, offset) - 1
        return self._paths[index] if index >= 0 else ()


def _plain_text(inline: Iterable[Token]) -> str:
    """A heading's text without markup: ``Install `foo` *now*`` -> ``Install foo now``."""
    parts: list[str] = []
    for token in inline:
        if token.type in ("text", "code_inline"):
            parts.append(token.content)
        elif token.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif token.children:  # an image: its alt text
            parts.append(_plain_text(token.children))
    return " ".join("".join(parts).split())
