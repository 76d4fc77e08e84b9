"""Fixtures of the security suite: the whole platform as real processes, plus routers of our own
in front of recording upstreams, and helpers that forge tokens and send raw HTTP.

The platform (auth, monolith, CQRS service, workers, router, Redis) runs under the local runner
exactly as `ztcqrs up` starts it. The recording routers are more `ztcqrs serve router` processes
wired to the same auth server and Redis, but with stand-in upstreams that record every request
they receive. That is how a test proves that a stopped request never reached an upstream.
"""

import asyncio
import base64
import contextlib
import gzip
import hashlib
import hmac
import json
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from services.cli.runner import ManagedProcess
from services.router.settings import DEFAULT_RULES_FILE
from tests.conftest import free_port
from tests.e2e.conftest import LocalStack, local_stack, wait_for

AUDIENCE = "ztcqrs-api"
READY_TIMEOUT_SECONDS = 30.0


# Recording upstreams


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes


@dataclass
class Recorder:
    """A stand-in upstream on its own thread and event loop that records every request.

    A few paths return special responses, so tests can check that they pass the router intact:
    `/products/gzip`, `/products/empty` (204), `/products/text`, `/products/chunked`,
    `/products/cookies` (repeated Set-Cookie) and `/orders/slow` (responds after 3 s).
    """

    name: str
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Event = field(default_factory=threading.Event)
    _stop: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Recorded]:
        with self._lock:
            return list(self.requests[mark:])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        with self._lock:
            self.requests.append(Recorded(request.method, request.raw_path, headers, body))
        return await self._respond(request, body)

    async def _respond(self, request: web.Request, body: bytes) -> web.StreamResponse:
        path = request.path
        if path == "/orders/slow":
            await asyncio.sleep(3)
        if path == "/products/gzip":
            payload = gzip.compress(json.dumps({"server": self.name, "gzip": True}).encode())
            return web.Response(
                body=payload,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        if path == "/products/empty":
            return web.Response(status=204)
        if path == "/products/text":
            return web.Response(text="plain text, not JSON\n", content_type="text/plain")
        if path == "/products/chunked":
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for index in range(5):
                await response.write(f"chunk-{index};".encode())
                await asyncio.sleep(0.01)
            await response.write_eof()
            return response
        if path == "/products/cookies":
            response = web.Response(text="{}", content_type="application/json")
            response.headers.add("Set-Cookie", "a=1; Path=/")
            response.headers.add("Set-Cookie", "b=2; Path=/")
            response.headers.add("X-Upstream-Hop", "x")
            response.headers.add("Connection", "X-Upstream-Hop")
            return response
        echo = {"server": self.name, "path": request.raw_path, "body_bytes": len(body)}
        return web.json_response(echo)

    def start(self) -> None:
        thread = threading.Thread(target=self._serve, name=f"recorder-{self.name}", daemon=True)
        thread.start()
        assert self._ready.wait(10), f"recorder {self.name} did not start"

    def _serve(self) -> None:
        async def main() -> None:
            stop = asyncio.Event()
            self._stop = (asyncio.get_running_loop(), stop)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self.port = free_port()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def stop(self) -> None:
        if self._stop is not None:
            loop, stop = self._stop
            loop.call_soon_threadsafe(stop.set)


# Processes


def wait_ready(process: ManagedProcess, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    assert process.ready_url is not None

    def ready() -> bool:
        assert process.alive, f"{process.name} exited; its log ends with:\n{process.log_tail()}"
        try:
            return httpx.get(process.ready_url or "", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=timeout, what=f"{process.name} to be ready")


def start_service(
    name: str, service: str, env: dict[str, str], logs: Path, port: int
) -> ManagedProcess:
    """Start `ztcqrs serve <service>` as a real process and wait until it is ready."""
    process = ManagedProcess(
        name,
        [sys.executable, "-m", "services.cli", "serve", service],
        env,
        logs / f"{name}.log",
        f"http://127.0.0.1:{port}/readyz",
    )
    process.start()
    try:
        wait_ready(process)
    except BaseException:
        process.stop()
        raise
    return process


@dataclass
class RecordingRouter:
    """A router process whose monolith and CQRS upstreams are recorders."""

    url: str
    port: int
    process: ManagedProcess
    monolith: Recorder
    cqrs: Recorder
    rules_file: Path

    def upstream_count(self) -> int:
        return self.monolith.count() + self.cqrs.count()

    def upstream_since(self, mark: int, cqrs_mark: int) -> list[Recorded]:
        return self.monolith.since(mark) + self.cqrs.since(cqrs_mark)


@contextlib.contextmanager
def recording_router(
    base_env: dict[str, str], folder: Path, **settings: str
) -> Iterator[RecordingRouter]:
    """Run a router process in front of two recorders; `settings` adds `ROUTER_*` variables."""
    folder.mkdir(parents=True, exist_ok=True)
    rules_file = folder / "rules.yaml"
    shutil.copyfile(DEFAULT_RULES_FILE, rules_file)
    monolith, cqrs = Recorder("monolith"), Recorder("cqrs")
    monolith.start()
    cqrs.start()
    port = free_port()
    env = {
        **base_env,
        "ROUTER_PORT": str(port),
        "ROUTER_MONOLITH_URL": monolith.url,
        "ROUTER_CQRS_URL": cqrs.url,
        "ROUTER_RULES_FILE": str(rules_file),
        "ROUTER_RULES_POLL_SECONDS": "0.2",
        # One process, so a status read and the next request see the same rules and counters;
        # test_router_processes.py runs several.
        "ROUTER_PROCESSES": "1",
        **settings,
    }
    try:
        process = start_service(folder.name, "router", env, folder, port)
        try:
            yield RecordingRouter(
                f"http://127.0.0.1:{port}", port, process, monolith, cqrs, rules_file
            )
        finally:
            process.stop()
    finally:
        monolith.stop()
        cqrs.stop()


# The platform


# The local runner's stack, as the end-to-end tests see it.
SecurityPlatform = LocalStack


def forge_for(platform: SecurityPlatform) -> "Forge":
    """A forger with the platform's own signing key, its current `kid` and its issuer."""
    key = serialization.load_pem_private_key(platform.signing_key_pem(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    jwks = httpx.get(f"{platform.url('auth')}/.well-known/jwks.json", timeout=5).json()
    return Forge(key, jwks["keys"][0]["kid"], platform.url("auth"))


@pytest.fixture(scope="session")
def security_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecurityPlatform]:
    data_dir = tmp_path_factory.mktemp("security-platform")
    # Unsupervised: a test that kills a process expects it to stay down.
    with local_stack(
        data_dir, extra_env={"AUTH_KEYS_RELOAD_SECONDS": "0.2"}, supervise=False
    ) as stack:
        yield stack


@pytest.fixture(scope="session")
def attack_router(
    security_platform: SecurityPlatform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RecordingRouter]:
    """The router under attack: small body limit, short upstream timeout, no rate limit."""
    with recording_router(
        security_platform.runner.child_env(),
        tmp_path_factory.mktemp("attack-router"),
        ROUTER_MAX_BODY_BYTES="4096",
        ROUTER_UPSTREAM_TIMEOUT_SECONDS="1",
        ROUTER_RATE_LIMIT_PER_SECOND="0",
    ) as router:
        yield router


@pytest.fixture(scope="session")
def limits_router(
    security_platform: SecurityPlatform, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RecordingRouter]:
    """A router with a low rate limit and a 1 s body timeout that trusts 127.0.0.2 as a proxy."""
    with recording_router(
        security_platform.runner.child_env(),
        tmp_path_factory.mktemp("limits-router"),
        ROUTER_RATE_LIMIT_PER_SECOND="2",
        ROUTER_RATE_LIMIT_BURST="5",
        ROUTER_TRUSTED_PROXIES="127.0.0.2",
        ROUTER_CLIENT_BODY_TIMEOUT_SECONDS="1",
    ) as router:
        yield router


@pytest.fixture(scope="session")
def forge(security_platform: SecurityPlatform) -> "Forge":
    return forge_for(security_platform)


# Forged tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


@dataclass
class Forge:
    """Signs tokens with the platform's own key, so only the part under test makes them bad."""

    key: rsa.RSAPrivateKey
    kid: str
    issuer: str

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "bob",
            "username": "bob",
            "client_id": "ztcqrs-web",
            "scope": "orders:read orders:write products:read",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def header(self, **overrides: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": "RS256", "typ": "at+jwt", "kid": self.kid}
        header.update(overrides)
        return {name: value for name, value in header.items() if value is not None}

    def token(
        self,
        *,
        header: dict[str, Any] | None = None,
        key: rsa.RSAPrivateKey | None = None,
        algorithm: str = "RS256",
        **claims: Any,
    ) -> str:
        """An RS256 (or `algorithm`) token; a claim or header set to None is left out."""
        fields = self.header(**(header or {}))
        fields.pop("alg", None)
        return jwt.encode(
            self.claims(**claims), key or self.key, algorithm=algorithm, headers=fields
        )

    def signed_raw(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """An RS256 token signed by hand, for claim values that PyJWT refuses to encode."""
        signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    def unsigned(self, alg: str, signature: str = "", **claims: Any) -> str:
        """A token whose header says `alg` (such as "none"), with the given signature text."""
        header = b64url_json(self.header(alg=alg))
        return f"{header}.{b64url_json(self.claims(**claims))}.{signature}"

    def hmac_with(self, secret: bytes, alg: str = "HS256", **claims: Any) -> str:
        """A token MACed with `secret`, as an attacker does with our public key as the secret."""
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        signing_input = f"{b64url_json(self.header(alg=alg))}.{b64url_json(self.claims(**claims))}"
        mac = hmac.new(secret, signing_input.encode(), digest).digest()
        return f"{signing_input}.{b64url(mac)}"

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_pkcs1_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )

    def public_ssh(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )


# Raw HTTP


@dataclass
class RawResponse:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    closed: bool  # the server closed the connection after the response

    def json(self) -> Any:
        return json.loads(self.body)


def raw_http(url: str, request: bytes, *, timeout: float = 5.0, source: str = "") -> RawResponse:
    """Send bytes exactly as given and read the first response, then whether the server closes.

    httpx would normalise the request; attacks need the bytes on the wire to be the ones written.
    """
    host, port = url.removeprefix("http://").split(":")
    source_address = (source, 0) if source else None
    with socket.create_connection((host, int(port)), timeout, source_address) as sock:
        sock.sendall(request)
        data = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            head, separator, rest = data.partition(b"\r\n\r\n")
            if separator and _complete(head, rest):
                # Wait briefly for the close that should follow a rejected request.
                sock.settimeout(0.3)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    length = int(headers.get("content-length", ["-1"])[0])
    if length >= 0:
        body = body[:length]
    return RawResponse(int(status_line.split()[1]), headers, body, closed)


def _complete(head: bytes, rest: bytes) -> bool:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(rest) >= int(value.strip())
    return False


def request_bytes(
    method: str, target: str, headers: dict[str, str], body: bytes = b"", *, close: bool = True
) -> bytes:
    """Build an HTTP/1.1 request. With `close` it sends `Connection: close`, which a test that
    checks whether the server closes the connection on its own must not send."""
    lines = [f"{method} {target} HTTP/1.1", "Host: router.test"]
    if close:
        lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

