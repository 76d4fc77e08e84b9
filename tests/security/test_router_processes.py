"""A router with several worker processes: /metrics counts every process, and no worker
outlives its supervisor."""

import json
import tempfile
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from services.cli.processes import METRICS_DIR_PREFIX

from .conftest import Forge, RecordingRouter, SecurityPlatform, recording_router

REQUESTS_METRIC = "ztcqrs_router_requests_total"


def metrics_dir(router: RecordingRouter) -> Path:
    assert router.process.popen is not None
    (folder,) = Path(tempfile.gettempdir()).glob(
        f"{METRICS_DIR_PREFIX}{router.process.popen.pid}-*"
    )
    return folder


def requests_per_process(folder: Path) -> dict[str, float]:
    """Read each worker's own count of forwarded requests from its multiprocess file."""
    counts: dict[str, float] = {}
    for path in folder.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        for key, value, _timestamp, _position in values:
            if json.loads(key)[1] == REQUESTS_METRIC:
                counts[pid] = counts.get(pid, 0.0) + value
    return counts


def scraped_requests(router: RecordingRouter) -> float:
    text = httpx.get(f"{router.url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == REQUESTS_METRIC
    )


def test_metrics_sum_over_processes(
    security_platform: SecurityPlatform, forge: Forge, tmp_path: Path
) -> None:
    with recording_router(
        security_platform.runner.child_env(), tmp_path / "router",
        ROUTER_PROCESSES="2", ROUTER_RATE_LIMIT_PER_SECOND="0",
    ) as router:
        folder = metrics_dir(router)
        headers = {"Authorization": f"Bearer {forge.token()}"}
        sent = 0
        # Fresh connections until both workers have answered some requests.
        while sent < 400:
            for _ in range(20):
                response = httpx.get(f"{router.url}/orders", headers=headers, timeout=5)
                assert response.status_code == 200
            sent += 20
            per_process = requests_per_process(folder)
            if len([count for count in per_process.values() if count > 0]) >= 2:
                break

        assert len([count for count in per_process.values() if count > 0]) == 2, per_process
        assert sum(per_process.values()) == sent
        assert scraped_requests(router) == sent
    assert not folder.exists()


def test_workers_exit_with_supervisor(
    security_platform: SecurityPlatform, tmp_path: Path
) -> None:
    with recording_router(
        security_platform.runner.child_env(), tmp_path / "router", ROUTER_PROCESSES="2"
    ) as router:
        assert router.process.popen is not None
        supervisor = psutil.Process(router.process.popen.pid)
        children = supervisor.children(recursive=True)
        assert len(children) >= 2

        supervisor.kill()
        supervisor.wait(5)
        _, alive = psutil.wait_procs(children, timeout=20)

        assert alive == []
