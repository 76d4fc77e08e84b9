"""Change-capture triggers of the monolith, against real SQLite files."""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from services.monolith.app import create_app
from services.monolith.schema import open_database
from services.monolith.settings import Settings
from services.shared.clock import parse_timestamp
from services.shared.domain import DEMO_PRODUCTS, DEMO_USERS
from services.shared.security import StaticKeySource
from tests.conftest import TEST_ISSUER, SigningKey

SEEDED_ROWS = len(DEMO_USERS) + len(DEMO_PRODUCTS)


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, token_issuer=TEST_ISSUER)


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = open_database(settings, seed=True)
    yield engine
    engine.dispose()


def execute(engine: Engine, *statements: str, **params: Any) -> None:
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement), params)


def log_after(engine: Engine, seq: int) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT * FROM change_log WHERE seq > :seq ORDER BY seq"), {"seq": seq}
        ).mappings()
        return [{**row, "row_json": json.loads(row["row_json"])} for row in rows]


def product(engine: Engine, product_id: str) -> dict[str, Any]:
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT * FROM products WHERE id = :id"), {"id": product_id}
        ).mappings().one()
        return dict(row)


def test_seed_logged_once(settings: Settings, engine: Engine) -> None:
    second = open_database(settings, seed=True)
    second.dispose()

    rows = log_after(engine, 0)

    assert len(rows) == SEEDED_ROWS
    assert [row["seq"] for row in rows] == list(range(1, SEEDED_ROWS + 1))
    assert {row["op"] for row in rows} == {"insert"}
    assert {row["origin"] for row in rows} == {"monolith"}
    mouse = next(row for row in rows if row["row_id"] == "prod-mouse")
    assert mouse["table_name"] == "products"
    assert mouse["version"] == 1
    assert mouse["row_json"] == product(engine, "prod-mouse")
    for row in rows:
        parse_timestamp(row["changed_at"])


def test_api_writes_log_public_order(settings: Settings, engine: Engine, signing_key: SigningKey,
                                     auth_header: Callable[..., dict[str, str]]) -> None:
    app = create_app(settings, key_source=StaticKeySource(signing_key.jwks))
    with TestClient(app) as client:
        created = client.post(
            "/orders", json={"items": [{"product_id": "prod-cable", "quantity": 4}]},
            headers=auth_header(),
        ).json()
        paid = client.post(f"/orders/{created['id']}/pay", headers=auth_header()).json()

    rows = log_after(engine, SEEDED_ROWS)

    assert [(row["table_name"], row["op"], row["version"]) for row in rows] == [
        ("orders", "insert", 1),
        ("orders", "update", 2),
    ]
    assert rows[0]["row_json"] == created
    assert rows[1]["row_json"] == paid
    assert isinstance(rows[1]["row_json"]["items"], list)
    assert {row["row_id"] for row in rows} == {created["id"]}


def test_raw_update_raises_version(engine: Engine) -> None:
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA recursive_triggers").scalar() == 0
    before = product(engine, "prod-mouse")

    execute(engine, "UPDATE products SET price = 2500 WHERE id = 'prod-mouse'")

    after = product(engine, "prod-mouse")
    rows = log_after(engine, SEEDED_ROWS)
    assert after["version"] == before["version"] + 1
    assert after["price"] == 2500
    assert after["updated_at"] > before["updated_at"]
    assert len(rows) == 1
    assert rows[0]["op"] == "update"
    assert rows[0]["version"] == after["version"]
    assert rows[0]["row_json"] == after


def test_raw_update_lowering_version(engine: Engine) -> None:
    execute(engine, "UPDATE products SET version = 7 WHERE id = 'prod-mouse'")
    execute(engine, "UPDATE products SET version = 3, name = 'Mouse' WHERE id = 'prod-mouse'")

    rows = log_after(engine, SEEDED_ROWS)
    assert [row["version"] for row in rows] == [7, 8]
    assert product(engine, "prod-mouse")["version"] == 8
    assert rows[1]["row_json"]["name"] == "Mouse"


