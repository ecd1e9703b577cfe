"""The SQL sink against real databases: SQLite files and PostgreSQL, always both.

The backend-neutral tests run on each. PostgreSQL is a private server the tests start
themselves (see ``postgres_url`` in ``conftest.py``; ``ISTHMUS_TEST_POSTGRES_URL`` points them
at an external one instead); each test uses its own table and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateTable

from isthmus.errors import ConfigError, PermanentSinkError, RetryableSinkError
from isthmus.message import Point, Record, Value
from isthmus.plugins import SinkContext
from isthmus.sinks.sql import PLUGIN, SqlSink

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
US = timedelta(microseconds=1)

MakeRecord = Callable[..., Record]


def build(tmp_path: Path, **options: Any) -> SqlSink:
    options.setdefault("url", f"sqlite:///{tmp_path / 'ts.db'}")
    sink = PLUGIN.create(options, SinkContext(name="ts", data_dir=tmp_path))
    assert isinstance(sink, SqlSink)
    return sink


@pytest.fixture(params=["sqlite", "postgresql"])
async def sink(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlSink]:
    """An open sink on a fresh table, on each backend."""
    if request.param == "sqlite":
        s = build(tmp_path)
    else:
        postgres_url: str = request.getfixturevalue("postgres_url")
        s = build(tmp_path, url=postgres_url, table=f"ts_{uuid.uuid4().hex[:16]}")
    await s.open()
    yield s
    await s.close()
    if request.param == "postgresql":
        engine = create_engine(s.url)
        s.table.drop(engine)
        engine.dispose()


async def count_rows(sink: SqlSink) -> int:
    """Rows in the sink's table, counted on a connection of our own."""

    def count() -> int:
        engine = create_engine(sink.url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(sink.table)).scalar_one())
        finally:
            engine.dispose()

    return await asyncio.to_thread(count)


# --------------------------------------------------------------------------- round trips


VALUES: list[tuple[str, Value]] = [
    ("bool_true", True),
    ("bool_false", False),
    ("int_zero", 0),
    ("int_negative", -17),
    ("int_max_exact", 2**53),
    ("int_beyond_double", 2**53 + 1),
    ("int64_max", 2**63 - 1),
    ("int_huge", 10**30),
    ("float", 21.5),
    ("float_integral", 3.0),
    ("float_tiny", 5e-324),
    ("float_inf", math.inf),
    ("float_neg_inf", -math.inf),
    ("string", "héllo ✓"),
    ("string_empty", ""),
    ("string_numeric", "42"),
    ("json_object", {"a": 1, "b": [True, None, 2.5], "c": {"d": "e"}}),
    ("json_empty_object", {}),
    ("json_array", [1, "two", {"three": 3}]),
    ("json_empty_array", []),
]


async def test_every_value_type_round_trips_with_its_type(sink: SqlSink, make_record: MakeRecord) -> None:
    record = make_record([Point(name, value) for name, value in VALUES], timestamp=T0)
    assert await sink.write([record]) is None

    stored = {p.name: p for p in await sink.query(42)}
    assert set(stored) == {name for name, _ in VALUES}
    for name, value in VALUES:
        got = stored[name]
        assert type(got.value) is type(value), name
        assert got.value == value, name
        assert got.timestamp == T0
        assert got.l_uid == 42
        assert got.correlation_id == record.message.correlation_id  # type: ignore[union-attr]


async def test_nan_round_trips(sink: SqlSink, make_record: MakeRecord) -> None:
    await sink.write([make_record([Point("nan", math.nan)])])
    [point] = await sink.query(42)
    assert isinstance(point.value, float)
    assert math.isnan(point.value)


