"""Settings of the CQRS service and its workers, read from `CQRS_*` environment variables."""

import os
import socket
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.shared.scopes import REVERSE_SYNC_CLIENT
from services.shared.settings import Environment, ServiceSettings, require_secret

# Secret of the reverse-sync client in development mode; the auth server registers the same value.
DEV_SYNC_CLIENT_SECRET = "dev-reverse-sync-secret"  # noqa: S105 - public development value
SYNC_CLIENT_SECRET_ENV = "CQRS_SYNC_CLIENT_SECRET"  # noqa: S105 - a variable name, not a secret


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8002, ge=1, le=65535)
    # SQLite file of the write model; None means `<data_dir>/cqrs.db`.
    database_path: Path | None = None
    # Maximum time in ms that a query with a consistency token waits for the read model, and, when
    # the read model is still behind, maximum time it then waits for the write model.
    read_wait_ms: int = Field(500, ge=0, le=60_000)
    # Maximum number of outbox rows the outbox relay appends per round.
    relay_batch_size: int = Field(500, ge=1)
    # Pause in seconds between outbox relay rounds that found no more rows. It adds about half
    # its length to the average sync lag. An idle relay reads the outbox only after a commit, so
    # a short pause costs little CPU while nothing changes.
    relay_poll_interval_seconds: float = Field(0.002, gt=0)
    # Seconds between trims of `events.cqrs` to the entries some group has not acknowledged, and
    # seconds an acknowledged entry stays on the stream anyway, for operators and late readers.
    relay_trim_interval_seconds: float = Field(5.0, gt=0, le=3600)
    relay_stream_retention_seconds: float = Field(300.0, ge=0)
    # Consumer name within each consumer group; must be unique per running worker process.
    consumer_name: str = Field(default_factory=_default_consumer_name, min_length=1)
    # Deliveries of a stream entry before it moves to the dead-letter stream.
    max_tries: int = Field(5, ge=1)
    # Time in ms after which a pending entry of a stopped consumer is claimed by another.
    claim_idle_ms: int = Field(30_000, ge=0)
    # Base and maximum of the jittered exponential backoff, in seconds, between retries of an
    # entry whose handling failed or whose dependency is down.
    retry_base_seconds: float = Field(0.2, gt=0, le=60)
    retry_max_seconds: float = Field(10.0, gt=0, le=600)
    # Seconds a worker may take after SIGTERM to finish the entry in hand before it exits.
    shutdown_grace_seconds: float = Field(5.0, ge=0, le=300)
    monolith_url: str = "http://127.0.0.1:8001"
    token_url: str = "http://127.0.0.1:8000/token"  # noqa: S105 - a URL, not a secret
    sync_client_id: str = REVERSE_SYNC_CLIENT
    # Client secret of the reverse-sync worker; development mode fills in DEV_SYNC_CLIENT_SECRET.
    sync_client_secret: SecretStr | None = None

    @model_validator(mode="after")
    def _default_sync_secret(self) -> "Settings":
        if self.sync_client_secret is None and self.env is Environment.DEVELOPMENT:
            self.sync_client_secret = SecretStr(DEV_SYNC_CLIENT_SECRET)
        return self

    @property
    def database_file(self) -> Path:
        return self.database_path or self.data_dir / "cqrs.db"

    def require_sync_client_secret(self) -> SecretStr:
        """Return the reverse-sync client secret, or raise ValueError naming the variable to set.

        Outside development mode the secret must be set, and must not be a published demo value.
        """
        secret = require_secret(
            self.sync_client_secret, setting=SYNC_CLIENT_SECRET_ENV, env=self.env
        )
        if self.env is Environment.PRODUCTION and (
            secret.get_secret_value() == DEV_SYNC_CLIENT_SECRET
        ):
            raise ValueError(
                f"Setting {SYNC_CLIENT_SECRET_ENV} is the public development secret, which is "
                "rejected in production; set the secret registered for the client "
                f"{self.sync_client_id!r} on the auth server."
            )
        return secret
