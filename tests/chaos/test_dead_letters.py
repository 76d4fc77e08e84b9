"""Poison entries: retried with backoff, dead-lettered after the configured tries, replayed once.

The poison here is real: a read-model key of the wrong Redis type makes every projection of that
order fail with WRONGTYPE until an operator deletes the key.
"""

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from sqlalchemy import Engine, select

from services.cli.dlq import find_dead_letters, list_dead_letters, replay
from services.cli.main import build_parser
from services.cqrs.read_model import read_order
from services.cqrs.schema import applied_versions, open_write_model
from services.cqrs.settings import Settings
from services.cqrs.workers import cdc_ingest, projector
from services.shared.events import Event
from services.shared.names import (
    CDC_STREAM,
    INGEST_GROUP,
    PROJECTOR_GROUP,
    apply_counts_key,
    dead_letter_stream,
    failure_counts_key,
    order_key,
)
from services.shared.streams import (
    ConsumerOptions,
    StreamConsumer,
    TransientFailure,
    append,
    connect,
)
from tests.chaos.support import order_state
from tests.cqrs_support import FAST_OPTIONS, consume_once, cqrs_settings, order_event

MAX_TRIES = FAST_OPTIONS.max_tries
DLQ = dead_letter_stream(CDC_STREAM)


@pytest.fixture
def settings(data_dir: Path, redis_url: str) -> Settings:
    return cqrs_settings(data_dir, redis_url, consumer_name="poisoned")


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return open_write_model(settings)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


async def poison_order(client: aioredis.Redis) -> Event:
    """Append a monolith order whose read-model key contains a string, not a hash."""
    await client.set(order_key("o-poison"), "not a hash")
    event = order_event(order_state("o-poison", user_id="bob"), action="created", origin="monolith")
    await append(client, CDC_STREAM, event)
    return event


async def project_round(settings: Settings, client: aioredis.Redis) -> int:
    return await consume_once(projector.build_consumer(settings, client, options=FAST_OPTIONS))


async def ingest_round(settings: Settings, client: aioredis.Redis, engine: Engine) -> int:
    consumer = cdc_ingest.build_consumer(settings, client, engine, options=FAST_OPTIONS)
    return await consume_once(consumer)


def write_model_applies(engine: Engine, order_id: str) -> dict[int, int]:
    query = select(applied_versions.c.version, applied_versions.c.applies).where(
        applied_versions.c.aggregate_id == order_id
    )
    with engine.connect() as connection:
        return {row.version: row.applies for row in connection.execute(query)}


async def test_poison_dead_lettered_after_tries(
    settings: Settings, client: aioredis.Redis
) -> None:
    event = await poison_order(client)

    for attempt in range(1, MAX_TRIES):
        assert await project_round(settings, client) == 0
        assert await client.xlen(DLQ) == 0, attempt
        counts = await client.hgetall(failure_counts_key(CDC_STREAM, PROJECTOR_GROUP))
        assert list(counts.values()) == [str(attempt)]
        assert (await client.xpending(CDC_STREAM, PROJECTOR_GROUP))["pending"] == 1

    assert await project_round(settings, client) == 0

    dead = await client.xrange(DLQ)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields["id"] == event.id
    assert fields["dlq_stream"] == CDC_STREAM
    assert fields["dlq_group"] == PROJECTOR_GROUP
    assert fields["dlq_consumer"] == "poisoned"
    assert fields["dlq_tries"] == str(MAX_TRIES)
    assert "WRONGTYPE" in fields["dlq_error"]
    assert (await client.xpending(CDC_STREAM, PROJECTOR_GROUP))["pending"] == 0
    assert await client.exists(failure_counts_key(CDC_STREAM, PROJECTOR_GROUP)) == 0

    # The consumer moved on: a later entry is projected.
    following = order_event(order_state("o-next", user_id="bob"), action="created",
                            origin="monolith")
    await append(client, CDC_STREAM, following)
    assert await project_round(settings, client) == 1
    assert await read_order(client, "o-next") is not None


