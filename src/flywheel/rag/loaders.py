"""Document loaders for RAG knowledge bases: bytes or files in, plain text with structure out.

Every supported format becomes markdown-ish text (``#`` headings, ``- `` list items, blank lines
between blocks) so that a chunker can split on structure. A file that cannot be read is reported as
a :class:`LoaderError` naming the file, never as an opaque crash, and folder ingestion yields those
errors alongside the documents so one bad file does not abort the rest.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import bs4
import charset_normalizer
import docx
import pypdf
from docx.table import Table
from docx.text.paragraph import Paragraph

__all__ = [
    "DOCX_MEDIA_TYPE",
    "JSONL_MEDIA_TYPE",
    "SUPPORTED_MEDIA_TYPES",
    "SUPPORTED_SUFFIXES",
    "LoadedDocument",
    "LoaderError",
    "load_bytes",
    "load_path",
    "load_upload",
    "media_type_for",
    "supported_media_type",
]

DOCX_MEDIA_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
# JSON Lines has no registered type; this is the one most servers and tools use.
JSONL_MEDIA_TYPE = "application/x-ndjson"

_SUFFIX_TYPES: dict[str, str] = {
    ".txt": "text/plain",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".html": "text/html",
    ".htm": "text/html",
    ".pdf": "application/pdf",
    ".docx": DOCX_MEDIA_TYPE,
    ".csv": "text/csv",
    ".json": "application/json",
    ".jsonl": JSONL_MEDIA_TYPE,
}

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_SUFFIX_TYPES)
SUPPORTED_MEDIA_TYPES: frozenset[str] = frozenset(_SUFFIX_TYPES.values())

# Declared content types (HTTP headers, upload forms) that name a supported format differently.
_DECLARED_ALIASES: dict[str, str] = {
    "text/x-markdown": "text/markdown",
    "application/xhtml+xml": "text/html",
    "text/json": "application/json",
    "application/csv": "text/csv",
    "text/comma-separated-values": "text/csv",
    "application/jsonl": JSONL_MEDIA_TYPE,
    "application/jsonlines": JSONL_MEDIA_TYPE,
    "application/x-jsonlines": JSONL_MEDIA_TYPE,
    "application/json-seq": JSONL_MEDIA_TYPE,
}


class LoaderError(ValueError):
    """A file that cannot be read; ``str()`` names the file and the problem, e.g.
    ``"report.pdf: not a PDF (no %PDF header)"``."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across process pools
        return (type(self), (self.source, self.problem))


