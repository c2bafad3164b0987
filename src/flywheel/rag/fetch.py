"""SSRF-safe fetching of a URL into a :class:`~flywheel.rag.loaders.LoadedDocument`.

A knowledge base that ingests user-supplied URLs must not become a proxy into the server's own
network (cloud metadata at 169.254.169.254, admin ports on loopback, the office LAN). So:

* only ``http``/``https`` URLs without credentials are fetched;
* the host is resolved with :func:`socket.getaddrinfo` and refused if *any* address is private,
  loopback, link-local, multicast, reserved, unspecified, shared (100.64.0.0/10) or otherwise not
  globally routable, including IPv4 addresses embedded in IPv6 (IPv4-mapped, 6to4, NAT64) —
  unless the host name or a network holding the address is in :attr:`FetchPolicy.allow_hosts`;
* **DNS rebinding** is prevented by pinning: the connection layer (a custom httpcore network
  backend) connects only to the addresses that were just checked and never resolves the name
  again. The URL keeps its host name, so the ``Host`` header, TLS SNI and certificate
  verification all still use the real name;
* redirects are followed by hand, each hop checked the same way, at most ``max_redirects``;
* the body is streamed and abandoned past ``max_bytes`` (counted after content decoding, so a
  compressed bomb is cut off too), and one deadline covers the whole fetch — DNS, connects, TLS
  and every read — so a server dripping one byte at a time cannot hold a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httpcore
import httpx

from flywheel.rag.loaders import (
    DOCX_MEDIA_TYPE,
    LoadedDocument,
    LoaderError,
    load_bytes,
    media_type_for,
    supported_media_type,
)

__all__ = ["FetchError", "FetchPolicy", "check_url", "fetch_url"]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Content types whose bytes cannot be mistaken for another format win over the URL's suffix
# (a GitHub ".../README.md" page is HTML); for the rest the suffix is the better witness
# (raw files are commonly served as text/plain or application/octet-stream).
_DECISIVE_TYPES = frozenset({"text/html", "application/pdf", DOCX_MEDIA_TYPE})
_REQUEST_HEADERS = {
    "User-Agent": "flywheel-rag-fetch/1.0",
    "Accept": "text/html, text/markdown, text/plain, application/pdf, application/json, "
    "text/csv, */*;q=0.5",
    # Only encodings whose decoders stream in bounded steps; never br/zstd.
    "Accept-Encoding": "gzip, deflate",
}


def _redact(url: str) -> str:
    """The URL with any user:password part hidden, for messages and logs."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}://{authority}{slash}{path}"


class FetchError(ValueError):
    """A refused or failed fetch; ``str()`` names the URL (credentials hidden) and the problem,
    ``status`` is the HTTP status when the server answered with an error."""

    def __init__(self, url: str, problem: str, status: int | None = None) -> None:
        super().__init__(f"{_redact(url)}: {problem}")
        self.url = _redact(url)
        self.problem = problem
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across process pools
        return (type(self), (self.url, self.problem, self.status))


@functools.lru_cache(maxsize=64)
def _parse_allow_hosts(entries: tuple[str, ...]) -> tuple[frozenset[str], tuple[_IPNetwork, ...]]:
    hostnames: set[str] = set()
    networks: list[_IPNetwork] = []
    for entry in entries:
        cleaned = entry.strip().strip("[]")
        if not cleaned:
            raise ValueError("allow_hosts entries must not be empty")
        try:
            networks.append(ipaddress.ip_network(cleaned, strict=False))
        except ValueError:
            if "/" in cleaned:
                raise ValueError(f"allow_hosts entry {entry!r} is not a valid network") from None
            hostnames.add(_normalise_host(cleaned))
    return frozenset(hostnames), tuple(networks)


def _normalise_host(host: str) -> str:
    host = host.lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


