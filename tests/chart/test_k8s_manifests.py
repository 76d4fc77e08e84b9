"""The plain manifests in k8s/ are the chart's render with default values, minus its Secrets."""

import shutil
from pathlib import Path

import yaml

from tests.chart.conftest import rendering_of
from tests.chart.render import K8S_DIR, drift


def test_k8s_matches_chart() -> None:
    assert drift(K8S_DIR, rendering_of("default")) == []


def test_k8s_holds_no_secret() -> None:
    kinds = {
        document["kind"]
        for path in K8S_DIR.glob("*.yaml")
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document
    }
    assert "Secret" not in kinds
    assert "Deployment" in kinds


def test_k8s_readme_creates_secrets() -> None:
    readme = (K8S_DIR / "README.md").read_text(encoding="utf-8")
    for secret in (item for item in rendering_of("default").objects if item["kind"] == "Secret"):
        name = secret["metadata"]["name"]
        assert f"create secret generic {name}" in readme, name
        for key in secret["data"]:
            assert key in readme, f"{name}/{key}"


def test_drift_check_fails(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, copy)
    deployment = copy / "deployment.yaml"
    deployment.write_text(
        deployment.read_text(encoding="utf-8").replace("replicas: 2", "replicas: 5", 1),
        encoding="utf-8",
    )
    (copy / "service.yaml").unlink()
    (copy / "ingress.yaml").write_text("kind: Ingress\n", encoding="utf-8")

    assert drift(copy, rendering_of("default")) == [
        f"{deployment} differs from the chart's render.",
        f"{copy / 'service.yaml'} is missing.",
        f"{copy / 'ingress.yaml'} is not rendered by the chart any more.",
    ]
