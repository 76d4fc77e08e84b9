"""Settings of the monolith, read from `MONOLITH_*` environment variables."""

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.shared.scopes import REVERSE_SYNC_CLIENT
from services.shared.settings import ServiceSettings, split_list


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MONOLITH_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8001, ge=1, le=65535)
    # None means `data_dir / "monolith.db"`; see `resolved_database_path`.
    database_path: Path | None = None
    # Maximum time in ms that an order read with an X-Consistency-Token waits for this database to
    # hold the token's order at the token's version before it answers with what it holds.
    read_wait_ms: int = Field(500, ge=0, le=60_000)
    # Client ids whose service tokens may call the internal sync API. MONOLITH_SYNC_CLIENT_IDS takes
    # a comma-separated list or a JSON array.
    sync_client_ids: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [REVERSE_SYNC_CLIENT]
    )
    # CDC relay: change-log rows read per batch, the pause when the log is drained, and the backoff
    # between retries while Redis or the database fails.
    relay_batch_size: int = Field(500, ge=1, le=10_000)
    # The pause adds about half its length to the average sync lag. An idle relay reads the log
    # only after a commit, so a short pause costs little CPU while nothing changes.
    relay_poll_interval_seconds: float = Field(0.002, gt=0, le=60)
    relay_retry_base_seconds: float = Field(0.2, gt=0, le=60)
    relay_retry_max_seconds: float = Field(10.0, gt=0, le=600)
    # Seconds between trims of `cdc.monolith` to the entries some group has not acknowledged, and
    # seconds an acknowledged entry stays on the stream anyway, for operators and late readers.
    relay_trim_interval_seconds: float = Field(5.0, gt=0, le=3600)
    relay_stream_retention_seconds: float = Field(300.0, ge=0)

    @field_validator("sync_client_ids", mode="before")
    @classmethod
    def _split_client_ids(cls, value: Any) -> Any:
        return split_list(value)

    @property
    def resolved_database_path(self) -> Path:
        return self.database_path or self.data_dir / "monolith.db"
