"""Write transactions on SQLite files shared by several connections, as the services open them."""

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from services.shared import database
from services.shared.database import BUSY_TIMEOUT_MS, begin_immediate, create_sqlite_engine


def holder(path: Path, seconds: float, lock_taken: threading.Event) -> threading.Thread:
    """Start a thread that holds the write lock of `path` for `seconds`."""

    def hold() -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        lock_taken.set()
        time.sleep(seconds)
        connection.execute("COMMIT")
        connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    return thread


def new_database(tmp_path: Path) -> Path:
    path = tmp_path / "shared.db"
    engine = create_sqlite_engine(path)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (v INTEGER)"))
    engine.dispose()
    return path


def test_write_waits_for_lock(tmp_path: Path) -> None:
    path = new_database(tmp_path)
    engine = create_sqlite_engine(path)
    lock_taken = threading.Event()
    thread = holder(path, 0.2, lock_taken)
    lock_taken.wait(5)

    started = time.monotonic()
    with engine.begin() as connection:
        waited = time.monotonic() - started
        connection.execute(text("INSERT INTO t VALUES (1)"))
    thread.join()

    assert 0.15 < waited < 0.3  # got the lock within a few milliseconds of its release
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == BUSY_TIMEOUT_MS
        assert connection.execute(text("SELECT count(*) FROM t")).scalar() == 1
    engine.dispose()


def test_lock_wait_has_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(database, "BUSY_TIMEOUT_MS", 100)
    path = new_database(tmp_path)
    lock_taken = threading.Event()
    thread = holder(path, 1.0, lock_taken)
    lock_taken.wait(5)
    connection = sqlite3.connect(path, isolation_level=None)

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        begin_immediate(connection)

    assert time.monotonic() - started < 0.5
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 100
    connection.close()
    thread.join()


def test_other_errors_not_retried(tmp_path: Path) -> None:
    connection = sqlite3.connect(new_database(tmp_path), isolation_level=None)
    connection.execute("BEGIN")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        begin_immediate(connection)

    assert time.monotonic() - started < 0.1
    connection.close()
