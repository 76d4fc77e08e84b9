"""Local verification of RFC 9068 access tokens against the auth server's published keys.

Every service verifies every request itself with `TokenVerifier`; none calls the auth server per
request. Keys come from a `KeySource`. `JWKSClient` fetches and caches the JWKS over HTTP and
refreshes it on an unknown `kid` at most once per cooldown, and fails closed once its cached keys
are older than a configured limit. `StaticKeySource` serves a fixed key set.
"""

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import jwt
from jwt.algorithms import RSAAlgorithm
from prometheus_client import Counter, Gauge

from .errors import Forbidden, Unauthorized, Unavailable

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = ("RS256",)
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
# Headers that ask the verifier to fetch or trust key material named by the token itself.
FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
REQUIRED_CLAIMS = ("iss", "aud", "sub", "exp", "iat", "jti")
MAX_KID_LENGTH = 128
# A `kid` is only ever a dictionary key. Limiting it to base64, base64url and dotted-id characters
# turns a path or SQL fragment into a plain 401 without a JWKS fetch.
KID_PATTERN = re.compile(rf"[A-Za-z0-9._~+/=-]{{1,{MAX_KID_LENGTH}}}")
# Our tokens are about 1 KiB; anything far larger is rejected before it is decoded.
MAX_TOKEN_LENGTH = 8192
# How long a verifier keeps using cached keys while the JWKS cannot be fetched, in seconds.
DEFAULT_JWKS_MAX_STALE_SECONDS = 900.0

JWKS_REFRESHES = Counter(
    "ztcqrs_jwks_refreshes_total", "JWKS fetches, by URL and result (success or failure).",
    ["url", "result"],
)
JWKS_UNKNOWN_KIDS = Counter(
    "ztcqrs_jwks_unknown_kid_total", "Tokens whose `kid` was not in the cached JWKS.", ["url"]
)
# multiprocess_mode applies only when a service runs several processes (ROUTER_PROCESSES). Then
# the stale flag and key count come from the process that fetched last, and the last-success
# time is the oldest among live processes, so an alert on the keys' age covers every process.
JWKS_STALE = Gauge(
    "ztcqrs_jwks_stale",
    "1 while the last JWKS fetch failed and cached keys are in use, else 0.",
    ["url"],
    multiprocess_mode="livemostrecent",
)
JWKS_LAST_SUCCESS = Gauge(
    "ztcqrs_jwks_last_success_timestamp_seconds",
    "Unix time of the last successful JWKS fetch; the cached keys' age is time() minus this. "
    "With several processes, the oldest of them.",
    ["url"],
    multiprocess_mode="livemin",
)
JWKS_KEYS = Gauge(
    "ztcqrs_jwks_keys", "Keys in the cached JWKS.", ["url"], multiprocess_mode="livemostrecent"
)

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


def _keys_from_jwks(jwks: Any) -> dict[str, Any]:
    """Return the usable RS256 keys of a JWKS by `kid`; raise ValueError for a non-JWKS."""
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise ValueError("the document is not a JWKS: it has no `keys` list")
    keys: dict[str, Any] = {}
    for jwk in jwks["keys"]:
        if (
            not isinstance(jwk, dict)
            or jwk.get("kty") != "RSA"
            or not isinstance(jwk.get("kid"), str)
        ):
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") not in ALLOWED_ALGORITHMS:
            continue
        try:
            keys[jwk["kid"]] = RSAAlgorithm.from_jwk(jwk)
        except jwt.InvalidKeyError:
            log.warning("JWKS key is not a valid RSA key; skipping it", extra={"kid": jwk["kid"]})
    return keys


