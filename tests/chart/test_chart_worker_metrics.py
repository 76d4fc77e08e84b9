"""Worker metrics in the chart: each worker's METRICS_PORT is declared, scraped and allowed."""

from services.cli.processes import WORKERS
from tests.chart import policy
from tests.chart.conftest import rendering_of
from tests.chart.policy import Endpoint

PROMETHEUS = Endpoint("prometheus", "monitoring", {"app": "prometheus"})
INTERNET = Endpoint("internet", ip="203.0.113.9")


def _worker_metrics(scenario: str) -> dict[str, tuple[str, str, int]]:
    """Worker name -> (pod component, port name, port) of its metrics port."""
    found: dict[str, tuple[str, str, int]] = {}
    for pod in policy.pod_templates(rendering_of(scenario).objects):
        for container in pod.containers():
            args = container.get("args") or []
            if args[:1] != ["worker"]:
                continue
            env = {item["name"]: item.get("value") for item in container.get("env") or []}
            (port,) = [p for p in container.get("ports") or [] if p["name"].startswith("metrics")]
            assert env["METRICS_PORT"] == str(port["containerPort"]), args
            found[args[1]] = (pod.component, port["name"], port["containerPort"])
    return found


def test_every_worker_declares_its_default_metrics_port() -> None:
    found = _worker_metrics("default")
    assert {name: port for name, (_, _, port) in found.items()} == {
        name: spec.metrics_port for name, spec in WORKERS.items()
    }


def test_pod_monitor_scrapes_every_worker_port() -> None:
    objects = rendering_of("monitoring-values.yaml").objects
    (monitor,) = [item for item in objects if item["kind"] == "PodMonitor"]
    components = set(monitor["spec"]["selector"]["matchExpressions"][0]["values"])
    port_names = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    for name, (component, port_name, _) in _worker_metrics("monitoring-values.yaml").items():
        assert component in components, name
        assert port_name in port_names, name
    assert not [item for item in rendering_of("default").objects if item["kind"] == "PodMonitor"]


def test_only_scrapers_reach_worker_metrics() -> None:
    pods = {
        pod.component: Endpoint.of(pod)
        for pod in policy.pod_templates(rendering_of("monitoring-values.yaml").objects)
    }
    monitored = [item for item in rendering_of("monitoring-values.yaml").objects
                 if item["kind"] == "NetworkPolicy"]
    closed = [item for item in rendering_of("default").objects if item["kind"] == "NetworkPolicy"]
    for name, (component, _, port) in _worker_metrics("monitoring-values.yaml").items():
        assert policy.connection_allowed(monitored, PROMETHEUS, pods[component], port), name
        assert not policy.connection_allowed(monitored, INTERNET, pods[component], port), name
        assert not policy.connection_allowed(closed, PROMETHEUS, pods[component], port), name
