"""Devices from topics and payloads, auto-creation policies, both protocol versions (real mosquitto).

Fixtures (``broker``, ``kit``, ``publishers``) come from this directory's conftest.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from isthmus.message import Point, Status

PEBBLE = [{"filter": "pebble/+/data", "device": "pebble/{device}/data"}]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_device_from_topic_is_auto_created_and_its_frame_journaled(broker: Any, kit: Any, protocol: str) -> None:
    rt = await kit.start([kit.source("pebble", broker.url, PEBBLE, protocol=protocol)])
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    assert kit.sample(rt, "isthmus_mqtt_client_connected", source="pebble") == 1
    extra = ["-D", "publish", "content-type", "application/vnd.pebble+json"] if protocol == "5" else []
    await kit.pub(broker.port, "pebble/node-7/data", {"temperature": 21.5}, version=protocol, extra=extra)

    (record,) = await kit.wait_records(rt, 1)
    (device,) = rt.store.list_physical(source="pebble")
    assert device.source_ids == {"device": "node-7"} and device.name == "node-7"
    assert device.enabled and device.properties == {"auto_created": True}
    assert record.p_uid == device.uid and record.status is Status.OK
    assert record.frame.source == "pebble" and record.frame.kind == "telemetry"
    assert record.frame.payload == b'{"temperature": 21.5}'
    assert record.frame.meta == {"topic": "pebble/node-7/data", "qos": 1, "retain": False}
    expected_type = "application/vnd.pebble+json" if protocol == "5" else "application/json"
    assert record.frame.content_type == expected_type
    assert record.message is not None and record.message.timeseries == [Point("temperature", 21.5)]

    # The same device again (QoS 0 this time): no second device.
    await kit.pub(broker.port, "pebble/node-7/data", {"temperature": 22}, version=protocol, qos=0)
    await kit.wait_records(rt, 2)
    assert len(rt.store.list_physical(source="pebble")) == 1


async def test_device_from_payload_field_and_topics_without_a_device(broker: Any, kit: Any) -> None:
    subs = [
        {"filter": "sites/+/up", "device": "sites/{site}/up", "device_field": "/dev_id"},
        {"filter": "pebble/#", "device": "pebble/{device}/data", "kind": "attributes", "qos": 0},
    ]
    rt = await kit.start([kit.source("pebble", broker.url, subs)])
    await broker.wait_log("Sending SUBACK to isthmus-pebble")

    await kit.pub(broker.port, "sites/farm/up", {"dev_id": "abc", "t": 1})
    await kit.pub(broker.port, "sites/farm/up", {"t": 2})  # no device field: not journaled
    await kit.pub(broker.port, "pebble/node-1/status", {"up": True})  # matches the filter, not the template
    await kit.pub(broker.port, "pebble/node-1/data", {"fw": "1.2"})  # an attribute
    records = await kit.wait_records(rt, 2)

    by_ids = {json.dumps(d.source_ids, sort_keys=True): d for d in rt.store.list_physical(source="pebble")}
    assert set(by_ids) == {'{"dev_id": "abc", "site": "farm"}', '{"device": "node-1"}'}
    by_kind = {r.frame.kind: r for r in records}  # two subscriptions: no order between them
    assert by_kind["telemetry"].frame.payload == b'{"dev_id": "abc", "t": 1}'
    assert by_kind["attributes"].frame.payload == b'{"fw": "1.2"}' and by_kind["attributes"].frame.meta["qos"] == 0

    async def rejected() -> bool:
        return kit.sample(rt, "isthmus_mqtt_client_rejected_total", source="pebble", reason="no_device") == 2

    await kit.wait_for(rejected, what="two messages rejected as no_device")
    assert len(await kit.records(rt)) == 2


async def test_policies_accept_quarantine_reject(broker: Any, kit: Any) -> None:
    def source(name: str, policy: str) -> Any:
        sub = [{"filter": f"{name}/+", "device": f"{name}/{{device}}"}]
        return kit.source(name, broker.url, sub, policy=policy)

    rt = await kit.start([source("acc", "accept"), source("quar", "quarantine"), source("rej", "reject")])
    for name in ("acc", "quar", "rej"):
        await broker.wait_log(f"Sending SUBACK to isthmus-{name}")
    for name in ("acc", "quar", "rej"):
        await kit.pub(broker.port, f"{name}/d1", {"v": 1})

    async def rejected() -> bool:
        return kit.sample(rt, "isthmus_mqtt_client_rejected_total", source="rej", reason="policy") == 1

    await kit.wait_for(rejected, what="the reject policy counted the message")
    records = await kit.wait_records(rt, 2)
    by_source = {r.frame.source: r for r in records}
    assert set(by_source) == {"acc", "quar"}, "reject policy: nothing journaled"
    assert by_source["acc"].status is Status.OK
    assert by_source["quar"].status is Status.QUARANTINED and by_source["quar"].message is not None
    (quarantined,) = rt.store.list_physical(source="quar")
    assert not quarantined.enabled and quarantined.source_ids == {"device": "d1"}
    assert rt.store.list_physical(source="rej") == [], "reject policy: no device created"


async def test_one_subscription_is_journaled_in_order(broker: Any, kit: Any, publishers: Any) -> None:
    rt = await kit.start([kit.source("pebble", broker.url, PEBBLE)])
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)
    for seq in range(200):
        pub.publish(f"pebble/node-{seq % 3}/data", json.dumps({"seq": seq}).encode())
    records = await kit.wait_records(rt, 200)
    assert [json.loads(r.frame.payload)["seq"] for r in records] == list(range(200))
