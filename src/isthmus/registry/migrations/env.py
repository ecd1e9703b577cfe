"""Alembic environment of the registry, run by :func:`isthmus.registry.migrations.migrate`.

It reads nothing from files or the environment and configures no logging: the caller passes
an open SQLAlchemy :class:`~sqlalchemy.engine.Connection` in
``config.attributes["connection"]`` and owns its transaction. Offline (``--sql``) mode is
not supported.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from isthmus.registry.schema import metadata


def _run() -> None:
    if context.is_offline_mode():
        msg = "the registry migrations run online only, on a connection passed by migrate()"
        raise RuntimeError(msg)
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        msg = 'config.attributes["connection"] must hold a SQLAlchemy Connection'
        raise RuntimeError(msg)
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_run()
