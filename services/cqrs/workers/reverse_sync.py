"""Reverse sync: sends orders written on the CQRS side to the monolith's internal sync API.

Each `events.cqrs` event of origin `cqrs` about an order becomes `PUT
{monolith_url}/internal/sync/orders/{id}` with `{"state": <order>, "event_id": <id>}` and a service
token from the client-credentials grant. Other events are acknowledged without a request, so
nothing that came from the monolith is sent back to it. The monolith applies the state by version,
so a repeated PUT is harmless.

Connection errors, timeouts, 5xx, 408, 429 and a 401 that a new token did not fix are retried with
jittered backoff for as long as they last. They count no try, because the monolith or the auth
server is unavailable rather than the event at fault. Any other 4xx is dead-lettered at once with
the monolith's answer, because resending the same state cannot change the response.
"""

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

import httpx
import redis.asyncio as redis
from pydantic import SecretStr

from services.shared.events import Event
from services.shared.names import CQRS_STREAM, ORIGIN_CQRS, REVERSE_SYNC_GROUP
from services.shared.streams import (
    REDIS_OUTAGE_ERRORS,
    ConsumerOptions,
    PermanentFailure,
    StreamConsumer,
    TransientFailure,
    connect,
)

from ..settings import Settings
from ..states import ORDER
from .common import consumer_options

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 3.0
REQUEST_TIMEOUT_SECONDS = 10.0
# A cached token is replaced this long before it expires, at most a tenth of its lifetime.
TOKEN_REFRESH_MARGIN_SECONDS = 30.0
RETRYABLE_CLIENT_ERRORS = frozenset({408, 429})
MAX_BODY_IN_ERROR = 500
# Requests of one batch in flight at once. The monolith serializes the writes on SQLite's lock, so
# more only queue there, while a few hide each request's network and parsing time.
MAX_CONCURRENT_REQUESTS = 8


class SyncFailed(TransientFailure):
    """A sync request failed in a way that a later retry may fix."""


class ServiceTokenClient:
    """Client-credentials tokens of the reverse-sync client, cached until shortly before expiry."""

    def __init__(
        self, http: httpx.AsyncClient, *, token_url: str, client_id: str, client_secret: SecretStr
    ) -> None:
        self.http = http
        self.token_url = token_url
        self.client_id = client_id
        self.client_secret = client_secret
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._token = None

    async def token(self) -> str:
        """Return a cached token, or request a new one; raise SyncFailed when that fails."""
        async with self._lock:
            if self._token is None or time.monotonic() >= self._renew_at:
                self._token, lifetime = await self._request_token()
                margin = min(TOKEN_REFRESH_MARGIN_SECONDS, lifetime / 10)
                self._renew_at = time.monotonic() + lifetime - margin
            return self._token

    async def _request_token(self) -> tuple[str, float]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self.client_secret.get_secret_value(),
        }
        try:
            response = await self.http.post(self.token_url, data=form)
        except httpx.HTTPError as error:
            raise SyncFailed(
                f"Token request to {self.token_url} failed: {error!r}; is the auth server up?"
            ) from error
        if response.status_code != 200:
            raise SyncFailed(
                f"Token request to {self.token_url} for client {self.client_id!r} returned "
                f"HTTP {response.status_code}: {_error_code(response)}; check the client id and "
                "CQRS_SYNC_CLIENT_SECRET against the auth server's client registry."
            )
        try:
            reply = response.json()
            access_token = reply["access_token"]
            lifetime = float(reply["expires_in"])
        except (ValueError, KeyError, TypeError) as error:
            raise SyncFailed(
                f"Token response from {self.token_url} lacks access_token or expires_in: {error!r}."
            ) from error
        if not isinstance(access_token, str) or not access_token:
            raise SyncFailed(f"Token response from {self.token_url} has an empty access_token.")
        log.info(
            "service token obtained",
            extra={"client_id": self.client_id, "expires_in": lifetime},
        )
        return access_token, lifetime


def _error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:MAX_BODY_IN_ERROR]
    if isinstance(body, dict):
        return f"{body.get('error')}: {body.get('error_description') or body.get('message')}"
    return response.text[:MAX_BODY_IN_ERROR]


