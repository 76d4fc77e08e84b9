"""Sync lag and throughput through the real platform, started as `ztcqrs up` starts it.

- Monolith commit -> read model: orders are committed straight into the monolith's SQLite file at
  a fixed rate (the monolith's own insert, so its triggers fill the change log), and each order is
  seen the moment the projector writes its `rm:order:<id>` hash, through Redis keyspace
  notifications on those keys.
- CQRS command -> monolith row: `POST /commands/orders` at a fixed rate; from the 201 answer until
  the row is in the monolith's SQLite file, found by polling the file every 2 ms.
- Throughput: with the CDC relay stopped, a backlog of orders is inserted into the monolith; the
  relay is started again and the drain is timed from the stream id of the first entry it appends
  (the append time in ms) until every order is in the CQRS write model (polled with COUNT) and in
  the read model (the user's order index, polled with ZCARD). The backlog keeps the insert's own
  speed out of the figure, so it is the pipeline's rate: relay, ingest and projection.
"""

import asyncio
import contextlib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from services.cli.runner import LocalPlatform, PlatformConfig
from services.monolith.schema import orders as orders_table
from services.monolith.store import insert_order
from services.shared.clock import utc_now
from services.shared.database import create_sqlite_engine
from services.shared.domain import OrderPublic
from services.shared.names import CDC_STREAM, order_key, user_orders_key

from .common import QUICK, free_port, percentile, process_tree_cpu_seconds, say

LAG_RATE = 500  # commits per second
LAG_SECONDS = 5 if QUICK else 60
COMMAND_RATE = 100
COMMAND_SECONDS = 5 if QUICK else 30
BULK_ORDERS = 3_000 if QUICK else 30_000
BULK_BATCH = 500
# How long the last changes of a run may take to arrive before they count as lost.
DRAIN_SECONDS = 15.0
POLL_SECONDS = 0.002


@dataclass
class LagRun:
    latencies_ms: list[float] = field(default_factory=list)
    sent: int = 0
    missing: int = 0
    achieved_rate: float = 0.0
    # CPU of every platform process (not Redis, not the benchmark) per change sent, from the
    # first write until the last change arrived, idle polling included.
    cpu_ms_per_change: float = float("nan")

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 0.99)


def start_platform(folder: Path, redis_url: str) -> LocalPlatform:
    config = PlatformConfig(
        data_dir=folder,
        ports={name: free_port() for name in ("auth", "monolith", "cqrs", "router")},
        redis_url=redis_url,
    )
    platform = LocalPlatform(config)
    platform.start()
    return platform


def platform_cpu_seconds(platform: LocalPlatform) -> float:
    """Return the CPU time used so far by every process that the platform started."""
    return sum(
        process_tree_cpu_seconds(process.popen.pid)
        for process in platform.processes.values()
        if process.popen is not None
    )


def new_order(user_id: str) -> OrderPublic:
    now = utc_now()
    return OrderPublic.model_validate({
        "id": f"bench-{uuid.uuid4().hex}", "user_id": user_id,
        "items": [{"product_id": "prod-keyboard", "quantity": 1, "unit_price": 4999}],
        "total_amount": 4999, "status": "pending", "version": 1,
        "created_at": now, "updated_at": now,
    })


class ReadModelWatch:
    """Records when each `rm:order:<id>` hash is first written, from keyspace notifications."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        # K: keyspace channel, h: hash commands. The projector writes each order with HSET.
        self.client.config_set("notify-keyspace-events", "Kh")
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"__keyspace@0__:{order_key('bench-*')}")
        self._prefix_length = len(f"__keyspace@0__:{order_key('')}")
        self._thread = threading.Thread(target=self._listen, name="read-model-watch", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message is None:
                continue
            now = time.perf_counter()
            order_id = message["channel"].decode()[self._prefix_length:]
            self.seen.setdefault(order_id, now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self.client.close()


def commit_to_read_model(platform: LocalPlatform, watch: ReadModelWatch) -> LagRun:
    """Commit LAG_RATE orders a second for LAG_SECONDS into the monolith; time each to the read
    model."""
    engine = create_sqlite_engine(platform.config.data_dir / "monolith.db")
    committed: dict[str, float] = {}
    total = LAG_RATE * LAG_SECONDS
    cpu_before = platform_cpu_seconds(platform)
    started = time.perf_counter()
    try:
        for index in range(total):
            due = started + index / LAG_RATE
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            order = new_order("bench-lag")
            with engine.begin() as connection:
                insert_order(connection, order)
            committed[order.id] = time.perf_counter()
    finally:
        engine.dispose()
    elapsed = time.perf_counter() - started
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline and any(key not in watch.seen for key in committed):
        time.sleep(0.1)
    cpu_ms = (platform_cpu_seconds(platform) - cpu_before) * 1000
    run = LagRun(sent=total, achieved_rate=total / elapsed, cpu_ms_per_change=cpu_ms / total)
    for order_id, at in committed.items():
        seen = watch.seen.get(order_id)
        if seen is None:
            run.missing += 1
        else:
            run.latencies_ms.append(max(0.0, seen - at) * 1000)
    return run


def user_token(platform: LocalPlatform, username: str) -> str:
    response = httpx.post(
        f"{platform.config.url('auth')}/token",
        data={"grant_type": "password", "username": username, "password": "demo-pass"},
        timeout=10,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


class MonolithRowWatch:
    """Polls the monolith's SQLite file for the awaited order ids every POLL_SECONDS."""

    def __init__(self, database: Path) -> None:
        self.database = database
        self.awaited: set[str] = set()
        self.seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="monolith-watch", daemon=True)
        self._thread.start()

    def expect(self, order_id: str) -> None:
        with self._lock:
            self.awaited.add(order_id)

    def _poll(self) -> None:
        connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            while not self._stop.wait(POLL_SECONDS):
                with self._lock:
                    awaited = list(self.awaited)
                if not awaited:
                    continue
                marks = ",".join("?" * len(awaited))
                rows = connection.execute(
                    f"SELECT id FROM {orders_table.name} WHERE id IN ({marks})",  # noqa: S608
                    awaited,
                ).fetchall()
                now = time.perf_counter()
                with self._lock:
                    for (order_id,) in rows:
                        self.seen.setdefault(order_id, now)
                        self.awaited.discard(order_id)
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