def test_raw_update_keeps_updated_at_given(engine: Engine) -> None:
    execute(
        engine,
        "UPDATE products SET price = 1, updated_at = '2030-01-01T00:00:00.000000Z' "
        "WHERE id = 'prod-cable'",
    )

    after = product(engine, "prod-cable")
    assert after["updated_at"] == "2030-01-01T00:00:00.000000Z"
    assert after["version"] == 2


def test_raw_update_many_rows(engine: Engine) -> None:
    execute(engine, "UPDATE products SET price = price + 1")

    rows = log_after(engine, SEEDED_ROWS)
    assert len(rows) == len(DEMO_PRODUCTS)
    assert {row["version"] for row in rows} == {2}
    assert {row["row_id"] for row in rows} == {item["id"] for item in DEMO_PRODUCTS}


def test_raw_delete_logs_before_image(engine: Engine) -> None:
    before = product(engine, "prod-stand")

    execute(engine, "DELETE FROM products WHERE id = 'prod-stand'")

    rows = log_after(engine, SEEDED_ROWS)
    assert len(rows) == 1
    assert rows[0]["op"] == "delete"
    assert rows[0]["row_id"] == "prod-stand"
    assert rows[0]["version"] == before["version"]
    assert rows[0]["row_json"] == before


def test_insert_or_replace_raises_version(engine: Engine) -> None:
    execute(
        engine,
        "INSERT OR REPLACE INTO products (id, name, price, version, updated_at) "
        "VALUES ('prod-mouse', 'Quiet mouse', 3100, 1, '2030-01-01T00:00:00.000000Z')",
    )

    after = product(engine, "prod-mouse")
    rows = log_after(engine, SEEDED_ROWS)
    assert after["version"] == 2
    assert after["name"] == "Quiet mouse"
    assert len(rows) == 1
    assert rows[0]["version"] == 2
    assert rows[0]["row_json"] == after


def test_insert_or_replace_higher_version(engine: Engine) -> None:
    execute(
        engine,
        "INSERT OR REPLACE INTO products (id, name, price, version, updated_at) "
        "VALUES ('prod-mouse', 'Quiet mouse', 3100, 5, '2030-01-01T00:00:00.000000Z')",
    )

    rows = log_after(engine, SEEDED_ROWS)
    assert len(rows) == 1
    assert rows[0]["op"] == "insert"
    assert rows[0]["version"] == 5
    assert product(engine, "prod-mouse")["version"] == 5


def test_upsert_logs_update(engine: Engine) -> None:
    execute(
        engine,
        "INSERT INTO products (id, name, price, version, updated_at) "
        "VALUES ('prod-cable', 'Cable', 1200, 1, '2030-01-01T00:00:00.000000Z') "
        "ON CONFLICT (id) DO UPDATE SET price = excluded.price",
    )

    after = product(engine, "prod-cable")
    rows = log_after(engine, SEEDED_ROWS)
    assert after["price"] == 1200
    assert after["version"] == 2
    assert len(rows) == 1
    assert rows[0]["op"] == "update"
    assert rows[0]["row_json"] == after


def test_upsert_inserts_new_row(engine: Engine) -> None:
    execute(
        engine,
        "INSERT INTO products (id, name, price, updated_at) "
        "VALUES ('prod-pad', 'Mouse pad', 500, '2030-01-01T00:00:00.000000Z') "
        "ON CONFLICT (id) DO UPDATE SET price = excluded.price",
    )

    rows = log_after(engine, SEEDED_ROWS)
    assert [(row["op"], row["row_id"], row["version"]) for row in rows] == [
        ("insert", "prod-pad", 1)
    ]


def test_reinsert_after_delete(engine: Engine) -> None:
    execute(engine, "UPDATE products SET price = 1 WHERE id = 'prod-stand'")
    execute(engine, "DELETE FROM products WHERE id = 'prod-stand'")
    execute(
        engine,
        "INSERT INTO products (id, name, price, updated_at) "
        "VALUES ('prod-stand', 'Stand', 4000, '2030-01-01T00:00:00.000000Z')",
    )

    rows = log_after(engine, SEEDED_ROWS)
    assert [(row["op"], row["version"]) for row in rows] == [
        ("update", 2), ("delete", 2), ("update", 3),
    ]
    assert product(engine, "prod-stand")["version"] == 3


