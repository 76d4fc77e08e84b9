"""`ztcqrs up` as a user runs it: restarts a dead process, stops everything on Ctrl-C, and names
the port and setting when a port is taken."""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

from .conftest import EXTERNAL_STACK, LocalStack, wait_for

pytestmark = pytest.mark.skipif(
    EXTERNAL_STACK,
    reason="checks the local runner, which an external stack selected by E2E_BASE_URL does not use",
)

BANNER = "ztcqrs is running"


def runner_env(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env.update(
        {
            "ZTCQRS_DATA_DIR": str(data_dir),
            "ZTCQRS_REDIS_PORT": str(free_port()),
            "AUTH_PORT": str(free_port()),
            "MONOLITH_PORT": str(free_port()),
            "CQRS_PORT": str(free_port()),
            "ROUTER_PORT": str(free_port()),
        }
    )
    return env


def test_dead_process_restarted(
    local_platform: LocalStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ztcqrs.runner")
    process = local_platform.runner.processes["projector"]
    assert process.popen is not None
    old_pid = process.popen.pid
    restarts = process.restarts

    os.kill(old_pid, signal.SIGKILL)

    wait_for(
        lambda: process.alive and process.popen is not None and process.popen.pid != old_pid,
        what="the projector to be restarted",
    )
    assert process.restarts == restarts + 1
    exits = [
        r for r in caplog.records if r.getMessage() == "process exited; restarting after backoff"
    ]
    assert any(getattr(record, "process_name", None) == "projector" for record in exits)


def test_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"],
        env=runner_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert runner.stdout is not None
        deadline = time.monotonic() + 120
        for line in runner.stdout:
            if BANNER in line:
                break
            assert time.monotonic() < deadline, "the runner did not print its banner in time"
        children = psutil.Process(runner.pid).children(recursive=True)
        assert len(children) >= 10  # Redis, four services, five workers

        runner.send_signal(signal.SIGINT)
        assert runner.wait(timeout=60) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        if runner.stdout is not None:
            runner.stdout.close()
    time.sleep(0.2)
    left = [
        child.pid
        for child in children
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    ]
    assert left == []


def test_port_in_use_stops_runner(tmp_path: Path) -> None:
    env = runner_env(tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        env["ROUTER_PORT"] = str(port)
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "up"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert f"Port {port} (router) is already in use" in result.stderr
    assert "ROUTER_PORT" in result.stderr
