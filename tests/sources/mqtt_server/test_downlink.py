"""The way back to devices: attribute requests, shared-attribute pushes, RPC both ways, sessions,
online state, and the ThingsBoard gateway API — with tb-mqtt-client and byte-level clients."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest

from isthmus.message import Status
from isthmus.sources.mqtt_codec import encode_connect, encode_puback, encode_publish, encode_subscribe

if TYPE_CHECKING:
    from conftest import MqttInstance, RawClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:tb_device_mqtt")

PUBLISH, PUBACK, SUBACK = 3, 4, 9
RPC_FILTER = "v1/devices/me/rpc/request/+"


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def admin(mqtt: MqttInstance) -> AsyncIterator[httpx.AsyncClient]:
    """The management API of the instance, in process, as the admin."""
    token = (mqtt.rt.config.data_dir / "admin.token").read_text().strip()
    transport = httpx.ASGITransport(app=mqtt.rt.asgi_app())
    async with httpx.AsyncClient(
        transport=transport, base_url="http://isthmus", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ) as client:
        yield client


async def connect(
    client: RawClient, token: str, *, version: int = 5, client_id: str = "dev", clean: bool = True, expiry: int = 0
) -> tuple[bool, int]:
    """CONNECT; ``(session present, reason code)``."""
    props = {"session_expiry_interval": expiry} if version == 5 and expiry else None
    await client.send(encode_connect(client_id, version, clean_start=clean, username=token, properties=props))
    ptype, body = await client.packet()
    assert ptype == 2, (ptype, body)
    return bool(body[0] & 1), body[1]


async def subscribe(client: RawClient, topic_filter: str, qos: int = 1, *, version: int = 5) -> None:
    await client.send(encode_subscribe(1, [(topic_filter, qos)], version))
    ptype, _ = await client.packet()
    assert ptype == SUBACK


def parse_publish(body: bytes, b0: int, version: int = 5) -> tuple[str, int, int, bytes, bool]:
    """``(topic, qos, packet id, payload, dup)`` of a PUBLISH body."""
    qos = (b0 >> 1) & 3
    n = int.from_bytes(body[:2], "big")
    topic = body[2 : 2 + n].decode()
    p = 2 + n
    packet_id = 0
    if qos:
        packet_id = int.from_bytes(body[p : p + 2], "big")
        p += 2
    if version == 5:
        prop_len = body[p]  # short property sections only (the server sends none)
        p += 1 + prop_len
    return topic, qos, packet_id, body[p:], bool(b0 & 8)


async def next_publish(client: RawClient, timeout: float = 5.0, version: int = 5) -> tuple[str, int, int, bytes, bool]:
    """Read packets until a PUBLISH arrives; return it parsed."""
    async with asyncio.timeout(timeout):
        while True:
            b0, body = await client.raw_packet()
            if b0 >> 4 == PUBLISH:
                return parse_publish(body, b0, version)


async def _token(mqtt: MqttInstance, name: str, **extra: Any) -> tuple[int, str]:
    dev = await mqtt.device(name, **extra)
    return dev.uid, dev.token


# --------------------------------------------------------------------------- ThingsBoard SDK


@pytest.mark.skipif(importlib.util.find_spec("tb_device_mqtt") is None, reason="tb-mqtt-client not installed")
async def test_thingsboard_sdk_attribute_request_push_and_rpc_both_ways(mqtt: MqttInstance) -> None:
    from tb_device_mqtt import TBDeviceMqttClient

    uid, token = await _token(mqtt, "tb-rpc", token="tb-rpc-token")
    await mqtt.rt.attributes.set_shared(uid, {"interval": 30, "mode": "eco"})
    client = TBDeviceMqttClient("127.0.0.1", port=mqtt.port, username=token)
    got: dict[str, Any] = {}
    events = {name: threading.Event() for name in ("attributes", "push", "time", "rpc")}

    def on_attributes(result: Any, exc: Any) -> None:
        got["attributes"] = result
        events["attributes"].set()

    def on_push(result: Any, exc: Any) -> None:
        got["push"] = result
        events["push"].set()

    def on_time(request_id: int, result: Any, exc: Any) -> None:
        got["time"] = result
        events["time"].set()

    def on_rpc(request_id: str, body: Any) -> None:
        got["rpc"] = body
        client.send_rpc_reply(request_id, {"echo": body["params"], "ok": True})
        events["rpc"].set()

    client.set_server_side_rpc_request_handler(on_rpc)
    client.subscribe_to_attribute("mode", on_push)
    await asyncio.to_thread(client.connect, keepalive=30)
    try:
        assert await asyncio.to_thread(lambda: client.send_attributes({"firmware": "1.2.3"}).get()) == 0
        # The client attribute reaches the attribute store through the journal.
        async with asyncio.timeout(10):
            while not await mqtt.rt.attributes.get(uid, "client", ["firmware"]):
                await asyncio.sleep(0.05)
        client.request_attributes(client_keys=["firmware"], shared_keys=["interval"], callback=on_attributes)
        assert await asyncio.to_thread(events["attributes"].wait, 10)
        assert got["attributes"] == {"client": {"firmware": "1.2.3"}, "shared": {"interval": 30}}

        client.send_rpc_call("getCurrentTime", {}, on_time)
        assert await asyncio.to_thread(events["time"].wait, 10)
        assert isinstance(got["time"]["time"], int)

        async with admin(mqtt) as api:
            r = await api.put(f"/mgmt/physical/{uid}/attributes", json={"mode": "turbo"})
            assert r.status_code == 200, r.text
            assert await asyncio.to_thread(events["push"].wait, 10)
            assert got["push"] == {"mode": "turbo"}

            r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "setValve", "params": {"open": 1}})
            assert r.status_code == 200, r.text
            assert r.json() == {"response": {"echo": {"open": 1}, "ok": True}}
            assert got["rpc"] == {"method": "setValve", "params": {"open": 1}}
    finally:
        await asyncio.to_thread(client.disconnect)
        client.stop()


# --------------------------------------------------------------------------- attribute requests


async def test_attribute_request_answers_the_scopes_asked_for_and_bad_requests_get_an_error(
    mqtt: MqttInstance,
) -> None:
    uid, token = await _token(mqtt, "attr")
    await mqtt.rt.attributes.set_shared(uid, {"a": 1, "b": [2, 3]})
    client = await mqtt.raw()
    assert await connect(client, token) == (False, 0)
    await subscribe(client, "v1/devices/me/attributes/response/+")

    await client.send(
        encode_publish("v1/devices/me/attributes/request/7", b'{"sharedKeys": "b,missing"}', 1, 1, version=5)
    )
    topic, _, packet_id, payload, _ = await next_publish(client)
    assert topic == "v1/devices/me/attributes/response/7"
    assert msgspec.json.decode(payload) == {"shared": {"b": [2, 3]}}
    await client.send(encode_puback(packet_id, 5))

    await client.send(encode_publish("v1/devices/me/attributes/request/8", b"", 0, 0, version=5))
    topic, _, packet_id, payload, _ = await next_publish(client)
    assert (topic, msgspec.json.decode(payload)) == (
        "v1/devices/me/attributes/response/8",
        {"client": {}, "shared": {"a": 1, "b": [2, 3]}},
    )
    await client.send(encode_puback(packet_id, 5))

    await client.send(encode_publish("v1/devices/me/attributes/request/9", b"{not json", 0, 0, version=5))
    topic, _, _, payload, _ = await next_publish(client)
    assert topic == "v1/devices/me/attributes/response/9"
    assert "bad attribute request" in msgspec.json.decode(payload)["error"]
    # Requests are not data: nothing was journaled.
    assert await mqtt.records(uid) == []


# --------------------------------------------------------------------------- RPC


async def test_rpc_to_an_unreachable_device_is_409_and_an_unanswered_one_is_504(mqtt: MqttInstance) -> None:
    uid, token = await _token(mqtt, "rpc")
    async with admin(mqtt) as api:
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "m"})
        assert (r.status_code, r.json()["error"]["code"]) == (409, "device_unreachable")
        r = await api.post("/mgmt/physical/99999/rpc", json={"method": "m"})
        assert r.status_code == 404
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"params": {}})
        assert r.status_code == 422  # no method: the API's validation error

        client = await mqtt.raw()
        assert await connect(client, token) == (False, 0)
        # Connected but not subscribed to RPC requests: still unreachable.
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "m"})
        assert r.status_code == 409
        await subscribe(client, RPC_FILTER)
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "slow", "timeout": 0.3})
        assert (r.status_code, r.json()["error"]["code"]) == (504, "device_timeout")
        topic, qos, _, payload, _ = await next_publish(client)
        assert topic.startswith("v1/devices/me/rpc/request/") and qos == 1
        assert msgspec.json.decode(payload) == {"method": "slow", "params": {}}
        # The late answer is ignored (and counted), the connection lives on.
        await client.send(encode_publish(topic.replace("request", "response"), b'{"late": true}', 0, 0, version=5))
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "ping", "oneway": True})
        assert r.json() == {"response": None}
        assert (await next_publish(client))[0].startswith("v1/devices/me/rpc/request/")
        assert mqtt.metric("isthmus_mqtt_requests_total", kind="rpc_response_unmatched") == 1


async def test_a_non_json_rpc_response_is_returned_as_text(mqtt: MqttInstance) -> None:
    uid, token = await _token(mqtt, "rpc-text")
    client = await mqtt.raw()
    assert await connect(client, token, version=4) == (False, 0)
    await subscribe(client, RPC_FILTER, version=4)

    async def answer() -> None:
        topic, _, packet_id, _, _ = await next_publish(client, version=4)
        await client.send(encode_puback(packet_id, 4))
        await client.send(encode_publish(topic.replace("request", "response"), b"done", 0, 0, version=4))

    task = asyncio.create_task(answer())
    async with admin(mqtt) as api:
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "run"})
    await task
    assert r.json() == {"response": "done"}


async def test_client_side_rpc_unknown_method_and_bad_request_get_errors(mqtt: MqttInstance) -> None:
    _, token = await _token(mqtt, "client-rpc")
    client = await mqtt.raw()
    assert await connect(client, token) == (False, 0)
    await subscribe(client, "v1/devices/me/rpc/response/+")
    await client.send(
        encode_publish("v1/devices/me/rpc/request/1", b'{"method": "reboot", "params": {}}', 0, 0, version=5)
    )
    topic, _, packet_id, payload, _ = await next_publish(client)
    assert topic == "v1/devices/me/rpc/response/1"
    assert "unknown method 'reboot'" in msgspec.json.decode(payload)["error"]
    await client.send(encode_puback(packet_id, 5))
    await client.send(encode_publish("v1/devices/me/rpc/request/2", b"[1]", 0, 0, version=5))
    _, _, packet_id, payload, _ = await next_publish(client)
    assert "bad RPC request" in msgspec.json.decode(payload)["error"]
    await client.send(encode_puback(packet_id, 5))
    await client.send(encode_publish("v1/devices/me/rpc/request/3", b'{"method": "getSessionLimits"}', 0, 0, version=5))
    _, _, _, payload, _ = await next_publish(client)
    assert msgspec.json.decode(payload)["maxPayloadSize"] == mqtt.server.options.max_packet_size


# --------------------------------------------------------------------------- sessions and online state


@pytest.mark.parametrize("version", [4, 5])
async def test_persistent_session_keeps_subscriptions_and_queues_rpc_while_offline(
    mqtt: MqttInstance, version: int
) -> None:
    uid, token = await _token(mqtt, f"persistent{version}")
    client = await mqtt.raw()
    assert await connect(client, token, version=version, client_id="p", clean=False, expiry=600) == (False, 0)
    await subscribe(client, RPC_FILTER, version=version)
    assert mqtt.rt.downlink.state(uid).online
    await client.close()
    async with asyncio.timeout(5):
        while mqtt.rt.downlink.state(uid).online:
            await asyncio.sleep(0.01)
    state = mqtt.rt.downlink.state(uid)
    assert (state.online, state.links) == (False, 1)

    async with admin(mqtt) as api:
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "queued", "oneway": True})
        assert r.status_code == 200, r.text
        r = await api.get(f"/mgmt/physical/{uid}/state")
        assert r.json()["online"] is False and r.json()["links"] == 1

    again = await mqtt.raw()
    assert await connect(again, token, version=version, client_id="p", clean=False, expiry=600) == (True, 0)
    topic, qos, _, payload, _ = await next_publish(again, version=version)
    assert topic.startswith("v1/devices/me/rpc/request/") and qos == 1
    assert msgspec.json.decode(payload)["method"] == "queued"
    assert mqtt.rt.downlink.state(uid).online

    # A clean session discards the old one.
    await again.close()
    fresh = await mqtt.raw()
    assert await connect(fresh, token, version=version, client_id="p", clean=True) == (False, 0)
    await fresh.close()
    async with asyncio.timeout(5):
        while mqtt.rt.downlink.state(uid).links:
            await asyncio.sleep(0.01)


async def test_unacknowledged_message_is_resent_with_dup_after_reconnect(mqtt: MqttInstance) -> None:
    uid, token = await _token(mqtt, "dup")
    client = await mqtt.raw()
    await connect(client, token, client_id="d", clean=False, expiry=600)
    await subscribe(client, RPC_FILTER)
    async with admin(mqtt) as api:
        await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "once", "oneway": True})
    topic, _, packet_id, _, dup = await next_publish(client)
    assert not dup
    await client.close()  # never acknowledged
    again = await mqtt.raw()
    assert await connect(again, token, client_id="d", clean=False, expiry=600) == (True, 0)
    topic2, _, packet_id2, _, dup2 = await next_publish(again)
    assert (topic2, packet_id2, dup2) == (topic, packet_id, True)
    await again.send(encode_puback(packet_id2, 5))
    session = mqtt.server.session_state[(uid, "d")]
    async with asyncio.timeout(5):
        while session.inflight:
            await asyncio.sleep(0.01)


async def test_session_expires_after_session_expiry_and_the_device_is_unreachable(mqtt_factory: Any) -> None:
    mqtt: MqttInstance = await mqtt_factory(session_expiry=1)
    uid, token = await _token(mqtt, "expiring")
    client = await mqtt.raw()
    # MQTT 5 asks for an hour; the server caps it to 1 s and says so in CONNACK.
    assert await connect(client, token, client_id="e", clean=False, expiry=3600) == (False, 0)
    await subscribe(client, RPC_FILTER)
    await client.close()
    async with asyncio.timeout(5):
        while mqtt.rt.downlink.state(uid).links:
            await asyncio.sleep(0.05)
    async with admin(mqtt) as api:
        r = await api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "m", "oneway": True})
        assert r.status_code == 409
    again = await mqtt.raw()
    assert await connect(again, token, client_id="e", clean=False, expiry=3600) == (False, 0)


async def test_online_state_follows_connections(mqtt: MqttInstance) -> None:
    uid, token = await _token(mqtt, "online")
    async with admin(mqtt) as api:
        assert (await api.get(f"/mgmt/physical/{uid}/state")).json()["online"] is False
        client = await mqtt.raw()
        await connect(client, token, client_id="o")
        body = (await api.get(f"/mgmt/physical/{uid}/state")).json()
        assert body["online"] is True and body["since"] is not None and body["last_seen"] is not None
        assert mqtt.rt.metrics.registry.get_sample_value("isthmus_devices_online") == 1
        await client.close()
        async with asyncio.timeout(5):
            while (await api.get(f"/mgmt/physical/{uid}/state")).json()["online"]:
                await asyncio.sleep(0.02)
        assert mqtt.rt.metrics.registry.get_sample_value("isthmus_devices_online") == 0


# --------------------------------------------------------------------------- gateway API


async def test_gateway_telemetry_becomes_one_frame_per_device(mqtt: MqttInstance) -> None:
    gw_uid, token = await _token(mqtt, "gw", properties={"gateway": True})
    client = await mqtt.raw()
    assert await connect(client, token) == (False, 0)
    payload = b'{"Pump A": [{"ts": 1700000000000, "values": {"flow": 3.5}}], "Pump B": {"flow": 1}}'
    await client.send(encode_publish("v1/gateway/telemetry", payload, 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0)
    await client.send(encode_publish("v1/gateway/attributes", b'{"Pump A": {"model": "X1"}}', 1, 2, version=5))
    assert await client.ack() == (PUBACK, 2, 0)
    records = await mqtt.records()
    by_device = {(r.p_uid, r.frame.kind): r for r in records}
    devices = {d.name: d for d in await asyncio.to_thread(mqtt.rt.store.list_physical, source="mqtt")}
    a, b = devices["Pump A"], devices["Pump B"]
    assert a.source_ids == {"device": "Pump A"} and a.enabled
    rec = by_device[(a.uid, "telemetry")]
    assert rec.status is Status.OK and rec.frame.meta["gateway"] == "gw"
    assert [(p.name, p.value) for p in rec.message.timeseries] == [("flow", 3.5)]  # type: ignore[union-attr]
    assert by_device[(b.uid, "telemetry")].status is Status.OK
    assert by_device[(a.uid, "attributes")].status is Status.OK
    assert mqtt.rt.downlink.state(a.uid).online

    # A part with an unusable device name is kept as the gateway's frame, with the error.
    await client.send(encode_publish("v1/gateway/telemetry", b'{"": {"x": 1}, "Pump B": {"flow": 2}}', 1, 4, version=5))
    assert await client.ack() == (PUBACK, 4, 0x99)
    bad_name = (await mqtt.records(gw_uid))[-1]
    assert bad_name.status is Status.DECODE_ERROR and "invalid device name ''" in (bad_name.error or "")
    assert bad_name.frame.payload == b'{"x":1}'
    assert len(await mqtt.records(b.uid)) == 2

    # Not an object of device -> data: journaled whole as the gateway's frame, with the error.
    await client.send(encode_publish("v1/gateway/telemetry", b"[1, 2]", 1, 3, version=5))
    assert await client.ack() == (PUBACK, 3, 0x99)
    bad = (await mqtt.records(gw_uid))[-1]
    assert bad.status is Status.DECODE_ERROR and bad.frame.payload == b"[1, 2]"
    assert "gateway telemetry" in (bad.error or "")


async def test_only_gateway_devices_may_use_the_gateway_topics(mqtt: MqttInstance) -> None:
    _, token = await _token(mqtt, "not-a-gateway")
    client = await mqtt.raw()
    await connect(client, token)
    await client.send(encode_publish("v1/gateway/telemetry", b'{"Other": {"x": 1}}', 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0x90)
    assert await mqtt.records() == []


async def test_gateway_children_get_rpc_attribute_pushes_and_answers(mqtt: MqttInstance) -> None:
    _, token = await _token(mqtt, "gw2", properties={"gateway": True})
    client = await mqtt.raw()
    await connect(client, token)
    await subscribe(client, "v1/gateway/#")
    await client.send(encode_publish("v1/gateway/connect", b'{"device": "Valve 1", "type": "valve"}', 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0)
    async with asyncio.timeout(5):
        while not (devices := await asyncio.to_thread(mqtt.rt.store.list_physical, source="mqtt")):
            await asyncio.sleep(0.02)
    child = next(d for d in devices if d.name == "Valve 1")
    assert mqtt.rt.downlink.state(child.uid).online

    async with admin(mqtt) as api:
        await api.put(f"/mgmt/physical/{child.uid}/attributes", json={"target": 40})
        topic, _, packet_id, payload, _ = await next_publish(client)
        assert topic == "v1/gateway/attributes"
        assert msgspec.json.decode(payload) == {"device": "Valve 1", "data": {"target": 40}}
        await client.send(encode_puback(packet_id, 5))

        call = asyncio.create_task(api.post(f"/mgmt/physical/{child.uid}/rpc", json={"method": "open"}))
        topic, _, packet_id, payload, _ = await next_publish(client)
        request = msgspec.json.decode(payload)
        assert topic == "v1/gateway/rpc" and request["device"] == "Valve 1"
        assert request["data"]["method"] == "open"
        await client.send(encode_puback(packet_id, 5))
        answer = {"device": "Valve 1", "id": request["data"]["id"], "data": {"opened": True}}
        await client.send(encode_publish("v1/gateway/rpc", msgspec.json.encode(answer), 0, 0, version=5))
        r = await call
        assert r.json() == {"response": {"opened": True}}

    request = {"id": 5, "device": "Valve 1", "client": False, "key": "target"}
    await client.send(encode_publish("v1/gateway/attributes/request", msgspec.json.encode(request), 0, 0, version=5))
    topic, _, _, payload, _ = await next_publish(client)
    assert topic == "v1/gateway/attributes/response"
    assert msgspec.json.decode(payload) == {"id": 5, "device": "Valve 1", "value": 40}

    await client.send(encode_publish("v1/gateway/disconnect", b'{"device": "Valve 1"}', 1, 9, version=5))
    assert await client.ack() == (PUBACK, 9, 0)
    async with asyncio.timeout(5):
        while mqtt.rt.downlink.state(child.uid).online:
            await asyncio.sleep(0.02)


async def test_a_takeover_continues_the_persistent_session_and_its_subscriptions(mqtt: MqttInstance) -> None:
    uid, token = await _token(mqtt, "takeover")
    old = await mqtt.raw()
    assert await connect(old, token, client_id="t", clean=False, expiry=600) == (False, 0)
    await subscribe(old, RPC_FILTER)
    # The same client connects again while its old connection is still open (a half-open socket).
    new = await mqtt.raw()
    assert await connect(new, token, client_id="t", clean=False, expiry=600) == (True, 0)
    assert (await old.closed_by_server())[-1][0] == 14  # DISCONNECT 0x8E session taken over
    async with admin(mqtt) as api:
        call = asyncio.create_task(api.post(f"/mgmt/physical/{uid}/rpc", json={"method": "here?"}))
        topic, _, packet_id, _, _ = await next_publish(new)  # no SUBSCRIBE on the new connection
        await new.send(encode_puback(packet_id, 5))
        await new.send(encode_publish(topic.replace("request", "response"), b'"yes"', 0, 0, version=5))
        assert (await call).json() == {"response": "yes"}
    state = mqtt.rt.downlink.state(uid)
    assert (state.online, state.links) == (True, 1)


async def test_a_gateway_publish_whose_devices_are_all_refused_is_still_acknowledged(mqtt_factory: Any) -> None:
    mqtt: MqttInstance = await mqtt_factory(gateway_policy="reject")
    _, token = await _token(mqtt, "strict-gw", properties={"gateway": True})
    client = await mqtt.raw()
    await connect(client, token)
    await client.send(encode_publish("v1/gateway/telemetry", b'{"Stranger": {"x": 1}}', 1, 1, version=5))
    assert await client.ack() == (PUBACK, 1, 0)
    assert await mqtt.records() == []
    assert mqtt.metric("isthmus_mqtt_publishes_rejected_total", reason="unknown_device") == 1
