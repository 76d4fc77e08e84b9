"""The OAuth 2.0 token endpoint: the password and client credentials grants (RFC 6749).

Errors use the RFC 6749 section 5.2 body `{"error", "error_description"}` rather than the
platform's error body, because OAuth clients parse that shape.
"""

import base64
import binascii
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote_plus

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import Request
from fastapi.responses import JSONResponse

from .store import (
    CLIENT_CREDENTIALS_GRANT,
    PASSWORD_GRANT,
    SCOPE_PATTERN,
    WEB_CLIENT,
    AuthStore,
    Client,
    CredentialsRejected,
    User,
    format_scopes,
)
from .throttle import LoginThrottle, account_key, address_key
from .tokens import IssuedToken, TokenMinter

log = logging.getLogger(__name__)

T = TypeVar("T")

FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
NO_STORE_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}
BASIC_CHALLENGE = 'Basic realm="ztcqrs", charset="UTF-8"'
WRONG_CREDENTIALS = "The username or password is incorrect."
# Longer values are rejected before any hashing, so that a request cannot make Argon2 or the logs
# process megabytes of input.
MAX_PARAMETER_LENGTH = 1024
# Each Argon2 verification takes 64 MiB of memory (argon2-cffi's default memory_cost), so
# concurrent verifications are capped, which bounds that memory at 256 MiB.
MAX_CONCURRENT_HASHES = 4


class OAuthError(Exception):
    """An RFC 6749 error response."""

    def __init__(
        self,
        error: str,
        description: str,
        *,
        status_code: int = 400,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status_code = status_code
        self.retry_after = retry_after

    def to_response(self) -> JSONResponse:
        headers = dict(NO_STORE_HEADERS)
        if self.status_code == 401:
            headers["WWW-Authenticate"] = BASIC_CHALLENGE
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(
            {"error": self.error, "error_description": self.description},
            status_code=self.status_code,
            headers=headers,
        )


def invalid_request(description: str) -> OAuthError:
    return OAuthError("invalid_request", description)


def invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, status_code=401)


def invalid_scope(description: str) -> OAuthError:
    return OAuthError("invalid_scope", description)


@dataclass(frozen=True)
class ClientCredentials:
    client_id: str | None
    secret: str | None


@dataclass(frozen=True)
class FailureLimits:
    """Failed sign-ins allowed per account (username or client id) and per client address."""

    per_account: int
    per_address: int


