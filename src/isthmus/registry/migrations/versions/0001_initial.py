"""Initial registry schema: devices, mappings, users and API tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Written against plain SQLAlchemy types (not the application's ``UTCDateTime`` decorator) so
that this migration keeps meaning the same thing whatever later happens to the code.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_LOCATION_BOTH_OR_NEITHER = (
    "(latitude IS NULL AND longitude IS NULL) OR (latitude IS NOT NULL AND longitude IS NOT NULL)"
)


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create every registry table."""
    op.create_table(
        "logical_devices",
        sa.Column("uid", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("latitude", sa.Float(), nullable=True),
        sa.Column("longitude", sa.Float(), nullable=True),
        _timestamp("last_seen", nullable=True),
        sa.Column("properties", sa.JSON(), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.CheckConstraint(_LOCATION_BOTH_OR_NEITHER, name=op.f("ck_logical_devices_location")),
        sa.PrimaryKeyConstraint("uid", name=op.f("pk_logical_devices")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "physical_devices",
        sa.Column("uid", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("source_name", sa.String(length=64), nullable=False),
        sa.Column("source_ids", sa.JSON(), nullable=False),
        sa.Column("source_key", sa.Text(), nullable=False),
        sa.Column("latitude", sa.Float(), nullable=True),
        sa.Column("longitude", sa.Float(), nullable=True),
        _timestamp("last_seen", nullable=True),
        sa.Column("properties", sa.JSON(), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("decoder", sa.String(length=200), nullable=True),
        _timestamp("created_at", nullable=False),
        sa.CheckConstraint(_LOCATION_BOTH_OR_NEITHER, name=op.f("ck_physical_devices_location")),
        sa.PrimaryKeyConstraint("uid", name=op.f("pk_physical_devices")),
        sa.UniqueConstraint("token", name=op.f("uq_physical_devices_token")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_physical_devices_source_name_source_key"),
        "physical_devices",
        ["source_name", "source_key"],
        unique=False,
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(length=200), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("read_only", sa.Boolean(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_api_tokens_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_api_tokens_user_id"), "api_tokens", ["user_id"], unique=False)
    op.create_table(
        "mappings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("p_uid", sa.Integer(), nullable=False),
        sa.Column("l_uid", sa.Integer(), nullable=False),
        _timestamp("start_time", nullable=False),
        _timestamp("end_time", nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["l_uid"],
            ["logical_devices.uid"],
            name=op.f("fk_mappings_l_uid_logical_devices"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["p_uid"],
            ["physical_devices.uid"],
            name=op.f("fk_mappings_p_uid_physical_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mappings")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_mappings_p_uid_start_time"),
        "mappings",
        ["p_uid", "start_time"],
        unique=False,
    )
    op.create_index(
        op.f("ix_mappings_l_uid_start_time"),
        "mappings",
        ["l_uid", "start_time"],
        unique=False,
    )
    for column in ("p_uid", "l_uid"):
        op.create_index(
            f"uq_mappings_open_{column}",
            "mappings",
            [column],
            unique=True,
            sqlite_where=sa.text("end_time IS NULL"),
            postgresql_where=sa.text("end_time IS NULL"),
        )


def downgrade() -> None:
    """Drop every registry table (and with them all data)."""
    op.drop_table("mappings")
    op.drop_table("api_tokens")
    op.drop_table("users")
    op.drop_table("physical_devices")
    op.drop_table("logical_devices")
