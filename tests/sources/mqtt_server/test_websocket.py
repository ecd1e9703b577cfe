"""MQTT over WebSocket on the HTTP port (``/mqtt``): real clients against uvicorn serving ``Runtime.asgi_app()``.

paho-mqtt speaks MQTT 3.1.1 and 5 over WebSocket; a raw client built on the ``websockets`` library
sends hand-cut binary messages (packets split across messages, several packets in one) and the
things a client must not send (text messages, no ``mqtt`` subprotocol).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import uvicorn
from paho.mqtt import client as paho
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from isthmus.config import SourceConfig, load_config
from isthmus.errors import ConfigError
from isthmus.message import Status
from isthmus.runtime.supervisor import Runtime, _Server
from isthmus.sources.mqtt_codec import Will, encode_connect, encode_disconnect, encode_publish
from isthmus.sources.mqtt_websocket import WebSocketTransport

if TYPE_CHECKING:
    from conftest import MqttInstance

HOST = "127.0.0.1"
TELEMETRY = "v1/devices/me/telemetry"
CONNACK, PUBACK, PUBREC, PUBCOMP, DISCONNECT = 2, 4, 5, 7, 14
MQTT = [Subprotocol("mqtt")]


@dataclass
class WsInstance:
    """A running Isthmus with an ``mqtt`` source, its HTTP port served by uvicorn."""

    mqtt: MqttInstance
    server: _Server
    task: asyncio.Task[None]
    http_port: int

    def url(self, path: str = "/mqtt") -> str:
        return f"ws://{HOST}:{self.http_port}{path}"

    async def raw(self, path: str = "/mqtt", subprotocols: list[Subprotocol] | None = MQTT) -> WsRawClient:
        """An open, not yet MQTT-connected raw WebSocket client."""
        ws = await connect(self.url(path), subprotocols=subprotocols, compression=None, proxy=None)
        return WsRawClient(ws)

    async def stop_http(self) -> None:
        """Stop uvicorn (once), as ``isthmus serve`` does first at shutdown."""
        if not self.task.done():
            self.server.should_exit = True
            await self.task


class WsRawClient:
    """A byte-level MQTT client over WebSocket: reads the server's packets from its binary messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = b""

    async def send(self, *messages: bytes | str) -> None:
        """Send each argument as one WebSocket message (binary for bytes, text for str)."""
        for message in messages:
            await self.ws.send(message)

    async def packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next packet as ``(packet type, body)``; raises ConnectionClosed when the server closed."""
        async with asyncio.timeout(timeout):
            while True:
                parsed = _parse(self.buffer)
                if parsed is not None:
                    packet, self.buffer = parsed
                    return packet
                message = await self.ws.recv()
                assert isinstance(message, bytes), f"text message from the server: {message!r}"
                self.buffer += message

    async def connect(self, version: int, username: str | None, **kwargs: Any) -> int:
        await self.send(encode_connect(kwargs.pop("client_id", "ws-raw"), version, username=username, **kwargs))
        ptype, body = await self.packet()
        assert ptype == CONNACK, (ptype, body)
        return body[1]

    async def closed_by_server(self, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Read until the server closes the WebSocket; return the packets it sent before."""
        packets = []
        while True:
            try:
                packets.append(await self.packet(timeout))
            except ConnectionClosed:
                return packets

    @property
    def close(self) -> tuple[int | None, str | None]:
        """The close code and reason the server sent."""
        return self.ws.close_code, self.ws.close_reason


def _parse(buffer: bytes) -> tuple[tuple[int, bytes], bytes] | None:
    """One MQTT packet off the front of ``buffer``, and the rest; ``None`` if incomplete."""
    if len(buffer) < 2:
        return None
    length, shift, i = 0, 0, 1
    while True:
        if i >= len(buffer):
            return None
        b = buffer[i]
        length |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if b < 0x80:
            break
    if len(buffer) < i + length:
        return None
    return (buffer[0] >> 4, buffer[i : i + length]), buffer[i + length :]


WsFactory = Callable[..., Awaitable[WsInstance]]


