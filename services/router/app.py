"""The gray router as a plain ASGI application.

Per request the router assigns the request id, checks the header size and the body framing, and
normalises the path. It serves its own endpoints, applies the per-client rate limit and rejects
`/internal`. Then it verifies the bearer token and its revocation, picks a rule, reads the body
within its limits, sends the request to the chosen target and streams the response back. The hot
path uses no framework routing; see the module docstring of `proxy` for the pieces.

The router is the public entry, so the ASGI server must hand it the real peer address: run uvicorn
with `proxy_headers=False` (`--no-proxy-headers`). Otherwise uvicorn replaces the client address
with a client-sent X-Forwarded-For whenever the peer is in `forwarded_allow_ips` (127.0.0.1 by
default), and the router would forward that spoofed address.
"""

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram

from services.shared.errors import Forbidden, Unauthorized, Unavailable
from services.shared.garbage_collection import freeze_startup_objects
from services.shared.logs import request_id_var, valid_request_id
from services.shared.metrics import mark_metrics_process_dead, metrics_payload
from services.shared.revocation import RevocationList
from services.shared.scopes import GRAY_ADMIN
from services.shared.security import (
    JWKSClient,
    KeySource,
    Principal,
    TokenVerifier,
    bearer_token,
)
from services.shared.streams import connect

from .access_log import AccessLog
from .dashboard import DASHBOARD_HEADERS, render_dashboard
from .gate import UserGate
from .guard import Guard
from .limits import RateLimiter, forwarded_for_chain, is_trusted
from .proxy import (
    UPSTREAM_ERRORS,
    BodyTooLarge,
    ClientGone,
    InvalidPath,
    Message,
    RawHeaders,
    Receive,
    Scope,
    Send,
    UpstreamError,
    Upstreams,
    client_response_headers,
    declared_length,
    encode_path,
    framing_error,
    has_body,
    header_bytes,
    normalise_path,
    read_body,
    upstream_request_headers,
)
from .reloader import LoadedRules, RulesReloader
from .routes import CQRS, upstream_route
from .rules import SAFE_METHODS, TARGETS, Decision, RequestFacts
from .server_protocol import CoalescingHttpToolsProtocol
from .settings import Settings
from .shadow import Capture, ShadowReads, ShadowSource
from .tokens import CachingVerifier
from .upstream_client import UpstreamFailure, UpstreamResponse

log = logging.getLogger(__name__)

# The uvicorn HTTP protocol class that `ztcqrs serve router` runs the app on.
HTTP_PROTOCOL = CoalescingHttpToolsProtocol

REQUESTS = Counter(
    "ztcqrs_router_requests_total",
    "Requests the router answered, by rule, target and status.",
    ["rule", "target", "status"],
)
REJECTIONS = Counter(
    "ztcqrs_router_rejections_total",
    "Requests the router answered itself without forwarding, by reason.",
    ["reason"],
)
REQUEST_DURATION = Histogram(
    "ztcqrs_router_request_duration_seconds",
    "Time from the start of a request to the end of its response, by target.",
    ["target"],
)

# X-Gray-Target and X-Gray-Rule values of responses that the router sends without forwarding.
ROUTER_TARGET = "router"
NO_RULE = "none"
# Status logged when the client disconnected before the router responded (nginx's convention).
CLIENT_CLOSED_REQUEST = 499

_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
_GRAY_PREFIX = "/_gray"
# Probes under either prefix skip the rate limit, so an orchestrator's checks are never throttled.
_UNLIMITED = _PROBES | {_GRAY_PREFIX + probe for probe in _PROBES}
_STATUS = "/status"
_DASHBOARD = "/dashboard"
_READ_METHODS = frozenset({"GET", "HEAD"})
_CLOSE = (b"connection", b"close")


