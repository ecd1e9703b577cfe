"""Fixtures for the MQTT server tests: a real runtime with an ``mqtt`` source, raw and paho clients.

Everything runs on loopback: the server is started through :class:`~isthmus.runtime.supervisor.Runtime`
exactly as ``isthmus serve`` does, devices are created in its registry, and assertions read its
journal. Clients are real: a raw socket client built from the codec's client-side encoders (to
see every byte the server sends), paho-mqtt in both protocol versions, mosquitto_pub and tb-mqtt-client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import client as paho

from isthmus.config import SourceConfig, load_config
from isthmus.interfaces import RecordQuery
from isthmus.message import Record
from isthmus.registry.models import PhysicalDevice, PhysicalDeviceCreate
from isthmus.runtime.supervisor import Runtime
from isthmus.sources.mqtt_codec import Will, encode_connect
from isthmus.sources.mqtt_server import MqttServer

HOST = "127.0.0.1"

# Packet types of server-to-client packets, as read by RawClient.packet().
CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 2, 3, 4, 5, 6, 7
SUBACK, UNSUBACK, PINGRESP, DISCONNECT = 9, 11, 13, 14


class RawClient:
    """A byte-level MQTT client: sends whatever it is given, returns the server's packets undecoded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next packet as ``(packet type, body)``; raises EOFError when the server closed."""
        b0, body = await self.raw_packet(timeout)
        return b0 >> 4, body

    async def raw_packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next packet as ``(first byte, body)`` (type and flags); EOFError when the server closed."""
        async with asyncio.timeout(timeout):
            try:
                b0 = (await self.reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    b = (await self.reader.readexactly(1))[0]
                    length |= (b & 0x7F) << shift
                    shift += 7
                    if b < 0x80:
                        break
                body = await self.reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise EOFError("server closed the connection") from None
        return b0, body

    async def connect(
        self,
        version: int = 4,
        username: str | None = None,
        *,
        client_id: str = "raw",
        keepalive: int = 60,
        will: Will | None = None,
        properties: dict[str, Any] | None = None,
    ) -> int:
        """Send CONNECT, return the CONNACK's return / reason code."""
        await self.send(
            encode_connect(client_id, version, username=username, keepalive=keepalive, will=will, properties=properties)
        )
        ptype, body = await self.packet()
        assert ptype == CONNACK, (ptype, body)
        return body[1]

    async def ack(self, timeout: float = 5.0) -> tuple[int, int, int]:
        """The next packet as ``(packet type, packet id, reason code)`` (for PUBACK, PUBREC, PUBCOMP)."""
        ptype, body = await self.packet(timeout)
        return (ptype, *ack_id_and_code(body))

    async def closed_by_server(self, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Read until the server closes; return what it sent before (e.g. a DISCONNECT)."""
        packets = []
        while True:
            try:
                packets.append(await self.packet(timeout))
            except (EOFError, ConnectionResetError):
                return packets

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.wait_closed()


def ack_id_and_code(body: bytes) -> tuple[int, int]:
    """Packet id and reason code (0 when absent) of a PUBACK / PUBREC / PUBCOMP body."""
    return int.from_bytes(body[:2], "big"), body[2] if len(body) > 2 else 0


@dataclass
class MqttInstance:
    """A running Isthmus with an ``mqtt`` source called ``mqtt``."""

    rt: Runtime
    server: MqttServer
    tmp: Path
    stopped: bool = False
    _clients: list[RawClient] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.bound["tcp"]

    @property
    def tls_port(self) -> int:
        return self.server.bound["tls"]

    async def device(self, name: str = "dev", **extra: Any) -> PhysicalDevice:
        return await asyncio.to_thread(self.rt.store.create_physical, PhysicalDeviceCreate(name=name, **extra))

    async def records(self, p_uid: int | None = None) -> list[Record]:
        """The device's records, oldest first."""
        return await self.rt.journal.query(RecordQuery(p_uid=p_uid, newest_first=False, limit=10_000))

    async def wait_records(self, p_uid: int | None, count: int, timeout: float = 5.0) -> list[Record]:
        """Poll until the device has at least ``count`` records; return them oldest first."""
        async with asyncio.timeout(timeout):
            while True:
                records = await self.records(p_uid)
                if len(records) >= count:
                    return records
                await asyncio.sleep(0.02)

    def metric(self, name: str, **labels: str) -> float:
        value = self.rt.metrics.registry.get_sample_value(name, {"source": "mqtt", **labels})
        return 0.0 if value is None else value

    async def raw(self, *, tls: ssl.SSLContext | None = None) -> RawClient:
        """An open, not yet connected raw client (closed at the end of the test)."""
        port = self.tls_port if tls is not None else self.port
        reader, writer = await asyncio.open_connection(HOST, port, ssl=tls)
        client = RawClient(reader, writer)
        self._clients.append(client)
        return client

    async def works(self, token: str, version: int = 5) -> None:
        """A fresh client still connects and gets a QoS 1 message acknowledged."""
        from isthmus.sources.mqtt_codec import encode_publish

        client = await self.raw()
        assert await client.connect(version, token, client_id="fresh") == 0
        await client.send(encode_publish("v1/devices/me/telemetry", b'{"fresh": 1}', 1, 77, version=version))
        ptype, body = await client.packet()
        assert (ptype, ack_id_and_code(body)) == (PUBACK, (77, 0))
        await client.close()

    async def stop(self) -> None:
        """Stop the runtime (once)."""
        if not self.stopped:
            self.stopped = True
            await self.rt.stop()

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()
        await self.stop()


MqttFactory = Callable[..., Awaitable[MqttInstance]]


@pytest.fixture
async def mqtt_factory(tmp_path: Path) -> AsyncIterator[MqttFactory]:
    """Start runtimes whose ``mqtt`` source has the given options (loopback, a free port)."""
    running: list[MqttInstance] = []

    async def make(**options: Any) -> MqttInstance:
        data = tmp_path / f"data{len(running)}"
        config = load_config(None, {"ISTHMUS_DATA_DIR": str(data)})
        opts = {"host": HOST, "port": 0, **options}
        config = config.model_copy(update={"sources": [SourceConfig(name="mqtt", type="mqtt", options=opts)]})
        rt = Runtime(config)
        await rt.start()
        server = rt.sources["mqtt"]
        assert isinstance(server, MqttServer)
        instance = MqttInstance(rt, server, tmp_path)
        running.append(instance)
        async with asyncio.timeout(5):
            while len(server.bound) < (opts["port"] is not None) + (opts.get("tls_port") is not None):
                await asyncio.sleep(0.01)
        return instance

    yield make
    for instance in running:
        await instance.aclose()


@pytest.fixture
async def mqtt(mqtt_factory: MqttFactory) -> MqttInstance:
    """A runtime with the ``mqtt`` source on its defaults (plain TCP only)."""
    return await mqtt_factory()


# --------------------------------------------------------------------------- paho


class PahoDevice:
    """A blocking paho-mqtt client (call its methods through ``asyncio.to_thread``)."""

    def __init__(self, port: int, version: int, token: str | None, client_id: str = "paho", **tls: Any) -> None:
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
        )
        if token is not None:
            self.client.username_pw_set(token)
        if tls:
            self.client.tls_set_context(tls["context"])
        self.port = port
        self.connected = threading.Event()
        self.reason: Any = None
        self.acks: dict[int, Any] = {}
        self.acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.reason = reason
        self.connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self.acked:
            self.acks[mid] = reason
            self.acked.notify_all()

    def connect(self, timeout: float = 5.0) -> int:
        """Connect; return the CONNACK reason code's value (paho maps 3.1.1 codes to MQTT 5 ones)."""
        self.client.connect(HOST, self.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(timeout), "no CONNACK"
        return int(self.reason.value)

    def publish(self, topic: str, payload: bytes, qos: int, timeout: float = 5.0) -> int:
        """Publish and wait until paho reports it done (PUBACK / PUBCOMP); return the reason code."""
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"not acknowledged: {topic} qos {qos}"
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, timeout)
            return int(self.acks[info.mid].value)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho_device() -> type[PahoDevice]:
    """The :class:`PahoDevice` class (test modules cannot import from conftest under importlib mode)."""
    return PahoDevice


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certs:
    """A test PKI: a CA, a server certificate for 127.0.0.1 and two client certificates."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_cert: Path
    other_key: Path

    @staticmethod
    def fingerprint(cert: Path) -> str:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            context.load_cert_chain(str(cert), str(key))
        return context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Generate the PKI once per session with the openssl command-line tool."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)

    def issue(name: str, *ext: str) -> None:
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        extfile = d / f"{name}.ext"
        extfile.write_text("\n".join(ext) + "\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", str(extfile), cwd=d,
        )  # fmt: skip

    issue("server", "subjectAltName=IP:127.0.0.1,DNS:localhost", "extendedKeyUsage=serverAuth")
    issue("device", "extendedKeyUsage=clientAuth")
    issue("stranger", "extendedKeyUsage=clientAuth")
    return Certs(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "device.pem", d / "device.key",
        d / "stranger.pem", d / "stranger.key",
    )  # fmt: skip