class StaticKeySource:
    """Key source over a fixed JWKS document."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = _keys_from_jwks(jwks)

    async def get_key(self, kid: str) -> Any | None:
        return self._keys.get(kid)


class JWKSClient:
    """Key source that fetches the JWKS over HTTP and caches it.

    A cache older than `refresh_seconds` is refreshed in the background while its keys stay in
    use. An unknown `kid` triggers a fetch at most once per `min_refresh_seconds`, however many
    unknown ids arrive, so tokens with made-up key ids cannot flood the auth server. While the
    JWKS cannot be fetched the cached keys stay in use for `max_stale_seconds` after the last
    successful fetch; after that every lookup raises `Unavailable` (fail closed) until a fetch
    succeeds again. `max_stale_seconds=0` keeps cached keys without a time limit.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_seconds: float = 300.0,
        min_refresh_seconds: float = 10.0,
        timeout_seconds: float = 3.0,
        max_stale_seconds: float = DEFAULT_JWKS_MAX_STALE_SECONDS,
    ) -> None:
        self.url = url
        self.refresh_seconds = refresh_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.max_stale_seconds = max_stale_seconds
        self._client = httpx.AsyncClient(timeout=timeout_seconds, trust_env=False)
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return bool(self._keys)

    @property
    def age_seconds(self) -> float:
        """Seconds since the last successful fetch; infinite before the first one."""
        return time.monotonic() - self._fetched_at

    @property
    def expired(self) -> bool:
        """True when the cached keys are older than `max_stale_seconds` and no longer used."""
        return self.max_stale_seconds > 0 and self.age_seconds > self.max_stale_seconds

    async def get_key(self, kid: str) -> Any | None:
        """Return the public key for `kid`, or None; raise `Unavailable` when the cache expired."""
        if kid not in self._keys:
            JWKS_UNKNOWN_KIDS.labels(self.url).inc()
            await self.refresh(force=False)
        await self.ensure_usable()
        return self._keys.get(kid)

    async def ensure_usable(self) -> None:
        """Start a refresh when the cache is due, and raise `Unavailable` when it expired.

        A due cache keeps serving while a background task refreshes it. An expired cache is
        refreshed first (at most once per cooldown), so a verifier that was idle for longer than
        `max_stale_seconds` does not reject the first request after the pause.
        """
        if self.age_seconds > self.refresh_seconds:
            if self.expired:
                await self.refresh(force=False)
            else:
                self._refresh_in_background()
        if self.expired:
            raise Unavailable(
                f"The signing keys from {self.url} are {self.age_seconds:.0f} s old, beyond the "
                f"limit of {self.max_stale_seconds:.0f} s, and the JWKS cannot be fetched; "
                "retry once the auth server is reachable."
            )

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
                JWKS_REFRESHES.labels(self.url, "failure").inc()
                JWKS_STALE.labels(self.url).set(1 if self._keys else 0)
                log.warning(
                    "JWKS fetch failed; verifying with cached keys",
                    extra={
                        "jwks_url": self.url,
                        "error": str(error) or type(error).__name__,
                        "cached_keys": len(self._keys),
                        "cache_age_s": round(self.age_seconds, 1) if self._keys else None,
                        "max_stale_s": self.max_stale_seconds,
                    },
                )
                return
            self._keys = keys
            self._fetched_at = now
            JWKS_REFRESHES.labels(self.url, "success").inc()
            JWKS_STALE.labels(self.url).set(0)
            JWKS_LAST_SUCCESS.labels(self.url).set(time.time())
            JWKS_KEYS.labels(self.url).set(len(keys))
            log.info("JWKS refreshed", extra={"jwks_url": self.url, "kids": sorted(keys)})

    def _refresh_in_background(self) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(
                self.refresh(force=False), name="jwks-refresh"
            )

    async def aclose(self) -> None:
        task, self._background = self._background, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        """Return the principal of a valid token, or raise `Unauthorized` saying why it is not.

        Raises `Unavailable` when the key source cannot vouch for any key (keys too old). The
        header is checked before any key lookup; PyJWT then verifies the RS256 signature and the
        registered claims, and the claim formats PyJWT lets through are checked last.
        """
        kid = _check_header(_unverified_header(token))
        key = await self.keys.get_key(kid)
        if key is None:
            raise Unauthorized(f"The token's signing key {kid!r} is not published by the issuer.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(ALLOWED_ALGORITHMS),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": list(REQUIRED_CLAIMS), "strict_aud": False},
            )
        except jwt.ExpiredSignatureError as error:
            raise Unauthorized("The token has expired; request a new one.") from error
        except jwt.InvalidTokenError as error:
            raise Unauthorized(f"The token is invalid: {error}.") from error
        except OverflowError as error:
            # PyJWT converts dates with int(), which raises OverflowError for an infinite value.
            raise Unauthorized(
                "The token is invalid: a date claim is not a finite number."
            ) from error
        _check_claim_formats(claims)
        return self._principal(claims)

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


_MALFORMED = (
    "The token is not a well-formed JWT; send the access token exactly as the auth server "
    "issued it."
)


def _unverified_header(token: str) -> dict[str, Any]:
    if len(token) > MAX_TOKEN_LENGTH:
        raise Unauthorized(
            f"The token has {len(token)} characters, more than the limit of {MAX_TOKEN_LENGTH}."
        )
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as error:
        # PyJWT's text names decoder internals (codecs, byte offsets) that help no client.
        raise Unauthorized(_MALFORMED) from error
    return header


def _check_header(header: dict[str, Any]) -> str:
    """Check the JOSE header of an access token and return its `kid`, or raise `Unauthorized`."""
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
    if "crit" in header or "b64" in header:
        raise Unauthorized("The token has critical header extensions, which are not supported.")
    kid = header.get("kid")
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise Unauthorized("The token's `kid` header is missing or invalid.")
    return kid


def _check_claim_formats(claims: dict[str, Any]) -> None:
    """Reject claim values that PyJWT accepts but RFC 7519 does not, or raise `Unauthorized`."""
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        # json.loads accepts NaN and Infinity, and PyJWT accepts booleans as numbers.
        if name in claims and (
            isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise Unauthorized(f"The token is invalid: its `{name}` claim is not a number.")
    audience = claims["aud"]
    audiences = [audience] if isinstance(audience, str) else audience
    if not isinstance(audiences, list) or not all(isinstance(name, str) for name in audiences):
        raise Unauthorized("The token is invalid: its `aud` is not a string or string list.")
    jti = claims["jti"]
    if not isinstance(jti, str) or not jti:
        raise Unauthorized("The token is invalid: its `jti` is not a non-empty string.")


def bearer_token(authorization: str | None) -> str:
    """Return the token of an `Authorization: Bearer` header, or raise `Unauthorized`."""
    if not authorization:
        raise Unauthorized("The request has no bearer token; send `Authorization: Bearer <token>`.")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("The Authorization header is not of the form `Bearer <token>`.")
    return token
