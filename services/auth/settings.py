"""Settings of the auth server, read from `AUTH_*` environment variables.

The issuer and audience fall back to the shared `ZTCQRS_TOKEN_ISSUER` and `ZTCQRS_TOKEN_AUDIENCE`,
so one environment file keeps the tokens this server mints equal to what the verifiers require.
"""

from pathlib import Path
from typing import Self

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings

# Client secrets used when the settings leave them unset in development mode. They are public, so
# production mode rejects them.
DEV_REVERSE_SYNC_CLIENT_SECRET = "dev-reverse-sync-secret"  # noqa: S105
DEV_ADMIN_CLIENT_SECRET = "dev-admin-secret"  # noqa: S105
DEV_CLIENT_SECRETS = frozenset({DEV_REVERSE_SYNC_CLIENT_SECRET, DEV_ADMIN_CLIENT_SECRET})


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AUTH_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    issuer: str = Field(
        "http://127.0.0.1:8000",
        min_length=1,
        validation_alias=AliasChoices("AUTH_ISSUER", "ZTCQRS_TOKEN_ISSUER"),
    )
    audience: str = Field(
        "ztcqrs-api",
        min_length=1,
        validation_alias=AliasChoices("AUTH_AUDIENCE", "ZTCQRS_TOKEN_AUDIENCE"),
    )
    token_ttl_seconds: int = Field(300, ge=1, le=86_400)
    # None means `data_dir / "auth.db"`, as `resolved_database_path` returns.
    database_path: Path | None = None
    # None means `data_dir / "keys" / "signing-key.pem"`, as `resolved_signing_key_file`
    # returns.
    signing_key_file: Path | None = None
    reverse_sync_client_secret: SecretStr | None = None
    admin_client_secret: SecretStr | None = None
    # How often the key folder is checked for keys added by `ztcqrs keys rotate`, in seconds.
    keys_reload_seconds: float = Field(1.0, gt=0, le=60)
    # Failed sign-ins allowed per username (or client id) and per client address within
    # `login_failure_window_seconds`; further attempts get 429 until the window ends. Unknown
    # usernames count like known ones, so the limit reveals nothing about which exist.
    login_max_failures_per_account: int = Field(5, ge=1)
    login_max_failures_per_address: int = Field(20, ge=1)
    login_failure_window_seconds: float = Field(300.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _default_development_secrets(self) -> Self:
        if self.development:
            if self.reverse_sync_client_secret is None:
                self.reverse_sync_client_secret = SecretStr(DEV_REVERSE_SYNC_CLIENT_SECRET)
            if self.admin_client_secret is None:
                self.admin_client_secret = SecretStr(DEV_ADMIN_CLIENT_SECRET)
        return self

    @property
    def key_retention_seconds(self) -> float:
        """How long a superseded key, or a revocation, outlives the last token it concerns."""
        return self.token_ttl_seconds + self.token_leeway_seconds + 2 * self.keys_reload_seconds

    @property
    def resolved_database_path(self) -> Path:
        return self.database_path or self.data_dir / "auth.db"

    @property
    def resolved_signing_key_file(self) -> Path:
        return self.signing_key_file or self.data_dir / "keys" / "signing-key.pem"
