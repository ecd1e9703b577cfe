"""Fixtures of the MQTT client source tests: real mosquitto brokers, Isthmus runtimes, publishers.

Each broker is a ``mosquitto`` process on 127.0.0.1 with an ephemeral port and a configuration
file written here. Brokers, runtimes and publishers started by a test are stopped after it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from isthmus.config import SourceConfig, load_config
from isthmus.interfaces import Ingest, RecordQuery
from isthmus.message import Record
from isthmus.runtime.supervisor import Runtime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process; restartable on the same port (with its persistence file)."""

    def __init__(self, workdir: Path, *, extra: Sequence[str] = (), persistence: bool = False) -> None:
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not installed (run 'make system-deps')")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.logfile = workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"log_dest file {self.logfile}",
            "log_type all",
        ]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # else mosquitto drops to user 'mosquitto' and cannot write here
        if persistence:
            lines += ["persistence true", f"persistence_location {workdir}/"]
        lines += list(extra)
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _spawn(self) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            self.proc = None
            pytest.fail(f"mosquitto exited at start:\n{log}")

    def start(self) -> None:
        """Start and wait until the port accepts connections (blocking: for use outside a running test)."""
        self._spawn()
        for _ in range(250):
            self._check_alive()
            if self._listening():
                return
            threading.Event().wait(0.02)
        pytest.fail("mosquitto did not start listening within 5 s")

    async def astart(self) -> None:
        """Start without blocking the event loop (the runtime under test keeps running)."""
        self._spawn()
        for _ in range(250):
            self._check_alive()
            if await _alistening(self.port):
                return
            await asyncio.sleep(0.02)
        pytest.fail("mosquitto did not start listening within 5 s")

    async def astop(self, sig: int = signal.SIGTERM) -> None:
        """Stop with ``sig`` and wait for the exit (SIGTERM: mosquitto saves its persistence file)."""
        proc = self.proc
        assert proc is not None
        if self.paused:
            self.resume()
        proc.send_signal(sig)
        for _ in range(500):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        else:
            proc.kill()
            proc.wait()
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the broker's sockets stay open but nothing answers (a hung or partitioned broker)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        if self.proc is not None:
            if self.paused:
                self.resume()
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    async def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``text`` appears ``count`` times in the broker's log (e.g. a SUBACK to a client)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.log().count(text) < count:
            if loop.time() > deadline:
                raise AssertionError(f"{text!r} not {count}x in the mosquitto log within {timeout} s")
            await asyncio.sleep(0.02)


async def _alistening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Factory: ``mosquitto(extra=[...], persistence=False, start=True)`` → a running broker."""
    brokers: list[Mosquitto] = []

    def make(*, extra: Sequence[str] = (), persistence: bool = False, start: bool = True) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"broker{len(brokers)}", extra=extra, persistence=persistence)
        brokers.append(broker)
        if start:
            broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def broker(mosquitto: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain mosquitto (anonymous, no persistence)."""
    return mosquitto()