def test_primary_key_change_logs_delete(engine: Engine) -> None:
    execute(engine, "UPDATE products SET id = 'prod-kb' WHERE id = 'prod-keyboard'")

    rows = log_after(engine, SEEDED_ROWS)
    assert [(row["op"], row["row_id"], row["version"]) for row in rows] == [
        ("delete", "prod-keyboard", 1),
        ("update", "prod-kb", 2),
    ]


def test_sync_context_keeps_version(engine: Engine) -> None:
    execute(
        engine,
        "INSERT INTO sync_context (origin) VALUES ('cqrs')",
        "UPDATE products SET price = 1 WHERE id = 'prod-mouse'",
        "INSERT INTO products (id, name, price, version, updated_at) "
        "VALUES ('prod-pad', 'Mouse pad', 500, 4, '2030-01-01T00:00:00.000000Z')",
        "DELETE FROM sync_context",
    )
    execute(engine, "UPDATE products SET price = 2 WHERE id = 'prod-mouse'")

    rows = log_after(engine, SEEDED_ROWS)
    assert [(row["row_id"], row["op"], row["version"], row["origin"]) for row in rows] == [
        ("prod-mouse", "update", 1, "cqrs"),
        ("prod-pad", "insert", 4, "cqrs"),
        ("prod-mouse", "update", 2, "monolith"),
    ]


def test_users_and_orders_captured(engine: Engine) -> None:
    execute(
        engine,
        "UPDATE users SET display_name = 'Alice A.' WHERE id = 'alice'",
        "INSERT INTO orders (id, user_id, items, total_amount, status, created_at, updated_at) "
        "VALUES ('o1', 'bob', '[{\"product_id\": \"prod-mouse\", \"quantity\": 1, "
        "\"unit_price\": 2900}]', 2900, 'pending', '2030-01-01T00:00:00.000000Z', "
        "'2030-01-01T00:00:00.000000Z')",
    )

    rows = log_after(engine, SEEDED_ROWS)
    assert [(row["table_name"], row["op"], row["version"]) for row in rows] == [
        ("users", "update", 2),
        ("orders", "insert", 1),
    ]
    assert rows[0]["row_json"]["display_name"] == "Alice A."
    assert set(rows[0]["row_json"]) == {"id", "username", "display_name", "version", "updated_at"}
    assert rows[1]["row_json"]["items"] == [
        {"product_id": "prod-mouse", "quantity": 1, "unit_price": 2900}
    ]


def test_order_items_must_be_json(engine: Engine) -> None:
    with pytest.raises(IntegrityError):
        execute(
            engine,
            "INSERT INTO orders (id, user_id, items, total_amount, status, created_at, updated_at) "
            "VALUES ('o1', 'bob', 'not json', 0, 'pending', 'x', 'x')",
        )

    assert log_after(engine, SEEDED_ROWS) == []


def test_rollback_discards_log(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("UPDATE products SET price = 1 WHERE id = 'prod-mouse'"))
        connection.rollback()

    assert log_after(engine, SEEDED_ROWS) == []
    assert product(engine, "prod-mouse")["version"] == 1


def test_recursive_triggers_log_twice(engine: Engine) -> None:
    # Documents why the schema relies on SQLite's default recursive_triggers=OFF.
    with engine.begin() as connection:
        connection.exec_driver_sql("PRAGMA recursive_triggers = ON")
        assert connection.exec_driver_sql("PRAGMA recursive_triggers").scalar() == 1
        connection.execute(text("UPDATE products SET price = 1 WHERE id = 'prod-mouse'"))

    rows = log_after(engine, SEEDED_ROWS)
    assert [row["version"] for row in rows] == [2, 2]
    assert rows[0]["row_json"] == rows[1]["row_json"]


def user(engine: Engine, user_id: str) -> dict[str, Any] | None:
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT * FROM users WHERE id = :id"), {"id": user_id}
        ).mappings().first()
        return None if row is None else dict(row)


