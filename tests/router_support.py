"""The gray router under test: a real uvicorn server runs it, and real aiohttp servers on loopback
ports stand in for the monolith and the CQRS service.

The `monolith` and `cqrs` fixtures are registered for every test through `pytest_plugins` in
tests/conftest.py; a test module that needs other stand-ins defines fixtures of the same names.
"""

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from aiohttp import web
from multidict import CIMultiDict

from services.router.app import HTTP_PROTOCOL, RouterApp, create_app
from services.router.settings import Settings
from services.shared.security import StaticKeySource
from tests.conftest import TEST_ISSUER, SigningKey, free_port


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class StandIn:
    """Stands in for the monolith or the CQRS service: records each request and echoes it."""

    name: str
    status: int = 200
    delay_seconds: float = 0.0
    extra_headers: dict[str, str] = field(default_factory=dict)
    gzip_body: bool = False
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Received(request.method, request.raw_path, CIMultiDict(request.headers), body)
        )
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        payload = json.dumps(
            {"server": self.name, "path": request.raw_path, "body_bytes": len(body)}
        ).encode()
        headers = {"Content-Type": "application/json", **self.extra_headers}
        if self.gzip_body:
            payload = gzip.compress(payload)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=payload, status=self.status, headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def monolith() -> AsyncIterator[StandIn]:
    server = StandIn("monolith")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def cqrs() -> AsyncIterator[StandIn]:
    server = StandIn("cqrs")
    await server.start()
    yield server
    await server.stop()



@asynccontextmanager
async def serve(app: RouterApp) -> AsyncIterator[str]:
    """Run the router with uvicorn on a free loopback port and return its base URL.

    `proxy_headers=False` and the router's own HTTP protocol, as in production: the router is the
    public entry, so uvicorn must not take the client address from a client-sent X-Forwarded-For.
    """
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", ws="none",
        proxy_headers=False, http=HTTP_PROTOCOL,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started, "uvicorn did not start the router"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def router_settings(
    rules_file: Path, monolith_url: str, cqrs_url: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "rules_file": rules_file,
        "rules_poll_seconds": 0.05,
        "monolith_url": monolith_url,
        "cqrs_url": cqrs_url,
        "token_issuer": TEST_ISSUER,
        "max_body_bytes": 1024,
        "upstream_timeout_seconds": 2.0,
        **overrides,
    }
    return Settings(**values)


@asynccontextmanager
async def running_router(
    signing_key: SigningKey, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    async with serve(app) as base_url, httpx.AsyncClient(
        base_url=base_url, trust_env=False, timeout=10
    ) as client:
        yield client
