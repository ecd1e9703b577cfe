"""Sink runners over a real journal: routing, retries, dead letters, books, independence."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from isthmus.journal.sqlite import SQLiteJournal
from isthmus.message import Kind, Record, Status
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
