"""Reliability of the MQTT source in the real process: SIGKILL under 100 QoS 1 publishers, then restart.

The ``mqtt`` source acknowledges a QoS 1 PUBLISH only once its record is durable in the journal
(docs/mqtt-server.md). So after a SIGKILL in the middle of the load and a restart on the same data
directory, every message a publisher got a PUBACK for must be in the journal, and every journaled
record must reach the timeseries sink exactly once.

The publishers are real peers: 100 paho-mqtt clients (half MQTT 5, half 3.1.1), each on its own
connection authenticated by its own device token, each keeping ``WINDOW`` messages in flight and
sending the next one from its PUBACK callback. A message counts as acknowledged only when paho
handed us its PUBACK (``on_publish``) with reason code 0. Clients never reconnect, so nothing is
ever sent twice and the journal must hold each (device, seq) at most once.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest
from paho.mqtt import client as paho

if TYPE_CHECKING:
    from conftest import ServerFactory

PUBLISHERS = 100
WINDOW = 8  # QoS 1 messages in flight per connection (the server allows 256)
MIN_ACKED = 500  # PUBACKs wanted before the kill …
MIN_LOAD_SECONDS = 2.0  # … and this much load
TOPIC = "v1/devices/me/telemetry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Publisher:
    """One device: a paho client publishing ``{"seq": n, "pub": index}`` at QoS 1, ``WINDOW`` at a time.

    Every publish happens on paho's network thread (in ``on_connect`` and ``on_publish``), so
    ``pending`` needs no lock: a PUBACK is handled by the same thread after its ``publish`` returned.
    """

    def __init__(self, index: int, port: int, token: str, base_ms: int, killed: threading.Event) -> None:
        self.index = index
        self.port = port
        self.base_ms = base_ms
        self.killed = killed
        self.version = 5 if index % 2 == 0 else 4
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"crash-{index}",
            protocol=paho.MQTTv5 if self.version == 5 else paho.MQTTv311,
            reconnect_on_failure=False,  # a reconnect would resend unacknowledged messages
        )
        self.client.username_pw_set(token)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self.connected = threading.Event()
        self.connack: Any = None
        self.stop = False
        self.next_seq = 0
        self.pending: dict[int, int] = {}  # paho mid -> seq, published and not yet acknowledged
        self.acked: set[int] = set()
        self.refused: dict[int, str] = {}  # seq -> PUBACK reason, for a non-zero reason code
        self.publish_errors: list[int] = []
        self.lost_before_kill: str | None = None

    def start(self) -> None:
        self.client.connect_async("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()

    def _publish_next(self) -> None:
        seq = self.next_seq
        self.next_seq += 1
        payload = msgspec.json.encode({"ts": self.base_ms + seq, "values": {"seq": seq, "pub": self.index}})
        info = self.client.publish(TOPIC, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:  # not connected (any more): paho only queued it
            self.publish_errors.append(info.rc)
        self.pending[info.mid] = seq

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack = reason
        self.connected.set()
        if reason.value == 0:
            for _ in range(WINDOW):
                self._publish_next()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        seq = self.pending.pop(mid)
        if reason.value == 0:
            self.acked.add(seq)
        else:
            self.refused[seq] = str(reason)
        if not self.stop:
            self._publish_next()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self.killed.is_set():
            self.lost_before_kill = str(reason)


@pytest.mark.slow
def test_sigkill_under_100_mqtt_publishers_loses_no_puback_and_delivers_exactly_once(
    server_factory: ServerFactory,
) -> None:
    mqtt_port = free_port()
    server = server_factory(
        f'[[sources]]\nname = "mqtt"\ntype = "mqtt"\n[sources.options]\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
        "rate = { rate_per_second = 10000, burst = 10000 }\n"
    )
    server.start()

    # 100 devices, each with its own token and its own logical device (timeseries keys are
    # (l_uid, name, timestamp); each message gets its own timestamp base_ms + seq).
    devices: list[tuple[int, int]] = []  # (p_uid, l_uid) per publisher
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=10) as c:
        for i in range(PUBLISHERS):
            r = c.post("/mgmt/physical", json={"name": f"mqtt-crash-{i}", "token": f"mqtt-crash-token-{i}"})
            assert r.status_code == 201, r.text
            p_uid = r.json()["uid"]
            r = c.post("/mgmt/logical", json={"name": f"mqtt-crash-l-{i}"})
            assert r.status_code == 201, r.text
            l_uid = r.json()["uid"]
            r = c.post("/mgmt/mappings", json={"p_uid": p_uid, "l_uid": l_uid})
            assert r.status_code == 201, r.text
            devices.append((p_uid, l_uid))
    # Messages are mapped by their own time: stamp them all after the mappings started.
    base_ms = int(time.time() * 1000) + 10

    killed = threading.Event()
    publishers = [Publisher(i, mqtt_port, f"mqtt-crash-token-{i}", base_ms, killed) for i in range(PUBLISHERS)]
    try:
        for p in publishers:
            p.start()
        for p in publishers:
            assert p.connected.wait(20), f"publisher {p.index}: no CONNACK"
            assert p.connack.value == 0, f"publisher {p.index}: CONNACK {p.connack}"
        load_started = time.monotonic()
        deadline = load_started + 25
        while True:
            lost = [(p.index, p.lost_before_kill) for p in publishers if p.lost_before_kill]
            assert not lost, f"connections dropped under load: {lost}"
            acked = sum(len(p.acked) for p in publishers)
            if (
                acked >= MIN_ACKED
                and time.monotonic() - load_started >= MIN_LOAD_SECONDS
                and all(p.acked for p in publishers)
            ):
                break
            assert time.monotonic() < deadline, f"only {acked} PUBACKs after 25 s"
            time.sleep(0.05)
        killed.set()
        assert server.kill() == -signal.SIGKILL
    finally:
        killed.set()
        if server.proc is not None and server.proc.poll() is None:  # failed before the kill
            server.proc.kill()
            server.proc.wait()
        for p in publishers:
            p.stop = True
        for p in publishers:  # each network thread ends as its connection is gone
            p.client.loop_stop()

    acked_total = sum(len(p.acked) for p in publishers)
    unacked_total = sum(len(p.pending) for p in publishers)
    print(f"\n{acked_total} PUBACKed, {unacked_total} unacknowledged at the kill")
    assert not [(p.index, p.lost_before_kill) for p in publishers if p.lost_before_kill], "dropped before the kill"
    assert not {p.index: p.refused for p in publishers if p.refused}, "PUBACK with an error reason code"
    assert not {p.index: p.publish_errors for p in publishers if p.publish_errors}
    assert acked_total >= MIN_ACKED
    assert unacked_total > 0, "the kill found messages in flight"

    server.start()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=10) as c:
        journaled: list[set[int]] = []
        for p, (p_uid, _) in zip(publishers, devices, strict=True):
            r = c.get("/mgmt/messages", params={"p_uid": p_uid, "limit": 10_000})
            assert r.status_code == 200, r.text
            msgs = r.json()
            assert all(m["status"] == "ok" for m in msgs), [m for m in msgs if m["status"] != "ok"][:3]
            values = [msgspec.json.decode(m["payload"])["values"] for m in msgs]
            assert all(v["pub"] == p.index for v in values)
            seqs = [v["seq"] for v in values]
            assert len(seqs) == len(set(seqs)), f"publisher {p.index}: a message was journaled twice"
            missing = p.acked - set(seqs)
            assert not missing, f"publisher {p.index}: {len(missing)} PUBACKed messages lost: {sorted(missing)[:20]}"
            journaled.append(set(seqs))
        print(f"{sum(map(len, journaled))} journaled")

        deadline = time.monotonic() + 30
        while True:
            sinks = {s["name"]: s for s in c.get("/mgmt/sinks").json()}
            if sinks["timeseries"]["lag"] == 0:
                break
            assert time.monotonic() < deadline, sinks
            time.sleep(0.1)
        for p, (_, l_uid), seqs in zip(publishers, devices, journaled, strict=True):
            r = c.get("/mgmt/timeseries", params={"l_uid": l_uid, "name": "seq", "limit": 100_000})
            assert r.status_code == 200, r.text
            stored = [pt["value"] for pt in r.json()]
            assert len(stored) == len(set(stored)), f"publisher {p.index}: a record was stored twice"
            assert set(stored) == seqs, f"publisher {p.index}: journaled records missing from the sink"
    assert server.kill(signal.SIGTERM) == 0
