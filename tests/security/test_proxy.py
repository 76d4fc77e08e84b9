"""The router as a reverse proxy against a real router process: headers it must strip or
overwrite, responses it must pass through intact, and the JSON errors of its limits."""

import gzip
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from services.router.app import create_app
from services.router.settings import DEFAULT_RULES_FILE, Settings
from tests.conftest import free_port
from tests.e2e.conftest import wait_for

from .conftest import (
    Forge,
    Recorder,
    RecordingRouter,
    SecurityPlatform,
    raw_http,
    request_bytes,
)


def bearer(forge: Forge, **claims: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {forge.token(**claims)}"}


def test_hop_by_hop_removed_both_ways(attack_router: RecordingRouter, forge: Forge) -> None:
    mark = attack_router.monolith.count()
    headers = {
        **bearer(forge),
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "Upgrade": "h2c",
        "Proxy-Authorization": "Basic dXNlcjpwYXNz",
        "X-End-To-End": "kept",
    }

    response = httpx.get(f"{attack_router.url}/products/cookies", headers=headers, timeout=5)

    assert response.status_code == 200
    received = attack_router.monolith.since(mark)[0].headers
    for name in ("x-client-hop", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization"):
        assert name not in received, name
    assert received["x-end-to-end"] == ["kept"]
    assert "x-upstream-hop" not in response.headers
    assert "x-upstream-hop" not in response.headers.get("connection", "").lower()


def test_identity_headers_overwritten(attack_router: RecordingRouter, forge: Forge) -> None:
    mark = attack_router.monolith.count()
    spoofed = {
        **bearer(forge),
        "X-User-Id": "admin",
        "X-User-Scopes": "sync:write",
        "X-Forwarded-For": "203.0.113.9",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=203.0.113.9",
        "X-Real-IP": "203.0.113.9",
        "X-Gray-Target": "cqrs",
    }

    response = httpx.get(f"{attack_router.url}/orders", headers=spoofed, timeout=5)

    assert response.status_code == 200
    received = attack_router.monolith.since(mark)[0].headers
    assert received["x-forwarded-for"] == ["127.0.0.1"]
    assert received["x-forwarded-proto"] == ["http"]
    assert received["x-forwarded-host"] == [attack_router.url.removeprefix("http://")]
    for name in ("x-user-id", "x-user-scopes", "forwarded", "x-real-ip", "x-gray-target"):
        assert name not in received, name
    assert response.headers["x-gray-target"] == "monolith"


def test_trusted_proxy_chain_kept(limits_router: RecordingRouter, forge: Forge) -> None:
    mark = limits_router.monolith.count()
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport, timeout=5) as client:
        response = client.get(
            f"{limits_router.url}/orders",
            headers={
                **bearer(forge),
                "X-Forwarded-For": "198.51.100.4",
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "shop.example",
            },
        )

    assert response.status_code == 200
    received = limits_router.monolith.since(mark)[0].headers
    assert received["x-forwarded-for"] == ["198.51.100.4, 127.0.0.2"]
    assert received["x-forwarded-proto"] == ["https"]
    assert received["x-forwarded-host"] == ["shop.example"]


def test_untrusted_peer_chain_dropped(limits_router: RecordingRouter, forge: Forge) -> None:
    mark = limits_router.monolith.count()
    headers = {**bearer(forge), "X-Forwarded-For": "198.51.100.4", "X-Forwarded-Proto": "https"}

    response = httpx.get(f"{limits_router.url}/orders", headers=headers, timeout=5)

    assert response.status_code == 200
    received = limits_router.monolith.since(mark)[0].headers
    assert received["x-forwarded-for"] == ["127.0.0.1"]
    assert received["x-forwarded-proto"] == ["http"]


def test_no_shared_cookie_jar(attack_router: RecordingRouter, forge: Forge) -> None:
    mark = attack_router.monolith.count()
    alice = {"Authorization": f"Bearer {forge.token(sub='alice', username='alice')}"}

    first = httpx.get(f"{attack_router.url}/products/cookies", headers=alice, timeout=5)
    second = httpx.get(f"{attack_router.url}/orders", headers=bearer(forge), timeout=5)

    assert first.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert second.status_code == 200
    received = attack_router.monolith.since(mark)
    assert [r.path for r in received] == ["/products/cookies", "/orders"]
    assert "cookie" not in received[1].headers


def test_gzip_body_intact(attack_router: RecordingRouter, forge: Forge) -> None:
    headers = {**bearer(forge), "Accept-Encoding": "gzip"}
    with httpx.stream(
        "GET", f"{attack_router.url}/products/gzip", headers=headers, timeout=5
    ) as response:
        raw = b"".join(response.iter_raw())

    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(raw)
    assert json.loads(gzip.decompress(raw)) == {"server": "monolith", "gzip": True}


def test_no_content_passes(attack_router: RecordingRouter, forge: Forge) -> None:
    response = raw_http(
        attack_router.url, request_bytes("GET", "/products/empty", bearer(forge))
    )

    assert response.status == 204
    assert response.body == b""
    assert "content-length" not in response.headers


def test_text_body_passes(attack_router: RecordingRouter, forge: Forge) -> None:
    response = httpx.get(f"{attack_router.url}/products/text", headers=bearer(forge), timeout=5)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "plain text, not JSON\n"
    assert int(response.headers["content-length"]) == len(response.content)


def test_chunked_body_streams(attack_router: RecordingRouter, forge: Forge) -> None:
    response = raw_http(
        attack_router.url, request_bytes("GET", "/products/chunked", bearer(forge))
    )

    assert response.status == 200
    assert response.headers["transfer-encoding"] == ["chunked"]
    assert b"".join(
        part for index, part in enumerate(response.body.split(b"\r\n")) if index % 2
    ) == b"".join(f"chunk-{index};".encode() for index in range(5))


def test_request_body_forwarded_with_length(
    attack_router: RecordingRouter, forge: Forge
) -> None:
    mark = attack_router.monolith.count()
    chunks = (part for part in (b'{"items": ', b"[]}"))

    response = httpx.post(
        f"{attack_router.url}/orders", headers=bearer(forge), content=chunks, timeout=5
    )

    assert response.status_code == 200
    received = attack_router.monolith.since(mark)[0]
    assert received.body == b'{"items": []}'
    assert received.headers["content-length"] == ["13"]
    assert "transfer-encoding" not in received.headers


def test_slow_upstream_504(attack_router: RecordingRouter, forge: Forge) -> None:
    started = time.monotonic()
    response = httpx.get(f"{attack_router.url}/orders/slow", headers=bearer(forge), timeout=10)

    assert response.status_code == 504
    assert response.json()["error"] == "gateway_timeout"
    assert time.monotonic() - started < 2.5


def test_slow_body_408(limits_router: RecordingRouter, forge: Forge) -> None:
    mark = limits_router.monolith.count(), limits_router.cqrs.count()
    headers = {**bearer(forge), "Content-Length": "100"}
    started = time.monotonic()

    response = raw_http(
        limits_router.url,
        request_bytes("POST", "/orders", headers, b"only ten b", close=False),
        source="127.0.0.10",
    )

    assert response.status == 408
    assert response.json()["error"] == "request_timeout"
    assert response.closed
    assert time.monotonic() - started < 3
    assert limits_router.upstream_since(*mark) == []


def test_rate_limit_429(limits_router: RecordingRouter, forge: Forge) -> None:
    mark = limits_router.monolith.count()
    transport = httpx.HTTPTransport(local_address="127.0.0.9")
    with httpx.Client(transport=transport, timeout=5) as client:
        statuses = [
            client.get(f"{limits_router.url}/orders", headers=bearer(forge)).status_code
            for _ in range(8)
        ]
        limited = client.get(f"{limits_router.url}/orders", headers=bearer(forge))
        probe = client.get(f"{limits_router.url}/healthz")

    assert statuses[:5] == [200] * 5
    assert 429 in statuses[5:]
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert probe.status_code == 200
    assert limits_router.monolith.count() - mark == statuses.count(200)


@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_both_parsers_reject_smuggling(
    security_platform: SecurityPlatform, forge: Forge, tmp_path: Path, parser: str
) -> None:
    """Whichever HTTP parser uvicorn runs, a request with Content-Length and Transfer-Encoding
    gets 400 and a closed connection: httptools rejects it itself, and under h11 the router
    does."""
    upstream = Recorder(f"upstream-{parser}")
    upstream.start()
    rules_file = tmp_path / "rules.yaml"
    shutil.copyfile(DEFAULT_RULES_FILE, rules_file)
    settings = Settings(
        rules_file=rules_file, monolith_url=upstream.url, cqrs_url=upstream.url,
        token_issuer=security_platform.issuer,
        jwks_url=f"{security_platform.url('auth')}/.well-known/jwks.json",
        redis_url=security_platform.redis_url,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, http=parser, log_config=None,
        lifespan="on", proxy_headers=False,
    ))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10, what=f"uvicorn with {parser}")
        url = f"http://127.0.0.1:{port}"
        smuggled = (
            "POST /orders HTTP/1.1\r\nHost: router.test\r\n"
            f"Authorization: Bearer {forge.token()}\r\n"
            "Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\nGET /orders/smuggled HTTP/1.1\r\n\r\n"
        ).encode()
        response = raw_http(url, smuggled)
        control = raw_http(url, request_bytes("GET", "/orders", bearer(forge)))
    finally:
        server.should_exit = True
        thread.join(10)
        upstream.stop()

    assert response.status == 400
    assert response.closed
    assert control.status == 200
    assert [r.path for r in upstream.since(0)] == ["/orders"]
