"""Hostile and broken clients: each closes only its own connection, counted, and the server goes on.

Every test ends by connecting a fresh client that gets a QoS 1 message acknowledged.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from isthmus.sources.mqtt_codec import encode_connect, encode_publish

if TYPE_CHECKING:
    from conftest import MqttInstance

CONNACK, PUBACK, DISCONNECT = 2, 4, 14
TELEMETRY = "v1/devices/me/telemetry"
TOKEN = "good-token"


async def _fresh(mqtt: MqttInstance) -> str:
    await mqtt.device("good", token=TOKEN)
    return TOKEN


async def test_garbage_bytes_close_the_connection(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await client.closed_by_server() == []
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="malformed_packet") == 1
    await mqtt.works(token)


async def test_publish_before_connect_closes_the_connection(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    await client.send(encode_publish(TELEMETRY, b"{}", 1, 1))
    assert await client.closed_by_server() == []
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="protocol_error") == 1
    await mqtt.works(token)


@pytest.mark.parametrize("version", [4, 5])
async def test_wildcard_topic_closes_the_connection_with_0x90(mqtt: MqttInstance, version: int) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(version, token) == 0
    raw = encode_publish("v1/devices/me/telemetry", b"{}", 1, 1, version=version)
    await client.send(raw.replace(b"/me/", b"/+e/"))  # the encoder refuses wildcards: patch the bytes
    expected = [(DISCONNECT, b"\x90")] if version == 5 else []
    assert await client.closed_by_server() == expected
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="topic_name_invalid") == 1
    assert await mqtt.records() == []
    await mqtt.works(token)


async def test_oversized_packet_is_refused_with_0x95(mqtt_factory: object) -> None:
    mqtt: MqttInstance = await mqtt_factory(max_packet_size=1024)  # type: ignore[operator]
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(5, token) == 0
    await client.send(encode_publish(TELEMETRY, b"x" * 2000, 1, 1, version=5))
    assert await client.closed_by_server() == [(DISCONNECT, b"\x95")]
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="packet_too_large") == 1
    await mqtt.works(token)


async def test_over_long_remaining_length_closes_the_connection(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(4, token) == 0
    await client.send(b"\x30\xff\xff\xff\xff\x01")  # a 5-byte remaining length
    assert await client.closed_by_server() == []
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="malformed_packet") == 1
    await mqtt.works(token)


async def test_invalid_utf8_topic_closes_the_connection(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(5, token) == 0
    raw = encode_publish("v1/devices/me/telemetrX", b"{}", 1, 1, version=5)
    await client.send(raw.replace(b"telemetrX", b"telemetr\xff"))
    assert await client.closed_by_server() == [(DISCONNECT, b"\x81")]
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="malformed_packet") == 1
    await mqtt.works(token)


async def test_a_second_connect_closes_the_connection(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(5, token) == 0
    await client.send(encode_connect("again", 5, username=token))
    assert await client.closed_by_server() == [(DISCONNECT, b"\x82")]
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="protocol_error") == 1
    await mqtt.works(token)


async def test_mqtt_3_1_is_refused_with_return_code_1(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    await client.send(encode_connect("old", 4, username=token).replace(b"\x00\x04MQTT\x04", b"\x00\x06MQIsdp\x03"))
    assert await client.closed_by_server() == [(CONNACK, b"\x00\x01")]
    await mqtt.works(token)


async def test_topic_alias_is_refused_with_0x94(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(5, token) == 0
    await client.send(encode_publish(TELEMETRY, b"{}", 1, 1, version=5, properties={"topic_alias": 1}))
    assert await client.closed_by_server() == [(DISCONNECT, b"\x94")]
    await mqtt.works(token)


async def test_keepalive_expiry_closes_the_connection(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(5, token, keepalive=1) == 0
    started = asyncio.get_running_loop().time()
    assert await client.closed_by_server() == [(DISCONNECT, b"\x8d")]  # keep alive timeout
    elapsed = asyncio.get_running_loop().time() - started
    assert 1.3 < elapsed < 3.0, elapsed  # 1.5 x the keep-alive
    assert mqtt.metric("isthmus_mqtt_disconnects_total", reason="keepalive_timeout") == 1
    await mqtt.works(token)


async def test_pingreq_keeps_the_connection_alive(mqtt: MqttInstance) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(4, token, keepalive=1) == 0
    for _ in range(4):
        await asyncio.sleep(0.5)
        await client.send(b"\xc0\x00")
        assert await client.packet() == (13, b"")  # PINGRESP
    await mqtt.works(token)


async def test_a_silent_connection_is_closed_after_connect_timeout(mqtt_factory: object) -> None:
    mqtt: MqttInstance = await mqtt_factory(connect_timeout=0.3)  # type: ignore[operator]
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.closed_by_server(timeout=3) == []
    assert mqtt.metric("isthmus_mqtt_connects_total", result="timeout") == 1
    await mqtt.works(token)


@pytest.mark.parametrize("version", [4, 5])
async def test_exceeding_the_rate_limit(mqtt_factory: object, version: int) -> None:
    mqtt: MqttInstance = await mqtt_factory(rate={"rate_per_second": 0.5, "burst": 2})  # type: ignore[operator]
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(version, token) == 0
    await client.send(b"".join(encode_publish(TELEMETRY, b'{"n": 1}', 1, i, version=version) for i in (1, 2, 3)))
    assert [await client.ack(), await client.ack()] == [(PUBACK, 1, 0), (PUBACK, 2, 0)]
    if version == 5:
        assert await client.ack() == (PUBACK, 3, 0x96)  # message rate too high; not journaled
        await client.send(encode_publish(TELEMETRY, b'{"n": 1}', 0, 0, version=5))
        assert await client.closed_by_server() == [(DISCONNECT, b"\x96")]  # QoS 0 cannot be refused otherwise
    else:
        assert await client.closed_by_server() == []
    assert mqtt.metric("isthmus_mqtt_publishes_rejected_total", reason="rate_limited") == 2 if version == 5 else 1
    assert len(await mqtt.records()) == 2
    await mqtt.works(token)


async def test_the_device_rate_limit_is_shared_by_all_connections_of_a_device(mqtt_factory: object) -> None:
    mqtt: MqttInstance = await mqtt_factory(  # type: ignore[operator]
        rate={"rate_per_second": 1000, "burst": 1000}, device_rate={"rate_per_second": 0.1, "burst": 3}
    )
    token = await _fresh(mqtt)
    first, second = await mqtt.raw(), await mqtt.raw()
    assert await first.connect(5, token, client_id="one") == 0
    assert await second.connect(5, token, client_id="two") == 0
    await first.send(b"".join(encode_publish(TELEMETRY, b'{"n": 1}', 1, i, version=5) for i in (1, 2)))
    assert [await first.ack(), await first.ack()] == [(PUBACK, 1, 0), (PUBACK, 2, 0)]
    # The second connection has a full bucket of its own, but the device has one message left.
    await second.send(b"".join(encode_publish(TELEMETRY, b'{"n": 2}', 1, i, version=5) for i in (1, 2)))
    assert [await second.ack(), await second.ack()] == [(PUBACK, 1, 0), (PUBACK, 2, 0x96)]
    assert len(await mqtt.records()) == 3
    # Another device is not affected.
    other = await mqtt.device("other", token="other-device-token")
    await mqtt.works(other.token)


@pytest.mark.parametrize(("version", "code"), [(4, 3), (5, 0x97)])
async def test_max_connections_refuses_further_clients(mqtt_factory: object, version: int, code: int) -> None:
    mqtt: MqttInstance = await mqtt_factory(max_connections=1)  # type: ignore[operator]
    token = await _fresh(mqtt)
    first = await mqtt.raw()
    assert await first.connect(version, token) == 0
    second = await mqtt.raw()
    assert await second.connect(version, token, client_id="second") == code
    assert await second.closed_by_server() == []
    assert mqtt.metric("isthmus_mqtt_connects_total", result="too_many_connections") == 1
    await first.close()
    async with asyncio.timeout(5):
        while mqtt.metric("isthmus_mqtt_connections"):
            await asyncio.sleep(0.01)
    await mqtt.works(token)


@pytest.mark.parametrize(
    ("version", "username", "code"), [(4, "nope", 5), (5, "nope", 0x87), (4, None, 4), (5, None, 0x86)]
)
async def test_refused_credentials_get_the_right_connack(
    mqtt: MqttInstance, version: int, username: str | None, code: int
) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(version, username) == code
    assert await client.closed_by_server() == []
    await mqtt.works(token)


async def test_a_revoked_token_is_refused(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="soon-revoked")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0
    await client.close()
    from isthmus.registry.models import PhysicalDevicePatch

    await asyncio.to_thread(mqtt.rt.store.update_physical, dev.uid, PhysicalDevicePatch(enabled=False))
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0x87


@pytest.mark.parametrize("version", [4, 5])
async def test_unsupported_topic_is_not_journaled(mqtt: MqttInstance, version: int) -> None:
    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(version, token) == 0
    await client.send(encode_publish("v1/devices/me/unknown", b"{}", 1, 4, version=version))
    # MQTT 5: 0x90 "topic name invalid"; 3.1.1 has no way to refuse, the message is dropped.
    assert await client.ack() == (PUBACK, 4, 0x90 if version == 5 else 0)
    await client.send(encode_publish(TELEMETRY, b'{"a": 1}', 1, 5, version=version))
    assert await client.ack() == (PUBACK, 5, 0)
    assert [r.frame.meta["topic"] for r in await mqtt.records()] == [TELEMETRY]
    assert mqtt.metric("isthmus_mqtt_publishes_rejected_total", reason="unsupported_topic") == 1


async def test_subscribe_grants_at_most_qos_1_and_refuses_bad_filters(mqtt: MqttInstance) -> None:
    from isthmus.sources.mqtt_codec import encode_subscribe, encode_unsubscribe

    token = await _fresh(mqtt)
    client = await mqtt.raw()
    assert await client.connect(5, token) == 0
    await client.send(encode_subscribe(3, [("v1/devices/me/attributes", 1), ("v1/devices/me/rpc/request/+", 2),
                                           ("bad/#/filter", 0)], 5))  # fmt: skip
    # The server publishes at most at QoS 1, so a QoS 2 subscription is granted QoS 1.
    assert await client.packet() == (9, b"\x00\x03\x00\x01\x01\x8f")
    await client.send(encode_unsubscribe(4, ["v1/devices/me/attributes", "never/subscribed"], 5))
    assert await client.packet() == (11, b"\x00\x04\x00\x00\x11")  # 0x11: no subscription existed


async def test_a_reconnecting_client_takes_over_its_old_connection(mqtt_factory: object) -> None:
    mqtt: MqttInstance = await mqtt_factory(max_connections=1)  # type: ignore[operator]
    dev = await mqtt.device("d", token="takeover")
    other = await mqtt.device("e", token="same-client-id")
    from isthmus.sources.mqtt_codec import Will

    old = await mqtt.raw()
    assert await old.connect(5, dev.token, client_id="esp32", will=Will(TELEMETRY, b'{"online": 0}')) == 0
    # Another device with the same client id does not evict it (and the server is full).
    stranger = await mqtt.raw()
    assert await stranger.connect(5, other.token, client_id="esp32") == 0x97
    # The same device does, even at the connection limit: the old one gets 0x8E and its will.
    new = await mqtt.raw()
    assert await new.connect(5, dev.token, client_id="esp32") == 0
    assert await old.closed_by_server() == [(DISCONNECT, b"\x8e")]
    (will,) = await mqtt.wait_records(dev.uid, 1)
    assert will.frame.meta.get("will") is True
    await new.send(encode_publish(TELEMETRY, b'{"online": 1}', 1, 1, version=5))
    assert await new.ack() == (PUBACK, 1, 0)
