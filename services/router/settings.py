"""Settings of the gray router, read from `ROUTER_*` environment variables."""

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.shared.settings import ServiceSettings, split_list

MIB = 1024 * 1024
# The commented example rules, used when ROUTER_RULES_FILE is unset.
DEFAULT_RULES_FILE = Path(__file__).resolve().parent / "default_rules.yaml"


def available_cpus() -> int:
    """Return the number of CPUs this process may run on (its affinity mask, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without sched_getaffinity, such as macOS
        return os.cpu_count() or 1


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTER_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    rules_file: Path = DEFAULT_RULES_FILE
    # uvicorn worker processes sharing the listening socket; by default one per CPU that this
    # process may run on. Each process keeps its own token cache, rules reloader, guard loop and
    # rate-limit buckets, so with N processes a client that spreads its connections over them
    # gets up to N times `rate_limit_per_second`. With more than one, /metrics sums the counters
    # of every process (prometheus-client's multiprocess mode).
    processes: int = Field(default_factory=available_cpus, ge=1, le=64)
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
    # One JSON line per request on stderr (logger `ztcqrs.access`). Off saves about 10 us of CPU
    # per request; the Prometheus counters and histograms still count every request.
    access_log: bool = True
    # Maximum size of the request line's target plus every header name and value, in bytes.
    # Larger requests get 431. It sits below h11's own 16 KiB limit so that this JSON answer
    # wins; httptools has no limit of its own.
    max_header_bytes: int = Field(12 * 1024, ge=1024)
    # Maximum time in seconds for the client to send the whole request body. Slower bodies get 408.
    client_body_timeout_seconds: float = Field(10.0, gt=0)
    # Requests per second each client address may make on average, and the burst it may make at
    # once; more get 429. 0 turns the limit off. Probes and /metrics are not limited.
    rate_limit_per_second: float = Field(100.0, ge=0)
    rate_limit_burst: int = Field(200, ge=1)
    # Client addresses tracked by the rate limit; the least recently seen are forgotten first.
    rate_limit_clients: int = Field(100_000, ge=1)
    # Addresses or networks of proxies in front of the router (a load balancer). Only from these
    # peers are X-Forwarded-For, -Proto and -Host kept, and the client address taken from
    # X-Forwarded-For. Comma-separated or a JSON array; empty trusts no one.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Requests get 503 once the revocation list has not been read from Redis for this many
    # seconds. 0 keeps serving with the revoked ids already known.
    revocation_max_stale_seconds: float = Field(0.0, ge=0)
    # While the rules file sets a guard threshold, requests that rules send to cqrs go to the
    # monolith once the migration health has been unreadable from Redis for this many seconds.
    # 0 keeps routing by the last state read, however old.
    guard_fail_safe_seconds: float = Field(30.0, ge=0)
    # Shadow reads (the rules' `shadow` section): maximum calls to the other side in flight (more
    # are dropped and counted), maximum seconds each may take, and maximum bytes of each response
    # body kept for the comparison (a larger read is dropped).
    shadow_max_in_flight: int = Field(32, ge=1, le=10_000)
    shadow_timeout_seconds: float = Field(5.0, gt=0, le=300)
    shadow_max_body_bytes: int = Field(256 * 1024, ge=1024, le=64 * MIB)
    # Per-user gate (the rules' `gate` section): users kept in memory as allowed on the CQRS side.
    gate_cache_size: int = Field(100_000, ge=1)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as error:
                raise ValueError(
                    f"{entry!r} is not an IP address or network such as 10.0.0.0/8"
                ) from error
        return value

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(entry, strict=False) for entry in self.trusted_proxies)

    @field_validator("monolith_url", "cqrs_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// base URL, got {value!r}")
        if "?" in value or "#" in value:
            raise ValueError(f"must be a base URL without query or fragment, got {value!r}")
        return value.rstrip("/")
