"""Local verification of RFC 9068 access tokens against the auth server's published keys.

Every service verifies every request itself with `TokenVerifier`; none calls the auth server per
request. Keys come from a `KeySource`. `JWKSClient` fetches and caches the JWKS over HTTP and
refreshes it on an unknown `kid` at most once per cooldown. `StaticKeySource` serves a fixed key
set.
"""

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import jwt
from jwt.algorithms import RSAAlgorithm

from .errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = ("RS256",)
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
# Headers that ask the verifier to fetch or trust key material named by the token itself.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat", "jti")
MAX_KID_LENGTH = 128


@dataclass(frozen=True)
class Principal:
    """The verified caller of a request."""

    subject: str
    client_id: str
    scopes: frozenset[str]
    token_id: str
    expires_at: int
    claims: Mapping[str, Any] = field(repr=False)

    @property
    def is_service(self) -> bool:
        """True for a client-credentials token, whose subject is the client itself."""
        return self.subject == self.client_id and "username" not in self.claims

    def require_scope(self, *scopes: str) -> None:
        missing = [scope for scope in scopes if scope not in self.scopes]
        if missing:
            raise Forbidden(
                f"The token lacks the scope {' '.join(missing)!r} that this endpoint requires; "
                "request a token with that scope."
            )


class KeySource(Protocol):
    async def get_key(self, kid: str) -> Any | None:
        """Return the public key for `kid`, or None when no published key has that id."""


def _keys_from_jwks(jwks: Mapping[str, Any]) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for jwk in jwks.get("keys", []):
        if (
            not isinstance(jwk, dict)
            or jwk.get("kty") != "RSA"
            or not isinstance(jwk.get("kid"), str)
        ):
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") not in ALLOWED_ALGORITHMS:
            continue
        keys[jwk["kid"]] = RSAAlgorithm.from_jwk(jwk)
    return keys


class StaticKeySource:
    """Key source over a fixed JWKS document."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = _keys_from_jwks(jwks)

    async def get_key(self, kid: str) -> Any | None:
        return self._keys.get(kid)


class JWKSClient:
    """Key source that fetches the JWKS over HTTP and caches it.

    The cache is refreshed when it is older than `refresh_seconds`, and on an unknown `kid` at most
    once per `min_refresh_seconds`, so a flood of tokens with made-up key ids cannot turn into a
    flood of requests to the auth server. While the auth server is unreachable, cached keys stay in
    use.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_seconds: float = 300.0,
        min_refresh_seconds: float = 10.0,
        timeout_seconds: float = 3.0,
    ) -> None:
        self.url = url
        self.refresh_seconds = refresh_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self._client = httpx.AsyncClient(timeout=timeout_seconds)
        self._keys: dict[str, Any] = {}
        self._fetched_at = 0.0
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    async def get_key(self, kid: str) -> Any | None:
        stale = time.monotonic() - self._fetched_at > self.refresh_seconds
        if kid not in self._keys or stale:
            await self.refresh(force=False)
        return self._keys.get(kid)

    async def refresh(self, *, force: bool = True) -> None:
        """Fetch the JWKS now, unless another fetch ran within the cooldown and `force` is False."""
        async with self._lock:
            now = time.monotonic()
            if not force and now - self._attempted_at < self.min_refresh_seconds:
                return
            self._attempted_at = now
            try:
                response = await self._client.get(self.url)
                response.raise_for_status()
                keys = _keys_from_jwks(response.json())
            except (httpx.HTTPError, ValueError) as error:
                log.warning(
                    "JWKS fetch failed; verifying with cached keys",
                    extra={
                        "jwks_url": self.url,
                        "error": str(error),
                        "cached_keys": len(self._keys),
                    },
                )
                return
            self._keys = keys
            self._fetched_at = now
            log.info("JWKS refreshed", extra={"jwks_url": self.url, "kids": sorted(keys)})

    async def aclose(self) -> None:
        await self._client.aclose()


class TokenVerifier:
    """Verify bearer tokens: pinned algorithms, RFC 9068 `typ`, issuer, audience and lifetime."""

    def __init__(
        self, keys: KeySource, *, issuer: str, audience: str, leeway_seconds: float = 5.0
    ) -> None:
        if not issuer:
            raise ValueError("The token issuer setting is empty; set ZTCQRS_TOKEN_ISSUER.")
        if not audience:
            raise ValueError("The token audience setting is empty; set ZTCQRS_TOKEN_AUDIENCE.")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds

    async def verify(self, token: str) -> Principal:
        """Return the principal of a valid token, or raise `Unauthorized` saying why it is not."""
        kid, algorithm = self._check_header(token)
        key = await self.keys.get_key(kid)
        if key is None:
            raise Unauthorized(f"The token's signing key {kid!r} is not published by the issuer.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": list(REQUIRED_CLAIMS), "strict_aud": False},
            )
        except jwt.ExpiredSignatureError as error:
            raise Unauthorized("The token has expired; request a new one.") from error
        except jwt.InvalidTokenError as error:
            raise Unauthorized(f"The token is invalid: {error}.") from error
        return self._principal(claims)

    def _check_header(self, token: str) -> tuple[str, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise Unauthorized(f"The token is malformed: {error}.") from error
        algorithm = header.get("alg")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise Unauthorized(
                f"The token's algorithm {algorithm!r} is not accepted; "
                f"only {', '.join(ALLOWED_ALGORITHMS)} is."
            )
        token_type = header.get("typ")
        if not isinstance(token_type, str) or token_type.lower() not in ACCESS_TOKEN_TYPES:
            raise Unauthorized(f"The token's type {token_type!r} is not an access token (at+jwt).")
        present = FORBIDDEN_HEADERS.intersection(header)
        if present:
            raise Unauthorized(f"The token carries key-location headers {sorted(present)}.")
        if "crit" in header:
            raise Unauthorized("The token has critical header extensions, which are not supported.")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH:
            raise Unauthorized("The token's `kid` header is missing or invalid.")
        return kid, algorithm

    @staticmethod
    def _principal(claims: dict[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("The token's subject is missing or empty.")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise Unauthorized("The token's `scope` claim is not a space-separated string.")
        client_id = claims.get("client_id", "")
        return Principal(
            subject=subject,
            client_id=client_id if isinstance(client_id, str) else "",
            scopes=frozenset(scope.split()),
            token_id=str(claims["jti"]),
            expires_at=int(claims["exp"]),
            claims=claims,
        )


def bearer_token(authorization: str | None) -> str:
    """Return the token of an `Authorization: Bearer` header, or raise `Unauthorized`."""
    if not authorization:
        raise Unauthorized("The request has no bearer token; send `Authorization: Bearer <token>`.")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("The Authorization header is not of the form `Bearer <token>`.")
    return token
