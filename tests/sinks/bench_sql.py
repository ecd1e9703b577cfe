"""Throughput of the SQL sink on SQLite: rows/s for batches of 1,000 points (not a test).

Run: ``.venv/bin/python tests/sinks/bench_sql.py [--batches 600] [--core]``. Each batch is 100
telemetry records of 10 numeric points (100 devices), written through ``SqlSink.write`` as the
runner would. ``--core`` swaps the compiled-once ``exec_driver_sql`` path for SQLAlchemy Core's
``conn.execute(upsert, list_of_dicts)`` to show what that costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects.sqlite import insert

from isthmus.message import Message, Point, RawFrame, Record, Status, new_correlation_id
from isthmus.plugins import SinkContext
from isthmus.sinks import sql
from isthmus.sinks.sql import PLUGIN, SqlSink

NAMES = [f"sensor_{i}" for i in range(10)]
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def batch(n: int, records: int = 100) -> list[Record]:
    out = []
    for r in range(records):
        ts = T0 + timedelta(seconds=n, microseconds=r)
        cid = new_correlation_id()
        message = Message(
            correlation_id=cid,
            received_at=ts,
            source="bench",
            p_uid=r,
            kind="telemetry",
            timestamp=ts,
            timeseries=[Point(name, float(n * 10 + i)) for i, name in enumerate(NAMES)],
            l_uid=1000 + r,
        )
        frame = RawFrame(correlation_id=cid, received_at=ts, source="bench", payload=b"")
        out.append(Record(frame=frame, status=Status.OK, p_uid=r, message=message))
    return out


def use_core_executemany(sink: SqlSink) -> None:
    stmt = insert(sink.table)
    upsert = stmt.on_conflict_do_update(
        index_elements=[sink.table.c.l_uid, sink.table.c.name, sink.table.c.ts],
        set_={name: stmt.excluded[name] for name in sql._UPDATED},
    )

    def execute(engine: Engine, rows: list[Any]) -> None:
        params = [dict(zip(sql._COLUMNS, row, strict=True)) for row in rows]
        for p in params:  # Core binds through UtcTimestamp: give it datetimes back
            p["ts"] = sql._from_micros(p["ts"])
        with engine.begin() as conn:
            conn.execute(upsert, params)

    sink._execute = execute  # type: ignore[method-assign]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--core", action="store_true")
    parser.add_argument("--synchronous", default="normal")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sink = PLUGIN.create({"synchronous": args.synchronous}, SinkContext(name="bench", data_dir=Path(tmp)))
        assert isinstance(sink, SqlSink)
        await sink.open()
        if args.core:
            use_core_executemany(sink)
        batches = [batch(n) for n in range(args.batches)]  # built outside the timing
        times = []
        cpu_started = time.process_time()
        started = time.perf_counter()
        for b in batches:
            t = time.perf_counter()
            await sink.write(b)
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        await sink.close()
    rows = args.batches * 1000
    print(
        f"{'core executemany' if args.core else 'compiled once'}: {rows} rows in {elapsed:.2f} s ="
        f" {rows / elapsed:,.0f} rows/s; per 1,000-point batch median {statistics.median(times) * 1e3:.1f} ms,"
        f" p95 {sorted(times)[int(len(times) * 0.95)] * 1e3:.1f} ms; CPU {cpu:.2f} s = {rows / cpu:,.0f} rows/CPU-s"
    )


if __name__ == "__main__":
    asyncio.run(main())