class ReverseSync:
    """Stream handler that sends CQRS-side order states to the monolith.

    Called with a batch, it sends up to `MAX_CONCURRENT_REQUESTS` requests at a time over the
    client's kept-alive connections. Their order does not matter, because the monolith applies
    each state by version.
    """

    def __init__(
        self, http: httpx.AsyncClient, tokens: ServiceTokenClient, *, monolith_url: str
    ) -> None:
        self.http = http
        self.tokens = tokens
        self.monolith_url = monolith_url.rstrip("/")

    async def warm_up(self) -> None:
        """Request the service token now, so that the first event does not wait for it.

        A failure is logged, and the token is requested again with the first event.
        """
        try:
            await self.tokens.token()
        except SyncFailed as error:
            log.warning("service token request at start failed; retrying with the first event",
                        extra={"client_id": self.tokens.client_id, "error": str(error)})

    async def apply_batch(
        self, stream: str, entries: list[tuple[str, Event]]
    ) -> list[Exception | None]:
        """Send every entry's order and return one outcome per entry, as a `BatchHandler`."""
        limit = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)

        async def send(entry_id: str, event: Event) -> Exception | None:
            async with limit:
                try:
                    await self(stream, entry_id, event)
                except REDIS_OUTAGE_ERRORS:
                    raise
                except Exception as error:
                    return error
                return None

        return list(await asyncio.gather(
            *(send(entry_id, event) for entry_id, event in entries)
        ))

    async def __call__(self, stream: str, entry_id: str, event: Event) -> None:
        ids = {
            "stream": stream,
            "entry_id": entry_id,
            "event_id": event.id,
            "subject": event.subject,
            "version": event.aggregate_version,
        }
        if event.origin != ORIGIN_CQRS or event.aggregate != ORDER:
            log.debug("event not sent to the monolith", extra={**ids, "origin": event.origin})
            return
        if event.deleted:
            raise PermanentFailure(
                f"Event {event.id} deletes order {event.aggregate_id}, but the monolith's sync API "
                "has no deletion; apply it to the monolith by hand."
            )
        url = f"{self.monolith_url}/internal/sync/orders/{quote(event.aggregate_id, safe='')}"
        body = {"state": event.data, "event_id": event.id}
        response = await self._put(url, body, event)
        if response.status_code == 401:
            log.info("monolith rejected the service token; requesting a new one", extra=ids)
            self.tokens.invalidate()
            response = await self._put(url, body, event)
        self._check(response, url, event)
        decision = _reply_field(response, "decision")
        log.info("order synced to the monolith", extra={**ids, "decision": decision})

    async def _put(self, url: str, body: dict[str, Any], event: Event) -> httpx.Response:
        headers = {"Authorization": f"Bearer {await self.tokens.token()}"}
        if event.traceparent:
            headers["traceparent"] = event.traceparent
        try:
            return await self.http.put(url, json=body, headers=headers)
        except httpx.HTTPError as error:
            raise SyncFailed(f"PUT {url} for event {event.id} failed: {error!r}") from error

    @staticmethod
    def _check(response: httpx.Response, url: str, event: Event) -> None:
        status = response.status_code
        if response.is_success:
            return
        detail = response.text[:MAX_BODY_IN_ERROR]
        if status >= 500 or status == 401 or status in RETRYABLE_CLIENT_ERRORS:
            raise SyncFailed(f"PUT {url} for event {event.id} returned HTTP {status}: {detail}")
        raise PermanentFailure(
            f"The monolith rejected event {event.id} (order {event.aggregate_id} version "
            f"{event.aggregate_version}) with HTTP {status}: {detail}"
        )


def _reply_field(response: httpx.Response, name: str) -> Any:
    try:
        reply = response.json()
    except ValueError:
        return None
    return reply.get(name) if isinstance(reply, dict) else None


def build_handler(settings: Settings, http: httpx.AsyncClient) -> ReverseSync:
    """Build the reverse-sync handler; raise ValueError when the client secret is not set."""
    tokens = ServiceTokenClient(
        http,
        token_url=settings.token_url,
        client_id=settings.sync_client_id,
        client_secret=settings.require_sync_client_secret(),
    )
    return ReverseSync(http, tokens, monolith_url=settings.monolith_url)


def build_consumer(
    settings: Settings,
    client: "redis.Redis",
    http: httpx.AsyncClient,
    *,
    options: ConsumerOptions | None = None,
    handler: ReverseSync | None = None,
) -> StreamConsumer:
    """Build the reverse-sync consumer; raise ValueError when the client secret is not set."""
    return StreamConsumer(
        client,
        streams=[CQRS_STREAM],
        group=REVERSE_SYNC_GROUP,
        consumer=settings.consumer_name,
        batch_handler=(handler or build_handler(settings, http)).apply_batch,
        options=options or consumer_options(settings),
    )


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Send CQRS-side orders to the monolith until `stop` is set.

    Raises ValueError naming CQRS_SYNC_CLIENT_SECRET when the secret is missing outside
    development mode.
    """
    settings.require_sync_client_secret()
    client = connect(settings.redis_url)
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(REQUEST_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
    )
    log.info(
        "reverse sync started",
        extra={
            "monolith_url": settings.monolith_url,
            "token_url": settings.token_url,
            "client_id": settings.sync_client_id,
            "consumer": settings.consumer_name,
        },
    )
    try:
        handler = build_handler(settings, http)
        await handler.warm_up()
        await build_consumer(settings, client, http, handler=handler).run(stop)
    finally:
        await http.aclose()
        await client.aclose()
        log.info("reverse sync stopped")