class TokenEndpoint:
    """Handle `POST /token`."""

    def __init__(
        self,
        store: AuthStore,
        minter: TokenMinter,
        throttle: LoginThrottle,
        limits: FailureLimits,
    ) -> None:
        self.store = store
        self.minter = minter
        self.throttle = throttle
        self.limits = limits
        self.hash_limiter = CapacityLimiter(MAX_CONCURRENT_HASHES)

    async def handle(self, request: Request) -> JSONResponse:
        try:
            params = await read_form(request)
            grant_type = _required(params, "grant_type")
            if grant_type == PASSWORD_GRANT:
                issued = await self._password_grant(request, params)
            elif grant_type == CLIENT_CREDENTIALS_GRANT:
                issued = await self._client_credentials_grant(request, params)
            else:
                raise OAuthError(
                    "unsupported_grant_type",
                    f"Grant type {grant_type!r} is not supported; use {PASSWORD_GRANT} or "
                    f"{CLIENT_CREDENTIALS_GRANT}.",
                )
        except OAuthError as error:
            return error.to_response()
        return JSONResponse(
            {
                "access_token": issued.access_token,
                "token_type": "Bearer",
                "expires_in": issued.expires_in,
                "scope": issued.scope,
            },
            headers=NO_STORE_HEADERS,
        )

    async def _password_grant(self, request: Request, params: dict[str, str]) -> IssuedToken:
        username = _required(params, "username")
        password = _required(params, "password")
        credentials = client_credentials(request, params)
        client_id = credentials.client_id or WEB_CLIENT
        client = await self._client_for_password_grant(request, client_id, credentials.secret)
        requested = _requested_scopes(params)
        # Checked before the password, against the client only, so that a caller who does not
        # know the password learns nothing about the user's scopes.
        _require_subset(requested, client.scopes, f"client {client_id!r}")

        keys = await self._check_throttle(request, account_key("user", username))
        try:
            user = await self._run_hashing(self.store.authenticate_user, username, password)
        except CredentialsRejected as rejected:
            await self.throttle.record_failure(keys)
            log.warning(
                "login failed",
                extra={
                    "username": username,
                    "client_id": client_id,
                    "client_address": client_address(request),
                    "reason": rejected.reason,
                },
            )
            raise OAuthError("invalid_grant", _login_failure_message(rejected.reason)) from None

        allowed = user.scopes & client.scopes
        _require_subset(requested, allowed, f"user {username!r}")
        granted = requested if requested is not None else allowed
        if not granted:
            raise invalid_scope(
                f"User {username!r} has no scope that client {client_id!r} may request."
            )
        return self._issue(PASSWORD_GRANT, client, granted, user)

    async def _client_for_password_grant(
        self, request: Request, client_id: str, secret: str | None
    ) -> Client:
        if secret is not None:
            client = await self.authenticate_client(request, client_id, secret)
        else:
            found = await anyio.to_thread.run_sync(self.store.get_client, client_id)
            if found is None:
                self._log_client_failure(request, client_id, "unknown_client")
                raise invalid_client(f"Client {client_id!r} is not registered.")
            if found.confidential:
                self._log_client_failure(request, client_id, "missing_secret")
                raise invalid_client(
                    f"Client {client_id!r} is confidential; send its client_secret as a form "
                    "field or with HTTP Basic authentication."
                )
            client = found
        _require_grant(client, PASSWORD_GRANT)
        return client

    async def _client_credentials_grant(
        self, request: Request, params: dict[str, str]
    ) -> IssuedToken:
        credentials = client_credentials(request, params)
        if credentials.client_id is None:
            raise invalid_client(
                "The request has no client authentication; send client_id and client_secret as "
                "form fields or with HTTP Basic authentication."
            )
        if credentials.secret is None:
            raise invalid_client(
                f"The request has no client_secret for client {credentials.client_id!r}; the "
                "client_credentials grant requires one."
            )
        client = await self.authenticate_client(
            request, credentials.client_id, credentials.secret
        )
        _require_grant(client, CLIENT_CREDENTIALS_GRANT)
        requested = _requested_scopes(params)
        _require_subset(requested, client.scopes, f"client {client.client_id!r}")
        granted = requested if requested is not None else client.scopes
        if not granted:
            raise invalid_scope(f"Client {client.client_id!r} has no registered scopes.")
        return self._issue(CLIENT_CREDENTIALS_GRANT, client, granted, None)

    async def _check_throttle(self, request: Request, account: str) -> list[str]:
        """Return the throttle keys of this attempt; raise 429 when one is over its limit.

        The check runs before the password is hashed and does not depend on whether the account
        exists, so a throttled answer reveals nothing and costs no Argon2 time.
        """
        address = client_address(request)
        limits = {account: self.limits.per_account}
        if address is not None:
            limits[address_key(address)] = self.limits.per_address
        wait = await self.throttle.retry_after(limits)
        if wait is not None:
            log.warning(
                "sign-in throttled",
                extra={"client_address": address, "retry_after_s": wait},
            )
            raise OAuthError(
                "slow_down",
                f"Too many failed sign-ins for this account or from this address; retry in "
                f"{wait} s.",
                status_code=429,
                retry_after=wait,
            )
        return list(limits)

    async def authenticate_client(self, request: Request, client_id: str, secret: str) -> Client:
        """Return the confidential client, or raise 401 `invalid_client` (429 when throttled)."""
        keys = await self._check_throttle(request, account_key("client", client_id))
        try:
            return await self._run_hashing(self.store.authenticate_client, client_id, secret)
        except CredentialsRejected as rejected:
            await self.throttle.record_failure(keys)
            self._log_client_failure(request, client_id, rejected.reason)
            # One message for an unknown client and a wrong secret, so ids cannot be probed.
            raise invalid_client(
                f"Client authentication failed for client {client_id!r}; check the client id "
                "and secret."
            ) from None

    def _issue(
        self, grant_type: str, client: Client, scopes: frozenset[str], user: User | None
    ) -> IssuedToken:
        issued = self.minter.mint(client_id=client.client_id, scopes=scopes, user=user)
        log.info(
            "token issued",
            extra={
                "sub": user.id if user is not None else client.client_id,
                "client_id": client.client_id,
                "jti": issued.jti,
                "scope": issued.scope,
                "grant_type": grant_type,
            },
        )
        return issued

    async def _run_hashing(self, function: Callable[[str, str], T], first: str, second: str) -> T:
        # One Argon2 verification blocks for about 90 ms with argon2-cffi 25.1 defaults on a
        # 2-core test VM, so it runs in a worker thread, bounded by the limiter.
        call = functools.partial(function, first, second)
        return await anyio.to_thread.run_sync(call, limiter=self.hash_limiter)

    @staticmethod
    def _log_client_failure(request: Request, client_id: str, reason: str) -> None:
        log.warning(
            "client authentication failed",
            extra={
                "client_id": client_id,
                "client_address": client_address(request),
                "reason": reason,
            },
        )


