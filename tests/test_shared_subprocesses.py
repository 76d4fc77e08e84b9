"""Stopping child processes: a polite signal first, SIGKILL after the timeout."""

import subprocess
import sys
import time

from services.shared.subprocesses import stop_process

# Prints once its SIGTERM handler is installed, so the test signals it only after that.
IGNORES_SIGTERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def start(code: str) -> "subprocess.Popen[bytes]":
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None
    with process.stdout:
        process.stdout.readline()
    return process


def test_stop_process_terminates_politely() -> None:
    process = start("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")

    killed = stop_process(process, 10)

    assert killed is False
    assert process.returncode == -15


def test_stop_process_kills_after_timeout() -> None:
    process = start(IGNORES_SIGTERM)
    started = time.monotonic()

    killed = stop_process(process, 0.3)

    assert killed is True
    assert process.returncode == -9
    assert time.monotonic() - started < 5


def test_stop_process_leaves_exited_process() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    process.wait(10)

    killed = stop_process(process, 10)

    assert killed is False
    assert process.returncode == 4
