"""The local runner behind `ztcqrs up`: every process of the platform on one machine.

It starts Redis (an embedded server unless `REDIS_URL` is set), then the auth server, the monolith,
the CQRS service, the workers and the router, each as its own process with its output in
`<data dir>/logs/<name>.log`. It waits until each service's `/readyz` returns 200, restarts a
process that dies with exponential backoff, and on stop terminates every process it started.
"""

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.router.settings import DEFAULT_RULES_FILE
from services.shared.embedded_redis import EmbeddedRedis
from services.shared.subprocesses import die_with_parent, stop_process

from .processes import SERVICES, WORKERS

log = logging.getLogger("ztcqrs.runner")

EMBEDDED_REDIS_PORT_SETTING = "ZTCQRS_REDIS_PORT"
DEFAULT_EMBEDDED_REDIS_PORT = 6390
# Workers serve Prometheus metrics on consecutive ports from this one, in the order of
# `processes.WORKERS` (each worker's own default port when unset); 0 serves none.
WORKER_METRICS_PORT_SETTING = "ZTCQRS_WORKER_METRICS_PORT"
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
MAX_RESTART_DELAY_SECONDS = 30.0
# A process that stayed up this long counts as healthy again, so its next crash restarts it fast.
STABLE_AFTER_SECONDS = 30.0
# Services start in this order because each one waits on the ones before it (all need the JWKS).
START_ORDER = (
    "auth",
    "monolith",
    "cqrs",
    "cdc-relay",
    "outbox-relay",
    "cdc-ingest",
    "projector",
    "reverse-sync",
    "router",
)


class StartupError(RuntimeError):
    """The platform could not start; the message names the part and the fix."""


class StartInterrupted(StartupError):
    """A stop was requested while the platform was starting."""


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class PlatformConfig:
    data_dir: Path
    ports: dict[str, int]
    redis_url: str | None = None
    redis_port: int = DEFAULT_EMBEDDED_REDIS_PORT
    host: str = "127.0.0.1"
    rules_file: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Worker name to its metrics port; a worker not listed serves no metrics.
    worker_metrics_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "PlatformConfig":
        def port(setting: str, default: int) -> int:
            raw = environ.get(setting, str(default))
            if not raw.isdigit() or not 0 < int(raw) < 65536:
                raise StartupError(f"Setting {setting}={raw!r} is not a port number (1-65535).")
            return int(raw)

        rules = environ.get("ROUTER_RULES_FILE")
        first_default = min(spec.metrics_port for spec in WORKERS.values())
        raw_first = environ.get(WORKER_METRICS_PORT_SETTING, str(first_default))
        if raw_first != "0":
            first = port(WORKER_METRICS_PORT_SETTING, first_default)
            if first + len(WORKERS) > 65536:
                raise StartupError(
                    f"Setting {WORKER_METRICS_PORT_SETTING}={first} leaves no room for the "
                    f"{len(WORKERS)} worker metrics ports; choose a port below "
                    f"{65536 - len(WORKERS)}, or 0 to serve no worker metrics."
                )
        metrics_ports = (
            {}
            if raw_first == "0"
            else {name: first + index for index, name in enumerate(WORKERS)}
        )
        return cls(
            data_dir=Path(environ.get("ZTCQRS_DATA_DIR", ".ztcqrs")).resolve(),
            ports={
                name: port(spec.port_setting, spec.default_port) for name, spec in SERVICES.items()
            },
            redis_url=environ.get("REDIS_URL") or None,
            redis_port=port(EMBEDDED_REDIS_PORT_SETTING, DEFAULT_EMBEDDED_REDIS_PORT),
            rules_file=Path(rules).resolve() if rules else None,
            worker_metrics_ports=metrics_ports,
        )

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.ports[service]}"


# Settings in the child environment that name where another part of the platform listens.
ADDRESS_SETTINGS = (
    "REDIS_URL", "ZTCQRS_TOKEN_ISSUER", "ZTCQRS_JWKS_URL", "CQRS_MONOLITH_URL", "CQRS_SERVICE_URL",
    "CQRS_TOKEN_URL", "ROUTER_MONOLITH_URL", "ROUTER_CQRS_URL",
)