def test_replace_into_raises_version(engine: Engine) -> None:
    execute(
        engine,
        "REPLACE INTO products (id, name, price, version, updated_at) "
        "VALUES ('prod-cable', 'Long cable', 1500, 1, '2030-01-01T00:00:00.000000Z')",
    )

    after = product(engine, "prod-cable")
    rows = log_after(engine, SEEDED_ROWS)
    assert after["version"] == 2
    assert [(row["op"], row["row_id"], row["version"]) for row in rows] == [
        ("update", "prod-cable", 2)
    ]
    assert rows[0]["row_json"] == after


def test_insert_or_replace_unique_conflict(engine: Engine) -> None:
    # The new row takes bob's username, so SQLite deletes bob's row without a delete trigger.
    bob = user(engine, "bob")
    assert bob is not None

    execute(
        engine,
        "INSERT OR REPLACE INTO users (id, username, display_name, version, updated_at) "
        "VALUES ('robert', 'bob', 'Robert', 1, '2030-01-01T00:00:00.000000Z')",
    )

    assert user(engine, "bob") is None
    rows = log_after(engine, SEEDED_ROWS)
    assert sorted((row["op"], row["row_id"], row["version"]) for row in rows) == [
        ("delete", "bob", 1),
        ("insert", "robert", 1),
    ]
    deletion = next(row for row in rows if row["op"] == "delete")
    assert deletion["row_json"] == bob
    assert deletion["origin"] == "monolith"


def test_update_or_replace_unique_conflict(engine: Engine) -> None:
    alice = user(engine, "alice")
    assert alice is not None

    execute(engine, "UPDATE OR REPLACE users SET username = 'alice' WHERE id = 'bob'")

    assert user(engine, "alice") is None
    rows = log_after(engine, SEEDED_ROWS)
    assert sorted((row["op"], row["row_id"], row["version"]) for row in rows) == [
        ("delete", "alice", 1),
        ("update", "bob", 2),
    ]
    assert next(row for row in rows if row["op"] == "delete")["row_json"] == alice


def test_insert_or_ignore_unique_logs_nothing(engine: Engine) -> None:
    execute(
        engine,
        "INSERT OR IGNORE INTO users (id, username, display_name, version, updated_at) "
        "VALUES ('robert', 'bob', 'Robert', 1, '2030-01-01T00:00:00.000000Z')",
    )

    assert user(engine, "bob") is not None
    assert user(engine, "robert") is None
    assert log_after(engine, SEEDED_ROWS) == []


def test_unique_conflict_after_username_change(engine: Engine) -> None:
    # bob's last logged image still has username "bob", but bob's row now has "bobby".
    execute(engine, "UPDATE users SET username = 'bobby' WHERE id = 'bob'")
    execute(
        engine,
        "INSERT INTO users (id, username, display_name, updated_at) "
        "VALUES ('carol', 'bob', 'Carol', '2030-01-01T00:00:00.000000Z')",
    )

    rows = log_after(engine, SEEDED_ROWS)
    assert [(row["op"], row["row_id"]) for row in rows] == [
        ("update", "bob"), ("insert", "carol"),
    ]
    assert user(engine, "bob") is not None


def test_update_or_replace_key_collision(engine: Engine) -> None:
    # Renaming onto an existing id deletes that row; the id must come back at a newer version.
    execute(engine, "UPDATE products SET price = 3000 WHERE id = 'prod-mouse'")
    execute(engine, "UPDATE products SET price = 3100 WHERE id = 'prod-mouse'")

    execute(engine, "UPDATE OR REPLACE products SET id = 'prod-mouse' WHERE id = 'prod-cable'")

    after = product(engine, "prod-mouse")
    rows = log_after(engine, SEEDED_ROWS + 2)
    assert after["name"] == "USB-C cable"
    assert after["version"] == 4
    assert [(row["op"], row["row_id"], row["version"]) for row in rows] == [
        ("delete", "prod-cable", 1),
        ("update", "prod-mouse", 4),
    ]
    assert rows[1]["row_json"] == after


