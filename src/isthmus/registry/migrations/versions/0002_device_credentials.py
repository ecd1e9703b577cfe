"""Username + password credentials of physical devices.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

A new table only (no existing table is altered, so SQLite needs no batch copy of
``physical_devices``, whose rows other tables reference). Written against plain SQLAlchemy
types, like ``0001``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``device_credentials``."""
    op.create_table(
        "device_credentials",
        sa.Column("p_uid", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("username", sa.String(length=200), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["p_uid"],
            ["physical_devices.uid"],
            name=op.f("fk_device_credentials_p_uid_physical_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("p_uid", name=op.f("pk_device_credentials")),
        sa.UniqueConstraint("username", name=op.f("uq_device_credentials_username")),
    )


def downgrade() -> None:
    """Drop ``device_credentials`` (devices keep their access tokens)."""
    op.drop_table("device_credentials")
