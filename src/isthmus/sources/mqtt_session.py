"""MQTT sessions of the device-facing server: what outlives one connection, and the way back.

A :class:`Session` holds a client's subscriptions and the messages the server sends it (shared
attribute updates, RPC requests, responses), with QoS 1 delivery: packet ids, messages in flight
until PUBACK, resent with DUP after a reconnect. A persistent session (MQTT 3.1.1 Clean Session 0,
MQTT 5 Session Expiry Interval > 0) stays attached to the :class:`~isthmus.interfaces.Downlink`
after its connection ends, queueing QoS 1 messages until the client is back or the session expires.

The session is the :class:`~isthmus.interfaces.DeviceLink` of its device and, for a ThingsBoard
gateway connection, of every device the gateway announced (``children``): messages for those go
to the gateway topics with the device's name.

Sessions live in memory: a restart of Isthmus ends them, and clients see ``session present = 0``
in their CONNACK and subscribe again (as ThingsBoard client libraries do on every connect).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any, Final, Protocol

import msgspec

from isthmus.interfaces import DeviceRef, Downlink

ATTRIBUTES_TOPIC: Final = "v1/devices/me/attributes"
RPC_REQUEST_PREFIX: Final = "v1/devices/me/rpc/request/"
RPC_RESPONSE_PREFIX: Final = "v1/devices/me/rpc/response/"
ATTRIBUTE_RESPONSE_PREFIX: Final = "v1/devices/me/attributes/response/"
GATEWAY_ATTRIBUTES_TOPIC: Final = "v1/gateway/attributes"
GATEWAY_RPC_TOPIC: Final = "v1/gateway/rpc"
GATEWAY_ATTRIBUTE_RESPONSE_TOPIC: Final = "v1/gateway/attributes/response"

_encode = msgspec.json.Encoder().encode

Message = tuple[str, bytes, int]
"""An outbound message: topic, payload, QoS (0 or 1)."""


class Writer(Protocol):
    """The connection a session currently writes to."""

    def send_publish(self, topic: str, payload: bytes, qos: int, packet_id: int, *, dup: bool) -> None:
        """Encode and write one PUBLISH for this connection's protocol version."""
        ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the (valid) MQTT ``topic_filter``, wildcards ``+`` and ``#`` included."""
    if topic_filter == topic:
        return True
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3:
            return False
        topic_filter = parts[2]
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return not topic.startswith("$") or i > 0
        if i >= len(topic_levels):
            return False
        if level == "+":
            if i == 0 and topic.startswith("$"):
                return False
            continue
        if level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


