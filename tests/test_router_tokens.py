"""The router's cache of verified tokens."""

import pytest

from services.router.tokens import CachingVerifier
from services.shared.errors import Unauthorized
from services.shared.security import StaticKeySource, TokenVerifier
from tests.conftest import TEST_AUDIENCE, TEST_ISSUER, SigningKey


def caching_verifier(signing_key: SigningKey, max_entries: int) -> CachingVerifier:
    verifier = TokenVerifier(
        StaticKeySource(signing_key.jwks), issuer=TEST_ISSUER, audience=TEST_AUDIENCE
    )
    return CachingVerifier(verifier, max_entries)


async def test_token_cache_returns_same_principal(signing_key: SigningKey) -> None:
    cache = caching_verifier(signing_key, 10)
    token = signing_key.token("alice")

    first = await cache.verify(token)
    second = await cache.verify(token)

    assert first.subject == "alice"
    assert second is first
    assert len(cache) == 1


async def test_token_cache_bounded(signing_key: SigningKey) -> None:
    cache = caching_verifier(signing_key, 2)
    tokens = [signing_key.token(f"user-{index}") for index in range(3)]
    for token in tokens:
        await cache.verify(token)

    assert len(cache) == 2
    # The least recently used token was evicted, but it still verifies.
    assert (await cache.verify(tokens[0])).subject == "user-0"


async def test_token_cache_skips_expired(signing_key: SigningKey) -> None:
    cache = caching_verifier(signing_key, 10)
    # Expired two seconds ago: still inside the verifier's 5 s leeway, but never cached.
    token = signing_key.token("alice", lifetime=-2)

    assert (await cache.verify(token)).subject == "alice"
    assert len(cache) == 0


async def test_token_cache_off(signing_key: SigningKey) -> None:
    cache = caching_verifier(signing_key, 0)
    await cache.verify(signing_key.token("alice"))
    assert len(cache) == 0


async def test_token_cache_rejects_invalid(signing_key: SigningKey) -> None:
    cache = caching_verifier(signing_key, 10)
    with pytest.raises(Unauthorized):
        await cache.verify(SigningKey().token("mallory"))
    assert len(cache) == 0
