"""The chart renders with Helm's engine, lints strictly, and every object passes the strict
Kubernetes schemas, for the default values and each scenario in helm/ztcqrs/ci/."""

import base64
import copy
import re
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.auth.keys import load_key_ring
from tests.chart.conftest import rendering_of, scenario_path
from tests.chart.render import (
    CHART_DIR,
    ChartRenderError,
    lint,
    load_values,
    render,
    scenario_files,
)
from tests.chart.schemas import KUBERNETES_VERSIONS, validation_errors


def _objects(scenario: str, kind: str) -> list[dict]:
    return [item for item in rendering_of(scenario).objects if item["kind"] == kind]


def _secret_entry(scenario: str, name: str, key: str) -> bytes:
    secret = next(item for item in _objects(scenario, "Secret") if item["metadata"]["name"] == name)
    return base64.b64decode(secret["data"][key])


def test_scenarios_at_least_three() -> None:
    assert len(scenario_files()) >= 3, f"helm/ztcqrs/ci holds {scenario_files()}"


def test_lint_strict(scenario: str) -> None:
    values = {} if scenario == "default" else load_values(scenario_path(scenario))
    assert lint(values) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_valid(scenario: str, version: str) -> None:
    errors = [
        error
        for manifest in rendering_of(scenario).objects
        for error in validation_errors(manifest, version)
    ]
    assert errors == []


def test_render_namespaced(scenario: str) -> None:
    unnamespaced = [
        f"{item['kind']} {item['metadata']['name']}"
        for item in rendering_of(scenario).objects
        if item["metadata"].get("namespace") != "ztcqrs"
    ]
    assert unnamespaced == []


def test_validation_reports_all_errors() -> None:
    deployment = copy.deepcopy(_objects("default", "Deployment")[0])
    deployment["spec"]["replicas"] = "two"
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"

    errors = validation_errors(deployment, KUBERNETES_VERSIONS[0])

    assert len(errors) == 3, errors
    assert any("/spec/replicas" in error for error in errors)
    assert any("'livenessProb' was unexpected" in error for error in errors)
    assert any("containerPort" in error for error in errors)


