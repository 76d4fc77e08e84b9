"""End-to-end fixtures: the whole platform, reached over HTTP and Redis like a client reaches it.

By default the local runner starts every process as a real uvicorn process on free loopback ports,
with its own embedded Redis and SQLite files in a temporary folder. With `E2E_BASE_URL` set, the
tests run against a stack that is already running (the compose stack or a cluster) instead:

- `E2E_BASE_URL`: the router; setting it selects this mode.
- `E2E_AUTH_URL`: the auth server; required in this mode.
- `E2E_MONOLITH_URL`, `E2E_CQRS_URL`: each service directly; tests calling one skip without it.
- `E2E_REDIS_URL`: the stack's Redis; tests that read streams or the read model skip without it.
- `E2E_RULES_FILE`: the router's rules file, writable from here; the reload test skips without it.
- `E2E_SIGNING_KEY_FILE`: the auth server's private key; tests that sign tokens skip without it.
- `E2E_TOKEN_ISSUER`: the `iss` the stack requires; by default that of a token the stack issues.

The stack must run in development mode, because the tests log in as the demo users and the
development clients. Tests that need the local processes themselves (SQLite files, stopping a
worker) take the `local_platform` fixture, which skips them against an external stack.
"""

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis

from services.cli.runner import LocalPlatform, PlatformConfig
from tests.conftest import free_port

DEMO_PASSWORD = "demo-pass"
REPLICATION_TIMEOUT_SECONDS = 15.0

EXTERNAL_STACK = bool(os.environ.get("E2E_BASE_URL"))
EXTERNAL_STACK_REASON = (
    "needs the local processes themselves (their files, or stopping one), and E2E_BASE_URL "
    "selects an external stack"
)
# The variable that gives each directly reached service's URL in external mode.
URL_VARIABLES = {
    "router": "E2E_BASE_URL",
    "auth": "E2E_AUTH_URL",
    "monolith": "E2E_MONOLITH_URL",
    "cqrs": "E2E_CQRS_URL",
}


@dataclass(kw_only=True)
class Platform:
    """The platform under test. A test that needs a part the stack does not expose skips."""

    urls: dict[str, str]
    redis_url: str | None = None
    rules_path: Path | None = None
    signing_key_path: Path | None = None
    issuer_override: str | None = None

    def url(self, service: str) -> str:
        if service not in self.urls:
            pytest.skip(
                f"the {service} service is not reachable directly: set {URL_VARIABLES[service]}"
            )
        return self.urls[service]

    @property
    def rules_file(self) -> Path:
        if self.rules_path is None:
            pytest.skip("the router's rules file is not reachable: set E2E_RULES_FILE")
        return self.rules_path

    def redis(self) -> "redis.Redis[str]":
        if self.redis_url is None:
            pytest.skip("the stack's Redis is not reachable: set E2E_REDIS_URL")
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def signing_key_pem(self) -> bytes:
        if self.signing_key_path is None:
            pytest.skip("the auth server's signing key is not readable: set E2E_SIGNING_KEY_FILE")
        return self.signing_key_path.read_bytes()

    @functools.cached_property
    def issuer(self) -> str:
        """The `iss` every service requires: the override, or that of a freshly issued token."""
        if self.issuer_override:
            return self.issuer_override
        claims = jwt.decode(self.token("bob"), options={"verify_signature": False})
        return str(claims["iss"])

    def token(self, username: str, *, scope: str | None = None) -> str:
        form = {"grant_type": "password", "username": username, "password": DEMO_PASSWORD}
        if scope is not None:
            form["scope"] = scope
        response = httpx.post(f"{self.url('auth')}/token", data=form, timeout=10)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def client_token(self, client_id: str, secret: str) -> str:
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        response = httpx.post(f"{self.url('auth')}/token", data=form, timeout=10)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


@dataclass(kw_only=True)
class LocalStack(Platform):
    """The platform as processes of the local runner, with their files under `data_dir`."""

    runner: LocalPlatform
    data_dir: Path


