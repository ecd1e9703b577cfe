"""The management REST API: one error shape, authentication, roles, OpenAPI, health, metrics."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest


def assert_error_shape(r: httpx.Response, status: int, code: str) -> str:
    """THE error shape, pinned: exactly {"error": {"code": str, "message": str}} (+ optional extras)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert {"code", "message"} <= set(body["error"])
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    message: str = body["error"]["message"]
    return message


async def test_error_shape_is_the_same_everywhere(instance: Any) -> None:
    assert_error_shape(await instance.http.get("/mgmt/physical"), 401, "unauthorized")
    assert_error_shape(await instance.admin.get("/mgmt/physical/999"), 404, "not_found")
    assert_error_shape(await instance.admin.get("/mgmt/no-such-thing"), 404, "not_found")
    msg = assert_error_shape(
        await instance.admin.post("/mgmt/physical", json={"name": "x", "colour": "red"}), 422, "invalid_request"
    )
    assert "colour" in msg and "unknown key" in msg
    assert_error_shape(
        await instance.admin.post("/mgmt/physical", json={"name": "x", "token": "bad token!"}), 422, "invalid_request"
    )
    await instance.admin.post("/mgmt/physical", json={"name": "a", "token": "dup"})
    assert_error_shape(await instance.admin.post("/mgmt/physical", json={"name": "b", "token": "dup"}), 409, "conflict")
    assert_error_shape(await instance.admin.get("/mgmt/mappings"), 400, "invalid_request")
    assert_error_shape(
        await instance.admin.get("/mgmt/messages", params={"since": "2026-01-01T00:00:00"}), 400, "invalid_request"
    )
    assert_error_shape(await instance.http.post("/api/v1/nope/telemetry", json={}), 401, "unauthorized")
    assert_error_shape(await instance.admin.get("/mgmt/dead-letters/12345"), 404, "not_found")
    assert_error_shape(
        await instance.admin.post("/mgmt/physical", json={"name": "x", "decoder": "nope"}), 400, "invalid_request"
    )


