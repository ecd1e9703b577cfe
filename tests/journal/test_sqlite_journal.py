"""The embedded journal against real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from isthmus.errors import JournalClosed, JournalError, NotFound
from isthmus.interfaces import Cursor, DeadLetter, RecordQuery
from isthmus.journal.sqlite import RetentionPolicy, SQLiteJournal
from isthmus.message import RawFrame, Record, Status, utcnow
from isthmus.testing import make_record


@pytest.fixture
async def journal(tmp_path: Path):
    j = SQLiteJournal(tmp_path / "journal.db")
    await j.open()
    yield j
    await j.close()


async def test_append_assigns_increasing_seqs_and_round_trips(journal: SQLiteJournal) -> None:
    records = [make_record(value=i) for i in range(5)]
    seqs = await journal.append(records)
    assert seqs == [1, 2, 3, 4, 5]
    back = await journal.read(0, 10)
    assert [r.seq for r in back] == seqs
    for original, stored in zip(records, back, strict=True):
        assert stored.frame == original.frame
        assert stored.message == original.message
        assert stored.status is Status.OK


async def test_records_survive_reopen(tmp_path: Path) -> None:
    j = SQLiteJournal(tmp_path / "j.db")
    await j.open()
    await j.append([make_record(value=3.5)])
    await j.close()
    j2 = SQLiteJournal(tmp_path / "j.db")
    await j2.open()
    try:
        assert j2.last_seq == 1
        (r,) = await j2.read(0, 10)
        assert r.message is not None and r.message.timeseries[0].value == 3.5
    finally:
        await j2.close()


async def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    commits: list[int] = []
    j = SQLiteJournal(tmp_path / "j.db", on_commit=lambda n, _s: commits.append(n))
    await j.open()
    try:
        results = await asyncio.gather(*(j.append([make_record(value=i)]) for i in range(500)))
        seqs = sorted(s for (s,) in results)
        assert seqs == list(range(1, 501))
        assert sum(commits) == 500
        assert len(commits) < 500, "every append got its own commit: no group commit happened"
    finally:
        await j.close()


async def test_max_batch_bounds_a_commit(tmp_path: Path) -> None:
    commits: list[int] = []
    j = SQLiteJournal(tmp_path / "j.db", max_batch=10, commit_interval=0.05, on_commit=lambda n, _s: commits.append(n))
    await j.open()
    try:
        await asyncio.gather(*(j.append([make_record()]) for _ in range(35)))
        assert max(commits) <= 10
        assert sum(commits) == 35
    finally:
        await j.close()


async def test_read_waits_for_an_append(journal: SQLiteJournal) -> None:
    reader = asyncio.create_task(journal.read(0, 10, wait=5.0))
    await asyncio.sleep(0.05)
    assert not reader.done()
    await journal.append([make_record()])
    records = await asyncio.wait_for(reader, 2.0)
    assert len(records) == 1


async def test_read_returns_empty_after_wait_timeout(journal: SQLiteJournal) -> None:
    assert await journal.read(0, 10, wait=0.05) == []


async def test_cursor_and_dead_letters_commit_together(journal: SQLiteJournal) -> None:
    (seq,) = await journal.append([make_record()])
    assert await journal.load_cursor("s") == Cursor("s")
    dl = DeadLetter(
        id=0,
        sink="s",
        seq=seq,
        correlation_id="c",
        stage="deliver",
        reason="boom",
        attempts=3,
        created_at=utcnow(),
        payload=b"\xff raw",
        message=b'{"x":1}',
    )
    await journal.commit_cursor(Cursor("s", seq=seq, dead_lettered=1), [dl])
    cursor = await journal.load_cursor("s")
    assert (cursor.seq, cursor.dead_lettered, cursor.delivered) == (seq, 1, 0)
    (stored,) = await journal.dead_letters("s")
    assert stored.reason == "boom" and stored.payload == b"\xff raw" and stored.attempts == 3
    assert (await journal.dead_letter(stored.id)).correlation_id == "c"
    with pytest.raises(NotFound):
        await journal.dead_letter(stored.id + 100)
    assert await journal.dead_letter_counts() == {"s": 1}


async def test_query_filters(journal: SQLiteJournal) -> None:
    await journal.append([make_record(p_uid=1, l_uid=None), make_record(p_uid=2, l_uid=5), make_record(p_uid=1)])
    assert [r.p_uid for r in await journal.query(RecordQuery(p_uid=1))] == [1, 1]
    assert [r.seq for r in await journal.query(RecordQuery(p_uid=1, newest_first=False))] == [1, 3]
    assert [r.seq for r in await journal.query(RecordQuery(unmapped=True))] == [1]
    assert [r.seq for r in await journal.query(RecordQuery(l_uid=5))] == [2]
    assert len(await journal.query(RecordQuery(limit=2))) == 2
    future = utcnow() + timedelta(hours=1)
    assert await journal.query(RecordQuery(since=future)) == []


async def test_closed_journal_refuses_work(tmp_path: Path) -> None:
    j = SQLiteJournal(tmp_path / "j.db")
    await j.open()
    await j.close()
    with pytest.raises(JournalClosed):
        await j.append([make_record()])
    with pytest.raises(JournalClosed):
        await j.read(0, 1)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    j = SQLiteJournal(path)
    with pytest.raises(JournalError, match="newer"):
        await j.open()
    await j.close()


async def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    j = SQLiteJournal(blocker / "j.db")
    with pytest.raises((JournalError, OSError)):
        await j.open()
    await j.close()


async def test_retention_by_age_stops_at_the_slowest_cursor(journal: SQLiteJournal) -> None:
    old = utcnow() - timedelta(days=10)
    await journal.append([make_record(received_at=old) for _ in range(4)] + [make_record()])
    journal.retention = RetentionPolicy(max_age=timedelta(days=1))
    journal.set_active_consumers(["a", "b"])
    await journal.commit_cursor(Cursor("a", seq=5))
    await journal.commit_cursor(Cursor("b", seq=2))
    report = await journal.apply_retention()
    assert (report.deleted, report.dropped_unconsumed, report.floor) == (2, 0, 2)
    assert [r.seq for r in await journal.read(0, 10)] == [3, 4, 5]


async def test_retention_beyond_cursors_counts_what_it_drops(journal: SQLiteJournal) -> None:
    old = utcnow() - timedelta(days=10)
    await journal.append([make_record(received_at=old) for _ in range(4)] + [make_record()])
    journal.retention = RetentionPolicy(max_age=timedelta(days=1), beyond_cursors=True)
    journal.set_active_consumers(["slow"])
    await journal.commit_cursor(Cursor("slow", seq=1))
    report = await journal.apply_retention()
    assert (report.deleted, report.dropped_unconsumed) == (4, 3)
    assert (await journal.stats()).dropped_unconsumed == 3
    assert [r.seq for r in await journal.read(0, 10)] == [5]


async def test_retention_by_size(journal: SQLiteJournal) -> None:
    big = [make_record() for _ in range(200)]
    big = [
        Record(
            frame=RawFrame(r.frame.correlation_id, r.frame.received_at, "http", b"x" * 4000),
            status=Status.OK,
            p_uid=1,
            message=r.message,
        )
        for r in big
    ]
    await journal.append(big)
    before = await journal.stats()
    journal.retention = RetentionPolicy(max_bytes=before.bytes_used // 2)
    report = await journal.apply_retention()
    after = await journal.stats()
    assert report.deleted > 50
    assert after.records == before.records - report.deleted
    assert after.bytes_used < before.bytes_used


async def test_a_batch_larger_than_one_insert_statement(journal: SQLiteJournal) -> None:
    records = [make_record(value=i) for i in range(2500)]
    seqs = await journal.append(records)
    assert seqs == list(range(1, 2501))
    back = await journal.read(0, 3000)
    assert [r.seq for r in back] == seqs
    assert [r.frame.correlation_id for r in back] == [r.frame.correlation_id for r in records]


async def test_retention_keeps_the_newest_record_so_seqs_are_never_reused(journal: SQLiteJournal) -> None:
    old = utcnow() - timedelta(days=10)
    await journal.append([make_record(received_at=old) for _ in range(3)])
    journal.retention = RetentionPolicy(max_age=timedelta(days=1))
    journal.set_active_consumers(["a"])
    await journal.commit_cursor(Cursor("a", seq=3))
    report = await journal.apply_retention()
    assert report.deleted == 2
    assert await journal.append([make_record()]) == [4]


async def test_checkpoints_run_off_the_commit_path(journal: SQLiteJournal) -> None:
    db = journal.path
    before = db.stat().st_size
    await journal.append([make_record() for _ in range(500)])
    assert db.stat().st_size == before, "the writer itself does not checkpoint"
    await asyncio.sleep(1.5)
    assert db.stat().st_size > before, "the background checkpoint copied the WAL into the database"


async def test_fire_and_forget_appends_wait_for_room_when_the_writer_is_far_behind(tmp_path: Path) -> None:
    # The writer gathers for 0.5 s before its first commit: the queue fills meanwhile.
    journal = SQLiteJournal(tmp_path / "j.db", commit_interval=0.5, max_batch=10_000)
    await journal.open()
    try:
        journal.max_queued_rows = 10
        futures = [journal.append_nowait([make_record()]) for i in range(30)]
        await asyncio.sleep(0.01)  # the append tasks run and queue their records
        waiter = asyncio.create_task(journal.wait_for_room())
        await asyncio.sleep(0.05)
        assert not waiter.done()  # 30 queued > 10: held back
        await asyncio.wait_for(waiter, 5)  # released once the commit drained the queue
        assert all(f.done() and not f.exception() for f in futures)
        await journal.wait_for_room()  # room now: returns at once
    finally:
        await journal.close()
