"""Failed sign-in counting in Redis, and in memory while Redis is unreachable."""

import redis.asyncio as aioredis

from services.auth.throttle import LoginThrottle, account_key, address_key
from tests.conftest import free_port


async def test_counts_in_redis(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    throttle = LoginThrottle(client, window_seconds=60)
    keys = [account_key("user", "alice"), address_key("198.51.100.1")]
    limits = {keys[0]: 2, keys[1]: 10}
    try:
        before = await throttle.retry_after(limits)
        await throttle.record_failure(keys)
        await throttle.record_failure(keys)
        after = await throttle.retry_after(limits)
        other = await throttle.retry_after({account_key("user", "bob"): 2})
        stored = await client.keys("auth:login-failures:*")
    finally:
        await client.aclose()

    assert before is None
    assert after is not None
    assert 1 <= after <= 60
    assert other is None
    # Usernames are hashed, so none appears in Redis in clear.
    assert not any("alice" in key for key in stored)


async def test_counts_in_memory_without_redis() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    throttle = LoginThrottle(client, window_seconds=60)
    key = account_key("user", "alice")
    try:
        for _ in range(3):
            await throttle.record_failure([key])
        limited = await throttle.retry_after({key: 3})
        under = await throttle.retry_after({key: 4})
    finally:
        await client.aclose()

    assert limited is not None
    assert under is None
