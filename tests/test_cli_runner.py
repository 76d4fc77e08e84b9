"""The local runner: port checks, settings and process stops, without starting the platform."""

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.runner import LocalPlatform, ManagedProcess, PlatformConfig, StartupError
from tests.conftest import free_port


def config_with_ports(tmp_path: Path) -> PlatformConfig:
    return PlatformConfig(
        data_dir=tmp_path,
        ports={name: free_port() for name in ("auth", "monolith", "cqrs", "router")},
        redis_port=free_port(),
    )


def test_port_in_use_names_port_and_setting(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        config.ports["router"] = blocker.getsockname()[1]
        with pytest.raises(StartupError) as raised:
            LocalPlatform(config).check_ports()
    message = str(raised.value)
    assert str(config.ports["router"]) in message
    assert "ROUTER_PORT" in message


def test_embedded_redis_port_checked(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        config.redis_port = blocker.getsockname()[1]
        with pytest.raises(StartupError, match="ZTCQRS_REDIS_PORT"):
            LocalPlatform(config).check_ports()


def test_given_redis_url_skips_embedded_port(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    config.redis_url = "redis://127.0.0.1:1/0"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        config.redis_port = blocker.getsockname()[1]
        LocalPlatform(config).check_ports()
    assert LocalPlatform(config).redis_url == "redis://127.0.0.1:1/0"


def test_invalid_port_setting_rejected() -> None:
    with pytest.raises(StartupError, match="ROUTER_PORT='http'"):
        PlatformConfig.from_env({"ROUTER_PORT": "http"})


def test_child_env_points_at_chosen_ports(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    env = LocalPlatform(config).child_env()
    assert env["ROUTER_PORT"] == str(config.ports["router"])
    assert env["ZTCQRS_TOKEN_ISSUER"] == f"http://127.0.0.1:{config.ports['auth']}"
    assert env["CQRS_MONOLITH_URL"] == f"http://127.0.0.1:{config.ports['monolith']}"
    assert env["REDIS_URL"] == f"redis://127.0.0.1:{config.redis_port}/0"


def test_shared_port_rejected(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    config.ports["router"] = config.ports["auth"]
    with pytest.raises(StartupError) as raised:
        LocalPlatform(config).check_ports()
    message = str(raised.value)
    assert "auth (AUTH_PORT)" in message
    assert "router (ROUTER_PORT)" in message


def test_every_busy_port_reported(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    with socket.socket() as first, socket.socket() as second:
        for blocker in (first, second):
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
        config.ports["auth"] = first.getsockname()[1]
        config.ports["cqrs"] = second.getsockname()[1]
        with pytest.raises(StartupError) as raised:
            LocalPlatform(config).check_ports()
    message = str(raised.value)
    assert "AUTH_PORT" in message
    assert "CQRS_PORT" in message


def test_workers_get_their_own_metrics_ports(tmp_path: Path) -> None:
    config = PlatformConfig.from_env({"ZTCQRS_DATA_DIR": str(tmp_path)})
    assert config.worker_metrics_ports == {
        "cdc-relay": 9101, "outbox-relay": 9102, "cdc-ingest": 9103, "projector": 9104,
        "reverse-sync": 9105,
    }

    moved = PlatformConfig.from_env({"ZTCQRS_WORKER_METRICS_PORT": "19000"})
    assert sorted(moved.worker_metrics_ports.values()) == list(range(19000, 19005))

    platform = LocalPlatform(moved)
    platform._build_processes()
    assert platform.processes["projector"].env["METRICS_PORT"] == "19003"


def test_worker_metrics_disabled(tmp_path: Path) -> None:
    config = PlatformConfig.from_env({"ZTCQRS_WORKER_METRICS_PORT": "0"})
    assert config.worker_metrics_ports == {}
    # Platforms built in code (tests, the chaos harness) serve no worker metrics either.
    platform = LocalPlatform(config_with_ports(tmp_path))
    platform._build_processes()
    assert platform.processes["cdc-ingest"].env["METRICS_PORT"] == "0"


def test_busy_worker_metrics_port_names_the_setting(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        config.worker_metrics_ports = {"projector": blocker.getsockname()[1]}
        with pytest.raises(StartupError) as raised:
            LocalPlatform(config).check_ports()
    assert "projector metrics" in str(raised.value)
    assert "ZTCQRS_WORKER_METRICS_PORT" in str(raised.value)


def test_worker_metrics_port_shared_with_a_service_rejected(tmp_path: Path) -> None:
    config = config_with_ports(tmp_path)
    config.worker_metrics_ports = {"cdc-relay": config.ports["cqrs"]}
    with pytest.raises(StartupError, match=r"cqrs \(CQRS_PORT\) and cdc-relay metrics"):
        LocalPlatform(config).check_ports()


def test_startup_objects_frozen() -> None:
    """A service's modules and app leave the collector's generations once it is built."""
    script = (
        "import gc\n"
        "from services.shared.garbage_collection import freeze_startup_objects\n"
        "import services.monolith.app\n"
        "before = gc.get_freeze_count()\n"
        "freeze_startup_objects()\n"
        "print(before, gc.get_freeze_count(), sum(gc.get_count()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    before, frozen, tracked = (int(value) for value in result.stdout.split())

    assert before == 0
    assert frozen > 10_000
    assert tracked < 100


def test_stop_logs_process_that_exited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ztcqrs.runner")
    process = ManagedProcess(
        "short", [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ),
        tmp_path / "short.log", None,
    )
    process.start()
    assert process.popen is not None
    process.popen.wait(10)

    process.stop()
    process.stop()

    stopped = [record for record in caplog.records if record.getMessage() == "process stopped"]
    assert len(stopped) == 1
    assert getattr(stopped[0], "exit_code", None) == 3
    assert getattr(stopped[0], "process_name", None) == "short"
