"""The Prometheus text a service serves on `/metrics`, summed over its processes when it has
several.

Kept apart from `services.shared.web` so that the router, which is not a FastAPI app, serves its
metrics without importing FastAPI.
"""

import os
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Set by `ztcqrs serve` for a service that runs several worker processes; see `metrics_payload`.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class _AllProcesses(Collector):
    """Every worker process's metrics, merged from prometheus-client's files, plus the custom
    collectors of this process, which compute their values at scrape time."""

    def collect(self) -> Iterable[Metric]:
        files = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
        merged: list[Metric] = list(files.collect())  # type: ignore[no-untyped-call]
        yield from merged
        names = {family.name for family in merged}
        # The default registry's metric objects report this process only, so a family that the
        # files contain is taken from the files. What remains are custom collectors, the
        # process_* and python_* metrics of this process, and metrics no process has touched.
        for family in REGISTRY.collect():
            if family.name not in names:
                yield family


_all_processes: CollectorRegistry | None = None


def metrics_payload() -> bytes:
    """Return the Prometheus text of this service, summed over its processes when it has several.

    Without PROMETHEUS_MULTIPROC_DIR that is the default registry. With it, counters and
    histograms are summed over every process and each gauge is merged by its
    `multiprocess_mode`.
    """
    global _all_processes
    if not os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        return generate_latest()
    if _all_processes is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_AllProcesses())
        _all_processes = registry
    return generate_latest(_all_processes)


def mark_metrics_process_dead() -> None:
    """Drop this process's live gauges from the merged metrics; call when a worker stops."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
