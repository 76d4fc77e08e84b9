"""The revocation list against a real Redis: what a service learns from the stream, when, and
what it does while Redis is unreachable."""

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.shared.errors import Unauthorized, Unavailable
from services.shared.revocation import REVOCATION_STREAM, RevocationList, revoke_token
from services.shared.security import Principal
from tests.conftest import free_port


def principal(token_id: str, expires_at: int) -> Principal:
    return Principal("alice", "ztcqrs-web", frozenset(), token_id, expires_at, {})


async def test_catch_up_on_start(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    now = int(time.time())
    await revoke_token(client, token_id="early", expires_at=now + 60, retention_seconds=600)
    await revoke_token(client, token_id="expired", expires_at=now - 60, retention_seconds=600)
    await client.aclose()
    revocations = RevocationList(redis_url, leeway_seconds=5)

    await revocations.sync_once()
    await revocations.stop()

    assert revocations.is_revoked("early")
    assert not revocations.is_revoked("expired")
    assert len(revocations) == 1
    with pytest.raises(Unauthorized, match="revoked"):
        revocations.check(principal("early", now + 60))


async def test_tail_within_a_second(redis_url: str) -> None:
    revocations = RevocationList(redis_url, block_ms=200)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await revocations.start()
    try:
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await revoke_token(
            client, token_id="live", expires_at=int(time.time()) + 60, retention_seconds=600
        )
        for _ in range(400):
            if revocations.is_revoked("live"):
                break
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
    finally:
        await revocations.stop()
        await client.aclose()

    assert revocations.is_revoked("live")
    assert elapsed < 1.0


async def test_trimmed_by_retention(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    for index in range(150):
        await client.xadd(REVOCATION_STREAM, {"jti": f"old{index}", "exp": "1"}, id=f"1000-{index}")
    await revoke_token(
        client, token_id="new", expires_at=int(time.time()) + 60, retention_seconds=60
    )
    entries = await client.xrange(REVOCATION_STREAM)
    await client.aclose()

    # Trimming is approximate: Redis drops whole internal nodes of old entries, not each one.
    old = [entry_id for entry_id, _ in entries if entry_id.startswith("1000-")]
    assert len(old) < 150
    assert entries[-1][1]["jti"] == "new"


async def test_malformed_entry_skipped(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await client.xadd(REVOCATION_STREAM, {"jti": "bad", "exp": "soon"})
    await client.aclose()
    revocations = RevocationList(redis_url)

    assert await revocations.sync_once() == 0
    await revocations.stop()


async def test_redis_down_keeps_serving() -> None:
    revocations = RevocationList(f"redis://127.0.0.1:{free_port()}/0")
    await revocations.start()
    await asyncio.sleep(0.2)
    try:
        revocations.check(principal("any", int(time.time()) + 60))
    finally:
        await revocations.stop()

    assert not revocations.synced


async def test_redis_down_fails_closed_when_set() -> None:
    revocations = RevocationList(f"redis://127.0.0.1:{free_port()}/0", max_stale_seconds=0.2)
    await asyncio.sleep(0.3)

    with pytest.raises(Unavailable, match="revocation list"):
        revocations.check(principal("any", int(time.time()) + 60))
