"""Settings of the gray router, read from `ROUTER_*` environment variables."""

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.shared.settings import ServiceSettings

MIB = 1024 * 1024
# The commented example rules, used when ROUTER_RULES_FILE is unset.
DEFAULT_RULES_FILE = Path(__file__).resolve().parent / "default_rules.yaml"


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTER_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    rules_file: Path = DEFAULT_RULES_FILE
    # How often the rules file is read and compared with the rules in force, in seconds.
    rules_poll_seconds: float = Field(1.0, gt=0)
    monolith_url: str = "http://127.0.0.1:8001"
    cqrs_url: str = "http://127.0.0.1:8002"
    # Maximum request body forwarded upstream, in bytes. Larger bodies get 413.
    max_body_bytes: int = Field(MIB, ge=0)
    # Maximum wait in seconds for upstream response headers, and between two body reads.
    upstream_timeout_seconds: float = Field(10.0, gt=0)
    # Maximum time in seconds to open a TCP connection to an upstream.
    connect_timeout_seconds: float = Field(2.0, gt=0)
    # Maximum number of verified tokens kept in memory, so repeat requests skip the RSA check.
    # 0 turns the cache off.
    token_cache_size: int = Field(10_000, ge=0)

    @field_validator("monolith_url", "cqrs_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// base URL, got {value!r}")
        if "?" in value or "#" in value:
            raise ValueError(f"must be a base URL without query or fragment, got {value!r}")
        return value.rstrip("/")
