"""The gray router end to end: a real uvicorn server runs the router, and real aiohttp servers on
loopback ports stand in for the monolith and the CQRS service. The stand-ins record every request
they receive and echo it back, so each test can check what crossed the proxy in both directions.
"""

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import REGISTRY

from services.router.app import create_app
from tests.conftest import SigningKey, free_port
from tests.router_support import StandIn, router_settings, running_router

RULES = """\
version: 1
salt: proxy-test
split_key_header: X-Client-ID
default_target: monolith
rules:
  - name: cqrs-with-fallback
    match:
      headers: {X-Side: cqrs}
    target: cqrs
    fallback: monolith
  - name: cqrs-only
    match:
      headers: {X-Side: cqrs-only}
    target: cqrs
  - name: canary
    match:
      paths: ["/products/**"]
    split: {target: cqrs, percent: 0}
  - name: default
    target: monolith
"""


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


@pytest.fixture
async def router(
    signing_key: SigningKey, rules_file: Path, monolith: StandIn, cqrs: StandIn
) -> AsyncIterator[httpx.AsyncClient]:
    settings = router_settings(rules_file, monolith.url, cqrs.url)
    async with running_router(signing_key, settings) as client:
        yield client


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes


async def raw_request(base_url: str, request_line: str, headers: dict[str, str]) -> RawResponse:
    """Send one HTTP/1.1 request exactly as written; httpx would resolve `..` in the path first."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [request_line, f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    return RawResponse(int(status_line.split()[1]), parsed, body)


def error_count(target: str, kind: str) -> float:
    labels = {"target": target, "kind": kind}
    return REGISTRY.get_sample_value("ztcqrs_router_upstream_errors_total", labels) or 0.0


AuthHeader = Callable[..., dict[str, str]]


async def test_proxy_default_to_monolith(
    router: httpx.AsyncClient, monolith: StandIn, cqrs: StandIn, auth_header: AuthHeader
) -> None:
    response = await router.get("/orders/o1?limit=5&x=%20y", headers=auth_header())

    assert response.status_code == 200
    assert response.headers["x-gray-target"] == "monolith"
    assert response.headers["x-gray-rule"] == "default"
    assert len(response.headers["x-request-id"]) == 32
    assert response.json()["server"] == "monolith"
    assert [r.path for r in monolith.requests] == ["/orders/o1?limit=5&x=%20y"]
    assert monolith.requests[0].headers["x-request-id"] == response.headers["x-request-id"]
    assert cqrs.requests == []


async def test_proxy_keeps_valid_request_id(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    kept = await router.get("/orders", headers={**auth_header(), "X-Request-ID": "trace-42"})
    replaced = await router.get("/orders", headers={**auth_header(), "X-Request-ID": "x" * 200})

    assert kept.headers["x-request-id"] == "trace-42"
    assert monolith.requests[0].headers.getall("x-request-id") == ["trace-42"]
    assert replaced.headers["x-request-id"] != "x" * 200
    assert len(replaced.headers["x-request-id"]) == 32


CQRS_ROUTES = [
    ("POST", "/orders", "/commands/orders"),
    ("POST", "/orders/o1/pay", "/commands/orders/o1/pay"),
    ("GET", "/orders/o1", "/queries/orders/o1"),
    ("GET", "/orders", "/queries/orders"),
    ("GET", "/products", "/queries/products"),
    ("GET", "/products/p1", "/queries/products/p1"),
]


async def test_proxy_cqrs_route_mapping(
    router: httpx.AsyncClient, monolith: StandIn, cqrs: StandIn, auth_header: AuthHeader
) -> None:
    headers = {**auth_header(), "X-Side": "cqrs-only"}
    for method, public_path, cqrs_path in CQRS_ROUTES:
        response = await router.request(method, public_path, headers=headers)
        assert response.status_code == 200, public_path
        assert response.headers["x-gray-target"] == "cqrs", public_path
        assert response.headers["x-gray-rule"] == "cqrs-only", public_path
        assert cqrs.requests[-1].path == cqrs_path
        assert cqrs.requests[-1].method == method
    assert monolith.requests == []


async def test_proxy_unmapped_route_stays_on_monolith(
    router: httpx.AsyncClient, monolith: StandIn, cqrs: StandIn, auth_header: AuthHeader
) -> None:
    headers = {**auth_header(), "X-Side": "cqrs-only"}
    response = await router.get("/users/me", headers=headers)
    delete = await router.delete("/orders/o1", headers=headers)

    assert response.headers["x-gray-target"] == "monolith"
    assert response.headers["x-gray-rule"] == "cqrs-only"
    assert delete.headers["x-gray-target"] == "monolith"
    assert [r.path for r in monolith.requests] == ["/users/me", "/orders/o1"]
    assert cqrs.requests == []


async def test_proxy_normalised_path_forwarded(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    base_url = str(router.base_url).rstrip("/")
    cases = [
        ("/orders//o1", "/orders/o1"),
        ("/orders/./o1/", "/orders/o1"),
        ("/products/../orders", "/orders"),
        ("/products/a%20b", "/products/a%20b"),
        ("/products/%61", "/products/a"),
        ("/products/100%25", "/products/100%25"),
    ]
    for sent, forwarded in cases:
        response = await raw_request(base_url, f"GET {sent} HTTP/1.1", auth_header())
        assert response.status == 200, sent
        assert monolith.requests[-1].path == forwarded, sent


async def test_proxy_hop_by_hop_removed_both_ways(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    monolith.extra_headers = {
        "Connection": "X-Upstream-Hop",
        "X-Upstream-Hop": "secret",
        "Keep-Alive": "timeout=99",
        "Proxy-Authenticate": "Basic realm=upstream",
        "Upgrade": "h2c",
        "Trailer": "X-Checksum",
        "X-End-To-End": "kept",
    }
    request_headers = {
        **auth_header(),
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Proxy-Authorization": "Basic dXNlcjpwYXNz",
        "Proxy-Connection": "keep-alive",
        "Upgrade": "h2c",
        "X-Client-End-To-End": "kept",
    }
    response = await router.get("/orders", headers=request_headers)

    assert response.status_code == 200
    received = monolith.requests[0].headers
    for name in (
        "x-client-hop", "keep-alive", "te", "trailer", "proxy-authorization",
        "proxy-connection", "upgrade",
    ):
        assert name not in received, name
    assert "x-client-hop" not in received.get("connection", "").lower()
    assert received["x-client-end-to-end"] == "kept"
    for name in ("x-upstream-hop", "keep-alive", "proxy-authenticate", "upgrade", "trailer"):
        assert name not in response.headers, name
    assert "x-upstream-hop" not in response.headers.get("connection", "").lower()
    assert response.headers["x-end-to-end"] == "kept"


async def test_proxy_spoofed_headers_replaced(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    spoofed = {
        **auth_header(),
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=203.0.113.9",
        "X-Real-IP": "203.0.113.9",
        "X-User-Id": "admin",
        "X-User-Scopes": "sync:write",
        "X-Gray-Target": "cqrs",
    }
    response = await router.get("/orders", headers=spoofed)

    assert response.status_code == 200
    received = monolith.requests[0].headers
    assert received.getall("x-forwarded-for") == ["127.0.0.1"]
    assert received.getall("x-forwarded-proto") == ["http"]
    assert received.getall("x-forwarded-host") == [router.base_url.netloc.decode()]
    for name in ("forwarded", "x-real-ip", "x-user-id", "x-user-scopes", "x-gray-target"):
        assert name not in received, name
    assert received["authorization"] == spoofed["Authorization"]
    assert response.headers["x-gray-target"] == "monolith"


async def test_proxy_internal_paths_not_forwarded(
    router: httpx.AsyncClient, monolith: StandIn, cqrs: StandIn, auth_header: AuthHeader
) -> None:
    base_url = str(router.base_url).rstrip("/")
    admin = auth_header("cqrs-reverse-sync", client_id="cqrs-reverse-sync", scope="sync:write")
    paths = [
        "/internal",
        "/internal/sync/orders/x",
        "/orders/../internal/sync/x",
        "/%2e%2e/internal",
        "/%2E%2E/internal/sync/orders/x",
        "//internal/sync/orders/x",
        "/./internal/sync",
        "/%69nternal/sync/orders/x",
        "/INTERNAL/sync/orders/x",
        "/internal;v=1/sync/orders/x",
    ]
    for path in paths:
        for headers in (admin, {**admin, "X-Side": "cqrs"}):
            response = await raw_request(base_url, f"PUT {path} HTTP/1.1", headers)
            assert response.status == 404, path
            assert json.loads(response.body)["error"] == "not_found", path
            assert response.headers["x-gray-target"] == "router", path
    assert monolith.requests == []
    assert cqrs.requests == []


async def test_proxy_rejects_unsafe_paths(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    base_url = str(router.base_url).rstrip("/")
    for path in ("/orders%2Fo1", "/internal%2fsync", "/orders/%00", "/orders%5c..%5cinternal"):
        response = await raw_request(base_url, f"GET {path} HTTP/1.1", auth_header())
        assert response.status == 400, path
        assert json.loads(response.body)["error"] == "invalid_path", path
        assert response.headers["x-gray-target"] == "router", path
    assert monolith.requests == []


async def test_proxy_rejects_bad_tokens(
    router: httpx.AsyncClient,
    monolith: StandIn,
    cqrs: StandIn,
    signing_key: SigningKey,
) -> None:
    other_key = SigningKey()
    cases = {
        "missing": {},
        "expired": {"Authorization": f"Bearer {signing_key.token(lifetime=-60)}"},
        "other key": {"Authorization": f"Bearer {other_key.token()}"},
        "other key same kid": {
            "Authorization": f"Bearer {SigningKey(signing_key.kid).token()}"
        },
        "garbage": {"Authorization": "Bearer not-a-token"},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
    }
    for case, headers in cases.items():
        response = await router.get("/orders", headers={**headers, "X-Side": "cqrs"})
        assert response.status_code == 401, case
        assert response.json()["error"] == "invalid_token", case
        assert response.json()["message"], case
        assert response.headers["www-authenticate"].startswith("Bearer"), case
        assert response.headers["x-gray-target"] == "router", case
        assert response.headers["x-gray-rule"] == "none", case
        assert response.headers["x-request-id"], case
    assert monolith.requests == []
    assert cqrs.requests == []


async def test_proxy_rejects_two_authorization_headers(
    router: httpx.AsyncClient, monolith: StandIn, signing_key: SigningKey
) -> None:
    base_url = str(router.base_url).rstrip("/")
    request = (
        "GET /orders HTTP/1.1\r\n"
        f"Authorization: Bearer {signing_key.token()}\r\n"
        "Authorization: Bearer other"
    )
    response = await raw_request(base_url, request, {})

    assert response.status == 401
    assert "several Authorization headers" in json.loads(response.body)["message"]
    assert monolith.requests == []


async def test_proxy_body_limit(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    too_big = await router.post("/orders", headers=auth_header(), content=b"x" * 2000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 500

    chunked_too_big = await router.post("/orders", headers=auth_header(), content=chunks())
    fits = await router.post("/orders", headers=auth_header(), content=b"z" * 1000)

    assert too_big.status_code == 413
    assert too_big.json()["error"] == "payload_too_large"
    assert too_big.headers["x-gray-target"] == "router"
    assert too_big.headers["x-gray-rule"] == "default"
    assert chunked_too_big.status_code == 413
    assert chunked_too_big.json()["error"] == "payload_too_large"
    assert fits.status_code == 200
    assert [r.body for r in monolith.requests] == [b"z" * 1000]


async def test_proxy_forwards_chunked_body(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for index in range(3):
            yield str(index).encode() * 100

    response = await router.post("/orders", headers=auth_header(), content=chunks())

    assert response.status_code == 200
    assert monolith.requests[0].body == b"0" * 100 + b"1" * 100 + b"2" * 100


async def test_proxy_body_passes_intact(
    router: httpx.AsyncClient, monolith: StandIn, auth_header: AuthHeader
) -> None:
    monolith.gzip_body = True
    monolith.extra_headers = {"Set-Cookie": "session=abc; Path=/"}
    headers = {**auth_header(), "Accept-Encoding": "gzip"}
    async with router.stream("GET", "/orders", headers=headers) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["server"] == "monolith"
    assert response.headers["set-cookie"] == "session=abc; Path=/"

    # The router keeps no cookie jar and adds no headers of its own choosing: a bare request
    # arrives without Cookie, Accept, Accept-Encoding or User-Agent.
    base_url = str(router.base_url).rstrip("/")
    await raw_request(base_url, "GET /orders HTTP/1.1", auth_header())
    for name in ("cookie", "accept", "accept-encoding", "user-agent"):
        assert name not in monolith.requests[-1].headers, name


async def test_proxy_upstream_down_502(
    signing_key: SigningKey, rules_file: Path, monolith: StandIn, auth_header: AuthHeader
) -> None:
    closed_port_url = f"http://127.0.0.1:{free_port()}"
    settings = router_settings(rules_file, monolith.url, closed_port_url)
    before = error_count("cqrs", "connect")
    async with running_router(signing_key, settings) as client:
        response = await client.get("/orders", headers={**auth_header(), "X-Side": "cqrs-only"})

    assert response.status_code == 502
    assert response.json()["error"] == "bad_gateway"
    assert "127.0.0.1" not in response.json()["message"]
    assert response.headers["x-gray-target"] == "cqrs"
    assert response.headers["x-gray-rule"] == "cqrs-only"
    assert error_count("cqrs", "connect") == before + 1
    assert monolith.requests == []


async def test_proxy_upstream_timeout_504(
    signing_key: SigningKey,
    rules_file: Path,
    monolith: StandIn,
    cqrs: StandIn,
    auth_header: AuthHeader,
) -> None:
    cqrs.delay_seconds = 1.0
    settings = router_settings(rules_file, monolith.url, cqrs.url, upstream_timeout_seconds=0.2)
    before = error_count("cqrs", "timeout")
    async with running_router(signing_key, settings) as client:
        response = await client.get("/orders", headers={**auth_header(), "X-Side": "cqrs-only"})

    assert response.status_code == 504
    assert response.json()["error"] == "gateway_timeout"
    assert response.headers["x-gray-target"] == "cqrs"
    assert error_count("cqrs", "timeout") == before + 1


async def test_proxy_fallback_on_5xx_for_get(
    router: httpx.AsyncClient, monolith: StandIn, cqrs: StandIn, auth_header: AuthHeader
) -> None:
    cqrs.status = 500
    headers = {**auth_header(), "X-Side": "cqrs"}
    response = await router.get("/orders/o1", headers=headers)

    assert response.status_code == 200
    assert response.json()["server"] == "monolith"
    assert response.headers["x-gray-target"] == "monolith"
    assert response.headers["x-gray-rule"] == "cqrs-with-fallback"
    assert [r.path for r in cqrs.requests] == ["/queries/orders/o1"]
    assert [r.path for r in monolith.requests] == ["/orders/o1"]


async def test_proxy_no_fallback_for_post(
    router: httpx.AsyncClient, monolith: StandIn, cqrs: StandIn, auth_header: AuthHeader
) -> None:
    cqrs.status = 503
    headers = {**auth_header(), "X-Side": "cqrs"}
    response = await router.post("/orders", headers=headers, content=b'{"items": []}')

    assert response.status_code == 503
    assert response.json()["server"] == "cqrs"
    assert response.headers["x-gray-target"] == "cqrs"
    assert monolith.requests == []


async def test_proxy_fallback_when_cqrs_down(
    signing_key: SigningKey, rules_file: Path, monolith: StandIn, auth_header: AuthHeader
) -> None:
    settings = router_settings(rules_file, monolith.url, f"http://127.0.0.1:{free_port()}")
    async with running_router(signing_key, settings) as client:
        headers = {**auth_header(), "X-Side": "cqrs"}
        response = await client.get("/products", headers=headers)
        posted = await client.post("/orders", headers=headers, content=b"{}")

    assert response.status_code == 200
    assert response.headers["x-gray-target"] == "monolith"
    assert response.headers["x-gray-rule"] == "cqrs-with-fallback"
    assert posted.status_code == 502
    assert posted.headers["x-gray-target"] == "cqrs"
    assert [r.path for r in monolith.requests] == ["/products"]


async def test_proxy_reload_changes_routing(
    router: httpx.AsyncClient,
    rules_file: Path,
    monolith: StandIn,
    cqrs: StandIn,
    auth_header: AuthHeader,
) -> None:
    before = await router.get("/products/p1", headers=auth_header())
    assert before.headers["x-gray-target"] == "monolith"
    assert before.headers["x-gray-rule"] == "canary"

    await asyncio.to_thread(rules_file.write_text, RULES.replace("percent: 0", "percent: 100"))
    target = "monolith"
    for _ in range(100):
        await asyncio.sleep(0.05)
        response = await router.get("/products/p1", headers=auth_header())
        target = response.headers["x-gray-target"]
        if target == "cqrs":
            break
    assert target == "cqrs"
    assert cqrs.requests[-1].path == "/queries/products/p1"


async def test_router_probes(router: httpx.AsyncClient, monolith: StandIn) -> None:
    for path in ("/healthz", "/_gray/healthz"):
        response = await router.get(path)
        assert response.status_code == 200, path
        assert response.json() == {"status": "ok"}, path
        assert response.headers["x-gray-target"] == "router", path
    for path in ("/readyz", "/_gray/readyz"):
        response = await router.get(path)
        assert response.status_code == 200, path
        assert response.json()["status"] == "ready", path
    for path in ("/metrics", "/_gray/metrics"):
        response = await router.get(path)
        assert response.status_code == 200, path
        assert "ztcqrs_router_requests_total" in response.text, path
        assert "ztcqrs_router_rule_reloads_total" in response.text, path
    head = await router.head("/healthz")
    post = await router.post("/healthz")
    unknown = await router.get("/_gray/unknown")

    assert head.status_code == 200
    assert head.content == b""
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert unknown.status_code == 404
    assert monolith.requests == []


async def test_router_status_requires_gray_admin(
    router: httpx.AsyncClient, rules_file: Path, monolith: StandIn, auth_header: AuthHeader
) -> None:
    anonymous = await router.get("/_gray/status")
    user = await router.get("/_gray/status", headers=auth_header())
    admin_headers = auth_header("ztcqrs-admin", client_id="ztcqrs-admin", scope="gray:admin")
    admin = await router.get("/_gray/status", headers=admin_headers)

    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert user.status_code == 403
    assert user.json()["error"] == "insufficient_scope"
    assert 'scope="gray:admin"' in user.headers["www-authenticate"]
    assert admin.status_code == 200
    body = admin.json()
    assert len(body["rules_version"]) == 12
    assert body["rules_file"] == str(rules_file)
    assert body["loaded_at"].endswith("Z")
    assert body["last_error"] is None
    assert body["last_error_at"] is None
    assert body["rules"] == ["cqrs-with-fallback", "cqrs-only", "canary", "default"]
    assert monolith.requests == []


async def test_router_status_shows_last_error(
    router: httpx.AsyncClient, rules_file: Path, auth_header: AuthHeader
) -> None:
    admin_headers = auth_header("ztcqrs-admin", client_id="ztcqrs-admin", scope="gray:admin")
    version = (await router.get("/_gray/status", headers=admin_headers)).json()["rules_version"]

    await asyncio.to_thread(rules_file.write_text, RULES.replace("percent: 0", "percent: 120"))
    body: dict[str, Any] = {}
    for _ in range(100):
        await asyncio.sleep(0.05)
        body = (await router.get("/_gray/status", headers=admin_headers)).json()
        if body["last_error"]:
            break
    assert "split.percent must be between 0 and 100, got 120" in body["last_error"]
    assert body["last_error_at"].endswith("Z")
    assert body["rules_version"] == version


async def test_router_metrics_count_requests(
    router: httpx.AsyncClient, auth_header: AuthHeader
) -> None:
    labels = {"rule": "default", "target": "monolith", "status": "200"}
    before = REGISTRY.get_sample_value("ztcqrs_router_requests_total", labels) or 0.0
    await router.get("/orders", headers=auth_header())
    await router.get("/orders", headers=auth_header())
    after = REGISTRY.get_sample_value("ztcqrs_router_requests_total", labels)
    assert after == before + 2


async def test_router_readyz_needs_jwks(
    rules_file: Path, monolith: StandIn, cqrs: StandIn
) -> None:
    jwks_url = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"
    settings = router_settings(rules_file, monolith.url, cqrs.url, jwks_url=jwks_url)
    app = create_app(settings)
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router.test") as client:
            response = await client.get("/readyz")
    finally:
        await app.shutdown()

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert jwks_url in response.json()["failures"]["jwks"]


async def test_router_fetches_jwks(
    rules_file: Path, monolith: StandIn, cqrs: StandIn, signing_key: SigningKey
) -> None:
    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(signing_key.jwks)

    auth_app = web.Application()
    auth_app.router.add_get("/.well-known/jwks.json", jwks)
    runner = web.AppRunner(auth_app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = router_settings(
        rules_file, monolith.url, cqrs.url,
        jwks_url=f"http://127.0.0.1:{port}/.well-known/jwks.json",
    )
    app = create_app(settings)
    await app.startup()
    try:
        transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://router.test") as client:
            ready = await client.get("/readyz")
            token = signing_key.token()
            response = await client.get("/orders", headers={"Authorization": f"Bearer {token}"})
    finally:
        await app.shutdown()
        await runner.cleanup()

    assert ready.status_code == 200
    assert response.status_code == 200
    assert response.headers["x-gray-target"] == "monolith"
    assert monolith.requests[0].headers["x-forwarded-for"] == "198.51.100.7"
    assert monolith.requests[0].headers["x-forwarded-host"] == "router.test"
