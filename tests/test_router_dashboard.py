"""The router's status page, loaded in a real headless Chromium against a real router.

The browser is Debian's chromium (`apt-get install -y chromium`), driven by Playwright without
Playwright's own browser builds. The page is saved to `test-artifacts/dashboard.png`.
"""

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from playwright.async_api import ConsoleMessage, Request, async_playwright

from services.router.dashboard import render_dashboard
from services.shared.migration_health import RECONCILE_LAST_KEY
from services.shared.names import CDC_STREAM, dead_letter_stream
from tests.conftest import SigningKey
from tests.test_router_proxy import StandIn, router_settings, running_router

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WAIT_SECONDS = 10.0
# A folder name that is HTML; the page shows the rules file path, so it must escape it.
HOSTILE_NAME = "rules <img src=x onerror=alert(1)>"

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
    await trip_on_drift(router, redis_url, user)
    # Wait for the guard loop to flush this process's split counts to Redis.
    await asyncio.sleep(0.5)
    status = (await router.get("/_gray/status", headers=admin)).json()
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
            version_text = await page.inner_text("#rules-version")
            body_text = await page.inner_text("body")
            bars = await page.locator("#split-chart rect").count()
            chart_count = await page.locator("svg#split-chart").count()
            hostile_images = await page.locator("img").count()
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
    assert chart_count == 1
    assert bars >= 2
    assert "canary" in body_text
    assert "Conflicts\n2" in body_text or "Conflicts\t2" in body_text
    assert HOSTILE_NAME in body_text
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
        "guard": {"tripped": True, "threshold": hostile, "value": 1, "limit": 0},
        "health": None,
        "split": {"bucket_seconds": 10, "buckets": [], "error": hostile},
    }

    page = render_dashboard(status, phase=hostile)

    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
