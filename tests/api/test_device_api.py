"""The ThingsBoard-compatible device HTTP API: good input, every kind of bad input, accounting."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest


async def messages(instance: Any, p_uid: int) -> list[dict[str, Any]]:
    r = await instance.admin.get("/mgmt/messages", params={"p_uid": p_uid, "limit": 1000})
    assert r.status_code == 200, r.text
    result: list[dict[str, Any]] = r.json()
    return result


async def test_telemetry_is_journaled_decoded_mapped_and_stored(instance: Any) -> None:
    dev = await instance.device("tank-7", map_to="Tank 7 level")
    r = await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"temperature": 21.5, "humidity": 60})
    assert r.status_code == 200 and r.content == b""
    (msg,) = await messages(instance, dev["uid"])
    assert msg["status"] == "ok" and msg["l_uid"] == dev["l_uid"]
    assert msg["message"]["timeseries"] == [{"name": "temperature", "value": 21.5}, {"name": "humidity", "value": 60}]
    assert msg["correlation_id"][14] == "7", "correlation ids are UUIDv7"

    async def stored() -> list[dict[str, Any]]:
        r = await instance.admin.get("/mgmt/timeseries", params={"l_uid": dev["l_uid"]})
        points: list[dict[str, Any]] = r.json()
        return points if len(points) == 2 else []

    points = await instance.wait_for(stored)
    assert {p["name"]: p["value"] for p in points} == {"temperature": 21.5, "humidity": 60}
    assert {p["correlation_id"] for p in points} == {msg["correlation_id"]}


async def test_ts_values_shape_sets_the_message_timestamp(instance: Any) -> None:
    dev = await instance.device("d", map_to="L")
    ts = int(time.time() * 1000) - 60_000
    r = await instance.http.post(
        f"/api/v1/{dev['token']}/telemetry",
        json=[{"ts": ts, "values": {"a": 1}}, {"ts": ts + 1000, "values": {"a": 2}}],
    )
    assert r.status_code == 200
    (msg,) = await messages(instance, dev["uid"])
    assert [p["value"] for p in msg["message"]["timeseries"]] == [1, 2]


async def test_unmapped_device_messages_are_kept_and_listed(instance: Any) -> None:
    dev = await instance.device("lonely")
    assert (await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 1})).status_code == 200
    r = await instance.admin.get("/mgmt/messages", params={"unmapped": "true"})
    assert [m["p_uid"] for m in r.json()] == [dev["uid"]]
    r = await instance.admin.get("/mgmt/physical", params={"unmapped": "true"})
    assert [d["uid"] for d in r.json()] == [dev["uid"]]


BAD_BODIES = [
    pytest.param(b'{"temperature": 21.5', "decode_error", "malformed JSON", id="malformed-json"),
    pytest.param(b"42", "decode_error", "must be a JSON object or array", id="not-telemetry-shape"),
    pytest.param(b"", "decode_error", "empty body", id="empty-body"),
    pytest.param(b'{"t": "\xff\xfe"}', "decode_error", "not UTF-8", id="non-utf8"),
    pytest.param(b'{"t": NaN}', "decode_error", "malformed JSON", id="nan"),
    pytest.param(b'{"t": Infinity}', "decode_error", "malformed JSON", id="infinity"),
    pytest.param(b'{"t": 1e999}', "decode_error", "malformed JSON", id="overflow"),
    pytest.param(b'{"ts": 1, "values": [1]}', "decode_error", "values must be an object", id="bad-values"),
]


@pytest.mark.parametrize(("body", "code", "text"), BAD_BODIES)
async def test_bad_bodies_get_400_and_are_journaled(instance: Any, body: bytes, code: str, text: str) -> None:
    dev = await instance.device("d", map_to="L")
    r = await instance.http.post(
        f"/api/v1/{dev['token']}/telemetry", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == code and text in err["message"]
    (msg,) = await messages(instance, dev["uid"])
    assert msg["status"] == "decode_error" and text in msg["error"]
    assert msg["correlation_id"] == err["correlation_id"]
    raw = msg["payload"] if msg["payload_encoding"] == "utf-8" else None
    if raw is not None:
        assert raw.encode() == body, "the raw frame is kept exactly"


async def test_wrong_content_type_is_415_and_journaled(instance: Any) -> None:
    dev = await instance.device("d")
    r = await instance.http.post(
        f"/api/v1/{dev['token']}/telemetry",
        content=b"t=1",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"
    (msg,) = await messages(instance, dev["uid"])
    assert msg["status"] == "decode_error" and "content type" in msg["error"]


async def test_body_over_the_limit_is_413(instance_factory: Any) -> None:
    instance = await instance_factory({"ISTHMUS_HTTP__MAX_PAYLOAD": "1024"})
    dev = await instance.device("d")
    body = b'{"t": "' + b"x" * 2000 + b'"}'
    r = await instance.http.post(f"/api/v1/{dev['token']}/telemetry", content=body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield b"x" * 600

    async with httpx.AsyncClient(base_url=instance.url) as fresh:
        r = await fresh.post(f"/api/v1/{dev['token']}/telemetry", content=chunks())
    assert r.status_code == 413
    ok = await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 1})
    assert ok.status_code == 200
    metrics = (await instance.http.get("/metrics")).text
    assert 'isthmus_frames_rejected_total{reason="too_large",source="http"} 2.0' in metrics


async def test_unknown_and_revoked_tokens_are_401(instance: Any) -> None:
    r = await instance.http.post("/api/v1/no-such-token/telemetry", json={"t": 1})
    assert r.status_code == 401 and r.json() == {
        "error": {"code": "unauthorized", "message": "unknown or revoked device token"}
    }
    dev = await instance.device("d")
    assert (await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 1})).status_code == 200
    r = await instance.admin.patch(f"/mgmt/physical/{dev['uid']}", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False
    assert (await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 1})).status_code == 401
    r = await instance.admin.patch(f"/mgmt/physical/{dev['uid']}", json={"enabled": True, "token": "fresh-token"})
    assert (await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 1})).status_code == 401
    assert (await instance.http.post("/api/v1/fresh-token/telemetry", json={"t": 1})).status_code == 200


async def test_future_timestamp_is_quarantined_not_delivered(instance: Any) -> None:
    dev = await instance.device("d", map_to="L")
    future = int(time.time() * 1000) + 3 * 3600 * 1000
    r = await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"ts": future, "values": {"t": 1}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "quarantined" and "ahead of the server clock" in err["message"]
    (msg,) = await messages(instance, dev["uid"])
    assert msg["status"] == "quarantined" and msg["message"]["timeseries"][0]["value"] == 1
    await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 2})

    async def settled() -> Any:
        sinks = {s["name"]: s for s in (await instance.admin.get("/mgmt/sinks")).json()}
        return sinks["timeseries"] if sinks["timeseries"]["cursor"] == 2 else None

    ts = await instance.wait_for(settled)
    assert (ts["delivered"], ts["skipped"]) == (1, 1)


async def test_future_timestamp_policy_accept(instance_factory: Any) -> None:
    instance = await instance_factory({"ISTHMUS_TIMESTAMPS__ACTION": "accept"})
    dev = await instance.device("d")
    future = int(time.time() * 1000) + 3 * 3600 * 1000
    r = await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"ts": future, "values": {"t": 1}})
    assert r.status_code == 200


async def test_sql_ish_strings_are_just_data(instance: Any) -> None:
    evil = "'; DROP TABLE records; --"
    dev = await instance.device(evil, map_to='Robert"); DROP TABLE timeseries; --')
    r = await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={evil: evil})
    assert r.status_code == 200
    assert (await instance.admin.get(f"/mgmt/physical/{dev['uid']}")).json()["name"] == evil

    async def stored() -> Any:
        pts = (await instance.admin.get("/mgmt/timeseries", params={"l_uid": dev["l_uid"], "name": evil})).json()
        return pts

    (point,) = await instance.wait_for(stored)
    assert point["name"] == evil and point["value"] == evil


async def test_attributes_post_and_get(instance: Any) -> None:
    dev = await instance.device("d")
    token = dev["token"]
    r = await instance.http.post(f"/api/v1/{token}/attributes", json={"fw": "1.4.2", "model": "TH-100"})
    assert r.status_code == 200
    r = await instance.admin.put(f"/mgmt/physical/{dev['uid']}/attributes", json={"interval": 30})
    assert r.status_code == 200

    async def client_attrs() -> Any:
        body = (await instance.http.get(f"/api/v1/{token}/attributes")).json()
        return body if body["client"] else None

    body = await instance.wait_for(client_attrs)
    assert body == {"client": {"fw": "1.4.2", "model": "TH-100"}, "shared": {"interval": 30}}
    r = await instance.http.get(f"/api/v1/{token}/attributes", params={"clientKeys": "fw", "sharedKeys": "interval"})
    assert r.json() == {"client": {"fw": "1.4.2"}, "shared": {"interval": 30}}
    r = await instance.http.get(f"/api/v1/{token}/attributes", params={"sharedKeys": "interval"})
    assert r.json() == {"shared": {"interval": 30}}
    assert (await instance.http.get("/api/v1/nope/attributes")).status_code == 401


async def test_wrong_paths_and_methods(instance: Any) -> None:
    dev = await instance.device("d")
    assert (await instance.http.get(f"/api/v1/{dev['token']}/telemetry")).status_code == 405
    r = await instance.http.post(f"/api/v1/{dev['token']}/rpc-nope", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_server_survives_a_burst_of_garbage(instance: Any) -> None:
    dev = await instance.device("d")
    bodies = [b"\x00\x01\x02", b"[[[[[[[[", b"{" * 10_000, b'{"a":' + b"1" * 5000 + b"}", b"\xff" * 100]
    results = await asyncio.gather(
        *(instance.http.post(f"/api/v1/{dev['token']}/telemetry", content=b) for b in bodies)
    )
    assert all(r.status_code == 400 for r in results), [r.text for r in results]
    assert (await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 1})).status_code == 200
    assert len(await messages(instance, dev["uid"])) == len(bodies) + 1
    assert (await instance.http.get("/health")).status_code == 200
