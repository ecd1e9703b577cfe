"""Acknowledgements: only after the durable commit, in order, pipelined; QoS 2 exactly once per connection."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from isthmus.errors import JournalError
from isthmus.interfaces import RecordQuery
from isthmus.message import Status
from isthmus.sources.mqtt_codec import encode_disconnect, encode_publish, encode_pubrel

if TYPE_CHECKING:
    from conftest import MqttInstance

PUBACK, PUBREC, PUBCOMP, DISCONNECT = 4, 5, 7, 14
TELEMETRY = "v1/devices/me/telemetry"


@pytest.mark.parametrize("version", [4, 5])
async def test_puback_arrives_only_once_the_record_is_in_the_journal(mqtt: MqttInstance, version: int) -> None:
    dev = await mqtt.device("d", token=f"ack-{version}")
    client = await mqtt.raw()
    assert await client.connect(version, dev.token) == 0
    for packet_id in (1, 2, 3):
        await client.send(encode_publish(TELEMETRY, b'{"n": %d}' % packet_id, 1, packet_id, version=version))
        assert await client.ack() == (PUBACK, packet_id, 0)
        # Queried the moment the PUBACK arrived: the record must already be durable.
        records = await mqtt.rt.journal.query(RecordQuery(p_uid=dev.uid))
        assert len(records) == packet_id
        assert records[0].frame.payload == b'{"n": %d}' % packet_id


async def test_a_hundred_pipelined_publishes_are_acknowledged_in_order_by_group_commits(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="pipeline")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0
    commits_before = mqtt.rt.metrics.registry.get_sample_value("isthmus_journal_commit_records_count") or 0.0
    # All 100 are written before any PUBACK is read: the server has them all in flight at once.
    await client.send(b"".join(encode_publish(TELEMETRY, b'{"i": %d}' % i, 1, i, version=5) for i in range(1, 101)))
    acks = [await client.ack() for _ in range(100)]
    assert acks == [(PUBACK, i, 0) for i in range(1, 101)]
    records = await mqtt.records(dev.uid)
    assert [r.frame.payload for r in records] == [b'{"i": %d}' % i for i in range(1, 101)]
    commits = (
        mqtt.rt.metrics.registry.get_sample_value("isthmus_journal_commit_records_count") or 0.0
    ) - commits_before
    assert commits < 50, f"{commits} commits for 100 pipelined messages: they were serialised"


async def test_mixed_qos_keeps_arrival_order_in_the_journal(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="mixed")
    client = await mqtt.raw()
    assert await client.connect(4, dev.token) == 0
    qos = [0, 1, 2, 0, 0, 1, 2, 1, 0, 2] * 5
    packets = [encode_publish(TELEMETRY, b'{"i": %d}' % i, q, i if q else 0, version=4) for i, q in enumerate(qos, 1)]
    await client.send(b"".join(packets))
    acks = [await client.ack() for q in qos if q]
    assert [(t, i) for t, i, _ in acks] == [(PUBACK if q == 1 else PUBREC, i) for i, q in enumerate(qos, 1) if q]
    records = await mqtt.wait_records(dev.uid, len(qos))
    assert [r.frame.payload for r in records] == [b'{"i": %d}' % i for i in range(1, len(qos) + 1)]


@pytest.mark.parametrize("version", [4, 5])
async def test_qos2_is_journaled_once_even_when_resent_before_pubrel(mqtt: MqttInstance, version: int) -> None:
    dev = await mqtt.device("d", token=f"qos2-{version}")
    client = await mqtt.raw()
    assert await client.connect(version, dev.token) == 0
    publish = encode_publish(TELEMETRY, b'{"once": 1}', 2, 9, version=version)
    await client.send(publish)
    assert await client.ack() == (PUBREC, 9, 0)
    await client.send(encode_publish(TELEMETRY, b'{"once": 1}', 2, 9, version=version, dup=True))
    assert await client.ack() == (PUBREC, 9, 0)  # answered again, not journaled again
    await client.send(encode_pubrel(9, version))
    assert await client.ack() == (PUBCOMP, 9, 0)
    await client.send(encode_pubrel(9, version))  # unknown now
    assert await client.ack() == (PUBCOMP, 9, 0x92 if version == 5 else 0)
    # The packet id is free again: a new message with it is a new message.
    await client.send(encode_publish(TELEMETRY, b'{"twice": 2}', 2, 9, version=version))
    assert await client.ack() == (PUBREC, 9, 0)
    records = await mqtt.records(dev.uid)
    assert [r.frame.payload for r in records] == [b'{"once": 1}', b'{"twice": 2}']


@pytest.mark.parametrize("version", [4, 5])
async def test_an_undecodable_payload_is_journaled_with_its_error_and_acknowledged(
    mqtt: MqttInstance, version: int
) -> None:
    dev = await mqtt.device("d", token=f"bad-json-{version}")
    client = await mqtt.raw()
    assert await client.connect(version, dev.token) == 0
    await client.send(encode_publish(TELEMETRY, b"{not json", 1, 5, version=version))
    ptype, body = await client.packet()
    assert ptype == PUBACK and body[:2] == b"\x00\x05"
    (record,) = await mqtt.records(dev.uid)
    assert record.status is Status.DECODE_ERROR and record.frame.payload == b"{not json"
    assert record.error is not None and "malformed JSON" in record.error
    if version == 5:
        # 0x99 "payload format invalid", with the decoder's message as the reason string.
        assert body[2] == 0x99
        assert record.error.encode() in body
    else:
        assert body == b"\x00\x05"
    # The connection goes on.
    await client.send(encode_publish(TELEMETRY, b'{"ok": 1}', 1, 6, version=version))
    assert await client.ack() == (PUBACK, 6, 0)


async def test_a_journal_failure_disconnects_without_acknowledging(
    mqtt: MqttInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = await mqtt.device("d", token="journal-down")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0

    async def disk_full(records: object) -> list[int]:
        raise JournalError("database or disk is full")

    monkeypatch.setattr(mqtt.rt.journal, "append", disk_full)
    await client.send(encode_publish(TELEMETRY, b'{"lost": 1}', 1, 1, version=5))
    received = await client.closed_by_server()
    assert received == [(DISCONNECT, bytes([0x89]))]  # server busy: no PUBACK, the client resends later
    assert mqtt.metric("isthmus_mqtt_disconnects_total", reason="unavailable") == 1


async def test_clean_disconnect_is_counted_and_leaves_no_connection(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="bye")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0
    assert mqtt.metric("isthmus_mqtt_connections") == 1
    await client.send(encode_disconnect(0, 5))
    assert await client.closed_by_server() == []
    async with asyncio.timeout(5):
        while mqtt.metric("isthmus_mqtt_connections"):
            await asyncio.sleep(0.01)
    assert mqtt.metric("isthmus_mqtt_disconnects_total", reason="client") == 1


async def test_flow_control_with_a_small_inflight_window_still_acknowledges_everything(
    mqtt_factory: object,
) -> None:
    mqtt: MqttInstance = await mqtt_factory(max_inflight=4, rate={"burst": 1000})  # type: ignore[operator]
    dev = await mqtt.device("d", token="window")
    client = await mqtt.raw()
    assert await client.connect(4, dev.token) == 0
    await client.send(b"".join(encode_publish(TELEMETRY, b'{"i": %d}' % i, 1, i) for i in range(1, 301)))
    assert [await client.ack() for _ in range(300)] == [(PUBACK, i, 0) for i in range(1, 301)]
    assert len(await mqtt.records(dev.uid)) == 300


def _properties(data: bytes) -> dict[int, bytes | int]:
    """Parse an MQTT 5 property block of the CONNACK properties used here (ids -> raw values)."""
    length, pos, out = data[0], 1, {}  # short blocks only: a one-byte length
    end = 1 + length
    sizes = {0x11: 4, 0x21: 2, 0x27: 4}
    while pos < end:
        pid = data[pos]
        pos += 1
        if pid in sizes:
            out[pid] = int.from_bytes(data[pos : pos + sizes[pid]], "big")
            pos += sizes[pid]
        else:  # a UTF-8 string (assigned client identifier)
            n = int.from_bytes(data[pos : pos + 2], "big")
            out[pid] = data[pos + 2 : pos + 2 + n]
            pos += 2 + n
    return out


async def test_mqtt5_connack_announces_limits_and_no_session(mqtt_factory: object) -> None:
    mqtt: MqttInstance = await mqtt_factory(max_inflight=50, max_packet_size=4096)  # type: ignore[operator]
    dev = await mqtt.device("d", token="props")
    client = await mqtt.raw()
    from isthmus.sources.mqtt_codec import encode_connect

    connect = encode_connect("", 5, clean_start=False, username=dev.token, properties={"session_expiry_interval": 3600})
    await client.send(connect)
    ptype, body = await client.packet()
    assert ptype == 2 and body[:2] == b"\x00\x00"  # session present 0, success
    props = _properties(body[2:])
    assert props[0x21] == 50  # receive maximum
    assert props[0x27] == 4096  # maximum packet size
    assert props[0x11] == 0  # session expiry: nothing is kept
    assigned = props[0x12]
    assert isinstance(assigned, bytes) and assigned.startswith(b"isthmus-")


async def test_a_burst_of_qos0_is_journaled_in_order_and_counted(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="burst0")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0
    await client.send(b"".join(encode_publish(TELEMETRY, b'{"i": %d}' % i, 0, version=5) for i in range(200)))
    records = await mqtt.wait_records(dev.uid, 200)
    assert [r.frame.payload for r in records] == [b'{"i": %d}' % i for i in range(200)]
    assert all(r.status.value == "ok" for r in records)
    mqtt.rt.refresh_gauges()
    journaled = mqtt.rt.metrics.registry.get_sample_value("isthmus_frames_journaled_total", {"source": "mqtt"})
    assert journaled == 200


async def test_qos1_messages_of_one_read_are_journaled_and_acked_in_order(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="batch1")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0
    # One read holds them all: they go to the journal in one append.
    await client.send(b"".join(encode_publish(TELEMETRY, b'{"i": %d}' % i, 1, i, version=5) for i in range(1, 51)))
    assert [(await client.ack())[1] for _ in range(50)] == list(range(1, 51))
    records = await mqtt.records(dev.uid)
    assert [r.frame.payload for r in records] == [b'{"i": %d}' % i for i in range(1, 51)]
