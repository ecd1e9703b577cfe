"""MQTT over WebSocket on the HTTP port (MQTT 3.1.1 / 5.0 section 6), for the ``mqtt`` source.

:class:`MqttWebSocketApp` is the ASGI application the ``mqtt`` source registers in
:attr:`~isthmus.plugins.SourceContext.websockets` (path ``websocket_path``, ``/mqtt`` by default).
It does not speak MQTT itself: it wraps the WebSocket in :class:`WebSocketTransport`, an
:class:`asyncio.Transport` look-alike, and hands that to the very protocol class the TCP and TLS
listeners use (:meth:`~isthmus.sources.mqtt_server.MqttServer.accept_transport`). Authentication,
acknowledgements after the journal commit, limits, keep-alive, wills and metrics are therefore
the same on every transport.

The adaptation, in the order bytes meet it:

* **Handshake.** The client must offer the WebSocket subprotocol ``mqtt`` (section 6); the
  connection is accepted with it. A client that does not offer it is accepted without a
  subprotocol and closed at once with 1002 *protocol error* and a reason saying why (a close
  code reaches every WebSocket client, browsers included; a refused handshake would not tell
  them anything). While the source is not running, connections are closed with 1013 *try again
  later*.
* **Reading.** A reader task pulls ASGI ``receive`` and feeds every binary message to
  ``protocol.data_received``: the packet decoder reads a stream, so packets may span messages
  and a message may hold several packets. When the protocol pauses reading, the task stops
  pulling ``receive``; the ASGI server then stops reading the socket (uvicorn does so as soon as
  one message waits), which is TCP back-pressure as on the plain listener. A text message is a
  protocol error (section 6: MQTT is carried in binary frames only): it is handled like a
  malformed packet and the WebSocket is closed with 1003 *unsupported data*.
* **Writing.** Protocol callbacks are synchronous, ASGI ``send`` is not: ``write`` queues the
  bytes and a writer task sends them, in order, coalescing what queued up meanwhile into one
  binary message (a group commit's acks leave together). Above the high-water mark the protocol
  is told ``pause_writing`` (it then stops reading the client, as over TCP), below the low one
  ``resume_writing``.
* **Closing.** ``close`` sends what is queued, then a close frame (1000; 1001 when the server is
  shutting down); ``abort`` drops the queue. ``connection_lost`` is called exactly once, when the
  WebSocket has ended either way. When the HTTP server itself shuts down it closes WebSockets
  first (1012 *service restart*, before the sources stop): such a connection is ended as at the
  source's own shutdown, without journaling its will.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from isthmus.sources.mqtt_codec import ProtocolError

if TYPE_CHECKING:
    from isthmus.sources.mqtt_server import MqttServer, _Connection

__all__ = ["SUBPROTOCOL", "MqttWebSocketApp", "WebSocketTransport"]

log = logging.getLogger(__name__)

SUBPROTOCOL: Final = "mqtt"
"""The WebSocket subprotocol MQTT clients must offer (MQTT 5.0 section 6)."""

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_TRY_AGAIN_LATER: Final = 1013

NO_SUBPROTOCOL_REASON: Final = "MQTT over WebSocket needs the subprotocol 'mqtt' (Sec-WebSocket-Protocol: mqtt)"
TEXT_FRAME_REASON: Final = "MQTT over WebSocket is carried in binary messages only"
NOT_RUNNING_REASON: Final = "MQTT server not running; try again later"

_HIGH_WATER: Final = 64 * 1024  # asyncio's default write-buffer limits
_MAX_MESSAGE: Final = 64 * 1024  # queued writes are coalesced into messages up to about this size
_ABORT_CLOSE: Final = 1.0  # seconds an aborted connection's close frame may take to go out
_MALFORMED_PACKET: Final = 0x81

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[Any], Awaitable[None]]


class MqttWebSocketApp:
    """The ASGI ``websocket`` application serving one ``mqtt`` source's ``websocket_path``."""

    def __init__(self, server: MqttServer) -> None:
        self.server = server

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Serve one WebSocket connection until either side ends it."""
        message = await receive()
        if message["type"] != "websocket.connect":  # the client went away during the handshake
            return
        if SUBPROTOCOL not in (scope.get("subprotocols") or ()):
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": CLOSE_PROTOCOL_ERROR, "reason": NO_SUBPROTOCOL_REASON})
            return
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
        transport = WebSocketTransport(scope, send, self.server)
        protocol = self.server.accept_transport(transport)
        if protocol is None:
            await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER, "reason": NOT_RUNNING_REASON})
            return
        await transport.serve(protocol, receive)


class WebSocketTransport(asyncio.Transport):
    """An accepted ASGI WebSocket seen as an :class:`asyncio.Transport` by an MQTT connection protocol.

    Built by :class:`MqttWebSocketApp`, which then runs :meth:`serve` in the ASGI task until the
    WebSocket has ended. ``get_extra_info`` knows ``peername`` and ``sockname`` (from the ASGI
    scope's ``client`` and ``server``), ``ssl_object`` (always ``None``: TLS, if any, ends in
    the HTTP server, and client certificates are not passed through ASGI), ``subprotocol`` and
    ``path``.
    """

    def __init__(self, scope: MutableMapping[str, Any], send: Send, server: MqttServer) -> None:
        client, local = scope.get("client"), scope.get("server")
        super().__init__(
            {
                "peername": tuple(client) if client else None,
                "sockname": tuple(local) if local else None,
                "ssl_object": None,
                "sslcontext": None,
                "subprotocol": SUBPROTOCOL,
                "path": scope.get("path"),
            }
        )
        self._send = send
        self._server = server
        self._protocol: _Connection | None = None
        self._queue: deque[bytes] = deque()
        self._queued = 0  # bytes queued or being sent
        self._high = _HIGH_WATER
        self._low = _HIGH_WATER // 4
        self._writing_paused = False  # the protocol was told pause_writing()
        self._reading = asyncio.Event()
        self._reading.set()
        self._wake = asyncio.Event()  # the writer has something to do
        self._closing = False  # close() or abort() was called, or the peer is gone
        self._aborted = False
        self._peer_gone = False  # nothing can be sent any more
        self._close_sent = False
        self._close_code = CLOSE_NORMAL
        self._close_reason = ""
        self._lost = False
        self._error: Exception | None = None
        self._writer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the asyncio.Transport API

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the writer task; tell the protocol to pause above the high-water mark."""
        if self._closing or not data:
            return
        chunk = bytes(data)
        self._queue.append(chunk)
        self._queued += len(chunk)
        self._wake.set()
        if not self._writing_paused and self._queued > self._high and self._protocol is not None:
            self._writing_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        """No half-close over a WebSocket."""
        return False

    def get_write_buffer_size(self) -> int:
        """Bytes queued or being sent."""
        return self._queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """``(low, high)`` water marks."""
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the water marks, defaulting like asyncio's transports (64 KiB, high / 4)."""
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def pause_reading(self) -> None:
        """Stop pulling messages from the ASGI server (which then stops reading the socket)."""
        self._reading.clear()

    def resume_reading(self) -> None:
        """Pull messages again."""
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set() and not self._closing

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, then the close frame; ``connection_lost`` follows."""
        if self._closing:
            return
        self._closing = True
        if self._server.stopping and self._close_code == CLOSE_NORMAL:
            self._close_code = CLOSE_GOING_AWAY
        self._wake.set()

    def abort(self) -> None:
        """Drop what is queued and close at once; ``connection_lost`` follows."""
        if self._aborted or self._peer_gone:
            return
        self._closing = self._aborted = True
        if self._close_code == CLOSE_NORMAL:
            self._close_code = CLOSE_GOING_AWAY if self._server.stopping else CLOSE_TRY_AGAIN_LATER
        self._drop_queue()
        if self._writer is not None:
            self._writer.cancel()  # it may be waiting for a client that does not read

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        if self._protocol is None:
            raise RuntimeError("no protocol yet")
        return self._protocol

    # ------------------------------------------------------------------ serving

    async def serve(self, protocol: _Connection, receive: Receive) -> None:
        """Run the connection until the WebSocket has ended; then call ``connection_lost`` (once)."""
        self._protocol = protocol
        loop = asyncio.get_running_loop()
        self._writer = writer = loop.create_task(self._write_loop())
        reader = loop.create_task(self._read_loop(receive))
        try:
            await asyncio.wait({writer})
        finally:
            reader.cancel()
            writer.cancel()
            await asyncio.wait({reader, writer})
            if not self._close_sent and not self._peer_gone:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_ABORT_CLOSE):
                        await self._send(
                            {"type": "websocket.close", "code": self._close_code, "reason": self._close_reason}
                        )
            self._connection_lost()

    async def _read_loop(self, receive: Receive) -> None:
        try:
            while not self._closing:
                if not self._reading.is_set():
                    await self._reading.wait()
                    continue
                message = await receive()
                kind = message["type"]
                if kind == "websocket.disconnect":
                    self._disconnected(message.get("code"))
                    return
                if kind != "websocket.receive" or self._closing:
                    continue
                data = message.get("bytes")
                if data is None:
                    self._text_received()
                    return
                if data and self._protocol is not None:
                    self._protocol.data_received(data)
        except Exception as exc:  # noqa: BLE001 - the ASGI server failed us: end the connection
            log.debug("mqtt over websocket: receive failed: %r", exc)
            self._gone(exc)

    async def _write_loop(self) -> None:
        queue, send = self._queue, self._send
        try:
            while True:
                if queue:
                    parts = [queue.popleft()]
                    size = len(parts[0])
                    while queue and size + len(queue[0]) <= _MAX_MESSAGE:
                        size += len(queue[0])
                        parts.append(queue.popleft())
                    await send({"type": "websocket.send", "bytes": parts[0] if len(parts) == 1 else b"".join(parts)})
                    self._queued -= size
                    if self._writing_paused and self._queued <= self._low and self._protocol is not None:
                        self._writing_paused = False
                        self._protocol.resume_writing()
                    continue
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
            if not self._peer_gone:
                await send({"type": "websocket.close", "code": self._close_code, "reason": self._close_reason})
                self._close_sent = True
        except Exception as exc:  # noqa: BLE001 - send fails once the client is gone (uvicorn: ClientDisconnected)
            log.debug("mqtt over websocket: send failed: %r", exc)
            self._gone(exc)

    # ------------------------------------------------------------------ endings

    def _disconnected(self, code: int | None) -> None:
        """The WebSocket ended (the client closed it, the network failed, or the HTTP server shut down)."""
        protocol = self._protocol
        if code == CLOSE_SERVICE_RESTART and not self._closing and protocol is not None:
            # The HTTP server is shutting down, before the sources: like the source's own
            # shutdown, no will is journaled. Nothing can be sent any more.
            self._peer_gone = self._closing = True
            self._drop_queue()
            protocol.shutdown()
        self._gone(None)

    def _gone(self, exc: Exception | None) -> None:
        """Nothing can be sent or received any more: end :meth:`serve`."""
        self._peer_gone = self._closing = True
        if self._error is None:
            self._error = exc
        self._drop_queue()
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    def _text_received(self) -> None:
        """A text message: a protocol error for MQTT (section 6); close with 1003."""
        self._reading.clear()
        self._close_code, self._close_reason = CLOSE_UNSUPPORTED_DATA, TEXT_FRAME_REASON
        if self._protocol is not None:
            # Handled exactly like a malformed packet on TCP: counted, pending acks sent, will journaled.
            self._protocol._protocol_error(ProtocolError(_MALFORMED_PACKET, "text message on an MQTT WebSocket"))
        if not self._closing:  # pragma: no cover - the protocol closes on protocol errors
            self.close()

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._queued = 0

    def _connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = self._closing = True
        self._drop_queue()
        protocol = self._protocol
        if protocol is not None:
            protocol.connection_lost(self._error)
