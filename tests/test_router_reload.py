"""Rules file loading and live reload of the gray router."""

import asyncio
import hashlib
import os
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.router.app import create_app
from services.router.reloader import RulesReloader, load_rules_file
from services.router.rules import RequestFacts, RulesError
from services.router.settings import Settings


def rules_text(percent: float) -> str:
    return f"""\
version: 1
salt: reload-test
default_target: monolith
rules:
  - name: canary
    split: {{target: cqrs, percent: {percent}}}
    otherwise: monolith
"""


INVALID_TEXT = rules_text(100).replace("percent: 100", "percent: 120")


def target_of(reloader: RulesReloader, subject: str) -> str:
    facts = RequestFacts("GET", "/orders", {}, subject, {})
    return reloader.current.rules.select(facts).target


def reload_count(result: str) -> float:
    value = REGISTRY.get_sample_value("ztcqrs_router_rule_reloads_total", {"result": result})
    return value or 0.0


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(RulesError) as caught:
        load_rules_file(missing)
    assert str(missing) in str(caught.value)
    assert "cannot be read" in str(caught.value)


def test_load_invalid_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(INVALID_TEXT)
    with pytest.raises(RulesError) as caught:
        load_rules_file(path)
    assert str(path) in str(caught.value)
    assert "rule 'canary': split.percent must be between 0 and 100, got 120" in str(caught.value)


def test_create_app_rejects_invalid_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(INVALID_TEXT)
    with pytest.raises(RulesError) as caught:
        create_app(Settings(rules_file=path))
    assert str(path) in str(caught.value)


def test_loaded_rules_version_is_content_hash(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(0))
    loaded = load_rules_file(path)
    assert loaded.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert loaded.source == path
    assert loaded.loaded_at.endswith("Z")


def test_reload_new_percent_changes_target(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(0))
    reloader = RulesReloader(path, poll_seconds=1.0)
    old_version = reloader.current.version
    assert target_of(reloader, "alice") == "monolith"
    successes = reload_count("success")

    assert reloader.reload() is False
    path.write_text(rules_text(100))
    assert reloader.reload() is True

    assert target_of(reloader, "alice") == "cqrs"
    assert reloader.current.version != old_version
    assert reload_count("success") == successes + 1


async def test_reload_polling_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(0))
    reloader = RulesReloader(path, poll_seconds=0.02)
    reloader.start()
    try:
        in_flight = reloader.current
        await asyncio.to_thread(path.write_text, rules_text(100))
        for _ in range(250):
            if reloader.current is not in_flight:
                break
            await asyncio.sleep(0.02)
        assert target_of(reloader, "alice") == "cqrs"
        # A request that took its reference before the reload keeps routing on the old rules.
        old_facts = RequestFacts("GET", "/", {}, "alice", {})
        assert in_flight.rules.select(old_facts).target == "monolith"
    finally:
        await reloader.stop()


def test_reload_invalid_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(100))
    reloader = RulesReloader(path, poll_seconds=1.0)
    good_version = reloader.current.version
    failures = reload_count("failure")

    path.write_text(INVALID_TEXT)
    assert reloader.reload() is False

    assert reloader.current.version == good_version
    assert target_of(reloader, "alice") == "cqrs"
    assert reloader.last_error is not None
    assert "split.percent must be between 0 and 100, got 120" in reloader.last_error
    assert reloader.last_error_at is not None
    assert reload_count("failure") == failures + 1

    # The same bad content is counted once, not once per poll.
    assert reloader.reload() is False
    assert reload_count("failure") == failures + 1

    path.write_text(rules_text(0))
    assert reloader.reload() is True
    assert target_of(reloader, "alice") == "monolith"


def test_reload_missing_file_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(100))
    reloader = RulesReloader(path, poll_seconds=1.0)
    failures = reload_count("failure")

    path.unlink()
    assert reloader.reload() is False

    assert target_of(reloader, "alice") == "cqrs"
    assert reloader.last_error is not None
    assert "cannot read the file" in reloader.last_error
    assert reload_count("failure") == failures + 1


def make_configmap_dir(root: Path, text: str) -> Path:
    """Lay out a folder the way the kubelet mounts a ConfigMap and return the rules path."""
    data = root / "..2026_01_01_00_00_00.000000001"
    data.mkdir()
    (data / "rules.yaml").write_text(text)
    (root / "..data").symlink_to(data.name)
    (root / "rules.yaml").symlink_to("..data/rules.yaml")
    return root / "rules.yaml"


def swap_configmap_data(root: Path, text: str, mtime: float) -> None:
    """Publish new content the way the kubelet does: a new folder and an atomic `..data` rename."""
    data = root / f"..2026_01_02_{uuid.uuid4().hex}"
    data.mkdir()
    (data / "rules.yaml").write_text(text)
    os.utime(data / "rules.yaml", (mtime, mtime))
    staging = root / "..data_tmp"
    staging.symlink_to(data.name)
    os.replace(staging, root / "..data")


def test_reload_sees_symlink_swap(tmp_path: Path) -> None:
    path = make_configmap_dir(tmp_path, rules_text(0))
    reloader = RulesReloader(path, poll_seconds=1.0)
    assert target_of(reloader, "alice") == "monolith"
    old_mtime = os.stat(path).st_mtime

    # Same mtime as before, so only a content comparison can notice the change.
    swap_configmap_data(tmp_path, rules_text(100), old_mtime)

    assert os.stat(path).st_mtime == old_mtime
    assert reloader.reload() is True
    assert target_of(reloader, "alice") == "cqrs"
    assert reloader.current.source == path
