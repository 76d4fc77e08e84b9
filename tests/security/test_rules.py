"""Rule expressions cannot run code: an expression that reaches for Python internals is rejected
when the rules load, the last good rules stay in force, and a plain CEL condition works."""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Forge, RecordingRouter, SecurityPlatform

MARKER = Path("/tmp/ztcqrs-rule-expression-ran")

RULES = """\
version: 1
salt: security-test
default_target: monolith
rules:
  - name: expression
    match:
      expr: {expr}
    target: cqrs
  - name: default
    target: monolith
"""

PAYLOADS = [
    "claims.__class__.__mro__[1].__subclasses__()",
    '__import__("os").system("touch /tmp/ztcqrs-rule-expression-ran")',
    "path.__globals__",
    "method.__class__",
    'claims["__class__"]',
    'os.system("touch /tmp/ztcqrs-rule-expression-ran")',
    'getattr(claims, "__dict__")',
    'eval("1")',
    "google.protobuf.Any{}",
    ".claims",
    "size(" * 60 + "path" + ")" * 60,
]



def replace_file(path: Path, content: bytes) -> None:
    """Replace `path` by rename, so the polling router never reads a half-written file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(content)
    os.replace(staging, path)

@pytest.fixture
def rules(attack_router: RecordingRouter) -> Iterator[Path]:
    """The attack router's rules file, put back as it was after the test."""
    original = attack_router.rules_file.read_bytes()
    yield attack_router.rules_file
    replace_file(attack_router.rules_file, original)
    time.sleep(0.6)


def status(router: RecordingRouter, platform: SecurityPlatform) -> dict[str, Any]:
    admin = platform.client_token("ztcqrs-admin", "dev-admin-secret")
    response = httpx.get(
        f"{router.url}/_gray/status", headers={"Authorization": f"Bearer {admin}"}, timeout=5
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_for_status(
    router: RecordingRouter, platform: SecurityPlatform, check: Any
) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        body = status(router, platform)
        if check(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_expression_payload_rejected(
    attack_router: RecordingRouter,
    security_platform: SecurityPlatform,
    forge: Forge,
    rules: Path,
    payload: str,
) -> None:
    before = status(attack_router, security_platform)
    replace_file(rules, RULES.format(expr=json.dumps(payload)).encode())

    after = wait_for_status(
        attack_router, security_platform, lambda body: body["last_error"] != before["last_error"]
    )
    response = httpx.get(
        f"{attack_router.url}/orders",
        headers={"Authorization": f"Bearer {forge.token()}"},
        timeout=5,
    )

    assert after["last_error"] is not None
    assert "match.expr" in after["last_error"]
    assert after["rules_version"] == before["rules_version"]
    assert response.status_code == 200
    assert response.headers["x-gray-rule"] in before["rules"]
    assert not MARKER.exists()


def test_expression_condition_routes(
    attack_router: RecordingRouter,
    security_platform: SecurityPlatform,
    forge: Forge,
    rules: Path,
) -> None:
    expr = '"x-side" in headers && headers["x-side"].exists(v, v == "cqrs") && claims.sub == "bob"'
    replace_file(rules, RULES.format(expr=json.dumps(expr)).encode())
    wait_for_status(
        attack_router, security_platform, lambda body: body["rules"] == ["expression", "default"]
    )
    bob = {"Authorization": f"Bearer {forge.token()}"}
    alice = {"Authorization": f"Bearer {forge.token(sub='alice', username='alice')}"}

    matched = httpx.get(f"{attack_router.url}/orders", headers={**bob, "X-Side": "cqrs"})
    other_user = httpx.get(f"{attack_router.url}/orders", headers={**alice, "X-Side": "cqrs"})
    no_header = httpx.get(f"{attack_router.url}/orders", headers=bob)

    assert matched.headers["x-gray-target"] == "cqrs"
    assert matched.headers["x-gray-rule"] == "expression"
    assert other_user.headers["x-gray-rule"] == "default"
    assert no_header.headers["x-gray-rule"] == "default"
