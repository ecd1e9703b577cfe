"""The registry schema and its Alembic migrations on a real PostgreSQL server.

The behavioural tests of the store run on PostgreSQL through the ``[postgresql]``
parametrisation (see ``conftest.py``); this file checks what only a PostgreSQL catalog can
tell: that the migrations produce exactly the metadata there too, with the server's own types,
partial indexes, constraints and sequences.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, text
from sqlalchemy.exc import IntegrityError

from isthmus.errors import RegistryError
from isthmus.registry.migrations import migrate
from isthmus.registry.models import LogicalDeviceCreate, PhysicalDeviceCreate
from isthmus.registry.schema import logical_devices, mappings, metadata
from isthmus.registry.store import RegistryStore
from isthmus.testing.postgres import TemporaryPostgres

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
TABLES = {
    "alembic_version",
    "api_tokens",
    "device_credentials",
    "logical_devices",
    "mappings",
    "physical_devices",
    "users",
}
HEAD = "0002"

NewUrl = Callable[[], str]


def _diff(store: RegistryStore, target: MetaData) -> list[object]:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, target))


def _catalog(store: RegistryStore) -> list[tuple[object, ...]]:
    """Every column, index and constraint of the public schema, as the server describes them."""
    queries = [
        "SELECT table_name, column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = 'public'",
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace",
    ]
    with store.engine.connect() as conn:
        return sorted(tuple(row) for query in queries for row in conn.execute(text(query)))


@pytest.fixture
def empty_url(postgres: TemporaryPostgres) -> str:
    """An empty, unmigrated database (dropped with the cluster at the end of the session)."""
    return postgres.create_database()


def test_migrated_database_matches_the_metadata_exactly(empty_url: str) -> None:
    with RegistryStore(empty_url) as store:
        store.migrate()
        assert _diff(store, metadata) == []
        with store.engine.connect() as conn:
            names = set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    assert names == TABLES


def test_the_parity_check_would_notice_a_schema_change(make_postgres_url: NewUrl) -> None:
    changed = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(changed)
    Table("extra", changed, Column("id", Integer, primary_key=True))
    changed.tables["users"].append_column(Column("email", String(200)))
    with RegistryStore(make_postgres_url()) as store:
        kinds = sorted(str(d[0]) for d in _diff(store, changed) if isinstance(d, tuple))
    assert kinds == ["add_column", "add_table"]


def test_migrate_twice_is_a_no_op(make_postgres_url: NewUrl) -> None:
    with RegistryStore(make_postgres_url()) as store:
        before = _catalog(store)
        store.migrate()
        assert _catalog(store) == before
        assert _diff(store, metadata) == []


def test_server_types_are_the_portable_ones(make_postgres_url: NewUrl) -> None:
    with RegistryStore(make_postgres_url()) as store, store.engine.connect() as conn:
        types = dict(
            conn.execute(
                text(
                    "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = 'public'"
                )
            ).all()
        )
        defaults = set(
            conn.execute(
                text(
                    "SELECT table_name FROM information_schema.columns"
                    " WHERE table_schema = 'public' AND column_default LIKE 'nextval(%'"
                )
            ).scalars()
        )
    for column in ("created_at", "last_seen"):
        assert types[f"physical_devices.{column}"] == "timestamp with time zone"
    assert types["mappings.start_time"] == types["mappings.end_time"] == "timestamp with time zone"
    assert types["physical_devices.source_ids"] == types["physical_devices.properties"] == "json"
    assert types["physical_devices.enabled"] == "boolean"
    assert types["physical_devices.latitude"] == "double precision"
    assert types["device_credentials.updated_at"] == "timestamp with time zone"
    # SERIAL: one sequence per table, except device_credentials, keyed by the device's uid
    assert defaults == TABLES - {"alembic_version", "device_credentials"}


def test_open_mapping_indexes_are_partial_and_unique(make_postgres_url: NewUrl) -> None:
    with RegistryStore(make_postgres_url()) as store:
        with store.engine.connect() as conn:
            indexdefs = dict(
                conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'mappings'")).all()
            )
        for column in ("p_uid", "l_uid"):
            definition = indexdefs[f"uq_mappings_open_{column}"]
            assert definition.startswith(f"CREATE UNIQUE INDEX uq_mappings_open_{column} ON public.mappings")
            assert definition.endswith("WHERE (end_time IS NULL)")

        p = store.create_physical(PhysicalDeviceCreate(name="p")).uid
        lg = store.create_logical(LogicalDeviceCreate(name="l")).uid
        closed = {"p_uid": p, "l_uid": lg, "start_time": T0, "end_time": T0 + timedelta(hours=1), "paused": False}
        with store.engine.begin() as conn:  # closed mappings may repeat: the indexes are partial
            conn.execute(insert(mappings), [closed, {**closed, "start_time": T0 + timedelta(hours=1)}])
            conn.execute(insert(mappings).values({**closed, "end_time": None}))
        second_open = {**closed, "start_time": T0 + timedelta(hours=2), "end_time": None}
        with pytest.raises(IntegrityError, match="uq_mappings_open_p_uid"), store.engine.begin() as conn:
            conn.execute(insert(mappings).values(second_open))


def test_location_check_constraint(make_postgres_url: NewUrl) -> None:
    with RegistryStore(make_postgres_url()) as store:
        half = {"name": "half", "latitude": 1.0, "properties": {}, "created_at": T0}
        with pytest.raises(IntegrityError, match="ck_logical_devices_location"), store.engine.begin() as conn:
            conn.execute(insert(logical_devices).values(half))


def test_failed_migration_leaves_the_schema_as_it_was(empty_url: str) -> None:
    # DDL is transactional on PostgreSQL: an upgrade that fails half way leaves nothing behind.
    engine = create_engine(empty_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE mappings (id integer)"))  # the migration's last table
        with pytest.raises(Exception, match="already exists"):
            migrate(engine)
        with engine.connect() as conn:
            tables = set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    finally:
        engine.dispose()
    assert tables == {"mappings"}


def test_unknown_revision_is_a_registry_error(make_postgres_url: NewUrl) -> None:
    with RegistryStore(make_postgres_url()) as store:
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        with pytest.raises(RegistryError, match="cannot migrate"):
            store.migrate()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound (so nothing else takes it) but never listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_unreachable_server_is_a_registry_error_without_the_password(refusing_port: int) -> None:
    url = f"postgresql+psycopg://u:s3cret@127.0.0.1:{refusing_port}/x"
    with RegistryStore(url) as store, pytest.raises(RegistryError, match=r"^cannot list users: connection") as info:
        store.list_users()
    assert "s3cret" not in str(info.value)


def test_device_credentials_constraints(make_postgres_url: NewUrl) -> None:
    with RegistryStore(make_postgres_url()) as store:
        with store.engine.connect() as conn:
            constraints = dict(
                conn.execute(
                    text(
                        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                        " WHERE conrelid = 'device_credentials'::regclass"
                    )
                ).all()
            )
        assert constraints == {
            "pk_device_credentials": "PRIMARY KEY (p_uid)",
            "uq_device_credentials_username": "UNIQUE (username)",
            "fk_device_credentials_p_uid_physical_devices": (
                "FOREIGN KEY (p_uid) REFERENCES physical_devices(uid) ON DELETE CASCADE"
            ),
        }
