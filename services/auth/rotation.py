"""Key rotation: scheduling a new signing key, dropping keys no token needs, and reloading the
key ring in the running auth server.

`rotate_keys` writes a new private key beside the signing key file and adds it to `rotation.json`
with a time at which it starts signing. Until then the JWKS already lists it, so verifiers learn
it before the first token carries it. Keys whose publication has ended are removed in the same
call: when the first key's tokens have all expired, the key that signs now takes its place in
`AUTH_SIGNING_KEY_FILE`, so the folder goes back to one key file and an empty schedule.

Every file is replaced by rename, and the steps run in an order where each intermediate state is a
valid ring, so a server that reloads between two steps still signs and publishes correctly.
"""

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from .keys import (
    KEY_SIZE_BITS,
    PUBLIC_KEY_PATTERN,
    SCHEDULE_FILE,
    KeyRing,
    PublishedKey,
    ScheduleEntry,
    SigningKeyError,
    load_key_ring,
    private_key_pem,
    read_schedule,
    write_atomically,
    write_schedule,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationResult:
    kid: str
    activates_at: float
    key_file: Path
    removed_kids: tuple[str, ...]


def rotate_keys(
    key_file: Path, *, activate_in: float, retention_seconds: float, now: float | None = None
) -> RotationResult:
    """Add a new signing key that starts signing `activate_in` seconds from now, and prune.

    Raises `SigningKeyError` when the current keys cannot be loaded, so a broken folder is never
    rotated further.
    """
    moment = time.time() if now is None else now
    folder = key_file.parent
    load_key_ring(key_file, create_if_missing=False, retention_seconds=retention_seconds)
    activates_at = moment + activate_in

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE_BITS)
    new_key = write_scheduled_key(folder, private_key, activates_at)
    entries = [*read_schedule(folder), new_key]
    write_schedule(folder, entries)
    log.info(
        "signing key scheduled",
        extra={"kid": new_key.kid, "activates_at": activates_at, "key_file": str(key_file)},
    )
    removed = prune_keys(key_file, retention_seconds=retention_seconds, now=moment)
    return RotationResult(new_key.kid, activates_at, folder / new_key.file, removed)


def write_scheduled_key(
    folder: Path, private_key: rsa.RSAPrivateKey, activates_at: float
) -> ScheduleEntry:
    """Write a scheduled key's private file (mode 0600) and return its schedule entry."""
    kid = PublishedKey.of(private_key.public_key(), folder).kid
    file = f"signing-key-{int(activates_at)}-{kid[:8]}.pem"
    write_atomically(folder / file, private_key_pem(private_key))
    return ScheduleEntry(kid, file, activates_at)


def prune_keys(key_file: Path, *, retention_seconds: float, now: float) -> tuple[str, ...]:
    """Remove the keys whose publication has ended; return their key ids.

    Keys end in activation order, so the ended keys are the first ones. The first key that has
    not ended already signs (its predecessor was superseded by it long enough ago), so it
    becomes the new first key: its PEM replaces `key_file`, then the schedule drops it and the
    ended keys, then their files are deleted.
    """
    folder = key_file.parent
    ring = load_key_ring(key_file, create_if_missing=False, retention_seconds=retention_seconds)
    keys = ring.signing_keys
    ended = 0
    while ended + 1 < len(keys) and now >= keys[ended + 1].activates_at + retention_seconds:
        ended += 1
    if ended == 0:
        return ()

    successor = keys[ended]
    write_atomically(key_file, private_key_pem(successor.active.private_key))
    entries = read_schedule(folder)
    remaining = [entry for entry in entries if entry.activates_at > successor.activates_at]
    write_schedule(folder, remaining)
    kept = {entry.file for entry in remaining}
    for entry in entries:
        if entry.file not in kept:
            (folder / entry.file).unlink(missing_ok=True)
    removed = tuple(key.active.kid for key in keys[:ended])
    log.info(
        "expired signing keys removed",
        extra={"removed_kids": list(removed), "signing_kid": successor.active.kid},
    )
    return removed


class KeyStore:
    """The key ring in force in the auth server, reloaded when the key folder changes.

    The folder is read on every poll and compared by content, so a key written by
    `ztcqrs keys rotate` on this machine, or by another replica's operator into a shared volume,
    is in force within `reload_seconds`. A folder that fails to load leaves the last good ring.
    """

    def __init__(
        self,
        key_file: Path,
        *,
        create_if_missing: bool,
        retention_seconds: float,
        reload_seconds: float,
    ) -> None:
        self.key_file = key_file
        self.retention_seconds = retention_seconds
        self.reload_seconds = reload_seconds
        self.current: KeyRing = load_key_ring(
            key_file, create_if_missing=create_if_missing, retention_seconds=retention_seconds
        )
        self._fingerprint = self._read_fingerprint()
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> bool:
        """Load the folder again if it changed; return True when a new ring is in force."""
        fingerprint = self._read_fingerprint()
        if fingerprint == self._fingerprint:
            return False
        try:
            ring = load_key_ring(
                self.key_file, create_if_missing=False, retention_seconds=self.retention_seconds
            )
        except SigningKeyError as error:
            if self.last_error != str(error):
                self.last_error = str(error)
                log.error(
                    "signing keys reload failed; the previous keys stay in force",
                    extra={"key_file": str(self.key_file), "error": str(error)},
                )
            return False
        self.current = ring
        self._fingerprint = fingerprint
        self.last_error = None
        return True

    def _read_fingerprint(self) -> str:
        digest = hashlib.sha256()
        folder = self.key_file.parent
        paths = [self.key_file, folder / SCHEDULE_FILE, *sorted(folder.glob(PUBLIC_KEY_PATTERN))]
        paths += sorted(folder / entry.file for entry in _schedule_or_empty(folder))
        for path in paths:
            digest.update(str(path).encode())
            with contextlib.suppress(OSError):
                digest.update(path.read_bytes())
        return digest.hexdigest()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="key-reloader")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.reload_seconds)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:
                # Keep polling, because the keys in force stay valid whatever broke this read.
                log.exception("signing keys reload crashed", extra={"key_file": str(self.key_file)})


def _schedule_or_empty(folder: Path) -> list[ScheduleEntry]:
    try:
        return read_schedule(folder)
    except SigningKeyError:
        return []
