"""Signing key loading, generation and key ids of the auth server."""

import base64
import hashlib
import json
import stat
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.auth.app import create_app
from services.auth.keys import SigningKeyError, jwk_thumbprint, load_key_ring
from services.auth.settings import Settings


def write_private_key(path: Path, key_size: int = 2048) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return key


def write_public_key(path: Path, key: rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint_of(key: rsa.RSAPublicKey) -> str:
    """RFC 7638 thumbprint computed from the key numbers, independently of the code under test."""
    numbers = key.public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    canonical = '{"e":"%s","kty":"RSA","n":"%s"}' % (b64url(e), b64url(n))  # noqa: UP031
    return b64url(hashlib.sha256(canonical.encode()).digest())


def test_thumbprint_rfc7638_example() -> None:
    # The example key and its thumbprint from RFC 7638 section 3.1.
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
            "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YG"
            "jQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdk"
            "t-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnq"
            "DKgw"
        ),
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }

    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_dev_key_generated_private(tmp_path: Path) -> None:
    key_file = tmp_path / "data" / "keys" / "signing-key.pem"

    ring = load_key_ring(key_file, create_if_missing=True)

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert ring.active.private_key.key_size == 2048
    assert [path.name for path in key_file.parent.iterdir()] == ["signing-key.pem"]


def test_dev_key_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "signing-key.pem"

    first = load_key_ring(key_file, create_if_missing=True)
    second = load_key_ring(key_file, create_if_missing=True)

    assert first.active.kid == second.active.kid


def test_kid_is_thumbprint(tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    key = write_private_key(key_file)

    ring = load_key_ring(key_file, create_if_missing=False)

    assert ring.active.kid == thumbprint_of(key.public_key())
    assert ring.jwks()["keys"][0]["kid"] == thumbprint_of(key.public_key())


async def test_app_kid_is_thumbprint(data_dir: Path) -> None:
    app = create_app(Settings(data_dir=data_dir, env="development"))
    key_file = data_dir / "keys" / "signing-key.pem"
    private_key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(private_key, rsa.RSAPrivateKey)

    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client,
    ):
        jwks = (await client.get("/.well-known/jwks.json")).json()

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [key["kid"] for key in jwks["keys"]] == [thumbprint_of(private_key.public_key())]
    assert json.dumps(jwks).count('"d"') == 0


def test_previous_public_keys_published(tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    active = write_private_key(key_file)
    previous = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_public_key(tmp_path / "2025-01.pub.pem", previous)
    # The active key's own public file must not be listed twice.
    write_public_key(tmp_path / "signing-key.pub.pem", active)

    ring = load_key_ring(key_file, create_if_missing=False)

    kids = [key["kid"] for key in ring.jwks()["keys"]]
    assert kids == [thumbprint_of(active.public_key()), thumbprint_of(previous.public_key())]
    assert ring.active.kid == kids[0]


def test_production_missing_key_named(tmp_path: Path) -> None:
    missing = tmp_path / "keys" / "signing-key.pem"

    with pytest.raises(SigningKeyError) as raised:
        load_key_ring(missing, create_if_missing=False)

    assert "AUTH_SIGNING_KEY_FILE" in str(raised.value)
    assert str(missing) in str(raised.value)
    assert not missing.parent.exists()


def test_production_app_missing_key(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, env="production")

    with pytest.raises(SigningKeyError, match="AUTH_SIGNING_KEY_FILE"):
        create_app(settings)

    assert not (data_dir / "keys").exists()


def test_small_key_rejected(tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    write_private_key(key_file, key_size=1024)

    with pytest.raises(SigningKeyError, match="1024 bits"):
        load_key_ring(key_file, create_if_missing=False)


def test_non_rsa_key_rejected(tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(SigningKeyError, match="RSA private key"):
        load_key_ring(key_file, create_if_missing=False)


def test_garbage_key_file_rejected(tmp_path: Path) -> None:
    key_file = tmp_path / "signing-key.pem"
    key_file.write_text("not a key\n")

    with pytest.raises(SigningKeyError, match="AUTH_SIGNING_KEY_FILE"):
        load_key_ring(key_file, create_if_missing=True)
