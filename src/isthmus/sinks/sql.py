"""The SQL timeseries store: telemetry points as rows in one table (SQLAlchemy 2 Core).

Works on SQLite (the default: one file in the data directory) and PostgreSQL. The table::

    timeseries (
        l_uid          BIGINT,             -- logical device
        name           TEXT,               -- point name, stored verbatim
        ts             <UTC timestamp>,    -- see UtcTimestamp
        value_type     TEXT,               -- 'number' | 'boolean' | 'string' | 'json'
        value_num      DOUBLE NULL,        -- numbers; booleans as 0/1
        value_text     TEXT NULL,          -- strings; JSON text; exact digits of integers
        correlation_id TEXT,               -- of the message that last wrote the row
        PRIMARY KEY (l_uid, name, ts)
    )

plus an index on ``(l_uid, ts)`` for queries over all the names of one device.

Writes are idempotent upserts keyed by the primary key, so a replayed or re-delivered record
overwrites the value and the correlation id instead of adding a row. All database work runs in
worker threads (``asyncio.to_thread``); nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import msgspec
from pydantic import Field, field_validator
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Double,
    Engine,
    Index,
    MetaData,
    Table,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

from isthmus.errors import PermanentSinkError, RetryableSinkError, SinkError
from isthmus.interfaces import StoredPoint, WriteResult
from isthmus.message import Record
from isthmus.plugins import PluginConfig, SinkContext, SinkPlugin

__all__ = ["PLUGIN", "SqlSink", "SqlSinkConfig", "UtcTimestamp"]

_SUPPORTED_BACKENDS = ("sqlite", "postgresql")

# The order of the values in a row tuple, and of the upsert's parameters.
_COLUMNS = ("l_uid", "name", "ts", "value_type", "value_num", "value_text", "correlation_id")
_UPDATED = ("value_type", "value_num", "value_text", "correlation_id")
# 7 parameters a row; SQLite allows 32,766 per statement.
_ROWS_PER_STATEMENT = 2000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_EXACT_INT = 2**53  # every integer of at most this magnitude is exact in an IEEE double
_REASON_MAX = 300
_WAL_AUTOCHECKPOINT_PAGES = 10_000
_WAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL file is truncated to after a checkpoint

Row = tuple[int, str, Any, str, float | None, str | None, str]


# --------------------------------------------------------------------------- configuration


class SqlSinkConfig(PluginConfig):
    """Options of the ``sql`` sink."""

    url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy database URL, e.g. 'sqlite:////var/lib/isthmus/ts.db' or "
            "'postgresql+psycopg://user:pass@host/db' (the driver must be installed). "
            "Default: the SQLite file 'timeseries.db' in the instance's data directory."
        ),
    )
    table: str = Field(
        default="timeseries",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,47}$",
        description=(
            "Name of the table (created if missing). A plain SQL identifier: letters, digits "
            "and underscores, not starting with a digit, at most 48 characters."
        ),
    )
    busy_timeout: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description=(
            "SQLite only: seconds a write waits for another connection's lock before giving up; "
            "the batch is then retried by the runner."
        ),
    )
    cache_size_mb: int = Field(
        default=64,
        ge=1,
        le=65536,
        description=(
            "SQLite only: page cache of each connection in MiB (at most 5 connections). It should "
            "hold the last page of every active series: too small and each batch re-reads pages."
        ),
    )
    synchronous: Literal["normal", "full"] = Field(
        default="normal",
        description=(
            "SQLite only: 'normal' (WAL without an fsync per commit; a power loss may undo the "
            "last commits, which a replay of the journal restores) or 'full' (every commit "
            "survives a power loss, at the cost of one fsync per batch)."
        ),
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a SQLAlchemy database URL: {exc}") from None
        backend = url.get_backend_name()
        if backend not in _SUPPORTED_BACKENDS:
            supported = ", ".join(_SUPPORTED_BACKENDS)
            raise ValueError(f"unsupported database {backend!r} (supported: {supported})")
        if backend == "sqlite" and url.database in (None, "", ":memory:"):
            raise ValueError("an in-memory SQLite database is private to one connection; give a file path")
        return value


# --------------------------------------------------------------------------- timestamps


def _to_micros(ts: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"timestamp {ts.isoformat()} has no time zone")
    return (ts - _EPOCH) // timedelta(microseconds=1)


def _from_micros(us: int) -> datetime:
    """Inverse of :func:`_to_micros` (exact, unlike a float division)."""
    return _EPOCH + timedelta(microseconds=us)


def _ts_to_db(dialect_name: str, ts: datetime) -> Any:
    """The value bound for ``ts`` on ``dialect_name`` (must agree with :class:`UtcTimestamp`)."""
    if dialect_name == "postgresql":
        _to_micros(ts)  # the same check for a time zone
        return ts.astimezone(UTC)
    return _to_micros(ts)


class UtcTimestamp(TypeDecorator[datetime]):
    """An aware UTC datetime with microsecond precision, stored natively per database.

    * SQLite: ``BIGINT`` microseconds since the Unix epoch. Measured on the upsert of 1,000-point
      batches it is about 1.4 times as fast as ``DateTime`` (which SQLite stores as a 26-byte
      ISO string that SQLAlchemy formats and parses in Python, and which drops the zone): an
      8-byte integer key makes the primary key smaller and compares faster, and the bind needs
      no string formatting. Range queries compare integers.
    * PostgreSQL: ``TIMESTAMP WITH TIME ZONE`` (also microsecond precision), which the driver
      binds natively and which other tools (Grafana, TimescaleDB) expect.

    Values are returned as aware UTC datetimes on both.
    """

    impl = BigInteger
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(DateTime(timezone=True))
        return dialect.type_descriptor(BigInteger())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        return None if value is None else _ts_to_db(dialect.name, value)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.astimezone(UTC)
        return _from_micros(int(value))


# --------------------------------------------------------------------------- values


def _encode_value(value: object) -> tuple[str, float | None, str | None]:
    """``(value_type, value_num, value_text)`` for a point's value.

    Booleans are 0/1 in ``value_num``; integers keep their exact digits in ``value_text`` (which
    also tells them apart from floats on the way back) and their double in ``value_num``;
    non-finite floats are spelled in ``value_text`` (SQLite would store NaN as NULL).
    """
    if isinstance(value, bool):
        return "boolean", 1.0 if value else 0.0, None
    if isinstance(value, int):
        if -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT:
            return "number", float(value), str(value)
        try:
            num: float | None = float(value)
        except OverflowError:
            num = None
        return "number", num, str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return "number", value, None
        return "number", None, repr(value)
    if isinstance(value, str):
        return "string", None, value
    if isinstance(value, dict | list):
        return "json", None, msgspec.json.encode(value).decode()
    raise TypeError(f"unsupported value type {type(value).__name__}")


def _decode_value(value_type: str, num: float | None, text: str | None) -> object:
    """Inverse of :func:`_encode_value`."""
    if value_type == "number":
        if text is None:
            return num
        try:
            return int(text)
        except ValueError:
            return float(text)
    if value_type == "boolean":
        return bool(num)
    if value_type == "json":
        return msgspec.json.decode(text or "null")
    return text


# --------------------------------------------------------------------------- errors


def _utc_session(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("SET TIME ZONE 'UTC'")
    cursor.close()
    dbapi_connection.commit()


def _describe(exc: BaseException) -> str:
    """A short reason: the driver's message without SQLAlchemy's statement and parameters."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        text = f"{type(exc.orig).__name__}: {exc.orig}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def _is_retryable(exc: BaseException) -> bool:
    """Transient: the database is locked, down, unreachable or out of space for now."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated
    # Any other SQLAlchemy error that is not about the statement (pool timeout, disconnect …).
    return isinstance(exc, SQLAlchemyError) and not isinstance(exc, StatementError)


# What executing the upsert may raise. Besides SQLAlchemy's errors, the driver raises some
# binding errors unwrapped (sqlite3: UnicodeEncodeError for a lone surrogate, OverflowError).
_EXECUTE_ERRORS = (SQLAlchemyError, ValueError, TypeError, OverflowError)


def _translate(exc: BaseException, where: str) -> SinkError:
    reason = f"{where}: {_describe(exc)}"
    if _is_retryable(exc):
        return RetryableSinkError(reason)
    return PermanentSinkError(reason)


# --------------------------------------------------------------------------- the sink


def _build_table(name: str) -> tuple[MetaData, Table]:
    metadata = MetaData()
    table = Table(
        name,
        metadata,
        Column("l_uid", BigInteger, primary_key=True, autoincrement=False),
        Column("name", Text, primary_key=True),
        Column("ts", UtcTimestamp, primary_key=True),
        Column("value_type", Text, nullable=False),
        Column("value_num", Double, nullable=True),
        Column("value_text", Text, nullable=True),
        Column("correlation_id", Text, nullable=False),
        # An ordinary rowid table on SQLite: measured ~15% faster to upsert into than WITHOUT
        # ROWID (whose leaf pages hold whole rows, so a batch dirties more of them).
    )
    # For queries over every name of one device; costs ~15% of write throughput on SQLite.
    Index(f"{name}_l_uid_ts", table.c.l_uid, table.c.ts)
    return metadata, table


class SqlSink:
    """Implements :class:`~isthmus.interfaces.Sink` and :class:`~isthmus.interfaces.TimeseriesReader`.

    Stores the points of telemetry records, one row per (logical device, point name, effective
    timestamp). Records of any other kind (attributes) are skipped and, since there is nothing
    for this sink to do with them, count as delivered. A record whose values cannot be stored
    (a timestamp without time zone, a value of an unknown type, or one the database refuses)
    is rejected alone through :class:`~isthmus.interfaces.WriteResult`; the rest of its batch is
    written.

    SQLite runs in WAL mode with ``synchronous=NORMAL`` by default: a commit survives a crash of
    the process but a power loss or OS crash may undo the last few commits (the file stays
    consistent). That is acceptable here because this table is not the durable copy: the
    journal is, it fsyncs every record, and delivery is at-least-once with idempotent upserts,
    so anything lost that way is restored by replaying the journal over the affected period.
    ``synchronous = "full"`` trades one fsync per batch for not needing that replay.
    """

    def __init__(self, config: SqlSinkConfig, ctx: SinkContext) -> None:
        self.config = config
        self.ctx = ctx
        self._default_path: Path | None = None
        if config.url is None:
            self._default_path = ctx.data_dir / "timeseries.db"
            self.url: URL = URL.create("sqlite", database=str(self._default_path))
        else:
            self.url = make_url(config.url)
        self._metadata, self.table = _build_table(config.table)
        self._engine: Engine | None = None
        self._dialect_name = self.url.get_backend_name()
        self._sql = ""
        self._positional = True

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the engine and the table if it is missing.

        Raises :class:`~isthmus.errors.RetryableSinkError` when the database cannot be reached
        or is locked, :class:`~isthmus.errors.PermanentSinkError` for anything else.
        """
        if self._engine is not None:
            return
        await asyncio.to_thread(self._open_blocking)

    def _open_blocking(self) -> None:
        if self._default_path is not None:
            try:
                self._default_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RetryableSinkError(f"{self._where}: cannot create the data directory: {exc}") from exc
        try:
            engine = self._create_engine()
        except (SQLAlchemyError, ImportError) as exc:  # an unknown or missing driver
            raise PermanentSinkError(f"{self._where}: {_describe(exc)}") from exc
        try:
            self._metadata.create_all(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            raise _translate(exc, f"{self._where}: creating table {self.table.name!r}") from exc
        self._compile_upsert(engine.dialect)
        self._engine = engine

    def _create_engine(self) -> Engine:
        if self._dialect_name != "sqlite":
            engine = create_engine(self.url, pool_pre_ping=True)
            if self._dialect_name == "postgresql":
                # Timestamps are UTC end to end; a server in another zone would render them shifted
                # (and 9999-12-31T23:59:59Z east of UTC as an unparseable year 10000).
                event.listen(engine, "connect", _utc_session)
            return engine
        # One writer (the runner) and a few readers (queries) at a time.
        engine = create_engine(self.url, pool_size=3, max_overflow=2)
        pragmas = [
            # busy_timeout first: switching to WAL needs a lock too.
            f"PRAGMA busy_timeout = {round(self.config.busy_timeout * 1000)}",
            "PRAGMA journal_mode = WAL",
            f"PRAGMA synchronous = {self.config.synchronous.upper()}",
            f"PRAGMA cache_size = {-1024 * self.config.cache_size_mb}",
            # Each batch dirties about one page per series; checkpointing every 10,000 pages
            # rather than 1,000 copies a page modified by many batches back once, and fsyncs
            # less often (measured 1.5 to 2 times the throughput with the larger cache).
            f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}",
            f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}",
        ]

        @event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                for pragma in pragmas:
                    cursor.execute(pragma)
            finally:
                cursor.close()

        return engine

    def _compile_upsert(self, dialect: Dialect) -> None:
        """Compile the upsert once. Executing this string through ``exec_driver_sql`` with
        plain tuples skips SQLAlchemy's per-row parameter processing, which measured as about
        40% of the time of a 1,000-row batch on SQLite (the insert itself is the rest)."""
        insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        stmt = insert(self.table)
        upsert = stmt.on_conflict_do_update(
            index_elements=[self.table.c.l_uid, self.table.c.name, self.table.c.ts],
            set_={name: stmt.excluded[name] for name in _UPDATED},
        )
        compiled = upsert.compile(dialect=dialect)
        self._sql = str(compiled)
        self._positional = bool(compiled.positional)
        if self._positional and tuple(compiled.positiontup or ()) != _COLUMNS:
            raise PermanentSinkError(f"{self._where}: unexpected parameter order {compiled.positiontup}")
        # On SQLite, one multi-row statement per chunk instead of executemany: CPython's sqlite3
        # releases the GIL around every step, so a row per step made this thread wait for the
        # GIL once per row while the event loop was busy.
        self._multi: tuple[str, str, str] | None = None
        if dialect.name == "sqlite" and self._positional:
            head, sep, rest = self._sql.partition("VALUES (")
            group, close, tail = rest.partition(")")
            if sep and close and group.replace(" ", "") == ",".join("?" * len(_COLUMNS)):
                self._multi = (head + "VALUES ", f"({group})", tail)
        self._multi_sql: dict[int, str] = {}

    async def close(self) -> None:
        """Dispose of the engine and its pooled connections. Safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.dispose)

    @property
    def _where(self) -> str:
        return f"sql sink {self.ctx.name!r} ({self.url.render_as_string(hide_password=True)})"

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise RetryableSinkError(f"{self._where} is not open")
        return self._engine

    # ------------------------------------------------------------------ writing

    async def write(self, batch: Sequence[Record]) -> WriteResult | None:
        """Upsert the points of the telemetry records in ``batch`` (see :class:`SqlSink`).

        One transaction per batch. When the same (l_uid, name, timestamp) occurs more than once
        in the batch, the later point wins. Raises :class:`~isthmus.errors.RetryableSinkError`
        when the database is locked, unreachable or failing (disk I/O), and
        :class:`~isthmus.errors.PermanentSinkError` when it refuses every record of the batch.
        """
        engine = self._require_engine()
        rejected, error = await asyncio.to_thread(self._rows_and_write, engine, batch)
        if error is not None and len(rejected) == len(batch):
            raise _translate(error, self._where) from error
        return WriteResult(rejected=rejected) if rejected else None

    def _rows_and_write(self, engine: Engine, batch: Sequence[Record]) -> tuple[dict[int, str], Exception | None]:
        """Build the rows and write them, in the worker thread (keeps the event loop free)."""
        groups, rejected = self._rows(batch)
        error: Exception | None = None
        if groups:
            refused, error = self._write_blocking(engine, groups)
            rejected.update(refused)
        return rejected, error

    def _rows(self, batch: Sequence[Record]) -> tuple[list[tuple[int, list[Row]]], dict[int, str]]:
        """The rows of each telemetry record, by batch index, and the records refused already."""
        groups: list[tuple[int, list[Row]]] = []
        rejected: dict[int, str] = {}
        dialect = self._dialect_name
        for index, record in enumerate(batch):
            message = record.message
            if message is None or message.l_uid is None:
                rejected[index] = "record is not deliverable (no message or no logical device)"
                continue
            if message.kind != "telemetry":
                continue
            l_uid = message.l_uid
            if not _INT64_MIN <= l_uid <= _INT64_MAX:
                rejected[index] = f"l_uid {l_uid} does not fit a 64-bit integer"
                continue
            correlation_id = message.correlation_id
            default_ts: Any = None  # the message's timestamp as bound, converted once
            rows: list[Row] = []
            for point in message.timeseries:
                try:
                    if point.timestamp is not None:
                        ts = _ts_to_db(dialect, point.timestamp)
                    else:
                        if default_ts is None:
                            default_ts = _ts_to_db(dialect, message.timestamp)
                        ts = default_ts
                    value_type, num, text = _encode_value(point.value)
                except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
                    rejected[index] = f"point {point.name!r}: {exc}"
                    break
                rows.append((l_uid, point.name, ts, value_type, num, text, correlation_id))
            else:
                if rows:
                    groups.append((index, rows))
        return groups, rejected

    def _write_blocking(
        self, engine: Engine, groups: list[tuple[int, list[Row]]]
    ) -> tuple[dict[int, str], Exception | None]:
        """Upsert ``groups`` in one transaction; return the records refused and the error of the batch."""
        # Later points overwrite earlier ones with the same key: the batch's order is kept.
        rows = {(row[0], row[1], row[2]): row for _, group in groups for row in group}
        try:
            self._execute(engine, list(rows.values()))
        except _EXECUTE_ERRORS as exc:
            if _is_retryable(exc):
                raise _translate(exc, self._where) from exc
            if len(groups) == 1:
                return {groups[0][0]: _describe(exc)}, exc
            return self._write_one_by_one(engine, groups), exc
        return {}, None

    def _write_one_by_one(self, engine: Engine, groups: list[tuple[int, list[Row]]]) -> dict[int, str]:
        """After the database refused the batch: write each record alone to find the bad ones."""
        rejected: dict[int, str] = {}
        for index, group in groups:
            unique = list({(row[0], row[1], row[2]): row for row in group}.values())
            try:
                self._execute(engine, unique)
            except _EXECUTE_ERRORS as exc:
                if _is_retryable(exc):
                    raise _translate(exc, self._where) from exc
                rejected[index] = _describe(exc)
        return rejected

    def _execute(self, engine: Engine, rows: list[Row]) -> None:
        if self._multi is not None:
            with engine.begin() as conn:
                for i in range(0, len(rows), _ROWS_PER_STATEMENT):
                    chunk = rows[i : i + _ROWS_PER_STATEMENT]
                    conn.exec_driver_sql(self._multi_statement(len(chunk)), tuple(v for row in chunk for v in row))
            return
        params: list[Row] | list[dict[str, Any]] = rows
        if not self._positional:
            params = [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
        with engine.begin() as conn:
            conn.exec_driver_sql(self._sql, params)

    def _multi_statement(self, count: int) -> str:
        sql = self._multi_sql.get(count)
        if sql is None:
            head, group, tail = self._multi or ("", "", "")
            sql = head + ",".join([group] * count) + tail
            self._multi_sql[count] = sql
        return sql

    # ------------------------------------------------------------------ reading

    async def query(
        self,
        l_uid: int,
        name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[StoredPoint]:
        """Points of logical device ``l_uid`` (optionally one ``name``) with ``since <= ts < until``.

        Oldest first (then by name), at most ``limit``. Values come back with their type:
        booleans as ``bool``, integers as ``int``, other numbers as ``float``, JSON as the parsed
        ``dict``/``list``. ``since`` and ``until`` must be timezone-aware (``ValueError``
        otherwise). Database failures raise :class:`~isthmus.errors.RetryableSinkError` or
        :class:`~isthmus.errors.PermanentSinkError` like writes do.
        """
        engine = self._require_engine()
        for bound in (since, until):
            if bound is not None and (bound.tzinfo is None or bound.utcoffset() is None):
                raise ValueError(f"query bound {bound.isoformat()} has no time zone")
        if limit <= 0:
            return []
        t = self.table
        stmt = select(t.c.name, t.c.ts, t.c.value_type, t.c.value_num, t.c.value_text, t.c.correlation_id)
        stmt = stmt.where(t.c.l_uid == l_uid)
        if name is not None:
            stmt = stmt.where(t.c.name == name)
        if since is not None:
            stmt = stmt.where(t.c.ts >= since)
        if until is not None:
            stmt = stmt.where(t.c.ts < until)
        stmt = stmt.order_by(t.c.ts, t.c.name).limit(limit)

        def run() -> list[StoredPoint]:
            try:
                with engine.connect() as conn:
                    rows = conn.execute(stmt).all()
            except SQLAlchemyError as exc:
                raise _translate(exc, f"{self._where}: query") from exc
            return [
                StoredPoint(
                    l_uid=l_uid,
                    name=point_name,
                    timestamp=ts,
                    value=_decode_value(value_type, num, text),
                    correlation_id=correlation_id,
                )
                for point_name, ts, value_type, num, text, correlation_id in rows
            ]

        return await asyncio.to_thread(run)


def _create(config: SqlSinkConfig, ctx: SinkContext) -> SqlSink:
    return SqlSink(config, ctx)


PLUGIN = SinkPlugin(
    name="sql",
    description=(
        "Stores telemetry points in a SQL table (SQLite by default, PostgreSQL), one row per "
        "device, point name and timestamp, written idempotently; answers timeseries queries."
    ),
    config=SqlSinkConfig,
    factory=_create,
)