def test_rename_onto_deleted_id(engine: Engine) -> None:
    execute(engine, "UPDATE products SET price = 1 WHERE id = 'prod-stand'")
    execute(engine, "DELETE FROM products WHERE id = 'prod-stand'")

    execute(engine, "UPDATE products SET id = 'prod-stand' WHERE id = 'prod-cable'")

    rows = log_after(engine, SEEDED_ROWS + 2)
    assert [(row["op"], row["row_id"], row["version"]) for row in rows] == [
        ("delete", "prod-cable", 1),
        ("update", "prod-stand", 3),
    ]
    assert product(engine, "prod-stand")["version"] == 3


def test_update_from_captured(engine: Engine) -> None:
    execute(
        engine,
        "CREATE TEMP TABLE new_prices (id TEXT PRIMARY KEY, price INTEGER)",
        "INSERT INTO new_prices VALUES ('prod-mouse', 2700), ('prod-stand', 3700)",
        "UPDATE products SET price = new_prices.price FROM new_prices "
        "WHERE products.id = new_prices.id",
    )

    rows = log_after(engine, SEEDED_ROWS)
    assert sorted((row["op"], row["row_id"], row["version"]) for row in rows) == [
        ("update", "prod-mouse", 2),
        ("update", "prod-stand", 2),
    ]
    assert {row["row_json"]["price"] for row in rows} == {2700, 3700}


def test_insert_select_captured(engine: Engine) -> None:
    execute(
        engine,
        "INSERT INTO products (id, name, price, updated_at) "
        "SELECT id || '-refurbished', name || ' (refurbished)', price / 2, updated_at "
        "FROM products WHERE price > 5000",
    )

    rows = log_after(engine, SEEDED_ROWS)
    assert sorted((row["op"], row["row_id"], row["version"]) for row in rows) == [
        ("insert", "prod-keyboard-refurbished", 1),
        ("insert", "prod-monitor-refurbished", 1),
    ]


def test_delete_without_where_captured(engine: Engine) -> None:
    # Without triggers SQLite would empty the table in one step, skipping per-row work.
    execute(engine, "DELETE FROM products")

    rows = log_after(engine, SEEDED_ROWS)
    assert len(rows) == len(DEMO_PRODUCTS)
    assert {row["op"] for row in rows} == {"delete"}
    assert {row["row_id"] for row in rows} == {item["id"] for item in DEMO_PRODUCTS}


def test_upsert_do_nothing_logs_nothing(engine: Engine) -> None:
    execute(
        engine,
        "INSERT INTO products (id, name, price, updated_at) "
        "VALUES ('prod-mouse', 'Other mouse', 1, '2030-01-01T00:00:00.000000Z') "
        "ON CONFLICT (id) DO NOTHING",
    )

    assert log_after(engine, SEEDED_ROWS) == []
    assert product(engine, "prod-mouse")["name"] == "Wireless mouse"


def test_captured_tables_have_no_foreign_keys(engine: Engine) -> None:
    # A foreign key action (ON DELETE CASCADE, SET NULL, ...) would change rows of these tables
    # as a side effect of a statement on another table.
    with engine.connect() as connection:
        for table in ("users", "products", "orders"):
            keys = connection.exec_driver_sql(f"PRAGMA foreign_key_list({table})").all()
            assert keys == [], table


def test_trigger_of_other_table_captured(engine: Engine) -> None:
    # A cascade on other tables fires their triggers, and a write those triggers make to a
    # captured table fires its change-capture triggers too.
    execute(
        engine,
        "CREATE TABLE catalogues (id TEXT PRIMARY KEY)",
        "INSERT INTO catalogues VALUES ('main')",
        "CREATE TABLE catalogue_items (id TEXT PRIMARY KEY, "
        "catalogue TEXT REFERENCES catalogues(id) ON DELETE CASCADE)",
        "CREATE TRIGGER catalogue_items_gone AFTER DELETE ON catalogue_items "
        "BEGIN DELETE FROM products WHERE id = OLD.id; END",
        "INSERT INTO catalogue_items VALUES ('prod-mouse', 'main')",
    )

    execute(engine, "DELETE FROM catalogues WHERE id = 'main'")

    rows = log_after(engine, SEEDED_ROWS)
    assert [(row["op"], row["row_id"]) for row in rows] == [("delete", "prod-mouse")]
