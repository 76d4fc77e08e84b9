"""Settings every service shares. Each service subclasses `ServiceSettings` with its own env prefix.

Shared values keep fixed environment names (`REDIS_URL`, `ZTCQRS_*`) so one environment file can
configure every process; service values use the service's prefix (`ROUTER_PORT`, `AUTH_PORT`, ...).
"""

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_PASSWORD = "demo-pass"  # noqa: S105 - the published development password, refused in production


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class MigrationPhase(StrEnum):
    SHADOW = "shadow"
    CANARY = "canary"
    CUTOVER = "cutover"
    RETIRED = "retired"

    @property
    def authority(self) -> str:
        """Side whose state wins when both sides wrote the same version differently."""
        return "cqrs" if self in (MigrationPhase.CUTOVER, MigrationPhase.RETIRED) else "monolith"


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    env: Environment = Field(Environment.DEVELOPMENT, validation_alias=_env("ZTCQRS_ENV"))
    data_dir: Path = Field(Path(".ztcqrs"), validation_alias=_env("ZTCQRS_DATA_DIR"))
    log_level: str = Field("INFO", validation_alias=_env("ZTCQRS_LOG_LEVEL"))
    phase: MigrationPhase = Field(MigrationPhase.CANARY, validation_alias=_env("ZTCQRS_PHASE"))
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=_env("REDIS_URL"))
    # Port of a worker's Prometheus endpoint, served on the service's host setting; 0 disables it.
    # Unset, each worker uses its own default (services.cli.processes.WORKERS), so the workers
    # that share a pod or a machine do not clash. HTTP services serve /metrics on their own port.
    metrics_port: int | None = Field(None, ge=0, le=65535, validation_alias=_env("METRICS_PORT"))

    # Token verification, the same in every service.
    token_issuer: str = Field("http://127.0.0.1:8000", validation_alias=_env("ZTCQRS_TOKEN_ISSUER"))
    token_audience: str = Field("ztcqrs-api", validation_alias=_env("ZTCQRS_TOKEN_AUDIENCE"))
    jwks_url: str = Field(
        "http://127.0.0.1:8000/.well-known/jwks.json", validation_alias=_env("ZTCQRS_JWKS_URL")
    )
    token_leeway_seconds: float = Field(
        5.0, ge=0, le=300, validation_alias=_env("ZTCQRS_TOKEN_LEEWAY_SECONDS")
    )
    jwks_refresh_seconds: float = Field(
        300.0, gt=0, validation_alias=_env("ZTCQRS_JWKS_REFRESH_SECONDS")
    )
    jwks_min_refresh_seconds: float = Field(
        10.0, ge=0, validation_alias=_env("ZTCQRS_JWKS_MIN_REFRESH_SECONDS")
    )
    # How long cached signing keys stay in use while the JWKS cannot be fetched, in seconds,
    # after which authenticated requests get 503. 0 keeps them without a limit.
    jwks_max_stale_seconds: float = Field(
        900.0, ge=0, validation_alias=_env("ZTCQRS_JWKS_MAX_STALE_SECONDS")
    )

    @property
    def development(self) -> bool:
        return self.env is Environment.DEVELOPMENT


def split_list(value: Any) -> Any:
    """Parse a list setting given as a JSON array or as comma-separated text; pass others through.

    Use as a `mode="before"` validator on a `NoDecode` list field, so an environment variable can
    contain `a,b` as well as `["a", "b"]`.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def require_secret(value: SecretStr | None, *, setting: str, env: Environment) -> SecretStr:
    """Return `value`, or raise if it is missing or is the demo password outside development."""
    if value is None or not value.get_secret_value():
        raise ValueError(f"Setting {setting} is missing; set it to a secret value.")
    if env is Environment.PRODUCTION and value.get_secret_value() == DEMO_PASSWORD:
        raise ValueError(
            f"Setting {setting} is the public demo password, which is rejected outside "
            "development mode; set a real secret."
        )
    return value
