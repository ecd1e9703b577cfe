"""Fixtures shared by the sink tests: building journal records the way ingest does, and PostgreSQL.

``postgres_url`` is a real PostgreSQL database for the sinks' PostgreSQL variants: a private
cluster started by :func:`isthmus.testing.postgres.shared_postgres` (once per test session,
shared with the other test directories), or the external server named by
``ISTHMUS_TEST_POSTGRES_URL`` (e.g. ``postgresql+psycopg://user@127.0.0.1:5432/db``) when that
is set. Either way the PostgreSQL tests run: a missing PostgreSQL fails them, never skips them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from isthmus.message import Kind, Message, Point, RawFrame, Record, Status, new_correlation_id
from isthmus.testing.postgres import shared_postgres

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


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a PostgreSQL database the sink tests may create tables in.

    Started lazily: a run that selects no PostgreSQL test starts no server.
    """
    external = os.environ.get("ISTHMUS_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    with shared_postgres() as pg:
        yield pg.url
