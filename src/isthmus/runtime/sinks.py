"""Sink runners: one per configured sink, each reading the journal through its own cursor.

The runner owns everything a sink should not have to: routing (which records it gets),
batching (count / bytes / period), retry with exponential backoff and full jitter, bounded
attempts, dead letters (original payload, stage, sink, reason, attempts) and the health state.
A slow or dead sink only holds back its own cursor; the journal keeps the records for it.

Books: for every record a runner passes, exactly one of delivered / dead-lettered / skipped is
incremented, in the same commit that moves the cursor, so for any sink
``records up to cursor = delivered + dead_lettered + skipped`` and the rest is pending.

Routing happens in the journal: :meth:`~isthmus.journal.sqlite.SQLiteJournal.read_selected` returns
only the records this sink takes, and how many records of the range it read it passed over; those
are counted as skipped without ever being fetched or decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from isthmus.errors import JournalError, PermanentSinkError, RetryableSinkError, SinkError
from isthmus.interfaces import Cursor, DeadLetter, Sink, WriteResult
from isthmus.journal.sqlite import Selection, SQLiteJournal
from isthmus.message import RawFrame, Record, Status, decode_message, encode_message, utcnow
from isthmus.runtime.metrics import Metrics

log = logging.getLogger(__name__)


class Health(enum.StrEnum):
    """A sink's state: ``failing`` after a batch was dead-lettered, until the next success."""

    STARTING = "starting"
    HEALTHY = "healthy"
    RETRYING = "retrying"
    FAILING = "failing"


# At most this long between cursor commits of batches a sink only skipped.
SKIP_COMMIT_INTERVAL = 1.0

_STATE_VALUE = {Health.STARTING: 0, Health.HEALTHY: 0, Health.RETRYING: 1, Health.FAILING: 2}


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """Routing, batching and retry settings of one runner."""

    kinds: frozenset[str] = frozenset({"telemetry"})
    requires_mapping: bool = True
    batch_max_records: int = 1000
    batch_max_bytes: int = 1_048_576
    batch_period: float = 0.0
    max_attempts: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    idle_wait: float = 1.0


