"""The way back to HTTP devices: long polls for attribute updates and RPC, RPC answers, client RPC."""

from __future__ import annotations

import asyncio
from typing import Any


async def _online(instance: Any, uid: int) -> None:
    async def online() -> bool:
        r = await instance.admin.get(f"/mgmt/physical/{uid}/state")
        return bool(r.json()["online"])

    await instance.wait_for(online)


async def test_long_poll_gets_the_next_shared_attribute_update(instance: Any) -> None:
    dev = await instance.device("poller")
    poll = asyncio.create_task(instance.http.get(f"/api/v1/{dev['token']}/attributes/updates?timeout=10000"))
    await _online(instance, dev["uid"])
    r = await instance.admin.put(f"/mgmt/physical/{dev['uid']}/attributes", json={"interval": 60})
    assert r.status_code == 200
    answer = await poll
    assert (answer.status_code, answer.json()) == (200, {"interval": 60})
    r = await instance.admin.get(f"/mgmt/physical/{dev['uid']}/state")
    assert r.json()["online"] is False  # the poll is over


async def test_server_side_rpc_round_trip_over_http(instance: Any) -> None:
    dev = await instance.device("valve")
    token = dev["token"]
    poll = asyncio.create_task(instance.http.get(f"/api/v1/{token}/rpc?timeout=10000"))
    await _online(instance, dev["uid"])
    call = asyncio.create_task(
        instance.admin.post(f"/mgmt/physical/{dev['uid']}/rpc", json={"method": "open", "params": {"pct": 40}})
    )
    request = (await poll).json()
    assert request["method"] == "open" and request["params"] == {"pct": 40}
    r = await instance.http.post(f"/api/v1/{token}/rpc/{request['id']}", json={"opened": True})
    assert r.status_code == 200
    assert (await call).json() == {"response": {"opened": True}}
    # Nobody waits for this one any more.
    r = await instance.http.post(f"/api/v1/{token}/rpc/{request['id']}", json={"again": True})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


async def test_a_poll_times_out_with_408_and_bad_requests_are_named(instance: Any) -> None:
    dev = await instance.device("quiet")
    token = dev["token"]
    r = await instance.http.get(f"/api/v1/{token}/rpc?timeout=100")
    assert (r.status_code, r.json()["error"]["code"]) == (408, "timeout")
    r = await instance.http.get(f"/api/v1/{token}/rpc?timeout=soon")
    assert r.status_code == 400 and "milliseconds" in r.json()["error"]["message"]
    r = await instance.http.get("/api/v1/no-such-token/attributes/updates?timeout=100")
    assert r.status_code == 401
    r = await instance.http.put(f"/api/v1/{token}/rpc")
    assert r.status_code == 405
    # No poll waiting: an RPC finds the device unreachable.
    r = await instance.admin.post(f"/mgmt/physical/{dev['uid']}/rpc", json={"method": "m", "timeout": 1})
    assert r.status_code == 409


async def test_client_side_rpc_over_http(instance: Any) -> None:
    dev = await instance.device("asker")
    token = dev["token"]
    r = await instance.http.post(f"/api/v1/{token}/rpc", json={"method": "getCurrentTime", "params": {}})
    assert r.status_code == 200 and isinstance(r.json()["time"], int)
    r = await instance.http.post(f"/api/v1/{token}/rpc", content=b"[1]", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_request")
    r = await instance.http.post(f"/api/v1/{token}/rpc", json={"method": "reboot"})
    assert "unknown method" in r.json()["error"]