class ManagedProcess:
    """One child process, restarted with backoff when it exits on its own."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        ready_url: str | None,
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_path
        self.ready_url = ready_url
        self.popen: subprocess.Popen[bytes] | None = None
        self._stopped: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.failures_in_a_row = 0
        self.restart_at: float | None = None
        self.enabled = True

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as output:
            self.popen = subprocess.Popen(  # noqa: S603 - the command is our own interpreter and module
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("process started", extra={"process_name": self.name, "pid": self.popen.pid})

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop the process and log it once, also when it exited on its own (a terminal's Ctrl-C
        reaches every process of the group)."""
        if self.popen is None or self.popen is self._stopped:
            return
        if stop_process(self.popen, timeout):
            log.warning(
                "process ignored SIGTERM; killed it",
                extra={"process_name": self.name, "pid": self.popen.pid, "timeout_s": timeout},
            )
        self._stopped = self.popen
        log.info(
            "process stopped",
            extra={"process_name": self.name, "pid": self.popen.pid,
                   "exit_code": self.popen.returncode},
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalPlatform:
    """Every process of the platform, started in order and supervised until `stop()`."""

    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.redis: EmbeddedRedis | None = None
        self.processes: dict[str, ManagedProcess] = {}
        self._lock = threading.Lock()
        self._stopping = False
        # Set by a signal handler; start-up and supervision both end when it is set.
        self.stop_requested = threading.Event()

    @property
    def redis_url(self) -> str:
        if self.config.redis_url:
            return self.config.redis_url
        return f"redis://{self.config.host}:{self.config.redis_port}/0"

    @property
    def rules_file(self) -> Path:
        return self.config.rules_file or self.config.data_dir / "rules" / "rules.yaml"

    def check_ports(self) -> None:
        wanted = [
            (name, SERVICES[name].port_setting, port) for name, port in self.config.ports.items()
        ]
        if self.config.redis_url is None:
            wanted.append(("embedded Redis", EMBEDDED_REDIS_PORT_SETTING, self.config.redis_port))
        wanted.extend(
            (f"{name} metrics", WORKER_METRICS_PORT_SETTING, port)
            for name, port in self.config.worker_metrics_ports.items()
        )
        problems = []
        first_user: dict[int, tuple[str, str]] = {}
        for name, setting, port in wanted:
            if port in first_user:
                other_name, other_setting = first_user[port]
                problems.append(
                    f"Port {port} is set for both {other_name} ({other_setting}) and {name} "
                    f"({setting}); give each its own port."
                )
                continue
            first_user[port] = (name, setting)
            if port_in_use(self.config.host, port):
                problems.append(
                    f"Port {port} ({name}) is already in use on {self.config.host}; stop the "
                    f"process using it or set {setting} to a free port."
                )
        if problems:
            raise StartupError("\n".join(problems))

    def child_env(self) -> dict[str, str]:
        auth = self.config.url("auth")
        env = {
            **os.environ,
            "ZTCQRS_DATA_DIR": str(self.config.data_dir),
            "REDIS_URL": self.redis_url,
            "ZTCQRS_TOKEN_ISSUER": auth,
            "ZTCQRS_JWKS_URL": f"{auth}/.well-known/jwks.json",
            "AUTH_ISSUER": auth,
            "CQRS_MONOLITH_URL": self.config.url("monolith"),
            "CQRS_SERVICE_URL": self.config.url("cqrs"),
            "CQRS_TOKEN_URL": f"{auth}/token",
            "ROUTER_MONOLITH_URL": self.config.url("monolith"),
            "ROUTER_CQRS_URL": self.config.url("cqrs"),
            "ROUTER_RULES_FILE": str(self.rules_file),
            "PYTHONUNBUFFERED": "1",
            # Two malloc arenas instead of one per thread keep the RSS of the threaded servers
            # lower (about 4 MiB less for the monolith after a burst of sync writes).
            "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
            **self.config.extra_env,
        }
        for name, port in self.config.ports.items():
            env[SERVICES[name].port_setting] = str(port)
            env[f"{name.upper()}_HOST"] = self.config.host
        return env

    def address_env(self) -> dict[str, str]:
        """Return the settings that tell a process where the other parts of this platform are.

        Operator commands (`ztcqrs reconcile`, `dlq`, ...) take these as defaults, so they find a
        platform that `ztcqrs up` started with moved ports or the embedded Redis without more
        settings.
        """
        env = self.child_env()
        return {name: env[name] for name in ADDRESS_SETTINGS}

    def _build_processes(self) -> None:
        env = self.child_env()
        logs = self.config.data_dir / "logs"
        for name in START_ORDER:
            kind = "serve" if name in SERVICES else "worker"
            ready = f"{self.config.url(name)}/readyz" if name in SERVICES else None
            command = [sys.executable, "-m", "services.cli", kind, name]
            process_env = env
            if name in WORKERS:
                metrics_port = self.config.worker_metrics_ports.get(name, 0)
                process_env = {**env, "METRICS_PORT": str(metrics_port)}
            self.processes[name] = ManagedProcess(
                name, command, process_env, logs / f"{name}.log", ready
            )

    def start(self) -> None:
        """Start everything and return once every service is ready, or raise `StartupError`."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.check_ports()
        if not self.rules_file.exists():
            self.rules_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(DEFAULT_RULES_FILE, self.rules_file)
        if self.config.redis_url is None:
            self.redis = EmbeddedRedis(
                self.config.data_dir / "redis", self.config.redis_port, host=self.config.host
            )
            self.redis.start()
        self._build_processes()
        try:
            for name in START_ORDER:
                if self.stop_requested.is_set():
                    raise StartInterrupted(
                        "Start-up was interrupted; every started process stopped."
                    )
                process = self.processes[name]
                process.start()
                if process.ready_url:
                    self.wait_ready(process)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, process: ManagedProcess, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        assert process.ready_url is not None
        while True:
            if self.stop_requested.is_set():
                raise StartInterrupted("Start-up was interrupted; every started process stopped.")
            if not process.alive:
                raise StartupError(
                    f"{process.name} exited during start-up; "
                    f"its log {process.log_path} ends with:\n"
                    f"{process.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(process.ready_url, timeout=1.0).status_code == 200:
                    log.info(
                        "process ready",
                        extra={"process_name": process.name, "url": process.ready_url},
                    )
                    return
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{process.name} was not ready within {timeout:.0f} s at {process.ready_url}; "
                    f"see {process.log_path}."
                )
            time.sleep(0.1)

    def supervise_once(self) -> None:
        """Restart, after a backoff, every enabled process that has exited."""
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return
            for process in self.processes.values():
                if not process.enabled or process.alive:
                    continue
                if process.restart_at is None:
                    code = process.popen.returncode if process.popen else None
                    ran_for = now - process.started_at
                    process.failures_in_a_row = (
                        1 if ran_for > STABLE_AFTER_SECONDS else process.failures_in_a_row + 1
                    )
                    delay = min(
                        MAX_RESTART_DELAY_SECONDS, 0.5 * 2 ** (process.failures_in_a_row - 1)
                    )
                    process.restart_at = now + delay
                    log.warning(
                        "process exited; restarting after backoff",
                        extra={
                            "process_name": process.name,
                            "exit_code": code,
                            "restart_in_s": delay,
                            "log": str(process.log_path),
                        },
                    )
                elif now >= process.restart_at:
                    process.restarts += 1
                    process.start()

    def stop_process(self, name: str) -> None:
        """Stop one process and keep it stopped until `start_process`."""
        process = self.processes[name]
        process.enabled = False
        process.stop()

    def start_process(self, name: str) -> None:
        process = self.processes[name]
        process.enabled = True
        process.start()
        if process.ready_url:
            self.wait_ready(process)

    def supervise(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Restart exited processes until `stop` is set."""
        while not stop.wait(interval):
            self.supervise_once()

    def stop_on_signals(self) -> None:
        """Make SIGINT (Ctrl-C) and SIGTERM request a stop instead of interrupting the runner."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop_requested.set())

    def stop(self) -> None:
        """Stop every process, router first so no new request arrives, Redis last."""
        with self._lock:
            self._stopping = True
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
