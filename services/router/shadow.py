"""Shadow reads: some safe reads also go to the other side, and the router compares the responses.

For `shadow.percent` of GET and HEAD requests answered with a 2xx, once the client's response is
fully sent, the router sends the same request to the side that did not serve it. The copy has the
same headers (the bearer token and X-Consistency-Token included), the path that `upstream_route`
maps for that side, `X-Gray-Shadow: 1`, and the request id with a `-shadow` suffix. Writes are
never copied. A request is sampled when the CRC-32 of its request id, modulo 10,000, is below
`percent * 100`, so a client that retries with the same X-Request-ID gets the same choice.

Both bodies are parsed as JSON, object keys listed in `ignore_fields` are dropped at any depth, and
keys are sorted. Lists compare in order, except the top-level lists of the list endpoints (`GET
/orders`, `GET /products`), which compare as multisets: among orders created in the same
microsecond the monolith orders by insertion and the CQRS side by order id. Bodies that are not
JSON compare byte for byte. HEAD compares the status only. A different 2xx-4xx status is a
mismatch.

`ztcqrs_router_shadow_reads_total{result}` counts each sampled read as `match`, `mismatch`, `error`
(the other side failed, answered 5xx or timed out) or `dropped` (all `shadow_max_in_flight` slots
were busy, or a body was larger than `shadow_max_body_bytes`).
"""

import asyncio
import gzip
import json
import logging
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from services.shared.clock import format_epoch
from services.shared.logs import MAX_REQUEST_ID_LENGTH

from .gate import LOG_INTERVAL_SECONDS, LogThrottle
from .proxy import UpstreamError, Upstreams
from .routes import CQRS, MONOLITH, upstream_route
from .rules import BUCKETS, ShadowConfig
from .upstream_client import UpstreamFailure

log = logging.getLogger(__name__)

SHADOW_READS = Counter(
    "ztcqrs_router_shadow_reads_total",
    "Safe reads the router also sent to the other side, by result of the comparison "
    "(match, mismatch, error, dropped).",
    ["result"],
)

SHADOW_HEADER = b"x-gray-shadow"
REQUEST_ID_SUFFIX = "-shadow"
SHADOW_METHODS = frozenset({"GET", "HEAD"})
# Public paths whose top-level list fields compare as multisets; see the module docstring.
UNORDERED_LISTS: dict[str, frozenset[str]] = {
    "/orders": frozenset({"orders"}),
    "/products": frozenset({"products"}),
}
# Bounds of a mismatch sample, so the status page stays small and contains no whole body.
MAX_DIFF_CHARS = 500
MAX_VALUE_CHARS = 80
MAX_DIFFERENCES = 3

RESULTS = ("match", "mismatch", "error", "dropped")


