"""The registry's Alembic migrations, shipped inside the package.

:func:`migrate` brings a database to the newest schema (``alembic upgrade head``) without an
``alembic.ini``: the script location is this directory, found from ``__file__``, and the
connection is handed to ``env.py`` through ``config.attributes``.

To write a new migration, change :mod:`isthmus.registry.schema`, then (from a checkout)::

    from isthmus.registry.migrations import migrate, revision
    engine = sqlalchemy.create_engine("sqlite:///scratch.db")
    migrate(engine)
    revision("what changed", engine)

and review the generated file under ``versions/``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine
from sqlalchemy.engine import Connection

__all__ = ["SCRIPT_LOCATION", "alembic_config", "migrate", "revision"]

SCRIPT_LOCATION = Path(__file__).resolve().parent
"""The directory holding ``env.py``, ``script.py.mako`` and ``versions/``."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic :class:`~alembic.config.Config` for the registry, without any ini file.

    ``connection``, when given, is what ``env.py`` migrates; the caller owns its transaction.
    """
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(bind: Engine | Connection) -> None:
    """Upgrade the database behind ``bind`` to the newest registry schema.

    Idempotent: a database already at head is left untouched. With an
    :class:`~sqlalchemy.Engine`, the upgrade runs in one transaction of its own, committed on
    success and rolled back on failure. On PostgreSQL DDL is transactional, so a failed upgrade
    leaves the schema as it was; on SQLite that holds with :class:`RegistryStore
    <isthmus.registry.store.RegistryStore>`'s engine, which issues ``BEGIN`` itself (the stock
    ``sqlite3`` driver may commit before DDL). With a :class:`~sqlalchemy.engine.Connection`, the
    caller's transaction is used and committing it is up to the caller. Alembic and database
    errors propagate unchanged; the store translates them.
    """
    if isinstance(bind, Connection):
        command.upgrade(alembic_config(bind), "head")
        return
    with bind.begin() as connection:
        command.upgrade(alembic_config(connection), "head")


def revision(message: str, bind: Engine | Connection) -> None:
    """Autogenerate a new migration from the difference between ``bind`` and the schema.

    A developer tool: ``bind`` should be a database migrated to the current head. The new
    file is written under ``versions/`` and must be reviewed before it is committed.
    """
    if isinstance(bind, Connection):
        command.revision(alembic_config(bind), message=message, autogenerate=True)
        return
    with bind.begin() as connection:
        command.revision(alembic_config(connection), message=message, autogenerate=True)