async def test_login_exchanges_basic_credentials_for_a_token(instance: Any) -> None:
    r = await instance.admin.post("/mgmt/users", json={"username": "ops", "password": "correct horse"})
    assert r.status_code == 201
    basic = base64.b64encode(b"ops:correct horse").decode()
    r = await instance.http.get("/mgmt/token", headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200
    token = r.json()["token"]
    r = await instance.http.get("/mgmt/physical", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    wrong = base64.b64encode(b"ops:wrong password").decode()
    assert_error_shape(
        await instance.http.get("/mgmt/token", headers={"Authorization": f"Basic {wrong}"}), 401, "unauthorized"
    )


async def test_read_only_users_cannot_write(instance: Any) -> None:
    r = await instance.admin.post("/mgmt/users", json={"username": "viewer", "password": "12345678", "read_only": True})
    headers = {"Authorization": f"Bearer {r.json()['token']}"}
    assert (await instance.http.get("/mgmt/physical", headers=headers)).status_code == 200
    assert (await instance.http.get("/mgmt/sinks", headers=headers)).status_code == 200
    assert_error_shape(
        await instance.http.post("/mgmt/physical", json={"name": "x"}, headers=headers), 403, "forbidden"
    )
    assert_error_shape(await instance.http.delete("/mgmt/users/admin", headers=headers), 403, "forbidden")


async def test_disabled_user_and_revoked_tokens_are_refused(instance: Any) -> None:
    r = await instance.admin.post("/mgmt/users", json={"username": "temp", "password": "12345678"})
    headers = {"Authorization": f"Bearer {r.json()['token']}"}
    assert (await instance.http.get("/mgmt/physical", headers=headers)).status_code == 200
    r = await instance.admin.post("/mgmt/users/temp/token", json={"action": "disable"})
    assert r.status_code == 200
    assert_error_shape(await instance.http.get("/mgmt/physical", headers=headers), 401, "unauthorized")
    await instance.admin.post("/mgmt/users/temp/token", json={"action": "enable"})
    assert (await instance.http.get("/mgmt/physical", headers=headers)).status_code == 200
    r = await instance.admin.post("/mgmt/users/temp/token", json={"action": "refresh"})
    fresh = {"Authorization": f"Bearer {r.json()['token']}"}
    assert_error_shape(await instance.http.get("/mgmt/physical", headers=headers), 401, "unauthorized")
    assert (await instance.http.get("/mgmt/physical", headers=fresh)).status_code == 200
    assert (await instance.admin.delete("/mgmt/users/temp")).status_code == 204
    assert_error_shape(await instance.http.get("/mgmt/physical", headers=fresh), 401, "unauthorized")


async def test_mapping_lifecycle(instance: Any) -> None:
    old = await instance.device("old-sensor", map_to="Tank")
    new = await instance.device("new-sensor")
    r = await instance.admin.post("/mgmt/mappings", json={"p_uid": new["uid"], "l_uid": old["l_uid"]})
    assert r.status_code == 201
    r = await instance.admin.get("/mgmt/mappings", params={"l_uid": old["l_uid"]})
    body = r.json()
    assert body["current"]["p_uid"] == new["uid"]
    assert [m["p_uid"] for m in body["history"]] == [new["uid"], old["uid"]]
    assert body["history"][1]["end_time"] is not None
    await instance.http.post(f"/api/v1/{new['token']}/telemetry", json={"t": 1})
    assert (await instance.admin.post("/mgmt/mappings/pause", json={"p_uid": new["uid"]})).json()["paused"]
    await instance.http.post(f"/api/v1/{new['token']}/telemetry", json={"t": 2})
    msgs = (await instance.admin.get("/mgmt/messages", params={"p_uid": new["uid"]})).json()
    assert [m["l_uid"] for m in msgs] == [None, old["l_uid"]], "paused mapping: kept but not mapped"
    assert not (await instance.admin.post("/mgmt/mappings/resume", json={"p_uid": new["uid"]})).json()["paused"]
    r = await instance.admin.post("/mgmt/mappings/end", json={"p_uid": new["uid"]})
    assert r.status_code == 200 and r.json()["end_time"] is not None


async def test_openapi_docs_health_metrics(instance: Any) -> None:
    spec = (await instance.http.get("/openapi.json")).json()
    for path in (
        "/mgmt/physical",
        "/mgmt/logical",
        "/mgmt/mappings",
        "/mgmt/users",
        "/mgmt/messages",
        "/mgmt/timeseries",
        "/mgmt/sinks",
        "/mgmt/dead-letters",
        "/mgmt/token",
    ):
        assert path in spec["paths"], path
    assert "PhysicalDevice" in spec["components"]["schemas"]
    docs = await instance.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert (await instance.http.get("/health")).json() == {"status": "ok"}
    assert (await instance.http.get("/ready")).json() == {"status": "ready", "problems": []}
    dev = await instance.device("d")
    await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": 1})
    await instance.http.post(f"/api/v1/{dev['token']}/telemetry", content=b"{")
    metrics = (await instance.http.get("/metrics")).text
    assert 'isthmus_frames_received_total{source="http"} 2.0' in metrics
    assert 'isthmus_frames_journaled_total{source="http"} 2.0' in metrics
    assert 'isthmus_frames_failed_total{source="http",status="decode_error"} 1.0' in metrics
    assert "isthmus_journal_commit_seconds_bucket" in metrics
    assert 'isthmus_journal_lag{consumer="timeseries"}' in metrics


class _Failing(BaseHTTPRequestHandler):
    status = 500  # the test flips it to 200 to let the destination recover

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(type(self).status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def failing_webhook() -> Iterator[str]:
    _Failing.status = 500
    server = HTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


async def test_failing_sink_dead_letters_others_unaffected_ready_reports_it(
    instance_factory: Any, failing_webhook: str, tmp_path: Any
) -> None:
    instance = await instance_factory(
        sinks=[
            {"name": "timeseries", "type": "sql"},
            {
                "name": "hook",
                "type": "webhook",
                "options": {"url": failing_webhook, "timeout": 2},
                "max_attempts": 2,
                "backoff_initial": 0.01,
                "backoff_max": 0.02,
            },
        ]
    )
    dev = await instance.device("d", map_to="L")
    for i in range(3):
        assert (await instance.http.post(f"/api/v1/{dev['token']}/telemetry", json={"t": i})).status_code == 200

    async def settled() -> Any:
        sinks = {s["name"]: s for s in (await instance.admin.get("/mgmt/sinks")).json()}
        done = all(sinks[n]["cursor"] == 3 for n in ("timeseries", "hook"))
        return sinks if done else None

    sinks = await instance.wait_for(settled)
    assert sinks["timeseries"]["state"] == "healthy" and sinks["timeseries"]["delivered"] == 3
    assert sinks["hook"]["state"] == "failing" and sinks["hook"]["dead_lettered"] == 3
    assert "500" in sinks["hook"]["last_error"]
    dead = (await instance.admin.get("/mgmt/dead-letters", params={"sink": "hook"})).json()
    assert len(dead) == 3 and {d["attempts"] for d in dead} == {2}
    assert dead[0]["payload"] == '{"t":0}' and dead[0]["stage"] == "deliver"
    one = (await instance.admin.get(f"/mgmt/dead-letters/{dead[0]['id']}")).json()
    assert one["message"]["timeseries"] == [{"name": "t", "value": 0}]
    ready = await instance.http.get("/ready")
    assert ready.status_code == 503
    assert any("hook" in p for p in ready.json()["problems"])
    points = (await instance.admin.get("/mgmt/timeseries", params={"l_uid": dev["l_uid"]})).json()
    assert len(points) == 3

    # The destination recovers: the operator redrives the dead letters.
    _Failing.status = 200
    r = await instance.admin.post("/mgmt/dead-letters/redrive", json={"sink": "hook"})
    assert r.json() == {"redriven": 3, "failed": 0, "reason": None}
    sinks = {s["name"]: s for s in (await instance.admin.get("/mgmt/sinks")).json()}
    assert (sinks["hook"]["delivered"], sinks["hook"]["dead_lettered"]) == (3, 0)
    assert sinks["hook"]["state"] == "healthy"
    assert (await instance.http.get("/ready")).status_code == 200
    assert all(d["redriven"] for d in (await instance.admin.get("/mgmt/dead-letters")).json())
    assert_error_shape(await instance.admin.post("/mgmt/dead-letters/redrive", json={"sink": "nope"}), 404, "not_found")


# ----------------------------------------------------------------------------- device credentials


async def test_device_credentials_lifecycle_and_the_hot_path(instance: Any) -> None:
    dev = await instance.device("tank-7")
    assert dev["username"] is None
    uid, cache = dev["uid"], instance.runtime.cache
    r = await instance.admin.put(f"/mgmt/physical/{uid}/credentials", json={"username": "tank-7", "password": "pw-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["uid"], body["username"], body["token"]) == (uid, "tank-7", dev["token"])
    for text in (r.text, (await instance.admin.get(f"/mgmt/physical/{uid}")).text):
        assert "pw-1" not in text and "argon2" not in text and "password" not in text
    assert (await instance.admin.get(f"/mgmt/physical/{uid}")).json()["username"] == "tank-7"
    assert [d["username"] for d in (await instance.admin.get("/mgmt/physical")).json()] == ["tank-7"]

    ref = await cache.by_password("tank-7", "pw-1")
    assert ref is not None and ref.p_uid == uid
    assert await cache.by_password("tank-7", "wrong") is None

    r = await instance.admin.put(f"/mgmt/physical/{uid}/credentials", json={"username": "tank-7", "password": "pw-2"})
    assert r.status_code == 200, r.text
    assert await cache.by_password("tank-7", "pw-1") is None  # remembered before, refused now
    assert await cache.by_password("tank-7", "pw-2") is not None

    r = await instance.admin.delete(f"/mgmt/physical/{uid}/credentials")
    assert r.status_code == 200, r.text
    assert r.json()["username"] is None
    assert await cache.by_password("tank-7", "pw-2") is None
    assert cache.by_token(dev["token"]) is not None
    msg = assert_error_shape(await instance.admin.delete(f"/mgmt/physical/{uid}/credentials"), 404, "not_found")
    assert "no username and password credentials" in msg
    missing = {"username": "x", "password": "y"}
    assert_error_shape(await instance.admin.put("/mgmt/physical/999/credentials", json=missing), 404, "not_found")
    assert_error_shape(await instance.admin.delete("/mgmt/physical/999/credentials"), 404, "not_found")

    r = await instance.admin.put(f"/mgmt/physical/{uid}/credentials", json={"username": "tank-7", "password": "pw-3"})
    assert (await instance.admin.delete(f"/mgmt/physical/{uid}")).json()["username"] == "tank-7"
    assert await cache.by_password("tank-7", "pw-3") is None


async def test_device_credentials_conflicts_and_bad_values(instance: Any) -> None:
    a, b = await instance.device("a"), await instance.device("b")
    ok = {"username": "shared", "password": "pw"}
    assert (await instance.admin.put(f"/mgmt/physical/{a['uid']}/credentials", json=ok)).status_code == 200
    msg = assert_error_shape(
        await instance.admin.put(f"/mgmt/physical/{b['uid']}/credentials", json=ok), 409, "conflict"
    )
    assert "already in use by another device" in msg
    assert (await instance.admin.get(f"/mgmt/physical/{b['uid']}")).json()["username"] is None
    secret = "p" * 1001
    for bad in (
        {"username": "", "password": "pw"},
        {"username": "u", "password": ""},
        {"username": "u" * 201, "password": "pw"},
        {"username": "u", "password": secret},
        {"username": " u", "password": "pw"},
        {"username": "u\u0000", "password": "pw"},
    ):
        r = await instance.admin.put(f"/mgmt/physical/{b['uid']}/credentials", json=bad)
        assert secret not in assert_error_shape(r, 400, "invalid_request"), bad
    for bad in ({"username": "u"}, {"username": 1, "password": 2}, {"username": "u", "password": "p", "id": "c"}):
        r = await instance.admin.put(f"/mgmt/physical/{b['uid']}/credentials", json=bad)
        assert_error_shape(r, 422, "invalid_request")
    assert (await instance.admin.get(f"/mgmt/physical/{b['uid']}")).json()["username"] is None


async def test_device_credentials_need_a_writer(instance: Any) -> None:
    dev = await instance.device("d")
    path = f"/mgmt/physical/{dev['uid']}/credentials"
    body = {"username": "u", "password": "pw"}
    assert_error_shape(await instance.http.put(path, json=body), 401, "unauthorized")
    assert_error_shape(await instance.http.delete(path), 401, "unauthorized")
    r = await instance.admin.post("/mgmt/users", json={"username": "viewer", "password": "12345678", "read_only": True})
    viewer = {"Authorization": f"Bearer {r.json()['token']}"}
    assert_error_shape(await instance.http.put(path, json=body, headers=viewer), 403, "forbidden")
    assert (await instance.admin.put(path, json=body)).status_code == 200
    assert_error_shape(await instance.http.delete(path, headers=viewer), 403, "forbidden")
    seen = await instance.http.get(f"/mgmt/physical/{dev['uid']}", headers=viewer)
    assert seen.status_code == 200 and seen.json()["username"] == "u"  # readers see the username only
    spec = (await instance.http.get("/openapi.json")).json()
    assert {"put", "delete"} <= set(spec["paths"]["/mgmt/physical/{uid}/credentials"])
    assert "username" in spec["components"]["schemas"]["PhysicalDevice"]["properties"]
