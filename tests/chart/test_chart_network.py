"""The NetworkPolicies allow exactly the connections of the platform's process table
(docs/architecture.md), DNS, and the public entry points, and nothing else."""

import copy

from tests.chart import policy
from tests.chart.conftest import rendering_of
from tests.chart.policy import Endpoint

# (client, server, port) for every connection between the platform's pods. Every token verifier
# (router, monolith, CQRS service) fetches the JWKS from the auth server and reads the token
# revocation list from Redis. The auth server writes that list and counts failed sign-ins in
# Redis. The reverse-sync worker gets a service token from the auth server and calls the
# monolith's internal sync API.
PROCESS_FLOWS = {
    ("auth", "redis", 6379),
    ("router", "monolith", 8001),
    ("router", "cqrs", 8002),
    ("router", "auth", 8000),
    ("router", "redis", 6379),
    ("monolith", "auth", 8000),
    ("monolith", "redis", 6379),
    ("cqrs", "auth", 8000),
    ("cqrs", "redis", 6379),
    ("projector", "redis", 6379),
    ("reverse-sync", "monolith", 8001),
    ("reverse-sync", "auth", 8000),
    ("reverse-sync", "redis", 6379),
}
# The reconcile job compares both sides and the read model.
RECONCILE_FLOWS = {
    ("reconcile", "monolith", 8001),
    ("reconcile", "cqrs", 8002),
    ("reconcile", "auth", 8000),
    ("reconcile", "redis", 6379),
}
REDIS_CLIENTS = {"auth", "router", "monolith", "cqrs", "projector", "reverse-sync", "reconcile"}
# Pods that open no connections at all, so not even DNS.
SILENT = {"redis"}
PUBLIC_ENTRY_POINTS = {("router", 8080), ("auth", 8000)}

KUBE_DNS = Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, ports={"dns": 53})
INTERNET = Endpoint("internet", ip="203.0.113.9")
EXTERNAL_REDIS = Endpoint("external-redis", ip="192.0.2.10")
INGRESS_CONTROLLER = Endpoint("ingress", "ingress-nginx", {"app": "ingress-nginx"})
PROMETHEUS = Endpoint("prometheus", "monitoring", {"app": "prometheus"})
OTHER_POD = Endpoint("other", "ztcqrs", {"app": "unrelated"})


def _expected_flows(components: set[str]) -> set[tuple[str, str, int]]:
    flows = PROCESS_FLOWS | (RECONCILE_FLOWS if "reconcile" in components else set())
    return {flow for flow in flows if flow[0] in components and flow[1] in components}


def _pods(scenario: str) -> dict[str, Endpoint]:
    return {
        pod.component: Endpoint.of(pod)
        for pod in policy.pod_templates(rendering_of(scenario).objects)
    }


def _policies(scenario: str) -> list[dict]:
    return [item for item in rendering_of(scenario).objects if item["kind"] == "NetworkPolicy"]


def test_flows_match_process_table(scenario: str) -> None:
    components = set(_pods(scenario))
    assert policy.allowed_flows(rendering_of(scenario).objects) == _expected_flows(components)


def test_dns_for_connecting_pods(scenario: str) -> None:
    policies = _policies(scenario)
    for name, pod in _pods(scenario).items():
        allowed = policy.connection_allowed(policies, pod, KUBE_DNS, 53, "UDP")
        assert allowed is (name not in SILENT), name


def test_internet_unreachable(scenario: str) -> None:
    policies = _policies(scenario)
    for name, pod in _pods(scenario).items():
        assert not policy.connection_allowed(policies, pod, INTERNET, 443), name


def test_public_entry_points_open() -> None:
    policies = _policies("default")
    for name, pod in _pods("default").items():
        for port in set(pod.ports.values()):
            allowed = policy.connection_allowed(policies, INTERNET, pod, port)
            assert allowed is ((name, port) in PUBLIC_ENTRY_POINTS), (name, port)


def test_public_entry_points_narrowed() -> None:
    policies = _policies("monitoring-values.yaml")
    pods = _pods("monitoring-values.yaml")
    for name, port in PUBLIC_ENTRY_POINTS:
        assert policy.connection_allowed(policies, INGRESS_CONTROLLER, pods[name], port), name
        assert not policy.connection_allowed(policies, INTERNET, pods[name], port), name
        assert not policy.connection_allowed(policies, OTHER_POD, pods[name], port), name


def test_metrics_scrapers_reach_services() -> None:
    policies = _policies("monitoring-values.yaml")
    pods = _pods("monitoring-values.yaml")
    for name, port in [("auth", 8000), ("router", 8080), ("monolith", 8001), ("cqrs", 8002)]:
        assert policy.connection_allowed(policies, PROMETHEUS, pods[name], port), name
    assert not policy.connection_allowed(policies, PROMETHEUS, pods["redis"], 6379)
    assert not policy.connection_allowed(_policies("default"), PROMETHEUS, pods["monolith"], 8001)


def test_external_redis_reached_by_clients() -> None:
    policies = _policies("external-redis-values.yaml")
    for name, pod in _pods("external-redis-values.yaml").items():
        allowed = policy.connection_allowed(policies, pod, EXTERNAL_REDIS, 6380)
        assert allowed is (name in REDIS_CLIENTS), name
        assert not policy.connection_allowed(policies, pod, EXTERNAL_REDIS, 6379), name


def test_flow_check_reports_extra_flow() -> None:
    objects = copy.deepcopy(list(rendering_of("default").objects))
    policies = {
        item["metadata"]["name"]: item for item in objects if item["kind"] == "NetworkPolicy"
    }
    # Auth may now connect anywhere, and Redis accepts every pod of the namespace.
    policies["ztcqrs-auth"]["spec"]["egress"] = [{"to": [{"podSelector": {}}]}]
    policies["ztcqrs-redis"]["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]

    extra = policy.allowed_flows(objects) - _expected_flows(set(_pods("default")))

    assert extra == {("auth", "router", 8080), ("auth", "auth", 8000)}
