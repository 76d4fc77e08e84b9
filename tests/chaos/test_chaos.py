"""Chaos test: writes on both sides through the router while processes and Redis are killed.

Settings: `CHAOS_WRITES` is how many writes must be acknowledged (300 by default, 3,000 in
`make chaos`). `CHAOS_KILL_ROUNDS` is how often each process must have been killed before the
writes stop (1 by default, 5 in `make chaos`). `CHAOS_SEED` makes the harness's choices
repeatable, and `CHAOS_CONVERGE_SECONDS` bounds the wait for quiescence. The test prints its
figures; run pytest with `-s` to see them.
"""

import json
import os
import random
from pathlib import Path

import pytest

from tests.chaos.harness import KILL_TARGETS, Chaos

WRITES = int(os.environ.get("CHAOS_WRITES", "300"))
KILL_ROUNDS = int(os.environ.get("CHAOS_KILL_ROUNDS", "1"))
SEED = int(os.environ.get("CHAOS_SEED", str(random.SystemRandom().randrange(1_000_000))))
CONVERGE_SECONDS = float(os.environ.get("CHAOS_CONVERGE_SECONDS", "120"))
# An estimate with a wide margin: on a 2-vCPU machine 35 to 100 writes per second were acknowledged
# while processes were being killed, and a round of 8 kills took about 11 s. A run that takes
# longer fails instead of hanging.
MAX_WRITE_SECONDS = 60 + WRITES * 0.5 + KILL_ROUNDS * 60
# The relays trim their streams every second in this test.
TRIM_WAIT_SECONDS = 15.0


@pytest.mark.timeout(int(120 + MAX_WRITE_SECONDS + CONVERGE_SECONDS))
def test_chaos_converges(tmp_path: Path) -> None:
    chaos = Chaos(tmp_path / "platform", writes=WRITES, seed=SEED,
                  max_write_seconds=MAX_WRITE_SECONDS, kill_rounds=KILL_ROUNDS)
    chaos.start()
    try:
        chaos.run()
        snapshot = chaos.wait_until_converged(CONVERGE_SECONDS)
        trimmed_lengths = chaos.wait_for_trim(TRIM_WAIT_SECONDS)
        figures = chaos.figures
        locked = chaos.log_lines_containing("database is locked")
    finally:
        chaos.stop()

    report = {
        "seed": SEED,
        "kill_rounds": KILL_ROUNDS,
        "writes_acknowledged": figures.writes_acknowledged,
        "write_attempts": figures.attempts,
        "failed_attempts": dict(figures.failures),
        "orders_placed": len(chaos.orders),
        "orders_total": len(snapshot.monolith_orders),
        "kills": dict(figures.kills),
        "kills_total": sum(figures.kills.values()),
        "restarts": figures.restarts,
        "unexpected_exits": dict(figures.unexpected_exits),
        "redis_restarts": figures.redis_restarts,
        "write_seconds": round(figures.write_seconds, 1),
        "converge_seconds": round(figures.converge_seconds, 1),
        "applies": {
            "monolith": sum(snapshot.monolith_applies.values()),
            "write_model": sum(snapshot.write_model_applies.values()),
            "read_model": sum(snapshot.read_model_applies.values()),
        },
        "stream_lengths_at_convergence": snapshot.stream_lengths,
        "stream_lengths_after_trim": trimmed_lengths,
    }
    print("\nchaos figures: " + json.dumps(report, indent=2, sort_keys=True))

    assert chaos.chaos_error is None, repr(chaos.chaos_error)
    assert not chaos.timed_out, (
        f"writes did not finish within {MAX_WRITE_SECONDS} s:\n" + "\n".join(chaos.timeline)
    )
    assert figures.writes_acknowledged >= WRITES
    assert set(figures.kills) == set(KILL_TARGETS)
    assert min(figures.kills.values()) >= KILL_ROUNDS
    assert figures.redis_restarts == 1
    assert figures.unexpected_exits == {}, "\n".join(chaos.timeline)

    # Quiescence: relays at the end of their tables, every group caught up and acknowledged.
    assert snapshot.relays_behind == {"cdc-relay": 0, "outbox-relay": 0}
    assert snapshot.groups_behind == {}

    # The monolith, the write model and the read model hold the same entities and contents.
    assert snapshot.differences() == []
    assert snapshot.stores_equal
    assert snapshot.monolith_orders == snapshot.write_model_orders == snapshot.read_model_orders

    # No event applied twice, on any of the three receivers.
    for name, applies in (("monolith", snapshot.monolith_applies),
                          ("write model", snapshot.write_model_applies),
                          ("read model", snapshot.read_model_applies)):
        twice = {key: count for key, count in applies.items() if count != 1}
        assert twice == {}, f"{name} applied these versions more than once: {twice}"
    alice_orders = [order for order in chaos.orders.values() if order.user == "alice"]
    bob_orders = [order for order in chaos.orders.values() if order.user == "bob"]
    assert alice_orders
    assert bob_orders
    # Each order reached the other side by an apply. Which versions were applied depends on the
    # order of delivery: a version overtaken by a newer one is skipped as stale.
    monolith_applied = {key.split("@")[0] for key in snapshot.monolith_applies}
    write_model_applied = {key.split("@")[0] for key in snapshot.write_model_applies}
    assert {f"order/{order.order_id}" for order in alice_orders} <= monolith_applied
    assert {f"order/{order.order_id}" for order in bob_orders} <= write_model_applied

    # Every acknowledged write is there on every side.
    for order in chaos.orders.values():
        stored = snapshot.monolith_orders.get(order.order_id)
        assert stored is not None, f"acknowledged order {order.order_id} is missing"
        assert stored["version"] >= order.acknowledged["version"], order.order_id
        if not order.uncertain:
            assert stored == order.acknowledged, order.order_id

    assert snapshot.dead_letters == {"cdc.monolith": 0, "events.cqrs": 0}
    assert snapshot.conflicts == 0
    assert locked == {}
    assert figures.internal_errors == []
    # Trimming leaves only each stream's last entry once every group has acknowledged everything.
    assert trimmed_lengths == {"cdc.monolith": 1, "events.cqrs": 1}
