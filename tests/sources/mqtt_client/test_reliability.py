"""Nothing acknowledged is lost: broker restarts, hung brokers, journal failures, a stopped Isthmus.

The broker is a real mosquitto; the runtime is the real one. What makes these tests meaningful is
that the *broker* decides what is redelivered: a message the source acknowledged too early would
be missing, one it never acknowledged would come back twice.
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
LOGGER = "isthmus.sources.mqtt_client"


def seqs(records: list[Any]) -> list[int]:
    return [json.loads(r.frame.payload)["seq"] for r in records]


def messages(caplog: pytest.LogCaptureFixture, text: str, level: int | None = None) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and text in r.getMessage() and (level is None or r.levelno == level)
    ]


async def test_broker_restart_mid_stream_loses_nothing_acknowledged(
    mosquitto: Any, kit: Any, publishers: Any, caplog: pytest.LogCaptureFixture, record_property: Any
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    broker = mosquitto(persistence=True)
    rt = await kit.start([kit.source("pebble", broker.url, PEBBLE)])
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    pub = await publishers(broker.port)  # persistent session, QoS 1, reconnects and resends by itself
    total = 400

    async def produce() -> None:
        for seq in range(total):
            pub.publish(f"pebble/node-{seq % 5}/data", json.dumps({"seq": seq}).encode())
            await asyncio.sleep(0.003)

    producer = asyncio.create_task(produce())
    await kit.wait_records(rt, 50)  # mid-stream
    await broker.astop()  # SIGTERM: mosquitto saves its persistence file
    await asyncio.sleep(0.2)
    await broker.astart()  # same port, same persistence file
    await producer

    async def all_published() -> bool:
        with pub.lock:
            return len(pub.acked) == total

    await kit.wait_for(all_published, timeout=15, what="the publisher got a PUBACK for every message")
    acked = {json.loads(p)["seq"] for p in pub.acked}

    async def journaled() -> list[int] | None:
        found = seqs(await kit.records(rt))
        return found if acked <= set(found) else None

    found = await kit.wait_for(journaled, timeout=15, what="every acknowledged message in the journal")
    duplicates = len(found) - len(set(found))
    record_property("duplicates", duplicates)
    print(f"broker restart: {len(acked)} acknowledged by mosquitto, {len(found)} journaled, {duplicates} duplicates")
    assert set(found) == acked
    assert len(messages(caplog, "lost", logging.WARNING)) == 1, "the loss is logged once"
    assert len(messages(caplog, "reconnected to", logging.INFO)) == 1
    assert kit.sample(rt, "isthmus_mqtt_client_connected", source="pebble") == 1


class Gate:
    """A journal stuck for good from the first payload marked ``"hold"`` on: that submit and every later
    one never complete and store nothing (later ones too, as the journal keeps its order)."""

    def __init__(self, inner: Ingest) -> None:
        self.inner = inner
        self.held = asyncio.Event()
        self.stuck = 0  # submits waiting forever

    async def submit(self, frame: RawFrame, device: DeviceRef, **kw: Any) -> IngestResult | None:
        if self.held.is_set() or b'"hold"' in frame.payload:
            self.held.set()
            self.stuck += 1
            await asyncio.get_running_loop().create_future()  # cancelled when the runtime stops
        return await self.inner.submit(frame, device, **kw)


async def test_a_message_whose_journal_commit_never_completed_is_redelivered_after_a_restart(
    broker: Any, kit: Any, tmp_path: Any
) -> None:
    data = tmp_path / "data"
    gates: list[Gate] = []

    def gate(inner: Ingest) -> Ingest:
        gates.append(Gate(inner))
        return gates[-1]

    rt1 = await kit.start([kit.source("pebble", broker.url, PEBBLE)], data_dir=data, wrap=gate)
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 1})
    await kit.wait_records(rt1, 1)
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 2, "hold": True})
    await asyncio.wait_for(gates[0].held.wait(), 10)
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 3})  # arrives, its submit is started (pipelined)

    async def both_stuck() -> bool:
        return gates[0].stuck == 2

    await kit.wait_for(both_stuck, what="the submits of seq 2 and 3 both started")
    assert seqs(await kit.records(rt1)) == [1]
    await kit.stop(rt1)  # cancels the source mid-submit: seq 2 and 3 are not acknowledged

    rt2 = await kit.start([kit.source("pebble", broker.url, PEBBLE)], data_dir=data)
    records = await kit.wait_records(rt2, 3)
    await asyncio.sleep(0.3)  # would a wrongly unacknowledged seq 1 come back too?
    assert seqs(await kit.records(rt2)) == [1, 2, 3], "1 acknowledged once journaled; 2 and 3 redelivered"
    assert len(records) == 3


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


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_journal_error_is_not_acknowledged_and_the_broker_redelivers(
    broker: Any, kit: Any, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    source = kit.source("pebble", broker.url, PEBBLE, protocol=protocol)
    rt = await kit.start([source], wrap=lambda inner: FailingJournal(inner, failures=2))
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 1}, version=protocol)

    (record,) = await kit.wait_records(rt, 1, timeout=15)
    assert seqs([record]) == [1]
    await broker.wait_log("Sending PUBLISH to isthmus-pebble (d1", count=2)  # redelivered twice, as a duplicate
    assert len(messages(caplog, "cannot journal", logging.ERROR)) == 1, "the journal failure is logged once"
    assert messages(caplog, "usable again", logging.INFO)
    await asyncio.sleep(0.3)
    assert len(await kit.records(rt)) == 1, "acknowledged after the successful commit: no further redelivery"


async def test_a_hung_broker_longer_than_keepalive_is_detected_and_the_source_reconnects(
    broker: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    source = kit.source(
        "pebble", broker.url, PEBBLE, keepalive=2, connect_timeout=1.0, reconnect_min=0.2, reconnect_max=1.0
    )
    rt = await kit.start([source])
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 1})
    await kit.wait_records(rt, 1)

    loop = asyncio.get_running_loop()
    paused_at = loop.time()
    broker.pause()  # SIGSTOP: no FIN, no RST; only the keep-alive can tell
    await kit.connected(rt, "pebble", 0, timeout=8)  # no PINGRESP within keep-alive: dropped
    await asyncio.sleep(max(0.0, 5.0 - (loop.time() - paused_at)))  # a 5 s outage, > 2x keep-alive
    broker.resume()

    await kit.connected(rt, "pebble", 1, timeout=10)
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 2})
    assert seqs(await kit.wait_records(rt, 2)) == [1, 2]
    assert len(messages(caplog, "lost", logging.WARNING)) == 1
    assert len(messages(caplog, "cannot connect", logging.WARNING)) <= 1, "retries are not logged one by one"
    assert len(messages(caplog, "reconnected to", logging.INFO)) == 1


async def test_qos2_is_completed_only_after_the_commit_and_retried_in_place_on_journal_errors(
    broker: Any, kit: Any
) -> None:
    # paho sends PUBREC on receipt, so the broker never resends a QoS 2 message: the source keeps it
    # and retries the commit itself; PUBCOMP follows the successful commit.
    subs = [{**PEBBLE[0], "qos": 2}]
    rt = await kit.start(
        [kit.source("pebble", broker.url, subs, reconnect_min=0.05)],
        wrap=lambda inner: FailingJournal(inner, failures=2),
    )
    await broker.wait_log("Sending SUBACK to isthmus-pebble")
    await kit.pub(broker.port, "pebble/n1/data", {"seq": 1}, qos=2)
    (record,) = await kit.wait_records(rt, 1)
    assert record.frame.meta["qos"] == 2
    await broker.wait_log("Received PUBCOMP from isthmus-pebble")
    assert "Sending PUBLISH to isthmus-pebble (d1" not in broker.log(), "no reconnect, no redelivery"


async def test_stopping_while_the_broker_is_down_is_prompt(mosquitto: Any, kit: Any) -> None:
    broker = mosquitto()
    rt = await kit.start([kit.source("pebble", broker.url, PEBBLE)])
    await kit.connected(rt, "pebble")
    await broker.astop()
    await kit.connected(rt, "pebble", 0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await kit.stop(rt)
    assert loop.time() - started < 2.0
