"""The narrow waist: the few types every part of Isthmus speaks.

* :class:`RawFrame` — bytes exactly as a device sent them, with where and when they arrived.
* :class:`Point` — one named value, optionally with its own timestamp.
* :class:`Message` — the normalised message (a superset of IoTa's format): who sent it, which
  logical device it feeds, a default timestamp and its points.
* :class:`Record` — what the journal stores for one frame: the raw bytes, the message or the
  reason there is none, and the journal's sequence number.

All timestamps are timezone-aware UTC ``datetime`` objects. The JSON forms are produced by
msgspec (``encode_message`` / ``decode_message``); never hand-write them.
"""

from __future__ import annotations

import enum
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

Kind = Literal["telemetry", "attributes"]
"""What a frame carries: time series values, or device attributes (client-side state)."""

Value = bool | int | float | str | dict[str, Any] | list[Any]
"""A point's value. Nested JSON objects and arrays are kept as they came."""


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def new_correlation_id() -> str:
    """A new time-ordered correlation id (UUIDv7, RFC 9562) in its canonical text form.

    48 bits of Unix milliseconds, then 74 random bits from Python's PRNG. Correlation ids are
    identifiers, not secrets: the PRNG avoids a ``getrandom`` system call per frame, which
    releases the GIL and, with other threads busy, cost up to 100 µs on the device hot path.
    """
    value = (
        (time.time_ns() // 1_000_000) << 80
        | 0x7 << 76  # version 7
        | random.getrandbits(12) << 64
        | 0b10 << 62  # RFC 9562 variant
        | random.getrandbits(62)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def to_micros(ts: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime (the journal's time column)."""
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> datetime:
    """Inverse of :func:`to_micros` (exact: integer arithmetic, no float rounding)."""
    return _EPOCH + timedelta(microseconds=us)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Point(msgspec.Struct, omit_defaults=True, frozen=True):
    """One named value. ``timestamp`` overrides the message's default timestamp when set."""

    name: str
    value: Value
    timestamp: datetime | None = None


class Message(msgspec.Struct, omit_defaults=True, frozen=True):
    """The normalised message, a superset of IoTa's.

    ``p_uid`` is the physical device that sent it; ``l_uid`` the logical device it was mapped to
    at ``timestamp`` (``None`` while the physical device is unmapped or its mapping is paused).
    ``timestamp`` is the default time of every point without its own.
    """

    correlation_id: str
    received_at: datetime
    source: str
    p_uid: int
    kind: Kind
    timestamp: datetime
    timeseries: list[Point]
    l_uid: int | None = None

    def point_time(self, point: Point) -> datetime:
        """The effective timestamp of ``point``: its own, else the message's."""
        return point.timestamp if point.timestamp is not None else self.timestamp


class RawFrame(msgspec.Struct, frozen=True):
    """Bytes as received, before any decoding can fail.

    ``meta`` carries transport facts a decoder or an operator may need (HTTP path and content
    type, MQTT topic and QoS …); keys are short strings, values are JSON-compatible.
    """

    correlation_id: str
    received_at: datetime
    source: str
    payload: bytes
    kind: Kind = "telemetry"
    content_type: str = ""
    meta: dict[str, Any] = msgspec.field(default_factory=dict)


class Status(enum.StrEnum):
    """What became of a frame.

    ``ok``: decoded, the message is present (it may still be unmapped: ``l_uid`` is ``None``).
    ``decode_error``: the payload could not be decoded; ``error`` says why.
    ``quarantined``: decoded, but held back by policy (a timestamp far in the future, …);
    ``error`` says why and the message is kept so the operator can release it by replay.
    """

    OK = "ok"
    DECODE_ERROR = "decode_error"
    QUARANTINED = "quarantined"


class Record(msgspec.Struct, frozen=True):
    """One journal entry. ``seq`` is 0 until the journal assigns it on append.

    Replays append new records with ``replay_of`` set to the sequence number they re-decode and
    the *same* correlation id, so sinks can write them idempotently.
    """

    frame: RawFrame
    status: Status
    p_uid: int | None
    message: Message | None = None
    error: str | None = None
    seq: int = 0
    replay_of: int | None = None

    @property
    def l_uid(self) -> int | None:
        """The logical device the message feeds, if any."""
        return self.message.l_uid if self.message is not None else None

    @property
    def deliverable(self) -> bool:
        """True when sinks should see this record: decoded, not quarantined, mapped."""
        return self.status is Status.OK and self.message is not None and self.message.l_uid is not None


_message_encoder = msgspec.json.Encoder()
_message_decoder = msgspec.json.Decoder(Message)


def encode_message(message: Message) -> bytes:
    """The message's JSON form."""
    return _message_encoder.encode(message)


def decode_message(data: bytes) -> Message:
    """Parse a message's JSON form (raises ``msgspec.ValidationError`` on a bad document)."""
    return _message_decoder.decode(data)
