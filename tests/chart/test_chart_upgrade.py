"""Secrets the chart generates keep their values on upgrades, because the templates read them back
with `lookup`.

These tests use an in-memory Kubernetes API emulator (`kmock`), not a cluster: Helm's engine
renders cluster-aware against it, so `lookup` finds the Secrets a previous install created.
"""

import asyncio
import base64
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import helm_python as helm
import kmock
import pytest
import yaml

from tests.chart.render import CHART_DIR, NAMESPACE, RELEASE

SECRETS = kmock.resource("v1/secrets")
START_TIMEOUT_SECONDS = 10.0


@dataclass
class ApiEmulator:
    """A kmock Kubernetes emulator served on a loopback port from a thread of its own, because
    Helm's calls block the thread that makes them."""

    objects: dict[str, dict[str, Any]]
    url: str = ""
    _ready: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_SECONDS):
            raise TimeoutError(f"kmock did not start within {START_TIMEOUT_SECONDS} s.")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_SECONDS)

    async def _serve(self) -> None:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources["v1/secrets"] = kmock.ResourceInfo(
                namespaced=True, kind="Secret", singular="secret", verbs={"get", "list"}
            )
            for name, secret in self.objects.items():
                emulator.objects[SECRETS, NAMESPACE, name] = secret
            self.url = str(server.url).rstrip("/")
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
    }


INSTALLED = {
    "ztcqrs-auth-signing-key": {"signing-key.pem": "-----BEGIN RSA PRIVATE KEY-----\nkept\n"},
    # The admin client secret is missing, as after an upgrade from a release without it.
    "ztcqrs-client-secrets": {"reverse-sync-client-secret": "kept-reverse-sync-secret-0123"},
    "ztcqrs-redis": {"password": "keptRedisPassword0123456789"},
}


@pytest.fixture
def cluster() -> Iterator[ApiEmulator]:
    emulator = ApiEmulator({name: _secret(name, data) for name, data in INSTALLED.items()})
    emulator.start()
    yield emulator
    emulator.stop()


def _upgrade_secrets(cluster: ApiEmulator) -> dict[str, dict[str, str]]:
    with (
        helm.Config(kube_apiserver=cluster.url, namespace=NAMESPACE) as config,
        helm.Chart.load(str(CHART_DIR)) as chart,
    ):
        manifests = config.render(chart, {}, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    secrets = {}
    for path, text in manifests.items():
        if not path.endswith(".yaml"):  # NOTES.txt
            continue
        for document in yaml.safe_load_all(text):
            if document and document["kind"] == "Secret":
                secrets[document["metadata"]["name"]] = {
                    key: base64.b64decode(value).decode() for key, value in document["data"].items()
                }
    return secrets


def test_upgrade_keeps_generated_secrets(cluster: ApiEmulator) -> None:
    secrets = _upgrade_secrets(cluster)

    assert secrets["ztcqrs-auth-signing-key"] == INSTALLED["ztcqrs-auth-signing-key"]
    assert secrets["ztcqrs-redis"] == INSTALLED["ztcqrs-redis"]
    assert (
        secrets["ztcqrs-client-secrets"]["reverse-sync-client-secret"]
        == (INSTALLED["ztcqrs-client-secrets"]["reverse-sync-client-secret"])
    )


def test_upgrade_generates_missing_entry(cluster: ApiEmulator) -> None:
    secrets = _upgrade_secrets(cluster)

    admin_secret = secrets["ztcqrs-client-secrets"]["admin-client-secret"]
    assert len(admin_secret) == 40
    assert admin_secret.isalnum()
