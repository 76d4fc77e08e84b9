"""The router's status page, loaded in a real headless Chromium against a real router.

The browser is Debian's chromium (`apt-get install -y chromium`), driven by Playwright without
Playwright's own browser builds. The page is saved to `test-artifacts/dashboard.png`.
"""

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from playwright.async_api import ConsoleMessage, Request, async_playwright

from services.router.dashboard import render_dashboard
from services.shared.clock import format_timestamp, parse_timestamp
from services.shared.names import (
    CDC_STREAM,
    GATE_PUBLISHED_KEY,
    RECONCILE_LAST_KEY,
    dead_letter_stream,
)
from tests.conftest import SigningKey
from tests.router_support import StandIn, router_settings, running_router

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_SECONDS = 10.0
# A folder name that is HTML; the page shows the rules file path, so it must escape it.
HOSTILE_NAME = "rules <img src=x onerror=alert(1)>"
# A user with a published change that no consumer group applied, so the gate keeps holding them.
WAITING_USER = "bob"

RULES = """\
version: 1
salt: dashboard-test
default_target: monolith
guard:
  check_interval_seconds: 0.1
  thresholds:
    drift_entities: 0
rules:
  - name: products-on-cqrs
    match:
      paths: ["/products/**"]
    target: cqrs
shadow:
  percent: 100
  max_samples: 5
gate:
  enabled: true
"""


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[StandIn, StandIn]]:
    monolith, cqrs = StandIn("monolith"), StandIn("cqrs")
    await monolith.start()
    await cqrs.start()
    yield monolith, cqrs
    await cqrs.stop()
    await monolith.stop()


@pytest.fixture
async def router(
    tmp_path: Path,
    signing_key: SigningKey,
    upstreams: tuple[StandIn, StandIn],
    redis_url: str,
) -> AsyncIterator[httpx.AsyncClient]:
    folder = tmp_path / HOSTILE_NAME
    folder.mkdir()
    rules_file = folder / "rules.yaml"
    rules_file.write_text(RULES)
    monolith, cqrs = upstreams
    settings = router_settings(rules_file, monolith.url, cqrs.url, redis_url=redis_url)
    async with running_router(signing_key, settings) as client:
        yield client


def check_chromium() -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing; run apt-get install -y chromium"


def admin_headers(signing_key: SigningKey) -> dict[str, str]:
    token = signing_key.token("ztcqrs-admin", client_id="ztcqrs-admin", scope="gray:admin")
    return {"Authorization": f"Bearer {token}"}


async def hold_users(
    router: httpx.AsyncClient, redis_url: str, signing_key: SigningKey, user: dict[str, str]
) -> None:
    """Get `user` through the gate, and leave WAITING_USER held behind it.

    `user` has no published change, so the gate holds their first request and allows them once
    its background check has run. Each stand-in returns its own name in the body, so every
    shadow read of /products is a mismatch.
    """
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    store.hset(GATE_PUBLISHED_KEY, WAITING_USER, "1-0")
    store.close()
    waiting = {"Authorization": f"Bearer {signing_key.token(WAITING_USER)}"}
    response = await router.get("/products", headers=waiting)
    assert response.headers["x-gray-target"] == "monolith"

    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        response = await router.get("/products", headers=user)
        if response.headers["x-gray-target"] == "cqrs":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gate did not allow a user without published changes")


