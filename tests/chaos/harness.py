"""Chaos harness: the whole platform on loopback, client writes through the router, and SIGKILLs.

Writer threads place and change orders through the router: alice (a beta tester) is routed to the
CQRS service and bob to the monolith. Meanwhile the main thread kills a process with SIGKILL at
random moments and starts it again after a random time, cycling through every service and worker
in a shuffled order. Redis is killed and restarted on its data once. Afterwards the harness waits
until every side has caught up, and `Snapshot` records what each side contains.

Only processes that the harness's own runner started are signalled, by pid.
"""

import json
import logging
import os
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from services.cli.runner import LocalPlatform, PlatformConfig
from services.shared.consistency import content_hash
from services.shared.names import APPLY_COUNTS_PREFIX, STREAM_GROUPS, dead_letter_stream
from tests.conftest import free_port

log = logging.getLogger(__name__)

DEMO_PASSWORD = "demo-pass"
KILL_TARGETS = (
    "monolith", "cqrs", "router", "cdc-relay", "outbox-relay", "cdc-ingest", "projector",
    "reverse-sync",
)
USERS = ("alice", "bob")
# Status sequences a writer applies to one order after creating it.
ORDER_PLANS = ((), ("pay",), ("pay", "ship"), ("cancel",), ("pay", "cancel"))
PRODUCTS = ("prod-keyboard", "prod-mouse", "prod-monitor", "prod-cable", "prod-stand")
TOKEN_REFRESH_SECONDS = 60.0
REQUEST_TIMEOUT_SECONDS = 10.0
# Settings that make the platform recover within seconds instead of the production defaults'
# tens of seconds, so the run stays short, and trim acknowledged entries at once. Every writer
# shares one client address, so the router's per-address rate limit is off.
CHAOS_ENV = {
    "CQRS_CLAIM_IDLE_MS": "1500",
    "CQRS_RETRY_MAX_SECONDS": "1",
    "MONOLITH_RELAY_RETRY_MAX_SECONDS": "1",
    "CQRS_RELAY_TRIM_INTERVAL_SECONDS": "1",
    "MONOLITH_RELAY_TRIM_INTERVAL_SECONDS": "1",
    "CQRS_RELAY_STREAM_RETENTION_SECONDS": "0",
    "MONOLITH_RELAY_STREAM_RETENTION_SECONDS": "0",
    "ROUTER_RATE_LIMIT_PER_SECOND": "0",
}
# Processes down at the same time, and the time a restarted worker runs before its next kill.
MAX_DOWN = 2
WORKER_MIN_UPTIME_SECONDS = 1.0
# Maximum pause of a writer between two orders, so that the workers get CPU time too.
THINK_SECONDS = 0.05


@dataclass
class TrackedOrder:
    order_id: str
    user: str
    acknowledged: dict[str, Any]  # the response body of the last acknowledged write
    # An attempt after the last acknowledged write failed without a response, so it may or may
    # not have been applied. The writer leaves such an order alone from then on.
    uncertain: bool = False


@dataclass
class Figures:
    writes_acknowledged: int = 0
    attempts: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    kills: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    # Processes that the harness found dead although it had not killed them since their start.
    unexpected_exits: Counter[str] = field(default_factory=Counter)
    redis_restarts: int = 0
    write_seconds: float = 0.0
    converge_seconds: float = 0.0
    internal_errors: list[str] = field(default_factory=list)


class Token:
    """A user's access token from the password grant, renewed every minute."""

    def __init__(self, auth_url: str, username: str) -> None:
        self.auth_url = auth_url
        self.username = username
        self._token = ""
        self._fetched_at = 0.0

    def get(self) -> str:
        if time.monotonic() - self._fetched_at > TOKEN_REFRESH_SECONDS:
            form = {"grant_type": "password", "username": self.username,
                    "password": DEMO_PASSWORD}
            response = httpx.post(f"{self.auth_url}/token", data=form, timeout=10)
            response.raise_for_status()
            self._token = str(response.json()["access_token"])
            self._fetched_at = time.monotonic()
        return self._token


