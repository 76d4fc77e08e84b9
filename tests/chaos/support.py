"""Helpers for the crash and shutdown tests: worker processes and bulk events."""

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.shared.events import Event
from services.shared.names import ORIGIN_MONOLITH
from tests.cqrs_support import product_event


def worker_env(data_dir: Path, redis_url: str, **settings: str) -> dict[str, str]:
    """Return the environment of a worker process on `data_dir` and `redis_url`."""
    return {
        **os.environ,
        "ZTCQRS_DATA_DIR": str(data_dir),
        "REDIS_URL": redis_url,
        "PYTHONUNBUFFERED": "1",
        **settings,
    }


def start_worker(name: str, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `ztcqrs worker <name>` with its output in `log_path`."""
    with log_path.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "worker", name],
            env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )


def order_state(
    order_id: str, *, user_id: str = "alice", version: int = 1, status: str = "pending"
) -> dict[str, Any]:
    """Return a valid public order state of one mouse."""
    return {
        "id": order_id, "user_id": user_id,
        "items": [{"product_id": "prod-mouse", "quantity": 1, "unit_price": 2900}],
        "total_amount": 2900, "status": status, "version": version,
        "created_at": "2026-01-31T12:00:00.000000Z", "updated_at": "2026-01-31T12:00:00.000000Z",
    }


def product_events(count: int) -> list[Event]:
    """Return `count` CDC events, each creating its own product."""
    return [
        product_event(
            {"id": f"prod-{index:05d}", "name": f"Product {index}", "price": index},
            version=1, action="created", origin=ORIGIN_MONOLITH,
        )
        for index in range(count)
    ]


def count_rows(database: Path, query: str) -> int:
    """Run a COUNT query on a SQLite file that may not exist yet; 0 when it does not."""
    if not database.exists():
        return 0
    with sqlite3.connect(database, timeout=30) as connection:
        try:
            return int(connection.execute(query).fetchone()[0])
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return 0
            raise


def wait_until(check: Callable[[], Any], *, timeout: float, condition: str) -> Any:
    """Poll `check` every 20 ms until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {condition}")
        time.sleep(0.02)