class SinkRunner:
    """Drives one :class:`~isthmus.interfaces.Sink` from the journal."""

    def __init__(
        self,
        name: str,
        type_name: str,
        sink: Sink,
        journal: SQLiteJournal,
        settings: RunnerSettings,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.type_name = type_name
        self.sink = sink
        self.journal = journal
        self.settings = settings
        self.metrics = metrics
        self.state = Health.STARTING
        self.last_error: str | None = None
        self.cursor = Cursor(name)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._delivered = metrics.deliveries.labels(name)
        self._skipped = metrics.skipped.labels(name)
        self._retries = metrics.retries.labels(name)
        self._dead = metrics.dead_letters.labels(name)
        self._lag = metrics.journal_lag.labels(name)
        self._state_gauge = metrics.sink_state.labels(name)
        # Serialises delivery of new records with redrives, so the books never race.
        self._books = asyncio.Lock()
        self._uncommitted = False
        self._committed_at = 0.0

    def _set_state(self, state: Health, error: str | None = None) -> None:
        if state is not self.state:
            log.info("sink %s is %s%s", self.name, state.value, f": {error}" if error else "")
        self.state = state
        if error is not None or state is Health.HEALTHY:
            self.last_error = error
        self._state_gauge.set(_STATE_VALUE[state])

    @property
    def lag(self) -> int:
        """Records journaled but not yet handled by this sink."""
        return max(0, self.journal.last_seq - self.cursor.seq)

    def selects(self, record: Record) -> bool:
        """Whether this sink's route takes ``record`` (otherwise it is skipped and counted).

        The journal applies the same route when reading (``read_selected``); this check only
        guards the books against a journal that returns more than it was asked for.
        """
        if record.message is None or record.status is not Status.OK:
            return False
        if record.frame.kind not in self.settings.kinds:
            return False
        return not (self.settings.requires_mapping and record.message.l_uid is None)

    async def run(self) -> None:
        """Open the sink and deliver until cancelled. Never raises for a sink's failure."""
        await self._open()
        self.cursor = await self.journal.load_cursor(self.name)
        self._set_state(Health.HEALTHY)
        try:
            while True:
                batch = await self._next_batch()
                self._lag.set(self.lag)
                if batch.last_seq > self.cursor.seq:
                    await self._handle(batch)
                    self._lag.set(self.lag)
                elif self._uncommitted:
                    async with self._books:
                        await self._commit(self.cursor)
        finally:
            if self._uncommitted:
                with contextlib.suppress(JournalError):
                    await self.journal.commit_cursor(self.cursor)
            await self.sink.close()

    async def _open(self) -> None:
        attempt = 0
        while True:
            try:
                await self.sink.open()
                return
            except SinkError as exc:
                attempt += 1
                self._set_state(Health.RETRYING, f"open failed: {exc}")
                await asyncio.sleep(self._backoff(attempt))

    async def _next_batch(self) -> Selection:
        s = self.settings
        after = self.cursor.seq
        wait = s.idle_wait
        if s.batch_period > 0:
            # Once something new is there, let the batch fill, then read it with one query
            # (reading on every group commit instead cost a thread hop and a query per commit at
            # moderate load). No wait when a full batch may already be there.
            if not await self.journal.wait_for_append(after, s.idle_wait):
                return Selection([], after, 0)
            if self.journal.last_seq - after < s.batch_max_records:
                await asyncio.sleep(s.batch_period)
            wait = 0.0
        return await self.journal.read_selected(
            after,
            s.batch_max_records,
            kinds=s.kinds,
            mapped_only=s.requires_mapping,
            max_bytes=s.batch_max_bytes,
            wait=wait,
        )

    async def _handle(self, batch: Selection) -> None:
        async with self._books:
            await self._handle_locked(batch)

    async def _handle_locked(self, batch: Selection) -> None:
        selected = [r for r in batch.records if self.selects(r)]
        skipped = batch.skipped + len(batch.records) - len(selected)
        dead: list[DeadLetter] = []
        if selected:
            dead = await self._deliver(selected)
        cursor = self.cursor
        next_cursor = Cursor(
            cursor.consumer,
            seq=batch.last_seq,
            delivered=cursor.delivered + len(selected) - len(dead),
            dead_lettered=cursor.dead_lettered + len(dead),
            skipped=cursor.skipped + skipped,
        )
        if selected or time.monotonic() - self._committed_at >= SKIP_COMMIT_INTERVAL:
            await self._commit(next_cursor, dead)
        else:
            # Only skipped records: move on in memory and commit later. A crash before that
            # re-reads and re-skips them, and the books stay whole (they are committed together).
            self.cursor = next_cursor
            self._uncommitted = True
        self._delivered.inc(len(selected) - len(dead))
        self._dead.inc(len(dead))
        self._skipped.inc(skipped)

    async def _commit(self, cursor: Cursor, dead: Sequence[DeadLetter] = ()) -> None:
        """Commit ``cursor`` (and the dead letters that moved it), retrying until the journal takes it."""
        while True:
            try:
                await self.journal.commit_cursor(cursor, dead)
                break
            except JournalError as exc:
                log.error("sink %s: cannot commit its cursor: %s", self.name, exc)
                await asyncio.sleep(1.0)
        self.cursor = cursor
        self._uncommitted = False
        self._committed_at = time.monotonic()

    async def redrive(self, letters: Sequence[DeadLetter]) -> RedriveResult:
        """Deliver dead letters of this sink again, with the runner's retry policy.

        Letters already redriven, of another sink or without a message are ignored. Those delivered
        are marked redriven and move from dead-lettered to delivered in the books (one commit);
        those that fail again stay as they are, and the result says why.
        """
        pending = [d for d in letters if d.sink == self.name and not d.redriven and d.message is not None]
        if not pending:
            return RedriveResult(0, 0, None)
        records = [_record_from_dead_letter(d) for d in pending]
        async with self._books:
            dead = await self._deliver(records)
            failed = {(d.seq, d.correlation_id) for d in dead}
            done = [d for d in pending if (d.seq, d.correlation_id) not in failed]
            cursor = self.cursor
            next_cursor = Cursor(
                cursor.consumer,
                seq=cursor.seq,
                delivered=cursor.delivered + len(done),
                dead_lettered=cursor.dead_lettered - len(done),
                skipped=cursor.skipped,
            )
            await self.journal.commit_cursor(next_cursor, (), [d.id for d in done])
            self.cursor = next_cursor
        self._delivered.inc(len(done))
        reason = dead[0].reason if dead else None
        return RedriveResult(len(done), len(pending) - len(done), reason)

    async def _deliver(self, batch: list[Record]) -> list[DeadLetter]:
        """Write ``batch`` with retries; return the dead letters (empty when all went through)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self.sink.write(batch)
            except PermanentSinkError as exc:
                return self._give_up(batch, f"permanent: {exc}", attempt)
            except RetryableSinkError as exc:
                reason = str(exc)
            except Exception as exc:
                log.exception("sink %s raised an unexpected error", self.name)
                reason = f"{type(exc).__name__}: {exc}"
            else:
                self._set_state(Health.HEALTHY)
                return self._rejected(batch, result, attempt)
            if attempt >= self.settings.max_attempts:
                return self._give_up(batch, reason, attempt)
            self._retries.inc()
            self._set_state(Health.RETRYING, reason)
            await asyncio.sleep(self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        ceiling = min(s.backoff_max, s.backoff_initial * (2 ** (attempt - 1)))
        return self._rng.uniform(0, ceiling)

    def _give_up(self, batch: Sequence[Record], reason: str, attempts: int) -> list[DeadLetter]:
        self._set_state(Health.FAILING, reason)
        log.warning("sink %s: dead-lettering %d records after %d attempts: %s", self.name, len(batch), attempts, reason)
        return [self._dead_letter(r, reason, attempts) for r in batch]

    def _rejected(self, batch: Sequence[Record], result: WriteResult | None, attempts: int) -> list[DeadLetter]:
        if result is None or not result.rejected:
            return []
        return [
            self._dead_letter(batch[i], f"rejected: {reason}", attempts)
            for i, reason in sorted(result.rejected.items())
            if 0 <= i < len(batch)
        ]

    def _dead_letter(self, record: Record, reason: str, attempts: int) -> DeadLetter:
        return DeadLetter(
            id=0,
            sink=self.name,
            seq=record.seq,
            correlation_id=record.frame.correlation_id,
            stage="deliver",
            reason=reason,
            attempts=attempts,
            created_at=utcnow(),
            payload=record.frame.payload,
            message=encode_message(record.message) if record.message is not None else None,
        )


@dataclass(frozen=True, slots=True)
class RedriveResult:
    """What a redrive did: how many letters were delivered, how many failed again and why."""

    redriven: int
    failed: int
    reason: str | None


def _record_from_dead_letter(d: DeadLetter) -> Record:
    message = decode_message(d.message or b"")
    frame = RawFrame(
        correlation_id=d.correlation_id,
        received_at=message.received_at,
        source=message.source,
        payload=d.payload,
        kind=message.kind,
    )
    return Record(frame=frame, status=Status.OK, p_uid=message.p_uid, message=message, seq=d.seq)
