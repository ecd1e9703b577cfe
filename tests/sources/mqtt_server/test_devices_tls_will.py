"""Generic topic patterns, TLS and X.509 authentication, will messages, shutdown, option validation."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from isthmus.config import SourceConfig, load_config
from isthmus.errors import ConfigError
from isthmus.message import Status
from isthmus.runtime.supervisor import Runtime
from isthmus.sources.mqtt_codec import Will, encode_disconnect, encode_publish

if TYPE_CHECKING:
    from conftest import Certs, MqttFactory, MqttInstance, PahoDevice

PUBACK, DISCONNECT = 4, 14
TELEMETRY = "v1/devices/me/telemetry"
UP = {"pattern": "devices/{device}/up", "policy": "accept"}


# --------------------------------------------------------------------------- generic patterns


async def test_a_pattern_topic_auto_creates_its_device(mqtt_factory: MqttFactory) -> None:
    mqtt = await mqtt_factory(allow_anonymous=True, topics=[UP])
    client = await mqtt.raw()
    assert await client.connect(5, None) == 0
    await client.send(encode_publish("devices/pebble-7/up", b'{"level": 3}', 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0)
    (device,) = await asyncio.to_thread(mqtt.rt.store.list_physical, source="mqtt")
    assert device.source_ids == {"device": "pebble-7"} and device.enabled
    (record,) = await mqtt.records(device.uid)
    assert record.status is Status.OK and record.frame.meta == {"topic": "devices/pebble-7/up", "qos": 1}
    # A topic no pattern matches (the ThingsBoard ones included) is refused for anonymous clients.
    await client.send(encode_publish(TELEMETRY, b'{"a": 1}', 1, 2, version=5))
    assert await client.ack() == (PUBACK, 2, 0x90)


async def test_pattern_order_kind_decoder_and_reject_policy(mqtt_factory: MqttFactory) -> None:
    mqtt = await mqtt_factory(
        allow_anonymous=True,
        topics=[
            {"pattern": "site/{site}/{device}/attrs", "kind": "attributes", "policy": "accept"},
            {"pattern": "site/{site}/{device}/raw", "decoder": "no-such-decoder", "policy": "accept"},
            {"pattern": "closed/{device}/up", "policy": "reject"},
        ],
    )
    client = await mqtt.raw()
    assert await client.connect(5, None) == 0
    await client.send(encode_publish("site/north/d1/attrs", b'{"fw": "1.0"}', 1, 1, version=5))
    await client.send(encode_publish("site/north/d1/raw", b"\x01\x02", 1, 2, version=5))
    await client.send(encode_publish("closed/d9/up", b"{}", 1, 3, version=5))
    assert await client.ack() == (PUBACK, 1, 0)
    assert await client.ack() == (PUBACK, 2, 0x99)  # journaled, with the unknown decoder as its error
    assert await client.ack() == (PUBACK, 3, 0x87)  # reject policy: unknown device, not journaled
    (device,) = await asyncio.to_thread(mqtt.rt.store.list_physical, source="mqtt")
    assert device.source_ids == {"site": "north", "device": "d1"}
    attrs, raw = await mqtt.records(device.uid)
    assert attrs.frame.kind == "attributes" and attrs.status is Status.OK
    assert raw.status is Status.DECODE_ERROR and "no-such-decoder" in (raw.error or "")
    assert mqtt.metric("isthmus_mqtt_publishes_rejected_total", reason="unknown_device") == 1


async def test_pattern_messages_of_new_devices_keep_arrival_order(mqtt_factory: MqttFactory) -> None:
    mqtt = await mqtt_factory(allow_anonymous=True, topics=[UP])
    client = await mqtt.raw()
    assert await client.connect(4, None) == 0
    sent = [(f"devices/d{i % 5}/up", i % 3, i) for i in range(1, 41)]  # 5 new devices, mixed QoS
    await client.send(b"".join(encode_publish(t, b'{"i": %d}' % i, q, i if q else 0, version=4) for t, q, i in sent))
    acks = [await client.ack() for _, q, _ in sent if q]
    assert [a[1] for a in acks] == [i for _, q, i in sent if q]
    records = await mqtt.wait_records(None, len(sent))
    assert [r.frame.payload for r in records] == [b'{"i": %d}' % i for _, _, i in sent]


async def test_anonymous_clients_are_refused_unless_allowed(mqtt_factory: MqttFactory) -> None:
    mqtt = await mqtt_factory(topics=[UP])  # patterns, but allow_anonymous is false
    client = await mqtt.raw()
    assert await client.connect(5, None) == 0x86
    client = await mqtt.raw()
    assert await client.connect(4, None) == 4


async def test_token_devices_cannot_publish_on_pattern_topics(mqtt_factory: MqttFactory) -> None:
    mqtt = await mqtt_factory(allow_anonymous=True, topics=[UP])
    dev = await mqtt.device("d", token="tok")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token) == 0
    await client.send(encode_publish("devices/someone-else/up", b"{}", 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0x90)


# --------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("version", [4, 5])
async def test_tls_listener_with_paho(
    mqtt_factory: MqttFactory, certs: Certs, paho_device: type[PahoDevice], version: int
) -> None:
    mqtt = await mqtt_factory(tls_port=0, cert_file=str(certs.server_cert), key_file=str(certs.server_key))
    dev = await mqtt.device("secure", token=f"tls-{version}")
    client = paho_device(mqtt.tls_port, version, dev.token, context=certs.client_context())
    assert await asyncio.to_thread(client.connect) == 0
    try:
        assert await asyncio.to_thread(client.publish, TELEMETRY, b'{"secure": true}', 1) == 0
    finally:
        await asyncio.to_thread(client.close)
    (record,) = await mqtt.records(dev.uid)
    assert record.status is Status.OK
    # The plain listener runs alongside.
    await mqtt.works(dev.token)


async def test_x509_client_certificate_authenticates_by_fingerprint(mqtt_factory: MqttFactory, certs: Certs) -> None:
    mqtt = await mqtt_factory(
        tls_port=0,
        cert_file=str(certs.server_cert),
        key_file=str(certs.server_key),
        ca_file=str(certs.ca),
        client_cert="optional",
    )
    fingerprint = certs.fingerprint(certs.client_cert)
    dev = await mqtt.device("x509", source_name="mqtt", source_ids={"cert_sha256": fingerprint})
    client = await mqtt.raw(tls=certs.client_context(certs.client_cert, certs.client_key))
    assert await client.connect(5, None) == 0  # no user name: the certificate is the credential
    await client.send(encode_publish(TELEMETRY, b'{"by": "cert"}', 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0)
    (record,) = await mqtt.records(dev.uid)
    assert record.frame.payload == b'{"by": "cert"}'
    # A certificate signed by the CA but not registered is refused, whatever the user name says.
    other = await mqtt.raw(tls=certs.client_context(certs.other_cert, certs.other_key))
    token_dev = await mqtt.device("tok", token="also-valid")
    assert await other.connect(4, token_dev.token) == 5
    # Without a certificate (client_cert = optional) the token is used.
    plain = await mqtt.raw(tls=certs.client_context())
    assert await plain.connect(5, token_dev.token) == 0


async def test_required_client_certificate_fails_the_handshake_without_one(
    mqtt_factory: MqttFactory, certs: Certs
) -> None:
    mqtt = await mqtt_factory(
        tls_port=0,
        cert_file=str(certs.server_cert),
        key_file=str(certs.server_key),
        ca_file=str(certs.ca),
        client_cert="required",
    )
    dev = await mqtt.device("d", token="needs-cert")

    async def attempt() -> int:
        client = await mqtt.raw(tls=certs.client_context())  # TLS 1.3: the alert may come after the handshake
        return await client.connect(5, dev.token)

    with pytest.raises((ssl.SSLError, ConnectionResetError, EOFError)):
        await attempt()


# --------------------------------------------------------------------------- will messages


def _will(topic: str = "v1/devices/me/attributes", payload: bytes = b'{"online": false}') -> Will:
    return Will(topic, payload)


async def test_will_is_journaled_when_the_connection_drops(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="will")
    client = await mqtt.raw()
    assert await client.connect(4, dev.token, will=_will()) == 0
    client.writer.transport.abort()  # no DISCONNECT
    (record,) = await mqtt.wait_records(dev.uid, 1)
    assert record.frame.kind == "attributes" and record.frame.payload == b'{"online": false}'
    assert record.frame.meta == {"topic": "v1/devices/me/attributes", "qos": 0, "will": True}
    assert record.status is Status.OK


async def test_will_is_journaled_on_keepalive_expiry_and_on_disconnect_with_will(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="will2")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token, keepalive=1, will=_will(TELEMETRY, b'{"gone": 1}')) == 0
    await client.closed_by_server()
    client = await mqtt.raw()
    assert await client.connect(5, dev.token, will=_will(TELEMETRY, b'{"gone": 2}')) == 0
    await client.send(encode_disconnect(0x04, 5))  # "disconnect with will message"
    records = await mqtt.wait_records(dev.uid, 2)
    assert sorted(r.frame.payload for r in records) == [b'{"gone": 1}', b'{"gone": 2}']


async def test_no_will_after_a_normal_disconnect(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="no-will")
    client = await mqtt.raw()
    assert await client.connect(5, dev.token, will=_will()) == 0
    await client.send(encode_publish(TELEMETRY, b'{"last": 1}', 0, 0, version=5) + encode_disconnect(0, 5))
    assert await client.closed_by_server() == []
    (record,) = await mqtt.wait_records(dev.uid, 1)  # the QoS 0 message sent just before DISCONNECT
    assert record.frame.payload == b'{"last": 1}'
    await asyncio.sleep(0.2)
    assert len(await mqtt.records(dev.uid)) == 1


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
async def test_mosquitto_pub_qos0_publish_then_disconnect_is_not_lost(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="mosq-q0")
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt.port), "-u", dev.token,
        "-t", TELEMETRY, "-m", '{"q": 0}', "-q", "0",
    )  # fmt: skip
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    (record,) = await mqtt.wait_records(dev.uid, 1)
    assert record.frame.payload == b'{"q": 0}'


# --------------------------------------------------------------------------- lifecycle and options


async def test_stop_disconnects_clients_with_0x8b_and_releases_the_ports(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("d", token="stop")
    v5 = await mqtt.raw()
    assert await v5.connect(5, dev.token) == 0
    v4 = await mqtt.raw()
    assert await v4.connect(4, dev.token, client_id="v4") == 0
    idle = await mqtt.raw()  # never sends CONNECT
    port = mqtt.port
    await mqtt.stop()
    assert await v5.closed_by_server() == [(DISCONNECT, b"\x8b")]
    assert await v4.closed_by_server() == []
    assert await idle.closed_by_server() == []
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tls_port": 8883}, "tls_port needs cert_file and key_file"),
        ({"allow_anonymous": True}, "allow_anonymous needs topics"),
        ({"topics": [{"pattern": "devices/+/up"}]}, "without wildcards"),
        ({"topics": [{"pattern": "devices/up"}]}, "no placeholder"),
        ({"topics": [{"pattern": "devices/x{device}/up"}]}, "whole topic level"),
        ({"topics": [{"pattern": "a/{d}/{d}"}]}, "twice"),
        ({"client_cert": "required"}, "client_cert needs tls_port and ca_file"),
        ({"port": None}, "no listener"),
        ({"rate": {"burst": 0}}, "rate.burst"),
        ({"colour": "red"}, "colour: unknown key"),
    ],
)
def test_invalid_options_are_config_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    config = load_config(None, {"ISTHMUS_DATA_DIR": str(tmp_path)})
    config = config.model_copy(update={"sources": [SourceConfig(name="mqtt", type="mqtt", options=options)]})
    with pytest.raises(ConfigError, match=message):
        Runtime(config)


def test_unreadable_certificates_are_config_errors(tmp_path: Path) -> None:
    config = load_config(None, {"ISTHMUS_DATA_DIR": str(tmp_path)})
    options = {"tls_port": 8883, "cert_file": str(tmp_path / "missing.pem"), "key_file": str(tmp_path / "k.pem")}
    config = config.model_copy(update={"sources": [SourceConfig(name="mqtt", type="mqtt", options=options)]})
    with pytest.raises(ConfigError, match="cannot load certificates"):
        Runtime(config)


async def test_default_policy_quarantines_new_devices(mqtt_factory: MqttFactory) -> None:
    mqtt = await mqtt_factory(allow_anonymous=True, topics=[{"pattern": "q/{device}"}])
    client = await mqtt.raw()
    assert await client.connect(5, None) == 0
    await client.send(encode_publish("q/newcomer", b'{"t": 1}', 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0)  # kept, so acknowledged; held back from sinks
    (device,) = await asyncio.to_thread(mqtt.rt.store.list_physical, source="mqtt")
    assert not device.enabled
    (record,) = await mqtt.records(device.uid)
    assert record.status is Status.QUARANTINED


async def test_two_mqtt_sources_share_the_instance_metrics(tmp_path: Path) -> None:
    config = load_config(None, {"ISTHMUS_DATA_DIR": str(tmp_path)})
    sources = [
        SourceConfig(name=name, type="mqtt", options={"host": "127.0.0.1", "port": 0})
        for name in ("plant-a", "plant-b")
    ]
    rt = Runtime(config.model_copy(update={"sources": sources}))
    await rt.start()
    try:
        servers = [rt.sources["plant-a"], rt.sources["plant-b"]]
        async with asyncio.timeout(5):
            while not all(getattr(s, "bound", None) for s in servers):
                await asyncio.sleep(0.01)
        for server in servers:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.bound["tcp"])  # type: ignore[attr-defined]
            writer.write(b"\xff\x00")  # garbage
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        for name in ("plant-a", "plant-b"):
            labels = {"source": name, "reason": "malformed_packet"}
            value = rt.metrics.registry.get_sample_value("isthmus_mqtt_protocol_errors_total", labels)
            assert value == 1
    finally:
        await rt.stop()