@dataclass(slots=True)
class Capture:
    """The client's response as the router relayed it, kept up to `limit` bytes."""

    limit: int
    status: int = 0
    content_encoding: str = ""
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    overflow: bool = False
    # Set once the last body message went to the client.
    complete: bool = False

    def add(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflow = True
            self.chunks.clear()
            return
        self.chunks.append(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@dataclass(frozen=True, slots=True)
class ShadowSource:
    """The client's request, as the router sent it upstream."""

    request_id: str
    method: str
    # The normalised public path, before `upstream_route` mapped it.
    path: str
    # The target that served the client.
    target: str
    query: bytes
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class ShadowError(Exception):
    """The other side's response cannot be compared. The message gives the reason."""


class ShadowReads:
    """Sampled reads sent to the other side in background tasks, and the comparison results."""

    def __init__(
        self,
        upstreams: Upstreams,
        *,
        max_in_flight: int,
        timeout_seconds: float,
        max_body_bytes: int,
    ) -> None:
        self.upstreams = upstreams
        self.max_in_flight = max_in_flight
        self.timeout_seconds = timeout_seconds
        self.max_body_bytes = max_body_bytes
        self.counts = dict.fromkeys(RESULTS, 0)
        self.samples: deque[dict[str, Any]] = deque(maxlen=20)
        self._tasks: set[asyncio.Task[None]] = set()
        self._log_throttle = LogThrottle(LOG_INTERVAL_SECONDS)

    def capture(
        self, config: ShadowConfig, method: str, request_id: str, status: int
    ) -> Capture | None:
        """Return a Capture when this response is sampled for a shadow read, else None."""
        if config.percent <= 0 or method not in SHADOW_METHODS or not 200 <= status < 300:
            return None
        if zlib.crc32(request_id.encode()) % BUCKETS >= config.percent * 100:
            return None
        return Capture(self.max_body_bytes)

    def submit(self, config: ShadowConfig, capture: Capture, source: ShadowSource) -> None:
        """Start the call to the other side in the background, or count it as dropped."""
        other = MONOLITH if source.target == CQRS else CQRS
        target, path = upstream_route(other, source.method, source.path)
        if target == source.target:
            # The other side has no such route, so there is nothing to compare.
            return
        if capture.overflow or len(self._tasks) >= self.max_in_flight:
            self._count("dropped")
            return
        task = asyncio.get_running_loop().create_task(
            self._compare(config, capture, source, target, path)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def status(self, config: ShadowConfig) -> dict[str, Any]:
        """Return the `shadow` section of the router's status.

        A sample's `at` is stored as epoch seconds and returned as ISO 8601 UTC.
        """
        recent = list(self.samples)[-config.max_samples:] if config.max_samples else []
        samples = [
            {**sample, "at": format_epoch(sample["at"])}
            for sample in recent
        ]
        return {
            "percent": config.percent,
            "matches": self.counts["match"],
            "mismatches": self.counts["mismatch"],
            "errors": self.counts["error"],
            "dropped": self.counts["dropped"],
            "in_flight": len(self._tasks),
            "samples": samples,
        }

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _compare(
        self, config: ShadowConfig, capture: Capture, source: ShadowSource, target: str, path: str
    ) -> None:
        shadow_id = source.request_id[: MAX_REQUEST_ID_LENGTH - len(REQUEST_ID_SUFFIX)]
        shadow_id += REQUEST_ID_SUFFIX
        headers = [(name, value) for name, value in source.headers if name != b"x-request-id"]
        headers += [(b"x-request-id", shadow_id.encode("latin-1")), (SHADOW_HEADER, b"1")]
        try:
            primary = Answer(capture.status, _decoded(capture.body, capture.content_encoding))
            async with asyncio.timeout(self.timeout_seconds):
                shadow = await self._call(target, source, path, headers)
        except (ShadowError, UpstreamError, UpstreamFailure, TimeoutError) as error:
            self._count("error")
            self._log("shadow read failed", source, target, error=repr(error))
            return

        if shadow.status >= 500:
            self._count("error")
            self._log("shadow read failed", source, target, error=f"status {shadow.status}")
            return
        difference = _difference(
            primary, shadow, config.ignore_fields, UNORDERED_LISTS.get(source.path, frozenset()),
            compare_bodies=source.method != "HEAD",
        )
        if difference is None:
            self._count("match")
            return
        self._count("mismatch")
        if self.samples.maxlen != config.max_samples:
            self.samples = deque(self.samples, maxlen=config.max_samples)
        self.samples.append({
            "at": time.time(),
            "request_id": source.request_id,
            "method": source.method,
            "path": source.path,
            source.target: {"status": primary.status},
            target: {"status": shadow.status},
            "diff": difference,
        })
        self._log("shadow read mismatch", source, target, diff=difference)

    async def _call(
        self, target: str, source: ShadowSource, path: str, headers: list[tuple[bytes, bytes]]
    ) -> Answer:
        response = await self.upstreams.send(
            target, source.method, path, source.query, headers, None
        )
        async with response:
            try:
                body = await response.read(self.max_body_bytes)
            except ValueError as error:
                raise ShadowError(f"the {target} {error}") from error
            encoding = response.header(b"content-encoding")
        return Answer(response.status, _decoded(body, encoding))

    def _count(self, result: str) -> None:
        self.counts[result] += 1
        SHADOW_READS.labels(result).inc()

    def _log(self, message: str, source: ShadowSource, target: str, **fields: Any) -> None:
        suppressed = self._log_throttle.allow()
        if suppressed is None:
            return
        log.warning(
            message,
            extra={"request_id": source.request_id, "method": source.method,
                   "path": source.path, "served_by": source.target, "shadow_target": target,
                   "suppressed_since_last": suppressed, **fields},
        )


def _decoded(body: bytes, encoding: str) -> bytes:
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding == "gzip":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error) as error:
            raise ShadowError(f"a gzip body failed to decompress: {error}") from error
    raise ShadowError(f"content-encoding {encoding!r} is not supported for the comparison")


def normalise(value: Any, ignore_fields: frozenset[str]) -> Any:
    """Return `value` with `ignore_fields` keys dropped at any depth and object keys sorted."""
    if isinstance(value, dict):
        return {
            key: normalise(value[key], ignore_fields)
            for key in sorted(value)
            if key not in ignore_fields
        }
    if isinstance(value, list):
        return [normalise(item, ignore_fields) for item in value]
    return value


def _difference(
    primary: Answer,
    shadow: Answer,
    ignore_fields: frozenset[str],
    unordered: frozenset[str],
    *,
    compare_bodies: bool,
) -> str | None:
    """Return a short description of how the responses differ, or None when they match."""
    if primary.status != shadow.status:
        return f"status {primary.status} != {shadow.status}"
    if not compare_bodies or primary.body == shadow.body:
        return None
    try:
        left = normalise(json.loads(primary.body), ignore_fields)
        right = normalise(json.loads(shadow.body), ignore_fields)
    except ValueError:
        return "bodies differ and are not both JSON"
    if isinstance(left, dict) and isinstance(right, dict):
        for key in unordered:
            for side in (left, right):
                if isinstance(side.get(key), list):
                    side[key] = sorted(side[key], key=_canonical)
    differences = _differences(left, right, "$")
    if not differences:
        return None
    return "; ".join(differences)[:MAX_DIFF_CHARS]


def _differences(left: Any, right: Any, where: str) -> list[str]:
    """Return up to MAX_DIFFERENCES lines `<JSON path>: <left> != <right>`."""
    if isinstance(left, dict) and isinstance(right, dict):
        found: list[str] = []
        for key in sorted(left.keys() | right.keys()):
            if key not in right:
                found.append(f"{where}.{key}: only on the serving side")
            elif key not in left:
                found.append(f"{where}.{key}: only on the shadow side")
            else:
                found += _differences(left[key], right[key], f"{where}.{key}")
            if len(found) >= MAX_DIFFERENCES:
                return found[:MAX_DIFFERENCES]
        return found
    if isinstance(left, list) and isinstance(right, list):
        found = []
        if len(left) != len(right):
            found.append(f"{where}: {len(left)} items != {len(right)} items")
        for index, (a, b) in enumerate(zip(left, right, strict=False)):
            found += _differences(a, b, f"{where}[{index}]")
            if len(found) >= MAX_DIFFERENCES:
                return found[:MAX_DIFFERENCES]
        return found
    # `true` and `1` are equal in Python but not in JSON.
    if left == right and isinstance(left, bool) == isinstance(right, bool):
        return []
    return [f"{where}: {_short(left)} != {_short(right)}"]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _short(value: Any) -> str:
    text = _canonical(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."