class Publisher:
    """A paho client in its own network thread with a persistent session, as a device fleet would run.

    ``acked`` holds the payload of every QoS 1 message the broker acknowledged (PUBACK).
    """

    def __init__(self, port: int, client_id: str = "test-publisher", protocol: str = "5") -> None:
        v5 = protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        )
        self.client.reconnect_delay_set(1, 1)
        self.sent: dict[int, bytes] = {}
        self.acked: list[bytes] = []
        self.early: set[int] = set()
        self.lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.connected = threading.Event()
        self.client.on_connect = lambda *a: self.connected.set()
        if v5:
            self.client.connect_async("127.0.0.1", port, 60, clean_start=False)
        else:
            self.client.connect_async("127.0.0.1", port, 60)
        self.client.loop_start()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self.lock:
            payload = self.sent.pop(mid, None)
            if payload is None:
                self.early.add(mid)  # acknowledged before publish() returned its mid
            else:
                self.acked.append(payload)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        # Not under self.lock: paho holds its own lock while calling on_publish (lock-order inversion).
        info = self.client.publish(topic, payload, qos=qos)
        if qos > 0:
            with self.lock:
                if info.mid in self.early:
                    self.early.discard(info.mid)
                    self.acked.append(payload)
                else:
                    self.sent[info.mid] = payload

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Messages published before the first CONNACK are sent after it, out of order with later ones."""
        assert await asyncio.to_thread(self.connected.wait, timeout), "the publisher did not connect"

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publishers() -> Iterator[Callable[..., Awaitable[Publisher]]]:
    made: list[Publisher] = []

    async def make(port: int, client_id: str = "test-publisher", protocol: str = "5") -> Publisher:
        """A connected publisher."""
        p = Publisher(port, client_id, protocol)
        made.append(p)
        await p.wait_connected()
        return p

    yield make
    for p in made:
        p.stop()


class Kit:
    """Runtimes with mqtt-client sources, publishing through mosquitto_pub, polling helpers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.running: list[Runtime] = []

    @staticmethod
    def source(name: str, url: str, subscriptions: list[dict[str, Any]], **options: Any) -> SourceConfig:
        opts = {"url": url, "reconnect_min": 0.05, "reconnect_max": 0.5, "connect_timeout": 2.0}
        return SourceConfig(name=name, type="mqtt-client", options={**opts, "subscriptions": subscriptions, **options})

    async def start(
        self,
        sources: list[SourceConfig],
        *,
        data_dir: Path | None = None,
        wrap: Callable[[Ingest], Ingest] | None = None,
    ) -> Runtime:
        """A started runtime with ``sources`` (``wrap`` replaces its ingest before the sources start)."""
        env = {"ISTHMUS_DATA_DIR": str(data_dir or self.tmp / "data"), "ISTHMUS_JOURNAL__SYNCHRONOUS": "normal"}
        config = load_config(None, env).model_copy(update={"sources": sources})
        rt = Runtime(config)
        if wrap is not None:
            rt.ingest = wrap(rt.ingest)  # type: ignore[assignment]
        await rt.start()
        self.running.append(rt)
        return rt

    async def stop(self, rt: Runtime) -> None:
        self.running.remove(rt)
        await rt.stop()

    @staticmethod
    async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0, what: str = "") -> Any:
        """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = await predicate()
            if result:
                return result
            if loop.time() > deadline:
                raise AssertionError(f"not reached within {timeout} s: {what} (last: {result!r})")
            await asyncio.sleep(0.02)

    @staticmethod
    async def records(rt: Runtime, **query: Any) -> list[Record]:
        """Journal records, oldest first."""
        return await rt.journal.query(RecordQuery(limit=100_000, newest_first=False, **query))

    async def wait_records(self, rt: Runtime, count: int, timeout: float = 10.0, **query: Any) -> list[Record]:
        async def enough() -> list[Record] | None:
            found = await self.records(rt, **query)
            return found if len(found) >= count else None

        result: list[Record] = await self.wait_for(enough, timeout, f"{count} records")
        return result

    @staticmethod
    def sample(rt: Runtime, name: str, **labels: str) -> float:
        value = rt.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @staticmethod
    async def pub(
        port: int,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        qos: int = 1,
        version: str = "5",
        extra: Sequence[str] = (),
    ) -> None:
        """Publish once with ``mosquitto_pub``."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        if isinstance(payload, bytes):
            payload = payload.decode()
        v = "mqttv5" if version == "5" else "mqttv311"
        proc = await asyncio.create_subprocess_exec(
            "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", v, "-q", str(qos), "-t", topic,
            "-m", payload, *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        assert proc.returncode == 0, f"mosquitto_pub failed: {err.decode()}"

    @staticmethod
    async def connected(rt: Runtime, source: str, value: float = 1.0, timeout: float = 10.0) -> None:
        async def check() -> bool:
            return Kit.sample(rt, "isthmus_mqtt_client_connected", source=source) == value

        await Kit.wait_for(check, timeout, f"source {source} connected == {value}")


@pytest.fixture
async def kit(tmp_path: Path) -> AsyncIterator[Kit]:
    k = Kit(tmp_path)
    yield k
    for rt in list(k.running):
        await k.stop(rt)