@pytest.mark.parametrize(
    "ts",
    [
        T0,
        datetime(2024, 5, 6, 9, 8, 9, 123457, tzinfo=timezone(timedelta(hours=2))),  # not UTC
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
async def test_timestamps_round_trip_as_aware_utc_to_the_microsecond(
    sink: SqlSink, make_record: MakeRecord, ts: datetime
) -> None:
    await sink.write([make_record([Point("v", 1, timestamp=ts)])])
    [point] = await sink.query(42)
    assert point.timestamp == ts
    assert point.timestamp.tzinfo is UTC
    assert point.timestamp.microsecond == ts.microsecond


async def test_point_timestamp_overrides_message_timestamp(sink: SqlSink, make_record: MakeRecord) -> None:
    own = T0 + timedelta(seconds=5)
    await sink.write([make_record([Point("a", 1), Point("b", 2, timestamp=own)], timestamp=T0)])
    assert [(p.name, p.timestamp) for p in await sink.query(42)] == [("a", T0), ("b", own)]


async def test_default_database_is_created_in_the_data_dir(tmp_path: Path, make_record: MakeRecord) -> None:
    data_dir = tmp_path / "not" / "yet"
    sink = PLUGIN.create({}, SinkContext(name="ts", data_dir=data_dir))
    assert isinstance(sink, SqlSink)
    await sink.open()
    try:
        await sink.write([make_record()])
    finally:
        await sink.close()
    assert await count_rows(sink) == 1
    with sqlite3.connect(data_dir / "timeseries.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --------------------------------------------------------------------------- idempotency


async def test_writing_a_batch_twice_stores_it_once(sink: SqlSink, make_record: MakeRecord) -> None:
    batch = [make_record([Point("a", i), Point("b", i * 2)], timestamp=T0 + i * US) for i in range(50)]
    await sink.write(batch)
    first = await sink.query(42)
    await sink.write(batch)
    assert await count_rows(sink) == 100
    assert await sink.query(42) == first


async def test_replay_overwrites_value_and_correlation_id(sink: SqlSink, make_record: MakeRecord) -> None:
    await sink.write([make_record([Point("a", 1), Point("b", "x")], correlation_id="first")])
    await sink.write([make_record([Point("a", {"now": "json"}), Point("b", False)], correlation_id="second")])
    stored = await sink.query(42)
    assert [(p.name, p.value, p.correlation_id) for p in stored] == [
        ("a", {"now": "json"}, "second"),
        ("b", False, "second"),
    ]
    assert await count_rows(sink) == 2


async def test_duplicate_key_in_one_batch_later_wins(sink: SqlSink, make_record: MakeRecord) -> None:
    batch = [
        make_record([Point("a", 1), Point("a", 2)], correlation_id="r0"),  # twice in one record
        make_record([Point("b", 1)], correlation_id="r1"),
        make_record([Point("a", 3)], correlation_id="r2"),  # and again in a later record
        make_record([Point("a", 4)], l_uid=43, correlation_id="r3"),  # another device: its own row
    ]
    assert await sink.write(batch) is None
    assert [(p.name, p.value, p.correlation_id) for p in await sink.query(42)] == [
        ("a", 3, "r2"),
        ("b", 1, "r1"),
    ]
    assert [p.value for p in await sink.query(43)] == [4]
    assert await count_rows(sink) == 3


# --------------------------------------------------------------------------- queries


async def test_query_order_bounds_and_limit(sink: SqlSink, make_record: MakeRecord) -> None:
    # Written newest first, on purpose.
    batch = [make_record([Point("b", i), Point("a", i)], timestamp=T0 + i * US) for i in reversed(range(10))]
    batch.append(make_record([Point("a", 99)], l_uid=7, timestamp=T0))
    await sink.write(batch)

    everything = await sink.query(42)
    assert [(p.timestamp, p.name) for p in everything] == [
        (T0 + i * US, name) for i in range(10) for name in ("a", "b")
    ]
    only_a = await sink.query(42, name="a")
    assert [p.value for p in only_a] == list(range(10))

    window = await sink.query(42, name="a", since=T0 + 2 * US, until=T0 + 5 * US)
    assert [p.value for p in window] == [2, 3, 4]  # since inclusive, until exclusive
    assert [p.value for p in await sink.query(42, name="a", since=T0 + 8 * US)] == [8, 9]
    assert [p.value for p in await sink.query(42, name="a", until=T0 + 2 * US)] == [0, 1]
    assert await sink.query(42, since=T0 + 5 * US, until=T0 + 5 * US) == []

    assert [(p.name, p.value) for p in await sink.query(42, limit=3)] == [("a", 0), ("b", 0), ("a", 1)]
    assert await sink.query(42, limit=0) == []
    assert [p.value for p in await sink.query(7)] == [99]
    assert await sink.query(42, name="nope") == []
    assert await sink.query(1000) == []


async def test_query_bounds_in_another_zone(sink: SqlSink, make_record: MakeRecord) -> None:
    await sink.write([make_record([Point("a", i)], timestamp=T0 + timedelta(hours=i)) for i in range(4)])
    plus2 = timezone(timedelta(hours=2))
    stored = await sink.query(42, since=(T0 + timedelta(hours=1)).astimezone(plus2))
    assert [p.value for p in stored] == [1, 2, 3]


async def test_query_refuses_naive_bounds(sink: SqlSink) -> None:
    with pytest.raises(ValueError, match="time zone"):
        await sink.query(42, since=datetime(2024, 1, 1))  # noqa: DTZ001


async def test_sql_like_names_are_stored_verbatim(sink: SqlSink, make_record: MakeRecord) -> None:
    names = ["'; DROP TABLE timeseries; --", 'a"b', "100%_sure", "?", ":name", "%(x)s", "\\", "名前"]
    await sink.write([make_record([Point(name, name) for name in names])])
    for name in names:
        [point] = await sink.query(42, name=name)
        assert point.name == name
        assert point.value == name
    assert await count_rows(sink) == len(names)


# --------------------------------------------------------------------------- what is skipped or rejected


async def test_attribute_records_are_skipped(sink: SqlSink, make_record: MakeRecord) -> None:
    batch = [make_record([Point("fw", "1.2")], kind="attributes"), make_record([Point("t", 1)])]
    assert await sink.write(batch) is None
    assert [p.name for p in await sink.query(42)] == ["t"]
    assert await count_rows(sink) == 1


async def test_empty_batch_and_records_without_points(sink: SqlSink, make_record: MakeRecord) -> None:
    assert await sink.write([]) is None
    assert await sink.write([make_record([])]) is None
    assert await sink.query(42) == []


async def test_unstorable_record_is_rejected_alone(sink: SqlSink, make_record: MakeRecord) -> None:
    naive = datetime(2024, 1, 1)  # noqa: DTZ001 - the mistake under test
    batch = [
        make_record([Point("ok", 1)], timestamp=T0),
        make_record([Point("fine", 1), Point("bad", 2, timestamp=naive)]),
        make_record([Point("odd", object())]),  # type: ignore[arg-type]
        make_record([Point("ok", 2)], timestamp=T0 + US),
        make_record([Point("big", 1)], l_uid=2**63),
    ]
    result = await sink.write(batch)
    assert result is not None
    assert set(result.rejected) == {1, 2, 4}
    assert "time zone" in result.rejected[1]
    assert "object" in result.rejected[2]
    assert "64-bit" in result.rejected[4]
    assert [(p.name, p.value) for p in await sink.query(42)] == [("ok", 1), ("ok", 2)]


async def test_record_the_database_refuses_is_rejected_alone(sink: SqlSink, make_record: MakeRecord) -> None:
    # A lone surrogate cannot be encoded as UTF-8: the driver refuses that record only.
    batch = [
        make_record([Point("a", 1)], timestamp=T0),
        make_record([Point("a", "\ud800")], timestamp=T0 + US),
        make_record([Point("a", 3)], timestamp=T0 + 2 * US),
        make_record([Point("\udfff", 4)], timestamp=T0 + 3 * US),
    ]
    result = await sink.write(batch)
    assert result is not None
    assert sorted(result.rejected) == [1, 3]
    assert "surrogate" in result.rejected[1]
    assert [p.value for p in await sink.query(42)] == [1, 3]


async def test_batch_the_database_refuses_entirely_is_permanent(sink: SqlSink, make_record: MakeRecord) -> None:
    # correlation_id is NOT NULL: the database refuses every record of this batch.
    batch = [make_record([Point("a", i)], timestamp=T0 + i * US, correlation_id=None) for i in range(3)]
    with pytest.raises(PermanentSinkError, match=r"(?i)not.null"):
        await sink.write(batch)
    with pytest.raises(PermanentSinkError, match=r"(?i)not.null"):
        await sink.write(batch[:1])
    assert await sink.query(42) == []
    # Not when the batch holds anything else: then the refused record is rejected alone.
    result = await sink.write([make_record([Point("fw", "1")], kind="attributes"), batch[0]])
    assert result is not None
    assert list(result.rejected) == [1]


# --------------------------------------------------------------------------- transient failures


async def test_locked_database_is_retryable(tmp_path: Path, make_record: MakeRecord) -> None:
    sink = build(tmp_path, busy_timeout=0.1)
    await sink.open()
    blocker = sqlite3.connect(tmp_path / "ts.db", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(RetryableSinkError, match="locked") as info:
            await sink.write([make_record()])
        assert "ts.db" in str(info.value)
        blocker.execute("ROLLBACK")
        assert await sink.write([make_record()]) is None  # the retry goes through
        assert len(await sink.query(42)) == 1
    finally:
        blocker.close()
        await sink.close()


async def test_unopenable_database_is_retryable_on_open(tmp_path: Path) -> None:
    sink = build(tmp_path, url=f"sqlite:///{tmp_path / 'missing-dir' / 'ts.db'}")
    with pytest.raises(RetryableSinkError, match="unable to open"):
        await sink.open()
    await sink.close()


async def test_write_before_open_is_an_error(tmp_path: Path, make_record: MakeRecord) -> None:
    sink = build(tmp_path)
    with pytest.raises(RetryableSinkError, match="not open"):
        await sink.write([make_record()])
    with pytest.raises(RetryableSinkError, match="not open"):
        await sink.query(42)


async def test_reopen_keeps_data_and_close_twice(tmp_path: Path, make_record: MakeRecord) -> None:
    sink = build(tmp_path, table="points_v2")
    await sink.open()
    await sink.write([make_record()])
    await sink.close()
    await sink.close()
    again = build(tmp_path, table="points_v2")
    await again.open()
    try:
        assert [p.value for p in await again.query(42)] == [21.5]
    finally:
        await again.close()
    assert await count_rows(again) == 1


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"table": "bad-name"}, "table"),
        ({"table": "1st"}, "table"),
        ({"table": "x; DROP TABLE y"}, "table"),
        ({"url": "mysql://u@h/db"}, "unsupported database 'mysql'"),
        ({"url": "sqlite://"}, "in-memory"),
        ({"url": "sqlite:///:memory:"}, "in-memory"),
        ({"url": "not a url"}, "url"),
        ({"busy_timeout": -1}, "busy_timeout"),
        ({"synchronous": "off"}, "synchronous"),
        ({"cache_size_mb": 0}, "cache_size_mb"),
        ({"kinds": ["telemetry"]}, "kinds: unknown key"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PLUGIN.create(options, SinkContext(name="ts", data_dir=tmp_path))


def test_every_option_is_documented() -> None:
    fields = PLUGIN.config.model_fields
    assert set(fields) == {"url", "table", "busy_timeout", "cache_size_mb", "synchronous"}
    assert all(field.description for field in fields.values())


def test_entry_point_names_this_plugin() -> None:
    [ep] = [ep for ep in entry_points(group="isthmus.sinks") if ep.name == "sql"]
    assert ep.load() is PLUGIN
    assert PLUGIN.name == "sql"


def test_postgresql_schema_and_upsert_compile(tmp_path: Path) -> None:
    sink = build(tmp_path, url="postgresql+psycopg://isthmus:secret@db.example/isthmus")
    dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
    ddl = str(CreateTable(sink.table).compile(dialect=dialect))
    assert "ts TIMESTAMP WITH TIME ZONE NOT NULL" in ddl
    assert "PRIMARY KEY (l_uid, name, ts)" in ddl
    sink._compile_upsert(dialect)
    assert "ON CONFLICT (l_uid, name, ts) DO UPDATE SET" in sink._sql
    assert not sink._positional
    assert "secret" not in sink._where


async def test_nul_character_in_a_string(sink: SqlSink, make_record: MakeRecord) -> None:
    # SQLite stores it; PostgreSQL's text type cannot hold NUL, so there that record alone is refused.
    batch = [make_record([Point("s", "a\x00b")], timestamp=T0), make_record([Point("s", "ok")], timestamp=T0 + US)]
    result = await sink.write(batch)
    if sink.url.get_backend_name() == "sqlite":
        assert result is None
        assert [p.value for p in await sink.query(42)] == ["a\x00b", "ok"]
    else:
        assert result is not None
        assert list(result.rejected) == [0]
        assert [p.value for p in await sink.query(42)] == ["ok"]


async def test_postgres_sessions_are_utc_whatever_the_server_zone(
    tmp_path: Path, make_record: MakeRecord, postgres_url: str
) -> None:
    """A client zone east of UTC must not shift (or break) stored timestamps."""
    url = make_url(postgres_url).update_query_dict({"options": "-c timezone=Asia/Tokyo"})
    s = build(tmp_path, url=url.render_as_string(hide_password=False), table=f"ts_{uuid.uuid4().hex[:16]}")
    await s.open()
    try:
        last = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        await s.write([make_record([Point("v", 1, timestamp=last), Point("w", 2, timestamp=T0)])])
        assert sorted(p.timestamp for p in await s.query(42)) == [T0, last]
    finally:
        await s.close()
        engine = create_engine(s.url)
        s.table.drop(engine)
        engine.dispose()


async def test_batches_larger_than_one_statement(sink: SqlSink, make_record: MakeRecord) -> None:
    points = [Point(f"p{i % 7}", i, timestamp=T0 + i * US) for i in range(4500)]
    await sink.write([make_record(points[:2500]), make_record(points[2500:])])
    assert await count_rows(sink) == 4500
    stored = await sink.query(42, limit=10_000)
    assert sorted(p.value for p in stored) == list(range(4500))
