"""The built-in attribute store: each physical device's latest client and shared attributes.

Client attributes arrive as ``attributes`` records in the journal; an internal runner (cursor
``_attributes``) applies them here, so the store can always be rebuilt from the journal. Shared
attributes are set by operators through the management API. Writes keep the newest value per
key: a replayed older record never overwrites a newer one.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from isthmus.errors import RetryableSinkError
from isthmus.interfaces import WriteResult
from isthmus.message import Record, to_micros, utcnow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attributes (
    p_uid      INTEGER NOT NULL,
    scope      TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      BLOB    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (p_uid, scope, key)
)
"""
_UPSERT = (
    "INSERT INTO attributes (p_uid, scope, key, value, updated_at) VALUES (?,?,?,?,?)"
    " ON CONFLICT (p_uid, scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
    " WHERE excluded.updated_at >= attributes.updated_at"
)


class AttributeStore:
    """A SQLite file of attributes; also the :class:`~isthmus.interfaces.Sink` that fills it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                try:
                    return fn(self._connection(), *args)
                except sqlite3.Error as exc:
                    raise RetryableSinkError(f"attribute store: {exc}") from exc

        return await asyncio.to_thread(locked)

    async def open(self) -> None:
        """Create the file and table."""
        await self._run(lambda conn: None)

    async def write(self, batch: Sequence[Record]) -> WriteResult | None:
        """Apply the client attributes in ``batch`` (records of kind ``attributes``)."""
        rows = [
            (r.p_uid, "client", p.name, self._encoder.encode(p.value), to_micros(r.message.received_at))
            for r in batch
            if r.message is not None and r.p_uid is not None
            for p in r.message.timeseries
        ]

        def upsert(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(_UPSERT, rows)

        await self._run(upsert)
        return None

    async def set_shared(self, p_uid: int, values: dict[str, Any]) -> None:
        """Set shared attributes of a device (operator-side)."""
        now = to_micros(utcnow())
        rows = [(p_uid, "shared", k, self._encoder.encode(v), now) for k, v in values.items()]

        def upsert(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN")
                conn.executemany(_UPSERT, rows)

        await self._run(upsert)

    async def get(self, p_uid: int, scope: str, keys: list[str] | None) -> dict[str, Any]:
        """The device's attributes in ``scope`` (``client`` or ``shared``), optionally only ``keys``."""

        def fetch(conn: sqlite3.Connection) -> dict[str, Any]:
            rows = conn.execute(
                "SELECT key, value FROM attributes WHERE p_uid = ? AND scope = ?", (p_uid, scope)
            ).fetchall()
            wanted = set(keys) if keys is not None else None
            return {k: self._decoder.decode(v) for k, v in rows if wanted is None or k in wanted}

        result: dict[str, Any] = await self._run(fetch)
        return result

    async def request(
        self, p_uid: int, client_keys: list[str] | None, shared_keys: list[str] | None
    ) -> dict[str, dict[str, Any]]:
        """See :class:`~isthmus.interfaces.AttributeReader`."""
        wanted = {"client": client_keys, "shared": shared_keys}
        if client_keys is None and shared_keys is None:
            return {scope: await self.get(p_uid, scope, None) for scope in wanted}
        return {scope: await self.get(p_uid, scope, keys) for scope, keys in wanted.items() if keys is not None}

    async def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