def wait_for(
    check: Callable[[], Any],
    *,
    timeout: float = REPLICATION_TIMEOUT_SECONDS,
    what: str = "condition",
) -> Any:
    """Poll `check` until it returns a truthy value, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def external_platform(environ: Mapping[str, str]) -> Platform:
    """Build the platform from the `E2E_*` variables; exit with a usage error when one is wrong."""
    if not environ.get("E2E_AUTH_URL"):
        pytest.exit(
            "E2E_BASE_URL is set but E2E_AUTH_URL is not; set it to the auth server's URL as "
            "reached from this machine.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )

    def existing_file(variable: str) -> Path | None:
        value = environ.get(variable)
        if not value:
            return None
        if not Path(value).is_file():
            pytest.exit(
                f"{variable}={value!r} is not a file; point it at the file or unset it.",
                returncode=pytest.ExitCode.USAGE_ERROR,
            )
        return Path(value)

    return Platform(
        urls={
            service: environ[variable].rstrip("/")
            for service, variable in URL_VARIABLES.items()
            if environ.get(variable)
        },
        redis_url=environ.get("E2E_REDIS_URL") or None,
        rules_path=existing_file("E2E_RULES_FILE"),
        signing_key_path=existing_file("E2E_SIGNING_KEY_FILE"),
        issuer_override=environ.get("E2E_TOKEN_ISSUER") or None,
    )


@contextlib.contextmanager
def local_stack(
    data_dir: Path, *, extra_env: Mapping[str, str] | None = None, supervise: bool = True
) -> Iterator[LocalStack]:
    """Start every process with the local runner and stop them all on exit.

    `extra_env` adds settings to every process. With `supervise`, a background thread restarts
    processes that die, as `ztcqrs up` does.
    """
    config = PlatformConfig(
        data_dir=data_dir,
        ports={name: free_port() for name in ("auth", "monolith", "cqrs", "router")},
        redis_port=free_port(),
        extra_env={
            "ROUTER_RULES_POLL_SECONDS": "0.2", "CQRS_CLAIM_IDLE_MS": "2000", **(extra_env or {})
        },
    )
    runner = LocalPlatform(config)
    runner.start()
    stop_supervising = threading.Event()
    supervisor = threading.Thread(target=runner.supervise, args=(stop_supervising,), daemon=True)
    if supervise:
        supervisor.start()
    try:
        yield LocalStack(
            urls={service: config.url(service) for service in URL_VARIABLES},
            redis_url=runner.redis_url,
            rules_path=runner.rules_file,
            signing_key_path=data_dir / "keys" / "signing-key.pem",
            runner=runner,
            data_dir=data_dir,
        )
    finally:
        stop_supervising.set()
        if supervise:
            supervisor.join()
        runner.stop()


def wait_until_serving(platform: Platform) -> None:
    """Wait until the demo catalogue reaches the CQRS side, where the router sends alice."""
    headers = {"Authorization": f"Bearer {platform.token('alice')}"}
    wait_for(
        lambda: (
            httpx.get(f"{platform.url('router')}/products", headers=headers, timeout=5)
            .json()
            .get("products")
        ),
        what="the demo catalogue to reach the CQRS side",
    )


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    if EXTERNAL_STACK:
        stack = external_platform(os.environ)
        wait_until_serving(stack)
        yield stack
        return
    with local_stack(tmp_path_factory.mktemp("platform")) as local:
        wait_until_serving(local)
        yield local


@pytest.fixture
def local_platform(platform: Platform) -> LocalStack:
    """The platform as local processes; skips the test against an external stack."""
    if not isinstance(platform, LocalStack):
        pytest.skip(EXTERNAL_STACK_REASON)
    return platform


@pytest.fixture(scope="session")
def alice(platform: Platform) -> dict[str, str]:
    return {"Authorization": f"Bearer {platform.token('alice')}"}


@pytest.fixture(scope="session")
def bob(platform: Platform) -> dict[str, str]:
    return {"Authorization": f"Bearer {platform.token('bob')}"}
