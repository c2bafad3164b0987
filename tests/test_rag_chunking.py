"""Chunking for RAG: the config, token counting with the bundled MiniLM tokenizer, recursive and
Markdown splitting (sizes, overlap, offsets, header paths) and the shared per-config cache."""

from __future__ import annotations

import itertools
import random
import shutil
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import flywheel.rag.chunking as chunking
from flywheel.providers.local import resolve_embedder_source
from flywheel.rag.chunking import Chunk, ChunkerConfig, chunk_text, count_tokens

WORDS = ["alpha", "beta", "gamma", "delta", "retrieval", "index", "vector", "store", "token"]


def _sentences(rng: random.Random, count: int, words: tuple[int, int] = (5, 14)) -> list[str]:
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "."
        for _ in range(count)
    ]


def _check_offsets(text: str, chunks: list[Chunk]) -> None:
    assert [chunk.position for chunk in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip() != ""
    assert [chunk.start for chunk in chunks] == sorted(chunk.start for chunk in chunks)


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_and_json_round_trip() -> None:
    config = ChunkerConfig()
    assert (config.strategy, config.chunk_tokens, config.overlap_tokens, config.tokenizer) == (
        "recursive",
        256,
        32,
        "builtin:minilm",
    )
    stored = config.model_dump_json()
    assert ChunkerConfig.model_validate_json(stored) == config


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"overlap_tokens": 64, "chunk_tokens": 64}, "must be less than"),
        ({"overlap_tokens": 100, "chunk_tokens": 64}, "must be less than"),
        ({"overlap_tokens": -1}, "greater than or equal"),
        ({"chunk_tokens": 15}, "greater than or equal"),
        ({"chunk_tokens": 8193}, "less than or equal"),
        ({"strategy": "semantic"}, "recursive"),
        ({"tokenizer": "builtin:bert"}, "unknown built-in tokenizer"),
        ({"tokenizer": " "}, "must not be empty"),
        ({"chunk_size": 100}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ChunkerConfig.model_validate(fields)


def test_fingerprint_is_a_stable_hash_of_the_canonical_json() -> None:
    # Pinned: changing this value changes every knowledge base's index version.
    expected = "6203d7cd50a14cf6ea4c9460f2199b4b5505e19949ddab7fcd9a9ab4cf00beab"
    assert ChunkerConfig().fingerprint() == expected
    reordered = ChunkerConfig.model_validate_json(
        '{"tokenizer": "builtin:minilm", "overlap_tokens": 32, "chunk_tokens": 256}'
    )
    assert reordered.fingerprint() == expected
    others = {
        ChunkerConfig(chunk_tokens=128).fingerprint(),
        ChunkerConfig(overlap_tokens=0).fingerprint(),
        ChunkerConfig(strategy="markdown").fingerprint(),
        expected,
    }
    assert len(others) == 4


# --- token counting ---------------------------------------------------------------------------


def test_count_tokens_without_special_tokens_padding_or_truncation() -> None:
    assert count_tokens("") == 0
    assert count_tokens("hello world") == 2  # no [CLS]/[SEP], no padding to 128
    assert count_tokens("word " * 300) == 300  # the embedder truncates at 128; counting doesn't


def test_a_model_folder_works_as_tokenizer(tmp_path: Path) -> None:
    source = resolve_embedder_source("builtin:minilm") / "tokenizer.json"
    shutil.copy(source, tmp_path / "tokenizer.json")
    text = "Chunking is measured in the embedder's own tokens."
    assert count_tokens(text, str(tmp_path)) == count_tokens(text) > 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        count_tokens(text, str(empty))


# --- recursive splitting ----------------------------------------------------------------------


def test_whitespace_only_text_gives_no_chunks() -> None:
    for text in ("", " ", "\n\n\t \r\n"):
        assert chunk_text(text, ChunkerConfig()) == []
        assert chunk_text(text, ChunkerConfig(strategy="markdown")) == []


def test_short_text_is_one_stripped_chunk() -> None:
    text = "\n\n  A short note about retrieval.  \n"
    [chunk] = chunk_text(text, ChunkerConfig())
    assert chunk == Chunk(
        text="A short note about retrieval.",
        start=4,
        end=33,
        position=0,
        headings=(),
        tokens=count_tokens("A short note about retrieval."),
    )


def test_whitespace_the_splitter_keeps_is_stripped_too() -> None:
    # \x1c/\x1f are whitespace to Python but not to the Rust splitter's trim.
    [chunk] = chunk_text("\x1chello\x1f", ChunkerConfig())
    assert (chunk.text, chunk.start, chunk.end) == ("hello", 1, 6)
    # The Markdown splitter keeps leading indentation; chunks are stripped regardless.
    text = "\n   indented para\n\n    code block\n"
    [chunk] = chunk_text(text, ChunkerConfig(strategy="markdown"))
    assert (chunk.text, chunk.start) == ("indented para\n\n    code block", 4)


def test_long_document_chunks_fit_and_cover_everything() -> None:
    rng = random.Random(3)
    text = "\n\n".join(" ".join(_sentences(rng, rng.randint(2, 8))) for _ in range(30))
    config = ChunkerConfig(chunk_tokens=64, overlap_tokens=0)
    chunks = chunk_text(text, config)
    assert len(chunks) > 10
    _check_offsets(text, chunks)
    for chunk in chunks:
        assert chunk.tokens == count_tokens(chunk.text) <= 64
        assert chunk.headings == ()
    # No overlap asked for: chunks tile the text, and only whitespace falls between them.
    covered = [False] * len(text)
    for previous, following in itertools.pairwise(chunks):
        assert previous.end <= following.start
        assert text[previous.end : following.start].strip() == ""
    for chunk in chunks:
        covered[chunk.start : chunk.end] = [True] * (chunk.end - chunk.start)
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))


