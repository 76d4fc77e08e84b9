"""Shadow reads end to end: a real uvicorn router in front of two real aiohttp servers on loopback
that stand in for the monolith and the CQRS service and answer with JSON bodies set per test.
"""

import asyncio
import functools
import json
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict

from services.router.app import RouterApp, create_app
from services.router.rules import RulesError, ShadowConfig, parse_rules
from services.router.shadow import UNORDERED_LISTS, Answer, _difference
from services.shared.clock import format_timestamp
from services.shared.security import StaticKeySource
from tests.conftest import SigningKey, free_port
from tests.router_support import router_settings, serve

AuthHeader = Callable[..., dict[str, str]]
WAIT_SECONDS = 10.0

RULES = """\
version: 1
salt: shadow-test
default_target: monolith
rules:
  - name: to-cqrs
    match:
      headers: {{X-Side: cqrs}}
    target: cqrs
  - name: default
    target: monolith
shadow:
  percent: {percent}
  max_samples: 2
  ignore_fields: {ignore}
"""


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]


@dataclass
class JsonServer:
    """A stand-in upstream that records each request and answers `body` as JSON."""

    name: str
    body: dict[str, Any] = field(default_factory=dict)
    status: int = 200
    delay_seconds: float = 0.0
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers)))
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        return web.json_response(self.body, status=self.status)

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

    def shadows(self) -> list[Seen]:
        return [seen for seen in self.requests if seen.headers.get("x-gray-shadow") == "1"]


ORDER = {"id": "o1", "status": "paid", "version": 2, "updated_at": "2025-01-01T00:00:00Z"}


@pytest.fixture
async def monolith() -> AsyncIterator[JsonServer]:
    server = JsonServer("monolith", dict(ORDER))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def cqrs() -> AsyncIterator[JsonServer]:
    server = JsonServer("cqrs", dict(ORDER))
    await server.start()
    yield server
    await server.stop()


@asynccontextmanager
async def shadowing_router(
    tmp_path: Path,
    signing_key: SigningKey,
    monolith_url: str,
    cqrs_url: str,
    *,
    percent: float = 100,
    ignore: list[str] | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[RouterApp, httpx.AsyncClient]]:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES.format(percent=percent, ignore=json.dumps(ignore or [])))
    settings = router_settings(rules_file, monolith_url, cqrs_url, **overrides)
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    async with serve(app) as base_url, httpx.AsyncClient(
        base_url=base_url, trust_env=False, timeout=10
    ) as client:
        yield app, client


async def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {WAIT_SECONDS} s waiting for {what}")
        await asyncio.sleep(0.02)


def finished(app: RouterApp) -> int:
    counts = app.shadow.counts
    return counts["match"] + counts["mismatch"] + counts["error"]


def finished_count(app: RouterApp, expected: int) -> bool:
    return finished(app) == expected


