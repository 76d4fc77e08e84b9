"""Users and OAuth clients of the auth server, in SQLite, with Argon2id password hashes.

Accounts are created in one of three ways:

- development mode seeds the demo users and the three platform clients (`seed_development`);
- production mode seeds nothing, except that each service client whose secret setting is set
  (`AUTH_REVERSE_SYNC_CLIENT_SECRET`, `AUTH_ADMIN_CLIENT_SECRET`) is registered with that secret
  (`register_service_clients`);
- operators call `AuthStore.create_user` and `AuthStore.create_client` (through the CLI) on a store
  from `open_store(settings)`.

Production mode rejects the public demo password both when a user is created and when one logs in.
"""

import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    MetaData,
    String,
    Table,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from services.shared.clock import utc_now
from services.shared.database import create_sqlite_engine
from services.shared.domain import DEMO_USERS
from services.shared.errors import Conflict, ValidationFailed
from services.shared.scopes import GRAY_ADMIN, REVERSE_SYNC_CLIENT, SYNC_WRITE, USER_SCOPES
from services.shared.settings import DEMO_PASSWORD, Environment

from .settings import DEV_CLIENT_SECRETS, Settings

log = logging.getLogger(__name__)

PASSWORD_GRANT = "password"  # noqa: S105 - the OAuth grant type name
CLIENT_CREDENTIALS_GRANT = "client_credentials"
GRANT_TYPES = (PASSWORD_GRANT, CLIENT_CREDENTIALS_GRANT)

WEB_CLIENT = "ztcqrs-web"
ADMIN_CLIENT = "ztcqrs-admin"

MIN_PASSWORD_LENGTH = 8
MIN_CLIENT_SECRET_LENGTH = 16
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_PATTERN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String, nullable=False),
    Column("beta_tester", Boolean, nullable=False),
    Column("scopes", String, nullable=False),  # space-separated
    Column("created_at", String, nullable=False),
)

clients = Table(
    "clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("secret_hash", String, nullable=True),  # NULL for a public client
    Column("scopes", String, nullable=False),  # space-separated
    Column("grant_types", String, nullable=False),  # space-separated
    Column("created_at", String, nullable=False),
)


@dataclass(frozen=True)
class User:
    id: str
    username: str
    beta_tester: bool
    scopes: frozenset[str]
    created_at: str


@dataclass(frozen=True)
class Client:
    client_id: str
    confidential: bool
    scopes: frozenset[str]
    grant_types: frozenset[str]
    created_at: str


