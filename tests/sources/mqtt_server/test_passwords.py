"""Username + password credentials at CONNECT (ThingsBoard "basic MQTT credentials")."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from isthmus.sources.mqtt_codec import encode_connect

if TYPE_CHECKING:
    from conftest import MqttInstance


async def _connack(mqtt: MqttInstance, version: int, username: str, password: bytes | None) -> int:
    client = await mqtt.raw()
    await client.send(encode_connect("pw", version, username=username, password=password))
    ptype, body = await client.packet()
    assert ptype == 2
    await client.close()
    return body[1]


@pytest.mark.parametrize("version", [4, 5])
async def test_username_and_password_authenticate_the_device(mqtt: MqttInstance, version: int) -> None:
    dev = await mqtt.device(f"pw{version}")
    await asyncio.to_thread(mqtt.rt.store.set_credentials, dev.uid, f"pump-{version}", "s3cret-pass")
    assert await _connack(mqtt, version, f"pump-{version}", b"s3cret-pass") == 0
    assert mqtt.rt.downlink.state(dev.uid).since is not None  # it was online through that connection
    refused = 0x87 if version == 5 else 5
    assert await _connack(mqtt, version, f"pump-{version}", b"wrong") == refused
    assert await _connack(mqtt, version, "nobody", b"s3cret-pass") == refused
    assert await _connack(mqtt, version, "nobody", None) == refused
    # Not UTF-8: a malformed credential, refused as such.
    assert await _connack(mqtt, version, f"pump-{version}", b"\xff\xfe") == (0x86 if version == 5 else 4)


async def test_an_access_token_still_works_with_any_password(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("tok", token="token-with-password")
    assert await _connack(mqtt, 5, dev.token, b"whatever") == 0


async def test_replaced_or_removed_credentials_stop_working(mqtt: MqttInstance) -> None:
    dev = await mqtt.device("rotating")
    await asyncio.to_thread(mqtt.rt.store.set_credentials, dev.uid, "rot", "first-pass")
    assert await _connack(mqtt, 5, "rot", b"first-pass") == 0
    await asyncio.to_thread(mqtt.rt.store.set_credentials, dev.uid, "rot", "second-pass")
    assert await _connack(mqtt, 5, "rot", b"first-pass") == 0x87
    assert await _connack(mqtt, 5, "rot", b"second-pass") == 0
    await asyncio.to_thread(mqtt.rt.store.remove_credentials, dev.uid)
    assert await _connack(mqtt, 5, "rot", b"second-pass") == 0x87