async def test_replay_after_fix_applies_once(
    settings: Settings, client: aioredis.Redis, engine: Engine
) -> None:
    await poison_order(client)
    assert await ingest_round(settings, client, engine) == 1
    for _attempt in range(MAX_TRIES):
        await project_round(settings, client)
    [dead] = await list_dead_letters(client, [DLQ])
    assert write_model_applies(engine, "o-poison") == {1: 1}

    await client.delete(order_key("o-poison"))  # the operator's fix
    new_id = await replay(client, dead)

    # Both groups read the replayed entry; only the projector, whose try failed, handles it.
    assert await ingest_round(settings, client, engine) == 1
    assert await project_round(settings, client) == 1
    assert await project_round(settings, client) == 0
    stored = await read_order(client, "o-poison")
    assert stored == order_state("o-poison", user_id="bob")
    assert await client.hgetall(apply_counts_key("order", "o-poison")) == {"1": "1"}
    assert write_model_applies(engine, "o-poison") == {1: 1}
    assert await client.xlen(DLQ) == 0
    replayed = await client.xrange(CDC_STREAM, min=new_id, max=new_id)
    assert replayed[0][1]["replay_group"] == PROJECTOR_GROUP
    assert replayed[0][1]["replayed_from"] == f"{DLQ}/{dead.entry_id}"
    assert not any(name.startswith("dlq_") for name in replayed[0][1])
    for group in (INGEST_GROUP, PROJECTOR_GROUP):
        assert (await client.xpending(CDC_STREAM, group))["pending"] == 0


async def test_transient_failure_never_dead_lettered(client: aioredis.Redis) -> None:
    outage_left = MAX_TRIES * 3
    handled: list[str] = []

    async def handler(stream: str, entry_id: str, event: Event) -> None:
        nonlocal outage_left
        if outage_left:
            outage_left -= 1
            raise TransientFailure("the dependency is down")
        handled.append(event.id)

    event = order_event(order_state("o1", user_id="bob"), action="created", origin="monolith")
    await append(client, CDC_STREAM, event)
    consumer = StreamConsumer(
        client, streams=[CDC_STREAM], group=PROJECTOR_GROUP, consumer="c1", handler=handler,
        options=FAST_OPTIONS,
    )

    rounds = 0
    while not handled:
        rounds += 1
        assert rounds <= MAX_TRIES * 3 + 1
        await consume_once(consumer)

    assert handled == [event.id]
    assert rounds == MAX_TRIES * 3 + 1
    assert await client.xlen(DLQ) == 0
    assert await client.exists(failure_counts_key(CDC_STREAM, PROJECTOR_GROUP)) == 0


async def test_failures_counted_not_deliveries(client: aioredis.Redis) -> None:
    # Claims by other consumers raise the delivery count, but only failed attempts are tries.
    await append(client, CDC_STREAM, order_event(order_state("o1", user_id="bob"), action="created",
                                                 origin="monolith"))
    handled: list[str] = []

    async def handler(stream: str, entry_id: str, event: Event) -> None:
        handled.append(entry_id)

    options = ConsumerOptions(max_tries=2, claim_idle_ms=0, block_ms=20,
                              retry_base_seconds=0.01, retry_max_seconds=0.02)
    await client.xgroup_create(CDC_STREAM, PROJECTOR_GROUP, id="0")
    await client.xreadgroup(PROJECTOR_GROUP, "dead-1", {CDC_STREAM: ">"})
    for name in ("dead-2", "dead-3", "dead-4"):
        await client.xautoclaim(CDC_STREAM, PROJECTOR_GROUP, name, min_idle_time=0)
    [row] = await client.xpending_range(CDC_STREAM, PROJECTOR_GROUP, min="-", max="+", count=1)
    assert row["times_delivered"] > options.max_tries

    consumer = StreamConsumer(client, streams=[CDC_STREAM], group=PROJECTOR_GROUP,
                              consumer="live", handler=handler, options=options)
    assert await consume_once(consumer) == 1

    assert len(handled) == 1
    assert await client.xlen(DLQ) == 0