class Session:
    """One client's session state; implements :class:`~isthmus.interfaces.DeviceLink`."""

    __slots__ = (
        "_expiry_handle",
        "_next_id",
        "children",
        "device",
        "downlink",
        "expiry",
        "inflight",
        "key",
        "max_queued",
        "queue",
        "receive_maximum",
        "subscriptions",
        "writer",
    )

    def __init__(
        self, key: tuple[int | None, str], device: DeviceRef | None, downlink: Downlink, max_queued: int
    ) -> None:
        self.key = key
        self.device = device
        self.downlink = downlink
        self.max_queued = max_queued
        self.expiry = 0.0
        """Seconds the session outlives its connection (0: it ends with it)."""
        self.subscriptions: dict[str, int] = {}
        self.children: dict[int, str] = {}
        """Devices a gateway connection announced: uid -> name."""
        self.inflight: dict[int, Message] = {}
        self.queue: deque[Message] = deque()
        self.receive_maximum = 32
        self.writer: Writer | None = None
        self._next_id = 0
        self._expiry_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ DeviceLink

    @property
    def connected(self) -> bool:
        return self.writer is not None

    def push_attributes(self, p_uid: int, values: Mapping[str, Any]) -> bool:
        if self.device is not None and p_uid == self.device.p_uid:
            return self.publish(ATTRIBUTES_TOPIC, _encode(values))
        name = self.children.get(p_uid)
        if name is None:
            return False
        return self.publish(GATEWAY_ATTRIBUTES_TOPIC, _encode({"device": name, "data": values}))

    def send_rpc(self, p_uid: int, request_id: int, method: str, params: Any) -> bool:
        if self.device is not None and p_uid == self.device.p_uid:
            body = _encode({"method": method, "params": params})
            return self.publish(f"{RPC_REQUEST_PREFIX}{request_id}", body)
        name = self.children.get(p_uid)
        if name is None:
            return False
        body = _encode({"device": name, "data": {"id": request_id, "method": method, "params": params}})
        return self.publish(GATEWAY_RPC_TOPIC, body)

    # ------------------------------------------------------------------ devices reached

    def devices(self) -> list[int]:
        """The uids this session reaches: its own device and a gateway's children."""
        own = [self.device.p_uid] if self.device is not None else []
        return own + list(self.children)

    def attach_all(self) -> None:
        for p_uid in self.devices():
            self.downlink.attach(p_uid, self)

    def detach_all(self) -> None:
        for p_uid in self.devices():
            self.downlink.detach(p_uid, self)

    def state_changed(self) -> None:
        for p_uid in self.devices():
            self.downlink.changed(p_uid)

    # ------------------------------------------------------------------ subscriptions and delivery

    def subscribe(self, topic_filter: str, qos: int) -> int:
        """Record a subscription; the QoS granted (at most 1: the server never sends QoS 2)."""
        granted = min(qos, 1)
        self.subscriptions[topic_filter] = granted
        return granted

    def unsubscribe(self, topic_filter: str) -> bool:
        return self.subscriptions.pop(topic_filter, None) is not None

    def granted_qos(self, topic: str) -> int | None:
        """The highest QoS of the subscriptions matching ``topic``; ``None`` when none does."""
        best: int | None = None
        for topic_filter, qos in self.subscriptions.items():
            if (best is None or qos > best) and topic_matches(topic_filter, topic):
                best = qos
        return best

    def publish(self, topic: str, payload: bytes) -> bool:
        """Send ``payload`` on ``topic`` if the client subscribed to it (queued while disconnected).

        ``False``: not subscribed, disconnected with a QoS 0 subscription (nothing to keep), or
        the queue is full (``max_queued``).
        """
        qos = self.granted_qos(topic)
        if qos is None or (qos == 0 and self.writer is None):
            return False
        if len(self.queue) >= self.max_queued:
            return False
        self.queue.append((topic, payload, qos))
        self.pump()
        return True

    def pump(self) -> None:
        """Send queued messages while the client's receive window allows."""
        writer = self.writer
        queue = self.queue
        while writer is not None and queue and len(self.inflight) < self.receive_maximum:
            message = queue.popleft()
            topic, payload, qos = message
            packet_id = 0
            if qos:
                packet_id = self._packet_id()
                self.inflight[packet_id] = message
            writer.send_publish(topic, payload, qos, packet_id, dup=False)

    def acked(self, packet_id: int) -> None:
        """The client acknowledged ``packet_id`` (PUBACK)."""
        if self.inflight.pop(packet_id, None) is not None:
            self.pump()

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("no free packet id")  # pragma: no cover - receive_maximum < 65535

    # ------------------------------------------------------------------ connection lifecycle

    def resume(self, writer: Writer, receive_maximum: int) -> None:
        """A connection took this session: resend what was in flight (DUP), then the queue."""
        self.cancel_expiry()
        self.writer = writer
        self.receive_maximum = max(1, min(receive_maximum, 1024))
        for packet_id, (topic, payload, qos) in self.inflight.items():
            writer.send_publish(topic, payload, qos, packet_id, dup=True)
        self.pump()

    def suspend(self) -> None:
        """The connection ended; QoS 0 messages not yet sent are dropped (MQTT allows it)."""
        self.writer = None
        if any(qos == 0 for _, _, qos in self.queue):
            self.queue = deque(m for m in self.queue if m[2])

    def expire_later(self, loop: asyncio.AbstractEventLoop, callback: Any) -> None:
        self.cancel_expiry()
        self._expiry_handle = loop.call_later(self.expiry, callback, self)

    def cancel_expiry(self) -> None:
        if self._expiry_handle is not None:
            self._expiry_handle.cancel()
            self._expiry_handle = None