@dataclass(frozen=True)
class FetchPolicy:
    """What :func:`fetch_url` may fetch and how much.

    ``allow_hosts`` names hosts (``"docs.internal"``, exact match) or networks (``"10.0.0.0/8"``,
    ``"127.0.0.1"``) that may be fetched even though their addresses are not public.
    ``ca_file`` is a PEM bundle to trust instead of the public CAs (e.g. an internal CA).
    """

    allow_hosts: tuple[str, ...] = ()
    max_bytes: int = 20_000_000
    timeout: float = 20.0
    max_redirects: int = 5
    ca_file: str | None = None

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so the policy stays hashable.
        object.__setattr__(self, "allow_hosts", tuple(self.allow_hosts))
        if self.max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        _parse_allow_hosts(self.allow_hosts)  # raises ValueError on a malformed entry

    def _allows_host(self, host: str) -> bool:
        return _normalise_host(host) in _parse_allow_hosts(self.allow_hosts)[0]

    def _allows_address(self, address: _IPAddress) -> bool:
        candidates: list[_IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        networks = _parse_allow_hosts(self.allow_hosts)[1]
        return any(
            candidate.version == network.version and candidate in network
            for candidate in candidates
            for network in networks
        )


def _refusal_reason(address: _IPAddress) -> str | None:
    """Why an address must not be fetched from, or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = None
        kind = ""
        if address.ipv4_mapped is not None:
            embedded, kind = address.ipv4_mapped, "IPv4-mapped"
        elif address.sixtofour is not None:
            embedded, kind = address.sixtofour, "6to4"
        elif address in _NAT64:
            embedded, kind = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
        if embedded is not None:
            inner = _refusal_reason(embedded)
            if inner is not None:
                return f"{kind} {inner} address {embedded}"
            if kind != "6to4":
                return None  # the embedded public IPv4 address is what is really reached
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    )
    for name, flagged in checks:
        if flagged:
            return name
    if not address.is_global:
        return "not globally routable"  # e.g. 100.64.0.0/10 carrier-grade NAT space
    return None


@dataclass(frozen=True)
class _Target:
    """A checked URL and the addresses its connection is pinned to."""

    url: httpx.URL
    host: str  # the host as the connection layer sees it (IDNA, lower case, no brackets)
    port: int
    addresses: tuple[str, ...]


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def _resolve(url: str, host: str, port: int, deadline: float) -> tuple[str, ...]:
    """getaddrinfo within the deadline (a thread, since the call itself cannot time out)."""
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            )
        except OSError as error:
            outcome.append(error)

    resolver = threading.Thread(target=lookup, name="fetch-resolve", daemon=True)
    resolver.start()
    resolver.join(max(_remaining(deadline), 0.0))
    if not outcome:
        raise FetchError(url, f"timed out resolving host {host!r}")
    if isinstance(outcome[0], OSError):
        raise FetchError(url, f"cannot resolve host {host!r} ({outcome[0]})")
    addresses: list[str] = []
    for family, _type, _proto, _name, sockaddr in outcome[0]:
        if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    if not addresses:
        raise FetchError(url, f"host {host!r} has no IP address")
    return tuple(addresses)


def _check(url: str | httpx.URL, policy: FetchPolicy, deadline: float) -> _Target:
    text = str(url)
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as error:
        raise FetchError(text, f"invalid URL ({error})") from error
    if parsed.scheme not in ("http", "https"):
        raise FetchError(text, f"only http and https URLs can be fetched, not {parsed.scheme!r}")
    if parsed.userinfo:
        raise FetchError(text, "credentials in URLs are not allowed")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise FetchError(text, "URL has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = _resolve(text, host, port, deadline)
    if not policy._allows_host(host):
        for address_text in addresses:
            address = ipaddress.ip_address(address_text)
            reason = _refusal_reason(address)
            if reason is not None and not policy._allows_address(address):
                raise FetchError(
                    text,
                    f"refusing to fetch from {reason} address {address_text} "
                    f"(add the host or network to allow_hosts to permit it)",
                )
    return _Target(url=parsed, host=host, port=port, addresses=addresses)


def check_url(url: str, policy: FetchPolicy) -> None:
    """Raise :class:`FetchError` unless ``url`` may be fetched under ``policy`` right now
    (scheme, credentials, and every address its host resolves to). :func:`fetch_url` checks
    each hop itself; this is for validating input early."""
    _check(url, policy, time.monotonic() + policy.timeout)


# --- pinned, deadline-bound connections ----------------------------------------------------


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation is cut short at the fetch's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def _budget(self, timeout: float | None, error: type[Exception]) -> float:
        remaining = _remaining(self._deadline)
        if remaining <= 0:
            raise error("the fetch deadline has passed")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._budget(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._budget(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        budget = self._budget(timeout, httpcore.ConnectTimeout)
        tls = self._inner.start_tls(ssl_context, server_hostname, budget)
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects a host name only to the addresses checked for it, never resolving it again."""

    def __init__(self, deadline: float) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline
        self._pins: dict[tuple[str, int], tuple[str, ...]] = {}

    def pin(self, target: _Target) -> None:
        self._pins[(target.host, target.port)] = target.addresses

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._pins.get((host, port))
        if addresses is None:  # defence in depth: only checked targets are ever requested
            raise httpcore.ConnectError(f"refusing to connect to unchecked host {host}:{port}")
        options = list(socket_options or [])
        failure: httpcore.ConnectError | None = None
        for address in addresses:  # like happy eyeballs, minus the parallelism
            remaining = _remaining(self._deadline)
            if remaining <= 0:
                raise httpcore.ConnectTimeout("the fetch deadline has passed")
            try:
                stream = self._inner.connect_tcp(
                    address,
                    port,
                    timeout=remaining if timeout is None else min(timeout, remaining),
                    local_address=local_address,
                    socket_options=options,
                )
            except httpcore.ConnectError as error:
                failure = error
                continue
            return _DeadlineStream(stream, self._deadline)
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are never used for fetching")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """Present httpcore's exceptions as httpx's, as httpx's own transport does."""
    try:
        yield
    except httpcore.TimeoutException as error:
        raise httpx.TimeoutException(str(error)) from error
    except httpcore.ConnectError as error:
        raise httpx.ConnectError(str(error)) from error
    except httpcore.ProtocolError as error:
        raise httpx.RemoteProtocolError(str(error)) from error
    except httpcore.NetworkError as error:
        raise httpx.NetworkError(str(error)) from error
    except httpcore.UnsupportedProtocol as error:
        raise httpx.UnsupportedProtocol(str(error)) from error


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()


class _PinnedTransport(httpx.BaseTransport):
    """An httpx transport over an httpcore pool whose connections use :class:`_PinnedBackend`;
    httpx's own transport has no way to swap the network backend."""

    def __init__(self, backend: _PinnedBackend, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context, network_backend=backend, max_connections=4, retries=0
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            core_response = self._pool.handle_request(core_request)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_ResponseStream(core_response),
            extensions=core_response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


@functools.lru_cache(maxsize=1)
def _public_ca_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def _ssl_context(url: str, policy: FetchPolicy) -> ssl.SSLContext:
    if policy.ca_file is None:
        return _public_ca_context()
    try:
        return ssl.create_default_context(cafile=policy.ca_file)
    except (OSError, ssl.SSLError) as error:
        raise FetchError(url, f"cannot load ca_file {policy.ca_file!r} ({error})") from error


# --- fetching ---------------------------------------------------------------------------------


def _read_body(response: httpx.Response, url: str, policy: FetchPolicy) -> bytes:
    declared = response.headers.get("content-length", "")
    too_large = f"response is larger than {policy.max_bytes} bytes"
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(url, too_large)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > policy.max_bytes:
            raise FetchError(url, too_large)
    return bytes(body)


def _document(url: httpx.URL, response: httpx.Response, body: bytes) -> LoadedDocument:
    source = str(url)
    declared = response.headers.get("content-type")
    decisive = supported_media_type(declared)
    try:
        if decisive in _DECISIVE_TYPES:
            media_type = decisive
        else:
            media_type = media_type_for(unquote(url.path), declared)
        document = load_bytes(source, body, media_type, encoding=response.charset_encoding)
    except LoaderError as error:
        raise FetchError(source, error.problem) from error
    metadata: dict[str, Any] = {**document.metadata, "url": source, "fetched_at": time.time()}
    if declared:
        metadata["content_type"] = declared
    for header, key in (("etag", "etag"), ("last-modified", "last_modified")):
        if header in response.headers:
            metadata[key] = response.headers[header]
    return dataclasses.replace(document, metadata=metadata)


def fetch_url(url: str, policy: FetchPolicy = FetchPolicy()) -> LoadedDocument:
    """Fetch ``url`` under ``policy`` and extract its text (see the module docstring for the
    safety rules). Blocking: call it from a worker thread.

    The media type comes from the Content-Type when that names HTML, PDF or DOCX, otherwise from
    the final URL's suffix, otherwise from the Content-Type. ``source`` is the final URL;
    metadata adds ``url``, ``fetched_at`` (epoch seconds), ``content_type`` and, when sent,
    ``etag`` and ``last_modified``. Raises :class:`FetchError` for anything refused or failed,
    including content that cannot be parsed.
    """
    deadline = time.monotonic() + policy.timeout
    backend = _PinnedBackend(deadline)
    transport = _PinnedTransport(backend, _ssl_context(url, policy))
    current: str | httpx.URL = url
    with httpx.Client(
        transport=transport,
        headers=_REQUEST_HEADERS,
        timeout=policy.timeout,
        follow_redirects=False,
        trust_env=False,  # no proxies or .netrc credentials from the environment
    ) as client:
        for hop in range(policy.max_redirects + 1):
            try:
                target = _check(current, policy, deadline)
            except FetchError as error:
                if not hop:
                    raise
                raise FetchError(
                    error.url, f"{error.problem} (redirected from {_redact(url)})"
                ) from None
            backend.pin(target)
            hop_url = str(target.url)
            try:
                with client.stream("GET", target.url) as response:
                    location = response.headers.get("location")
                    if response.status_code in _REDIRECT_STATUSES and location:
                        try:
                            current = target.url.join(location)
                        except (httpx.InvalidURL, ValueError) as error:
                            raise FetchError(hop_url, f"invalid redirect ({error})") from error
                        continue
                    if not response.is_success:
                        problem = f"HTTP {response.status_code} {response.reason_phrase}".strip()
                        if hop:
                            problem += f" (after redirects from {_redact(url)})"
                        raise FetchError(hop_url, problem, status=response.status_code)
                    body = _read_body(response, hop_url, policy)
                    return _document(target.url, response, body)
            except httpx.TimeoutException as error:
                raise FetchError(hop_url, f"timed out after {policy.timeout:g} s") from error
            except httpx.HTTPError as error:
                raise FetchError(hop_url, f"request failed ({error})") from error
    raise FetchError(url, f"too many redirects (more than {policy.max_redirects})")