def test_paragraphs_first_then_sentences_then_words() -> None:
    rng = random.Random(5)
    config = ChunkerConfig(chunk_tokens=64, overlap_tokens=0)
    # Paragraphs that fit are chunks of their own.
    paragraphs = [" ".join(_sentences(rng, 3)) for _ in range(2)]
    sizes = [count_tokens(p) for p in paragraphs]
    assert max(sizes) <= 64 < sum(sizes), sizes
    assert [c.text for c in chunk_text("\n\n".join(paragraphs), config)] == paragraphs
    # A paragraph too big is split between sentences.
    sentences = _sentences(rng, 20)
    chunks = chunk_text(" ".join(sentences), config)
    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.text.endswith(".") and chunk.text[0].isupper()
    assert " ".join(c.text for c in chunks) == " ".join(sentences)
    # A sentence too big is split between words.
    words = [rng.choice(WORDS) for _ in range(300)]
    chunks = chunk_text(" ".join(words), config)
    assert len(chunks) > 4
    assert [w for c in chunks for w in c.text.split(" ")] == words


def test_consecutive_chunks_overlap_within_a_paragraph() -> None:
    # One paragraph of short sentences: whole sentences (or words) fit in the overlap.
    text = " ".join(_sentences(random.Random(11), 60, words=(3, 6)))
    config = ChunkerConfig(chunk_tokens=64, overlap_tokens=16)
    chunks = chunk_text(text, config)
    assert len(chunks) > 5
    _check_offsets(text, chunks)
    for previous, following in itertools.pairwise(chunks):
        assert following.start < previous.end  # they share text ...
        shared = text[following.start : previous.end]
        assert 0 < count_tokens(shared) <= 16  # ... of at most overlap_tokens tokens
        assert previous.tokens <= 64 and following.tokens <= 64
    # Without overlap the same text tiles instead.
    tiles = chunk_text(text, ChunkerConfig(chunk_tokens=64, overlap_tokens=0))
    assert all(a.end < b.start for a, b in itertools.pairwise(tiles))
    assert len(tiles) < len(chunks)


# --- markdown ---------------------------------------------------------------------------------

GUIDE = """\
Preface before any heading.

# Install

How to get it.

## On Linux

```bash
# not a heading: a comment in a fenced block
apt install flywheel
```

Then run `flywheel up`.

### Debian `apt` notes ###

Use the stable channel.

## On macOS

Use the installer.

Configuration *file*
---

Setext headings count too.

#### Deep (skipped levels)

Still under configuration.

# Usage

Start the server.
"""


def test_header_path_at_each_offset() -> None:
    paths = chunking._HeadingPaths(GUIDE)
    expected = {
        "Preface before": (),
        "# Install": ("Install",),
        "How to get it": ("Install",),
        "## On Linux": ("Install", "On Linux"),
        "# not a heading": ("Install", "On Linux"),  # a comment in a fenced block
        "Then run": ("Install", "On Linux"),
        "Use the stable channel": ("Install", "On Linux", "Debian apt notes"),
        "Use the installer": ("Install", "On macOS"),
        "Configuration *file*": ("Install", "Configuration file"),  # setext, level 2
        "Setext headings": ("Install", "Configuration file"),
        "Still under": ("Install", "Configuration file", "Deep (skipped levels)"),
        "Start the server": ("Usage",),
    }
    for phrase, headings in expected.items():
        assert paths.at(GUIDE.index(phrase)) == headings, phrase
    # A heading is in force from the first character of its line.
    assert paths.at(GUIDE.index("# Usage") - 1) == expected["Still under"]


def test_markdown_chunks_carry_their_header_path() -> None:
    config = ChunkerConfig(strategy="markdown", chunk_tokens=24, overlap_tokens=0)
    chunks = chunk_text(GUIDE, config)
    _check_offsets(GUIDE, chunks)
    code = "```bash\n# not a heading: a comment in a fenced block\napt install flywheel\n```"
    assert [(c.text, c.headings) for c in chunks] == [
        ("Preface before any heading.", ()),
        ("# Install\n\nHow to get it.", ("Install",)),
        ("## On Linux", ("Install", "On Linux")),
        (code, ("Install", "On Linux")),
        ("Then run `flywheel up`.", ("Install", "On Linux")),
        (
            "### Debian `apt` notes ###\n\nUse the stable channel.",
            ("Install", "On Linux", "Debian apt notes"),
        ),
        ("## On macOS\n\nUse the installer.", ("Install", "On macOS")),
        (
            "Configuration *file*\n---\n\nSetext headings count too.",
            ("Install", "Configuration file"),
        ),
        (  # the splitter merges small neighbouring sections; the path is where a chunk starts
            "#### Deep (skipped levels)\n\nStill under configuration.\n\n# Usage\n\nStart the server.",
            ("Install", "Configuration file", "Deep (skipped levels)"),
        ),
    ]
    for chunk in chunks:
        assert chunk.tokens == count_tokens(chunk.text) <= 24


