"""Reverse-proxy pieces: path normalisation, header rewriting, request body limits and the
upstream connection pool.

Everything here works on raw ASGI values (byte header pairs) so that the hot path stays free of
framework routing.
"""

import logging
import posixpath
import re
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from prometheus_client import Counter

from .settings import Settings
from .upstream_client import (
    Origin,
    OriginPool,
    UpstreamFailure,
    UpstreamResponse,
    encode_request,
)

log = logging.getLogger(__name__)

UPSTREAM_ERRORS = Counter(
    "ztcqrs_router_upstream_errors_total",
    "Upstream calls that failed, by target and kind (connect, timeout, protocol, status_5xx).",
    ["target", "kind"],
)

RawHeaders = Sequence[tuple[bytes, bytes]]
# ASGI callables, typed here so the hot path imports no web framework.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, so they never cross the
# proxy. Proxy-Connection is a non-standard form that some clients still send.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# Request headers that only the router may set: a client could otherwise spoof its address or
# the identity and routing headers that upstream services trust. `Host` is rewritten by the
# HTTP client to the upstream's authority, `Expect` is handled by the router's own server, and
# `Content-Length` is set by the HTTP client from the buffered body.
_DROPPED_REQUEST_HEADERS = frozenset({
    b"host", b"forwarded", b"x-real-ip", b"x-request-id", b"expect", b"content-length",
})
_DROPPED_REQUEST_PREFIXES = (b"x-forwarded-", b"x-user-", b"x-gray-")
# uvicorn adds its own `Server` and `Date` by default, and the router sets the request id and
# gray headers, so the upstream's copies would only be duplicates.
_DROPPED_RESPONSE_HEADERS = frozenset({b"server", b"date", b"x-request-id"})
_DROPPED_RESPONSE_PREFIXES = (b"x-gray-",)

# Characters that stay literal when a decoded path is encoded again: RFC 3986 `pchar` and `/`.
_PATH_SAFE = "/:@!$&'()*+,;="
_FORBIDDEN_IN_PATH = re.compile(r"[\x00-\x1f\x7f\\]")
_SLASHES = re.compile(r"/{2,}")
# Paths that are already normal: `/`, or segments of unreserved and sub-delim characters without
# `%`, `;`, backslash or control characters, none starting with `.` (so no `.` or `..` segment),
# and no empty segment or trailing slash.
_PLAIN_PATH = re.compile(rb"/|(?:/[A-Za-z0-9_~!$&'()*+,=:@-][A-Za-z0-9._~!$&'()*+,=:@-]*)+")

# Below uvicorn's default keep-alive timeout of 5 s, so the pool drops an idle connection before
# the upstream server closes it. This avoids sending a request on a connection being closed.
POOL_KEEPALIVE_SECONDS = 4.0
# Connections open at once to each upstream; more requests wait for one to come back.
CONNECTIONS_PER_UPSTREAM = 100


class InvalidPath(ValueError):
    """A request path that cannot be normalised safely. The message gives the reason."""


class BodyTooLarge(Exception):
    """The request body is larger than the router forwards."""


class ClientGone(Exception):
    """The client disconnected before it sent the whole request body."""


