"""SSRF-safe URL fetching against a real HTTP(S) server on loopback: refusals, allow-lists,
redirect checks, DNS-rebinding pinning, size limits, the overall deadline and TLS names."""

from __future__ import annotations

import datetime
import gzip
import http.server
import pickle
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flywheel.rag.fetch import FetchError, FetchPolicy, check_url, fetch_url
from flywheel.rag.loaders import LoadedDocument

LOOPBACK = FetchPolicy(allow_hosts=("127.0.0.1",), timeout=5.0)

# path -> (status, headers, body)
ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/doc.txt": (
        200,
        {
            "Content-Type": "text/plain; charset=utf-8",
            "ETag": '"v1"',
            "Last-Modified": "Wed, 01 Jan 2025 00:00:00 GMT",
        },
        b"hello from loopback\r\n",
    ),
    "/page": (
        200,
        {"Content-Type": "text/html"},
        b"<html><head><title>Page</title><script>evil()</script></head>"
        b"<body><h1>Heading</h1><p>Body text.</p></body></html>",
    ),
    "/blob/README.md": (
        200,
        {"Content-Type": "text/html; charset=utf-8"},
        b"<html><body><h2>Rendered</h2><p>by the forge</p></body></html>",
    ),
    "/raw/data.csv": (200, {"Content-Type": "text/plain"}, b"k,v\na,1\n"),
    "/ru": (200, {"Content-Type": "text/plain; charset=koi8-r"}, "Привет".encode("koi8-r")),
    "/zipped.txt": (
        200,
        {"Content-Type": "text/plain", "Content-Encoding": "gzip"},
        gzip.compress(b"compressed words"),
    ),
    "/bomb.txt": (
        200,
        {"Content-Type": "text/plain", "Content-Encoding": "gzip"},
        gzip.compress(b"a" * 300_000),
    ),
    "/big.txt": (200, {"Content-Type": "text/plain"}, b"x" * 1000),
    "/image": (200, {"Content-Type": "image/png"}, b"\x89PNG"),
    "/empty.txt": (200, {"Content-Type": "text/plain"}, b"   "),
    "/missing": (404, {"Content-Type": "text/plain"}, b"not here"),
    "/redirect": (302, {"Location": "/doc.txt"}, b""),
    "/redirect-twice": (301, {"Location": "/redirect"}, b""),
    "/redirect-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
    "/redirect-file": (302, {"Location": "file:///etc/passwd"}, b""),
    "/loop": (302, {"Location": "/loop"}, b""),
}


