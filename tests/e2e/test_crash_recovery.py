"""Reliability of the real process: SIGKILL while clients post, then restart.

Every request that got a 200 must be in the journal after the restart, and every journaled record
must reach the timeseries sink exactly once (idempotent writes keyed by l_uid, name, timestamp).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import TYPE_CHECKING

import httpx
import msgspec
import pytest

if TYPE_CHECKING:
    from conftest import Server


async def post_until_killed(
    url: str, token: str, acked: set[int], stop: asyncio.Event, worker: int, base_ms: int
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        i = worker
        while not stop.is_set():
            body = {"ts": base_ms + i, "values": {"seq": i}}
            try:
                r = await client.post(f"/api/v1/{token}/telemetry", json=body)
            except httpx.TransportError:
                return
            if r.status_code == 200:
                acked.add(i)
            i += 8


@pytest.mark.slow
async def test_sigkill_loses_no_acknowledged_request_and_delivers_exactly_once(server: Server) -> None:
    server.start()
    admin = {"Authorization": f"Bearer {server.token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=admin) as c:
        dev = (await c.post("/mgmt/physical", json={"name": "crash", "token": "crash-token"})).json()
        ld = (await c.post("/mgmt/logical", json={"name": "crash-l"})).json()
        await c.post("/mgmt/mappings", json={"p_uid": dev["uid"], "l_uid": ld["uid"]})

    acked: set[int] = set()
    stop = asyncio.Event()
    # One base for all workers, after the mapping started (messages are mapped by their own time);
    # seq i gets timestamp base + i, so every record has its own (l_uid, name, ts) key.
    base_ms = int(time.time() * 1000) + 10
    workers = [
        asyncio.create_task(post_until_killed(server.url, "crash-token", acked, stop, w, base_ms)) for w in range(8)
    ]
    while len(acked) < 400:
        await asyncio.sleep(0.02)
    assert server.kill() == -signal.SIGKILL
    stop.set()
    await asyncio.gather(*workers)

    server.start()
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}) as c:
        msgs = (await c.get("/mgmt/messages", params={"p_uid": dev["uid"], "limit": 10_000})).json()
        journaled = {msgspec.json.decode(m["payload"])["values"]["seq"] for m in msgs}
        missing = acked - journaled
        assert not missing, f"{len(missing)} acknowledged requests lost"
        assert all(m["status"] == "ok" for m in msgs)

        deadline = time.monotonic() + 30
        while True:
            sinks = {s["name"]: s for s in (await c.get("/mgmt/sinks")).json()}
            if sinks["timeseries"]["lag"] == 0:
                break
            assert time.monotonic() < deadline, sinks
            await asyncio.sleep(0.1)
        points = (await c.get("/mgmt/timeseries", params={"l_uid": ld["uid"], "limit": 100_000})).json()
    stored = [p["value"] for p in points]
    assert len(stored) == len(set(stored)), "a record was stored twice"
    assert set(stored) == journaled, "every journaled record reaches the sink"
    assert server.kill(signal.SIGTERM) == 0


async def test_sigterm_shuts_down_cleanly_and_keeps_data(server: Server) -> None:
    server.start()
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post(
            "/mgmt/physical", json={"name": "x", "token": "tok-x"}, headers={"Authorization": f"Bearer {server.token}"}
        )
        assert r.status_code == 201
        assert (await c.post("/api/v1/tok-x/telemetry", json={"t": 1})).status_code == 200
    assert server.kill(signal.SIGTERM) == 0
    server.start()
    async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}) as c:
        msgs = (await c.get("/mgmt/messages")).json()
        assert len(msgs) == 1 and msgs[0]["payload"] == '{"t":1}'
        dev = (await c.get("/mgmt/physical")).json()[0]
        assert dev["last_seen"] is not None, "last_seen is flushed on shutdown"
    assert server.kill(signal.SIGTERM) == 0
    assert os.stat(server.data / "admin.token").st_mode & 0o777 == 0o600
