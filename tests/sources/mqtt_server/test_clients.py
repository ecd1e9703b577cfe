"""Real MQTT clients against the server: paho-mqtt (3.1.1 and 5), mosquitto_pub, tb-mqtt-client."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from typing import TYPE_CHECKING

import msgspec
import pytest

from isthmus.message import Status

if TYPE_CHECKING:
    from conftest import MqttInstance, PahoDevice

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:tb_device_mqtt")

TOPICS = [
    ("v1/devices/me/telemetry", "telemetry"),
    ("v2/t", "telemetry"),
    ("v1/devices/me/attributes", "attributes"),
    ("v2/a", "attributes"),
]


@pytest.mark.parametrize("version", [4, 5])
async def test_paho_publishes_every_topic_and_qos_and_each_is_journaled_and_decoded(
    mqtt: MqttInstance, paho_device: type[PahoDevice], version: int
) -> None:
    dev = await mqtt.device("pump", token=f"pump-token-v{version}")
    client = paho_device(mqtt.port, version, dev.token)
    assert await asyncio.to_thread(client.connect) == 0
    sent = []
    try:
        for topic, kind in TOPICS:
            for qos in (0, 1, 2):
                payload = msgspec.json.encode({f"{kind}_{qos}": qos + 1, "topic_len": len(topic)})
                reason = await asyncio.to_thread(client.publish, topic, payload, qos)
                assert reason == 0
                sent.append((topic, kind, qos, payload))
    finally:
        await asyncio.to_thread(client.close)
    records = await mqtt.wait_records(dev.uid, len(sent))
    assert len(records) == len(sent)
    for record, (topic, kind, qos, payload) in zip(records, sent, strict=True):
        assert record.status is Status.OK, record.error
        assert record.frame.source == "mqtt"
        assert record.frame.kind == kind
        assert record.frame.payload == payload
        assert record.frame.meta == {"topic": topic, "qos": qos}
        assert record.message is not None
        assert {p.name: p.value for p in record.message.timeseries} == msgspec.json.decode(payload)
    assert mqtt.metric("isthmus_mqtt_connects_total", result="accepted") == 1
    # The connection is gone: the gauge is back to 0 and the close was the client's.
    async with asyncio.timeout(5):
        while mqtt.metric("isthmus_mqtt_disconnects_total", reason="client") != 1:
            await asyncio.sleep(0.02)
    assert mqtt.metric("isthmus_mqtt_connections") == 0


@pytest.mark.parametrize(("version", "token", "expected"), [(4, "nope", 0x87), (5, "nope", 0x87), (4, None, 0x86)])
async def test_paho_is_refused_with_a_bad_or_missing_token(
    mqtt: MqttInstance, paho_device: type[PahoDevice], version: int, token: str | None, expected: int
) -> None:
    client = paho_device(mqtt.port, version, token)
    try:
        # paho reports 3.1.1 return codes 5 / 4 as the MQTT 5 codes 0x87 / 0x86.
        assert await asyncio.to_thread(client.connect) == expected
    finally:
        await asyncio.to_thread(client.close)


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
@pytest.mark.parametrize("protocol", ["mqttv311", "mqttv5"])
async def test_mosquitto_pub_qos1(mqtt: MqttInstance, protocol: str) -> None:
    dev = await mqtt.device("mosq", token=f"mosquitto-{protocol}")
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt.port), "-V", protocol, "-u", dev.token,
        "-t", "v1/devices/me/telemetry", "-m", '{"t":1}', "-q", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err
    # mosquitto_pub exits only after the PUBACK, so the record is already durable.
    (record,) = await mqtt.records(dev.uid)
    assert record.status is Status.OK and record.frame.payload == b'{"t":1}'


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
async def test_mosquitto_pub_with_a_bad_token_fails(mqtt: MqttInstance) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt.port), "-u", "wrong",
        "-t", "v1/devices/me/telemetry", "-m", "{}", "-q", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode != 0
    assert b"not authori" in err.lower()


@pytest.mark.skipif(importlib.util.find_spec("tb_device_mqtt") is None, reason="tb-mqtt-client not installed")
async def test_thingsboard_sdk_client_sends_telemetry_and_attributes(mqtt: MqttInstance) -> None:
    from tb_device_mqtt import TBDeviceMqttClient

    dev = await mqtt.device("tb", token="tb-sdk-token")
    client = TBDeviceMqttClient("127.0.0.1", port=mqtt.port, username=dev.token)

    def session() -> tuple[int, int]:
        client.connect(keepalive=30)
        try:
            telemetry = client.send_telemetry({"temperature": 21.5}).get()
            attributes = client.send_attributes({"firmware": "1.2.3"}).get()
            return telemetry, attributes
        finally:
            client.disconnect()
            client.stop()

    assert await asyncio.to_thread(session) == (0, 0)
    records = await mqtt.wait_records(dev.uid, 2)
    by_kind = {r.frame.kind: r for r in records}
    assert by_kind.keys() == {"telemetry", "attributes"}
    telemetry, attributes = by_kind["telemetry"].message, by_kind["attributes"].message
    assert telemetry is not None and attributes is not None
    assert [(p.name, p.value) for p in telemetry.timeseries] == [("temperature", 21.5)]
    assert [(p.name, p.value) for p in attributes.timeseries] == [("firmware", "1.2.3")]
