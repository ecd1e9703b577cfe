"""The embedded journal: one SQLite file in WAL mode, written by one thread with group commit.

Writes (appends, cursor commits, retention) go through a single writer thread that owns the only
write connection: it takes everything queued, writes it in one transaction and commits once, then
resolves the waiting futures on the event loop in one call. Under load a batch grows by itself
(what arrives during a commit forms the next batch); ``commit_interval`` can add a short wait to
fill batches further, ``max_batch`` bounds them.

Reads run in worker threads on their own read-only connections (WAL readers never block the
writer). Nothing here blocks the event loop.

Sinks read through :meth:`SQLiteJournal.read_selected`, which filters by kind, status and mapping
inside SQLite (index ``records_kind``): records a sink does not take are never fetched nor decoded,
only counted from the sequence numbers of the range read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, get_args

import msgspec

from isthmus.errors import IsthmusError, JournalClosed, JournalError, NotFound
from isthmus.interfaces import Cursor, DeadLetter, RecordQuery
from isthmus.message import (
    Kind,
    RawFrame,
    Record,
    Status,
    decode_message,
    encode_message,
    from_micros,
    to_micros,
    utcnow,
)

log = logging.getLogger(__name__)

# 2: index records_kind (kind, seq) for read_selected. A version 1 file is upgraded in place
# when opened (the index is built once); an older Isthmus refuses a version 2 file.
SCHEMA_VERSION = 2
# Seconds between WAL checkpoints, and the size the WAL file is truncated to after one.
CHECKPOINT_INTERVAL = 1.0
_WAL_SIZE_LIMIT = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq            INTEGER PRIMARY KEY,
    correlation_id TEXT    NOT NULL,
    received_at    INTEGER NOT NULL,
    source         TEXT    NOT NULL,
    kind           TEXT    NOT NULL,
    content_type   TEXT    NOT NULL,
    meta           BLOB,
    p_uid          INTEGER,
    l_uid          INTEGER,
    status         TEXT    NOT NULL,
    error          TEXT,
    payload        BLOB    NOT NULL,
    message        BLOB,
    replay_of      INTEGER
);
CREATE INDEX IF NOT EXISTS records_p_uid ON records (p_uid, seq);
CREATE INDEX IF NOT EXISTS records_l_uid ON records (l_uid, seq);
CREATE INDEX IF NOT EXISTS records_correlation ON records (correlation_id);
CREATE INDEX IF NOT EXISTS records_received ON records (received_at);
CREATE INDEX IF NOT EXISTS records_kind ON records (kind, seq);
CREATE TABLE IF NOT EXISTS cursors (
    consumer      TEXT PRIMARY KEY,
    seq           INTEGER NOT NULL,
    delivered     INTEGER NOT NULL,
    dead_lettered INTEGER NOT NULL,
    skipped       INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id             INTEGER PRIMARY KEY,
    sink           TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    correlation_id TEXT    NOT NULL,
    stage          TEXT    NOT NULL,
    reason         TEXT    NOT NULL,
    attempts       INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    payload        BLOB    NOT NULL,
    message        BLOB,
    redriven       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dead_letters_sink ON dead_letters (sink, id);
CREATE TABLE IF NOT EXISTS journal_stats (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_INSERT_HEAD = (
    "INSERT INTO records (correlation_id, received_at, source, kind, content_type, meta, p_uid, l_uid,"
    " status, error, payload, message, replay_of) VALUES "
)
_ROW_PLACEHOLDERS = "(?,?,?,?,?,?,?,?,?,?,?,?,?)"
# 13 parameters a row; SQLite allows 32,766 per statement.
_ROWS_PER_INSERT = 1000
_COLUMNS = (
    "seq, correlation_id, received_at, source, kind, content_type, meta, p_uid, status, error,"
    " payload, message, replay_of"
)
_PAYLOAD = 10  # the payload's index in a row of _COLUMNS

_ALL_KINDS = frozenset(get_args(Kind))
# Most sequence numbers one read_selected examines: bounds the time one query holds its read
# transaction when a selective sink catches up over a long stretch it does not take.
_SCAN_MAX = 100_000
_SELECTED = "status = 'ok' AND message IS NOT NULL"

_meta_encoder = msgspec.json.Encoder()
_meta_decoder = msgspec.json.Decoder(dict[str, Any])


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How much history the journal keeps.

    Records older than ``max_age`` or beyond ``max_bytes`` of live data are deleted, oldest first,
    but never past the slowest active cursor unless ``beyond_cursors`` is true; records dropped
    before a cursor reached them are then counted (``dropped_unconsumed``) and logged.
    """

    max_age: timedelta | None = None
    max_bytes: int | None = None
    beyond_cursors: bool = False
    interval: float = 60.0


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """What one retention pass did."""

    deleted: int
    dropped_unconsumed: int
    floor: int


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Size and position figures for metrics and /ready."""

    first_seq: int
    last_seq: int
    records: int
    bytes_used: int
    dropped_unconsumed: int


class Selection(NamedTuple):
    """What :meth:`SQLiteJournal.read_selected` found after a sequence number.

    The range examined is ``(after, last_seq]``: ``records`` are the selected ones in it, in order;
    ``skipped`` counts the others (neither fetched nor decoded). Records retention deleted before
    the read are in neither. ``last_seq == after`` when there was nothing new.
    """

    records: list[Record]
    last_seq: int
    skipped: int


class _Op:
    """One unit of work for the writer thread, resolved on the event loop.

    Either ``rows`` to append (their sequence numbers become the result) or a function ``fn`` of
    the write connection.
    """

    __slots__ = ("fn", "future", "result", "rows", "size")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        future: asyncio.Future[Any],
        size: int,
        rows: list[tuple[Any, ...]] | None = None,
    ) -> None:
        self.fn = fn
        self.future = future
        self.size = size
        self.rows = rows
        self.result: Any = None


_STOP = object()


class SQLiteJournal:
    """Implements :class:`~isthmus.interfaces.Journal` and :class:`~isthmus.interfaces.CursorStore`.

    Lifecycle: ``await open()`` before use, ``await close()`` at the end; after close every
    method raises :class:`~isthmus.errors.JournalClosed`. ``synchronous="full"`` makes each group
    commit survive power loss (one fsync per commit); ``"normal"`` survives a process crash only.
    """

    def __init__(
        self,
        path: Path,
        *,
        commit_interval: float = 0.0,
        max_batch: int = 2000,
        synchronous: str = "full",
        retention: RetentionPolicy | None = None,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self.path = path
        self.commit_interval = commit_interval
        self.max_batch = max_batch
        self.synchronous = synchronous
        self.retention = retention or RetentionPolicy()
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self.last_error: str | None = None
        self._last_seq = 0
        self._written_seq = 0
        self._appended = asyncio.Event()
        self._queued_rows = 0
        """Records handed to the writer and not yet committed (or failed)."""
        self.max_queued_rows = max(10_000, 8 * max_batch)
        """Above this many queued records, :meth:`wait_for_room` holds fire-and-forget appends back."""
        self._room: asyncio.Event | None = None
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._local = threading.local()
        self._active_consumers: frozenset[str] = frozenset()
        self._retention_task: asyncio.Task[None] | None = None
        self._insert_sql: dict[int, str] = {}
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create or open the file, apply the schema and start the writer thread."""
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(target=self._writer_main, args=(ready,), name="journal-writer", daemon=True)
        self._writer.start()
        await ready
        self._checkpoint_task = asyncio.create_task(self._checkpoint_loop(), name="journal-checkpoint")
        if self.retention.max_age is not None or self.retention.max_bytes is not None:
            self._retention_task = asyncio.create_task(self._retention_loop(), name="journal-retention")

    async def close(self) -> None:
        """Finish queued writes, stop the writer thread and close every connection."""
        if self._closed:
            return
        self._closed = True
        for task in (self._retention_task, self._checkpoint_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._writer is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._writer.join)
        if self._room is not None:  # waiters re-check, and find the journal closed
            self._room.set()
            self._room = None
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._checkpoint_lock:  # a checkpoint thread may still be running
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None

    @property
    def healthy(self) -> bool:
        """True while the writer thread is alive and its last commit succeeded."""
        return (
            not self._closed
            and self._failure is None
            and self.last_error is None
            and self._writer is not None
            and self._writer.is_alive()
        )

    @property
    def last_seq(self) -> int:
        """The highest sequence number committed so far."""
        return self._last_seq

    def set_active_consumers(self, consumers: Sequence[str]) -> None:
        """The cursors retention must respect (the configured sinks); others are ignored."""
        self._active_consumers = frozenset(consumers)

    # ------------------------------------------------------------------ connections

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        uri = f"file:{self.path}?mode={'ro' if readonly else 'rwc'}"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        if not readonly:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            # Checkpoints run on their own connection (see _checkpoint), never inside a group
            # commit, where copying pages and fsyncing the database stalled every waiting device.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
        return conn

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        yield conn

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        self._check_open()

        def run() -> Any:
            with self._reader() as conn:
                try:
                    return fn(conn)
                except sqlite3.Error as exc:
                    raise JournalError(f"journal read failed: {exc}") from exc

        return await asyncio.to_thread(run)

    def _check_open(self) -> None:
        if self._closed:
            raise JournalClosed("the journal is closed")
        if self._failure is not None:
            raise JournalError(f"the journal writer failed: {self._failure}")

    # ------------------------------------------------------------------ writer thread

    def _writer_main(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        if loop is None:  # pragma: no cover - open() sets it before starting the thread
            raise RuntimeError("journal writer started without an event loop")
        try:
            conn = self._connect(readonly=False)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"{self.path} has journal schema {version}, newer than this Isthmus ({SCHEMA_VERSION})"
                )
            if 0 < version < SCHEMA_VERSION:
                log.info("upgrading journal %s from schema %d to %d", self.path, version, SCHEMA_VERSION)
            # Idempotent: creates what a new file lacks, and on a version 1 file builds the
            # records_kind index (one pass over the records, at open only).
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._last_seq = conn.execute("SELECT coalesce(max(seq), 0) FROM records").fetchone()[0]
            # The writer's own copy: it alone appends, so it knows the newest seq after each commit.
            self._written_seq = self._last_seq
        except (sqlite3.Error, JournalError) as exc:
            error = exc if isinstance(exc, JournalError) else JournalError(f"cannot open journal {self.path}: {exc}")
            loop.call_soon_threadsafe(_set_exception, ready, error)
            return
        loop.call_soon_threadsafe(_set_result, ready, None)
        try:
            self._writer_loop(conn, loop)
        finally:
            conn.close()

    def _writer_loop(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch: list[_Op] = [first]
            size = first.size
            deadline = time.monotonic() + self.commit_interval
            stop = False
            while size < self.max_batch:
                try:
                    timeout = deadline - time.monotonic()
                    item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
                size += item.size
            self._commit(conn, batch, loop)
            if stop:
                return

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op], loop: asyncio.AbstractEventLoop) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            appends = [op for op in batch if op.rows is not None]
            last_written = self._written_seq
            if appends:
                seqs = self._insert([row for op in appends for row in op.rows or ()], conn)
                last_written = seqs[-1]
                start = 0
                for op in appends:
                    op.result = seqs[start : start + op.size]
                    start += op.size
            for op in batch:
                if op.fn is not None:
                    op.result = op.fn(conn)
            conn.execute("COMMIT")
            self._written_seq = last_written
        except Exception as exc:  # noqa: BLE001 - the writer thread must survive any one batch
            error = exc
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            # A failed batch fails every caller in it (none of them is acknowledged); the writer
            # goes on with the next batch, so a full disk recovers by itself once space is freed.
            log.error("journal commit failed: %s", exc)
        elapsed = time.perf_counter() - started
        loop.call_soon_threadsafe(self._resolve, batch, error, self._written_seq, elapsed)

    def _insert(self, rows: list[tuple[Any, ...]], conn: sqlite3.Connection) -> list[int]:
        """Insert ``rows`` with multi-row INSERTs; return their sequence numbers.

        CPython's sqlite3 module releases the GIL around every statement step; one statement per
        row would make the writer wait for the GIL once per row while the event loop is busy (a
        convoy that dominated commit time). A multi-row INSERT is one step per chunk. The rowids
        of one statement are consecutive: this thread is the only writer and retention never
        deletes the newest record, so ``max(rowid) + 1`` is taken for each row in turn.
        """
        seqs: list[int] = []
        for i in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[i : i + _ROWS_PER_INSERT]
            sql = self._insert_sql.get(len(chunk))
            if sql is None:
                sql = _INSERT_HEAD + ",".join([_ROW_PLACEHOLDERS] * len(chunk))
                self._insert_sql[len(chunk)] = sql
            last = conn.execute(sql, [value for row in chunk for value in row]).lastrowid
            if last is None:  # pragma: no cover - sqlite3 sets it for INSERT
                raise JournalError("the journal did not report the inserted sequence numbers")
            seqs.extend(range(last - len(chunk) + 1, last + 1))
        return seqs

    def _resolve(self, batch: list[_Op], error: BaseException | None, last_seq: int, elapsed: float) -> None:
        self._queued_rows -= sum(op.size for op in batch if op.rows is not None)
        if self._room is not None and self._queued_rows <= self.max_queued_rows // 2:
            self._room.set()
            self._room = None
        for op in batch:
            if op.future.done():
                continue
            if error is None:
                op.future.set_result(op.result)
            elif isinstance(error, IsthmusError):
                op.future.set_exception(error)
            else:
                op.future.set_exception(JournalError(f"journal write failed: {error}"))
        self.last_error = None if error is None else str(error)
        if error is None and last_seq > self._last_seq:
            self._last_seq = last_seq
            self._appended.set()
            self._appended = asyncio.Event()
        if self._on_commit is not None and error is None:
            self._on_commit(sum(op.size for op in batch), elapsed)

    async def _submit(
        self,
        fn: Callable[[sqlite3.Connection], Any] | None,
        size: int = 1,
        rows: list[tuple[Any, ...]] | None = None,
        *,
        counted: bool = False,
    ) -> Any:
        if counted:  # append_nowait counted these rows already
            self._queued_rows -= size
        self._check_open()
        loop = self._loop
        if loop is None:
            raise JournalClosed("the journal is not open")
        future: asyncio.Future[Any] = loop.create_future()
        if rows is not None:
            self._queued_rows += size
        self._queue.put(_Op(fn, future, size, rows))
        return await future

    async def wait_for_room(self) -> None:
        """Return once the writer's queue holds at most ``max_queued_rows`` records (at once, normally).

        Fire-and-forget appends (QoS 0) are not bounded by any acknowledgement; their sources call
        this first, so that a flood slows its senders (TCP back-pressure) instead of filling memory
        and starving everything else on the event loop. Waits until the queue is half drained.
        """
        while self._queued_rows > self.max_queued_rows:
            self._check_open()
            if self._room is None:
                self._room = asyncio.Event()
            await self._room.wait()

    # ------------------------------------------------------------------ Journal

    async def append(self, records: Sequence[Record]) -> list[int]:
        """Store ``records`` durably (group-committed); return their sequence numbers."""
        rows = [_record_row(r) for r in records]
        if not rows:
            return []
        result: list[int] = await self._submit(None, len(rows), rows)
        return result

    def append_nowait(self, records: Sequence[Record]) -> asyncio.Future[list[int]]:
        """Queue ``records`` for the next group commit without waiting (QoS 0 paths).

        The returned future resolves like :meth:`append`; callers may ignore it.
        """
        self._check_open()
        rows = [_record_row(r) for r in records]
        # Counted at once, so that wait_for_room sees records whose task has not run yet.
        self._queued_rows += len(rows)
        # A task, not a direct enqueue: records of one connection then keep their order with
        # the waited submits (tasks too) started before them.
        return asyncio.ensure_future(self._append_rows(rows))

    async def _append_rows(self, rows: list[tuple[Any, ...]]) -> list[int]:
        if not rows:
            return []
        result: list[int] = await self._submit(None, len(rows), rows, counted=True)
        return result

    async def wait_for_append(self, after: int, wait: float) -> bool:
        """Wait up to ``wait`` s until a record with ``seq > after`` is committed; true if there is one."""
        self._check_open()
        if wait > 0 and self._last_seq <= after:
            event = self._appended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait)
        return self._last_seq > after

    async def read(self, after: int, limit: int, *, wait: float = 0.0) -> list[Record]:
        """Up to ``limit`` records with ``seq > after``, waiting up to ``wait`` s for one."""
        if not await self.wait_for_append(after, wait):
            return []

        def fetch(conn: sqlite3.Connection) -> list[Record]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM records WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (after, limit),
            ).fetchall()
            return [_row_record(r) for r in rows]

        result: list[Record] = await self._read(fetch)
        return result

    async def read_selected(
        self,
        after: int,
        limit: int,
        *,
        kinds: Collection[str],
        mapped_only: bool,
        max_bytes: int | None = None,
        wait: float = 0.0,
    ) -> Selection:
        """The records a sink takes after ``after``, and how many it passes over.

        Selected are records with status ``ok`` and a message, of one of ``kinds`` and, with
        ``mapped_only``, mapped to a logical device: at most ``limit`` of them, in order, with at
        most ``max_bytes`` of payload between them (but at least one). They are filtered inside
        SQLite; the others in the range examined are never fetched nor decoded, only counted
        (``Selection.skipped``) from the sequence numbers, which are consecutive: retention only
        deletes the oldest records. Examines at most ``_SCAN_MAX`` sequence numbers per call.
        Waits up to ``wait`` s for an append when there is nothing after ``after``.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        if not await self.wait_for_append(after, wait):
            return Selection([], after, 0)
        where = ["seq > ? AND seq <= ?", _SELECTED]
        kind_args: list[str] = []
        if not _ALL_KINDS.issubset(kinds):  # taking every kind needs no condition
            kind_args = sorted(set(kinds))
            where.append(f"kind IN ({','.join('?' * len(kind_args))})")
        if mapped_only:
            where.append("l_uid IS NOT NULL")
        sql = f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"  # noqa: S608

        def fetch(conn: sqlite3.Connection) -> Selection:
            # One read transaction: the bounds and the rows come from the same snapshot, so a
            # concurrent retention pass cannot make the count of passed-over records wrong.
            if conn.in_transaction:  # left open by a failed COMMIT: never keep an old snapshot
                conn.execute("ROLLBACK")
            conn.execute("BEGIN")
            try:
                # Two subqueries: SQLite answers a lone min() or max() of the key from the b-tree's ends.
                first, last = conn.execute(
                    "SELECT (SELECT min(seq) FROM records), (SELECT max(seq) FROM records)"
                ).fetchall()[0]
                if last is None or last <= after:
                    return Selection([], after, 0)
                lo = max(after, first - 1)
                hi = min(last, lo + _SCAN_MAX)
                records: list[Record] = []
                end = hi
                total = 0
                cur = conn.execute(sql, (lo, hi, *kind_args, limit))
                try:
                    for row in cur:
                        if max_bytes is not None:
                            total += len(row[_PAYLOAD])
                            if total > max_bytes and records:
                                end = records[-1].seq
                                break
                        records.append(_row_record(row))
                    else:
                        if len(records) >= limit:
                            end = records[-1].seq
                finally:
                    cur.close()
            finally:
                conn.execute("COMMIT")
            return Selection(records, end, max(0, end - lo - len(records)))

        result: Selection = await self._read(fetch)
        return result

    async def query(self, q: RecordQuery) -> list[Record]:
        """Records matching ``q``, newest first unless ``q.newest_first`` is false."""
        where = ["seq > ?"]
        args: list[Any] = [q.after_seq]
        for column, value in (
            ("p_uid", q.p_uid),
            ("l_uid", q.l_uid),
            ("status", q.status),
            ("correlation_id", q.correlation_id),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if q.since is not None:
            where.append("received_at >= ?")
            args.append(to_micros(q.since))
        if q.until is not None:
            where.append("received_at < ?")
            args.append(to_micros(q.until))
        if q.unmapped:
            where.append("status = 'ok' AND l_uid IS NULL")
        order = "DESC" if q.newest_first else "ASC"
        sql = f"SELECT {_COLUMNS} FROM records WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?"  # noqa: S608
        args.append(max(0, min(q.limit, 10_000)))

        def fetch(conn: sqlite3.Connection) -> list[Record]:
            return [_row_record(r) for r in conn.execute(sql, args).fetchall()]

        result: list[Record] = await self._read(fetch)
        return result

    # ------------------------------------------------------------------ CursorStore

    async def load_cursor(self, consumer: str) -> Cursor:
        """The committed cursor of ``consumer``, or a fresh one at the start."""

        def fetch(conn: sqlite3.Connection) -> Cursor:
            row = conn.execute(
                "SELECT seq, delivered, dead_lettered, skipped FROM cursors WHERE consumer = ?", (consumer,)
            ).fetchone()
            if row is None:
                return Cursor(consumer)
            return Cursor(consumer, *row)

        result: Cursor = await self._read(fetch)
        return result

    async def commit_cursor(
        self, cursor: Cursor, dead_letters: Sequence[DeadLetter] = (), redriven: Sequence[int] = ()
    ) -> None:
        """Store ``cursor``, new ``dead_letters`` and the ``redriven`` marks in one transaction."""
        marks = [(dl_id, cursor.consumer) for dl_id in redriven]
        now = to_micros(utcnow())
        row = (cursor.consumer, cursor.seq, cursor.delivered, cursor.dead_lettered, cursor.skipped, now)
        dl_rows = [
            (
                d.sink,
                d.seq,
                d.correlation_id,
                d.stage,
                d.reason,
                d.attempts,
                to_micros(d.created_at),
                d.payload,
                d.message,
            )
            for d in dead_letters
        ]

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO dead_letters (sink, seq, correlation_id, stage, reason, attempts, created_at,"
                " payload, message) VALUES (?,?,?,?,?,?,?,?,?)",
                dl_rows,
            )
            conn.executemany("UPDATE dead_letters SET redriven = 1 WHERE id = ? AND sink = ?", marks)
            conn.execute(
                "INSERT INTO cursors (consumer, seq, delivered, dead_lettered, skipped, updated_at)"
                " VALUES (?,?,?,?,?,?) ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq,"
                " delivered = excluded.delivered, dead_lettered = excluded.dead_lettered,"
                " skipped = excluded.skipped, updated_at = excluded.updated_at",
                row,
            )

        await self._submit(write, max(1, len(dl_rows)))

    # ------------------------------------------------------------------ dead letters

    async def dead_letters(
        self, sink: str | None = None, *, after_id: int = 0, limit: int = 100, pending_only: bool = False
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally for one sink, optionally only those not redriven."""
        sql = f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE id > ?"  # noqa: S608
        args: list[Any] = [after_id]
        if pending_only:
            sql += " AND redriven = 0"
        if sink is not None:
            sql += " AND sink = ?"
            args.append(sink)
        sql += " ORDER BY id LIMIT ?"
        args.append(max(0, min(limit, 10_000)))

        def fetch(conn: sqlite3.Connection) -> list[DeadLetter]:
            return [_row_dead_letter(r) for r in conn.execute(sql, args).fetchall()]

        result: list[DeadLetter] = await self._read(fetch)
        return result

    async def dead_letter(self, dl_id: int) -> DeadLetter:
        """One dead letter; raises :class:`~isthmus.errors.NotFound`."""

        def fetch(conn: sqlite3.Connection) -> DeadLetter:
            row = conn.execute(f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE id = ?", (dl_id,)).fetchone()  # noqa: S608
            if row is None:
                raise NotFound(f"dead letter {dl_id} not found")
            return _row_dead_letter(row)

        result: DeadLetter = await self._read(fetch)
        return result

    async def dead_letter_counts(self) -> dict[str, int]:
        """Number of dead letters per sink."""

        def fetch(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute("SELECT sink, count(*) FROM dead_letters GROUP BY sink").fetchall())

        result: dict[str, int] = await self._read(fetch)
        return result

    # ------------------------------------------------------------------ retention and stats

    async def stats(self) -> JournalStats:
        """Current size and position figures."""

        def fetch(conn: sqlite3.Connection) -> JournalStats:
            first, last, count = conn.execute(
                "SELECT coalesce(min(seq), 0), coalesce(max(seq), 0), count(*) FROM records"
            ).fetchone()
            return JournalStats(first, last, count, _bytes_used(conn), _stat(conn, "dropped_unconsumed"))

        result: JournalStats = await self._read(fetch)
        return result

    async def apply_retention(self, now: datetime | None = None) -> RetentionReport:
        """Run one retention pass now (also run every ``retention.interval`` seconds)."""
        policy = self.retention
        consumers = self._active_consumers
        cutoff = to_micros((now or utcnow()) - policy.max_age) if policy.max_age is not None else None

        def run(conn: sqlite3.Connection) -> RetentionReport:
            return _retention_pass(conn, policy, consumers, cutoff)

        report: RetentionReport = await self._submit(run)
        if report.deleted:
            await self._submit(lambda conn: conn.execute("PRAGMA incremental_vacuum").fetchall())
        if report.dropped_unconsumed:
            log.warning(
                "retention dropped %d records that a sink had not consumed yet (floor was seq %d)",
                report.dropped_unconsumed,
                report.floor,
            )
        return report

    def _checkpoint(self) -> None:
        """Copy committed WAL frames into the database file (PASSIVE: never blocks the writer)."""
        with self._checkpoint_lock:
            if self._closed:
                return
            if self._checkpointer is None:
                self._checkpointer = self._connect(readonly=False)
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            try:
                await asyncio.to_thread(self._checkpoint)
            except sqlite3.Error as exc:
                log.warning("journal checkpoint failed (will retry): %s", exc)

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retention.interval)
            try:
                await self.apply_retention()
            except JournalError as exc:
                log.error("journal retention failed: %s", exc)