class Handler(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str | None]] = []

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        Handler.requests.append((self.path, self.headers.get("Host")))
        try:
            if self.path == "/stream.txt":  # no Content-Length: ends when the connection closes
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"y" * 100)
                return
            if self.path == "/slow-headers":
                time.sleep(3)
            if self.path == "/drip.txt":  # each byte well within a read timeout, but forever
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.05)
                return
            status, headers, body = ROUTES.get(self.path, (404, {}, b"no route"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, which is what several tests want


def _serve(server: http.server.ThreadingHTTPServer) -> Iterator[str]:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a plain HTTP server."""
    yield from _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))


def _fake_dns(
    monkeypatch: pytest.MonkeyPatch, names: dict[str, Callable[[], list[str]]]
) -> list[str]:
    """Resolve ``names`` to the given addresses, everything else normally; returns the log."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            asked.append(host)
            results = []
            for address in names[host]():
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
                results.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
            return results
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


# --- refusals without any network -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("file:///etc/passwd", "only http and https URLs can be fetched, not 'file'"),
        ("ftp://example.com/x", "only http and https URLs can be fetched, not 'ftp'"),
        ("http://169.254.169.254/latest/meta-data/", "link-local address 169.254.169.254"),
        ("http://[::1]/", "loopback address ::1"),
        ("http://10.1.2.3/", "private address 10.1.2.3"),
        ("http://192.168.0.1:8080/", "private address 192.168.0.1"),
        ("http://2130706433/", "loopback address 127.0.0.1"),
        ("http://0x7f000001/", "loopback address 127.0.0.1"),
        ("http://127.1/admin", "loopback address 127.0.0.1"),
        ("http://0.0.0.0/", "unspecified address 0.0.0.0"),
        ("http://100.64.0.1/", "not globally routable address 100.64.0.1"),
        ("http://224.0.0.1/", "multicast address 224.0.0.1"),
        ("http://[fd00::1]/", "private address fd00::1"),
        ("http://[fe80::1]/", "link-local address fe80::1"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped loopback address 127.0.0.1"),
        ("http://[2002:7f00:1::]/", "6to4 loopback address 127.0.0.1"),
        ("http://[64:ff9b::a00:1]/", "NAT64 private address 10.0.0.1"),
    ],
)
def test_refused_urls(url: str, problem: str) -> None:
    with pytest.raises(FetchError) as caught:
        check_url(url, FetchPolicy())
    assert problem in str(caught.value)
    assert caught.value.status is None
    with pytest.raises(FetchError):
        fetch_url(url)


def test_credentials_refused_and_hidden() -> None:
    with pytest.raises(FetchError) as caught:
        check_url("http://alice:hunter2@example.com/", FetchPolicy())
    assert str(caught.value) == "http://***@example.com/: credentials in URLs are not allowed"
    assert "hunter2" not in str(caught.value)


def test_fetch_error_pickles_and_bad_ca_file_is_a_fetch_error(tmp_path: Path) -> None:
    error = FetchError("http://u:p@x.test/", "HTTP 503", status=503)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.status, copy.problem) == (str(error), 503, "HTTP 503")
    assert str(copy) == "http://***@x.test/: HTTP 503"
    with pytest.raises(FetchError, match="cannot load ca_file"):
        fetch_url("https://93.184.216.34/", FetchPolicy(ca_file=str(tmp_path / "none.pem")))


def test_public_addresses_pass() -> None:
    for url in (
        "http://93.184.216.34/",
        "https://[2606:4700:4700::1111]/dns",
        "http://[64:ff9b::808:808]/",  # NAT64 of a public address
    ):
        check_url(url, FetchPolicy())


def test_allow_hosts_by_network_address_and_name(monkeypatch: pytest.MonkeyPatch) -> None:
    check_url("http://10.1.2.3/", FetchPolicy(allow_hosts=("10.0.0.0/8",)))
    check_url("http://2130706433/", FetchPolicy(allow_hosts=("127.0.0.1",)))
    check_url("http://[::1]:9000/", FetchPolicy(allow_hosts=("::1",)))
    with pytest.raises(FetchError):
        check_url("http://10.1.2.3/", FetchPolicy(allow_hosts=("10.9.0.0/16",)))
    _fake_dns(
        monkeypatch, {"docs.internal": lambda: ["10.0.0.5"], "docs.internal.": lambda: ["10.0.0.5"]}
    )
    with pytest.raises(FetchError, match=r"private address 10\.0\.0\.5"):
        check_url("https://docs.internal/handbook", FetchPolicy())
    check_url("https://DOCS.Internal./handbook", FetchPolicy(allow_hosts=("docs.internal",)))


def test_any_private_address_refuses_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dns(monkeypatch, {"mixed.test": lambda: ["93.184.216.34", "10.0.0.1"]})
    with pytest.raises(FetchError, match=r"private address 10\.0\.0\.1"):
        check_url("http://mixed.test/", FetchPolicy())


def test_dns_failure_and_dns_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def hang() -> list[str]:
        time.sleep(2)
        return ["93.184.216.34"]

    _fake_dns(monkeypatch, {"nowhere.test": fail, "slow-dns.test": hang})
    with pytest.raises(FetchError, match=r"cannot resolve host 'nowhere\.test'"):
        fetch_url("http://nowhere.test/")
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out resolving host 'slow-dns\.test'"):
        fetch_url("http://slow-dns.test/", FetchPolicy(timeout=0.3))
    assert time.monotonic() - started < 1.5


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="not a valid network"):
        FetchPolicy(allow_hosts=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="max_bytes"):
        FetchPolicy(max_bytes=0)
    with pytest.raises(ValueError, match="timeout"):
        FetchPolicy(timeout=0)
    # A list (e.g. from YAML) is stored as a tuple so the policy stays hashable.
    listed: Any = ["a.test"]
    assert FetchPolicy(allow_hosts=listed).allow_hosts == ("a.test",)


