"""Revoked access tokens: a denylist of token ids (`jti`) that every verifying service honours.

The auth server appends each revocation, with the token's `exp`, to the Redis stream
`auth.revocations`. Every service tails that stream with a blocking `XREAD` on its own connection
and keeps the revoked ids in memory, so a request's check is a dictionary lookup with no Redis
round trip, and a revocation reaches every service within milliseconds while Redis is up. On start
a service reads the whole retained stream, so it also learns what was revoked before it started.
An id stays in memory until its token has expired, and the stream keeps entries only as long as a
token they name can still be valid.

While Redis is unreachable a service keeps the ids it has and reconnects with backoff, so a
revocation made during the outage takes effect when the service reconnects. With
`max_stale_seconds` set, a service instead answers 503 to every authenticated request once its
list has not been refreshed for that long.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis
from prometheus_client import Counter, Gauge
from redis import exceptions as redis_errors

from .errors import Unauthorized, Unavailable
from .names import REVOCATION_STREAM
from .retry import backoff_seconds, sleep_unless_stopped
from .security import Principal
from .streams import connect

log = logging.getLogger(__name__)

# How long one blocking read waits for a new entry. It bounds how long a stop request waits.
BLOCK_MILLISECONDS = 500
# Entries read per call, so catching up on a long stream does not build one huge reply.
READ_COUNT = 1000
# Expired ids are dropped from memory at most this often, in seconds.
PURGE_INTERVAL_SECONDS = 30.0

REVOCATION_SYNCS = Counter(
    "ztcqrs_revocation_syncs_total",
    "Reads of the revocation stream, by result (success or failure).",
    ["result"],
)
# With several processes (ROUTER_PROCESSES), every process tails the same stream: the count is
# the largest list held, and the sync time is the oldest, so an alert on its age sees the worst.
REVOKED_TOKENS = Gauge(
    "ztcqrs_revocation_revoked_tokens", "Revoked token ids held in memory and not expired yet.",
    multiprocess_mode="livemax",
)
REVOCATION_LAST_SYNC = Gauge(
    "ztcqrs_revocation_last_sync_timestamp_seconds",
    "Unix time of the last successful read of the revocation stream.",
    multiprocess_mode="livemin",
)
REVOCATION_REJECTIONS = Counter(
    "ztcqrs_revocation_rejections_total", "Requests rejected because their token was revoked."
)


async def revoke_token(
    client: "redis.Redis", *, token_id: str, expires_at: int, retention_seconds: float
) -> str:
    """Append a revocation of `token_id` until `expires_at` (Unix time) and return the entry id.

    Entries older than `retention_seconds` are trimmed in the same call, so the stream holds only
    revocations whose token may still be valid; pass at least the longest token lifetime plus the
    verifiers' leeway. Raises `Unavailable` when Redis cannot be reached, because a revocation
    that was not stored must not be reported as done.
    """
    oldest_ms = int((time.time() - retention_seconds) * 1000)
    try:
        entry_id = await client.xadd(
            REVOCATION_STREAM,
            {"jti": token_id, "exp": str(expires_at)},
            minid=max(oldest_ms, 0),
            approximate=True,
        )
    except redis_errors.RedisError as error:
        raise Unavailable(
            "The revocation could not be stored because Redis is unavailable; retry shortly."
        ) from error
    log.info("token revoked", extra={"jti": token_id, "exp": expires_at, "entry_id": entry_id})
    return str(entry_id)


class RevocationList:
    """The revoked token ids of one process, kept in step with the revocation stream.

    `start()` begins tailing the stream in a task and `stop()` ends it. `check()` runs on every
    request and never waits on Redis.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        leeway_seconds: float = 5.0,
        max_stale_seconds: float = 0.0,
        block_ms: int = BLOCK_MILLISECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis_url = redis_url
        self.leeway_seconds = leeway_seconds
        self.max_stale_seconds = max_stale_seconds
        self.block_ms = block_ms
        self.clock = clock
        self._revoked: dict[str, int] = {}
        self._last_id = "0-0"
        self._synced_at: float | None = None
        self._created_at = clock()
        self._purged_at = clock()
        self._client: redis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def __len__(self) -> int:
        return len(self._revoked)

    @property
    def synced(self) -> bool:
        """True once the stream was read completely at least once."""
        return self._synced_at is not None

    def is_revoked(self, token_id: str) -> bool:
        expires_at = self._revoked.get(token_id)
        return expires_at is not None and expires_at + self.leeway_seconds >= self.clock()

    def check(self, principal: Principal) -> None:
        """Raise `Unauthorized` for a revoked token, `Unavailable` when the list is too old."""
        if self.is_revoked(principal.token_id):
            REVOCATION_REJECTIONS.inc()
            raise Unauthorized("The token has been revoked; sign in again to get a new one.")
        if self.max_stale_seconds > 0:
            since = self._synced_at if self._synced_at is not None else self._created_at
            age = self.clock() - since
            if age > self.max_stale_seconds:
                raise Unavailable(
                    f"The token revocation list was last updated {age:.0f} s ago, more than the "
                    f"allowed {self.max_stale_seconds:.0f} s, because Redis is unreachable; "
                    "retry shortly."
                )

    # Tailing the stream

    async def start(self) -> None:
        if self._task is None:
            self._client = connect(self.redis_url)
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="revocation-list")
            log.info("revocation list started", extra={"stream": REVOCATION_STREAM})

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # The task ends after its current blocking read. Cancelling a read in progress can
            # leave redis-py waiting on the connection (seen with redis-py 8.2), so it is only
            # the fallback.
            self._stop.set()
            done, _ = await asyncio.wait({task}, timeout=self.block_ms / 1000 + 2)
            if not done:
                log.warning(
                    "revocation list did not stop in time; cancelling it",
                    extra={"stream": REVOCATION_STREAM},
                )
                task.cancel()
                await asyncio.wait({task}, timeout=1)
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
            log.info("revocation list stopped", extra={"stream": REVOCATION_STREAM})

    async def sync_once(self, block_ms: int | None = None) -> int:
        """Read the entries after the last one seen, waiting up to `block_ms`; return the count.

        Without `block_ms` the call returns at once. Raises redis-py's `RedisError` when Redis
        fails, which the tailing task logs and retries.
        """
        if self._client is None:
            self._client = connect(self.redis_url)
        added = 0
        while True:
            reply: Any = await self._client.xread(
                {REVOCATION_STREAM: self._last_id}, count=READ_COUNT, block=block_ms
            )
            entries = reply[0][1] if reply else []
            for entry_id, fields in entries:
                self._last_id = entry_id
                added += self._add(entry_id, fields)
            # A full batch means more entries may wait; read them now without blocking.
            if len(entries) < READ_COUNT:
                break
            block_ms = None
        self._synced_at = self.clock()
        REVOCATION_SYNCS.labels("success").inc()
        REVOCATION_LAST_SYNC.set(time.time())
        self._purge_expired()
        return added

    def _add(self, entry_id: str, fields: dict[str, str]) -> int:
        token_id = fields.get("jti")
        try:
            expires_at = int(fields.get("exp", ""))
        except ValueError:
            expires_at = None
        if not token_id or expires_at is None:
            log.error(
                "revocation entry is malformed; skipping it",
                extra={"stream": REVOCATION_STREAM, "entry_id": entry_id, "fields": fields},
            )
            return 0
        if expires_at + self.leeway_seconds < self.clock():
            return 0
        self._revoked[token_id] = max(expires_at, self._revoked.get(token_id, expires_at))
        return 1

    def _purge_expired(self) -> None:
        now = self.clock()
        if now - self._purged_at >= PURGE_INTERVAL_SECONDS:
            self._purged_at = now
            self._revoked = {
                token_id: expires_at
                for token_id, expires_at in self._revoked.items()
                if expires_at + self.leeway_seconds >= now
            }
        REVOKED_TOKENS.set(len(self._revoked))

    async def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                added = await self.sync_once(self.block_ms if self.synced else None)
            except redis_errors.RedisError as error:
                failures += 1
                REVOCATION_SYNCS.labels("failure").inc()
                delay = backoff_seconds(failures, maximum=5.0)
                # One line when the outage starts and then every tenth retry, not one per retry.
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "revocation stream read failed; keeping the revoked ids in memory and "
                        "retrying",
                        extra={
                            "stream": REVOCATION_STREAM, "error": str(error),
                            "failures": failures, "retry_in_s": round(delay, 2),
                            "revoked": len(self._revoked),
                        },
                    )
                await sleep_unless_stopped(self._stop, delay)
                continue
            if failures:
                log.info(
                    "revocation stream readable again",
                    extra={"stream": REVOCATION_STREAM, "failures": failures},
                )
                failures = 0
            if added:
                log.info(
                    "revocations received",
                    extra={"stream": REVOCATION_STREAM, "added": added,
                           "revoked": len(self._revoked)},
                )
