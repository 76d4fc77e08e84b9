"""The verifiers' JWKS cache: one fetch per cooldown for unknown key ids, cached keys while the
JWKS endpoint is down, failing closed after the configured time, and recovery."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from services.shared.errors import Unavailable
from services.shared.security import JWKSClient, TokenVerifier
from tests.conftest import TEST_AUDIENCE, TEST_ISSUER, SigningKey, free_port


@dataclass
class JWKSServer:
    jwks: dict[str, object]
    fetches: int = 0
    up: bool = True
    port: int = field(default_factory=free_port)

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if not self.up:
            return web.Response(status=503)
        return web.json_response(self.jwks)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"


@pytest.fixture
async def jwks_server(signing_key: SigningKey) -> AsyncIterator[JWKSServer]:
    server = JWKSServer(signing_key.jwks)
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    yield server
    await runner.cleanup()


async def test_unknown_kids_one_fetch(jwks_server: JWKSServer, signing_key: SigningKey) -> None:
    client = JWKSClient(jwks_server.url, min_refresh_seconds=0.5)
    try:
        await client.refresh()
        await asyncio.sleep(0.6)
        results = await asyncio.gather(*(client.get_key(f"made-up-{i}") for i in range(50)))
        again = await client.get_key("made-up-again")
    finally:
        await client.aclose()

    assert results == [None] * 50
    assert again is None
    assert jwks_server.fetches == 2  # the first load and one refresh for all unknown ids


async def test_cached_keys_then_fail_closed(
    jwks_server: JWKSServer, signing_key: SigningKey
) -> None:
    client = JWKSClient(
        jwks_server.url, refresh_seconds=0.1, min_refresh_seconds=0.05, max_stale_seconds=0.6
    )
    verifier = TokenVerifier(client, issuer=TEST_ISSUER, audience=TEST_AUDIENCE)
    token = signing_key.token()
    try:
        await client.refresh()
        jwks_server.up = False
        await asyncio.sleep(0.3)
        during = await verifier.verify(token)
        await asyncio.sleep(0.5)
        with pytest.raises(Unavailable, match="beyond the limit"):
            await verifier.verify(token)
        jwks_server.up = True
        await asyncio.sleep(0.1)
        after = await verifier.verify(token)
    finally:
        await client.aclose()

    assert during.subject == "alice"
    assert after.subject == "alice"


async def test_idle_verifier_refreshes_inline(
    jwks_server: JWKSServer, signing_key: SigningKey
) -> None:
    client = JWKSClient(
        jwks_server.url, refresh_seconds=0.1, min_refresh_seconds=0.05, max_stale_seconds=0.2
    )
    try:
        await client.refresh()
        await asyncio.sleep(0.4)
        # Past the limit but the endpoint is up: the lookup fetches first instead of failing.
        key = await client.get_key(signing_key.kid)
    finally:
        await client.aclose()

    assert key is not None


async def test_no_limit_keeps_keys(jwks_server: JWKSServer, signing_key: SigningKey) -> None:
    client = JWKSClient(
        jwks_server.url, refresh_seconds=0.05, min_refresh_seconds=0.01, max_stale_seconds=0
    )
    try:
        await client.refresh()
        jwks_server.up = False
        await asyncio.sleep(0.3)
        key = await client.get_key(signing_key.kid)
    finally:
        await client.aclose()

    assert key is not None
    assert not client.expired