@pytest.fixture
async def ws_factory(mqtt_factory: Callable[..., Awaitable[MqttInstance]]) -> AsyncIterator[WsFactory]:
    """Start an ``mqtt`` instance and uvicorn on a free port serving its ``asgi_app()``."""
    running: list[WsInstance] = []

    async def make(**options: Any) -> WsInstance:
        mqtt = await mqtt_factory(**options)
        server = _Server(
            uvicorn.Config(mqtt.rt.asgi_app(), host=HOST, port=0, lifespan="off", log_config=None, access_log=False)
        )
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        instance = WsInstance(mqtt, server, task, port)
        running.append(instance)
        return instance

    yield make
    for instance in running:
        await instance.stop_http()


@pytest.fixture
async def ws(ws_factory: WsFactory) -> WsInstance:
    return await ws_factory()


class PahoWs:
    """A blocking paho-mqtt client over WebSocket (call its methods through ``asyncio.to_thread``)."""

    def __init__(self, port: int, version: int, token: str | None, client_id: str = "paho-ws") -> None:
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
            transport="websockets",
        )
        self.client.ws_set_options(path="/mqtt")
        if token is not None:
            self.client.username_pw_set(token)
        self.port = port
        self.connected = threading.Event()
        self.reason: Any = None
        self.client.on_connect = self._on_connect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.reason = reason
        self.connected.set()

    def connect(self, timeout: float = 5.0) -> int:
        """Connect; return the CONNACK reason code's value (paho maps 3.1.1 codes to MQTT 5 ones)."""
        self.client.connect(HOST, self.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(timeout), "no CONNACK"
        return int(self.reason.value)

    def publish(self, topic: str, payload: bytes, qos: int, timeout: float = 5.0) -> None:
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"not acknowledged: {topic} qos {qos}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- paho-mqtt


@pytest.mark.parametrize("version", [4, 5])
async def test_paho_over_websocket_publishes_and_each_message_is_journaled(ws: WsInstance, version: int) -> None:
    mqtt = ws.mqtt
    dev = await mqtt.device("pump", token=f"ws-token-v{version}")
    client = PahoWs(ws.http_port, version, dev.token)
    assert await asyncio.to_thread(client.connect) == 0
    sent = []
    try:
        for qos in (0, 1, 2, 1):
            payload = msgspec.json.encode({"qos": qos, "n": len(sent)})
            await asyncio.to_thread(client.publish, TELEMETRY, payload, qos)
            sent.append((qos, payload))
        # The TCP listener keeps working meanwhile.
        await mqtt.works(dev.token, version)
    finally:
        await asyncio.to_thread(client.close)
    records = [r for r in await mqtt.wait_records(dev.uid, len(sent) + 1) if r.frame.payload != b'{"fresh": 1}']
    assert [(r.frame.meta["qos"], r.frame.payload) for r in records] == sent
    for record in records:
        assert record.status is Status.OK, record.error
        assert record.frame.source == "mqtt" and record.frame.kind == "telemetry"
        assert record.frame.meta["topic"] == TELEMETRY
    assert mqtt.metric("isthmus_mqtt_connects_total", result="accepted") == 2  # WebSocket and TCP
    # paho sent DISCONNECT; the TCP check just closed its socket.
    await _until(lambda: mqtt.metric("isthmus_mqtt_disconnects_total", reason="client") == 1)
    assert mqtt.metric("isthmus_mqtt_connections") == 0


@pytest.mark.parametrize(("version", "token", "expected"), [(4, "nope", 0x87), (5, "nope", 0x87), (4, None, 0x86)])
async def test_paho_over_websocket_is_refused_with_a_bad_or_missing_token(
    ws: WsInstance, version: int, token: str | None, expected: int
) -> None:
    client = PahoWs(ws.http_port, version, token)
    try:
        assert await asyncio.to_thread(client.connect) == expected
    finally:
        await asyncio.to_thread(client.close)
    result = "not_authorized" if expected == 0x87 else "bad_credentials"
    assert ws.mqtt.metric("isthmus_mqtt_connects_total", result=result) == 1


# --------------------------------------------------------------------------- raw WebSocket messages


@pytest.mark.parametrize("version", [4, 5])
async def test_packets_split_across_messages_and_several_packets_in_one_message(ws: WsInstance, version: int) -> None:
    mqtt = ws.mqtt
    dev = await mqtt.device("raw", token=f"raw-ws-{version}")
    client = await ws.raw()
    connect_packet = encode_connect("split", version, username=dev.token)
    # CONNECT in three messages, the first one byte only (the fixed header is split too).
    await client.send(connect_packet[:1], connect_packet[1:7], connect_packet[7:])
    ptype, body = await client.packet()
    assert (ptype, body[:2]) == (CONNACK, b"\x00\x00")
    publishes = [encode_publish(TELEMETRY, b'{"n": %d}' % i, 1, i, version=version) for i in range(1, 7)]
    # Three PUBLISHes in one message; then one split in the middle of its payload, glued to the next.
    await client.send(b"".join(publishes[:3]))
    await client.send(publishes[3][:-3], publishes[3][-3:] + publishes[4][:5], publishes[4][5:])
    # One message in three WebSocket frames (continuation frames).
    await client.ws.send([publishes[5][:4], publishes[5][4:9], publishes[5][9:]])
    acks = [await client.packet() for _ in range(6)]
    assert [(ptype, int.from_bytes(body[:2], "big")) for ptype, body in acks] == [(PUBACK, i) for i in range(1, 7)]
    records = await mqtt.wait_records(dev.uid, 6)
    assert [r.frame.payload for r in records] == [b'{"n": %d}' % i for i in range(1, 7)]
    await client.send(encode_disconnect(0, version))
    assert await client.closed_by_server() == []
    assert client.close[0] == 1000


async def test_connack_over_websocket_is_the_same_as_over_tcp(ws: WsInstance) -> None:
    dev = await ws.mqtt.device("d", token="same")
    client = await ws.raw()
    await client.send(encode_connect("c", 5, username=dev.token))
    ptype, body = await client.packet()
    tcp = await ws.mqtt.raw()
    await tcp.send(encode_connect("c2", 5, username=dev.token))
    assert (ptype, body) == await tcp.packet()
    assert ptype == CONNACK and body[:2] == b"\x00\x00"


@pytest.mark.parametrize("version", [4, 5])
async def test_a_text_message_closes_the_connection(ws: WsInstance, version: int) -> None:
    mqtt = ws.mqtt
    dev = await mqtt.device("t", token=f"text-{version}")
    client = await ws.raw()
    assert await client.connect(version, dev.token) == 0
    await client.send(encode_publish(TELEMETRY, b'{"before": 1}', 1, 1, version=version))
    assert (await client.packet())[0] == PUBACK
    await client.send('{"temperature": 21}')
    expected = [(DISCONNECT, b"\x81")] if version == 5 else []
    assert await client.closed_by_server() == expected
    code, reason = client.close
    assert code == 1003 and reason is not None and "binary" in reason
    assert mqtt.metric("isthmus_mqtt_protocol_errors_total", reason="malformed_packet") == 1
    assert [r.frame.payload for r in await mqtt.records(dev.uid)] == [b'{"before": 1}']
    await _until(lambda: mqtt.metric("isthmus_mqtt_connections") == 0)
    await mqtt.works(dev.token)


@pytest.mark.parametrize("offered", [None, [Subprotocol("mqttv3.1")]])
async def test_a_client_not_offering_the_mqtt_subprotocol_is_refused(
    ws: WsInstance, offered: list[Subprotocol] | None
) -> None:
    dev = await ws.mqtt.device("d", token="no-subprotocol")
    client = await ws.raw(subprotocols=offered)
    assert client.ws.subprotocol is None
    with pytest.raises(ConnectionClosed):
        await client.connect(4, dev.token)
    code, reason = client.close
    assert code == 1002
    assert reason is not None and "subprotocol 'mqtt'" in reason
    assert ws.mqtt.metric("isthmus_mqtt_connects_total", result="accepted") == 0


async def test_the_mqtt_subprotocol_is_selected(ws: WsInstance) -> None:
    client = await ws.raw(subprotocols=[Subprotocol("chat"), Subprotocol("mqtt")])
    assert client.ws.subprotocol == "mqtt"
    await client.ws.close()


@pytest.mark.parametrize("path", ["/", "/mqtt/", "/other", "/api/v1/mqtt"])
async def test_other_paths_are_refused(ws: WsInstance, path: str) -> None:
    with pytest.raises(InvalidStatus) as excinfo:
        await ws.raw(path)
    assert excinfo.value.response.status_code == 403


async def test_a_dropped_websocket_journals_the_will(ws: WsInstance) -> None:
    mqtt = ws.mqtt
    dev = await mqtt.device("w", token="ws-will")
    client = await ws.raw()
    assert await client.connect(4, dev.token, will=Will(TELEMETRY, b'{"online": 0}')) == 0
    client.ws.transport.abort()  # no DISCONNECT, no WebSocket close
    (record,) = await mqtt.wait_records(dev.uid, 1)
    assert record.frame.payload == b'{"online": 0}'
    assert record.frame.meta == {"topic": TELEMETRY, "qos": 0, "will": True}
    await _until(lambda: mqtt.metric("isthmus_mqtt_disconnects_total", reason="connection_lost") == 1)
    assert mqtt.metric("isthmus_mqtt_connections") == 0


async def test_more_publishes_than_max_inflight_are_all_acknowledged_in_order(
    ws_factory: WsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[int] = []
    pause_reading = WebSocketTransport.pause_reading

    def counting_pause(self: WebSocketTransport) -> None:
        pauses.append(1)
        pause_reading(self)

    monkeypatch.setattr(WebSocketTransport, "pause_reading", counting_pause)
    ws = await ws_factory(max_inflight=4)
    dev = await ws.mqtt.device("many", token="many")
    client = await ws.raw()
    assert await client.connect(5, dev.token) == 0
    count = 60
    # One message each, sent at once: the server stops pulling messages while 4 are unacknowledged.
    await client.send(*(encode_publish(TELEMETRY, b'{"i": %d}' % i, 1, i, version=5) for i in range(1, count + 1)))
    acks = [await client.packet() for _ in range(count)]
    assert [(ptype, int.from_bytes(body[:2], "big")) for ptype, body in acks] == [
        (PUBACK, i) for i in range(1, count + 1)
    ]
    records = await ws.mqtt.wait_records(dev.uid, count)
    assert [r.frame.payload for r in records] == [b'{"i": %d}' % i for i in range(1, count + 1)]
    assert pauses  # the protocol paused reading the WebSocket at max_inflight


# --------------------------------------------------------------------------- lifecycle


async def test_refused_with_1013_while_the_source_is_not_running(ws: WsInstance) -> None:
    await ws.mqtt.stop()  # the source stops; the HTTP port still serves
    client = await ws.raw()
    assert client.ws.subprotocol == "mqtt"
    with pytest.raises(ConnectionClosed):
        await client.packet()
    assert client.close[0] == 1013


async def test_stopping_the_source_disconnects_websocket_clients_with_0x8b(ws: WsInstance) -> None:
    dev = await ws.mqtt.device("d", token="ws-stop")
    v5 = await ws.raw()
    assert await v5.connect(5, dev.token, will=Will(TELEMETRY, b'{"will": 1}')) == 0
    v4 = await ws.raw()
    assert await v4.connect(4, dev.token, client_id="v4") == 0
    await ws.mqtt.stop()
    assert await v5.closed_by_server() == [(DISCONNECT, b"\x8b")]
    assert await v4.closed_by_server() == []
    assert v5.close[0] == v4.close[0] == 1001


async def test_http_shutdown_closes_websocket_clients_without_journaling_their_wills(ws: WsInstance) -> None:
    mqtt = ws.mqtt
    dev = await mqtt.device("d", token="ws-http-stop")
    client = await ws.raw()
    assert await client.connect(5, dev.token, will=Will(TELEMETRY, b'{"will": 1}')) == 0
    await client.send(encode_publish(TELEMETRY, b'{"kept": 1}', 1, 1, version=5))
    assert (await client.packet())[0] == PUBACK
    stopping = asyncio.create_task(ws.stop_http())
    assert await client.closed_by_server() == []
    assert client.close[0] == 1012  # uvicorn: service restart
    await stopping
    await _until(lambda: mqtt.metric("isthmus_mqtt_connections") == 0)
    assert mqtt.metric("isthmus_mqtt_disconnects_total", reason="shutdown") == 1
    await asyncio.sleep(0.2)
    assert [r.frame.payload for r in await mqtt.records(dev.uid)] == [b'{"kept": 1}']
    await mqtt.works(dev.token)  # the TCP listener is still up


# --------------------------------------------------------------------------- options


def _runtime(tmp_path: Path, *sources: dict[str, Any]) -> Runtime:
    config = load_config(None, {"ISTHMUS_DATA_DIR": str(tmp_path)})
    configs = [SourceConfig(name=f"mqtt{i}", type="mqtt", options={"port": 0, **s}) for i, s in enumerate(sources)]
    return Runtime(config.model_copy(update={"sources": configs}))


def test_websocket_path_is_registered_and_can_be_disabled_or_moved(tmp_path: Path) -> None:
    rt = _runtime(tmp_path, {}, {"websocket_path": None}, {"websocket_path": "/devices/mqtt"})
    assert sorted(rt.websockets) == ["/devices/mqtt", "/mqtt"]


def test_two_sources_on_their_defaults_the_first_one_serves_mqtt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = _runtime(tmp_path, {"websocket_path": "/a"}, {}, {})
    assert sorted(rt.websockets) == ["/a", "/mqtt"]
    assert rt.websockets["/mqtt"].server is rt.sources["mqtt1"]  # type: ignore[attr-defined]
    assert "mqtt source mqtt2: /mqtt is served by another source" in caplog.text


@pytest.mark.parametrize(("first", "second"), [({}, {"websocket_path": "/mqtt"}), ({"websocket_path": "/x"},) * 2])
def test_a_websocket_path_set_on_a_taken_path_is_a_config_error(
    tmp_path: Path, first: dict[str, Any], second: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError, match=r"'/[a-z]+' is already served by another source"):
        _runtime(tmp_path, first, second)


def test_a_websocket_path_must_start_with_a_slash(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='websocket_path must start with "/"'):
        _runtime(tmp_path, {"websocket_path": "mqtt"})


# --------------------------------------------------------------------------- the transport in isolation


class _Protocol:
    """Records what a WebSocketTransport tells its protocol; pauses reading after ``pause_after`` messages."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.transport: WebSocketTransport | None = None
        self.received: list[bytes] = []
        self.calls: list[str] = []
        self.lost: list[Exception | None] = []
        self.pause_after = pause_after

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        if self.pause_after is not None and len(self.received) >= self.pause_after and self.transport is not None:
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.calls.append("pause_writing")

    def resume_writing(self) -> None:
        self.calls.append("resume_writing")

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class _Asgi:
    """The ASGI server side: a receive queue, and a send that can be held at a gate."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.receives = 0
        self.sent: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await self.gate.wait()
        self.sent.append(message)

    def data(self) -> bytes:
        return b"".join(m["bytes"] for m in self.sent if m["type"] == "websocket.send")

    def closes(self) -> list[tuple[int, str]]:
        return [(m["code"], m["reason"]) for m in self.sent if m["type"] == "websocket.close"]


def _transport(asgi: _Asgi, protocol: _Protocol, *, stopping: bool = False) -> WebSocketTransport:
    scope = {"type": "websocket", "path": "/mqtt", "client": ["10.0.0.7", 50123], "server": ["10.0.0.1", 8080]}
    transport = WebSocketTransport(scope, asgi.send, SimpleNamespace(stopping=stopping))  # type: ignore[arg-type]
    transport.set_protocol(protocol)  # type: ignore[arg-type]
    protocol.transport = transport
    return transport


def _serve(transport: WebSocketTransport, protocol: _Protocol, asgi: _Asgi) -> asyncio.Task[None]:
    return asyncio.create_task(transport.serve(protocol, asgi.receive))  # type: ignore[arg-type]


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_transport_extra_info_and_buffer_limits() -> None:
    transport = _transport(_Asgi(), _Protocol())
    assert transport.get_extra_info("peername") == ("10.0.0.7", 50123)
    assert transport.get_extra_info("sockname") == ("10.0.0.1", 8080)
    assert transport.get_extra_info("ssl_object") is None
    assert transport.get_extra_info("subprotocol") == "mqtt"
    assert transport.get_extra_info("nothing", 7) == 7
    assert transport.get_write_buffer_limits() == (16384, 65536)
    transport.set_write_buffer_limits(high=1000)
    assert transport.get_write_buffer_limits() == (250, 1000)
    with pytest.raises(ValueError, match="must be >="):
        transport.set_write_buffer_limits(high=10, low=20)
    assert not transport.can_write_eof()


async def test_transport_writes_in_order_and_pauses_the_protocol_above_the_high_water_mark() -> None:
    asgi, protocol = _Asgi(), _Protocol()
    transport = _transport(asgi, protocol)
    transport.set_write_buffer_limits(high=100, low=30)
    asgi.gate.clear()  # the client does not read
    task = _serve(transport, protocol, asgi)
    chunks = [bytes([i]) * 40 for i in range(1, 6)]
    for chunk in chunks[:3]:
        transport.write(chunk)  # synchronous: queued, never blocks
    await _settle()
    assert transport.get_write_buffer_size() == 120
    assert protocol.calls == ["pause_writing"]
    transport.write(chunks[3])
    assert protocol.calls == ["pause_writing"]  # told once
    asgi.gate.set()
    await _settle()
    assert protocol.calls == ["pause_writing", "resume_writing"]
    assert transport.get_write_buffer_size() == 0
    transport.write(chunks[4])
    transport.close()
    assert transport.is_closing()
    transport.write(b"after close")  # ignored
    await asyncio.wait_for(task, 5)
    assert asgi.data() == b"".join(chunks)
    assert asgi.closes() == [(1000, "")]
    assert asgi.sent[-1]["type"] == "websocket.close"
    assert protocol.lost == [None]


async def test_transport_stops_pulling_messages_while_reading_is_paused() -> None:
    asgi, protocol = _Asgi(), _Protocol(pause_after=1)
    transport = _transport(asgi, protocol)
    task = _serve(transport, protocol, asgi)
    for i in range(3):
        asgi.incoming.put_nowait({"type": "websocket.receive", "bytes": b"m%d" % i})
    await _settle()
    assert protocol.received == [b"m0"]
    assert asgi.receives == 1 and asgi.incoming.qsize() == 2  # the rest waits in the ASGI server
    assert not transport.is_reading()
    protocol.pause_after = None
    transport.resume_reading()
    await _settle()
    assert protocol.received == [b"m0", b"m1", b"m2"]
    asgi.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(task, 5)
    assert protocol.lost == [None]
    assert asgi.closes() == []  # the client closed it


async def test_transport_abort_drops_queued_data_even_when_the_client_does_not_read() -> None:
    asgi, protocol = _Asgi(), _Protocol()
    transport = _transport(asgi, protocol)
    asgi.gate.clear()
    task = _serve(transport, protocol, asgi)
    transport.write(b"stuck")
    transport.write(b"dropped")
    await _settle()
    transport.abort()
    transport.abort()
    transport.close()
    await asyncio.wait_for(task, 5)
    assert asgi.data() == b""
    assert asgi.closes() == [(1013, "")]
    assert protocol.lost == [None]


async def test_transport_close_while_stopping_says_going_away() -> None:
    asgi, protocol = _Asgi(), _Protocol()
    transport = _transport(asgi, protocol, stopping=True)
    task = _serve(transport, protocol, asgi)
    transport.write(b"last")
    transport.close()
    await asyncio.wait_for(task, 5)
    assert asgi.data() == b"last"
    assert asgi.closes() == [(1001, "")]
    assert protocol.lost == [None]


async def test_transport_http_server_shutdown_shuts_the_connection_down() -> None:
    asgi, protocol = _Asgi(), _Protocol()
    transport = _transport(asgi, protocol)
    task = _serve(transport, protocol, asgi)
    asgi.incoming.put_nowait({"type": "websocket.disconnect", "code": 1012})
    await asyncio.wait_for(task, 5)
    assert protocol.calls == ["shutdown"]
    assert protocol.lost == [None]
    assert asgi.sent == []  # the WebSocket is closed already


async def test_transport_send_failure_ends_the_connection_once() -> None:
    asgi, protocol = _Asgi(), _Protocol()
    transport = _transport(asgi, protocol)

    async def failing_send(message: dict[str, Any]) -> None:
        raise OSError("client disconnected")

    transport._send = failing_send
    task = _serve(transport, protocol, asgi)
    transport.write(b"x")
    await asyncio.wait_for(task, 5)
    assert len(protocol.lost) == 1 and isinstance(protocol.lost[0], OSError)
    assert transport.is_closing()
