"""Official fakes for testing Isthmus plugins and the runtime (shipped, typed, documented).

:class:`RecordingSink` is a :class:`~isthmus.interfaces.Sink` that keeps what it is given and can
be told to fail, so a test can drive a runner through retries and dead letters without a
network destination.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from isthmus.errors import PermanentSinkError, RetryableSinkError
from isthmus.interfaces import WriteResult
from isthmus.message import Kind, Message, Point, RawFrame, Record, Status, Value, new_correlation_id, utcnow

__all__ = ["RecordingSink", "make_record"]


def make_record(
    p_uid: int = 1,
    l_uid: int | None = 7,
    value: Value = 1.0,
    *,
    name: str = "t",
    received_at: datetime | None = None,
    timestamp: datetime | None = None,
    kind: Kind = "telemetry",
    status: Status = Status.OK,
) -> Record:
    """A decoded record as the ingest path would build it (``seq`` 0 until journaled)."""
    now = received_at or utcnow()
    corr = new_correlation_id()
    payload = msgspec.json.encode({name: value})
    frame = RawFrame(
        correlation_id=corr,
        received_at=now,
        source="http",
        payload=payload,
        kind=kind,
        content_type="application/json",
        meta={"path": "/test"},
    )
    if status is Status.DECODE_ERROR:
        return Record(frame=frame, status=status, p_uid=p_uid, error="scripted decode error")
    message = Message(
        correlation_id=corr,
        received_at=now,
        source="http",
        p_uid=p_uid,
        kind=kind,
        timestamp=timestamp or now,
        timeseries=[Point(name, value)],
        l_uid=l_uid,
    )
    return Record(
        frame=frame,
        status=status,
        p_uid=p_uid,
        message=message,
        error="scripted quarantine" if status is Status.QUARANTINED else None,
    )


class RecordingSink:
    """Keeps every successfully written record; fails as scripted.

    ``fail_next`` retryable failures are raised first; ``fail_always`` makes every write raise a
    retryable error; ``permanent`` makes every write raise a permanent error; ``reject`` names
    correlation ids to reject individually through :class:`WriteResult`.
    """

    def __init__(
        self,
        *,
        fail_next: int = 0,
        fail_always: bool = False,
        permanent: bool = False,
        reject: frozenset[str] = frozenset(),
    ) -> None:
        self.written: list[Record] = []
        self.attempts = 0
        self.fail_next = fail_next
        self.fail_always = fail_always
        self.permanent = permanent
        self.reject = reject
        self.opened = False
        self.closed = False

    async def open(self) -> None:
        """Mark the sink open."""
        self.opened = True

    async def write(self, batch: Sequence[Record]) -> WriteResult | None:
        """Record ``batch`` or fail as scripted."""
        self.attempts += 1
        if self.permanent:
            raise PermanentSinkError("scripted permanent failure")
        if self.fail_always or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            raise RetryableSinkError("scripted transient failure")
        rejected = {i: "scripted rejection" for i, r in enumerate(batch) if r.frame.correlation_id in self.reject}
        self.written.extend(r for i, r in enumerate(batch) if i not in rejected)
        return WriteResult(rejected) if rejected else None

    async def close(self) -> None:
        """Mark the sink closed."""
        self.closed = True