async def wait_for_status(
    router: httpx.AsyncClient, admin: dict[str, str], ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll `/_gray/status` until `ready` accepts its body, and return that body."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        status: dict[str, Any] = (await router.get("/_gray/status", headers=admin)).json()
        if ready(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"the status body did not reach the expected state: {status}")


def shadow_and_gate_ready(status: dict[str, Any]) -> bool:
    shadow, gate = status["shadow"], status["gate"]
    return bool(shadow["samples"]) and gate["users_waiting"] == 1


async def trip_on_drift(
    router: httpx.AsyncClient, redis_url: str, user: dict[str, str]
) -> None:
    """Serve some traffic on both targets, then make the guard trip on reconcile drift."""
    for _ in range(4):
        await router.get("/products", headers=user)
    await router.get("/orders", headers=user)
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    store.xadd(dead_letter_stream(CDC_STREAM), {"payload": "{}"})
    store.hset(
        RECONCILE_LAST_KEY,
        mapping={
            "finished_at": repr(time.time()), "missing": 1, "stale": 1, "conflicting": 2,
            "drift_entities": 4, "repaired": 0, "report": "[]", "duration_seconds": "0.2",
        },
    )
    store.close()
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        response = await router.get("/products", headers=user)
        if response.headers["x-gray-rule"] == "guard":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the guard did not trip on drift")


async def test_dashboard_in_chromium(
    router: httpx.AsyncClient, signing_key: SigningKey, redis_url: str
) -> None:
    user = {"Authorization": f"Bearer {signing_key.token('alice')}"}
    admin = admin_headers(signing_key)
    await hold_users(router, redis_url, signing_key, user)
    await trip_on_drift(router, redis_url, user)
    # Wait for the guard loop to flush this process's split counts to Redis.
    await asyncio.sleep(0.5)
    status = await wait_for_status(router, admin, shadow_and_gate_ready)
    base_url = str(router.base_url).rstrip("/")

    check_chromium()
    requested: list[str] = []
    console: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(extra_http_headers=admin)
            page = await context.new_page()

            def record_request(request: Request) -> None:
                requested.append(request.url)

            def record_console(message: ConsoleMessage) -> None:
                console.append(message.text)

            page.on("request", record_request)
            page.on("console", record_console)
            response = await page.goto(f"{base_url}/_gray/dashboard")
            assert response is not None
            headers = await response.all_headers()
            guard_text = await page.inner_text("#guard-state")
            guard_action = await page.inner_text("#guard-action")
            phase_text = await page.inner_text("#phase")
            thresholds_text = await page.inner_text('#guard dt:text-is("Thresholds") + dd')
            version_text = await page.inner_text("#rules-version")
            body_text = await page.inner_text("body")
            bars = await page.locator("#split-chart rect").count()
            chart_count = await page.locator("svg#split-chart").count()
            hostile_images = await page.locator("img").count()
            headings = await page.locator("h2").all_inner_texts()
            shadow_percent = await page.inner_text("#shadow-percent")
            shadow_mismatches = await page.inner_text("#shadow-mismatches")
            shadow_match_share = await page.inner_text("#shadow-match-share")
            sample_header = await page.locator("#shadow-samples th").all_inner_texts()
            first_sample = await page.locator("#shadow-samples tbody tr").first.locator(
                "td"
            ).all_inner_texts()
            sample_rows = await page.locator("#shadow-samples tbody tr").count()
            gate_enabled = await page.inner_text("#gate-enabled")
            gate_held = await page.inner_text("#gate-held")
            gate_waiting = await page.inner_text("#gate-users-waiting")
            background = await page.evaluate(
                "getComputedStyle(document.body).backgroundColor"
            )
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            await browser.close()

    assert response.status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-security-policy"].startswith("default-src 'none';")
    assert version_text == status["rules_version"]
    assert "Tripped" in guard_text
    assert "drift_entities is 4" in guard_text
    assert guard_action in guard_text
    assert "ztcqrs rollout unfreeze lifts the trip" in guard_action
    assert "later run reports drift above the limit" in guard_action
    assert phase_text == status["phase"] == "canary"
    # Times show as the status body's ISO 8601 text.
    assert status["guard"]["tripped_at"] in body_text
    assert status["loaded_at"] in body_text
    assert status["health"]["reconcile"]["finished_at"] in body_text
    assert format_timestamp(parse_timestamp(first_sample[0])) == first_sample[0]
    # Only drift_entities is set, so the error window is not shown.
    assert thresholds_text == "drift_entities 0"
    assert "error_window_seconds" not in body_text
    assert "min_requests" not in body_text
    assert chart_count == 1
    assert bars >= 2
    assert "Conflicts\n2" in body_text or "Conflicts\t2" in body_text
    assert HOSTILE_NAME in body_text
    assert "Shadow reads" in headings
    assert "Recent mismatches" in headings
    assert "Per-user gate" in headings
    assert shadow_percent.startswith("100%")
    assert int(shadow_mismatches) >= 1
    # Every compared read differs in the stand-ins' "server" field.
    assert shadow_match_share == "0.0%"
    assert sample_header == [
        "Time", "Request ID", "Method", "Path", "monolith status", "cqrs status", "Difference",
    ]
    assert 1 <= sample_rows <= 5
    assert first_sample[2] == "GET"
    assert first_sample[3] == "/products"
    assert first_sample[4:6] == ["200", "200"]
    assert "$.server" in first_sample[6]
    assert gate_enabled == "yes"
    assert int(gate_held) >= 2
    assert gate_waiting == str(status["gate"]["users_waiting"])
    assert hostile_images == 0
    # The inline style passed the Content-Security-Policy, so its hash is right.
    assert background == "rgb(246, 247, 249)"
    assert not [text for text in console if "Content Security Policy" in text]
    hosts = {urlsplit(url).hostname for url in requested}
    assert hosts == {"127.0.0.1"}
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 0


async def test_dashboard_requires_admin(
    router: httpx.AsyncClient, signing_key: SigningKey
) -> None:
    anonymous = await router.get("/_gray/dashboard")
    user = await router.get(
        "/_gray/dashboard", headers={"Authorization": f"Bearer {signing_key.token('alice')}"}
    )
    admin = await router.get("/_gray/dashboard", headers=admin_headers(signing_key))

    assert anonymous.status_code == 401
    assert user.status_code == 403
    assert admin.status_code == 200
    assert admin.headers["x-gray-target"] == "router"


def test_dashboard_escapes_status_values() -> None:
    hostile = "<script>alert(1)</script>"
    status: dict[str, Any] = {
        "rules_version": hostile,
        "rules": [hostile],
        "last_error": hostile,
        "guard": {
            "tripped": True, "threshold": hostile, "value": 1, "limit": 0, "tripped_at": hostile,
        },
        "health": None,
        "split": {"bucket_seconds": 10, "buckets": [], "error": hostile},
        "shadow": {
            "percent": 5.0, "matches": 0, "mismatches": 1, "errors": 0, "dropped": 0,
            "in_flight": 0,
            "samples": [{
                "at": hostile, "request_id": hostile, "method": hostile, "path": hostile,
                "monolith": {"status": hostile}, "cqrs": {"status": 200}, "diff": hostile,
            }],
        },
        "gate": {"enabled": True, "held": hostile, "users_waiting": hostile},
    }

    page = render_dashboard({**status, "phase": hostile})

    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 10


def test_dashboard_shadow_match_share() -> None:
    status: dict[str, Any] = {
        "shadow": {"percent": 2.5, "matches": 3, "mismatches": 1, "errors": 5, "dropped": 2},
        "gate": {"enabled": False, "held": 0, "users_waiting": 0},
    }

    page = render_dashboard(status)

    assert '<dd id="shadow-match-share">75.0%</dd>' in page
    assert '<dd id="shadow-percent">2.5% of 2xx GET and HEAD</dd>' in page
    assert '<dd id="gate-enabled">no</dd>' in page
    assert '<td colspan="7" class="muted">none</td>' in page


def test_dashboard_without_compared_reads() -> None:
    page = render_dashboard({"shadow": {"percent": 0.0, "errors": 1}})

    assert '<dd id="shadow-match-share">n/a</dd>' in page
    assert '<dd id="gate-held">n/a</dd>' in page


def thresholds(**limits: float) -> dict[str, Any]:
    """Return the guard's `thresholds` status section with `limits` set and the rest unset."""
    unset = dict.fromkeys(("drift_entities", "lag_seconds", "dead_letters", "cqrs_error_rate"))
    return {**unset, "error_window_seconds": 60, "min_requests": 20, **limits}


def test_dashboard_phase_from_status() -> None:
    page = render_dashboard({"phase": "cutover"})

    assert '<dd id="phase">cutover</dd>' in page


def test_dashboard_without_thresholds() -> None:
    page = render_dashboard({"guard": {"thresholds": thresholds()}})

    assert "<dt>Thresholds</dt><dd>none set</dd>" in page
    assert "error_window_seconds" not in page
    assert "min_requests" not in page


def test_dashboard_error_rate_window() -> None:
    page = render_dashboard(
        {"guard": {"thresholds": thresholds(lag_seconds=30.0, cqrs_error_rate=0.5)}}
    )

    assert (
        "<dt>Thresholds</dt><dd>lag_seconds 30, cqrs_error_rate 0.5 (over the last 60 s, at "
        "least 20 calls)</dd>"
    ) in page


def test_dashboard_times_shown_as_given() -> None:
    guard = {
        "tripped": True, "threshold": "lag_seconds", "value": 40.0, "limit": 30.0,
        "tripped_at": "2025-01-31T12:00:00.250000Z", "reset_at": None,
    }

    page = render_dashboard({"guard": guard})

    assert "<dt>Tripped at</dt><dd>2025-01-31T12:00:00.250000Z</dd>" in page
    assert "<dt>Reset at</dt><dd>never</dd>" in page
    assert "<dt>Last check</dt><dd>never</dd>" in page


@pytest.mark.parametrize(
    ("guard", "expected"),
    [
        (
            {"frozen": True},
            "<code>ztcqrs rollout unfreeze</code> ends the freeze.",
        ),
        (
            {"tripped": True, "threshold": "lag_seconds"},
            "<code>ztcqrs rollout unfreeze</code> lifts the trip once the lag is back under "
            "the limit.",
        ),
        (
            {"tripped": True, "threshold": "dead_letters"},
            "Replay or delete the dead letters with <code>ztcqrs dlq</code>",
        ),
        (
            {"tripped": True, "threshold": "cqrs_error_rate"},
            "Only calls to cqrs after that count",
        ),
        (
            {"tripped": True, "threshold": "health_unreadable"},
            "<code>ztcqrs rollout unfreeze</code> does not lift it.",
        ),
        (
            {"tripped": True, "threshold": "unknown"},
            "lifts the trip once the value is back under the limit.",
        ),
        (
            {"tripped": True, "threshold": "drift_entities", "frozen": True},
            "The rules are also frozen, and <code>ztcqrs rollout unfreeze</code> ends the freeze.",
        ),
    ],
)
def test_dashboard_banner_lift_instructions(guard: dict[str, Any], expected: str) -> None:
    page = render_dashboard({"guard": guard})

    assert '<span id="guard-action" class="guard-action">' in page
    assert expected in page


def test_dashboard_banner_normal_has_no_action() -> None:
    page = render_dashboard({"guard": {"tripped": False, "frozen": False}})

    assert 'data-state="normal"' in page
    assert 'id="guard-action"' not in page