_DL_COLUMNS = "id, sink, seq, correlation_id, stage, reason, attempts, created_at, payload, message, redriven"


def _set_result(future: asyncio.Future[None], value: None) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _record_row(r: Record) -> tuple[Any, ...]:
    f = r.frame
    return (
        f.correlation_id,
        to_micros(f.received_at),
        f.source,
        f.kind,
        f.content_type,
        _meta_encoder.encode(f.meta) if f.meta else None,
        r.p_uid,
        r.l_uid,
        r.status.value,
        r.error,
        f.payload,
        encode_message(r.message) if r.message is not None else None,
        r.replay_of,
    )


def _row_record(row: tuple[Any, ...]) -> Record:
    seq, corr, received, source, kind, ctype, meta, p_uid, status, error, payload, message, replay_of = row
    kind_: Kind = kind
    frame = RawFrame(
        correlation_id=corr,
        received_at=from_micros(received),
        source=source,
        payload=payload,
        kind=kind_,
        content_type=ctype,
        meta=_meta_decoder.decode(meta) if meta else {},
    )
    return Record(
        frame=frame,
        status=Status(status),
        p_uid=p_uid,
        message=decode_message(message) if message is not None else None,
        error=error,
        seq=seq,
        replay_of=replay_of,
    )


def _row_dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    dl_id, sink, seq, corr, stage, reason, attempts, created, payload, message, redriven = row
    return DeadLetter(
        id=dl_id,
        sink=sink,
        seq=seq,
        correlation_id=corr,
        stage=stage,
        reason=reason,
        attempts=attempts,
        created_at=from_micros(created),
        payload=payload,
        message=message,
        redriven=bool(redriven),
    )