@dataclass(slots=True)
class Exchange:
    """State of one request so far, which feeds the gray headers, the metrics and the log line."""

    request_id: str
    method: str
    path: str
    # The client's address: the socket peer, or from X-Forwarded-For behind a trusted proxy.
    client: str | None = None
    target: str = ROUTER_TARGET
    rule: str = NO_RULE
    status: int = 500
    # Why the router responded with an error itself; logged on the request's line.
    error: str | None = None
    response_started: bool = False
    # Probe and metrics requests are neither logged nor counted, so scrapes do not drown traffic.
    quiet: bool = False

    def gray_headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-gray-target", self.target.encode()),
            (b"x-gray-rule", self.rule.encode()),
            (b"x-request-id", self.request_id.encode()),
        ]


class RouterApp:
    """ASGI application of the gray router, with its lifespan (rules polling, connection pool)."""

    def __init__(
        self,
        settings: Settings,
        reloader: RulesReloader,
        verifier: CachingVerifier,
        key_source: KeySource,
        upstreams: Upstreams,
        revocations: RevocationList | None,
        *,
        owns_key_source: bool,
    ) -> None:
        self.settings = settings
        self.reloader = reloader
        self.verifier = verifier
        self.key_source = key_source
        self.upstreams = upstreams
        self.revocations = revocations
        self.rate_limiter = RateLimiter(
            settings.rate_limit_per_second, settings.rate_limit_burst, settings.rate_limit_clients
        )
        self._trusted = settings.trusted_networks
        self._owns_key_source = owns_key_source
        self.access_log = AccessLog("router", enabled=settings.access_log)
        self._request_counters: dict[tuple[str, str, int], Counter] = {}
        self._duration_histograms: dict[str, Histogram] = {}
        self.guard = Guard(
            settings.redis_url,
            lambda: self.reloader.current.rules.guard,
            fail_safe_seconds=settings.guard_fail_safe_seconds,
        )
        self.gate = UserGate(connect(settings.redis_url), max_allowed=settings.gate_cache_size)
        self.shadow = ShadowReads(
            upstreams,
            max_in_flight=settings.shadow_max_in_flight,
            timeout_seconds=settings.shadow_timeout_seconds,
            max_body_bytes=settings.shadow_max_body_bytes,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            # No public route is a WebSocket. Closing before accept makes the server respond 403.
            await receive()
            await send({"type": "websocket.close", "code": 1008})

    # Lifespan

    async def startup(self) -> None:
        """Open the upstream pool, start polling the rules file and fetch the signing keys."""
        await self.upstreams.start()
        self.reloader.start()
        if self.revocations is not None:
            await self.revocations.start()
        self.guard.start()
        if isinstance(self.key_source, JWKSClient):
            await self.key_source.refresh(force=True)
        loaded = self.reloader.current
        # Again after the lifespan start-up, which loaded the rules and keys, and because a router
        # worker process builds its app without `serve()`.
        freeze_startup_objects()
        log.info(
            "router started",
            extra={
                "rules_file": str(loaded.source), "rules_version": loaded.version,
                "rules": loaded.rules.names, "monolith_url": self.settings.monolith_url,
                "cqrs_url": self.settings.cqrs_url,
            },
        )

    async def shutdown(self) -> None:
        await self.reloader.stop()
        await self.guard.stop()
        await self.gate.close()
        await self.gate.redis.aclose()
        await self.shadow.close()
        await self.upstreams.close()
        if self.revocations is not None:
            await self.revocations.stop()
        if self._owns_key_source and isinstance(self.key_source, JWKSClient):
            await self.key_source.aclose()
        self.access_log.flush()
        mark_metrics_process_dead()
        log.info("router stopped")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as error:
                    log.exception("router startup failed", extra={"error": str(error)})
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # Requests

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        # One reference for the whole request, so a reload never changes rules mid-request.
        loaded = self.reloader.current
        headers: RawHeaders = scope["headers"]
        request_id = valid_request_id(_first_header(headers, b"x-request-id"))
        context = request_id_var.set(request_id)
        exchange = Exchange(request_id, scope["method"], scope["path"])
        peer = scope.get("client")
        forwarded = _header_values(headers, b"x-forwarded-for")
        chain, exchange.client = forwarded_for_chain(
            forwarded, peer[0] if peer else None, self._trusted
        )
        try:
            await self._handle(scope, receive, send, loaded, exchange, chain)
        except Exception:
            log.exception(
                "request failed in the router",
                extra={"method": exchange.method, "path": exchange.path, "request_id": request_id},
            )
            if not exchange.response_started:
                await self._send_error(
                    send, exchange, 500, "internal_error",
                    "The router failed to handle the request.",
                )
        finally:
            elapsed = time.perf_counter() - started
            if not exchange.quiet:
                self._count(exchange, elapsed)
                if exchange.target in TARGETS:
                    self.guard.count_response(exchange.target)
                if self.access_log.enabled:
                    fields: dict[str, Any] = {
                        "method": exchange.method, "path": exchange.path,
                        "status": exchange.status, "target": exchange.target,
                        "rule": exchange.rule, "duration_ms": round(elapsed * 1000, 2),
                        "request_id": request_id, "client_address": exchange.client,
                    }
                    if exchange.error is not None:
                        fields["error"] = exchange.error
                    self.access_log.write(fields)
            request_id_var.reset(context)

    def _count(self, exchange: Exchange, elapsed: float) -> None:
        # prometheus-client's labels() validates and locks on every call, so the children are
        # kept here. Rule names, targets and statuses are few, so the dictionaries stay small.
        key = (exchange.rule, exchange.target, exchange.status)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = REQUESTS.labels(exchange.rule, exchange.target, str(exchange.status))
            self._request_counters[key] = counter
        counter.inc()
        histogram = self._duration_histograms.get(exchange.target)
        if histogram is None:
            histogram = REQUEST_DURATION.labels(exchange.target)
            self._duration_histograms[exchange.target] = histogram
        histogram.observe(elapsed)

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        loaded: LoadedRules,
        exchange: Exchange,
        forwarded_for: list[str],
    ) -> None:
        headers: RawHeaders = scope["headers"]
        if header_bytes(scope) > self.settings.max_header_bytes:
            await self._reject(
                send, exchange, 431, "headers_too_large",
                f"The request's target and headers are larger than the limit of "
                f"{self.settings.max_header_bytes} bytes; send fewer or smaller headers.",
                [_CLOSE],
            )
            return
        problem = framing_error(headers, scope.get("http_version", "1.1"))
        if problem is not None:
            # The server may have read this body differently from the next hop, so nothing
            # more is read from this connection.
            await self._reject(send, exchange, 400, "invalid_request", problem, [_CLOSE])
            return
        raw_path: bytes = scope.get("raw_path") or encode_path(scope["path"]).encode()
        try:
            path = normalise_path(raw_path)
        except InvalidPath as error:
            await self._reject(send, exchange, 400, "invalid_path", str(error))
            return
        exchange.path = path

        if path in _UNLIMITED:
            await self._own_endpoint(scope, send, exchange, loaded, path)
            return
        if not await self._within_rate(send, exchange):
            return
        if path == _GRAY_PREFIX or path.startswith(_GRAY_PREFIX + "/"):
            await self._own_endpoint(scope, send, exchange, loaded, path)
            return
        if _is_internal(path):
            await self._reject(
                send, exchange, 404, "not_found", f"No route matches {exchange.method} {path}."
            )
            return

        header_map = _header_map(headers)
        principal = await self._authenticate_or_reject(send, exchange, header_map)
        if principal is None:
            return
        facts = RequestFacts(
            exchange.method, path, header_map, principal.subject, principal.claims
        )
        decision = self.guard.route(loaded.rules.select(facts), loaded.rules.guard)
        if loaded.rules.gate.enabled:
            decision = self.gate.admit(decision, principal.subject, exchange.method, path)
        exchange.rule = decision.rule_name
        await self._proxy(scope, receive, send, exchange, decision, forwarded_for)

    async def _within_rate(self, send: Send, exchange: Exchange) -> bool:
        if not self.rate_limiter.enabled or exchange.client is None:
            return True
        wait = self.rate_limiter.retry_after(exchange.client)
        if wait is None:
            return True
        seconds = max(1, math.ceil(wait))
        await self._reject(
            send, exchange, 429, "rate_limited",
            f"Client {exchange.client} sent more than {self.settings.rate_limit_per_second:g} "
            f"requests per second; retry after {seconds} s.",
            [(b"retry-after", str(seconds).encode())],
        )
        return False

    async def _authenticate_or_reject(
        self, send: Send, exchange: Exchange, header_map: dict[str, tuple[str, ...]]
    ) -> Principal | None:
        """Return the verified, unrevoked caller, or send 401 (503 when keys are unusable)."""
        try:
            return await self._authenticate(header_map)
        except Unauthorized as error:
            REJECTIONS.labels("invalid_token").inc()
            await self._send_unauthorized(send, exchange, error, header_map)
        except Unavailable as error:
            await self._reject(
                send, exchange, 503, error.code, error.message, [(b"retry-after", b"5")]
            )
        return None

    async def _authenticate(self, header_map: dict[str, tuple[str, ...]]) -> Principal:
        values = header_map.get("authorization", ())
        if len(values) > 1:
            raise Unauthorized("The request has several Authorization headers; send exactly one.")
        token = bearer_token(values[0] if values else None)
        if isinstance(self.key_source, JWKSClient):
            # Checked before the cache of verified tokens, so cached tokens fail closed too.
            await self.key_source.ensure_usable()
        principal = await self.verifier.verify(token)
        if self.revocations is not None:
            self.revocations.check(principal)
        return principal

    # Proxying

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        decision: Decision,
        forwarded_for: list[str],
    ) -> None:
        headers: RawHeaders = scope["headers"]
        length = declared_length(headers)
        limit = self.settings.max_body_bytes
        if length is not None and length > limit:
            await self._send_too_large(send, exchange)
            return
        body: bytes | None = None
        if has_body(headers):
            body = await self._read_body(receive, send, exchange)
            if body is None:
                return

        method = exchange.method
        target, path = upstream_route(decision.target, method, exchange.path)
        fallback: tuple[str, str] | None = None
        if decision.fallback is not None and method in SAFE_METHODS:
            fallback = upstream_route(decision.fallback, method, exchange.path)
            if fallback[0] == target:
                fallback = None
        peer = scope.get("client")
        upstream_headers = upstream_request_headers(
            headers,
            forwarded_for=forwarded_for,
            trusted_hop=is_trusted(peer[0] if peer else None, self._trusted),
            scheme=scope.get("scheme", "http"),
            request_id=exchange.request_id,
        )
        query: bytes = scope.get("query_string", b"")

        exchange.target = target
        outcome = await self._call_upstream(exchange, path, query, upstream_headers, body)
        if fallback is not None and _should_fall_back(outcome):
            failed = target
            if isinstance(outcome, UpstreamResponse):
                outcome.release()
            target, path = fallback
            exchange.target = target
            log.warning(
                "retrying on the fallback target",
                extra={
                    "failed_target": failed, "fallback_target": target, "rule": exchange.rule,
                    "method": method, "path": exchange.path, "request_id": exchange.request_id,
                },
            )
            outcome = await self._call_upstream(exchange, path, query, upstream_headers, body)

        if isinstance(outcome, UpstreamError):
            code = "gateway_timeout" if outcome.status == 504 else "bad_gateway"
            await self._send_error(send, exchange, outcome.status, code, outcome.public_message)
            return
        shadow_config = self.reloader.current.rules.shadow
        capture = self.shadow.capture(shadow_config, method, exchange.request_id, outcome.status)
        await self._relay(send, exchange, outcome, capture)
        if capture is not None and capture.complete:
            source = ShadowSource(
                exchange.request_id, method, exchange.path, target, query, upstream_headers
            )
            self.shadow.submit(shadow_config, capture, source)

    async def _read_body(self, receive: Receive, send: Send, exchange: Exchange) -> bytes | None:
        """Return the whole request body, or send 413 or 408 (nothing when the client left)
        and return None."""
        timeout = self.settings.client_body_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                return await read_body(receive, self.settings.max_body_bytes)
        except BodyTooLarge:
            await self._send_too_large(send, exchange)
        except TimeoutError:
            await self._reject(
                send, exchange, 408, "request_timeout",
                f"The request body did not arrive within {timeout:g} s; send it faster.",
                [_CLOSE],
            )
        except ClientGone as error:
            exchange.status = CLIENT_CLOSED_REQUEST
            exchange.error = str(error)
        return None

    async def _call_upstream(
        self,
        exchange: Exchange,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
    ) -> UpstreamResponse | UpstreamError:
        target = exchange.target
        try:
            response = await self.upstreams.send(
                target, exchange.method, path, query, headers, body
            )
        except UpstreamError as error:
            UPSTREAM_ERRORS.labels(target, error.kind).inc()
            if target == CQRS:
                self.guard.count_cqrs_call(failed=True)
            log.warning(
                "upstream call failed",
                extra={
                    "target": target, "kind": error.kind, "error": str(error),
                    "method": exchange.method, "path": exchange.path,
                    "request_id": exchange.request_id,
                },
            )
            return error
        if response.status >= 500:
            UPSTREAM_ERRORS.labels(target, "status_5xx").inc()
        if target == CQRS:
            self.guard.count_cqrs_call(failed=response.status >= 500)
        return response

    async def _relay(
        self,
        send: Send,
        exchange: Exchange,
        response: UpstreamResponse,
        capture: Capture | None = None,
    ) -> None:
        """Stream the upstream response to the client with the gray headers added.

        With `capture`, also keep the status and body for a shadow read's comparison.
        """
        async with response:
            if capture is not None:
                capture.status = response.status
                capture.content_encoding = response.header(b"content-encoding")
            headers = client_response_headers(response.headers)
            headers.extend(exchange.gray_headers())
            exchange.status = response.status
            exchange.response_started = True
            start = {"type": "http.response.start", "status": response.status, "headers": headers}
            await send(start)
            try:
                # The last chunk of a body closes the response in the same message, which saves
                # a send (and, for a chunked response, a write to the client).
                async for chunk, last in response.chunks():
                    if capture is not None:
                        capture.add(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            except UpstreamFailure as error:
                UPSTREAM_ERRORS.labels(exchange.target, error.kind).inc()
                log.error(
                    "upstream response body broke off; closing the client connection",
                    extra={
                        "target": exchange.target, "kind": error.kind, "error": str(error),
                        "path": exchange.path, "request_id": exchange.request_id,
                    },
                )
                # Returning without the final body message makes the ASGI server close the
                # connection, so the client sees a truncated response instead of a complete one.
                return
            if capture is not None:
                capture.complete = True

    # The router's own endpoints

    async def _own_endpoint(
        self, scope: Scope, send: Send, exchange: Exchange, loaded: LoadedRules, path: str
    ) -> None:
        name = path.removeprefix(_GRAY_PREFIX) if path.startswith(_GRAY_PREFIX + "/") else path
        if name not in _PROBES and name not in (_STATUS, _DASHBOARD):
            await self._send_error(
                send, exchange, 404, "not_found", f"No route matches {exchange.method} {path}."
            )
            return
        if exchange.method not in _READ_METHODS:
            await self._send_error(
                send, exchange, 405, "method_not_allowed",
                f"{path} accepts only GET and HEAD, not {exchange.method}.",
                [(b"allow", b"GET, HEAD")],
            )
            return
        if name == _STATUS:
            await self._status(scope, send, exchange, loaded)
            return
        if name == _DASHBOARD:
            await self._dashboard(scope, send, exchange, loaded)
            return
        exchange.quiet = True
        if name == "/healthz":
            await self._send_json(send, exchange, 200, {"status": "ok"})
        elif name == "/readyz":
            await self._readyz(send, exchange, loaded)
        else:
            content_type = (b"content-type", CONTENT_TYPE_LATEST.encode())
            await self._send(send, exchange, 200, metrics_payload(), [content_type])

    async def _readyz(self, send: Send, exchange: Exchange, loaded: LoadedRules) -> None:
        failures: dict[str, str] = {}
        if not self.upstreams.started:
            failures["proxy"] = (
                "The upstream connection pool is not open because the ASGI lifespan startup has "
                "not run."
            )
        if not await self._keys_loaded():
            failures["jwks"] = (
                f"No signing keys are loaded from {self.settings.jwks_url}; check that the auth "
                "server is up."
            )
        if failures:
            log.warning("readiness check failed", extra={"failures": failures})
            await self._send_json(
                send, exchange, 503,
                {"status": "unavailable", "rules_version": loaded.version, "failures": failures},
            )
            return
        await self._send_json(
            send, exchange, 200, {"status": "ready", "rules_version": loaded.version}
        )

    async def _keys_loaded(self) -> bool:
        if not isinstance(self.key_source, JWKSClient):
            return True
        if not self.key_source.loaded:
            # Rate-limited by the client's cooldown, so probes cannot flood the auth server.
            await self.key_source.refresh(force=False)
        return self.key_source.loaded

    async def _status(
        self, scope: Scope, send: Send, exchange: Exchange, loaded: LoadedRules
    ) -> None:
        if await self._authorize_admin(scope, send, exchange):
            await self._send_json(send, exchange, 200, await self._status_body(loaded))

    async def _dashboard(
        self, scope: Scope, send: Send, exchange: Exchange, loaded: LoadedRules
    ) -> None:
        if not await self._authorize_admin(scope, send, exchange):
            return
        page = render_dashboard(await self._status_body(loaded))
        await self._send(send, exchange, 200, page.encode(), list(DASHBOARD_HEADERS))

    async def _status_body(self, loaded: LoadedRules) -> dict[str, Any]:
        """Build the body of `/_gray/status`, which the dashboard renders too.

        Every time in it is ISO 8601 UTC, as `services.shared.clock.format_timestamp` writes it.
        """
        return {
            "phase": self.settings.phase.value,
            "rules_version": loaded.version,
            "loaded_at": loaded.loaded_at,
            "rules_file": str(loaded.source),
            "last_error": self.reloader.last_error,
            "last_error_at": self.reloader.last_error_at,
            "rules": loaded.rules.names,
            "guard": self.guard.status(loaded.rules.guard),
            "health": self.guard.health_status(),
            "split": await self.guard.split_status(),
            "shadow": self.shadow.status(loaded.rules.shadow),
            "gate": {"enabled": loaded.rules.gate.enabled, **self.gate.status()},
        }

    async def _authorize_admin(self, scope: Scope, send: Send, exchange: Exchange) -> bool:
        """Return True for a caller with scope gray:admin; otherwise send 401 or 403."""
        header_map = _header_map(scope["headers"])
        principal = await self._authenticate_or_reject(send, exchange, header_map)
        if principal is None:
            return False
        try:
            principal.require_scope(GRAY_ADMIN)
        except Forbidden as error:
            challenge = f'Bearer error="insufficient_scope", scope="{GRAY_ADMIN}"'
            await self._send_error(
                send, exchange, 403, error.code, error.message,
                [(b"www-authenticate", challenge.encode())],
            )
            return False
        return True

    # Responses the router makes itself

    async def _send_unauthorized(
        self,
        send: Send,
        exchange: Exchange,
        error: Unauthorized,
        header_map: dict[str, tuple[str, ...]],
    ) -> None:
        # RFC 6750 section 3.1: a request without credentials gets a challenge with no error code.
        challenge = b'Bearer error="invalid_token"' if "authorization" in header_map else b"Bearer"
        await self._send_error(
            send, exchange, 401, error.code, error.message, [(b"www-authenticate", challenge)]
        )

    async def _send_too_large(self, send: Send, exchange: Exchange) -> None:
        await self._reject(
            send, exchange, 413, "payload_too_large",
            f"The request body is larger than the limit of {self.settings.max_body_bytes} bytes; "
            "send a smaller body.",
            [_CLOSE],
        )

    async def _reject(
        self,
        send: Send,
        exchange: Exchange,
        status: int,
        code: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Send the error response of a request that the router stops, and count the reason."""
        REJECTIONS.labels(code).inc()
        exchange.target = ROUTER_TARGET
        await self._send_error(send, exchange, status, code, message, headers)

    async def _send_error(
        self,
        send: Send,
        exchange: Exchange,
        status: int,
        code: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        exchange.error = message
        await self._send_json(send, exchange, status, {"error": code, "message": message}, headers)

    async def _send_json(
        self,
        send: Send,
        exchange: Exchange,
        status: int,
        body: dict[str, Any],
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await self._send(
            send, exchange, status, json.dumps(body).encode(),
            [(b"content-type", b"application/json"), *(headers or [])],
        )

    async def _send(
        self,
        send: Send,
        exchange: Exchange,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        exchange.status = status
        exchange.response_started = True
        all_headers = [
            *headers, (b"content-length", str(len(body)).encode()), *exchange.gray_headers()
        ]
        start: Message = {"type": "http.response.start", "status": status, "headers": all_headers}
        await send(start)
        payload = b"" if exchange.method == "HEAD" else body
        await send({"type": "http.response.body", "body": payload, "more_body": False})


def _should_fall_back(outcome: UpstreamResponse | UpstreamError) -> bool:
    if isinstance(outcome, UpstreamError):
        return True
    return outcome.status >= 500


def _is_internal(path: str) -> bool:
    """Return True for `/internal` and every path under it.

    The first segment is compared case-insensitively and without `;` parameters, so that no
    spelling that some server could read as `/internal` reaches an upstream.
    """
    first_segment = path[1:].split("/", 1)[0]
    return first_segment.split(";", 1)[0].lower() == "internal"


def _header_values(headers: RawHeaders, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key.lower() == name]


def _first_header(headers: RawHeaders, name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _header_map(headers: RawHeaders) -> dict[str, tuple[str, ...]]:
    result: dict[str, tuple[str, ...]] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        result[name] = (*result.get(name, ()), raw_value.decode("latin-1"))
    return result


def create_app(
    settings: Settings,
    *,
    key_source: KeySource | None = None,
    revocations: RevocationList | None = None,
) -> RouterApp:
    """Build the router; raise RulesError naming the file when the rules file is missing or invalid.

    Without `key_source`, signing keys come from `settings.jwks_url` through a `JWKSClient` that
    the app closes on shutdown. Without `revocations`, revoked tokens are read from
    `settings.redis_url`.
    """
    reloader = RulesReloader(settings.rules_file, settings.rules_poll_seconds)
    owns_key_source = key_source is None
    if key_source is None:
        key_source = JWKSClient(
            settings.jwks_url,
            refresh_seconds=settings.jwks_refresh_seconds,
            min_refresh_seconds=settings.jwks_min_refresh_seconds,
            max_stale_seconds=settings.jwks_max_stale_seconds,
        )
    if revocations is None:
        revocations = RevocationList(
            settings.redis_url,
            leeway_seconds=settings.token_leeway_seconds,
            max_stale_seconds=settings.revocation_max_stale_seconds,
        )
    verifier = TokenVerifier(
        key_source,
        issuer=settings.token_issuer,
        audience=settings.token_audience,
        leeway_seconds=settings.token_leeway_seconds,
    )
    return RouterApp(
        settings,
        reloader,
        CachingVerifier(verifier, settings.token_cache_size),
        key_source,
        Upstreams(settings),
        revocations,
        owns_key_source=owns_key_source,
    )
