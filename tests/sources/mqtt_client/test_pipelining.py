"""Many journal commits in flight per subscription: order, acknowledgement after the commit, the bound.

The broker is a real mosquitto with ``max_inflight_messages 0`` (it sends MQTT 3.1.1 clients as
many unacknowledged messages as it has, its default being 20): MQTT 5 connections are then limited
by the Receive Maximum the source announces, 3.1.1 ones only by the source pausing its reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from isthmus.errors import JournalError
from isthmus.interfaces import DeviceRef, Ingest, IngestResult
from isthmus.message import RawFrame

PEBBLE = [{"filter": "pebble/+/data", "device": "pebble/{device}/data"}]
UNLIMITED = ["max_inflight_messages 0", "max_queued_messages 0"]


def seqs(records: list[Any]) -> list[int]:
    return [json.loads(r.frame.payload)["seq"] for r in records]


class Meter:
    """Counts the submits in flight. ``hold``: the first one is journaled but does not return before
    ``hold`` more submits have started (or 10 s passed: ``timed_out``), so its acknowledgement, and
    every one after it, waits. ``gate``: while it is clear, no submit returns (each is journaled)."""

    def __init__(self, inner: Ingest, hold: int = 0) -> None:
        self.inner = inner
        self.hold = hold
        self.started = 0
        self.now = 0
        self.peak = 0
        self.enough = asyncio.Event()
        self.timed_out = False
        self.gate = asyncio.Event()
        self.gate.set()

    async def submit(self, frame: RawFrame, device: DeviceRef, **kw: Any) -> IngestResult | None:
        self.started += 1
        first = self.started == 1
        if self.started > self.hold:
            self.enough.set()
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            result = await self.inner.submit(frame, device, **kw)  # queued for the journal in call order
            if first and self.hold:
                try:
                    await asyncio.wait_for(self.enough.wait(), 10)
                except TimeoutError:
                    self.timed_out = True
            await self.gate.wait()
            return result
        finally:
            self.now -= 1


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_many_commits_in_flight_are_journaled_in_publish_order(
    mosquitto: Any, kit: Any, publishers: Any, protocol: str
) -> None:
    broker = mosquitto(extra=UNLIMITED)
    meters: list[Meter] = []

    def meter(inner: Ingest) -> Ingest:
        meters.append(Meter(inner, hold=100))
        return meters[-1]

    rt = await kit.start([kit.source("pebble", broker.url, PEBBLE, protocol=protocol)], wrap=meter)
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)
    total = 2000
    for seq in range(total):  # seven devices, each created on its first message (a lookup that suspends)
        pub.publish(f"pebble/node-{seq % 7}/data", json.dumps({"seq": seq}).encode())

    records = await kit.wait_records(rt, total, timeout=60)
    assert seqs(records) == list(range(total)), "journal order is publish order"
    assert not meters[0].timed_out, "100 submits started while the first one was not acknowledged"
    assert 100 < meters[0].peak <= 256, "pipelined, within the default max_inflight"
    assert len(rt.store.list_physical(source="pebble")) == 7


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_no_more_than_max_inflight_messages_are_taken_from_the_broker(
    mosquitto: Any, kit: Any, publishers: Any, protocol: str
) -> None:
    broker = mosquitto(extra=UNLIMITED)
    meters: list[Meter] = []

    def meter(inner: Ingest) -> Ingest:
        meters.append(Meter(inner))
        meters[-1].gate.clear()  # every submit is journaled, none returns: nothing is acknowledged
        return meters[-1]

    source = kit.source("pebble", broker.url, PEBBLE, protocol=protocol, max_inflight=8)
    rt = await kit.start([source], wrap=meter)
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)
    total = 100
    for seq in range(total):
        pub.publish(f"pebble/node-{seq % 3}/data", json.dumps({"seq": seq}).encode())

    async def eight() -> bool:
        return meters[0].now == 8

    await kit.wait_for(eight, what="8 submits in flight")
    await asyncio.sleep(0.5)  # would the source take more while 8 are unacknowledged?
    assert (meters[0].started, meters[0].now) == (8, 8)
    assert seqs(await kit.records(rt)) == list(range(8))

    meters[0].gate.set()
    records = await kit.wait_records(rt, total, timeout=30)
    assert seqs(records) == list(range(total))
    assert meters[0].peak == 8


class Hold:
    """A commit whose confirmation never comes for payloads marked ``"hold"``: the record is durable
    (submitted to the real journal) but ``submit`` does not return; the others complete normally."""

    def __init__(self, inner: Ingest) -> None:
        self.inner = inner

    async def submit(self, frame: RawFrame, device: DeviceRef, **kw: Any) -> IngestResult | None:
        result = await self.inner.submit(frame, device, **kw)
        if b'"hold"' in frame.payload:
            await asyncio.get_running_loop().create_future()  # cancelled when the runtime stops
        return result


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_acknowledgements_wait_for_every_earlier_commit(
    mosquitto: Any, kit: Any, publishers: Any, tmp_path: Any, protocol: str
) -> None:
    # Messages after the held one are journaled (their commits complete) but must not be
    # acknowledged before it: the broker, which decides what to redeliver, sends them again.
    broker = mosquitto(extra=UNLIMITED)
    data = tmp_path / "data"
    source = kit.source("pebble", broker.url, PEBBLE, protocol=protocol)
    rt1 = await kit.start([source], data_dir=data, wrap=Hold)
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)
    total, held = 60, 20
    for seq in range(total):
        body = {"seq": seq, "hold": True} if seq == held else {"seq": seq}
        pub.publish(f"pebble/node-{seq % 3}/data", json.dumps(body).encode())

    assert seqs(await kit.wait_records(rt1, total)) == list(range(total))
    await broker.wait_log("Received PUBACK from isthmus-pebble", count=held)
    await asyncio.sleep(0.3)  # would any later one be acknowledged?
    assert broker.log().count("Received PUBACK from isthmus-pebble") == held
    await kit.stop(rt1)

    rt2 = await kit.start([source], data_dir=data)
    await kit.wait_records(rt2, total + total - held)
    await asyncio.sleep(0.3)  # would anything acknowledged come back too?
    records = await kit.records(rt2)
    assert seqs(records[total:]) == list(range(held, total)), "the held one and all after it, in order"


async def test_a_stopped_source_leaves_its_commits_in_flight_unacknowledged(
    mosquitto: Any, kit: Any, publishers: Any, tmp_path: Any
) -> None:
    broker = mosquitto(extra=UNLIMITED)
    data = tmp_path / "data"
    meters: list[Meter] = []

    def meter(inner: Ingest) -> Ingest:
        meters.append(Meter(inner))
        meters[-1].gate.clear()
        return meters[-1]

    source = kit.source("pebble", broker.url, PEBBLE)
    rt1 = await kit.start([source], data_dir=data, wrap=meter)
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)
    for seq in range(30):
        pub.publish("pebble/n1/data", json.dumps({"seq": seq}).encode())

    async def all_started() -> bool:
        return meters[0].now == 30

    await kit.wait_for(all_started, what="30 submits in flight")
    await kit.stop(rt1)  # cancels them: journaled, never acknowledged
    assert "Received PUBACK from isthmus-pebble" not in broker.log()

    rt2 = await kit.start([source], data_dir=data)
    records = await kit.wait_records(rt2, 60)
    assert seqs(records) == list(range(30)) * 2, "all 30 redelivered (at-least-once), in order"
    await asyncio.sleep(0.3)
    assert len(await kit.records(rt2)) == 60


class FailingJournal:
    """An ingest that raises JournalError (disk full …) for the first ``failures`` submits."""

    def __init__(self, inner: Ingest, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def submit(self, frame: RawFrame, device: DeviceRef, **kw: Any) -> IngestResult | None:
        if self.failures > 0:
            self.failures -= 1
            raise JournalError("disk full (simulated)")
        return await self.inner.submit(frame, device, **kw)


async def test_qos2_commits_failing_among_many_in_flight_are_retried_in_order_and_journaled_once(
    mosquitto: Any, kit: Any, publishers: Any
) -> None:
    broker = mosquitto(extra=UNLIMITED)
    subs = [{**PEBBLE[0], "qos": 2}]
    rt = await kit.start(
        [kit.source("pebble", broker.url, subs, reconnect_min=0.05)],
        wrap=lambda inner: FailingJournal(inner, failures=5),
    )
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)
    total = 40
    for seq in range(total):
        pub.publish("pebble/n1/data", json.dumps({"seq": seq}).encode(), qos=2)

    records = await kit.wait_records(rt, total)
    found = seqs(records)
    assert sorted(found) == list(range(total)), "each journaled once: the broker never resends after PUBREC"
    retried = [s for s in found if s < 5]
    assert retried == [0, 1, 2, 3, 4], "the failed ones are retried in arrival order"
    await broker.wait_log("Received PUBCOMP from isthmus-pebble", count=total)
    assert "Sending PUBLISH to isthmus-pebble (d1" not in broker.log(), "no reconnect, no redelivery"


async def test_qos1_commits_failing_among_many_in_flight_are_redelivered(
    mosquitto: Any, kit: Any, publishers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="isthmus.sources.mqtt_client")
    broker = mosquitto(extra=UNLIMITED)
    rt = await kit.start([kit.source("pebble", broker.url, PEBBLE)], wrap=lambda inner: FailingJournal(inner, 5))
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)
    total = 40
    for seq in range(total):
        pub.publish("pebble/n1/data", json.dumps({"seq": seq}).encode())

    async def all_journaled() -> list[int] | None:
        found = seqs(await kit.records(rt))
        return found if set(found) == set(range(total)) else None

    await kit.wait_for(all_journaled, what="every message journaled, the failed ones after a redelivery")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "cannot journal" in r.getMessage()]
    assert len(errors) == 1, "the journal failure is logged once"
    await broker.wait_log("Sending PUBLISH to isthmus-pebble (d1")  # redelivered on the new connection


class Buggy:
    """An ingest whose first submit raises something no source expects (a bug)."""

    def __init__(self, inner: Ingest) -> None:
        self.inner = inner
        self.calls = 0

    async def submit(self, frame: RawFrame, device: DeviceRef, **kw: Any) -> IngestResult | None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("bug (simulated)")
        return await self.inner.submit(frame, device, **kw)


async def test_a_bug_in_a_submit_task_restarts_the_source_unacknowledged(
    broker: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rt = await kit.start([kit.source("pebble", broker.url, PEBBLE)], wrap=Buggy)
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 1})
    (record,) = await kit.wait_records(rt, 1, timeout=15)  # after the restart, redelivered by the broker
    assert seqs([record]) == [1]
    assert any("crashed" in r.getMessage() and r.exc_info for r in caplog.records), "the supervisor logged the bug"
    await broker.wait_log("Sending PUBLISH to isthmus-pebble (d1")