def test_markdown_keeps_a_heading_with_its_section() -> None:
    text = (
        "# Alpha\n\nThe first section has a short body.\n\n"
        "# Beta\n\nThe second section body is a little longer than that."
    )
    split = [
        (c.text, c.headings)
        for c in chunk_text(
            text, ChunkerConfig(strategy="markdown", chunk_tokens=16, overlap_tokens=0)
        )
    ]
    assert split == [
        ("# Alpha\n\nThe first section has a short body.", ("Alpha",)),
        ("# Beta\n\nThe second section body is a little longer than that.", ("Beta",)),
    ]
    # Plain recursive splitting fills the chunk instead, stranding "# Beta" from its body.
    recursive = [c.text for c in chunk_text(text, ChunkerConfig(chunk_tokens=16, overlap_tokens=0))]
    assert recursive == [
        "# Alpha\n\nThe first section has a short body.\n\n# Beta",
        "The second section body is a little longer than that.",
    ]
    # Sections that fit together are merged; the chunk's path is the one where it starts.
    [merged] = chunk_text(
        text, ChunkerConfig(strategy="markdown", chunk_tokens=64, overlap_tokens=0)
    )
    assert (merged.text, merged.headings) == (text, ("Alpha",))


def test_markdown_headings_in_quotes_and_lists_and_crlf() -> None:
    text = "# Top\r\n\r\n> # Quoted\r\n\r\n- # Listed\r\n\r\nBody.\r\n## Sub\rUnder sub."
    paths = chunking._HeadingPaths(text)
    # Headings nested in a blockquote or list item don't open sections; \r\n and \r end lines.
    assert paths.at(text.index("Body")) == ("Top",)
    assert paths.at(text.index("Under sub")) == ("Top", "Sub")
    chunks = chunk_text(text, ChunkerConfig(strategy="markdown", chunk_tokens=16, overlap_tokens=0))
    _check_offsets(text, chunks)
    assert chunks[0].headings == ("Top",)


def test_an_empty_heading_closes_sections_without_a_title() -> None:
    text = "# A\n\n## B\n\nunder b\n\n##\n\nunder nothing\n\n### C\n\nunder c"
    paths = chunking._HeadingPaths(text)
    assert paths.at(text.index("under b")) == ("A", "B")
    assert paths.at(text.index("under nothing")) == ("A",)
    assert paths.at(text.index("under c")) == ("A", "C")


# --- properties -------------------------------------------------------------------------------

CONFIGS = [
    ChunkerConfig(strategy=strategy, chunk_tokens=16, overlap_tokens=overlap)
    for strategy in ("recursive", "markdown")
    for overlap in (0, 5, 15)
]
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=400)
markdownish = st.lists(
    st.sampled_from(
        [
            "# ",
            "## ",
            "### ",
            "```",
            "\n",
            "\n\n",
            "  ",
            "- ",
            "> ",
            "word ",
            "Sentence. ",
            "é",
            "🎉",
            *WORDS,
        ]
    ),
    max_size=120,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(any_text, markdownish), st.sampled_from(CONFIGS))
def test_offsets_sizes_and_stripping_always_hold(text: str, config: ChunkerConfig) -> None:
    chunks = chunk_text(text, config)
    _check_offsets(text, chunks)
    for chunk in chunks:
        assert chunk.tokens == count_tokens(chunk.text) <= config.chunk_tokens
        if config.strategy == "recursive":
            assert chunk.headings == ()
    assert (chunks == []) == (text.strip() == "")


# --- cache ------------------------------------------------------------------------------------


def test_tokenizer_loads_once_under_concurrent_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunking, "_tokenizers", {})
    monkeypatch.setattr(chunking, "_splitters", {})
    loads: list[str] = []
    real_tokenizer_file = chunking._tokenizer_file

    def counting_tokenizer_file(spec: str) -> Path:
        loads.append(spec)
        return real_tokenizer_file(spec)

    monkeypatch.setattr(chunking, "_tokenizer_file", counting_tokenizer_file)
    text = " ".join(_sentences(random.Random(2), 40))
    config = ChunkerConfig(chunk_tokens=32, overlap_tokens=8)
    barrier = threading.Barrier(8)
    results: list[list[Chunk]] = []

    def work() -> None:
        barrier.wait()
        results.append(chunk_text(text, config))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["builtin:minilm"]
    assert len(results) == 8 and all(result == results[0] for result in results)
    assert len(results[0]) > 3
    assert chunking._get_splitter(config) is chunking._get_splitter(config.model_copy())