def test_validation_strict_for_prometheus_operator() -> None:
    monitor = copy.deepcopy(_objects("monitoring-values.yaml", "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "10s"

    errors = validation_errors(monitor, KUBERNETES_VERSIONS[0])

    assert len(errors) == 1, errors
    assert "'intervall' was unexpected" in errors[0]


def test_monitoring_objects_rendered() -> None:
    kinds = {item["kind"] for item in rendering_of("monitoring-values.yaml").objects}
    assert {"ServiceMonitor", "PrometheusRule", "CronJob"} <= kinds
    dashboards = [
        item
        for item in _objects("monitoring-values.yaml", "ConfigMap")
        if item["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert len(dashboards) == 1
    assert yaml.safe_load(dashboards[0]["data"]["ztcqrs.json"])["uid"] == "ztcqrs"


def test_optional_objects_off_by_default() -> None:
    kinds = {item["kind"] for item in rendering_of("default").objects}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert "CronJob" in kinds  # the reconcile job runs by default


def test_signing_key_generated_and_loadable(tmp_path: Path) -> None:
    pem = _secret_entry("default", "ztcqrs-auth-signing-key", "signing-key.pem")
    key_file = tmp_path / "signing-key.pem"
    key_file.write_bytes(pem)
    key_file.chmod(0o600)

    ring = load_key_ring(key_file, create_if_missing=False)

    private_key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(private_key, rsa.RSAPrivateKey)
    assert private_key.key_size >= 2048
    assert [key.kid for key in ring.published] == [ring.active.kid]


def test_generated_secrets_strong() -> None:
    for name, key in [
        ("ztcqrs-client-secrets", "reverse-sync-client-secret"),
        ("ztcqrs-client-secrets", "admin-client-secret"),
        ("ztcqrs-redis", "password"),
    ]:
        value = _secret_entry("default", name, key).decode()
        assert re.fullmatch(r"[A-Za-z0-9]{40}", value), f"{name}/{key} is not 40 alphanumerics"


def test_generated_secrets_differ_per_install() -> None:
    again = render()
    first = {item["metadata"]["name"]: item["data"] for item in _objects("default", "Secret")}
    second = {
        item["metadata"]["name"]: item["data"] for item in again.objects if item["kind"] == "Secret"
    }
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] != second[name], f"Secret {name} is the same in two installs"


def test_existing_secrets_not_rendered() -> None:
    rendering = rendering_of("existing-secrets-values.yaml")
    referenced = {
        variable["valueFrom"]["secretKeyRef"]["name"]
        for item in rendering.objects
        if item["kind"] in {"Deployment", "StatefulSet"}
        for container in item["spec"]["template"]["spec"]["containers"]
        for variable in container.get("env") or []
        if "secretKeyRef" in variable.get("valueFrom", {})
    }
    volumes = {
        volume["secret"]["secretName"]
        for item in rendering.objects
        if item["kind"] == "Deployment"
        for volume in item["spec"]["template"]["spec"].get("volumes") or []
        if "secret" in volume
    }

    assert [item for item in rendering.objects if item["kind"] == "Secret"] == []
    assert referenced == {"ztcqrs-client-secrets-vault", "ztcqrs-redis-vault"}
    assert volumes == {"ztcqrs-signing-key-2026"}
    assert "ztcqrs-rules" not in {
        item["metadata"]["name"] for item in _objects("existing-secrets-values.yaml", "ConfigMap")
    }


def test_values_schema_rejects_unknown_key() -> None:
    with pytest.raises(ChartRenderError, match="additional properties 'replica' not allowed"):
        render({"router": {"replica": 3}})


def test_values_schema_rejects_writable_root() -> None:
    with pytest.raises(ChartRenderError, match="readOnlyRootFilesystem"):
        render({"global": {"containerSecurityContext": {"readOnlyRootFilesystem": False}}})


def test_values_problems_reported_together() -> None:
    with pytest.raises(ChartRenderError) as failure:
        render({"redis": {"enabled": False}, "metrics": {"serviceMonitor": {"enabled": True}}})

    message = str(failure.value)
    assert "externalRedis.existingSecret is empty" in message
    assert "externalRedis.to is empty" in message
    assert "networkPolicy.metricsFrom is empty" in message


def test_notes_show_entry_points() -> None:
    notes = rendering_of("default").notes
    assert "port-forward svc/ztcqrs-router 8080:8080" in notes
    assert "port-forward svc/ztcqrs-auth 8000:8000" in notes
    assert "reconcile.enabled=true" in notes


def test_every_value_described() -> None:
    undocumented = _undocumented_values((CHART_DIR / "values.yaml").read_text(encoding="utf-8"))
    assert undocumented == []


def _undocumented_values(text: str) -> list[str]:
    """Return the dotted paths of values.yaml leaves with no `# --` comment on themselves or on
    an enclosing key, the helm-docs convention."""
    key_line = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")
    stack: list[tuple[int, str, bool]] = []  # indent, key, documented
    comment: list[str] = []
    leaves: list[tuple[str, bool]] = []
    lines = text.splitlines()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = key_line.match(line)
        if match is None:
            comment = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = bool(comment) and comment[0].startswith("# --")
        documented = documented or any(entry[2] for entry in stack)
        path = ".".join([*(entry[1] for entry in stack), match["key"]])
        comment = []
        if match["rest"].strip() or not _has_children(lines, number, indent):
            leaves.append((path, documented))
        stack.append((indent, match["key"], documented))
    return [path for path, documented in leaves if not documented]


def _has_children(lines: list[str], number: int, indent: int) -> bool:
    for line in lines[number + 1 :]:
        if not line.strip() or line.strip().startswith("#"):
            continue
        return len(line) - len(line.lstrip()) > indent or line.lstrip().startswith("- ")
    return False


def test_value_description_check_fails() -> None:
    text = "image:\n  # -- Tag.\n  tag: x\n  pullPolicy: Always\n# -- Rules.\nrules:\n  salt: s\n"
    assert _undocumented_values(text) == ["image.pullPolicy"]