class Chaos:
    """The platform under test, its writers and its chaos thread."""

    def __init__(
        self, data_dir: Path, *, writes: int, seed: int, max_write_seconds: float,
        kill_rounds: int = 1, writers: int = 6,
    ) -> None:
        self.data_dir = data_dir
        self.target_writes = writes
        self.kill_rounds = kill_rounds
        self.max_write_seconds = max_write_seconds
        self.chaos_error: BaseException | None = None
        self.timed_out = False
        self.timeline: list[str] = []  # kills and starts, for a failure's message
        self._started_at = time.monotonic()
        self._write_deadline = 0.0
        self.rng = random.Random(seed)
        self.writer_count = writers
        self.figures = Figures()
        self.orders: dict[str, TrackedOrder] = {}
        self._lock = threading.Lock()
        self._writing = threading.Event()  # cleared to stop the writers early
        self._redis_restart_at = int(writes * self.rng.uniform(0.2, 0.6))
        self.runner = LocalPlatform(
            PlatformConfig(
                data_dir=data_dir,
                ports={name: free_port() for name in ("auth", "monolith", "cqrs", "router")},
                redis_port=free_port(),
                extra_env=CHAOS_ENV,
            )
        )

    # Platform

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()

    def url(self, service: str) -> str:
        return self.runner.config.url(service)

    def redis(self) -> "redis.Redis[str]":
        return redis.Redis.from_url(self.runner.redis_url, decode_responses=True)

    # Writes and chaos

    def run(self) -> None:
        """Write until enough writes are acknowledged, every target was killed `kill_rounds`
        times and Redis was restarted."""
        self._writing.set()
        started = self._started_at = time.monotonic()
        self._write_deadline = started + self.max_write_seconds
        threads = [
            threading.Thread(target=self._write_loop, args=(USERS[index % len(USERS)], index),
                             name=f"writer-{index}")
            for index in range(self.writer_count)
        ]
        for thread in threads:
            thread.start()
        # Kills and restarts run on this thread: the platform's children ask Linux for SIGTERM
        # when the thread that started them exits, so a helper thread would take them down.
        try:
            self._chaos_loop(threads)
        finally:
            self._writing.clear()
            for thread in threads:
                thread.join()
        self.figures.write_seconds = time.monotonic() - started
        self._restart_dead_processes()

    def _done(self) -> bool:
        if self.chaos_error is not None:
            return True
        if time.monotonic() > self._write_deadline:
            self.timed_out = True
            return True
        return (
            self.figures.writes_acknowledged >= self.target_writes
            and all(self.figures.kills[target] >= self.kill_rounds for target in KILL_TARGETS)
            and self.figures.redis_restarts > 0
        )

    def _chaos_loop(self, writers: list[threading.Thread]) -> None:
        try:
            self._kill_repeatedly(writers)
        except BaseException as error:
            self.chaos_error = error
            raise

    def _kill_repeatedly(self, writers: list[threading.Thread]) -> None:
        """Kill a process every 0.5-2 s and start it again 0.1-1 s later.

        Restarts do not wait for readiness, so up to `MAX_DOWN` processes can be down at once. A
        process is killed again only once it is back: a service when its `/readyz` returns 200,
        a worker after `WORKER_MIN_UPTIME_SECONDS`.
        """
        cycle: list[str] = []
        down: dict[str, float] = {}  # process name to the time of its restart
        next_kill = time.monotonic() + self.rng.uniform(0.5, 2.0)
        try:
            while any(writer.is_alive() for writer in writers) and not self._done():
                now = time.monotonic()
                for name, restart_at in list(down.items()):
                    if now >= restart_at:
                        self._start(name)
                        del down[name]
                if (not self.figures.redis_restarts
                        and self.figures.writes_acknowledged >= self._redis_restart_at):
                    self._restart_redis()
                if now >= next_kill and len(down) < MAX_DOWN:
                    if not cycle:
                        cycle = list(KILL_TARGETS)
                        self.rng.shuffle(cycle)
                    if cycle[-1] not in down and self._back_up(cycle[-1]):
                        name = cycle.pop()
                        self._kill(name)
                        down[name] = now + self.rng.uniform(0.1, 1.0)
                        next_kill = now + self.rng.uniform(0.5, 2.0)
                time.sleep(0.02)
        finally:
            for name in down:
                self._start(name)

    def _back_up(self, name: str) -> bool:
        process = self.runner.processes[name]
        if process.ready_url is None:
            return time.monotonic() - process.started_at >= WORKER_MIN_UPTIME_SECONDS
        try:
            return httpx.get(process.ready_url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _kill(self, name: str) -> None:
        process = self.runner.processes[name]
        assert process.popen is not None
        if process.popen.poll() is not None:
            self.figures.unexpected_exits[name] += 1
            self._record(f"found {name} exited with code {process.popen.returncode}:\n"
                         f"{process.log_tail(30)}")
        else:
            os.kill(process.popen.pid, signal.SIGKILL)
            process.popen.wait()
        self.figures.kills[name] += 1
        self._record(f"killed {name} (pid {process.popen.pid})")

    def _start(self, name: str) -> None:
        process = self.runner.processes[name]
        process.start()
        self.figures.restarts += 1
        assert process.popen is not None
        self._record(f"started {name} (pid {process.popen.pid})")

    def _record(self, event: str) -> None:
        self.timeline.append(
            f"{time.monotonic() - self._started_at:7.2f} s  {event}  "
            f"(acknowledged writes: {self.figures.writes_acknowledged})"
        )

    def _restart_redis(self) -> None:
        assert self.runner.redis is not None
        self.runner.redis.kill()
        self._record("killed Redis")
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.runner.redis.start()
        self.figures.redis_restarts += 1
        self._record("started Redis")

    def _restart_dead_processes(self) -> None:
        """Start any process that died by itself, and wait until every service is ready."""
        for name, process in self.runner.processes.items():
            if not process.alive:
                self.figures.unexpected_exits[name] += 1
                self._start(name)
        for process in self.runner.processes.values():
            if process.ready_url:
                self.runner.wait_ready(process)

    def _write_loop(self, user: str, index: int) -> None:
        rng = random.Random(self.rng.random() + index)
        token = Token(self.url("auth"), user)
        with httpx.Client(base_url=self.url("router"), timeout=REQUEST_TIMEOUT_SECONDS) as client:
            while self._writing.is_set() and not self._done():
                self._write_order(client, token, user, rng)
                time.sleep(rng.uniform(0, THINK_SECONDS))

    def _write_order(
        self, client: httpx.Client, token: Token, user: str, rng: random.Random
    ) -> None:
        body = {"items": [{"product_id": rng.choice(PRODUCTS), "quantity": rng.randint(1, 5)}]}
        created = self._send(client, token, "/orders", body, expected=201)
        if created is None:
            return
        order = TrackedOrder(created["id"], user, created)
        with self._lock:
            self.orders[order.order_id] = order
        for action in rng.choice(ORDER_PLANS):
            if self._done():
                return
            changed = self._send(client, token, f"/orders/{order.order_id}/{action}", None,
                                 expected=200)
            if changed is None:
                order.uncertain = True
                return
            order.acknowledged = changed

    def _send(
        self, client: httpx.Client, token: Token, path: str, body: dict[str, Any] | None,
        *, expected: int,
    ) -> dict[str, Any] | None:
        """POST and return the body of an acknowledged write, or None when not acknowledged."""
        with self._lock:
            self.figures.attempts += 1
        try:
            headers = {"Authorization": f"Bearer {token.get()}"}
            response = client.post(path, json=body, headers=headers)
        except httpx.HTTPError as error:
            self._count_failure(type(error).__name__)
            time.sleep(0.05)
            return None
        if response.status_code != expected:
            self._count_failure(f"HTTP {response.status_code}")
            if response.status_code == 500:
                with self._lock:
                    self.figures.internal_errors.append(f"POST {path}: {response.text[:300]}")
            time.sleep(0.05)
            return None
        with self._lock:
            self.figures.writes_acknowledged += 1
        reply: dict[str, Any] = response.json()
        return reply

    def _count_failure(self, reason: str) -> None:
        with self._lock:
            self.figures.failures[reason] += 1

    # Quiescence

    def wait_until_converged(self, timeout_seconds: float) -> "Snapshot":
        """Poll until the relays, the consumer groups and the three stores have caught up."""
        started = time.monotonic()
        deadline = started + timeout_seconds
        while True:
            snapshot = self.snapshot()
            if snapshot.quiet and snapshot.stores_equal:
                self.figures.converge_seconds = time.monotonic() - started
                return snapshot
            if time.monotonic() > deadline:
                self.figures.converge_seconds = time.monotonic() - started
                return snapshot
            time.sleep(0.25)

    def wait_for_trim(self, timeout_seconds: float) -> dict[str, int]:
        """Wait until the relays trimmed every stream to its last entry; return the lengths."""
        deadline = time.monotonic() + timeout_seconds
        client = self.redis()
        try:
            while True:
                lengths = {stream: int(client.xlen(stream)) for stream in STREAM_GROUPS}
                if max(lengths.values()) <= 1 or time.monotonic() > deadline:
                    return lengths
                time.sleep(0.2)
        finally:
            client.close()

    def snapshot(self) -> "Snapshot":
        monolith = self.data_dir / "monolith.db"
        cqrs = self.data_dir / "cqrs.db"
        client = self.redis()
        try:
            return Snapshot(
                monolith_orders=_sqlite_states(monolith, "orders"),
                write_model_orders=_sqlite_states(cqrs, "orders"),
                read_model_orders=_read_model_states(client, "order"),
                monolith_products=_sqlite_states(monolith, "products"),
                write_model_products=_sqlite_states(cqrs, "products"),
                read_model_products=_read_model_states(client, "product"),
                monolith_users=_sqlite_states(monolith, "users"),
                write_model_users=_sqlite_states(cqrs, "users"),
                relays_behind=_relays_behind(monolith, cqrs),
                groups_behind=_groups_behind(client),
                dead_letters={
                    stream: int(client.xlen(dead_letter_stream(stream)))
                    for stream in STREAM_GROUPS
                },
                stream_lengths={stream: int(client.xlen(stream)) for stream in STREAM_GROUPS},
                read_model_applies=_read_model_applies(client),
                write_model_applies=_sqlite_applies(cqrs),
                monolith_applies=_sqlite_applies(monolith),
                conflicts=_count(monolith, "conflicts") + _count(cqrs, "conflicts"),
            )
        finally:
            client.close()

    def log_lines_containing(self, text: str) -> dict[str, int]:
        found = {}
        for path in (self.data_dir / "logs").glob("*.log"):
            count = path.read_text(errors="replace").count(text)
            if count:
                found[path.name] = count
        return found


@dataclass
class Snapshot:
    monolith_orders: dict[str, dict[str, Any]]
    write_model_orders: dict[str, dict[str, Any]]
    read_model_orders: dict[str, dict[str, Any]]
    monolith_products: dict[str, dict[str, Any]]
    write_model_products: dict[str, dict[str, Any]]
    read_model_products: dict[str, dict[str, Any]]
    monolith_users: dict[str, dict[str, Any]]
    write_model_users: dict[str, dict[str, Any]]
    relays_behind: dict[str, int]
    groups_behind: dict[str, str]
    dead_letters: dict[str, int]
    stream_lengths: dict[str, int]
    read_model_applies: dict[str, int]  # "<aggregate>/<id>@<version>" to count
    write_model_applies: dict[str, int]
    monolith_applies: dict[str, int]
    conflicts: int

    @property
    def quiet(self) -> bool:
        return not any(self.relays_behind.values()) and not self.groups_behind

    @property
    def stores_equal(self) -> bool:
        return (
            _hashes(self.monolith_orders) == _hashes(self.write_model_orders)
            == _hashes(self.read_model_orders)
            and _hashes(self.monolith_products) == _hashes(self.write_model_products)
            == _hashes(self.read_model_products)
            and _hashes(self.monolith_users) == _hashes(self.write_model_users)
        )

    def differences(self) -> list[str]:
        """Describe each order on which the three stores differ; empty when they agree."""
        stores = (self.monolith_orders, self.write_model_orders, self.read_model_orders)
        found = []
        for order_id in sorted(set().union(*stores)):
            states = [store.get(order_id) for store in stores]
            if not states[0] == states[1] == states[2]:
                versions = [None if state is None else state["version"] for state in states]
                found.append(
                    f"order {order_id}: versions {versions} in monolith, write model, read model"
                )
        return found


def _hashes(states: dict[str, dict[str, Any]]) -> dict[str, tuple[int, str]]:
    return {key: (int(state["version"]), content_hash(state)) for key, state in states.items()}


def _connect(database: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    connection.row_factory = sqlite3.Row
    return connection


def _sqlite_states(database: Path, table: str) -> dict[str, dict[str, Any]]:
    with _connect(database) as connection:
        rows = connection.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
    states = {}
    for row in rows:
        state = dict(row)
        state.pop("origin", None)
        if "items" in state:
            state["items"] = json.loads(state["items"])
        states[state["id"]] = state
    return states


def _sqlite_applies(database: Path) -> dict[str, int]:
    with _connect(database) as connection:
        rows = connection.execute(
            "SELECT aggregate, aggregate_id, version, applies FROM applied_versions"
        ).fetchall()
    return {f"{row[0]}/{row[1]}@{row[2]}": int(row[3]) for row in rows}


def _count(database: Path, table: str) -> int:
    with _connect(database) as connection:
        return int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608


def _relays_behind(monolith: Path, cqrs: Path) -> dict[str, int]:
    """Return, per relay, how many rows are after its checkpoint."""
    with _connect(monolith) as connection:
        change_log = connection.execute(
            "SELECT COUNT(*) FROM change_log WHERE seq > "
            "(SELECT COALESCE(MAX(seq), 0) FROM relay_checkpoint)"
        ).fetchone()[0]
    with _connect(cqrs) as connection:
        outbox = connection.execute(
            "SELECT COUNT(*) FROM outbox WHERE seq > "
            "(SELECT COALESCE(MAX(seq), 0) FROM relay_checkpoint)"
        ).fetchone()[0]
    return {"cdc-relay": int(change_log), "outbox-relay": int(outbox)}


def _groups_behind(client: "redis.Redis[str]") -> dict[str, str]:
    """Return, per group that has not handled and acknowledged every entry, why not."""
    behind = {}
    for stream, groups in STREAM_GROUPS.items():
        if not client.exists(stream):
            continue
        last = client.xinfo_stream(stream)["last-generated-id"]
        infos = {info["name"]: info for info in client.xinfo_groups(stream)}
        for group in groups:
            info = infos.get(group)
            if info is None:
                behind[f"{stream}/{group}"] = "no group"
            elif info["pending"]:
                behind[f"{stream}/{group}"] = f"{info['pending']} pending"
            elif info["last-delivered-id"] != last:
                behind[f"{stream}/{group}"] = f"at {info['last-delivered-id']} of {last}"
    return behind


def _read_model_states(client: "redis.Redis[str]", aggregate: str) -> dict[str, dict[str, Any]]:
    states = {}
    for key in client.scan_iter(match=f"rm:{aggregate}:*", count=1000):
        text = client.hget(key, "json")
        if text is not None:
            state = json.loads(text)
            states[state["id"]] = state
    return states


def _read_model_applies(client: "redis.Redis[str]") -> dict[str, int]:
    counts = {}
    for key in client.scan_iter(match=f"{APPLY_COUNTS_PREFIX}:*", count=1000):
        _prefix, aggregate, aggregate_id = key.split(":", 2)
        for version, applies in client.hgetall(key).items():
            counts[f"{aggregate}/{aggregate_id}@{version}"] = int(applies)
    return counts

