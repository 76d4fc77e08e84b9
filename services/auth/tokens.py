"""Minting of RFC 9068 access tokens (JWT, RS256) with the active signing key, and the key
source through which the auth server verifies its own tokens."""

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import RSAAlgorithm

from .rotation import KeyStore
from .store import User, format_scopes

ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - the RFC 9068 section 2.1 `typ` value


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    jti: str
    scope: str  # space-separated, as granted
    expires_in: int  # seconds


class TokenMinter:
    """Sign access tokens for users (password grant) and clients (client credentials grant)."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        issuer: str,
        audience: str,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.ttl_seconds = ttl_seconds
        self.clock = clock

    def mint(
        self, *, client_id: str, scopes: Iterable[str], user: User | None = None
    ) -> IssuedToken:
        """Sign a token for `user`, or for the client itself when `user` is None.

        The subject is the user's id, or the client id for a client credentials token, which is
        how verifiers tell service tokens from user tokens.
        """
        now = int(self.clock())
        jti = uuid.uuid4().hex
        scope = format_scopes(scopes)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user.id if user is not None else client_id,
            "exp": now + self.ttl_seconds,
            "iat": now,
            "nbf": now,
            "jti": jti,
            "client_id": client_id,
            "scope": scope,
        }
        if user is not None:
            claims["username"] = user.username
            claims["beta_tester"] = user.beta_tester
        # The key in force at `now`: a key scheduled by a rotation signs from its activation on.
        signing_key = self.keys.current.active_at(now)
        token = jwt.encode(
            claims,
            signing_key.private_key,
            algorithm="RS256",
            headers={"typ": ACCESS_TOKEN_TYPE, "kid": signing_key.kid},
        )
        return IssuedToken(access_token=token, jti=jti, scope=scope, expires_in=self.ttl_seconds)


class RingKeySource:
    """Key source over the auth server's own published keys, for verifying tokens it issued."""

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys

    async def get_key(self, kid: str) -> Any | None:
        for key in self.keys.current.published:
            if key.kid == kid:
                return RSAAlgorithm.from_jwk(key.jwk)
        return None