@dataclass(frozen=True)
class LoadedDocument:
    """Text extracted from one file, upload or URL.

    ``source`` is the relative path inside an ingested folder, an upload's file name, or the URL;
    ``text`` is never empty; ``metadata`` is JSON-serialisable (``title``, ``pages``, ``rows``...).
    """

    source: str
    text: str
    media_type: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """SHA-256 hex digest of the UTF-8 text: the key for deduplicating identical content."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _base_type(declared: str) -> str:
    """``"Text/HTML; charset=utf-8"`` -> ``"text/html"``."""
    return declared.split(";", 1)[0].strip().lower()


def _declared_charset(declared: str | None) -> str | None:
    if not declared:
        return None
    match = re.search(r";\s*charset\s*=\s*\"?([\w.:-]+)", declared, re.IGNORECASE)
    return match.group(1) if match else None


def supported_media_type(declared: str | None) -> str | None:
    """The supported media type that a declared content type (an HTTP ``Content-Type``, an
    upload's type) names, allowing for aliases and parameters; None when it names none."""
    if not declared:
        return None
    base = _base_type(declared)
    base = _DECLARED_ALIASES.get(base, base)
    if base in SUPPORTED_MEDIA_TYPES:
        return base
    if base.startswith("application/") and base.endswith("+json"):
        return "application/json"
    return None


def _suffix(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).suffix.lower()


def media_type_for(name: str, declared: str | None = None) -> str:
    """The media type to parse ``name`` as: by its suffix, else by a declared content type
    (parameters such as ``charset`` are ignored). Raises :class:`LoaderError` if neither is
    supported."""
    by_suffix = _SUFFIX_TYPES.get(_suffix(name))
    if by_suffix is not None:
        return by_suffix
    by_declared = supported_media_type(declared)
    if by_declared is not None:
        return by_declared
    described = _suffix(name) or "no suffix"
    if declared:
        described += f", {_base_type(declared)}"
    supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
    raise LoaderError(name, f"unsupported file type ({described}); supported: {supported}")


def load_bytes(
    source: str, data: bytes, media_type: str | None = None, *, encoding: str | None = None
) -> LoadedDocument:
    """Extract the text of one document held in memory.

    ``media_type``, when it names a supported format (``"text/html; charset=..."`` is fine), says
    how to parse the bytes; otherwise the format comes from ``source``'s suffix. For an upload
    whose declared type should only be a fallback, pass ``media_type_for(name, declared)``.
    ``encoding`` is a declared charset (e.g. from an HTTP header) tried first for text formats.
    Raises :class:`LoaderError` naming ``source`` when the bytes cannot be read or hold no text.
    """
    kind = supported_media_type(media_type) or media_type_for(source, media_type)
    encoding = encoding or _declared_charset(media_type)
    if kind == "application/pdf":
        text, metadata = _pdf_text(source, data)
    elif kind == DOCX_MEDIA_TYPE:
        text, metadata = _docx_text(source, data)
    elif kind == "text/html":
        text, metadata = _html_text(data, encoding)
    else:
        decoded = _clean(_decode_text(data, encoding))
        if kind == "text/csv":
            text, metadata = _csv_text(source, decoded)
        elif kind == "application/json":
            text, metadata = _json_text(source, decoded)
        elif kind == JSONL_MEDIA_TYPE:
            text, metadata = _jsonl_text(source, decoded)
        elif kind == "text/markdown":
            text, metadata = decoded.strip("\n"), _markdown_metadata(decoded)
        else:
            text, metadata = decoded.strip("\n"), {}
    if not text.strip():
        hint = " (scanned PDF?)" if kind == "application/pdf" else ""
        raise LoaderError(source, f"no text found{hint}")
    return LoadedDocument(source=source, text=text, media_type=kind, metadata=metadata)


def load_upload(source: str, data: bytes, declared: str | None) -> LoadedDocument | LoaderError:
    """An uploaded file as a document, or as the :class:`LoaderError` saying why it cannot be
    read (ingestion reports those and goes on). The file's suffix decides its format; the
    type the client declared counts only when the suffix says nothing, and a generic
    ``application/octet-stream`` declares nothing."""
    if declared in ("", "application/octet-stream"):
        declared = None
    try:
        return load_bytes(source, data, media_type_for(source, declared))
    except LoaderError as exc:
        return exc


def load_path(path: Path, *, max_bytes: int = 50_000_000) -> Iterator[LoadedDocument | LoaderError]:
    """Load a file (one item) or every supported file under a folder, recursively.

    Folder entries come sorted by their relative POSIX path, which is also their ``source``;
    hidden files and folders (dot-names) are skipped, symbolic links to folders are not followed
    and links to files outside the folder are refused. Unreadable, unsupported or oversized files
    are yielded as :class:`LoaderError` so a caller can report them without aborting the others.
    Raises :class:`LoaderError` at once when ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, max_bytes)
    if path.is_file():
        return iter([_load_file(path, path.name, max_bytes)])
    raise LoaderError(str(path), "no such file or folder")


def _load_folder(root: Path, max_bytes: int) -> Iterator[LoadedDocument | LoaderError]:
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    for folder, subfolders, files in os.walk(root):
        # Pruning in place stops os.walk from descending into hidden folders at all.
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            file_path = Path(folder, name)
            found.append((file_path.relative_to(root).as_posix(), file_path))
    for relative, file_path in sorted(found):
        if file_path.is_symlink() and not file_path.resolve().is_relative_to(real_root):
            yield LoaderError(relative, "symbolic link points outside the folder")
            continue
        yield _load_file(file_path, relative, max_bytes)


def _load_file(file_path: Path, source: str, max_bytes: int) -> LoadedDocument | LoaderError:
    try:
        media_type = media_type_for(source)
        size = file_path.stat().st_size
        if size > max_bytes:
            return LoaderError(source, f"file is larger than {max_bytes} bytes ({size} bytes)")
        data = file_path.read_bytes()
        if len(data) > max_bytes:  # the file grew since stat()
            return LoaderError(source, f"file is larger than {max_bytes} bytes")
        return load_bytes(source, data, media_type)
    except LoaderError as error:
        return error
    except OSError as error:
        return LoaderError(source, f"cannot read file ({error.strerror or error})")


# --- text -------------------------------------------------------------------------------------

_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _decode_text(data: bytes, declared: str | None = None) -> str:
    """Decode text without ever failing: BOM, declared charset, UTF-8, a guess, then latin-1."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    if data.startswith(_UTF16_BOMS):
        return data.decode("utf-16", errors="replace")
    if declared:
        try:
            return data.decode(declared)
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    guesses = charset_normalizer.from_bytes(data)
    if guesses:
        # Short Western text fits several single-byte code pages equally well and the detector
        # often ranks cp1250 first ("crème" -> "crčme"); cp1252 is by far the likelier source.
        least_chaos = min(guess.chaos for guess in guesses)
        for guess in guesses:
            if guess.chaos == least_chaos and "cp1252" in guess.could_be_from_charset:
                return data.decode("cp1252", errors="replace")
        best = guesses.best()
        if best is not None:
            return str(best)
    return data.decode("latin-1")  # maps every byte, so it cannot fail


def _clean(text: str) -> str:
    """Normalise newlines and drop NULs (which databases such as PostgreSQL reject in text)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _markdown_metadata(text: str) -> dict[str, Any]:
    """Title (the first level-1 heading) and heading count, ignoring fenced code blocks."""
    title: str | None = None
    headings = 0
    in_fence = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else _ATX_HEADING.match(line)
        if match is None:
            continue
        headings += 1
        if title is None and len(match.group(1)) == 1 and match.group(2):
            title = match.group(2).strip()
    metadata: dict[str, Any] = {"headings": headings}
    if title:
        metadata["title"] = title
    return metadata


# --- HTML -------------------------------------------------------------------------------------

# Elements whose text is never content: code, navigation, form controls and embedded media.
_HTML_DROP = frozenset(
    {
        "script",
        "style",
        "nav",
        "noscript",
        "head",
        "template",
        "svg",
        "canvas",
        "iframe",
        "object",
        "embed",
        "select",
        "button",
        "input",
        "textarea",
        "datalist",
    }
)
_HTML_BLOCK = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "caption",
        "center",
        "dd",
        "details",
        "dialog",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "header",
        "hgroup",
        "hr",
        "html",
        "legend",
        "li",
        "main",
        "menu",
        "ol",
        "p",
        "section",
        "summary",
        "ul",
    }
)
_HTML_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_HTML_SKIPPED_STRINGS = (
    bs4.Comment,
    bs4.Doctype,
    bs4.Declaration,
    bs4.ProcessingInstruction,
)
_WHITESPACE = re.compile(r"\s+")


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


class _HtmlRenderer:
    """Turns a parsed HTML tree into markdown-ish blocks, walking iteratively (deeply nested
    real-world pages would overflow a recursive walk)."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, str]] = []  # (kind, text); kind decides the separator
        self.headings = 0
        self._lines: list[str] = []
        self._inline: list[str] = []
        self._prefix = ""
        self._kind = "p"
        self._list_depth = 0
        self._heading_depth = 0

    def render(self, root: bs4.Tag) -> str:
        stack: list[tuple[bs4.PageElement, bool]] = [(root, False)]
        while stack:
            node, leaving = stack.pop()
            if leaving:
                assert isinstance(node, bs4.Tag)
                self._leave(node)
            elif isinstance(node, bs4.Tag):
                if self._enter(node):
                    stack.append((node, True))
                    stack.extend((child, False) for child in reversed(node.contents))
            elif isinstance(node, bs4.NavigableString) and not isinstance(
                node, _HTML_SKIPPED_STRINGS
            ):
                self._inline.append(str(node))
        self._flush()
        parts: list[str] = []
        previous_kind = ""
        for kind, text in self.blocks:
            if parts:
                # Consecutive list items and table rows read better as one tight block.
                parts.append("\n" if kind == previous_kind == "li" else "\n\n")
            parts.append(text)
            previous_kind = kind
        return "".join(parts)

    def _enter(self, tag: bs4.Tag) -> bool:
        """Handle an opening tag; True when its children should be walked."""
        name = tag.name
        if name in _HTML_DROP or tag.has_attr("hidden"):
            return False
        if name in _HTML_HEADINGS:
            self._flush()
            self._heading_depth += 1
            self._prefix = "#" * _HTML_HEADINGS[name] + " "
            self._kind = "heading"
            return True
        if name == "br":
            self._line_break()
            return False
        if name == "pre":
            self._flush()
            code = tag.get_text().strip("\n")
            if code.strip():
                self.blocks.append(("pre", f"```\n{code}\n```"))
            return False
        if name == "table":
            self._flush()
            self._table(tag)
            return False
        if name in ("ul", "ol"):
            self._flush()
            self._list_depth += 1
            return True
        if name == "li":
            self._flush()
            self._prefix = "  " * max(self._list_depth - 1, 0) + "- "
            self._kind = "li"
            return True
        if name in _HTML_BLOCK:
            self._flush()
        return True

    def _leave(self, tag: bs4.Tag) -> None:
        name = tag.name
        if name in _HTML_HEADINGS:
            self._heading_depth -= 1
            if self._flush():
                self.headings += 1
            self._reset_block()  # an empty heading must not leave its "#" on the next block
        elif name in ("ul", "ol"):
            self._flush()
            self._list_depth -= 1
        elif name in _HTML_BLOCK:
            self._flush()
            if name == "li":
                self._reset_block()

    def _reset_block(self) -> None:
        self._prefix = ""
        self._kind = "p"

    def _line_break(self) -> None:
        self._lines.append(_collapse("".join(self._inline)))
        self._inline = []

    def _flush(self) -> bool:
        """End the current block; True when it had text. Inside a heading, nested blocks and line
        breaks stay on the heading's one line."""
        if self._heading_depth > 0 and self._kind == "heading":
            return False
        self._line_break()
        lines = [line for line in self._lines if line]
        self._lines = []
        if not lines:
            return False
        joiner = " " if self._kind == "heading" else "\n"
        self.blocks.append((self._kind, self._prefix + joiner.join(lines)))
        self._reset_block()
        return True

    def _table(self, table: bs4.Tag) -> None:
        rows: list[str] = []
        for row in table.find_all("tr"):
            cells = [
                _collapse(cell.get_text(" "))
                for cell in row.find_all(["td", "th"], recursive=False)
            ]
            if any(cells):
                rows.append(" | ".join(cells))
        if rows:
            self.blocks.append(("table", "\n".join(rows)))


def _html_text(data: bytes, encoding: str | None) -> tuple[str, dict[str, Any]]:
    soup = bs4.BeautifulSoup(data, "lxml", from_encoding=encoding)
    metadata: dict[str, Any] = {}
    if soup.title is not None:
        title = _collapse(soup.title.get_text())
        if title:
            metadata["title"] = title
    renderer = _HtmlRenderer()
    text = _clean(renderer.render(soup))
    metadata["headings"] = renderer.headings
    return text, metadata


# --- PDF --------------------------------------------------------------------------------------


def _pdf_text(source: str, data: bytes) -> tuple[str, dict[str, Any]]:
    if b"%PDF-" not in data[:1024]:
        raise LoaderError(source, "not a PDF (no %PDF header)")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        # Many PDFs are encrypted only to restrict printing/copying, with an empty user
        # password; those open fine. Anything else needs a password we do not have.
        if reader.is_encrypted and reader.decrypt("") == pypdf.PasswordType.NOT_DECRYPTED:
            raise LoaderError(source, "encrypted PDF (a password is required)")
        page_texts = [_clean(page.extract_text() or "").strip("\n") for page in reader.pages]
        title = reader.metadata.title if reader.metadata is not None else None
    except LoaderError:
        raise
    except Exception as error:  # pypdf raises many types on malformed input; all mean "broken"
        raise LoaderError(source, f"cannot read PDF ({type(error).__name__}: {error})") from error
    offsets: list[int] = []
    position = 0
    for text in page_texts:
        offsets.append(position)
        position += len(text) + 2  # the "\n\n" page separator
    metadata: dict[str, Any] = {"pages": offsets, "page_count": len(page_texts)}
    if isinstance(title, str) and title.strip():
        metadata["title"] = title.strip()
    return "\n\n".join(page_texts), metadata


# --- DOCX -------------------------------------------------------------------------------------

_DOCX_HEADING = re.compile(r"^heading\s*([1-9])$", re.IGNORECASE)
_DOCX_LIST = re.compile(r"^list\b", re.IGNORECASE)


def _docx_heading_level(paragraph: Paragraph) -> int | None:
    """Markdown heading level for a paragraph styled (or based on) Heading N or Title."""
    style = paragraph.style
    for _ in range(10):  # base-style chains are short; the bound guards against cycles
        if style is None or style.name is None:
            return None
        if style.name.lower() == "title":
            return 1
        match = _DOCX_HEADING.match(style.name)
        if match:
            return min(int(match.group(1)), 6)
        style = style.base_style
    return None


def _docx_table(table: Table) -> str:
    rows: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        seen: set[int] = set()
        for cell in row.cells:
            # A merged cell is returned once per grid column it spans; render it once.
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            cells.append(_collapse(cell.text))
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


def _docx_text(source: str, data: bytes) -> tuple[str, dict[str, Any]]:
    if not data.startswith(b"PK"):
        raise LoaderError(source, "not a DOCX (not a zip archive)")
    blocks: list[str] = []
    headings = 0
    try:
        document = docx.Document(io.BytesIO(data))
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                rendered = _docx_table(item)
                if rendered:
                    blocks.append(rendered)
                continue
            text = item.text.strip()
            if not text:
                continue
            level = _docx_heading_level(item)
            if level is not None:
                headings += 1
                blocks.append("#" * level + " " + _collapse(text))
            elif item.style is not None and _DOCX_LIST.match(item.style.name or ""):
                blocks.append("- " + text)
            else:
                blocks.append(text)
        title = document.core_properties.title
    except Exception as error:  # zip, XML and package errors all mean "broken file"
        raise LoaderError(source, f"cannot read DOCX ({type(error).__name__}: {error})") from error
    metadata: dict[str, Any] = {"headings": headings}
    if title and title.strip():
        metadata["title"] = title.strip()
    return _clean("\n\n".join(blocks)), metadata


# --- CSV and JSON -----------------------------------------------------------------------------


def _csv_text(source: str, text: str) -> tuple[str, dict[str, Any]]:
    sample = text[:65536]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    blocks: list[str] = []
    header: list[str] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if not header:
                header = [cell.strip() or f"column {index + 1}" for index, cell in enumerate(row)]
                continue
            lines = []
            for index, value in enumerate(row):
                column = header[index] if index < len(header) else f"column {index + 1}"
                if value.strip():
                    lines.append(f"{column}: {value.strip()}")
            if lines:
                blocks.append("\n".join(lines))
    except csv.Error as error:
        raise LoaderError(source, f"invalid CSV at line {reader.line_num}: {error}") from error
    return "\n\n".join(blocks), {"rows": len(blocks), "columns": header}


def _is_empty_json(value: object) -> bool:
    return value is None or value == "" or value == [] or value == {}


def _pretty_json(value: object) -> str:
    return "" if _is_empty_json(value) else json.dumps(value, indent=2, ensure_ascii=False)


def _json_text(source: str, text: str) -> tuple[str, dict[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoaderError(source, f"invalid JSON at line {error.lineno}: {error.msg}") from error
    except RecursionError:
        raise LoaderError(source, "JSON nested too deeply") from None
    if isinstance(value, list):
        # One block per record so a chunker can keep each record whole.
        blocks = [_pretty_json(item) for item in value]
        blocks = [block for block in blocks if block]
        return "\n\n".join(blocks), {"records": len(blocks)}
    return _pretty_json(value), {"records": 0 if _is_empty_json(value) else 1}


def _jsonl_text(source: str, text: str) -> tuple[str, dict[str, Any]]:
    blocks: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise LoaderError(source, f"invalid JSON at line {number}: {error.msg}") from error
        except RecursionError:
            raise LoaderError(source, f"JSON nested too deeply at line {number}") from None
        block = _pretty_json(value)
        if block:
            blocks.append(block)
    return "\n\n".join(blocks), {"records": len(blocks)}
