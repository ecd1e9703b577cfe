"""The narrow waist's time helpers and JSON form."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from isthmus.message import Message, Point, decode_message, encode_message, from_micros, new_correlation_id, to_micros

# Hypothesis takes naive bounds and attaches the timezone itself.
NAIVE_MIN, NAIVE_MAX = datetime(1, 1, 2), datetime(9999, 12, 30)  # noqa: DTZ001


@given(st.datetimes(min_value=NAIVE_MIN, max_value=NAIVE_MAX, timezones=st.just(UTC)))
def test_micros_round_trip_exactly(ts: datetime) -> None:
    assert from_micros(to_micros(ts)) == ts


def test_message_json_is_a_superset_of_iota() -> None:
    ts = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    msg = Message("019a-x", ts, "http", 301, "telemetry", ts, [Point("battery_v", 4.16), Point("t", 21.6, ts)], 276)
    doc = encode_message(msg)
    assert b'"p_uid":301' in doc and b'"l_uid":276' in doc and b'"timestamp":"2026-11-22T10:00:00Z"' in doc
    assert b'{"name":"battery_v","value":4.16}' in doc, "points without their own timestamp omit it"
    assert decode_message(doc) == msg


def test_correlation_ids_are_uuid7_and_time_ordered() -> None:
    import time
    import uuid

    first = new_correlation_id()
    time.sleep(0.002)
    ids = [new_correlation_id() for _ in range(1000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert len(set(ids)) == 1000
    assert all(first < i for i in ids), "ids from a later millisecond sort after earlier ones"
    now_ms = time.time_ns() // 1_000_000
    assert 0 <= now_ms - (parsed[-1].int >> 80) < 1000, "the first 48 bits are Unix milliseconds"
