"""The schema, its Alembic migrations and the SQLite connection setup."""

from __future__ import annotations

import importlib.util
import io
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select, text
from sqlalchemy.exc import StatementError

from isthmus.errors import RegistryError
from isthmus.registry.migrations import SCRIPT_LOCATION, alembic_config, migrate
from isthmus.registry.models import LogicalDeviceCreate
from isthmus.registry.schema import logical_devices, metadata, physical_devices
from isthmus.registry.store import RegistryStore

HEAD = "0002"


def _diff(store: RegistryStore, target: MetaData) -> list[object]:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, target))


def test_migrated_database_matches_the_metadata_exactly(tmp_path: Path) -> None:
    with RegistryStore(f"sqlite:///{tmp_path / 'fresh.db'}") as store:
        store.migrate()
        assert _diff(store, metadata) == []


def test_the_parity_check_would_notice_a_schema_change(tmp_path: Path) -> None:
    changed = MetaData()
    for table in metadata.sorted_tables:
        table.to_metadata(changed)
    Table("extra", changed, Column("id", Integer, primary_key=True))
    changed.tables["users"].append_column(Column("email", String(200)))
    with RegistryStore(f"sqlite:///{tmp_path / 'fresh.db'}") as store:
        store.migrate()
        kinds = sorted(str(d[0]) for d in _diff(store, changed) if isinstance(d, tuple))
    assert kinds == ["add_column", "add_table"]


def test_migrate_twice_is_a_no_op(tmp_path: Path) -> None:
    with RegistryStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        store.migrate()
        with store.engine.connect() as conn:
            schema_before = conn.execute(text("SELECT type, name, sql FROM sqlite_master ORDER BY name")).all()
        store.migrate()
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT type, name, sql FROM sqlite_master ORDER BY name")).all() == (
                schema_before
            )
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]


def test_data_survives_reopening_and_re_migrating(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with RegistryStore(url) as store:
        store.migrate()
        store.create_logical(LogicalDeviceCreate(name="kept"))
    with RegistryStore(url) as store:
        store.migrate()
        assert [d.name for d in store.list_logical()] == ["kept"]


def test_migrate_accepts_a_connection_in_the_callers_transaction(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'plain.db'}")
    try:
        with engine.begin() as conn:
            migrate(conn)
        with engine.connect() as conn:
            names = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).scalars())
    finally:
        engine.dispose()
    assert {"physical_devices", "logical_devices", "mappings", "users", "api_tokens", "device_credentials"} <= names


def test_migrations_ship_inside_the_package() -> None:
    assert (SCRIPT_LOCATION / "env.py").is_file()
    assert (SCRIPT_LOCATION / "script.py.mako").is_file()
    assert (SCRIPT_LOCATION / "versions" / "0001_initial.py").is_file()
    assert (SCRIPT_LOCATION / "versions" / "0002_device_credentials.py").is_file()


def test_initial_migration_renders_for_postgresql() -> None:
    spec = importlib.util.spec_from_file_location("registry_0001", SCRIPT_LOCATION / "versions" / "0001_initial.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    buffer = io.StringIO()
    context = MigrationContext.configure(dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer})
    with Operations.context(context):
        module.upgrade()
    sql = buffer.getvalue()
    assert sql.count("SERIAL NOT NULL") == 5
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "CREATE UNIQUE INDEX uq_mappings_open_p_uid ON mappings (p_uid) WHERE end_time IS NULL" in sql
    assert "ON DELETE CASCADE" in sql
    assert "AUTOINCREMENT" not in sql


def test_missing_database_driver_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="cannot create the registry database engine"):
        RegistryStore("postgresql+nosuchdriver://user:secret@localhost/registry")


def test_unknown_revision_is_a_registry_error(tmp_path: Path) -> None:
    with RegistryStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        store.migrate()
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        with pytest.raises(RegistryError, match="cannot migrate"):
            store.migrate()


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    with RegistryStore(f"sqlite:///{tmp_path / 'r.db'}") as store, store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar_one() == 5000


def test_utc_datetime_rejects_naive_and_normalises_aware(tmp_path: Path) -> None:
    with RegistryStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        store.migrate()
        plus_ten = timezone(timedelta(hours=10))
        with store.engine.begin() as conn:
            row = {"name": "x", "properties": {}, "created_at": datetime(2024, 1, 1, 10, tzinfo=plus_ten)}
            conn.execute(insert(logical_devices).values(row))
            stored = conn.execute(select(logical_devices.c.created_at)).scalar_one()
            raw = conn.execute(text("SELECT created_at FROM logical_devices")).scalar_one()
        assert stored == datetime(2024, 1, 1, tzinfo=UTC)
        assert stored.tzinfo is UTC
        assert raw == "2024-01-01 00:00:00.000000"  # fixed-width UTC text: sorts correctly
        naive = datetime(2024, 1, 1)  # noqa: DTZ001
        statement = insert(logical_devices).values(name="y", properties={}, created_at=naive)
        with store.engine.begin() as conn, pytest.raises(StatementError, match="naive datetime"):
            conn.execute(statement)


def test_location_check_constraint(tmp_path: Path) -> None:
    with RegistryStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        store.migrate()
        with pytest.raises(Exception, match="CHECK constraint failed"), store.engine.begin() as conn:
            conn.execute(
                insert(logical_devices).values(name="half", latitude=1.0, properties={}, created_at=datetime.now(UTC))
            )


def test_in_memory_url_works_for_single_threaded_use() -> None:
    with RegistryStore("sqlite://") as store:
        store.migrate()
        store.create_logical(LogicalDeviceCreate(name="in memory"))
        assert [d.name for d in store.list_logical()] == ["in memory"]


def _load_migration(filename: str) -> object:
    spec = importlib.util.spec_from_file_location(f"registry_{filename}", SCRIPT_LOCATION / "versions" / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_credentials_migration_upgrades_a_populated_0001_database_and_back(tmp_path: Path) -> None:
    with RegistryStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        with store.engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
        with store.engine.begin() as conn:
            tables = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).scalars())
        assert "device_credentials" not in tables
        row = {
            "name": "old",
            "source_name": "http",
            "source_ids": {},
            "source_key": "{}",
            "properties": {},
            "token": "tok",
            "enabled": True,
            "created_at": datetime.now(UTC),
        }
        with store.engine.begin() as conn:  # written by the previous version
            uid = conn.execute(insert(physical_devices).values(row)).inserted_primary_key[0]
        store.migrate()
        assert _diff(store, metadata) == []
        assert store.get_physical(uid).username is None
        store.set_credentials(uid, "old-user", "pw")
        with store.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")
        with store.engine.connect() as conn:
            tables = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")).scalars())
            tokens = conn.execute(text("SELECT token FROM physical_devices")).scalars().all()
        assert "device_credentials" not in tables
        assert tokens == ["tok"]  # the device and its token survive the downgrade
        store.migrate()
        assert store.get_physical(uid).username is None


def test_device_credentials_migration_renders_for_postgresql() -> None:
    module = _load_migration("0002_device_credentials.py")
    buffer = io.StringIO()
    context = MigrationContext.configure(dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer})
    with Operations.context(context):
        module.upgrade()  # type: ignore[attr-defined]
    sql = " ".join(buffer.getvalue().split())
    assert "CREATE TABLE device_credentials ( p_uid INTEGER NOT NULL," in sql  # not SERIAL: the device's uid
    assert "SERIAL" not in sql
    assert "CONSTRAINT uq_device_credentials_username UNIQUE (username)" in sql
    assert "REFERENCES physical_devices (uid) ON DELETE CASCADE" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql
