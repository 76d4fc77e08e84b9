"""Every process the platform runs, by name, and how to start one in the current interpreter."""

import asyncio
import importlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

from services.shared.logs import configure_logging

log = logging.getLogger(__name__)


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
        WorkerSpec("cdc-relay", "services.monolith", "services.monolith.workers.cdc_relay"),
        WorkerSpec("outbox-relay", "services.cqrs", "services.cqrs.workers.outbox_relay"),
        WorkerSpec("cdc-ingest", "services.cqrs", "services.cqrs.workers.cdc_ingest"),
        WorkerSpec("projector", "services.cqrs", "services.cqrs.workers.projector"),
        WorkerSpec("reverse-sync", "services.cqrs", "services.cqrs.workers.reverse_sync"),
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
    app = importlib.import_module(f"{spec.package}.app").create_app(settings)
    log.info("service starting", extra={"host": settings.host, "port": settings.port})
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        # Client addresses come from the socket only: X-Forwarded-For is never trusted.
        proxy_headers=False,
        # Named so a missing package fails loudly instead of falling back to h11, whose handling of
        # ambiguous request framing differs (the router rejects it under both).
        http="httptools",
        server_header=False,
    )
    log.info("service stopped")


def run_worker(name: str) -> None:
    """Run one worker until it receives SIGINT or SIGTERM, then let it finish what it holds."""
    spec = WORKERS[name]
    settings = load_settings(spec.package)
    configure_logging(name, settings.log_level)
    module = importlib.import_module(spec.module)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        log.info("worker starting", extra={"worker": name})
        await module.run(settings, stop)
        log.info("worker stopped", extra={"worker": name})

    asyncio.run(main())