# --- fetching from a real server ----------------------------------------------------------


def test_loopback_refused_by_default(origin: str) -> None:
    before = len(Handler.requests)
    with pytest.raises(FetchError, match=r"loopback address 127\.0\.0\.1"):
        fetch_url(f"http://{origin}/doc.txt")
    assert len(Handler.requests) == before  # refused before connecting


def test_fetch_text_with_metadata(origin: str) -> None:
    started = time.time()
    doc = fetch_url(f"http://{origin}/doc.txt", LOOPBACK)
    assert isinstance(doc, LoadedDocument)
    assert doc.text == "hello from loopback"
    assert doc.media_type == "text/plain"
    assert doc.source == f"http://{origin}/doc.txt"
    assert doc.metadata["url"] == doc.source
    assert doc.metadata["etag"] == '"v1"'
    assert doc.metadata["last_modified"] == "Wed, 01 Jan 2025 00:00:00 GMT"
    assert started <= doc.metadata["fetched_at"] <= time.time()


def test_media_type_from_header_and_suffix(origin: str) -> None:
    page = fetch_url(f"http://{origin}/page", LOOPBACK)
    assert (page.media_type, page.text, page.metadata["title"]) == (
        "text/html",
        "# Heading\n\nBody text.",
        "Page",
    )
    # An HTML page whose URL ends in .md is parsed as HTML...
    forge = fetch_url(f"http://{origin}/blob/README.md", LOOPBACK)
    assert (forge.media_type, forge.text) == ("text/html", "## Rendered\n\nby the forge")
    # ...while a raw CSV served as text/plain is parsed by its suffix.
    raw = fetch_url(f"http://{origin}/raw/data.csv", LOOPBACK)
    assert (raw.media_type, raw.text) == ("text/csv", "k: a\nv: 1")
    assert fetch_url(f"http://{origin}/ru", LOOPBACK).text == "Привет"
    assert fetch_url(f"http://{origin}/zipped.txt", LOOPBACK).text == "compressed words"
    with pytest.raises(FetchError, match=r"/image: unsupported file type \(no suffix, image/png\)"):
        fetch_url(f"http://{origin}/image", LOOPBACK)
    with pytest.raises(FetchError, match=r"/empty\.txt: no text found"):
        fetch_url(f"http://{origin}/empty.txt", LOOPBACK)


def test_http_error_status(origin: str) -> None:
    with pytest.raises(FetchError) as caught:
        fetch_url(f"http://{origin}/missing", LOOPBACK)
    assert caught.value.status == 404
    assert str(caught.value) == f"http://{origin}/missing: HTTP 404 Not Found"


def test_redirects_are_followed_and_checked(origin: str) -> None:
    doc = fetch_url(f"http://{origin}/redirect-twice", LOOPBACK)
    assert doc.text == "hello from loopback"
    assert doc.source == f"http://{origin}/doc.txt"

    with pytest.raises(FetchError) as caught:
        fetch_url(f"http://{origin}/redirect-metadata", LOOPBACK)
    message = str(caught.value)
    assert message.startswith("http://169.254.169.254/latest/meta-data/: refusing to fetch")
    assert f"redirected from http://{origin}/redirect-metadata" in message

    with pytest.raises(FetchError, match="only http and https"):
        fetch_url(f"http://{origin}/redirect-file", LOOPBACK)

    with pytest.raises(FetchError, match=r"too many redirects \(more than 2\)"):
        fetch_url(f"http://{origin}/loop", FetchPolicy(allow_hosts=("127.0.0.1",), max_redirects=2))
    with pytest.raises(FetchError, match="too many redirects"):
        fetch_url(
            f"http://{origin}/redirect", FetchPolicy(allow_hosts=("127.0.0.1",), max_redirects=0)
        )


