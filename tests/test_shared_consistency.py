from services.shared.consistency import Decision, content_hash, decide


def test_content_hash_ignores_origin() -> None:
    state = {"id": "o1", "version": 2, "status": "paid"}
    assert content_hash({**state, "origin": "cqrs"}) == content_hash(
        {**state, "origin": "monolith"}
    )
    assert content_hash(state) != content_hash({**state, "status": "pending"})


def test_decide_table() -> None:
    cases = [
        (None, None, 1, "a", "monolith", "monolith", Decision.APPLY),
        (1, "a", 2, "b", "cqrs", "monolith", Decision.APPLY),
        (3, "a", 2, "b", "monolith", "monolith", Decision.STALE),
        (2, "a", 2, "a", "cqrs", "monolith", Decision.DUPLICATE),
        (2, "a", 2, "b", "monolith", "monolith", Decision.CONFLICT_APPLY),
        (2, "a", 2, "b", "cqrs", "monolith", Decision.CONFLICT_KEEP),
        (2, "a", 2, "b", "cqrs", "cqrs", Decision.CONFLICT_APPLY),
    ]
    for local_version, local_hash, version, incoming_hash, origin, authority, expected in cases:
        decision = decide(
            local_version=local_version,
            local_hash=local_hash,
            incoming_version=version,
            incoming_hash=incoming_hash,
            incoming_origin=origin,
            authority=authority,
        )
        assert decision is expected, (local_version, version, origin, authority)
