"""Pieces every FastAPI service mounts: request ids, one log line per request, JSON errors, token
dependencies with revocation checks, `/healthz`, `/readyz` and `/metrics`."""

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.exceptions
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Histogram,
)
from redis.asyncio import Redis as AsyncRedis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ServiceError, Unauthorized, Unavailable
from .logs import REQUEST_ID_HEADER, request_id_var, valid_request_id
from .metrics import metrics_payload
from .migration_health import health_collector
from .revocation import RevocationList
from .security import Principal, TokenVerifier, bearer_token
from .settings import ServiceSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("ztcqrs.access")

HTTP_REQUESTS = Counter(
    "ztcqrs_http_requests_total",
    "HTTP requests served, by route and status.",
    ["service", "method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "ztcqrs_http_request_duration_seconds",
    "Time to serve an HTTP request.",
    ["service", "method", "route"],
)

ReadinessCheck = Callable[[], Awaitable[None]]


class RequestContextMiddleware:
    """Assign the request id, echo it in `X-Request-ID`, log one line and record metrics."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        raw = headers.get(REQUEST_ID_HEADER.encode())
        request_id = valid_request_id(raw.decode("latin-1") if raw else None)
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_path = getattr(route, "path", "unmatched")
            HTTP_REQUESTS.labels(self.service, scope["method"], route_path, str(status)).inc()
            HTTP_LATENCY.labels(self.service, scope["method"], route_path).observe(elapsed)
            if route_path not in ("/healthz", "/readyz", "/metrics"):
                access_log.info(
                    "request served",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            request_id_var.reset(token)


def _problem(item: Mapping[str, Any]) -> dict[str, str]:
    """Describe one validation error as a field path and a message a client can act on."""
    kind = item.get("type")
    location = tuple(item.get("loc", ()))
    if kind == "json_invalid":
        position = location[1] if len(location) > 1 else "?"
        reason = item.get("ctx", {}).get("error", "invalid JSON")
        return {
            "field": "body",
            "message": f"is not valid JSON ({reason} at character {position}); send a JSON object",
        }
    if location == ("body",) and kind in ("model_attributes_type", "dict_type", "missing"):
        return {
            "field": "body",
            "message": "must be a JSON object sent with Content-Type: application/json",
        }
    return {"field": _field_path(location), "message": str(item.get("msg", ""))}


def _field_path(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Return the platform's JSON error body for every error, never a bare 500 page."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        headers = {}
        if isinstance(error, Unauthorized):
            headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        if error.status_code >= 500:
            log.error("request failed", extra={"path": request.url.path, "error": error.message})
        return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [_problem(item) for item in error.errors()]
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        body = {
            "error": "validation_failed",
            "message": f"Field {first['field']!r} is invalid: {first['message']}.",
            "field": first["field"],
            "details": problems,
        }
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        message = error.detail if isinstance(error.detail, str) else "The request failed."
        if error.status_code == 404 and message == "Not Found":
            message = f"No route matches {request.method} {request.url.path}."
        allowed = (error.headers or {}).get("Allow")
        if error.status_code == 405 and allowed:
            message = (
                f"Method {request.method} is not allowed on {request.url.path}; use {allowed}."
            )
        return JSONResponse(
            {"error": code, "message": message},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    # A Redis that hangs instead of refusing connections raises TimeoutError after the socket
    # timeout. Both errors mean the dependency is down, not that the request was wrong.
    @app.exception_handler(redis.exceptions.TimeoutError)
    @app.exception_handler(redis.exceptions.ConnectionError)
    async def redis_down(
        request: Request, error: redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
    ) -> JSONResponse:
        log.error("Redis unavailable", extra={"path": request.url.path, "error": str(error)})
        body = Unavailable("Redis is unavailable; retry shortly.").to_body()
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        body = {"error": "internal_error", "message": "The service failed to handle the request."}
        return JSONResponse(body, status_code=500)


def install_health_routes(app: FastAPI, checks: dict[str, ReadinessCheck]) -> None:
    """Mount `/healthz` (the process runs), `/readyz` (its dependencies respond) and `/metrics`."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        failures: dict[str, str] = {}
        for name, check in checks.items():
            try:
                await check()
            except Exception as error:
                failures[name] = str(error) or type(error).__name__
        if failures:
            log.warning("readiness check failed", extra={"failures": failures})
            return JSONResponse({"status": "unavailable", "failures": failures}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        for refresh in getattr(app.state, "metrics_refreshers", ()):
            await refresh()
        return PlainTextResponse(metrics_payload(), media_type=CONTENT_TYPE_LATEST)


def add_metrics_refresher(app: FastAPI, refresh: Callable[[], Awaitable[None]]) -> None:
    """Await `refresh` before every scrape of `app`'s `/metrics`, for gauges read on demand.

    `refresh` must handle its own errors, so one failing source does not fail the scrape.
    """
    if not hasattr(app.state, "metrics_refreshers"):
        app.state.metrics_refreshers = []
    app.state.metrics_refreshers.append(refresh)


def verifier_of(request: Request) -> TokenVerifier:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier


async def authenticate(request: Request) -> Principal:
    """Verify the request's bearer token; raise 401 when it is missing, invalid or revoked."""
    token = bearer_token(request.headers.get("authorization"))
    principal = await verifier_of(request).verify(token)
    revocations: RevocationList | None = getattr(request.app.state, "revocations", None)
    if revocations is not None:
        revocations.check(principal)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(authenticate)]


def require_scope(*scopes: str) -> Callable[..., Awaitable[Principal]]:
    """Build a dependency that authenticates and then requires every scope in `scopes` (403)."""

    async def dependency(principal: CurrentPrincipal) -> Principal:
        principal.require_scope(*scopes)
        return principal

    return dependency


def install_revocation_list(app: FastAPI, revocations: RevocationList) -> None:
    """Make `authenticate` reject revoked tokens, and tail the revocation stream while `app` runs.

    The app's own lifespan runs inside the list's, so the list is in step before the first request
    and stops after the app's shutdown.
    """
    app.state.revocations = revocations
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(running: Any) -> AsyncIterator[Any]:
        await revocations.start()
        try:
            async with inner(running) as state:
                yield state
        finally:
            await revocations.stop()

    app.router.lifespan_context = lifespan


def install_common(app: FastAPI, *, service: str, checks: dict[str, ReadinessCheck]) -> None:
    """Mount the error handlers, probes and request middleware; an app that verifies tokens
    (`app.state.verifier` is set) also gets a revocation list on the shared Redis."""
    install_error_handlers(app)
    install_health_routes(app, checks)
    app.add_middleware(RequestContextMiddleware, service=service)
    if getattr(app.state, "verifier", None) is not None and not hasattr(app.state, "revocations"):
        settings = getattr(app.state, "settings", None)
        if not isinstance(settings, ServiceSettings):
            # The shared variables (REDIS_URL, ZTCQRS_TOKEN_LEEWAY_SECONDS) are read from the
            # environment when the app keeps no settings object of its own.
            settings = ServiceSettings()
        install_revocation_list(
            app,
            RevocationList(settings.redis_url, leeway_seconds=settings.token_leeway_seconds),
        )


def install_health_metrics(app: FastAPI, client: AsyncRedis) -> None:
    """Export the health gauges on `app`'s `/metrics`, read through `client` at each scrape.

    The caller owns `client` and closes it when the app stops.
    """
    collector = health_collector()

    async def refresh() -> None:
        await collector.refresh(client)

    add_metrics_refresher(app, refresh)
