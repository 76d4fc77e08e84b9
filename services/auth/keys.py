"""The auth server's RSA signing keys and the public keys it publishes in its JWKS.

The first private key lives in one PEM file (`AUTH_SIGNING_KEY_FILE`). `ztcqrs keys rotate` adds
keys beside it, each with the time it starts signing, in the schedule file `rotation.json` (see
`rotation`). At any moment the key that signs is the one that activated last. The JWKS lists it,
every key whose time has not come yet, so verifiers can learn a key before any token carries it,
and every superseded key until `retention_seconds` after it stopped signing, which covers the
lifetime of the last token it signed. Every `*.pub.pem` file in the folder is published as well.
Key ids are RFC 7638 JWK thumbprints, so the same key gets the same `kid` on every replica.
"""

import base64
import hashlib
import json
import logging
import math
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

SIGNING_KEY_SETTING = "AUTH_SIGNING_KEY_FILE"
KEY_SIZE_BITS = 2048
MIN_KEY_SIZE_BITS = 2048
PUBLIC_KEY_PATTERN = "*.pub.pem"
SCHEDULE_FILE = "rotation.json"
# How long a superseded key stays published when the caller gives no retention: the default token
# lifetime (300 s) plus the default verifier leeway (5 s) and time for replicas to reload.
DEFAULT_RETENTION_SECONDS = 300 + 5 + 10


class SigningKeyError(RuntimeError):
    """The signing key or a published public key is missing or unusable."""


