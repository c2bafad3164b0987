"""Document loaders: every format built here in the test (no binary fixtures), folder walks,
encodings and the errors a caller reports for files it could not read."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import docx
import pypdf
import pytest

from flywheel.rag.loaders import (
    DOCX_MEDIA_TYPE,
    JSONL_MEDIA_TYPE,
    SUPPORTED_SUFFIXES,
    LoadedDocument,
    LoaderError,
    load_bytes,
    load_path,
    media_type_for,
    supported_media_type,
)


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A minimal valid PDF: one Helvetica text object per line on each page."""
    objects: list[bytes] = []
    page_count = len(pages)
    font_number = 3 + 2 * page_count
    kids = " ".join(f"{3 + 2 * index} 0 R" for index in range(page_count))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {page_count} >>".encode())
    for index, lines in enumerate(pages):
        content_number = 4 + 2 * index
        objects.append(
            (
                f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                f"/Contents {content_number} 0 R /Resources << /Font << /F1 {font_number} 0 R >> >> >>"
            ).encode()
        )
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            ops.append(f"{_pdf_string(line)} Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    info_ref = ""
    if title is not None:
        objects.append(f"<< /Title {_pdf_string(title)} >>".encode("latin-1"))
        info_ref = f" /Info {len(objects)} 0 R"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info_ref} >>\n".encode()
    out += b"startxref\n%d\n%%%%EOF\n" % xref_at
    return bytes(out)


def make_docx() -> bytes:
    document = docx.Document()
    document.core_properties.title = "Employee Handbook"
    document.add_heading("Handbook", level=0)
    document.add_heading("Leave policy", level=1)
    document.add_paragraph("Everyone gets 25 days of paid leave.")
    document.add_paragraph("Ask your manager first", style="List Bullet")
    document.add_heading("Carry-over", level=2)
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Days"
    table.cell(0, 1).text = "Rule"
    table.cell(1, 0).text = "5"
    table.cell(1, 1).text = "may carry over"
    document.add_paragraph("Contact HR for details.")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


# --- media types ----------------------------------------------------------------------------


def test_media_type_by_suffix_then_declared_type() -> None:
    assert media_type_for("notes/README.MD") == "text/markdown"
    assert media_type_for("a.htm") == "text/html"
    assert media_type_for("rows.jsonl") == JSONL_MEDIA_TYPE
    assert media_type_for("report.docx") == DOCX_MEDIA_TYPE
    # The suffix wins over a declared type; the declared type is the fallback.
    assert media_type_for("data.csv", "text/plain") == "text/csv"
    assert media_type_for("download", "text/html; charset=utf-8") == "text/html"
    assert media_type_for("api", "application/vnd.api+json") == "application/json"
    assert supported_media_type("text/x-markdown") == "text/markdown"
    assert supported_media_type("image/png") is None
    assert (
        frozenset(
            {
                ".txt",
                ".md",
                ".markdown",
                ".html",
                ".htm",
                ".pdf",
                ".docx",
                ".csv",
                ".json",
                ".jsonl",
            }
        )
        == SUPPORTED_SUFFIXES
    )
    with pytest.raises(LoaderError) as caught:
        media_type_for("x.bin", "application/octet-stream")
    assert str(caught.value).startswith("x.bin: unsupported file type (.bin, application/octet")
    assert caught.value.source == "x.bin"


def test_loader_error_pickles() -> None:
    error = LoaderError("a/report.pdf", "not a PDF (no %PDF header)")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.problem, str(copy)) == (
        "a/report.pdf",
        "not a PDF (no %PDF header)",
        "a/report.pdf: not a PDF (no %PDF header)",
    )


def test_explicit_media_type_overrides_suffix() -> None:
    doc = load_bytes("page.md", b"<h1>Really HTML</h1>", "text/html")
    assert doc.media_type == "text/html"
    assert doc.text == "# Really HTML"


# --- text -----------------------------------------------------------------------------------


def test_utf8_bom_and_newlines_normalised() -> None:
    doc = load_bytes("notes.txt", b"\xef\xbb\xbfline one\r\nline two\rline three\r\n")
    assert doc.text == "line one\nline two\nline three"
    assert doc.media_type == "text/plain"