def _bytes_used(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def _stat(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM journal_stats WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _retention_pass(
    conn: sqlite3.Connection, policy: RetentionPolicy, consumers: frozenset[str], cutoff_us: int | None
) -> RetentionReport:
    """Delete the oldest records the policy no longer keeps (runs inside the writer's transaction)."""
    first, last, count = conn.execute(
        "SELECT coalesce(min(seq), 0), coalesce(max(seq), 0), count(*) FROM records"
    ).fetchone()
    if count == 0:
        return RetentionReport(0, 0, last)
    floor = last
    if consumers:
        placeholders = ",".join("?" * len(consumers))
        positions = dict(
            conn.execute(
                f"SELECT consumer, seq FROM cursors WHERE consumer IN ({placeholders})",  # noqa: S608
                tuple(consumers),
            ).fetchall()
        )
        floor = min(positions.get(c, 0) for c in consumers)
    target = first - 1
    if cutoff_us is not None:
        row = conn.execute("SELECT max(seq) FROM records WHERE received_at < ?", (cutoff_us,)).fetchone()
        if row[0] is not None:
            target = max(target, int(row[0]))
    if policy.max_bytes is not None:
        used = _bytes_used(conn)
        if used > policy.max_bytes:
            per_record = max(1, used // count)
            excess = (used - int(policy.max_bytes * 0.9)) // per_record
            target = max(target, first - 1 + int(excess))
    # Never delete the newest record: SQLite would then hand out its sequence number again.
    target = min(target, last - 1)
    if target < first:
        return RetentionReport(0, 0, floor)
    dropped = 0
    if target > floor:
        if not policy.beyond_cursors:
            target = floor
        else:
            dropped = conn.execute(
                "SELECT count(*) FROM records WHERE seq > ? AND seq <= ?", (floor, target)
            ).fetchone()[0]
    deleted = conn.execute("DELETE FROM records WHERE seq <= ?", (target,)).rowcount
    if dropped:
        conn.execute(
            "INSERT INTO journal_stats (key, value) VALUES ('dropped_unconsumed', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (dropped,),
        )
    return RetentionReport(deleted, dropped, floor)


def journal_path(data_dir: Path) -> Path:
    """Where the embedded journal lives inside the data directory."""
    return data_dir / "journal.db"
