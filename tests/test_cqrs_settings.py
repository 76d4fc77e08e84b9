"""CQRS settings: environment names, defaults and the reverse-sync client secret."""

import asyncio
from pathlib import Path

import pytest

from services.cqrs.settings import DEV_SYNC_CLIENT_SECRET, Settings
from services.cqrs.workers import reverse_sync


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZTCQRS_DATA_DIR", str(tmp_path))
    settings = Settings()

    assert settings.host == "127.0.0.1"
    assert settings.port == 8002
    assert settings.database_file == tmp_path / "cqrs.db"
    assert settings.read_wait_ms == 500
    assert settings.relay_batch_size == 500
    assert settings.max_tries == 5
    assert settings.claim_idle_ms == 30_000
    assert settings.sync_client_id == "cqrs-reverse-sync"
    assert settings.consumer_name
    assert settings.sync_client_secret is not None
    assert settings.sync_client_secret.get_secret_value() == DEV_SYNC_CLIENT_SECRET


def test_settings_read_cqrs_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CQRS_PORT", "9102")
    monkeypatch.setenv("CQRS_DATABASE_PATH", str(tmp_path / "other.db"))
    monkeypatch.setenv("CQRS_READ_WAIT_MS", "50")
    monkeypatch.setenv("CQRS_CONSUMER_NAME", "worker-7")
    monkeypatch.setenv("CQRS_SYNC_CLIENT_SECRET", "s3cret")
    monkeypatch.setenv("ZTCQRS_PHASE", "cutover")
    settings = Settings()

    assert settings.port == 9102
    assert settings.database_file == tmp_path / "other.db"
    assert settings.read_wait_ms == 50
    assert settings.consumer_name == "worker-7"
    assert settings.require_sync_client_secret().get_secret_value() == "s3cret"
    assert settings.phase.authority == "cqrs"
    assert "s3cret" not in repr(settings)


def test_sync_secret_required_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTCQRS_ENV", "production")
    monkeypatch.delenv("CQRS_SYNC_CLIENT_SECRET", raising=False)
    settings = Settings()
    assert settings.sync_client_secret is None

    with pytest.raises(ValueError, match="CQRS_SYNC_CLIENT_SECRET"):
        asyncio.run(reverse_sync.run(settings, asyncio.Event()))

    monkeypatch.setenv("CQRS_SYNC_CLIENT_SECRET", DEV_SYNC_CLIENT_SECRET)
    with pytest.raises(ValueError, match="development secret"):
        Settings().require_sync_client_secret()