def test_latin1_text_is_decoded_not_crashed() -> None:
    data = "Café crème, naïve façade.\nÀ bientôt, Grüße aus München!".encode("latin-1")
    doc = load_bytes("legacy.txt", data)
    assert doc.text == "Café crème, naïve façade.\nÀ bientôt, Grüße aus München!"


def test_declared_charset_is_used_first() -> None:
    data = "Привет, мир".encode("koi8-r")
    assert load_bytes("ru.txt", data, encoding="koi8-r").text == "Привет, мир"
    assert load_bytes("ru.txt", data, "text/plain; charset=koi8-r").text == "Привет, мир"


def test_binary_garbage_never_crashes() -> None:
    doc = load_bytes("odd.txt", bytes(range(256)) * 4)
    assert doc.text
    assert "\x00" not in doc.text


def test_markdown_title_and_headings_ignore_code_fences() -> None:
    text = "# Guide\n\nIntro.\n\n```\n# not a heading\n```\n\n## Install\n\nSteps.\n"
    doc = load_bytes("guide.md", text.encode())
    assert doc.media_type == "text/markdown"
    assert doc.text == text.strip("\n")
    assert doc.metadata == {"title": "Guide", "headings": 2}


def test_empty_text_is_an_error() -> None:
    with pytest.raises(LoaderError, match=r"^blank\.txt: no text found$"):
        load_bytes("blank.txt", b"\n  \r\n")


def test_content_hash_is_sha256_of_text_and_equal_for_equal_text() -> None:
    one = load_bytes("a.txt", b"same words\r\n")
    two = load_bytes("dir/b.md", b"\xef\xbb\xbfsame words\n")
    other = load_bytes("c.txt", b"other words")
    assert one.content_hash == two.content_hash
    assert one.content_hash != other.content_hash
    assert one.content_hash == hashlib.sha256(b"same words").hexdigest()


# --- HTML -----------------------------------------------------------------------------------

PAGE = b"""<!DOCTYPE html>
<html><head><title>  Deploy   Guide </title>
<style>body { color: red }</style><script>var secret = "do not index";</script></head>
<body>
<nav><a href="/">Home</a> | <a href="/docs">Docs</a></nav>
<header><h1>Deploying <em>Flywheel</em></h1></header>
<main>
  <p>Flywheel   runs on
     any Linux host.</p>
  <h2>Requirements</h2>
  <ul><li>Python 3.11</li><li><p>A GPU</p><ul><li>optional</li></ul></li></ul>
  <p>First line<br>Second line</p>
  <table><tr><th>Port</th><th>Use</th></tr><tr><td>8080</td><td>gateway</td></tr></table>
  <noscript>Please enable JavaScript</noscript>
  <!-- a comment that must not appear -->
  <div hidden>hidden text</div>
  <h3>Caf&eacute;&nbsp;notes</h3>
  <pre>flywheel up
  --port 8080</pre>
</main>
</body></html>"""


def test_html_keeps_structure_and_drops_scripts_and_navigation() -> None:
    doc = load_bytes("guide.html", PAGE)
    assert doc.media_type == "text/html"
    assert doc.metadata == {"title": "Deploy Guide", "headings": 3}
    assert doc.text == (
        "# Deploying Flywheel\n\n"
        "Flywheel runs on any Linux host.\n\n"
        "## Requirements\n\n"
        "- Python 3.11\n"
        "- A GPU\n"
        "  - optional\n\n"
        "First line\nSecond line\n\n"
        "Port | Use\n8080 | gateway\n\n"
        "### Café notes\n\n"
        "```\nflywheel up\n  --port 8080\n```"
    )
    for unwanted in ("secret", "Home", "Docs", "enable JavaScript", "comment", "hidden text"):
        assert unwanted not in doc.text


def test_html_uses_meta_charset() -> None:
    data = '<html><head><meta charset="windows-1252"></head><body><p>naïve “quotes”</p>'
    doc = load_bytes("old.htm", data.encode("cp1252"))
    assert doc.text == "naïve “quotes”"


def test_html_without_body_text_is_an_error() -> None:
    with pytest.raises(LoaderError, match=r"^empty\.html: no text found$"):
        load_bytes("empty.html", b"<html><head><title>T</title><script>x()</script></head></html>")


# --- PDF ------------------------------------------------------------------------------------