def test_size_limit(origin: str) -> None:
    small = FetchPolicy(allow_hosts=("127.0.0.1",), max_bytes=500)
    for path in ("/big.txt", "/stream.txt"):
        with pytest.raises(FetchError, match="response is larger than 500 bytes"):
            fetch_url(f"http://{origin}{path}", small)
    assert fetch_url(f"http://{origin}/stream.txt", LOOPBACK).text == "y" * 1000
    # The limit counts decoded bytes: a small gzip body that inflates past it is cut off.
    with pytest.raises(FetchError, match="larger than 100000 bytes"):
        fetch_url(
            f"http://{origin}/bomb.txt", FetchPolicy(allow_hosts=("127.0.0.1",), max_bytes=100_000)
        )


def test_timeout_covers_the_whole_fetch(origin: str) -> None:
    quick = FetchPolicy(allow_hosts=("127.0.0.1",), timeout=0.5)
    for path in ("/slow-headers", "/drip.txt"):
        started = time.monotonic()
        with pytest.raises(FetchError, match=r"timed out after 0\.5 s"):
            fetch_url(f"http://{origin}{path}", quick)
        assert time.monotonic() - started < 1.2, path


def test_connection_is_pinned_against_dns_rebinding(
    origin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = origin.rsplit(":", 1)[1]
    answers = iter([["127.0.0.1"]])
    # First answer passes the check; any later lookup would "rebind" to cloud metadata.
    asked = _fake_dns(monkeypatch, {"rebind.test": lambda: next(answers, ["169.254.169.254"])})
    policy = FetchPolicy(allow_hosts=("127.0.0.1/32",), timeout=3.0)
    doc = fetch_url(f"http://rebind.test:{port}/doc.txt", policy)
    assert doc.text == "hello from loopback"
    assert asked == ["rebind.test"]  # resolved once, connected to the checked address
    assert Handler.requests[-1] == ("/doc.txt", f"rebind.test:{port}")


def test_falls_back_to_the_next_checked_address(
    origin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = origin.rsplit(":", 1)[1]
    _fake_dns(monkeypatch, {"multi.test": lambda: ["127.0.0.3", "127.0.0.1"]})
    doc = fetch_url(f"http://multi.test:{port}/doc.txt", FetchPolicy(allow_hosts=("127.0.0.0/8",)))
    assert doc.text == "hello from loopback"


# --- TLS: the pinned connection still verifies the certificate against the host name ---------


@dataclass
class TlsFiles:
    cert: Path
    key: Path


def _certificate(tmp: Path, name: str) -> TlsFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(cert=tmp / f"{name}.pem", key=tmp / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture(scope="module")
def tls_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, TlsFiles]]:
    """A HTTPS server on 127.0.0.1 whose certificate names only ``docs.test``."""
    files = _certificate(tmp_path_factory.mktemp("tls"), "docs.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for address in _serve(server):
        yield address, files


def test_tls_verifies_the_name_not_the_pinned_address(
    tls_origin: tuple[str, TlsFiles], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    address, files = tls_origin
    port = address.rsplit(":", 1)[1]
    _fake_dns(
        monkeypatch, {"docs.test": lambda: ["127.0.0.1"], "other.test": lambda: ["127.0.0.1"]}
    )
    trusted = FetchPolicy(allow_hosts=("docs.test", "other.test"), ca_file=str(files.cert))
    doc = fetch_url(f"https://docs.test:{port}/doc.txt", trusted)
    assert doc.text == "hello from loopback"
    # Same server and address, but the certificate does not name other.test.
    with pytest.raises(FetchError, match=r"certificate|hostname"):
        fetch_url(f"https://other.test:{port}/doc.txt", trusted)
    # The public CA bundle does not trust the self-signed certificate.
    with pytest.raises(FetchError, match="certificate"):
        fetch_url(f"https://docs.test:{port}/doc.txt", FetchPolicy(allow_hosts=("docs.test",)))
