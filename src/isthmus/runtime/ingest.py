"""The ingest path: decode → map → journal, the one door every source comes through.

Decoding is a pure function of the payload, so the complete record (raw bytes plus the
normalised message, or the reason there is none) is assembled in memory and written in one
journal append; the source acknowledges the device only after that append is durable. No
decoder error, policy verdict or unmapped device can lose the raw frame: each becomes a status
on the record (see ``docs/decisions/0001-embedded-journal-and-ingest.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from isthmus.errors import DecodeError
from isthmus.interfaces import Decoder, DeviceDirectory, DeviceRef, IngestResult, Journal, Submission
from isthmus.message import Message, Point, RawFrame, Record, Status
from isthmus.runtime.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TimestampPolicy:
    """Bounds on message timestamps relative to the time the frame was received."""

    max_future: timedelta = timedelta(hours=1)
    max_past: timedelta | None = None
    action: str = "quarantine"  # "quarantine" | "reject" | "accept"

    def verdict(self, times: list[datetime], received_at: datetime) -> str | None:
        """Why ``times`` break the policy (``None`` when they do not, or the action is accept)."""
        if self.action == "accept" or not times:
            return None
        latest = max(times)
        ahead = latest - received_at
        if ahead > self.max_future:
            return (
                f"timestamp {latest.isoformat()} is {_human(ahead)} ahead of the server clock"
                f" (limit {_human(self.max_future)})"
            )
        if self.max_past is not None:
            earliest = min(times)
            behind = received_at - earliest
            if behind > self.max_past:
                return (
                    f"timestamp {earliest.isoformat()} is {_human(behind)} behind the server clock"
                    f" (limit {_human(self.max_past)})"
                )
        return None


def _human(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"


class _SourceCounts:
    """Frames counted for one source since the last metrics flush."""

    __slots__ = ("decoded", "journaled", "received")

    def __init__(self) -> None:
        self.received = 0
        self.journaled = 0
        self.decoded = 0

    def journaled_one(self) -> None:
        self.journaled += 1


class IngestService:
    """Implements :class:`~isthmus.interfaces.Ingest` for every source of one instance."""

    def __init__(
        self,
        journal: Journal,
        directory: DeviceDirectory,
        decoders: Mapping[str, Decoder],
        default_decoder: str,
        policy: TimestampPolicy,
        metrics: Metrics,
    ) -> None:
        self.journal = journal
        self.directory = directory
        self.decoders = dict(decoders)
        self.default_decoder = default_decoder
        self.policy = policy
        self.metrics = metrics
        self._counts: dict[str, _SourceCounts] = {}

    def _source_counts(self, source: str) -> _SourceCounts:
        counts = self._counts.get(source)
        if counts is None:
            counts = self._counts[source] = _SourceCounts()
        return counts

    def flush_metrics(self) -> None:
        """Add the per-source counts gathered since the last call to the Prometheus counters.

        Counted in plain integers on the event loop (a Prometheus ``inc`` takes a lock, measured at
        about 5% of the hot path) and flushed when ``/metrics`` is scraped.
        """
        m = self.metrics
        for source, c in self._counts.items():
            received, journaled, decoded = c.received, c.journaled, c.decoded
            c.received = c.journaled = c.decoded = 0
            if received:
                m.frames_received.labels(source).inc(received)
            if journaled:
                m.frames_journaled.labels(source).inc(journaled)
            if decoded:
                m.frames_decoded.labels(source).inc(decoded)

    def build(
        self, frame: RawFrame, device: DeviceRef, error: str | None = None, decoder_name: str | None = None
    ) -> Record:
        """The record for ``frame``: decoded and mapped, or carrying why it could not be.

        ``error`` is set by a source that already knows the frame is unusable (wrong content
        type …); the frame is then recorded with that error without decoding.
        """
        counts = self._source_counts(frame.source)
        counts.received += 1
        if error is None:
            name = device.decoder or decoder_name or self.default_decoder
            decoder = self.decoders.get(name)
            if decoder is None:
                error = f"unknown decoder {name!r} configured for device {device.p_uid}"
            else:
                try:
                    points = decoder.decode(frame.payload, frame.kind)
                except DecodeError as exc:
                    error = str(exc)
        if error is not None:
            self.directory.seen(device.p_uid, None, frame.received_at)
            self.metrics.frames_failed.labels(frame.source, Status.DECODE_ERROR.value).inc()
            return Record(frame=frame, status=Status.DECODE_ERROR, p_uid=device.p_uid, error=error)
        counts.decoded += 1
        return self._message_record(frame, device, points)

    def _message_record(self, frame: RawFrame, device: DeviceRef, points: list[Point]) -> Record:
        own = [p.timestamp for p in points if p.timestamp is not None]
        timestamp = frame.received_at
        if own and len(own) == len(points) and all(t == own[0] for t in own):
            # One timestamp for every point ({"ts": …, "values": …}): hoist it to the message.
            timestamp = own[0]
            points = [Point(p.name, p.value) for p in points]
        elif own and len(own) == len(points):
            timestamp = min(own)
        l_uid = self.directory.mapping_at(device.p_uid, timestamp)
        self.directory.seen(device.p_uid, l_uid, frame.received_at)
        message = Message(
            correlation_id=frame.correlation_id,
            received_at=frame.received_at,
            source=frame.source,
            p_uid=device.p_uid,
            kind=frame.kind,
            timestamp=timestamp,
            timeseries=points,
            l_uid=l_uid,
        )
        if device.quarantined:
            self.metrics.frames_failed.labels(frame.source, Status.QUARANTINED.value).inc()
            reason = f"device {device.p_uid} ({device.name}) is quarantined until an operator enables it"
            return Record(frame=frame, status=Status.QUARANTINED, p_uid=device.p_uid, message=message, error=reason)
        verdict = self.policy.verdict(own or [timestamp], frame.received_at)
        if verdict is not None:
            status = Status.QUARANTINED if self.policy.action == "quarantine" else Status.DECODE_ERROR
            self.metrics.frames_failed.labels(frame.source, status.value).inc()
            return Record(
                frame=frame,
                status=status,
                p_uid=device.p_uid,
                message=message if status is Status.QUARANTINED else None,
                error=verdict,
            )
        return Record(frame=frame, status=Status.OK, p_uid=device.p_uid, message=message)

    async def submit(
        self,
        frame: RawFrame,
        device: DeviceRef,
        *,
        wait: bool = True,
        error: str | None = None,
        decoder: str | None = None,
    ) -> IngestResult | None:
        """See :class:`~isthmus.interfaces.Ingest`."""
        record = self.build(frame, device, error, decoder)
        counts = self._source_counts(frame.source)
        if not wait:
            await self.journal.wait_for_room()  # a QoS 0 flood slows its senders down
            future = self.journal.append_nowait([record])
            future.add_done_callback(lambda f: counts.journaled_one() if not f.exception() else None)
            return None
        seq = (await self.journal.append([record]))[0]
        counts.journaled += 1
        return IngestResult(seq, record)

    async def submit_batch(self, items: Sequence[Submission]) -> list[IngestResult]:
        """See :class:`~isthmus.interfaces.Ingest`."""
        records = [self.build(i.frame, i.device, i.error, i.decoder) for i in items]
        if not records:
            return []
        seqs = await self.journal.append(records)
        for item in items:
            self._source_counts(item.frame.source).journaled += 1
        return [IngestResult(seq, record) for seq, record in zip(seqs, records, strict=True)]

    async def submit_nowait(self, items: Sequence[Submission]) -> None:
        """See :class:`~isthmus.interfaces.Ingest`."""
        if not items:
            return
        records = [self.build(i.frame, i.device, i.error, i.decoder) for i in items]
        await self.journal.wait_for_room()
        future = self.journal.append_nowait(records)
        sources = [self._source_counts(i.frame.source) for i in items]

        def journaled(f: asyncio.Future[list[int]]) -> None:
            if not f.exception():
                for counts in sources:
                    counts.journaled += 1

        future.add_done_callback(journaled)