def test_pdf_text_pages_and_title() -> None:
    data = make_pdf(
        [["Quarterly report", "Revenue grew (a lot)."], ["Second page text"]],
        title="Q3 Report",
    )
    doc = load_bytes("report.pdf", data)
    assert doc.media_type == "application/pdf"
    assert doc.metadata["title"] == "Q3 Report"
    assert doc.metadata["page_count"] == 2
    assert doc.text == "Quarterly report\nRevenue grew (a lot).\n\nSecond page text"
    starts = doc.metadata["pages"]
    assert starts == [0, 40]
    assert doc.text[starts[1] :].startswith("Second page text")
    assert doc.text[: starts[1]].endswith("\n\n")
    json.dumps(doc.metadata)  # JSON-serialisable


def test_pdf_without_text_is_reported_as_scanned() -> None:
    writer = pypdf.PdfWriter()
    writer.add_blank_page(width=200, height=200)
    buffer = io.BytesIO()
    writer.write(buffer)
    with pytest.raises(LoaderError, match=r"^scan\.pdf: no text found \(scanned PDF\?\)$"):
        load_bytes("scan.pdf", buffer.getvalue())


def test_not_a_pdf_and_broken_pdf() -> None:
    with pytest.raises(LoaderError) as caught:
        load_bytes("report.pdf", b"<html>oops</html>")
    assert str(caught.value) == "report.pdf: not a PDF (no %PDF header)"
    with pytest.raises(LoaderError, match=r"^broken\.pdf: cannot read PDF"):
        load_bytes("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 9 0 R")


def _encrypt(data: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=user_password, owner_password="owner-secret")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def test_encrypted_pdf() -> None:
    plain = make_pdf([["Confidential memo"]])
    with pytest.raises(LoaderError) as caught:
        load_bytes("locked.pdf", _encrypt(plain, "user-secret"))
    assert str(caught.value) == "locked.pdf: encrypted PDF (a password is required)"
    # Encrypted only against editing (empty user password): readable.
    doc = load_bytes("restricted.pdf", _encrypt(plain, ""))
    assert "Confidential memo" in doc.text


# --- DOCX -----------------------------------------------------------------------------------


def test_docx_headings_lists_tables_and_title() -> None:
    doc = load_bytes("handbook.docx", make_docx())
    assert doc.media_type == DOCX_MEDIA_TYPE
    assert doc.metadata == {"title": "Employee Handbook", "headings": 3}
    assert doc.text == (
        "# Handbook\n\n"
        "# Leave policy\n\n"
        "Everyone gets 25 days of paid leave.\n\n"
        "- Ask your manager first\n\n"
        "## Carry-over\n\n"
        "Days | Rule\n5 | may carry over\n\n"
        "Contact HR for details."
    )


def test_docx_merged_cells_render_once() -> None:
    document = docx.Document()
    table = document.add_table(rows=2, cols=3)
    merged = table.cell(0, 0).merge(table.cell(0, 2))
    merged.text = "Wide header"
    for column, value in enumerate(["a", "b", "c"]):
        table.cell(1, column).text = value
    buffer = io.BytesIO()
    document.save(buffer)
    doc = load_bytes("t.docx", buffer.getvalue())
    assert doc.text == "Wide header\na | b | c"


def test_not_a_docx() -> None:
    with pytest.raises(LoaderError, match=r"^x\.docx: not a DOCX \(not a zip archive\)$"):
        load_bytes("x.docx", b"plain text")
    with pytest.raises(LoaderError, match=r"^y\.docx: cannot read DOCX"):
        load_bytes("y.docx", b"PK\x03\x04truncated")


# --- CSV and JSON ---------------------------------------------------------------------------


def test_csv_rows_become_column_value_blocks() -> None:
    data = b'name,team,notes\r\nAda,Core,"likes, commas"\r\n\r\nGrace,Infra,\r\n'
    doc = load_bytes("people.csv", data)
    assert doc.media_type == "text/csv"
    assert doc.text == ("name: Ada\nteam: Core\nnotes: likes, commas\n\nname: Grace\nteam: Infra")
    assert doc.metadata == {"rows": 2, "columns": ["name", "team", "notes"]}


def test_csv_semicolon_dialect_is_sniffed() -> None:
    data = "Produkt;Preis;Größe\nTisch;120,50;groß\nStuhl;45,00;klein\n".encode()
    doc = load_bytes("preise.csv", data)
    assert doc.text.split("\n\n")[0] == "Produkt: Tisch\nPreis: 120,50\nGröße: groß"
    assert doc.metadata["rows"] == 2