async def _send_commands(
    cqrs_url: str, token: str, watch: MonolithRowWatch
) -> tuple[dict[str, float], int]:
    answered: dict[str, float] = {}
    failures = 0
    headers = {"Authorization": f"Bearer {token}"}
    body = {"items": [{"product_id": "prod-mouse", "quantity": 1}]}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=cqrs_url, timeout=10, limits=limits) as client:

        async def one() -> None:
            nonlocal failures
            response = await client.post("/commands/orders", json=body, headers=headers)
            if response.status_code != 201:
                failures += 1
                say(f"command answered {response.status_code}: {response.text[:200]}")
                return
            order_id = str(response.json()["id"])
            answered[order_id] = time.perf_counter()
            watch.expect(order_id)

        tasks = []
        started = time.perf_counter()
        for index in range(COMMAND_RATE * COMMAND_SECONDS):
            pause = started + index / COMMAND_RATE - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return answered, failures


def command_to_monolith(platform: LocalPlatform) -> LagRun:
    token = user_token(platform, "bob")
    watch = MonolithRowWatch(platform.config.data_dir / "monolith.db")
    cpu_before = platform_cpu_seconds(platform)
    try:
        started = time.perf_counter()
        answered, failures = asyncio.run(
            _send_commands(platform.config.url("cqrs"), token, watch)
        )
        elapsed = time.perf_counter() - started
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline and any(key not in watch.seen for key in answered):
            time.sleep(0.05)
    finally:
        watch.close()
    sent = len(answered) + failures
    cpu_ms = (platform_cpu_seconds(platform) - cpu_before) * 1000
    run = LagRun(sent=sent, missing=failures, achieved_rate=sent / elapsed,
                 cpu_ms_per_change=cpu_ms / max(sent, 1))
    for order_id, at in answered.items():
        seen = watch.seen.get(order_id)
        if seen is None:
            run.missing += 1
        else:
            run.latencies_ms.append(max(0.0, seen - at) * 1000)
    return run


@contextlib.contextmanager
def _cqrs_reader(platform: LocalPlatform) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(f"file:{platform.config.data_dir / 'cqrs.db'}?mode=ro", uri=True)
    try:
        yield connection
    finally:
        connection.close()


def bulk_throughput(platform: LocalPlatform, redis_url: str) -> tuple[float, float, int]:
    """Insert BULK_ORDERS orders for one new user; return (write-model changes/s, read-model
    changes/s, orders still missing after the drain)."""
    user = f"bench-bulk-{uuid.uuid4().hex[:8]}"
    engine = create_sqlite_engine(platform.config.data_dir / "monolith.db")
    client = redis.Redis.from_url(redis_url)
    relay = platform.processes["cdc-relay"]
    write_done = read_done = None
    try:
        relay.stop()
        inserting = time.perf_counter()
        for first in range(0, BULK_ORDERS, BULK_BATCH):
            with engine.begin() as connection:
                for _ in range(min(BULK_BATCH, BULK_ORDERS - first)):
                    insert_order(connection, new_order(user))
        say(f"bulk insert of {BULK_ORDERS} orders took {time.perf_counter() - inserting:.1f} s")
        last_before = _last_entry_id(client)
        relay.start()
        started = _first_append_time(client, last_before)
        deadline = time.monotonic() + DRAIN_SECONDS + BULK_ORDERS / 1000
        with _cqrs_reader(platform) as cqrs:
            while time.monotonic() < deadline and (write_done is None or read_done is None):
                now = time.time()
                if write_done is None:
                    count = cqrs.execute(
                        "SELECT COUNT(*) FROM orders WHERE user_id = ?", (user,)
                    ).fetchone()[0]
                    if count >= BULK_ORDERS:
                        write_done = now
                if read_done is None and int(client.zcard(user_orders_key(user))) >= BULK_ORDERS:
                    read_done = now
                time.sleep(0.02)
            in_read_model = int(client.zcard(user_orders_key(user)))
    finally:
        if not relay.alive:
            relay.start()
        engine.dispose()
        client.close()
    missing = BULK_ORDERS - in_read_model

    def rate(done: float | None) -> float:
        return BULK_ORDERS / (done - started) if done is not None else float("nan")

    return rate(write_done), rate(read_done), missing


def _last_entry_id(client: redis.Redis) -> str:
    entries = client.xrevrange(CDC_STREAM, count=1)
    return _entry_id(entries[0][0]) if entries else "0-0"


def _entry_id(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _first_append_time(client: redis.Redis, after_id: str) -> float:
    """Wait for the first `cdc.monolith` entry after `after_id`; return its append time (epoch s).

    A stream entry id starts with the milliseconds at which Redis appended it.
    """
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        entries = client.xrange(CDC_STREAM, min=f"({after_id}", count=1)
        if entries:
            return int(_entry_id(entries[0][0]).split("-")[0]) / 1000
        time.sleep(0.005)
    raise RuntimeError(f"the restarted CDC relay appended nothing within {DRAIN_SECONDS} s")
