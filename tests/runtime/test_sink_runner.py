"""Sink runners over a real journal: routing, retries, dead letters, books, independence."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from isthmus.interfaces import Cursor, WriteResult
from isthmus.journal import sqlite as journal_module
from isthmus.journal.sqlite import RetentionPolicy, SQLiteJournal
from isthmus.message import Kind, Record, Status, utcnow
from isthmus.runtime.metrics import Metrics
from isthmus.runtime.sinks import Health, RunnerSettings, SinkRunner
from isthmus.testing import RecordingSink, make_record

FAST = RunnerSettings(max_attempts=3, backoff_initial=0.001, backoff_max=0.002, idle_wait=0.05)


def record(l_uid: int | None = 1, *, status: Status = Status.OK, kind: Kind = "telemetry") -> Record:
    return make_record(l_uid=l_uid, status=status, kind=kind)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[SQLiteJournal]:
    j = SQLiteJournal(tmp_path / "journal.db")
    await j.open()
    yield j
    await j.close()


@contextlib.asynccontextmanager
async def running(*runners: SinkRunner) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(r.run()) for r in runners]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def runner(name: str, sink: RecordingSink, journal: SQLiteJournal, settings: RunnerSettings = FAST) -> SinkRunner:
    return SinkRunner(name, "test", sink, journal, settings, Metrics(), rng=random.Random(1))


async def test_delivers_mapped_records_and_skips_the_rest(journal: SQLiteJournal) -> None:
    await journal.append(
        [
            record(),
            record(l_uid=None),
            record(status=Status.DECODE_ERROR),
            record(status=Status.QUARANTINED),
            record(kind="attributes"),
            record(),
        ]
    )
    sink = RecordingSink()
    r = runner("s", sink, journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 6)
    assert [x.seq for x in sink.written] == [1, 6]
    assert (r.cursor.delivered, r.cursor.skipped, r.cursor.dead_lettered) == (2, 4, 0)
    assert sink.closed


async def test_transient_failures_are_retried_then_delivered(journal: SQLiteJournal) -> None:
    await journal.append([record() for _ in range(3)])
    sink = RecordingSink(fail_next=2)
    r = runner("s", sink, journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 3)
    assert len(sink.written) == 3 and sink.attempts == 3
    assert r.state is Health.HEALTHY
    assert await journal.dead_letters() == []


async def test_exhausted_retries_dead_letter_with_reason_and_move_on(journal: SQLiteJournal) -> None:
    await journal.append([record() for _ in range(4)])
    r = runner("broken", RecordingSink(fail_always=True), journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 4)
        assert r.state is Health.FAILING
    dead = await journal.dead_letters("broken")
    assert len(dead) == 4
    assert {d.attempts for d in dead} == {3}
    assert all("scripted transient failure" in d.reason and d.stage == "deliver" for d in dead)
    assert dead[0].payload.startswith(b'{"t"')
    stored = await journal.load_cursor("broken")
    assert (stored.delivered, stored.dead_lettered, stored.skipped) == (0, 4, 0)


async def test_permanent_failure_dead_letters_without_retry(journal: SQLiteJournal) -> None:
    await journal.append([record()])
    sink = RecordingSink(permanent=True)
    r = runner("p", sink, journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 1)
    assert sink.attempts == 1
    (dl,) = await journal.dead_letters("p")
    assert dl.reason.startswith("permanent:")


async def test_partial_rejection_dead_letters_only_those(journal: SQLiteJournal) -> None:
    records = [record() for _ in range(3)]
    await journal.append(records)
    bad = records[1].frame.correlation_id
    sink = RecordingSink(reject=frozenset({bad}))
    r = runner("s", sink, journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 3)
    assert len(sink.written) == 2
    (dl,) = await journal.dead_letters("s")
    assert dl.correlation_id == bad and dl.reason.startswith("rejected:")
    assert (r.cursor.delivered, r.cursor.dead_lettered) == (2, 1)


async def test_a_dead_sink_does_not_hold_back_another(journal: SQLiteJournal) -> None:
    good, bad = RecordingSink(), RecordingSink(fail_always=True)
    slow = RunnerSettings(max_attempts=1000, backoff_initial=0.5, backoff_max=0.5, idle_wait=0.05)
    r_good, r_bad = runner("good", good, journal), runner("bad", bad, journal, slow)
    async with running(r_good, r_bad):
        await journal.append([record() for _ in range(20)])
        await until(lambda: r_good.cursor.seq == 20)
        assert r_bad.cursor.seq == 0 and r_bad.state is Health.RETRYING
        assert r_bad.lag == 20
    assert len(good.written) == 20


async def test_cursor_resumes_after_restart(journal: SQLiteJournal) -> None:
    await journal.append([record() for _ in range(2)])
    first = RecordingSink()
    r = runner("s", first, journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 2)
    await journal.append([record()])
    second = RecordingSink()
    r2 = runner("s", second, journal)
    async with running(r2):
        await until(lambda: r2.cursor.seq == 3)
    assert [x.seq for x in second.written] == [3]
    assert r2.cursor.delivered == 3


async def test_books_balance(journal: SQLiteJournal) -> None:
    """received = delivered + dead-lettered + skipped + pending, per sink."""
    records = [record() for _ in range(10)] + [record(l_uid=None) for _ in range(5)]
    await journal.append(records)
    sink = RecordingSink(reject=frozenset({records[0].frame.correlation_id}))
    r = runner("s", sink, journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 15)
        await journal.append([record() for _ in range(3)])
        await until(lambda: r.cursor.seq == 18)
    c = await journal.load_cursor("s")
    pending = journal.last_seq - c.seq
    assert journal.last_seq == c.delivered + c.dead_lettered + c.skipped + pending
    assert (c.delivered, c.dead_lettered, c.skipped) == (12, 1, 5)


async def test_redrive_delivers_dead_letters_and_rebalances_the_books(journal: SQLiteJournal) -> None:
    await journal.append([record() for _ in range(3)])
    sink = RecordingSink(fail_always=True)
    r = runner("s", sink, journal)
    async with running(r):
        await until(lambda: r.cursor.seq == 3)
        letters = await journal.dead_letters("s")
        assert len(letters) == 3

        failed_again = await r.redrive(letters)
        assert (failed_again.redriven, failed_again.failed) == (0, 3)
        assert "scripted transient failure" in (failed_again.reason or "")

        sink.fail_always = False
        result = await r.redrive(letters)
        assert (result.redriven, result.failed) == (3, 0)
        assert [x.frame.correlation_id for x in sink.written] == [d.correlation_id for d in letters]
        assert sink.written[0].message is not None and sink.written[0].message.l_uid == 1
        assert all(d.redriven for d in await journal.dead_letters("s"))
        assert await journal.dead_letters("s", pending_only=True) == []
        again = await r.redrive(await journal.dead_letters("s"))
        assert again.redriven == 0, "a dead letter is redriven once"
    stored = await journal.load_cursor("s")
    assert (stored.delivered, stored.dead_lettered, stored.skipped) == (3, 0, 0)
    assert r.state is Health.HEALTHY


async def test_skip_only_batches_commit_lazily_but_surely(journal: SQLiteJournal) -> None:
    await journal.append([record() for _ in range(5)])
    attributes_only = RunnerSettings(kinds=frozenset({"attributes"}), idle_wait=5.0)
    r = runner("attrs", RecordingSink(), journal, attributes_only)
    async with running(r):
        await until(lambda: r.cursor.seq == 5)
        assert r.cursor.skipped == 5
        await journal.append([record()])  # within a second of the first commit: kept in memory
        await until(lambda: r.cursor.seq == 6)
        assert (await journal.load_cursor("attrs")).seq == 5
    stored = await journal.load_cursor("attrs")
    assert (stored.seq, stored.skipped) == (6, 6), "stopping commits what was only held in memory"


# --------------------------------------------------------------------------- routing in the journal


class BatchRecordingSink(RecordingSink):
    """A RecordingSink that also keeps the sequence numbers of each batch it was given."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.batches: list[list[int]] = []

    async def write(self, batch: Sequence[Record]) -> WriteResult | None:
        self.batches.append([r.seq for r in batch])
        return await super().write(batch)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sequence numbers of every journal row turned into a Record, by any reader (a spy)."""
    seen: list[int] = []
    original = journal_module._row_record

    def spy(row: tuple[Any, ...]) -> Record:
        seen.append(row[0])
        return original(row)

    monkeypatch.setattr(journal_module, "_row_record", spy)
    return seen


ATTRIBUTES = RunnerSettings(
    kinds=frozenset({"attributes"}), requires_mapping=False, idle_wait=0.05, batch_period=0.02, max_attempts=3
)


def balanced(journal: SQLiteJournal, c: Cursor) -> bool:
    return journal.last_seq == c.delivered + c.dead_lettered + c.skipped + (journal.last_seq - c.seq)


async def test_an_attributes_runner_never_fetches_or_decodes_telemetry(
    journal: SQLiteJournal, decoded: list[int]
) -> None:
    kinds: list[Kind] = ["attributes" if i % 10 == 3 else "telemetry" for i in range(40)]
    await journal.append([record(kind=k) for k in kinds])
    wanted = [i + 1 for i, k in enumerate(kinds) if k == "attributes"]
    sink = RecordingSink()
    r = runner("_attributes", sink, journal, ATTRIBUTES)
    async with running(r):
        await until(lambda: r.cursor.seq == 40)
    assert decoded == wanted, "telemetry records were read and decoded by a runner that skips them"
    assert [x.seq for x in sink.written] == wanted
    assert {x.frame.kind for x in sink.written} == {"attributes"}
    assert (r.cursor.delivered, r.cursor.dead_lettered, r.cursor.skipped) == (4, 0, 36)
    assert balanced(journal, await journal.load_cursor("_attributes"))


def mixed() -> list[Record]:
    """Telemetry (mapped, unmapped, undecodable, quarantined) and attributes, interleaved."""
    return [
        record(),
        record(kind="attributes", l_uid=None),
        record(l_uid=None),
        record(status=Status.DECODE_ERROR),
        record(),
        record(kind="attributes"),
        record(status=Status.QUARANTINED),
        record(kind="attributes", status=Status.DECODE_ERROR),
        record(),
        record(),
    ]  # telemetry sink takes 4 (one is rejected below), attributes sink takes 2


async def test_books_balance_with_mixed_kinds_across_restarts(journal: SQLiteJournal, decoded: list[int]) -> None:
    first = mixed()
    await journal.append(first)
    ts_settings = RunnerSettings(max_attempts=2, backoff_initial=0.001, backoff_max=0.002, idle_wait=0.05)
    ts_sink = RecordingSink(reject=frozenset({first[4].frame.correlation_id}))
    ts, attrs = runner("ts", ts_sink, journal, ts_settings), runner("_attributes", RecordingSink(), journal, ATTRIBUTES)
    async with running(ts, attrs):
        await until(lambda: ts.cursor.seq == attrs.cursor.seq == 10)
    assert sorted(decoded) == [1, 2, 5, 6, 9, 10], "only the records some sink takes were decoded"
    ts_c, at_c = await journal.load_cursor("ts"), await journal.load_cursor("_attributes")
    assert (ts_c.seq, ts_c.delivered, ts_c.dead_lettered, ts_c.skipped) == (10, 3, 1, 6)
    assert (at_c.seq, at_c.delivered, at_c.dead_lettered, at_c.skipped) == (10, 2, 0, 8)

    # The process restarts: new runners continue from the committed cursors, reading only what follows.
    decoded.clear()
    await journal.append(mixed())
    ts_sink2, at_sink2 = RecordingSink(), RecordingSink()
    ts2, attrs2 = runner("ts", ts_sink2, journal, ts_settings), runner("_attributes", at_sink2, journal, ATTRIBUTES)
    async with running(ts2, attrs2):
        await until(lambda: ts2.cursor.seq == attrs2.cursor.seq == 20)
    assert sorted(decoded) == [11, 12, 15, 16, 19, 20]
    assert [x.seq for x in ts_sink2.written] == [11, 15, 19, 20]
    assert [x.seq for x in at_sink2.written] == [12, 16]
    ts_c, at_c = await journal.load_cursor("ts"), await journal.load_cursor("_attributes")
    assert (ts_c.seq, ts_c.delivered, ts_c.dead_lettered, ts_c.skipped) == (20, 7, 1, 12)
    assert (at_c.seq, at_c.delivered, at_c.dead_lettered, at_c.skipped) == (20, 4, 0, 16)
    assert balanced(journal, ts_c) and balanced(journal, at_c)


async def test_a_crash_after_skip_only_progress_re_skips_from_the_committed_cursor(journal: SQLiteJournal) -> None:
    await journal.append([record(kind="attributes"), record()])
    settings = RunnerSettings(kinds=frozenset({"attributes"}), requires_mapping=False, idle_wait=5.0)
    r = runner("_attributes", RecordingSink(), journal, settings)
    async with running(r):
        await until(lambda: r.cursor.seq == 2)
        committed = await journal.load_cursor("_attributes")
        await journal.append([record() for _ in range(5)])  # skip-only, within a second: held in memory
        await until(lambda: r.cursor.seq == 7)
        assert (await journal.load_cursor("_attributes")).seq == committed.seq == 2
    # A crash loses what was held in memory: the journal still has the last committed cursor.
    await journal.commit_cursor(committed)
    await journal.append([record(kind="attributes"), record()])
    sink = RecordingSink()
    r2 = runner("_attributes", sink, journal, settings)
    async with running(r2):
        await until(lambda: r2.cursor.seq == 9)
    assert [x.seq for x in sink.written] == [8]
    c = await journal.load_cursor("_attributes")
    assert (c.seq, c.delivered, c.dead_lettered, c.skipped) == (9, 2, 0, 7)
    assert balanced(journal, c)


async def test_retention_never_passes_a_skip_only_runners_committed_cursor(journal: SQLiteJournal) -> None:
    old = utcnow() - timedelta(days=10)
    journal.retention = RetentionPolicy(max_age=timedelta(days=1))
    journal.set_active_consumers(["_attributes"])
    await journal.append([make_record(kind="attributes", received_at=old)])
    settings = RunnerSettings(kinds=frozenset({"attributes"}), requires_mapping=False, idle_wait=5.0)
    r = runner("_attributes", RecordingSink(), journal, settings)
    async with running(r):
        await until(lambda: r.cursor.seq == 1)
        await journal.append([make_record(received_at=old) for _ in range(4)] + [make_record()])
        await until(lambda: r.cursor.seq == 6)
        # The runner has passed seq 6 in memory only; retention goes by the committed cursor (1).
        report = await journal.apply_retention()
        assert (report.deleted, report.floor) == (1, 1)
        assert [x.seq for x in await journal.read(0, 10)] == [2, 3, 4, 5, 6]
    c = await journal.load_cursor("_attributes")
    assert (c.seq, c.delivered, c.skipped) == (6, 1, 5)
    report = await journal.apply_retention()
    assert (report.deleted, report.floor) == (4, 6), "now committed: the old records go (never the newest)"


async def test_a_sink_added_after_retention_counts_only_records_it_found(journal: SQLiteJournal) -> None:
    old = utcnow() - timedelta(days=10)
    journal.retention = RetentionPolicy(max_age=timedelta(days=1))
    journal.set_active_consumers(["early"])
    await journal.append([make_record(received_at=old) for _ in range(5)])
    await journal.append([record(), record(kind="attributes"), record(l_uid=None), record()])
    await journal.commit_cursor(Cursor("early", seq=9, delivered=9))
    assert (await journal.apply_retention()).deleted == 5
    sink = RecordingSink()
    late = runner("late", sink, journal)
    async with running(late):
        await until(lambda: late.cursor.seq == 9)
    assert [x.seq for x in sink.written] == [6, 9]
    c = await journal.load_cursor("late")
    assert (c.delivered, c.dead_lettered, c.skipped) == (2, 0, 2), "records deleted before it started are not its"


async def test_batch_period_and_bytes_shape_batches_and_the_books_stay_whole(journal: SQLiteJournal) -> None:
    settings = RunnerSettings(batch_period=0.2, batch_max_bytes=100, idle_wait=0.05)
    sink = BatchRecordingSink()
    r = runner("s", sink, journal, settings)
    async with running(r):
        await journal.append([record()])
        for _ in range(3):  # separate commits within the batch period
            await journal.append([record(kind="attributes"), record()])
        await until(lambda: r.cursor.seq == 7)
    size = len(make_record().frame.payload)
    per_batch = max(1, 100 // size)
    delivered = [1, 3, 5, 7]
    assert [s for b in sink.batches for s in b] == delivered
    assert all(len(b) <= per_batch for b in sink.batches)
    assert len(sink.batches) == -(-len(delivered) // per_batch), "appends within the period share a batch"
    c = await journal.load_cursor("s")
    assert (c.seq, c.delivered, c.skipped) == (7, 4, 3)
