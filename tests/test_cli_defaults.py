"""Operator commands find the platform that `ztcqrs up` would run with the same environment."""

import os
import subprocess
import sys
from pathlib import Path

import redis

from services.cli.runner import LocalPlatform, PlatformConfig
from services.shared.names import CDC_STREAM, dead_letter_stream


def test_address_env_follows_moved_ports(tmp_path: Path) -> None:
    environ = {
        "ZTCQRS_DATA_DIR": str(tmp_path), "AUTH_PORT": "18100", "MONOLITH_PORT": "18101",
        "CQRS_PORT": "18102", "ROUTER_PORT": "18180", "ZTCQRS_REDIS_PORT": "16390",
    }

    addresses = LocalPlatform(PlatformConfig.from_env(environ)).address_env()

    assert addresses["REDIS_URL"] == "redis://127.0.0.1:16390/0"
    assert addresses["CQRS_TOKEN_URL"] == "http://127.0.0.1:18100/token"
    assert addresses["CQRS_MONOLITH_URL"] == "http://127.0.0.1:18101"
    assert addresses["CQRS_SERVICE_URL"] == "http://127.0.0.1:18102"


def test_dlq_list_finds_embedded_redis(redis_url: str, tmp_path: Path) -> None:
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    client = redis.Redis.from_url(redis_url)
    entry_id = client.xadd(dead_letter_stream(CDC_STREAM), {"error": "boom"}).decode()
    client.close()
    env = {
        key: value for key, value in os.environ.items()
        if key != "REDIS_URL" and not key.startswith(("CQRS_", "MONOLITH_", "ROUTER_"))
    }
    env.update({"ZTCQRS_DATA_DIR": str(tmp_path), "ZTCQRS_REDIS_PORT": str(port)})

    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "dlq", "list", "--stream", CDC_STREAM],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "dead-lettered entries: 1" in result.stderr
    assert result.stdout.startswith(entry_id)
