"""Fixtures shared by the sink tests: building journal records the way ingest does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from isthmus.message import Kind, Message, Point, RawFrame, Record, Status, new_correlation_id

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

MakeRecord = Callable[..., Record]

_NEW = object()


def _make_record(
    points: Sequence[Point] | None = None,
    *,
    l_uid: int | None = 42,
    p_uid: int = 7,
    timestamp: datetime = T0,
    kind: Kind = "telemetry",
    correlation_id: Any = _NEW,
) -> Record:
    cid = new_correlation_id() if correlation_id is _NEW else correlation_id
    received = datetime.now(UTC)
    message = Message(
        correlation_id=cid,
        received_at=received,
        source="test",
        p_uid=p_uid,
        kind=kind,
        timestamp=timestamp,
        timeseries=list(points if points is not None else [Point("temperature", 21.5)]),
        l_uid=l_uid,
    )
    frame = RawFrame(correlation_id=str(cid), received_at=received, source="test", payload=b"{}", kind=kind)
    return Record(frame=frame, status=Status.OK, p_uid=p_uid, message=message)


@pytest.fixture
def make_record() -> MakeRecord:
    """``make_record(points, l_uid=.., timestamp=.., kind=.., correlation_id=..)`` → a deliverable Record."""
    return _make_record
