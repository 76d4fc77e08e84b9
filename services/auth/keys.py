"""The auth server's RSA signing key and the public keys it publishes in its JWKS.

The active private key lives in one PEM file (`AUTH_SIGNING_KEY_FILE`). Every `*.pub.pem` file in
the same folder is published as well, so that after a rotation the previous key keeps verifying the
tokens it signed until they expire. Key ids are RFC 7638 JWK thumbprints, so the same key always
gets the same `kid` on every replica.
"""

import base64
import hashlib
import json
import logging
import os
import stat
import tempfile
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
class KeyRing:
    """The active signing key and every published public key, the active one first."""

    active: ActiveKey
    published: tuple[PublishedKey, ...]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [dict(key.jwk) for key in self.published]}


def load_key_ring(key_file: Path, *, create_if_missing: bool) -> KeyRing:
    """Load the signing key at `key_file` and the `*.pub.pem` keys beside it.

    With `create_if_missing` (development mode) a missing key file is generated: a 2048-bit RSA
    key, written atomically with mode 0600 into a folder created with mode 0700. Without it a
    missing file raises `SigningKeyError` naming the path and the `AUTH_SIGNING_KEY_FILE` setting.
    """
    if not key_file.exists():
        if not create_if_missing:
            raise SigningKeyError(
                f"Signing key file {key_file} does not exist. Set {SIGNING_KEY_SETTING} to the "
                "path of a PEM-encoded RSA private key of at least 2048 bits; production mode "
                "never generates one."
            )
        _generate_key_file(key_file)

    private_key = _load_private_key(key_file)
    active = PublishedKey.of(private_key.public_key(), key_file)
    published = [active]
    for path in sorted(key_file.parent.glob(PUBLIC_KEY_PATTERN)):
        previous = PublishedKey.of(_load_public_key(path), path)
        if all(previous.kid != key.kid for key in published):
            published.append(previous)

    ring = KeyRing(
        active=ActiveKey(kid=active.kid, private_key=private_key, source=key_file),
        published=tuple(published),
    )
    log.info(
        "signing keys loaded",
        extra={
            "key_file": str(key_file),
            "kid": ring.active.kid,
            "published_kids": [key.kid for key in ring.published],
        },
    )
    return ring


def _generate_key_file(key_file: Path) -> None:
    folder = key_file.parent
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        # mkdir applies the umask, which may also clear the owner's bits, so chmod sets 0700.
        folder.chmod(0o700)

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_SIZE_BITS)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
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