class UpstreamError(Exception):
    """An upstream call failed before a response arrived.

    The message has the details for the log; `public_message` is safe to send to clients
    because it names no internal address.
    """

    def __init__(self, kind: str, status: int, public_message: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # connect, timeout or protocol
        self.status = status  # status of the router's response: 502 or 504
        self.public_message = public_message


def normalise_path(raw_path: bytes) -> str:
    """Percent-decode the path once and resolve `//`, `.` and `..`, or raise InvalidPath.

    An encoded slash, a backslash or a control character (NUL included) is rejected, because
    upstream servers disagree on what they mean. The result is what rules match and what is
    forwarded, so the router and the upstream always see the same path.
    """
    raw = raw_path.split(b"?", 1)[0]
    if _PLAIN_PATH.fullmatch(raw):
        # Nothing to decode, resolve or reject: the checks below would return it unchanged.
        return raw.decode("ascii")
    if b"%2f" in raw.lower():
        raise InvalidPath("The path contains an encoded slash (%2F), which is not accepted.")
    try:
        decoded = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidPath("The path is not valid UTF-8 after percent-decoding.") from error
    if _FORBIDDEN_IN_PATH.search(decoded):
        raise InvalidPath(
            "The path contains a backslash or a control character such as NUL, which is not "
            "accepted."
        )
    if not decoded.startswith("/"):
        raise InvalidPath("The path must start with '/'.")
    if any(segment.split(";", 1)[0] in (".", "..") for segment in _parameter_segments(decoded)):
        # Some servers (Tomcat, Jetty) read `..;x` as `..`, so it would climb after our matching.
        raise InvalidPath(
            "The path has a '.' or '..' segment with ';' parameters, which is not accepted."
        )
    # normpath keeps a leading '//' (POSIX leaves its meaning open), so collapse slashes first.
    return posixpath.normpath(_SLASHES.sub("/", decoded))


def _parameter_segments(path: str) -> list[str]:
    return [segment for segment in path.split("/") if ";" in segment]


def encode_path(path: str) -> str:
    """Percent-encode a normalised path for the upstream request line."""
    return urllib.parse.quote(path, safe=_PATH_SAFE)


def connection_listed(headers: RawHeaders) -> frozenset[bytes]:
    """Return the header names listed in `Connection` headers, which are hop-by-hop too."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return frozenset(names)


def upstream_request_headers(
    headers: RawHeaders,
    *,
    forwarded_for: Sequence[str],
    trusted_hop: bool,
    scheme: str,
    request_id: str,
) -> list[tuple[bytes, bytes]]:
    """Return the headers to send upstream: end-to-end headers plus the router's own.

    `Authorization` is kept because every service verifies the token again. `Content-Length` and
    `Transfer-Encoding` are dropped because the router sends the body it buffered, with a length
    of its own. X-Forwarded-Proto and -Host of a trusted proxy are kept; from anyone else they are
    replaced, like X-Forwarded-For, which the caller builds with `forwarded_for_chain`.
    """
    listed = connection_listed(headers)
    forwarded: list[tuple[bytes, bytes]] = []
    host: bytes | None = None
    proto: bytes | None = None
    forwarded_host: bytes | None = None
    for raw_name, value in headers:
        name = raw_name.lower()
        if name == b"host" and host is None:
            host = value
        if trusted_hop and name == b"x-forwarded-proto" and proto is None:
            proto = value.strip()
        if trusted_hop and name == b"x-forwarded-host" and forwarded_host is None:
            forwarded_host = value.strip()
        if (
            name in HOP_BY_HOP
            or name in listed
            or name in _DROPPED_REQUEST_HEADERS
            or name.startswith(_DROPPED_REQUEST_PREFIXES)
        ):
            continue
        forwarded.append((name, value))
    if forwarded_for:
        forwarded.append((b"x-forwarded-for", ", ".join(forwarded_for).encode("latin-1")))
    forwarded.append((b"x-forwarded-proto", proto or scheme.encode("latin-1")))
    if forwarded_host or host:
        forwarded.append((b"x-forwarded-host", forwarded_host or host or b""))
    forwarded.append((b"x-request-id", request_id.encode("latin-1")))
    return forwarded


def client_response_headers(headers: RawHeaders) -> list[tuple[bytes, bytes]]:
    """Return the upstream response headers that go back to the client."""
    listed = connection_listed(headers)
    kept: list[tuple[bytes, bytes]] = []
    for raw_name, value in headers:
        name = raw_name.lower()
        if (
            name in HOP_BY_HOP
            or name in listed
            or name in _DROPPED_RESPONSE_HEADERS
            or name.startswith(_DROPPED_RESPONSE_PREFIXES)
        ):
            continue
        kept.append((name, value))
    return kept


def framing_error(headers: RawHeaders, http_version: str) -> str | None:
    """Return why the request's body framing is ambiguous, or None when it is sound.

    A request with both Content-Length and Transfer-Encoding, a coding other than a single
    `chunked`, or Transfer-Encoding in HTTP/1.0 is how request smuggling starts: two servers
    may disagree on where the body ends (RFC 9112 section 6.3). httptools rejects most of these
    itself, h11 accepts the first, so the router checks them whichever parser runs.
    """
    codings = [value for name, value in headers if name.lower() == b"transfer-encoding"]
    lengths = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    if codings and lengths:
        return "The request has both Content-Length and Transfer-Encoding; send only one of them."
    if codings and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
        return (
            "The request's Transfer-Encoding is not a single 'chunked'; send 'chunked' or a "
            "Content-Length."
        )
    if codings and http_version == "1.0":
        return (
            "The request uses Transfer-Encoding in HTTP/1.0, which has no chunked coding; send "
            "a Content-Length."
        )
    if len(lengths) > 1:
        return "The request has several different Content-Length headers; send one."
    if lengths and not next(iter(lengths)).isdigit():
        return "The request's Content-Length header is not a non-negative integer."
    return None


def declared_length(headers: RawHeaders) -> int | None:
    """Return the request's Content-Length, or None. Call after `framing_error` found none."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value.strip())
    return None


def header_bytes(scope: MutableMapping[str, Any]) -> int:
    """Return the size of the request target and headers, as counted against the 431 limit."""
    target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    return target + sum(len(name) + len(value) + 4 for name, value in scope["headers"])


def has_body(headers: RawHeaders) -> bool:
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length" and value.strip() not in (b"", b"0"):
            return True
    return False


async def read_body(receive: Receive, limit: int) -> bytes:
    """Return the whole request body. Raise BodyTooLarge past `limit`, ClientGone on disconnect.

    The body is read completely before any upstream is contacted, as nginx does by default, so
    an upstream never sees a partial, oversized or badly framed body.
    """
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("The client disconnected while sending the request body.")
        chunk: bytes = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Upstreams:
    """The kept-alive connection pools to the monolith and the CQRS service."""

    def __init__(self, settings: Settings) -> None:
        self.origins = {
            "monolith": Origin.parse(settings.monolith_url),
            "cqrs": Origin.parse(settings.cqrs_url),
        }
        self._settings = settings
        self._pools: dict[str, OriginPool] = {}

    @property
    def started(self) -> bool:
        return bool(self._pools)

    async def start(self) -> None:
        if self._pools:
            return
        settings = self._settings
        self._pools = {
            target: OriginPool(
                origin,
                limit=CONNECTIONS_PER_UPSTREAM,
                keepalive_seconds=POOL_KEEPALIVE_SECONDS,
                connect_timeout=settings.connect_timeout_seconds,
                read_timeout=settings.upstream_timeout_seconds,
            )
            for target, origin in self.origins.items()
        }

    async def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    async def send(
        self,
        target: str,
        method: str,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> UpstreamResponse:
        """Send the request and return the response once its headers arrived.

        Raise UpstreamError when the target cannot be reached, times out or breaks the protocol.
        The caller must release the response.
        """
        pool = self._pools.get(target)
        if pool is None:
            raise RuntimeError("The upstream pool is not started; run the app's lifespan startup.")
        request_target = encode_path(path).encode("ascii")
        if query:
            request_target += b"?" + query
        request = encode_request(method, pool.origin, request_target, headers, body)
        try:
            return await pool.request(method, request)
        except UpstreamFailure as failure:
            raise upstream_error(target, failure) from failure


def upstream_error(target: str, failure: UpstreamFailure) -> UpstreamError:
    """Return the router's error for a failed upstream call, with a message for the client."""
    if failure.kind == "timeout":
        return UpstreamError(
            "timeout", 504, f"The {target} service did not respond in time; retry shortly.",
            f"{target} timed out: {failure}",
        )
    if failure.kind == "connect":
        return UpstreamError(
            "connect", 502, f"The {target} service cannot be reached; retry shortly.",
            f"{target} cannot be reached: {failure}",
        )
    return UpstreamError(
        "protocol", 502,
        f"The {target} service sent an invalid response or closed the connection; retry shortly.",
        f"{target} sent an invalid response or closed the connection: {failure}",
    )