class CredentialsRejected(Exception):
    """A login or client authentication failed.

    `reason` is a category for logs: `unknown_user`, `wrong_password`, `demo_password`,
    `unknown_client`, `wrong_secret` or `public_client`. Callers log it but do not send it to the
    client, so that responses do not reveal which usernames or client ids exist.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_scopes(value: str | Iterable[str]) -> frozenset[str]:
    """Return the scopes of a space-separated string or an iterable, or raise `ValidationFailed`."""
    tokens = value.split() if isinstance(value, str) else list(value)
    for token in tokens:
        if not SCOPE_PATTERN.fullmatch(token):
            raise ValidationFailed(
                f"Scope {token!r} is invalid; a scope is printable ASCII without spaces, "
                "quotes or backslashes.",
                field="scopes",
            )
    return frozenset(tokens)


def format_scopes(scopes: Iterable[str]) -> str:
    return " ".join(sorted(scopes))


def _validate_name(value: str, field: str) -> None:
    if not NAME_PATTERN.fullmatch(value):
        raise ValidationFailed(
            f"{field} {value!r} is invalid; use 1 to 64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit.",
            field=field,
        )


class AuthStore:
    """Users and clients on one SQLite engine.

    Methods block on SQLite and Argon2, so async code calls them in a worker thread.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        environment: Environment,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.engine = engine
        self.environment = environment
        self.hasher = hasher or PasswordHasher()
        # Verified against when the user or client does not exist, so that a miss costs as much
        # time as a wrong password and response times do not reveal which names exist.
        self._dummy_hash = self.hasher.hash(uuid.uuid4().hex)

    @property
    def production(self) -> bool:
        return self.environment is Environment.PRODUCTION

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    def ping(self) -> None:
        """Run a trivial read, which raises if the database is unavailable."""
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as connection:
            connection.execute(text("SELECT 1 FROM users LIMIT 1")).all()

    # Users

    def create_user(
        self,
        username: str,
        password: str,
        *,
        user_id: str | None = None,
        beta_tester: bool = False,
        scopes: Iterable[str] = USER_SCOPES,
    ) -> User:
        """Insert a user and return it. `user_id` defaults to the username.

        Raises `ValidationFailed` for an invalid name, scope or password (including the demo
        password in production mode) and `Conflict` when the username or id is taken.
        """
        user_id = user_id or username
        _validate_name(username, "username")
        _validate_name(user_id, "user_id")
        self._validate_password(password)
        granted = parse_scopes(scopes)
        if SYNC_WRITE in granted:
            raise ValidationFailed(
                f"Scope {SYNC_WRITE!r} is for the reverse-sync service client only and cannot "
                "be granted to a user.",
                field="scopes",
            )
        row = {
            "id": user_id,
            "username": username,
            "password_hash": self.hasher.hash(password),
            "beta_tester": beta_tester,
            "scopes": format_scopes(granted),
            "created_at": utc_now(),
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(users).values(**row))
        except IntegrityError as error:
            raise Conflict(
                f"A user with username {username!r} or id {user_id!r} already exists; choose "
                "another name."
            ) from error
        log.info(
            "user created",
            extra={"user_id": user_id, "username": username, "beta_tester": beta_tester},
        )
        return _user(row)

    def get_user(self, username: str) -> User | None:
        row = self._user_row(username)
        return _user(row) if row is not None else None

    def authenticate_user(self, username: str, password: str) -> User:
        """Return the user whose username and password match, or raise `CredentialsRejected`."""
        if self.production and password == DEMO_PASSWORD:
            raise CredentialsRejected("demo_password")
        row = self._user_row(username)
        if row is None:
            self._verify(self._dummy_hash, password, owner=None)
            raise CredentialsRejected("unknown_user")
        if not self._verify(row["password_hash"], password, owner=row["id"]):
            raise CredentialsRejected("wrong_password")
        self._rehash_if_needed(users.c.id == row["id"], users, row["password_hash"], password)
        return _user(row)

    def _user_row(self, username: str) -> dict[str, Any] | None:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as connection:
            found = connection.execute(select(users).where(users.c.username == username)).first()
        return dict(found._mapping) if found is not None else None

    def _validate_password(self, password: str) -> None:
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValidationFailed(
                f"The password has {len(password)} characters; use at least "
                f"{MIN_PASSWORD_LENGTH}.",
                field="password",
            )
        if self.production and password == DEMO_PASSWORD:
            raise ValidationFailed(
                "The password is the public demo password, which production mode rejects; "
                "choose another.",
                field="password",
            )

    # Clients

    def create_client(
        self,
        client_id: str,
        *,
        secret: str | None,
        scopes: Iterable[str],
        grant_types: Iterable[str],
    ) -> Client:
        """Insert a client and return it. `secret=None` makes a public client.

        A public client may use only the password grant. Raises `ValidationFailed` for an invalid
        id, scope, grant type or secret and `Conflict` when the id is taken.
        """
        row: dict[str, Any] = {
            **self._validated_client(client_id, secret, scopes, grant_types),
            "secret_hash": self.hasher.hash(secret) if secret is not None else None,
            "created_at": utc_now(),
        }
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(clients).values(**row))
        except IntegrityError as error:
            raise Conflict(
                f"A client with id {client_id!r} already exists; choose another id."
            ) from error
        log.info("client created", extra={"client_id": client_id, "scopes": row["scopes"]})
        return _client(row)

    def get_client(self, client_id: str) -> Client | None:
        row = self._client_row(client_id)
        return _client(row) if row is not None else None

    def authenticate_client(self, client_id: str, secret: str) -> Client:
        """Return the confidential client with this id and secret.

        Raises `CredentialsRejected` for an unknown or public client or a wrong secret.
        """
        row = self._client_row(client_id)
        if row is None:
            self._verify(self._dummy_hash, secret, owner=None)
            raise CredentialsRejected("unknown_client")
        if row["secret_hash"] is None:
            self._verify(self._dummy_hash, secret, owner=None)
            raise CredentialsRejected("public_client")
        if not self._verify(row["secret_hash"], secret, owner=client_id):
            raise CredentialsRejected("wrong_secret")
        self._rehash_if_needed(
            clients.c.client_id == client_id, clients, row["secret_hash"], secret, "secret_hash"
        )
        return _client(row)

    def register_service_client(
        self, client_id: str, secret: str, *, scopes: Iterable[str]
    ) -> None:
        """Create the client_credentials client `client_id`, or give it this secret and scopes.

        Idempotent: a client whose secret, scopes and grant types already match is left
        unchanged, so every replica can run this at start-up.
        """
        expected = self._validated_client(client_id, secret, scopes, [CLIENT_CREDENTIALS_GRANT])
        existing = self._client_row(client_id)
        if existing is None:
            row = {**expected, "secret_hash": self.hasher.hash(secret), "created_at": utc_now()}
            with self.engine.begin() as connection:
                connection.execute(sqlite_insert(clients).values(**row).on_conflict_do_nothing())
            log.info("service client registered", extra={"client_id": client_id})
            return

        unchanged = (
            existing["secret_hash"] is not None
            and existing["scopes"] == expected["scopes"]
            and existing["grant_types"] == expected["grant_types"]
            and self._verify(existing["secret_hash"], secret, owner=client_id)
        )
        if unchanged:
            return
        with self.engine.begin() as connection:
            connection.execute(
                update(clients)
                .where(clients.c.client_id == client_id)
                .values(
                    secret_hash=self.hasher.hash(secret),
                    scopes=expected["scopes"],
                    grant_types=expected["grant_types"],
                )
            )
        log.info("service client updated", extra={"client_id": client_id})

    def _client_row(self, client_id: str) -> dict[str, Any] | None:
        with self.engine.connect().execution_options(sqlite_begin="DEFERRED") as connection:
            found = connection.execute(
                select(clients).where(clients.c.client_id == client_id)
            ).first()
        return dict(found._mapping) if found is not None else None

    def _validated_client(
        self,
        client_id: str,
        secret: str | None,
        scopes: Iterable[str],
        grant_types: Iterable[str],
    ) -> dict[str, str]:
        """Validate a client's fields and return its `client_id`, `scopes` and `grant_types`."""
        _validate_name(client_id, "client_id")
        grants = frozenset(grant_types)
        unknown = grants.difference(GRANT_TYPES)
        if not grants or unknown:
            raise ValidationFailed(
                f"Grant types {sorted(unknown) or '[]'} are not supported; use one or more of "
                f"{', '.join(GRANT_TYPES)}.",
                field="grant_types",
            )
        if secret is None and CLIENT_CREDENTIALS_GRANT in grants:
            raise ValidationFailed(
                f"Client {client_id!r} has no secret, so it cannot use the client_credentials "
                "grant; give it a secret or drop that grant.",
                field="secret",
            )
        if secret is not None:
            self.validate_client_secret(client_id, secret)
        return {
            "client_id": client_id,
            "scopes": format_scopes(parse_scopes(scopes)),
            "grant_types": format_scopes(grants),
        }

    def validate_client_secret(self, client_id: str, secret: str) -> None:
        """Raise `ValidationFailed` in production mode for a published or short secret."""
        if not self.production:
            return
        if secret == DEMO_PASSWORD or secret in DEV_CLIENT_SECRETS:
            raise ValidationFailed(
                f"The secret of client {client_id!r} is a published development value, which "
                "production mode rejects; generate a random secret.",
                field="secret",
            )
        if len(secret) < MIN_CLIENT_SECRET_LENGTH:
            raise ValidationFailed(
                f"The secret of client {client_id!r} has {len(secret)} characters; production "
                f"mode requires at least {MIN_CLIENT_SECRET_LENGTH}.",
                field="secret",
            )

    # Hashing

    def _verify(self, password_hash: str, password: str, *, owner: str | None) -> bool:
        """Return whether `password` matches; `owner` (user or client id) only labels the log."""
        try:
            return self.hasher.verify(password_hash, password)
        except VerifyMismatchError:
            return False
        except (VerificationError, InvalidHashError) as error:
            log.error(
                "stored credential hash is unusable; reset this credential",
                extra={"owner": owner, "error": str(error)},
            )
            return False

    def _rehash_if_needed(
        self,
        where: Any,
        table: Table,
        password_hash: str,
        password: str,
        column: str = "password_hash",
    ) -> None:
        # Hashes made with older Argon2 parameters are upgraded on the next successful login.
        if not self.hasher.check_needs_rehash(password_hash):
            return
        with self.engine.begin() as connection:
            connection.execute(
                update(table).where(where).values({column: self.hasher.hash(password)})
            )

    # Seeding

    def seed_development(self, *, reverse_sync_secret: str, admin_secret: str) -> None:
        """Create the demo users and the platform clients that do not exist yet (idempotent)."""
        if self.production:
            raise RuntimeError("Demo accounts are never seeded in production mode.")
        for demo in DEMO_USERS:
            if self._user_row(demo["username"]) is not None:
                continue
            row = {
                "id": demo["id"],
                "username": demo["username"],
                "password_hash": self.hasher.hash(DEMO_PASSWORD),
                "beta_tester": bool(demo["beta_tester"]),
                "scopes": format_scopes(USER_SCOPES),
                "created_at": utc_now(),
            }
            with self.engine.begin() as connection:
                connection.execute(sqlite_insert(users).values(**row).on_conflict_do_nothing())
            log.info("demo user seeded", extra={"user_id": demo["id"]})

        if self._client_row(WEB_CLIENT) is None:
            row = {
                **self._validated_client(WEB_CLIENT, None, USER_SCOPES, [PASSWORD_GRANT]),
                "secret_hash": None,
                "created_at": utc_now(),
            }
            with self.engine.begin() as connection:
                connection.execute(sqlite_insert(clients).values(**row).on_conflict_do_nothing())
            log.info("demo client seeded", extra={"client_id": WEB_CLIENT})
        self.register_service_clients(
            reverse_sync_secret=reverse_sync_secret, admin_secret=admin_secret
        )

    def register_service_clients(
        self, *, reverse_sync_secret: str | None, admin_secret: str | None
    ) -> None:
        """Register `cqrs-reverse-sync` and `ztcqrs-admin` for each secret that is given."""
        if reverse_sync_secret is not None:
            self.register_service_client(
                REVERSE_SYNC_CLIENT, reverse_sync_secret, scopes=[SYNC_WRITE]
            )
        if admin_secret is not None:
            self.register_service_client(ADMIN_CLIENT, admin_secret, scopes=[GRAY_ADMIN])


def _user(row: dict[str, Any]) -> User:
    return User(
        id=row["id"],
        username=row["username"],
        beta_tester=bool(row["beta_tester"]),
        scopes=frozenset(row["scopes"].split()),
        created_at=row["created_at"],
    )


def _client(row: dict[str, Any]) -> Client:
    return Client(
        client_id=row["client_id"],
        confidential=row["secret_hash"] is not None,
        scopes=frozenset(row["scopes"].split()),
        grant_types=frozenset(row["grant_types"].split()),
        created_at=row["created_at"],
    )


def open_store(settings: Settings, *, hasher: PasswordHasher | None = None) -> AuthStore:
    """Open the store at the configured database path and create its tables if they are missing.

    Seeds nothing; `create_app` seeds at start-up, and the CLI can call `create_user` and
    `create_client` on the result.
    """
    engine = create_sqlite_engine(settings.resolved_database_path)
    store = AuthStore(engine, environment=settings.env, hasher=hasher)
    store.create_schema()
    return store
