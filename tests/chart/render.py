"""Render the Helm chart with Helm's own engine, and write the plain manifests of k8s/ from it.

Helm 4's Go SDK, embedded in the `helm-python-sdk` package, renders through a client-side
dry-run install: the same code path as `helm template`, so hooks, NOTES.txt, `lookup` (which finds
nothing) and `.Capabilities` behave as they do there. No cluster is contacted.

`python -m tests.chart.render [DIR]` rewrites the plain manifests (default: k8s/).
"""

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "ztcqrs"
SCENARIO_DIR = CHART_DIR / "ci"
K8S_DIR = ROOT / "k8s"
RELEASE = "ztcqrs"
NAMESPACE = "ztcqrs"

# Secrets are left out of k8s/: a generated signing key or password committed to the repository
# would be public. k8s/README.md shows how to create them.
PLAIN_MANIFEST_SKIPPED_KINDS = frozenset({"Secret"})
PLAIN_MANIFEST_HEADER = (
    "# Rendered from helm/ztcqrs with its default values (release {release}, namespace "
    "{namespace})\n"
    "# by `make k8s`. Do not edit: change the chart and render again. Secrets are left out;\n"
    "# k8s/README.md shows how to create them.\n"
)
_DOCUMENT_SEPARATOR = re.compile(r"^---[ \t]*$", re.MULTILINE)

Manifest = dict[str, Any]


class ChartRenderError(RuntimeError):
    """Helm failed to render the chart with the given values."""


@dataclass(frozen=True)
class Rendering:
    """The manifests of one render: each document's text as Helm wrote it, and its object."""

    documents: tuple[str, ...]
    objects: tuple[Manifest, ...]
    notes: str


def scenario_files() -> list[Path]:
    """Return the chart's CI scenario values files, sorted by name."""
    return sorted(SCENARIO_DIR.glob("*.yaml"))


def load_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"Values file {path} must hold a YAML mapping, not {type(values).__name__}."
        )
    return values


def render(values: dict[str, Any] | None = None) -> Rendering:
    """Render the chart as `helm template` would, with `values` over the chart's defaults."""
    try:
        with helm.Config(namespace=NAMESPACE, storage_driver="memory") as config:
            release = config.install(
                str(CHART_DIR), RELEASE, values or {}, namespace=NAMESPACE, dry_run="client"
            )
    except helm.HelmError as error:
        raise ChartRenderError(f"Helm failed to render {CHART_DIR}: {error}") from error

    documents: list[str] = []
    objects: list[Manifest] = []
    for text in _DOCUMENT_SEPARATOR.split(release["manifest"]):
        manifest = yaml.safe_load(text)
        if manifest:
            documents.append(text.strip("\n"))
            objects.append(manifest)
    return Rendering(documents=tuple(documents), objects=tuple(objects), notes=release["notes"])


def lint(values: dict[str, Any] | None = None) -> list[str]:
    """Lint the chart strictly and return every warning and error as `path: message`."""
    report = helm.lint(str(CHART_DIR), values or {}, strict=True, namespace=NAMESPACE)
    findings = [
        f"{message['path']}: {message['error']}"
        for message in report["messages"]
        if message["severity"] >= 2  # 2 is a warning, 3 an error; infos pass
    ]
    return findings + [str(error) for error in report["errors"]]


def plain_manifests(rendering: Rendering) -> dict[str, str]:
    """Group a render into k8s/ files, one per kind (`deployment.yaml`, ...), Secrets left out."""
    by_kind: dict[str, list[str]] = defaultdict(list)
    for text, manifest in zip(rendering.documents, rendering.objects, strict=True):
        if manifest["kind"] not in PLAIN_MANIFEST_SKIPPED_KINDS:
            by_kind[manifest["kind"]].append(text)

    header = PLAIN_MANIFEST_HEADER.format(release=RELEASE, namespace=NAMESPACE)
    return {
        f"{kind.lower()}.yaml": header + "".join(f"---\n{text}\n" for text in texts)
        for kind, texts in sorted(by_kind.items())
    }


def write_plain_manifests(directory: Path) -> list[Path]:
    """Render the default values into `directory`, replacing the YAML files rendered before."""
    files = plain_manifests(render())
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.yaml"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def drift(directory: Path, rendering: Rendering) -> list[str]:
    """Compare `directory` with the plain manifests of `rendering`; return each difference."""
    expected = plain_manifests(rendering)
    problems = []
    for name, text in expected.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{path} is missing.")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path} differs from the chart's render.")
    problems += [
        f"{path} is not rendered by the chart any more."
        for path in sorted(directory.glob("*.yaml"))
        if path.name not in expected
    ]
    return problems


def main(argv: list[str]) -> int:
    directory = Path(argv[0]) if argv else K8S_DIR
    for path in write_plain_manifests(directory):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
