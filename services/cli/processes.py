"""Every process the platform runs, by name, and how to start one in the current interpreter."""

import asyncio
import importlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.shared.garbage_collection import freeze_startup_objects
from services.shared.logs import configure_logging

log = logging.getLogger(__name__)

# Folders of prometheus-client's multiprocess mode, in the temp folder: prefix, supervisor pid.
METRICS_DIR_PREFIX = "ztcqrs-metrics-"
# How often a router worker checks that its supervisor still runs, in seconds.
PARENT_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    package: str  # contains settings.Settings and app.create_app
    port_setting: str
    default_port: int


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    package: str  # contains settings.Settings
    module: str  # defines `async def run(settings, stop)`
    # Prometheus port when METRICS_PORT is unset. Distinct per worker, because the relays and the
    # ingest share a pod with their service, and `ztcqrs up` runs every worker on one machine.
    metrics_port: int


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec("auth", "services.auth", "AUTH_PORT", 8000),
        ServiceSpec("monolith", "services.monolith", "MONOLITH_PORT", 8001),
        ServiceSpec("cqrs", "services.cqrs", "CQRS_PORT", 8002),
        ServiceSpec("router", "services.router", "ROUTER_PORT", 8080),
    )
}

WORKERS: dict[str, WorkerSpec] = {
    spec.name: spec
    for spec in (
        WorkerSpec("cdc-relay", "services.monolith", "services.monolith.workers.cdc_relay", 9101),
        WorkerSpec("outbox-relay", "services.cqrs", "services.cqrs.workers.outbox_relay", 9102),
        WorkerSpec("cdc-ingest", "services.cqrs", "services.cqrs.workers.cdc_ingest", 9103),
        WorkerSpec("projector", "services.cqrs", "services.cqrs.workers.projector", 9104),
        WorkerSpec("reverse-sync", "services.cqrs", "services.cqrs.workers.reverse_sync", 9105),
    )
}


def load_settings(package: str) -> Any:
    return importlib.import_module(f"{package}.settings").Settings()


def serve(name: str) -> None:
    """Run one HTTP service under uvicorn until it receives SIGINT or SIGTERM."""
    import uvicorn

    spec = SERVICES[name]
    settings = load_settings(spec.package)
    configure_logging(name, settings.log_level)
    app_module = importlib.import_module(f"{spec.package}.app")
    app = app_module.create_app(settings)
    freeze_startup_objects()
    # Services with a `processes` setting (the router) may run several uvicorn worker processes
    # on one socket; each builds its own app from the environment through `router_app`.
    processes = int(getattr(settings, "processes", 1))
    metrics_dir = _share_metrics_between_processes() if processes > 1 else None
    log.info(
        "service starting",
        extra={
            "host": settings.host, "port": settings.port, "processes": processes,
            "metrics_dir": metrics_dir,
        },
    )
    try:
        uvicorn.run(
            app if processes == 1 else f"{__name__}:router_app",
            factory=processes > 1,
            workers=processes if processes > 1 else None,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
            # Client addresses come from the socket only: X-Forwarded-For is never trusted.
            proxy_headers=False,
            # Both named, so that a missing package fails loudly instead of falling back to
            # asyncio's loop or to h11, whose handling of ambiguous request framing differs (the
            # router rejects it under both). uvloop and httptools come with uvicorn[standard].
            loop="uvloop",
            # A service may name its own subclass of uvicorn's httptools protocol. The router's
            # sends the writes of one event-loop step together.
            http=getattr(app_module, "HTTP_PROTOCOL", "httptools"),
            server_header=False,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("service stopped")


def _share_metrics_between_processes() -> str:
    """Point prometheus-client's multiprocess mode at a new private folder and return it.

    Set before uvicorn spawns the workers, which inherit the environment and so import
    prometheus-client in multiprocess mode: each writes its values to files there, and /metrics
    merges them. The folder is new on every start because files left by an earlier run would
    be counted again. Its name contains this process's pid, so that folders left by a process
    that was killed before it could remove its own are removed here.
    """
    from services.shared.metrics import MULTIPROCESS_DIR_VARIABLE

    root = Path(tempfile.gettempdir())
    for stale in root.glob(f"{METRICS_DIR_PREFIX}*"):
        owner = stale.name.removeprefix(METRICS_DIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _process_exists(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")  # mode 0700
    os.environ[MULTIPROCESS_DIR_VARIABLE] = folder
    return folder


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _exit_with_parent(parent: int) -> None:
    """Stop this worker process soon after the uvicorn supervisor `parent` is gone.

    A supervisor killed with SIGKILL cannot stop its workers, which would keep the port and
    serve on. The check runs once a second in a daemon thread; SIGTERM starts uvicorn's graceful
    shutdown of this worker.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        log.warning(
            "router supervisor process is gone; stopping this worker",
            extra={"parent_pid": parent, "pid": os.getpid()},
        )
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def router_app() -> Any:
    """Build the router's app in a uvicorn worker process, from the same environment."""
    spec = SERVICES["router"]
    settings = load_settings(spec.package)
    configure_logging(spec.name, settings.log_level)
    _exit_with_parent(os.getppid())
    return importlib.import_module(f"{spec.package}.app").create_app(settings)


def run_worker(name: str) -> None:
    """Run one worker until it receives SIGINT or SIGTERM, then let it finish what it holds."""
    spec = WORKERS[name]
    settings = load_settings(spec.package)
    configure_logging(name, settings.log_level)
    module = importlib.import_module(spec.module)
    serve_worker_metrics(spec, settings)
    freeze_startup_objects()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        log.info("worker starting", extra={"worker": name})
        await module.run(settings, stop)
        log.info("worker stopped", extra={"worker": name})

    asyncio.run(main())


def serve_worker_metrics(spec: WorkerSpec, settings: Any) -> bool:
    """Serve the worker's Prometheus metrics on METRICS_PORT (its default when unset; 0: none).

    A port that cannot be bound is logged and the worker runs without metrics, because a second
    copy of a worker on one machine must still do its work. Returns whether metrics are served.
    """
    from prometheus_client import start_http_server

    port = spec.metrics_port if settings.metrics_port is None else int(settings.metrics_port)
    ids = {"worker": spec.name, "host": settings.host, "port": port}
    if port == 0:
        log.info("worker metrics disabled by METRICS_PORT=0", extra=ids)
        return False
    try:
        start_http_server(port, addr=settings.host)
    except OSError as error:
        log.error(
            "worker metrics not served: port unavailable; set METRICS_PORT to a free port, or to "
            "0 to serve none",
            extra={**ids, "error": str(error)},
        )
        return False
    log.info("worker metrics served", extra=ids)
    return True
