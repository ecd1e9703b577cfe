"""read_selected: the journal routes records for sinks inside SQLite and counts what it passes over."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from isthmus.interfaces import Cursor
from isthmus.journal import sqlite as journal_module
from isthmus.journal.sqlite import RetentionPolicy, Selection, SQLiteJournal
from isthmus.message import Kind, RawFrame, Record, Status, utcnow
from isthmus.testing import make_record

TELEMETRY = frozenset({"telemetry"})
ATTRIBUTES = frozenset({"attributes"})
BOTH = frozenset({"telemetry", "attributes"})


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[SQLiteJournal]:
    j = SQLiteJournal(tmp_path / "journal.db")
    await j.open()
    yield j
    await j.close()


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sequence numbers of every row the journal turns into a Record (a spy, not a fake)."""
    seen: list[int] = []
    original: Callable[[tuple[Any, ...]], Record] = journal_module._row_record

    def spy(row: tuple[Any, ...]) -> Record:
        seen.append(row[0])
        return original(row)

    monkeypatch.setattr(journal_module, "_row_record", spy)
    return seen


def rec(kind: Kind = "telemetry", *, l_uid: int | None = 1, status: Status = Status.OK, size: int = 0) -> Record:
    r = make_record(l_uid=l_uid, kind=kind, status=status)
    if not size:
        return r
    f = r.frame
    return Record(
        frame=RawFrame(f.correlation_id, f.received_at, f.source, b"x" * size, kind=kind),
        status=r.status,
        p_uid=r.p_uid,
        message=r.message,
        error=r.error,
    )


# Seqs:      1            2              3             4                           5
MIXED = [rec(), rec("attributes"), rec(l_uid=None), rec(status=Status.DECODE_ERROR), rec("attributes", l_uid=None)]
# 6                                7                                   8
MIXED += [rec(status=Status.QUARANTINED), rec("attributes", status=Status.DECODE_ERROR), rec()]


async def test_selects_by_kind_status_and_mapping_and_counts_the_rest(journal: SQLiteJournal) -> None:
    await journal.append(MIXED)
    cases = [
        (TELEMETRY, True, [1, 8]),
        (TELEMETRY, False, [1, 3, 8]),
        (ATTRIBUTES, False, [2, 5]),
        (ATTRIBUTES, True, [2]),
        (BOTH, True, [1, 2, 8]),
        (BOTH, False, [1, 2, 3, 5, 8]),
        (frozenset(), False, []),
    ]
    for kinds, mapped_only, expected in cases:
        sel = await journal.read_selected(0, 100, kinds=kinds, mapped_only=mapped_only)
        assert [r.seq for r in sel.records] == expected, (kinds, mapped_only)
        assert (sel.last_seq, sel.skipped) == (8, 8 - len(expected)), (kinds, mapped_only)


async def test_records_not_selected_are_never_decoded(journal: SQLiteJournal, decoded: list[int]) -> None:
    await journal.append([rec() for _ in range(50)] + [rec("attributes")] + [rec() for _ in range(49)])
    sel = await journal.read_selected(0, 1000, kinds=ATTRIBUTES, mapped_only=False)
    assert [r.seq for r in sel.records] == [51]
    assert sel.records[0].frame.kind == "attributes" and sel.records[0].message is not None
    assert decoded == [51], "only the selected record was fetched and decoded"
    assert (sel.last_seq, sel.skipped) == (100, 99)


async def test_limit_ends_the_range_at_the_last_selected_record(journal: SQLiteJournal) -> None:
    await journal.append(MIXED)
    sel = await journal.read_selected(0, 1, kinds=ATTRIBUTES, mapped_only=False)
    assert ([r.seq for r in sel.records], sel.last_seq, sel.skipped) == ([2], 2, 1)
    sel = await journal.read_selected(2, 1, kinds=ATTRIBUTES, mapped_only=False)
    assert ([r.seq for r in sel.records], sel.last_seq, sel.skipped) == ([5], 5, 2)
    sel = await journal.read_selected(5, 1, kinds=ATTRIBUTES, mapped_only=False)
    assert (sel.records, sel.last_seq, sel.skipped) == ([], 8, 3), "nothing more selected: the whole rest is skipped"
    assert await journal.read_selected(8, 1, kinds=ATTRIBUTES, mapped_only=False) == Selection([], 8, 0)


