"""`ztcqrs rollout` against a real rules file, a real router, and a Kubernetes API.

The ConfigMap tests use an in-memory Kubernetes API emulator (`kmock`), not a cluster, served on a
loopback port and reached through the official `kubernetes` client with a kubeconfig file.
kmock stores objects but does not check resourceVersion, so `VersionedConfigMaps` below adds the
API server's optimistic concurrency: a patch that carries an outdated resourceVersion gets 409.
"""

import asyncio
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from services.cli import rollout as rollout_module
from services.cli.main import build_parser
from services.cli.rules_store import EditConflict, FileStore
from services.router.rules import parse_rules
from tests.conftest import SigningKey
from tests.router_support import router_settings, running_router

RULES = """\
# Rollout test rules.
version: 1
salt: rollout-test  # fixed per environment
default_target: monolith

rules:
  # Orders move first.
  - name: orders
    match:
      paths: ["/orders/**"]
    split:
      target: cqrs
      percent: 5  # raised a step at a time
    otherwise: monolith

  - name: default
    target: monolith
"""

TWO_SPLITS = RULES.replace(
    "  - name: default\n",
    "  - name: products\n    split: {target: cqrs, percent: 30}\n\n  - name: default\n",
)

NAMESPACE = "rollout-test"
CONFIGMAP = "ztcqrs-rules"
CONFIGMAPS = kmock.resource("v1/configmaps")
START_TIMEOUT_SECONDS = 10.0

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def rollout(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run `ztcqrs rollout ARGS...` in-process; return the exit code, stdout and stderr."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        args = build_parser().parse_args(["rollout", *argv])
        code = args.handler(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def loaded(path: Path) -> dict[str, Any]:
    """Return the rules as the router's YAML loader reads them, after checking that they parse."""
    text = path.read_text()
    parse_rules(text)
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def percent_of(document: dict[str, Any], rule: str) -> Any:
    return next(item for item in document["rules"] if item["name"] == rule)["split"]["percent"]


# Rules file


def test_set_percent_keeps_comments(rollout: Run, rules_file: Path) -> None:
    code, out, err = rollout("set", "--percent", "20", "--file", str(rules_file))

    assert code == 0, err
    assert "rules[orders].split.percent: 5 -> 20" in out
    old_lines = RULES.splitlines()
    new_lines = rules_file.read_text().splitlines()
    assert len(new_lines) == len(old_lines)
    changed = [
        index for index, (old, new) in enumerate(zip(old_lines, new_lines, strict=True))
        if old != new
    ]
    assert len(changed) == 1
    assert re.fullmatch(r"      percent: 20 +# raised a step at a time", new_lines[changed[0]])
    assert percent_of(loaded(rules_file), "orders") == 20


def test_set_decimal_percent(rollout: Run, rules_file: Path) -> None:
    code, out, _ = rollout("set", "--percent", "12.5", "--file", str(rules_file))

    assert code == 0
    assert "5 -> 12.5" in out
    assert percent_of(loaded(rules_file), "orders") == 12.5
    split = parse_rules(rules_file.read_text()).rules[0].split
    assert split is not None
    assert split.percent == 12.5


@pytest.mark.parametrize("percent", ["101", "-1", "abc", "nan", "inf", ""])
def test_set_rejects_invalid_percent(rollout: Run, rules_file: Path, percent: str) -> None:
    code, out, err = rollout("set", "--percent", percent, "--file", str(rules_file))

    assert code == 1
    assert f"Invalid percent {percent!r}" in err
    assert "from 0 to 100" in err
    assert out == ""
    assert rules_file.read_text() == RULES


def test_set_unknown_rule_names_split_rules(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(TWO_SPLITS)

    code, _, err = rollout("set", "--percent", "10", "--rule", "checkout", "--file", str(path))

    assert code == 1
    assert "No split rule named 'checkout'" in err
    assert "orders, products" in err
    assert path.read_text() == TWO_SPLITS


def test_set_without_rule_needs_one_split(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(TWO_SPLITS)

    code, _, err = rollout("set", "--percent", "10", "--file", str(path))

    assert code == 1
    assert "several split rules (orders, products)" in err
    assert "--rule NAME" in err
    assert path.read_text() == TWO_SPLITS


def test_set_rule_in_flow_mapping(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(TWO_SPLITS)

    code, out, _ = rollout("set", "--percent", "40", "--rule", "products", "--file", str(path))

    assert code == 0
    assert "rules[products].split.percent: 30 -> 40" in out
    assert "    split: {target: cqrs, percent: 40}\n" in path.read_text()
    assert percent_of(loaded(path), "orders") == 5


def test_set_same_percent_writes_nothing(rollout: Run, rules_file: Path) -> None:
    inode = rules_file.stat().st_ino

    code, out, _ = rollout("set", "--percent", "5.0", "--file", str(rules_file))

    assert code == 0
    assert "no change" in out
    assert rules_file.stat().st_ino == inode
    assert rules_file.read_text() == RULES


def test_set_rejects_rules_router_would_reject(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    invalid = RULES.replace("default_target: monolith\n", "default_target: elsewhere\n")
    path.write_text(invalid)

    code, _, err = rollout("set", "--percent", "10", "--file", str(path))

    assert code == 1
    assert "nothing was written" in err
    assert "default_target must be 'monolith' or 'cqrs', got 'elsewhere'" in err
    assert path.read_text() == invalid


def test_freeze_creates_guard(rollout: Run, rules_file: Path) -> None:
    code, out, _ = rollout("freeze", "--file", str(rules_file))

    assert code == 0
    assert "guard.frozen: (unset) -> true" in out
    document = loaded(rules_file)
    assert document["guard"] == {"frozen": True}
    assert rules_file.read_text().startswith(RULES)


def test_freeze_twice_changes_nothing(rollout: Run, rules_file: Path) -> None:
    rollout("freeze", "--file", str(rules_file))
    frozen_text = rules_file.read_text()

    code, out, _ = rollout("freeze", "--file", str(rules_file))

    assert code == 0
    assert "no change" in out
    assert rules_file.read_text() == frozen_text


def test_unfreeze_sets_reset_at(rollout: Run, rules_file: Path) -> None:
    rules_file.write_text(RULES + "\nguard:\n  frozen: true  # frozen during the incident\n")
    before = datetime.now(UTC)

    code, out, _ = rollout("unfreeze", "--file", str(rules_file))

    assert code == 0
    assert "guard.frozen: true -> false" in out
    assert "guard.reset_at: (unset) -> " in out
    document = loaded(rules_file)
    assert document["guard"]["frozen"] is False
    reset_at = datetime.fromisoformat(document["guard"]["reset_at"])
    assert reset_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= reset_at <= datetime.now(UTC)
    assert "# frozen during the incident" in rules_file.read_text()


def test_rollback_zeroes_every_split(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(TWO_SPLITS)

    code, out, _ = rollout("rollback", "--file", str(path))

    assert code == 0
    assert "rules[orders].split.percent: 5 -> 0" in out
    assert "rules[products].split.percent: 30 -> 0" in out
    document = loaded(path)
    assert percent_of(document, "orders") == 0
    assert percent_of(document, "products") == 0
    assert "  # Orders move first.\n" in path.read_text()


def test_status_prints_file_state(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(TWO_SPLITS + "\nguard:\n  frozen: true\n  reset_at: null\n")

    code, out, _ = rollout("status", "--file", str(path))
    json_code, json_out, _ = rollout("status", "--json", "--file", str(path))

    assert code == 0
    assert "split orders: 5% of users to cqrs" in out
    assert "split products: 30% of users to cqrs" in out
    assert "frozen: true" in out
    assert "reset_at: (unset)" in out
    assert "  guard trip: not shown" in out
    assert "Pass --router-url URL with a token of scope gray:admin" in out
    assert json_code == 0
    status = json.loads(json_out)
    assert "guard trip" not in json_out
    assert status["splits"] == [
        {"rule": "orders", "target": "cqrs", "percent": 5},
        {"rule": "products", "target": "cqrs", "percent": 30},
    ]
    assert status["frozen"] is True
    assert status["reset_at"] is None
    assert status["invalid"] is None
    assert re.fullmatch(r"[0-9a-f]{12}", status["version"])
    assert status["version"] in out


def test_status_reports_invalid_rules(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES.replace("percent: 5 ", "percent: 500 "))

    code, out, _ = rollout("status", "--file", str(path))
    json_code, json_out, _ = rollout("status", "--json", "--file", str(path))

    assert code == 1
    assert "split orders: 500% of users to cqrs" in out
    assert "invalid: rule 'orders': split.percent must be between 0 and 100, got 500" in out
    assert json_code == 1
    assert "got 500" in json.loads(json_out)["invalid"]


def test_set_json_reports_changes(rollout: Run, rules_file: Path) -> None:
    code, out, _ = rollout("set", "--percent", "50", "--json", "--file", str(rules_file))

    assert code == 0
    result = json.loads(out)
    assert result["changes"] == [
        {"field": "rules[orders].split.percent", "old": 5, "new": 50}
    ]
    assert result["written"] is True
    assert result["version_before"] != result["version"]


def test_error_json_on_stdout(rollout: Run, rules_file: Path) -> None:
    code, out, err = rollout("set", "--percent", "300", "--json", "--file", str(rules_file))

    assert code == 1
    assert "Invalid percent '300'" in json.loads(out)["error"]
    assert err.startswith("error: ")


def test_missing_file_error(rollout: Run, tmp_path: Path) -> None:
    code, _, err = rollout("status", "--file", str(tmp_path / "absent.yaml"))

    assert code == 1
    assert "absent.yaml" in err
    assert "--file" in err


def test_atomic_write_leaves_no_temp_files(rollout: Run, tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    path = folder / "rules.yaml"
    path.write_text(RULES)
    path.chmod(0o640)
    # A second link to the original inode keeps it alive, so it shows whether the file was
    # replaced by rename (the link keeps the old text) or rewritten in place.
    original = tmp_path / "original.yaml"
    original.hardlink_to(path)

    for argv in (["set", "--percent", "10"], ["freeze"], ["unfreeze"], ["rollback"]):
        code, _, err = rollout(*argv, "--file", str(path))
        assert code == 0, err

    assert sorted(os.listdir(folder)) == ["rules.yaml"]
    assert original.read_text() == RULES
    assert path.read_text() != RULES
    assert path.stat().st_mode & 0o777 == 0o640


def test_symlinked_file_keeps_link(rollout: Run, rules_file: Path, tmp_path: Path) -> None:
    link = tmp_path / "current.yaml"
    link.symlink_to(rules_file)

    code, _, _ = rollout("set", "--percent", "15", "--file", str(link))

    assert code == 0
    assert link.is_symlink()
    assert percent_of(loaded(rules_file), "orders") == 15


def test_file_store_rejects_stale_write(rules_file: Path) -> None:
    store = FileStore(rules_file)
    snapshot = store.read()
    rules_file.write_text(RULES.replace("percent: 5", "percent: 7"))

    with pytest.raises(EditConflict):
        store.write(RULES.replace("percent: 5", "percent: 9"), snapshot.token)

    assert "percent: 7" in rules_file.read_text()


def test_default_file_from_router_setting(
    rollout: Run, rules_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_RULES_FILE", str(rules_file))

    code, out, _ = rollout("set", "--percent", "25")

    assert code == 0
    assert str(rules_file) in out
    assert percent_of(loaded(rules_file), "orders") == 25


def test_kubernetes_options_need_configmap(rollout: Run, rules_file: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rollout("status", "--file", str(rules_file), "--namespace", "other")

    assert exit_info.value.code == 2


# Live router status


async def test_status_shows_router_guard(
    rollout: Run, rules_file: Path, signing_key: SigningKey, redis_url: str
) -> None:
    settings = router_settings(
        rules_file, "http://127.0.0.1:9", "http://127.0.0.1:9", redis_url=redis_url
    )
    admin = signing_key.token("ztcqrs-admin", client_id="ztcqrs-admin", scope="gray:admin")
    async with running_router(signing_key, settings) as router:
        # unfreeze sets reset_at, and freeze then keeps it, so the router reports both.
        await asyncio.to_thread(rollout, "unfreeze", "--file", str(rules_file))
        await asyncio.to_thread(rollout, "freeze", "--file", str(rules_file))
        for _ in range(100):
            body = (await router.get("/_gray/status", headers={"Authorization": f"Bearer {admin}"}))
            if body.json().get("guard", {}).get("frozen"):
                break
            await asyncio.sleep(0.05)

        code, out, err = await asyncio.to_thread(
            rollout, "status", "--file", str(rules_file), "--router-url", str(router.base_url),
            "--token", admin,
        )
        json_code, json_out, _ = await asyncio.to_thread(
            rollout, "status", "--json", "--file", str(rules_file), "--router-url",
            str(router.base_url), "--token", admin,
        )

    status = json.loads(json_out)
    file_reset_at = status["reset_at"]
    assert code == 0, err
    assert "the same rules" in out
    assert "guard.frozen: true" in out
    # The router reports the file's reset_at in the file's own ISO 8601 format.
    assert f"  reset_at: {file_reset_at}\n" in out
    assert f"  guard.reset_at: {file_reset_at}\n" in out
    assert "  guard.tripped_at: -\n" in out
    assert "guard trip: not shown" not in out
    assert json_code == 0
    assert status["router"]["rules_version"] == status["version"]
    assert status["router"]["guard"]["frozen"] is True
    assert status["router"]["guard"]["reset_at"] == file_reset_at


def test_router_epoch_times_print_as_iso(capsys: pytest.CaptureFixture[str]) -> None:
    # Routers whose status body still has epoch seconds print like the current ones.
    guard = {"frozen": False, "tripped": True, "tripped_at": 1796427201.869075, "reset_at": None}

    rollout_module._print_router("http://127.0.0.1:9", {"guard": guard}, "abc")
    out = capsys.readouterr().out

    assert "  guard.tripped_at: 2026-12-04T23:33:21.869075Z\n" in out
    assert "  guard.reset_at: -\n" in out


def test_status_router_needs_token(
    rollout: Run, rules_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZTCQRS_TOKEN", raising=False)

    code, _, err = rollout(
        "status", "--file", str(rules_file), "--router-url", "http://127.0.0.1:9"
    )

    assert code == 1
    assert "--token" in err
    assert "ZTCQRS_TOKEN" in err


# Kubernetes ConfigMap


class VersionedConfigMaps(kmock.KubernetesEmulator):
    """kmock's emulator with the API server's resourceVersion check on ConfigMap patches.

    `other_writer` stands for a second operator: each call in it changes the stored ConfigMap
    right before the next patch arrives, as if it had been written between our get and patch.
    """

    other_writer: list[Callable[[dict[str, Any]], dict[str, Any]]]

    async def _handle(self, request: kmock.Request) -> Any:
        name = request.name
        if request.resource != CONFIGMAPS or request.action != kmock.action.UPDATE or not name:
            return await super()._handle(request)
        key = (CONFIGMAPS, request.namespace, name)
        writers: list[Callable[[dict[str, Any]], dict[str, Any]]] = self.other_writer
        if writers and key in self.objects:
            self._store(key, writers.pop(0)(self.objects[key].raw))
        if key in self.objects:
            stored = self.objects[key].raw["metadata"]["resourceVersion"]
            sent = ((request.data or {}).get("metadata") or {}).get("resourceVersion")
            if sent is not None and sent != stored:
                raise kmock.KubernetesError(
                    status=409, reason="Conflict",
                    message=f'Operation cannot be fulfilled on configmaps "{request.name}": the '
                    "object has been modified; please apply your changes to the latest version "
                    "and try again",
                )
        response = await super()._handle(request)
        if key in self.objects:
            self._store(key, self.objects[key].raw)
        return response

    def _store(self, key: Any, config_map: dict[str, Any]) -> None:
        """Store `config_map` under a new resourceVersion."""
        version = int(config_map["metadata"]["resourceVersion"]) + 1
        self.objects[key].patch(
            {"metadata": {"resourceVersion": str(version)}, "data": config_map["data"]}
        )


class KubernetesApi:
    """A VersionedConfigMaps emulator served from a thread, because the kubernetes client blocks
    the thread that calls it."""

    def __init__(self) -> None:
        self.url = ""
        self.emulator: VersionedConfigMaps | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_SECONDS):
            raise TimeoutError(f"kmock did not start within {START_TIMEOUT_SECONDS} s.")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(START_TIMEOUT_SECONDS)

    async def _serve(self) -> None:
        async with VersionedConfigMaps() as emulator, kmock.Server(emulator) as server:
            emulator.other_writer = []
            emulator.resources["v1/configmaps"] = kmock.ResourceInfo(
                namespaced=True, kind="ConfigMap", singular="configmap",
                verbs={"get", "patch", "update"},
            )
            emulator.objects[CONFIGMAPS, NAMESPACE, CONFIGMAP] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": CONFIGMAP, "namespace": NAMESPACE, "resourceVersion": "100"},
                "data": {"rules.yaml": RULES},
            }
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    @property
    def other_writer(self) -> list[Callable[[dict[str, Any]], dict[str, Any]]]:
        assert self.emulator is not None
        writers: list[Callable[[dict[str, Any]], dict[str, Any]]] = self.emulator.other_writer
        return writers

    def config_map(self) -> dict[str, Any]:
        assert self.emulator is not None
        config_map: dict[str, Any] = self.emulator.objects[CONFIGMAPS, NAMESPACE, CONFIGMAP].raw
        return config_map

    def rules(self) -> str:
        text: str = self.config_map()["data"]["rules.yaml"]
        return text

    def methods(self) -> list[str]:
        assert self.emulator is not None
        return [str(request.method.value) for request in self.emulator]


@pytest.fixture
def kubernetes_api() -> Iterator[KubernetesApi]:
    api = KubernetesApi()
    api.start()
    yield api
    api.stop()


@pytest.fixture
def kubeconfig(kubernetes_api: KubernetesApi, tmp_path: Path) -> Path:
    """A kubeconfig whose current context points at the emulator, in NAMESPACE."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": kubernetes_api.url}}],
                "users": [{"name": "operator", "user": {"token": "emulator-token"}}],
                "contexts": [
                    {
                        "name": "emulator",
                        "context": {"cluster": "emulator", "user": "operator",
                                    "namespace": NAMESPACE},
                    }
                ],
                "current-context": "emulator",
            }
        )
    )
    return path


def freeze_rules(config_map: dict[str, Any]) -> dict[str, Any]:
    """A second operator's edit: append a frozen guard to the rules."""
    data = dict(config_map["data"])
    data["rules.yaml"] += "\nguard:\n  frozen: true\n"
    return {**config_map, "data": data}


def test_configmap_set_patches_rules(
    rollout: Run, kubernetes_api: KubernetesApi, kubeconfig: Path
) -> None:
    code, out, err = rollout(
        "set", "--percent", "20", "--configmap", CONFIGMAP, "--kubeconfig", str(kubeconfig)
    )

    assert code == 0, err
    assert f"ConfigMap {NAMESPACE}/{CONFIGMAP} key rules.yaml:" in out
    assert "rules[orders].split.percent: 5 -> 20" in out
    text = kubernetes_api.rules()
    assert "  # Orders move first.\n" in text
    assert percent_of(yaml.safe_load(text), "orders") == 20
    parse_rules(text)
    assert kubernetes_api.config_map()["metadata"]["resourceVersion"] == "101"
    # Only the verbs the chart's rollout Role grants: get and patch.
    assert kubernetes_api.methods() == ["GET", "PATCH"]
    assert kubernetes_api.emulator is not None
    patch = list(kubernetes_api.emulator)[-1]
    assert patch.data["metadata"]["resourceVersion"] == "100"


def test_configmap_status(rollout: Run, kubernetes_api: KubernetesApi, kubeconfig: Path) -> None:
    code, out, _ = rollout(
        "status", "--json", "--configmap", CONFIGMAP, "--namespace", NAMESPACE,
        "--kubeconfig", str(kubeconfig), "--context", "emulator",
    )

    assert code == 0
    status = json.loads(out)
    assert status["location"] == f"ConfigMap {NAMESPACE}/{CONFIGMAP} key rules.yaml"
    assert status["splits"] == [{"rule": "orders", "target": "cqrs", "percent": 5}]
    assert status["frozen"] is False
    assert kubernetes_api.methods() == ["GET"]


def test_configmap_not_found(rollout: Run, kubernetes_api: KubernetesApi, kubeconfig: Path) -> None:
    code, _, err = rollout(
        "freeze", "--configmap", "absent-rules", "--kubeconfig", str(kubeconfig)
    )

    assert code == 1
    assert f"ConfigMap {NAMESPACE}/absent-rules not found" in err
    assert "--namespace" in err
    assert "PATCH" not in kubernetes_api.methods()


def test_configmap_missing_key(
    rollout: Run, kubernetes_api: KubernetesApi, kubeconfig: Path
) -> None:
    code, _, err = rollout(
        "status", "--configmap", CONFIGMAP, "--key", "routing.yaml",
        "--kubeconfig", str(kubeconfig),
    )

    assert code == 1
    assert "has no key 'routing.yaml' (its keys: rules.yaml)" in err


def test_configmap_conflict_reapplies_edit(
    rollout: Run, kubernetes_api: KubernetesApi, kubeconfig: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kubernetes_api.other_writer.append(freeze_rules)

    with caplog.at_level(logging.WARNING, logger="services.cli.rules_store"):
        code, out, err = rollout(
            "set", "--percent", "20", "--json", "--configmap", CONFIGMAP,
            "--kubeconfig", str(kubeconfig),
        )

    assert code == 0, err
    assert json.loads(out)["conflicts"] == 1
    document = yaml.safe_load(kubernetes_api.rules())
    # Both edits survive: the other operator's freeze and this command's percent.
    assert document["guard"] == {"frozen": True}
    assert percent_of(document, "orders") == 20
    assert kubernetes_api.methods() == ["GET", "PATCH", "GET", "PATCH"]
    retries = [record for record in caplog.records if record.message.startswith("rules changed")]
    assert len(retries) == 1
    assert retries[0].location == f"ConfigMap {NAMESPACE}/{CONFIGMAP} key rules.yaml"  # type: ignore[attr-defined]


def test_configmap_keeps_losing_fails(
    rollout: Run, kubernetes_api: KubernetesApi, kubeconfig: Path
) -> None:
    def raise_percent(config_map: dict[str, Any]) -> dict[str, Any]:
        text = config_map["data"]["rules.yaml"]
        current = percent_of(yaml.safe_load(text), "orders")
        data = {"rules.yaml": text.replace(f"percent: {current} ", f"percent: {current + 1} ")}
        return {**config_map, "data": data}

    kubernetes_api.other_writer.extend([raise_percent] * 3)

    code, _, err = rollout(
        "rollback", "--configmap", CONFIGMAP, "--kubeconfig", str(kubeconfig)
    )

    assert code == 1
    assert "changed 3 times while this command edited it, so nothing was written" in err
    assert "ztcqrs rollout status" in err
    # The other operator's last write is what remains.
    assert percent_of(yaml.safe_load(kubernetes_api.rules()), "orders") == 8


def test_configmap_bad_kubeconfig(rollout: Run, tmp_path: Path) -> None:
    code, _, err = rollout(
        "status", "--configmap", CONFIGMAP, "--kubeconfig", str(tmp_path / "absent-kubeconfig")
    )

    assert code == 1
    assert "Loading Kubernetes configuration from" in err
    assert "--kubeconfig" in err


def test_freeze_rejects_repeated_section(rollout: Run, tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    original = RULES + "guard:\n  frozen: false\nguard:\n  frozen: true\n"
    path.write_text(original)

    code, _, err = rollout("freeze", "--file", str(path))

    assert code == 1
    assert 'duplicate key "guard"' in err
    assert "Merge the two sections into one" in err
    assert path.read_text() == original