def run_cli(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    code: int = args.handler(args)
    return code


def test_dlq_cli_commands(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    first = client.xadd(DLQ, {"id": "e1", "subject": "order/o1", "dlq_group": INGEST_GROUP,
                              "dlq_tries": "5", "dlq_error": "IntegrityError: boom",
                              "dlq_stream": CDC_STREAM})
    second = client.xadd(DLQ, {"id": "e2", "subject": "order/o2", "dlq_group": INGEST_GROUP,
                               "dlq_tries": "1", "dlq_error": "PermanentFailure: bad",
                               "dlq_stream": CDC_STREAM})
    client.xadd(dead_letter_stream("events.cqrs"), {
        "id": "e3", "subject": "order/o3", "dlq_group": "cqrs-reverse-sync", "dlq_tries": "1",
        "dlq_error": "PermanentFailure: HTTP 422", "dlq_stream": "events.cqrs"}, id="1-1")

    assert run_cli("dlq", "list", "--redis-url", redis_url) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [first, second, "1-1"]
    assert "tries=5" in listed[0]
    assert "IntegrityError: boom" in listed[0]

    assert run_cli("dlq", "list", "--stream", "events.cqrs", "--redis-url", redis_url) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["1-1"]

    assert run_cli("dlq", "show", first, "--redis-url", redis_url) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["dlq_stream"] == DLQ
    assert shown["fields"]["dlq_error"] == "IntegrityError: boom"

    assert run_cli("dlq", "show", "1-2", "--redis-url", redis_url) == 1
    assert "no dead-lettered entry 1-2" in capsys.readouterr().err

    assert run_cli("dlq", "replay", first, "--redis-url", redis_url) == 0
    assert f"replayed {DLQ} {first} to {CDC_STREAM}" in capsys.readouterr().out
    [(_new_id, fields)] = client.xrange(CDC_STREAM)
    assert fields == {"id": "e1", "subject": "order/o1", "replay_group": INGEST_GROUP,
                      "replayed_from": f"{DLQ}/{first}"}

    assert run_cli("dlq", "drop", "--all", "--stream", CDC_STREAM, "--redis-url", redis_url) == 0
    assert capsys.readouterr().out.splitlines() == [f"dropped {DLQ} {second}"]
    assert client.xlen(DLQ) == 0
    assert client.xlen(dead_letter_stream("events.cqrs")) == 1
    assert run_cli("dlq", "drop", first, "--redis-url", redis_url) == 1
    client.close()


def test_dlq_cli_needs_ids_or_all(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli("dlq", "replay", "--redis-url", redis_url)

    assert exit_info.value.code == 2
    assert "name one or more entry ids, or --all" in capsys.readouterr().err


async def test_find_dead_letters_by_id(client: aioredis.Redis) -> None:
    entry_id = await client.xadd(DLQ, {"id": "e1", "dlq_group": INGEST_GROUP})

    [found] = await find_dead_letters(client, [DLQ], str(entry_id))

    assert found.source_stream == CDC_STREAM
    assert found.group == INGEST_GROUP
    assert await find_dead_letters(client, [DLQ], "1-1") == []


def test_dlq_cli_ambiguous_id(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Entry ids are unique per stream only; an id found in both dead-letter streams needs --stream.
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.xadd(DLQ, {"id": "e1", "dlq_group": INGEST_GROUP}, id="5-1")
    client.xadd(dead_letter_stream("events.cqrs"), {"id": "e2", "dlq_group": "g"}, id="5-1")

    assert run_cli("dlq", "drop", "5-1", "--redis-url", redis_url) == 1
    assert "choose one with --stream" in capsys.readouterr().err
    assert client.xlen(DLQ) == 1

    assert run_cli("dlq", "drop", "5-1", "--stream", CDC_STREAM, "--redis-url", redis_url) == 0
    assert client.xlen(DLQ) == 0
    assert client.xlen(dead_letter_stream("events.cqrs")) == 1
    client.close()


def test_dlq_command_runs_as_process(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    entry_id = client.xadd(DLQ, {"id": "e1", "subject": "order/o1", "dlq_group": INGEST_GROUP,
                                 "dlq_tries": "5", "dlq_error": "IntegrityError: boom"})
    client.close()

    listed = subprocess.run(
        [sys.executable, "-m", "services.cli", "dlq", "list", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=60, check=False,
    )

    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[0] == entry_id
    assert "dead-lettered entries: 1" in listed.stderr
