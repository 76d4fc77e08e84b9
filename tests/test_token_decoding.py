"""TokenVerifier on malformed compact JWS tokens and claim values of the wrong format.

The attack table in tests/security covers forged and tampered tokens end to end; these are the
format edge cases, checked in process, including values PyJWT alone would accept.
"""

import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from jwt.utils import base64url_encode

from services.shared.errors import Unauthorized
from services.shared.security import StaticKeySource, TokenVerifier
from tests.conftest import TEST_AUDIENCE, TEST_ISSUER, SigningKey


def verifier_for(signing_key: SigningKey) -> TokenVerifier:
    return TokenVerifier(
        StaticKeySource(signing_key.jwks), issuer=TEST_ISSUER, audience=TEST_AUDIENCE,
        leeway_seconds=5,
    )


def signed_payload(signing_key: SigningKey, payload: bytes, **header: Any) -> str:
    """Sign `payload` as is, with the given header fields (PyJWT's encoder would drop some)."""
    full_header = {"alg": "RS256", "kid": signing_key.kid, "typ": "at+jwt", **header}
    signing_input = b".".join(
        [base64url_encode(json.dumps(full_header).encode()), base64url_encode(payload)]
    )
    signature = signing_key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return (signing_input + b"." + base64url_encode(signature)).decode()


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": float("inf")},
        {"exp": float("nan")},
        {"exp": True},
        {"exp": "9999999999"},
        {"iat": [1]},
        {"nbf": "0"},
        {"aud": [TEST_AUDIENCE, 7]},
        {"aud": {"name": TEST_AUDIENCE}},
        {"jti": ""},
        {"jti": 12},
    ],
    ids=lambda claims: repr(claims),
)
async def test_verifier_rejects_claim_format(
    signing_key: SigningKey, claims: dict[str, Any]
) -> None:
    with pytest.raises(Unauthorized):
        await verifier_for(signing_key).verify(signing_key.token(**claims))


async def test_verifier_accepts_audience_list(signing_key: SigningKey) -> None:
    token = signing_key.token(aud=["other-api", TEST_AUDIENCE])

    principal = await verifier_for(signing_key).verify(token)

    assert principal.subject == "alice"


async def test_verifier_applies_leeway(signing_key: SigningKey) -> None:
    now = int(time.time())
    token = signing_key.token(iat=now - 300, exp=now - 3, nbf=now + 3)

    principal = await verifier_for(signing_key).verify(token)

    assert principal.expires_at == now - 3


async def test_verifier_rejects_expired_beyond_leeway(signing_key: SigningKey) -> None:
    now = int(time.time())
    with pytest.raises(Unauthorized, match="expired"):
        await verifier_for(signing_key).verify(signing_key.token(iat=now - 300, exp=now - 6))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda token: token + ".e30",  # four parts
        lambda token: token.replace(".", "=.", 1),  # base64 padding in a part
        lambda token: token.replace(".", "+.", 1),  # a base64 (not base64url) character
        lambda token: "." + token.split(".", 1)[1],  # empty header
        lambda token: token.rsplit(".", 1)[0] + ".a",  # signature of an impossible length
    ],
    ids=["four parts", "padding", "plus sign", "empty header", "one-character signature"],
)
async def test_verifier_rejects_malformed_token(signing_key: SigningKey, mangle: Any) -> None:
    with pytest.raises(Unauthorized):
        await verifier_for(signing_key).verify(mangle(signing_key.token()))


async def test_verifier_rejects_non_object_payload(signing_key: SigningKey) -> None:
    with pytest.raises(Unauthorized, match="json object"):
        await verifier_for(signing_key).verify(signed_payload(signing_key, b"[1, 2]"))


async def test_verifier_rejects_issuer_list(signing_key: SigningKey) -> None:
    token = signed_payload(signing_key, json.dumps({
        "iss": [TEST_ISSUER], "aud": TEST_AUDIENCE, "sub": "alice", "iat": int(time.time()),
        "exp": int(time.time()) + 60, "jti": "j1",
    }).encode())

    with pytest.raises(Unauthorized, match="Issuer"):
        await verifier_for(signing_key).verify(token)


async def test_verifier_rejects_b64_header(signing_key: SigningKey) -> None:
    # RFC 7797's `b64` changes how the signature is computed, so its presence alone rejects.
    claims = json.dumps({
        "iss": TEST_ISSUER, "aud": TEST_AUDIENCE, "sub": "alice", "iat": int(time.time()),
        "exp": int(time.time()) + 60, "jti": "j1",
    }).encode()
    token = signed_payload(signing_key, claims, b64=True)

    with pytest.raises(Unauthorized, match="critical header"):
        await verifier_for(signing_key).verify(token)