def _base64url_uint(value: int) -> str:
    # RFC 7518 section 6.3.1: big-endian, minimal length, base64url without padding.
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """Return the RSA public key as a JWK with only its required members `kty`, `n` and `e`."""
    numbers = public_key.public_numbers()
    return {"kty": "RSA", "n": _base64url_uint(numbers.n), "e": _base64url_uint(numbers.e)}


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """Compute the RFC 7638 SHA-256 thumbprint of an RSA JWK, base64url-encoded without padding.

    The hash input is the JSON of the required members `e`, `kty` and `n` only, in that
    lexicographic order and without whitespace.
    """
    canonical = json.dumps(
        {"e": jwk["e"], "kty": jwk["kty"], "n": jwk["n"]},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class PublishedKey:
    """A public key listed in the JWKS."""

    kid: str
    jwk: dict[str, str]
    source: Path

    @classmethod
    def of(cls, public_key: rsa.RSAPublicKey, source: Path) -> "PublishedKey":
        jwk = public_jwk(public_key)
        kid = jwk_thumbprint(jwk)
        return cls(kid=kid, jwk={**jwk, "kid": kid, "use": "sig", "alg": "RS256"}, source=source)


@dataclass(frozen=True)
class ActiveKey:
    """The private key that signs new tokens."""

    kid: str
    private_key: rsa.RSAPrivateKey
    source: Path


@dataclass(frozen=True)
class SigningKey:
    """A private key with the time it starts signing; the first key has `-inf`."""

    active: ActiveKey
    published: PublishedKey
    activates_at: float


@dataclass(frozen=True)
class KeyRing:
    """Every signing key by activation time, and the extra public keys from `*.pub.pem` files.

    Which key signs and which keys are published depend on the time, so one ring read from disk
    stays correct as scheduled activations pass.
    """

    signing_keys: tuple[SigningKey, ...]  # sorted by `activates_at`, the first at -inf
    extra_published: tuple[PublishedKey, ...]
    retention_seconds: float

    def active_at(self, now: float) -> ActiveKey:
        """Return the key that signs at `now`: the one whose activation time passed last."""
        current = self.signing_keys[0]
        for key in self.signing_keys[1:]:
            if key.activates_at <= now:
                current = key
        return current.active

    def published_at(self, now: float) -> tuple[PublishedKey, ...]:
        """Return the keys that the JWKS lists at `now`, the active key first."""
        active = self.active_at(now)
        keys: list[PublishedKey] = [
            key.published for key in self.signing_keys if key.active.kid == active.kid
        ][:1]
        for index, key in enumerate(self.signing_keys):
            superseded_at = (
                self.signing_keys[index + 1].activates_at
                if index + 1 < len(self.signing_keys)
                else math.inf
            )
            if key.activates_at > now or now < superseded_at + self.retention_seconds:
                keys.append(key.published)
        keys.extend(self.extra_published)
        unique: dict[str, PublishedKey] = {}
        for published in keys:
            unique.setdefault(published.kid, published)
        return tuple(unique.values())

    @property
    def active(self) -> ActiveKey:
        return self.active_at(time.time())

    @property
    def published(self) -> tuple[PublishedKey, ...]:
        return self.published_at(time.time())

    def jwks(self, now: float | None = None) -> dict[str, list[dict[str, str]]]:
        moment = time.time() if now is None else now
        return {"keys": [dict(key.jwk) for key in self.published_at(moment)]}


def load_key_ring(
    key_file: Path,
    *,
    create_if_missing: bool,
    retention_seconds: float = DEFAULT_RETENTION_SECONDS,
) -> KeyRing:
    """Load the signing key at `key_file`, the scheduled keys and the `*.pub.pem` keys beside it.

    With `create_if_missing` (development mode) a missing key file is generated: a 2048-bit RSA
    key, written atomically with mode 0600 into a folder created with mode 0700. Without it a
    missing file raises `SigningKeyError` naming the path and the `AUTH_SIGNING_KEY_FILE` setting.
    An unreadable key or schedule file raises `SigningKeyError` naming the file.
    """
    if not key_file.exists():
        if not create_if_missing:
            raise SigningKeyError(
                f"Signing key file {key_file} does not exist. Set {SIGNING_KEY_SETTING} to the "
                "path of a PEM-encoded RSA private key of at least 2048 bits. Only the auth "
                "server in development mode generates a missing key, when it starts."
            )
        _generate_key_file(key_file)

    signing_keys = [signing_key_of(key_file, -math.inf)]
    for entry in read_schedule(key_file.parent):
        key = signing_key_of(key_file.parent / entry.file, entry.activates_at)
        if key.active.kid != entry.kid:
            raise SigningKeyError(
                f"Key file {key.active.source} has key id {key.active.kid}, but {SCHEDULE_FILE} "
                f"lists {entry.kid} for it; restore the file or remove its entry."
            )
        signing_keys.append(key)
    signing_keys.sort(key=lambda key: key.activates_at)

    extra = [
        PublishedKey.of(_load_public_key(path), path)
        for path in sorted(key_file.parent.glob(PUBLIC_KEY_PATTERN))
    ]
    ring = KeyRing(tuple(signing_keys), tuple(extra), retention_seconds)
    log.info(
        "signing keys loaded",
        extra={
            "key_file": str(key_file),
            "kid": ring.active.kid,
            "published_kids": [key.kid for key in ring.published],
            "scheduled": [
                {"kid": key.active.kid, "activates_at": key.activates_at}
                for key in signing_keys[1:]
            ],
        },
    )
    return ring


def signing_key_of(path: Path, activates_at: float) -> SigningKey:
    private_key = _load_private_key(path)
    published = PublishedKey.of(private_key.public_key(), path)
    active = ActiveKey(kid=published.kid, private_key=private_key, source=path)
    return SigningKey(active, published, activates_at)


@dataclass(frozen=True)
class ScheduleEntry:
    kid: str
    file: str  # a file name in the key folder
    activates_at: float  # Unix time


def read_schedule(folder: Path) -> list[ScheduleEntry]:
    """Return the entries of `rotation.json` in `folder`, or none when the file does not exist."""
    path = folder / SCHEDULE_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise SigningKeyError(
            f"Key schedule {path} cannot be read ({error}); restore it from a backup or fix "
            "its JSON."
        ) from error
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or document.get("version") != 1:
        raise SigningKeyError(f"Key schedule {path} is not version 1 with a `keys` list.")
    result: list[ScheduleEntry] = []
    for entry in entries:
        try:
            kid, file, activates_at = entry["kid"], entry["file"], float(entry["activates_at"])
        except (KeyError, TypeError, ValueError) as error:
            raise SigningKeyError(
                f"Key schedule {path} has an entry without kid, file or activates_at: {entry!r}."
            ) from error
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".pem"):
            raise SigningKeyError(
                f"Key schedule {path} names the key file {file!r}; it must be a .pem file name "
                "in the same folder."
            )
        result.append(ScheduleEntry(str(kid), file, activates_at))
    return result