def _login_failure_message(reason: str) -> str:
    if reason == "demo_password":
        return "The demo password is rejected in production mode."
    # Unknown user and wrong password get the same message, so usernames cannot be probed.
    return WRONG_CREDENTIALS


async def read_form(request: Request) -> dict[str, str]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != FORM_MEDIA_TYPE:
        raise invalid_request(
            f"The token request has Content-Type {media_type or 'none'!r}; send the parameters "
            f"form-encoded as {FORM_MEDIA_TYPE}."
        )
    form = await request.form()
    params: dict[str, str] = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):
            raise invalid_request(f"Parameter {name!r} must be a plain form value, not a file.")
        if name in params:
            # RFC 6749 section 3.2: parameters must not be included more than once.
            raise invalid_request(f"Parameter {name!r} appears more than once; send it once.")
        if len(value) > MAX_PARAMETER_LENGTH:
            raise invalid_request(
                f"Parameter {name!r} has {len(value)} characters; the maximum is "
                f"{MAX_PARAMETER_LENGTH}."
            )
        # RFC 6749 section 3.1: a parameter without a value counts as omitted.
        if value:
            params[name] = value
    return params


def _required(params: dict[str, str], name: str) -> str:
    value = params.get(name)
    if value is None:
        raise invalid_request(f"Parameter {name!r} is missing; the token request requires it.")
    return value


def _requested_scopes(params: dict[str, str]) -> frozenset[str] | None:
    """Return the scopes of the `scope` parameter, or None when it is absent."""
    value = params.get("scope")
    if value is None:
        return None
    scopes = frozenset(value.split(" ")) - {""}
    for scope in scopes:
        if not SCOPE_PATTERN.fullmatch(scope):
            raise invalid_scope(f"Scope {scope!r} contains characters that RFC 6749 forbids.")
    return scopes or None


def _require_subset(requested: frozenset[str] | None, allowed: frozenset[str], owner: str) -> None:
    if requested is None:
        return
    extra = requested - allowed
    if extra:
        raise invalid_scope(
            f"Scope {format_scopes(extra)!r} is not granted to {owner}; request only "
            f"{format_scopes(allowed)!r} or a subset."
        )


def _require_grant(client: Client, grant_type: str) -> None:
    if grant_type not in client.grant_types:
        raise OAuthError(
            "unauthorized_client",
            f"Client {client.client_id!r} may not use the {grant_type} grant; it is registered "
            f"for {format_scopes(client.grant_types)}.",
        )


def client_credentials(request: Request, params: dict[str, str]) -> ClientCredentials:
    """Return the client id and secret from HTTP Basic or the form (RFC 6749 section 2.3.1)."""
    form_id = params.get("client_id")
    form_secret = params.get("client_secret")
    basic = _basic_credentials(request.headers.get("authorization"))
    if basic is None:
        return ClientCredentials(form_id, form_secret)
    if form_secret is not None:
        raise invalid_request(
            "The request authenticates the client twice, with HTTP Basic and client_secret; "
            "use one method."
        )
    if form_id is not None and form_id != basic.client_id:
        raise invalid_request(
            f"Parameter client_id {form_id!r} differs from the client in the HTTP Basic "
            "credentials."
        )
    return basic


def _basic_credentials(authorization: str | None) -> ClientCredentials | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client(
            "The HTTP Basic credentials are not valid base64 of UTF-8 'client_id:client_secret'."
        ) from None
    client_id, separator, secret = decoded.partition(":")
    if not separator or not client_id:
        raise invalid_client(
            "The HTTP Basic credentials lack the 'client_id:client_secret' separator or the id."
        )
    # RFC 6749 section 2.3.1: both parts are form-urlencoded before the Basic encoding.
    return ClientCredentials(unquote_plus(client_id), unquote_plus(secret) or None)


def client_address(request: Request) -> str | None:
    return request.client.host if request.client is not None else None