async def test_max_bytes_cuts_the_batch_but_takes_at_least_one(journal: SQLiteJournal, decoded: list[int]) -> None:
    await journal.append([rec(size=400), rec("attributes", size=10), rec(size=400), rec(size=400), rec(size=5000)])
    sel = await journal.read_selected(0, 100, kinds=TELEMETRY, mapped_only=True, max_bytes=1000)
    assert ([r.seq for r in sel.records], sel.last_seq, sel.skipped) == ([1, 3], 3, 1)
    assert decoded == [1, 3], "the record past the budget is not decoded"
    sel = await journal.read_selected(3, 100, kinds=TELEMETRY, mapped_only=True, max_bytes=1000)
    assert ([r.seq for r in sel.records], sel.last_seq, sel.skipped) == ([4], 4, 0)
    sel = await journal.read_selected(4, 100, kinds=TELEMETRY, mapped_only=True, max_bytes=1000)
    assert ([r.seq for r in sel.records], sel.last_seq) == ([5], 5), "one record larger than the budget alone"


async def test_a_retention_gap_is_not_counted_as_skipped(journal: SQLiteJournal) -> None:
    old = utcnow() - timedelta(days=10)
    await journal.append([make_record(received_at=old) for _ in range(4)] + [rec("attributes"), rec()])
    journal.retention = RetentionPolicy(max_age=timedelta(days=1))
    journal.set_active_consumers(["a"])
    await journal.commit_cursor(Cursor("a", seq=4))
    assert (await journal.apply_retention()).deleted == 4
    # A consumer that starts now from 0 passes over seqs 5 and 6 only: 1..4 no longer exist.
    sel = await journal.read_selected(0, 100, kinds=ATTRIBUTES, mapped_only=False)
    assert ([r.seq for r in sel.records], sel.last_seq, sel.skipped) == ([5], 6, 1)


async def test_one_read_examines_a_bounded_range(journal: SQLiteJournal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "_SCAN_MAX", 10)
    await journal.append([rec() for _ in range(25)] + [rec("attributes")])
    steps = []
    after = 0
    while after < journal.last_seq:
        sel = await journal.read_selected(after, 100, kinds=ATTRIBUTES, mapped_only=False)
        steps.append((len(sel.records), sel.last_seq, sel.skipped))
        after = sel.last_seq
    assert steps == [(0, 10, 10), (0, 20, 10), (1, 26, 5)]


async def test_read_selected_waits_for_an_append(journal: SQLiteJournal) -> None:
    assert await journal.read_selected(0, 10, kinds=TELEMETRY, mapped_only=True, wait=0.05) == Selection([], 0, 0)
    reader = asyncio.create_task(journal.read_selected(0, 10, kinds=TELEMETRY, mapped_only=True, wait=5.0))
    await asyncio.sleep(0.05)
    assert not reader.done()
    await journal.append([rec("attributes"), rec()])
    sel = await asyncio.wait_for(reader, 2.0)
    assert ([r.seq for r in sel.records], sel.last_seq, sel.skipped) == ([2], 2, 1)
    assert await journal.wait_for_append(2, 0.01) is False
    assert await journal.wait_for_append(1, 0.0) is True


async def test_limit_must_be_positive(journal: SQLiteJournal) -> None:
    with pytest.raises(ValueError, match="limit"):
        await journal.read_selected(0, 0, kinds=TELEMETRY, mapped_only=True)


async def test_a_version_1_journal_is_upgraded_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = SQLiteJournal(path)
    await j.open()
    await j.append([rec(), rec("attributes")])
    await j.commit_cursor(Cursor("s", seq=1, delivered=1))
    await j.close()
    # What the previous Isthmus left behind: schema version 1, no records_kind index.
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX records_kind")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    j2 = SQLiteJournal(path)
    await j2.open()
    try:
        sel = await j2.read_selected(1, 10, kinds=ATTRIBUTES, mapped_only=False)
        assert ([r.seq for r in sel.records], sel.last_seq, sel.skipped) == ([2], 2, 0)
        assert (await j2.load_cursor("s")).delivered == 1
    finally:
        await j2.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION == 2
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "records_kind" in indexes
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT seq FROM records WHERE seq > 0 AND seq <= 9 AND kind IN ('attributes')"
            " ORDER BY seq"
        ).fetchall()
        assert "records_kind" in str(plan)
    finally:
        conn.close()