async def test_shadow_match_counted(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    cqrs.body = {**ORDER, "updated_at": "2025-01-01T00:00:00.000001Z"}
    async with shadowing_router(
        tmp_path, signing_key, monolith.url, cqrs.url, ignore=["updated_at"]
    ) as (app, client):
        headers = {**auth_header(), "X-Request-ID": "req-match", "X-Consistency-Token": "o1@2"}
        response = await client.get("/orders/o1", headers=headers)
        await wait_until(lambda: finished(app) == 1, "the shadow read")

    assert response.status_code == 200
    assert response.headers["x-gray-target"] == "monolith"
    assert response.json() == ORDER
    assert app.shadow.counts == {"match": 1, "mismatch": 0, "error": 0, "dropped": 0}
    [shadow] = cqrs.shadows()
    assert shadow.method == "GET"
    assert shadow.path == "/queries/orders/o1"
    assert shadow.headers["x-request-id"] == "req-match-shadow"
    assert shadow.headers["authorization"] == headers["Authorization"]
    assert shadow.headers["x-consistency-token"] == "o1@2"
    assert monolith.requests[0].headers["x-consistency-token"] == "o1@2"
    assert "x-gray-shadow" not in monolith.requests[0].headers


async def test_shadow_from_cqrs_to_monolith(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    async with shadowing_router(tmp_path, signing_key, monolith.url, cqrs.url) as (app, client):
        response = await client.get("/orders/o1", headers={**auth_header(), "X-Side": "cqrs"})
        await wait_until(lambda: finished(app) == 1, "the shadow read")

    assert response.headers["x-gray-target"] == "cqrs"
    assert cqrs.requests[0].path == "/queries/orders/o1"
    assert [seen.path for seen in monolith.shadows()] == ["/orders/o1"]
    assert app.shadow.counts["match"] == 1


async def test_shadow_mismatch_sampled(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    cqrs.body = {**ORDER, "status": "pending", "version": 1}
    async with shadowing_router(tmp_path, signing_key, monolith.url, cqrs.url) as (app, client):
        token_header = auth_header()
        for index in range(3):
            request_id = f"req-mismatch-{index}"
            await client.get("/orders/o1", headers={**token_header, "X-Request-ID": request_id})
            await wait_until(functools.partial(finished_count, app, index + 1), "the shadow read")
        admin = auth_header("operator", scope="gray:admin")
        status = await client.get("/_gray/status", headers=admin)
        stored_at = app.shadow.samples[-1]["at"]

    assert app.shadow.counts["mismatch"] == 3
    # max_samples is 2, so only the two most recent mismatches are kept.
    samples = status.json()["shadow"]["samples"]
    assert [sample["request_id"] for sample in samples] == ["req-mismatch-1", "req-mismatch-2"]
    sample = samples[-1]
    assert sample["path"] == "/orders/o1"
    assert sample["monolith"] == {"status": 200}
    assert sample["cqrs"] == {"status": 200}
    assert '$.status: "paid" != "pending"' in sample["diff"]
    assert "$.version: 2 != 1" in sample["diff"]
    # Stored as epoch seconds, shown as ISO 8601 like the status body's other times.
    assert isinstance(stored_at, float)
    assert sample["at"] == format_timestamp(datetime.fromtimestamp(stored_at, UTC))
    assert status.json()["shadow"]["mismatches"] == 3
    bearer = token_header["Authorization"].removeprefix("Bearer ")
    assert bearer not in json.dumps(status.json())


async def test_shadow_status_mismatch(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    cqrs.status = 404
    async with shadowing_router(tmp_path, signing_key, monolith.url, cqrs.url) as (app, client):
        await client.get("/orders/o1", headers=auth_header())
        await wait_until(lambda: finished(app) == 1, "the shadow read")

    assert app.shadow.counts["mismatch"] == 1
    assert app.shadow.samples[-1]["diff"] == "status 200 != 404"


async def test_shadow_never_mirrors_writes(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    async with shadowing_router(tmp_path, signing_key, monolith.url, cqrs.url) as (app, client):
        for method, path in (("POST", "/orders"), ("POST", "/orders/o1/pay"), ("PUT", "/orders")):
            response = await client.request(method, path, headers=auth_header(), json={})
            assert response.status_code == 200
        # A read shadowed after the writes: once its copy arrived, a copy of a write would have.
        await client.get("/orders/o1", headers=auth_header())
        await wait_until(lambda: finished(app) == 1, "the shadow read")

    assert [(seen.method, seen.path) for seen in cqrs.requests] == [("GET", "/queries/orders/o1")]
    assert len(monolith.requests) == 4


async def test_shadow_skips_error_responses(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    monolith.status = 404
    async with shadowing_router(tmp_path, signing_key, monolith.url, cqrs.url) as (app, client):
        await client.get("/orders/missing", headers=auth_header())
        monolith.status = 200
        await client.get("/orders/o1", headers=auth_header())
        await wait_until(lambda: finished(app) == 1, "the shadow read")

    assert [seen.path for seen in cqrs.shadows()] == ["/queries/orders/o1"]


async def test_shadow_failure_keeps_client_response(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader, monolith: JsonServer
) -> None:
    # Nothing listens on this port, so every shadow call fails to connect.
    down = f"http://127.0.0.1:{free_port()}"
    async with shadowing_router(tmp_path, signing_key, monolith.url, down) as (app, client):
        response = await client.get("/orders/o1", headers=auth_header())
        await wait_until(lambda: finished(app) == 1, "the shadow read")

    assert response.status_code == 200
    assert response.json() == ORDER
    assert app.shadow.counts["error"] == 1


async def test_shadow_timeout_counts_error(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    cqrs.delay_seconds = 5
    async with shadowing_router(
        tmp_path, signing_key, monolith.url, cqrs.url, shadow_timeout_seconds=0.2
    ) as (app, client):
        response = await client.get("/orders/o1", headers=auth_header())
        await wait_until(lambda: finished(app) == 1, "the shadow read to time out")

    assert response.status_code == 200
    assert app.shadow.counts["error"] == 1


async def test_shadow_dropped_when_full(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    cqrs.delay_seconds = 2
    async with shadowing_router(
        tmp_path, signing_key, monolith.url, cqrs.url, shadow_max_in_flight=1
    ) as (app, client):
        for _ in range(3):
            response = await client.get("/orders/o1", headers=auth_header())
            assert response.status_code == 200
        dropped = app.shadow.counts["dropped"]
        await wait_until(lambda: finished(app) == 1, "the shadow read in flight")

    assert dropped == 2
    assert len(cqrs.shadows()) == 1


async def test_shadow_sampling_by_request_id(
    tmp_path: Path, signing_key: SigningKey, auth_header: AuthHeader,
    monolith: JsonServer, cqrs: JsonServer,
) -> None:
    def bucket(request_id: str) -> int:
        return zlib.crc32(request_id.encode()) % 10_000

    candidates = [f"req-{index}" for index in range(200)]
    outside = next(request_id for request_id in candidates if bucket(request_id) >= 5000)
    inside = next(request_id for request_id in candidates if bucket(request_id) < 5000)
    async with shadowing_router(
        tmp_path, signing_key, monolith.url, cqrs.url, percent=50
    ) as (app, client):
        for request_id in (outside, inside):
            await client.get("/orders/o1", headers={**auth_header(), "X-Request-ID": request_id})
        await wait_until(lambda: finished(app) == 1, "the shadow read")

    assert [seen.headers["x-request-id"] for seen in cqrs.shadows()] == [f"{inside}-shadow"]


def test_difference_ignores_fields_at_any_depth() -> None:
    left = {"order": {"id": "o1", "updated_at": "a", "items": [{"n": 1, "etag": "x"}]}}
    right = {"order": {"items": [{"etag": "y", "n": 1}], "id": "o1", "updated_at": "b"}}

    assert difference(left, right, ignore={"updated_at", "etag"}) is None
    assert difference(left, right) == (
        '$.order.items[0].etag: "x" != "y"; $.order.updated_at: "a" != "b"'
    )


def test_difference_list_order() -> None:
    first, second = {"id": "o1"}, {"id": "o2"}
    listed = {"orders": [first, second]}
    swapped = {"orders": [second, first]}

    assert difference(listed, swapped, path="/orders") is None
    assert difference({"items": [1, 2]}, {"items": [2, 1]}, path="/orders") is not None
    assert difference(listed, swapped, path="/orders/o1") is not None
    assert difference(listed, {"orders": [first]}, path="/orders") == (
        "$.orders: 2 items != 1 items"
    )


def test_difference_json_types() -> None:
    assert difference({"paid": True}, {"paid": 1}) == "$.paid: true != 1"
    assert difference({"a": 1}, {"b": 1}) == (
        "$.a: only on the serving side; $.b: only on the shadow side"
    )


def test_shadow_rules_parsed() -> None:
    rules = parse_rules(RULES.format(percent=12.5, ignore='["updated_at"]'))
    absent = parse_rules("version: 1\ndefault_target: monolith\n")

    assert rules.shadow == ShadowConfig(12.5, 2, frozenset({"updated_at"}))
    assert absent.shadow == ShadowConfig()
    assert absent.shadow.percent == 0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("shadow: {percent: 101}", "shadow.percent must be between 0 and 100"),
        ("shadow: {percent: yes}", "shadow.percent must be a number"),
        ("shadow: {max_samples: -1}", "shadow.max_samples must be between 0 and 1000"),
        ("shadow: {ignore_fields: updated_at}", "shadow.ignore_fields must be a list"),
        ("shadow: {sample: 1}", "unknown field 'sample' in shadow"),
        ("shadow: 5", "shadow must be a mapping"),
    ],
)
def test_shadow_rules_invalid(section: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        parse_rules(f"version: 1\ndefault_target: monolith\n{section}\n")


def difference(
    left: Any, right: Any, *, ignore: set[str] | None = None, path: str = "/orders/o1"
) -> str | None:
    return _difference(
        Answer(200, json.dumps(left).encode()), Answer(200, json.dumps(right).encode()),
        frozenset(ignore or ()), UNORDERED_LISTS.get(path, frozenset()), compare_bodies=True,
    )
