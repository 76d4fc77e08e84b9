"""Token revocation (RFC 7009): `POST /revoke` ends an access token before its `exp`, for
example at sign-out.

The token's `jti` goes onto the revocation stream until the token expires, and every verifying
service rejects it from then on (see `services.shared.revocation`). As RFC 7009 section 2.2
requires, a token that is invalid, expired or unknown gets 200 like a revoked one, because there
is nothing left to revoke and the answer must not tell a caller which tokens are valid.
"""

import logging

import anyio.to_thread
import redis.asyncio as redis
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from services.shared.errors import Unauthorized, Unavailable
from services.shared.revocation import revoke_token
from services.shared.security import Principal, TokenVerifier

from .grants import (
    NO_STORE_HEADERS,
    OAuthError,
    TokenEndpoint,
    client_credentials,
    invalid_client,
    read_form,
)
from .store import WEB_CLIENT

log = logging.getLogger(__name__)


class RevocationEndpoint:
    """Handle `POST /revoke` with form fields `token` and optional `token_type_hint`.

    The client authenticates as at the token endpoint: a confidential client with its secret, a
    public client (the web client by default) with its `client_id`. A client may revoke only
    tokens issued to it, so one service cannot sign out another's tokens.
    """

    def __init__(
        self,
        tokens: TokenEndpoint,
        verifier: TokenVerifier,
        client: "redis.Redis",
        *,
        retention_seconds: float,
    ) -> None:
        self.tokens = tokens
        self.verifier = verifier
        self.client = client
        self.retention_seconds = retention_seconds

    async def handle(self, request: Request) -> Response:
        try:
            params = await read_form(request)
            token = params.get("token")
            if token is None:
                raise OAuthError(
                    "invalid_request", "Parameter 'token' is missing; send the token to revoke."
                )
            client_id = await self._client_id(request, params)
            principal = await self._principal(token)
            if principal is None:
                return Response(status_code=200, headers=NO_STORE_HEADERS)
            if principal.client_id != client_id:
                log.warning(
                    "revocation rejected: token of another client",
                    extra={"client_id": client_id, "token_client_id": principal.client_id},
                )
                raise OAuthError(
                    "unauthorized_client",
                    f"Client {client_id!r} may revoke only tokens issued to it.",
                )
            await revoke_token(
                self.client,
                token_id=principal.token_id,
                expires_at=principal.expires_at,
                retention_seconds=self.retention_seconds,
            )
        except OAuthError as error:
            return error.to_response()
        except Unavailable as error:
            log.error("token revocation failed", extra={"error": str(error.__cause__)})
            return JSONResponse(
                {"error": "temporarily_unavailable", "error_description": error.message},
                status_code=503,
                headers={**NO_STORE_HEADERS, "Retry-After": "1"},
            )
        log.info(
            "token revoked on request",
            extra={"sub": principal.subject, "client_id": client_id, "jti": principal.token_id},
        )
        return Response(status_code=200, headers=NO_STORE_HEADERS)

    async def _client_id(self, request: Request, params: dict[str, str]) -> str:
        credentials = client_credentials(request, params)
        client_id = credentials.client_id or WEB_CLIENT
        if credentials.secret is not None:
            client = await self.tokens.authenticate_client(request, client_id, credentials.secret)
            return client.client_id
        found = await anyio.to_thread.run_sync(self.tokens.store.get_client, client_id)
        if found is None or found.confidential:
            raise invalid_client(
                f"Client {client_id!r} is not a registered public client; a confidential client "
                "sends its client_secret."
            )
        return found.client_id

    async def _principal(self, token: str) -> Principal | None:
        try:
            return await self.verifier.verify(token)
        except Unauthorized as error:
            log.info("revocation of an invalid token ignored", extra={"reason": error.message})
            return None