def write_schedule(folder: Path, entries: list[ScheduleEntry]) -> None:
    """Replace `rotation.json` atomically, so a reader sees the old or the new schedule."""
    document = {
        "version": 1,
        "keys": [
            {"kid": entry.kid, "file": entry.file, "activates_at": entry.activates_at}
            for entry in entries
        ],
    }
    write_atomically(folder / SCHEDULE_FILE, (json.dumps(document, indent=2) + "\n").encode())


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to a temporary file in the folder and rename it over `path`."""
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    temporary = Path(temporary_name)
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(path.parent)


def private_key_pem(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _generate_key_file(key_file: Path) -> None:
    folder = key_file.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        # mkdir applies the umask, which may also clear the owner's bits, so chmod sets 0700.
        folder.chmod(0o700)

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE_BITS)
    pem = private_key_pem(private_key)
    # Linking the finished file into place fails if the key file appeared meanwhile, so a second
    # process starting at the same moment keeps the first key instead of replacing a key that is
    # already signing tokens.
    descriptor, temporary_name = tempfile.mkstemp(dir=folder, prefix=".signing-key-", suffix=".tmp")
    temporary = Path(temporary_name)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(pem)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, key_file)
        except FileExistsError:
            log.info(
                "signing key file created concurrently; using it", extra={"key_file": str(key_file)}
            )
            return
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_folder(folder)
    log.warning(
        "generated a development signing key; production mode requires %s",
        SIGNING_KEY_SETTING,
        extra={"key_file": str(key_file)},
    )


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _load_private_key(key_file: Path) -> rsa.RSAPrivateKey:
    try:
        data = key_file.read_bytes()
    except OSError as error:
        raise SigningKeyError(
            f"Signing key file {key_file} could not be read ({error}); check the path in "
            f"{SIGNING_KEY_SETTING} and the file's permissions."
        ) from error
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise SigningKeyError(
            f"Signing key file {key_file} is not an unencrypted PEM private key ({error}); "
            f"point {SIGNING_KEY_SETTING} at a PEM-encoded RSA private key."
        ) from error
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningKeyError(
            f"Signing key file {key_file} contains a {type(key).__name__}, but tokens are signed "
            "with RS256; provide an RSA private key."
        )
    if key.key_size < MIN_KEY_SIZE_BITS:
        raise SigningKeyError(
            f"Signing key in {key_file} has {key.key_size} bits; RS256 requires at least "
            f"{MIN_KEY_SIZE_BITS}. Generate a larger key."
        )
    mode = stat.S_IMODE(key_file.stat().st_mode)
    if mode & 0o077:
        log.warning(
            "signing key file is readable by other users; restrict it with chmod 600",
            extra={"key_file": str(key_file), "mode": oct(mode)},
        )
    return key


def _load_public_key(path: Path) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise SigningKeyError(
            f"Published key file {path} is not a readable PEM public key ({error}); fix it or "
            f"remove it from {path.parent}."
        ) from error
    if not isinstance(key, rsa.RSAPublicKey):
        raise SigningKeyError(
            f"Published key file {path} contains a {type(key).__name__}, but only RSA public "
            f"keys can be published. Remove it from {path.parent}."
        )
    return key
