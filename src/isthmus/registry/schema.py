"""The registry's tables, as SQLAlchemy Core :class:`~sqlalchemy.Table` objects.

This module is the single source of truth for the schema: the Alembic migrations under
:mod:`isthmus.registry.migrations` must produce exactly this metadata (a test compares them
with :func:`alembic.autogenerate.compare_metadata`). Change a table here, then add a
migration.

Portability rules (the same DDL must run on SQLite and PostgreSQL):

* integer primary keys autoincrement on both (``SERIAL`` on PostgreSQL, ``INTEGER PRIMARY
  KEY AUTOINCREMENT`` on SQLite, so a deleted device's uid is never handed out again), except
  where the key is another table's (``device_credentials.p_uid``: ``autoincrement=False``);
* timestamps are :class:`UTCDateTime`: aware UTC in, aware UTC out;
* free-form data (``source_ids``, ``properties``) uses :class:`sqlalchemy.JSON`, which is never
  compared in SQL; ``source_key`` holds the canonical text of ``source_ids`` for exact lookups;
* every constraint and index has a deterministic name (see ``NAMING_CONVENTION``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "NAMING_CONVENTION",
    "UTCDateTime",
    "api_tokens",
    "device_credentials",
    "logical_devices",
    "mappings",
    "metadata",
    "physical_devices",
    "users",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names, so that migrations can refer to them on every database."""


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that only accepts and only returns aware UTC datetimes.

    Binding a naive datetime raises :class:`ValueError` (an ambiguous instant must never
    reach the database). Aware values are converted to UTC; SQLite, which has no time zone
    support, stores them as naive UTC text of fixed width, so they still sort and compare
    correctly in SQL. Values read back are always aware UTC, whatever the driver returns.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        """Validate and normalise ``value`` to UTC before it is sent to the database."""
        if value is None:
            return None
        if not isinstance(value, datetime):
            msg = f"expected a datetime, got {type(value).__name__}"
            raise TypeError(msg)
        when: datetime = value
        if when.tzinfo is None or when.utcoffset() is None:
            msg = f"naive datetime {when.isoformat()} rejected: timestamps must be aware"
            raise ValueError(msg)
        when = when.astimezone(UTC)
        if dialect.name == "sqlite":
            return when.replace(tzinfo=None)
        return when

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Return ``value`` as an aware UTC datetime (naive values are UTC by construction)."""
        if value is None:
            return None
        if isinstance(value, datetime):
            when: datetime = value
            if when.tzinfo is None:
                return when.replace(tzinfo=UTC)
            return when.astimezone(UTC)
        msg = f"expected a datetime from the database, got {type(value).__name__}"
        raise TypeError(msg)


metadata = MetaData(naming_convention=NAMING_CONVENTION)
"""All registry tables. Alembic's ``target_metadata``."""

_LOCATION_BOTH_OR_NEITHER = (
    "(latitude IS NULL AND longitude IS NULL) OR (latitude IS NOT NULL AND longitude IS NOT NULL)"
)

physical_devices = Table(
    "physical_devices",
    metadata,
    Column("uid", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("source_name", String(64), nullable=False),
    Column("source_ids", JSON, nullable=False),
    Column("source_key", Text, nullable=False),
    Column("latitude", Float, nullable=True),
    Column("longitude", Float, nullable=True),
    Column("last_seen", UTCDateTime, nullable=True),
    Column("properties", JSON, nullable=False),
    Column("token", String(64), nullable=False, unique=True),
    Column("enabled", Boolean, nullable=False),
    Column("decoder", String(200), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint(_LOCATION_BOTH_OR_NEITHER, name="location"),
    Index(None, "source_name", "source_key"),
    sqlite_autoincrement=True,
)
"""Devices in the field. ``token`` authenticates the device (URL path, MQTT username)."""

logical_devices = Table(
    "logical_devices",
    metadata,
    Column("uid", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("latitude", Float, nullable=True),
    Column("longitude", Float, nullable=True),
    Column("last_seen", UTCDateTime, nullable=True),
    Column("properties", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint(_LOCATION_BOTH_OR_NEITHER, name="location"),
    sqlite_autoincrement=True,
)
"""Destinations of time series (a tank, a weather station) fed by physical devices."""

mappings = Table(
    "mappings",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "p_uid",
        Integer,
        ForeignKey("physical_devices.uid", ondelete="CASCADE"),
        nullable=False,
    ),
    Column(
        "l_uid",
        Integer,
        ForeignKey("logical_devices.uid", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("start_time", UTCDateTime, nullable=False),
    Column("end_time", UTCDateTime, nullable=True),
    Column("paused", Boolean, nullable=False),
    Index(None, "p_uid", "start_time"),
    Index(None, "l_uid", "start_time"),
    # At most one open mapping per device: the last line of defence against two concurrent
    # start_mapping() calls on PostgreSQL (SQLite serialises writers anyway).
    Index(
        "uq_mappings_open_p_uid",
        "p_uid",
        unique=True,
        sqlite_where=text("end_time IS NULL"),
        postgresql_where=text("end_time IS NULL"),
    ),
    Index(
        "uq_mappings_open_l_uid",
        "l_uid",
        unique=True,
        sqlite_where=text("end_time IS NULL"),
        postgresql_where=text("end_time IS NULL"),
    ),
    sqlite_autoincrement=True,
)
"""Which logical device a physical device fed from ``start_time`` until ``end_time``.

At most one mapping per physical device and per logical device is open (``end_time``
NULL): :class:`~isthmus.registry.store.RegistryStore` keeps that rule in its transactions
and two partial unique indexes enforce it.
"""

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(200), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("read_only", Boolean, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)
"""Operators of the management API. ``password_hash`` is an argon2id PHC string."""

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "user_id",
        Integer,
        ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("enabled", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("label", String(200), nullable=False),
    sqlite_autoincrement=True,
)
"""Bearer tokens of users, stored only as the SHA-256 hex digest of the token."""

device_credentials = Table(
    "device_credentials",
    metadata,
    Column(
        "p_uid",
        Integer,
        ForeignKey("physical_devices.uid", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("username", String(200), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)
"""Username + password credentials of physical devices (ThingsBoard's "MQTT Basic", without the
client id): at most one per device (the primary key is the device's uid), usernames unique across
devices, deleted with the device. ``password_hash`` is an argon2id PHC string; ``updated_at`` is
when the credential was last set."""
