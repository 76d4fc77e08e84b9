"""The auth server's key schedule: which key signs and which keys are published at each moment
of a rotation, pruning, and schedule files that must stop the server."""

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.auth.keys import SCHEDULE_FILE, SigningKeyError, load_key_ring
from services.auth.rotation import KeyStore, rotate_keys

RETENTION = 100.0
T0 = 1_800_000_000.0


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "signing-key.pem"
    load_key_ring(path, create_if_missing=True)
    return path


def test_rotation_timeline(key_file: Path) -> None:
    old = load_key_ring(key_file, create_if_missing=False).active.kid
    result = rotate_keys(key_file, activate_in=60, retention_seconds=RETENTION, now=T0)
    ring = load_key_ring(key_file, create_if_missing=False, retention_seconds=RETENTION)
    activates_at = result.activates_at

    def published(moment: float) -> list[str]:
        return [key.kid for key in ring.published_at(moment)]

    assert ring.active_at(T0).kid == old
    assert published(T0) == [old, result.kid]
    assert ring.active_at(activates_at - 1).kid == old
    assert ring.active_at(activates_at).kid == result.kid
    assert published(activates_at + RETENTION - 1) == [result.kid, old]
    assert published(activates_at + RETENTION) == [result.kid]


def test_prune_promotes_successor(key_file: Path) -> None:
    first = rotate_keys(key_file, activate_in=10, retention_seconds=RETENTION, now=T0)
    later = first.activates_at + RETENTION + 1
    second = rotate_keys(key_file, activate_in=10, retention_seconds=RETENTION, now=later)

    ring = load_key_ring(key_file, create_if_missing=False, retention_seconds=RETENTION)
    schedule = json.loads((key_file.parent / SCHEDULE_FILE).read_text())

    assert len(second.removed_kids) == 1
    assert ring.signing_keys[0].active.kid == first.kid
    assert [entry["kid"] for entry in schedule["keys"]] == [second.kid]
    assert not first.key_file.exists()
    assert sorted(path.name for path in key_file.parent.glob("*.pem")) == sorted(
        ["signing-key.pem", second.key_file.name]
    )


def test_key_store_reloads(key_file: Path) -> None:
    store = KeyStore(key_file, create_if_missing=False, retention_seconds=RETENTION,
                     reload_seconds=1)
    assert not store.reload()

    result = rotate_keys(key_file, activate_in=0, retention_seconds=RETENTION)

    assert store.reload()
    assert store.current.active.kid == result.kid


def test_key_store_keeps_last_good(key_file: Path) -> None:
    store = KeyStore(key_file, create_if_missing=False, retention_seconds=RETENTION,
                     reload_seconds=1)
    kid = store.current.active.kid
    (key_file.parent / SCHEDULE_FILE).write_text("{not json")

    assert not store.reload()
    assert store.current.active.kid == kid
    assert store.last_error is not None
    assert SCHEDULE_FILE in store.last_error


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"version": 2, "keys": []}, "not version 1"),
        ({"version": 1, "keys": [{"kid": "x"}]}, "without kid, file or activates_at"),
        ({"version": 1, "keys": [{"kid": "x", "file": "../escape.pem", "activates_at": 1}]},
         "must be a .pem file name"),
    ],
)
def test_bad_schedule_rejected(key_file: Path, schedule: object, message: str) -> None:
    (key_file.parent / SCHEDULE_FILE).write_text(json.dumps(schedule))

    with pytest.raises(SigningKeyError, match=message):
        load_key_ring(key_file, create_if_missing=False)


def test_schedule_kid_mismatch(key_file: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (key_file.parent / "other.pem").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    entry = {"kid": "claimed-kid", "file": "other.pem", "activates_at": T0}
    (key_file.parent / SCHEDULE_FILE).write_text(json.dumps({"version": 1, "keys": [entry]}))

    with pytest.raises(SigningKeyError, match="lists claimed-kid"):
        load_key_ring(key_file, create_if_missing=False)