def test_json_object_and_list() -> None:
    obj = load_bytes("config.json", json.dumps({"name": "Zoë", "tags": ["a"]}).encode())
    assert obj.media_type == "application/json"
    assert obj.text == '{\n  "name": "Zoë",\n  "tags": [\n    "a"\n  ]\n}'
    listed = load_bytes("items.json", b'[{"id": 1}, {"id": 2}]')
    assert listed.text == '{\n  "id": 1\n}\n\n{\n  "id": 2\n}'
    assert listed.metadata == {"records": 2}


def test_invalid_json_names_the_line() -> None:
    data = b'{\n  "a": 1,\n  "b": oops\n}'
    with pytest.raises(LoaderError) as caught:
        load_bytes("data.json", data)
    assert str(caught.value) == "data.json: invalid JSON at line 3: Expecting value"


def test_jsonl_blocks_and_bad_line() -> None:
    doc = load_bytes("rows.jsonl", b'{"q": "one"}\n\n{"q": "two"}\n')
    assert doc.media_type == JSONL_MEDIA_TYPE
    assert doc.text == '{\n  "q": "one"\n}\n\n{\n  "q": "two"\n}'
    assert doc.metadata == {"records": 2}
    with pytest.raises(LoaderError, match=r"^rows\.jsonl: invalid JSON at line 3: "):
        load_bytes("rows.jsonl", b'{"q": 1}\n{"q": 2}\n{"q": \n')


def test_empty_json_is_no_text() -> None:
    with pytest.raises(LoaderError, match="no text found"):
        load_bytes("empty.json", b"[]")


# --- folders --------------------------------------------------------------------------------


def test_load_path_walks_a_folder(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B\n\nbee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "c.json").write_text('{"c": 3}')
    (tmp_path / "sub" / "page.html").write_text("<p>html</p>")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden folder")
    (tmp_path / ".env.txt").write_text("hidden file")
    (tmp_path / "big.txt").write_text("x" * 200)
    (tmp_path / "broken.json").write_text("{nope")

    items = list(load_path(tmp_path, max_bytes=100))
    sources = [item.source for item in items]
    assert sources == [
        "a.txt",
        "b.md",
        "big.txt",
        "broken.json",
        "sub/blob.bin",
        "sub/deeper/c.json",
        "sub/page.html",
    ]
    documents = {item.source: item for item in items if isinstance(item, LoadedDocument)}
    errors = {item.source: str(item) for item in items if isinstance(item, LoaderError)}
    assert set(documents) == {"a.txt", "b.md", "sub/deeper/c.json", "sub/page.html"}
    assert documents["b.md"].text == "# B\n\nbee"
    assert documents["sub/page.html"].text == "html"
    assert errors["sub/blob.bin"].startswith("sub/blob.bin: unsupported file type (.bin)")
    assert errors["big.txt"] == "big.txt: file is larger than 100 bytes (200 bytes)"
    assert errors["broken.json"].startswith("broken.json: invalid JSON at line 1")
    # Same order on every run.
    assert [item.source for item in load_path(tmp_path, max_bytes=100)] == sources


def test_load_path_single_file_and_missing_path(tmp_path: Path) -> None:
    file = tmp_path / "one.md"
    file.write_text("# One")
    (item,) = list(load_path(file))
    assert isinstance(item, LoadedDocument)
    assert item.source == "one.md"
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (unsupported,) = list(load_path(tmp_path / "image.png"))
    assert isinstance(unsupported, LoaderError)
    assert unsupported.problem.startswith("unsupported file type (.png)")
    with pytest.raises(LoaderError, match="no such file or folder"):
        load_path(tmp_path / "missing")


def test_load_path_refuses_links_leaving_the_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    root = tmp_path / "kb"
    root.mkdir()
    (root / "inside.txt").write_text("fine")
    (root / "alias.txt").symlink_to(root / "inside.txt")
    (root / "escape.txt").symlink_to(outside)
    items = {item.source: item for item in load_path(root)}
    assert isinstance(items["alias.txt"], LoadedDocument)
    assert items["alias.txt"].text == "fine"
    assert str(items["escape.txt"]) == "escape.txt: symbolic link points outside the folder"
