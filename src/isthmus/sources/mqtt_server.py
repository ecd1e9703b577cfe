"""The device-facing MQTT server (source type ``mqtt``): MQTT 3.1.1 and 5.0 over TCP and TLS.

A purpose-built server for devices, not a general broker: devices publish, the server journals
and acknowledges; nothing is routed from one client to another. What the server sends devices
(shared-attribute updates, RPC requests, answers to their requests) comes from the instance's
:class:`~isthmus.interfaces.Downlink` through each client's :class:`~isthmus.sources.mqtt_session.Session`.
See ``docs/mqtt-server.md`` for the operator's view (options, authentication, topics, sessions,
the gateway API, reason codes, what is not supported yet).

Design, in the order a packet meets it:

* **One** :class:`asyncio.Protocol` **per connection**, no task per connection: an idle device
  costs a protocol object, its packet decoder (:mod:`isthmus.sources.mqtt_codec`) and one timer
  handle. The timer is lazy: it fires once per keep-alive period and re-arms itself from the
  time of the last received bytes, so traffic never touches the timer heap.
* **Authentication** at CONNECT: an access token as user name
  (:meth:`~isthmus.interfaces.DeviceDirectory.by_token`, synchronous), an X.509 client
  certificate's SHA-256 fingerprint (:meth:`~isthmus.interfaces.DeviceResolver.resolve`, the
  only asynchronous CONNECT, packets arriving meanwhile wait in a backlog), or anonymous
  connections whose topics name the device (``topics`` patterns with ``allow_anonymous``).
* **Pipelining, in order.** Every QoS 1/2 PUBLISH gets a slot in the connection's ack queue;
  the PUBLISHes of one read go to the journal together in one task awaiting
  ``ingest.submit_batch`` (durable), so a connection can have many records waiting for the same
  group commit (QoS 0 ones likewise through ``submit_nowait``). Acks leave strictly in arrival order: the queue is
  flushed from its head at the end of the loop iteration in which commits completed, so the acks
  of one group commit leave in one write. Journal order equals arrival order too: ``submit``
  queues its record for the journal writer before it first suspends, and tasks start in creation
  order. PUBLISHes that need a step before ``submit`` (a device resolved from its topic) and QoS 0
  ones (``submit(wait=False)`` queues through a task of its own) go through the connection's
  intake task, which takes them one by one and starts the durable waits itself; while it has
  work, every later PUBLISH of the connection queues behind it.
* **Flow control.** When ``max_inflight`` PUBLISHes are unacknowledged (or the client stops
  reading our acks) the server stops reading from that connection until acks drain; MQTT 5
  clients are told the limit as Receive Maximum.
* **Failure isolation.** A protocol error closes only its connection (with the codec's reason
  code, counted in ``isthmus_mqtt_protocol_errors_total``). A journal or registry failure
  closes the affected connection without acknowledging, so the client resends later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import ssl
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard, cast

import msgspec
from prometheus_client import Counter, Gauge
from pydantic import Field, model_validator

from isthmus.errors import ConfigError, IsthmusError, JournalError, RegistryError
from isthmus.interfaces import DeviceRef, Ingest, Submission
from isthmus.message import Kind, RawFrame, Status, new_correlation_id, utcnow
from isthmus.plugins import PluginConfig, SourceContext, SourcePlugin
from isthmus.sources.mqtt_codec import (
    Auth,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Pingreq,
    ProtocolError,
    Puback,
    Publish,
    Pubrel,
    Subscribe,
    Unsubscribe,
    Will,
    encode_connack,
    encode_disconnect,
    encode_pingresp,
    encode_puback,
    encode_pubcomp,
    encode_publish,
    encode_pubrec,
    encode_suback,
    encode_unsuback,
    is_valid_topic_filter,
)
from isthmus.sources.mqtt_session import (
    ATTRIBUTE_RESPONSE_PREFIX,
    GATEWAY_ATTRIBUTE_RESPONSE_TOPIC,
    RPC_REQUEST_PREFIX,
    RPC_RESPONSE_PREFIX,
    Session,
)

__all__ = ["PLUGIN", "MqttServer", "MqttServerOptions", "RateOptions", "TopicPattern"]

log = logging.getLogger(__name__)

# MQTT 5 reason codes the server itself sends (MQTT 5.0 section 2.4).
RC_SUCCESS: Final = 0x00
RC_UNSPECIFIED: Final = 0x80
RC_BAD_CREDENTIALS: Final = 0x86  # 3.1.1 CONNACK 4
RC_NOT_AUTHORIZED: Final = 0x87  # 3.1.1 CONNACK 5
RC_SERVER_UNAVAILABLE: Final = 0x88  # 3.1.1 CONNACK 3
RC_SERVER_BUSY: Final = 0x89
RC_BAD_AUTH_METHOD: Final = 0x8C
RC_KEEP_ALIVE_TIMEOUT: Final = 0x8D
RC_SESSION_TAKEN_OVER: Final = 0x8E
RC_SERVER_SHUTTING_DOWN: Final = 0x8B
RC_TOPIC_NAME_INVALID: Final = 0x90
RC_PACKET_ID_NOT_FOUND: Final = 0x92
RC_TOPIC_ALIAS_INVALID: Final = 0x94
RC_RATE_TOO_HIGH: Final = 0x96
RC_QUOTA_EXCEEDED: Final = 0x97  # 3.1.1 CONNACK 3
RC_PAYLOAD_FORMAT_INVALID: Final = 0x99
RC_SUBSCRIPTION_REFUSED: Final = 0x8F

THINGSBOARD_TOPICS: Final[Mapping[str, Kind]] = {
    "v1/devices/me/telemetry": "telemetry",
    "v2/t": "telemetry",
    "v1/devices/me/attributes": "attributes",
    "v2/a": "attributes",
}
"""The ThingsBoard device-API topics a token or certificate device may publish to."""

GATEWAY_TOPICS: Final[Mapping[str, Kind]] = {
    "v1/gateway/telemetry": "telemetry",
    "v1/gateway/attributes": "attributes",
}
"""The ThingsBoard gateway-API topics that carry data of many devices (gateway devices only)."""

ATTRIBUTE_REQUEST_PREFIX: Final = "v1/devices/me/attributes/request/"
GATEWAY_CONNECT_TOPIC: Final = "v1/gateway/connect"
GATEWAY_DISCONNECT_TOPIC: Final = "v1/gateway/disconnect"
GATEWAY_RPC_TOPIC: Final = "v1/gateway/rpc"
GATEWAY_ATTRIBUTE_REQUEST_TOPIC: Final = "v1/gateway/attributes/request"
_json_decode = msgspec.json.decode
_json_encode = msgspec.json.Encoder().encode

_REASON_NAMES: Final[Mapping[int, str]] = {
    0x81: "malformed_packet",
    0x82: "protocol_error",
    0x84: "unsupported_protocol_version",
    0x85: "client_identifier_not_valid",
    0x90: "topic_name_invalid",
    0x94: "topic_alias_invalid",
    0x95: "packet_too_large",
}
_CONNACK_RESULTS: Final[Mapping[int, str]] = {
    RC_BAD_CREDENTIALS: "bad_credentials",
    RC_NOT_AUTHORIZED: "not_authorized",
    RC_SERVER_UNAVAILABLE: "server_unavailable",
    RC_BAD_AUTH_METHOD: "bad_authentication_method",
    RC_QUOTA_EXCEEDED: "too_many_connections",
}
_PLACEHOLDER: Final = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_REASON_STRING_MAX: Final = 200
_LINGER: Final = 5.0  # seconds a connection closed for the client's fault still sends pending acks
_SHUTDOWN_DRAIN: Final = 1.0  # seconds in-flight PUBLISHes get to be acknowledged at shutdown
_SHUTDOWN_CLOSE: Final = 2.0  # seconds connections get to close cleanly before being aborted


# --------------------------------------------------------------------------- options


class TopicPattern(PluginConfig):
    """A topic that names its device, for fleets that do not speak the ThingsBoard API."""

    pattern: str = Field(
        description="Topic with placeholders, e.g. `devices/{device}/up`. Each `{name}` fills one whole "
        'topic level; the placeholders\' values are the device\'s source ids (`{"device": "…"}`), '
        "resolved with this source's name. No wildcards; at least one placeholder.",
    )
    decoder: str | None = Field(
        None,
        description="Decoder for payloads on this topic; a decoder set on the device itself wins. "
        "Unset: the instance's default decoder (`thingsboard`).",
    )
    kind: Kind = Field("telemetry", description="What the payloads carry: `telemetry` or `attributes`.")
    policy: Literal["accept", "quarantine", "reject"] = Field(
        "quarantine",
        description="Unknown devices: `accept` creates an enabled device, `quarantine` a disabled one whose "
        "frames are kept but not delivered until an operator enables it, `reject` drops their messages.",
    )

    @model_validator(mode="after")
    def _check_pattern(self) -> TopicPattern:
        _compile_pattern(self.pattern)
        return self


class RateOptions(PluginConfig):
    """Per-connection PUBLISH rate limit (a token bucket)."""

    rate_per_second: float = Field(
        100.0, gt=0, description="PUBLISH packets per second a connection may sustain (the bucket's refill rate)."
    )
    burst: int = Field(200, ge=1, description="PUBLISH packets a connection may send at once (the bucket's size).")


class MqttServerOptions(PluginConfig):
    """Options of the ``mqtt`` source (the ``options`` table of its ``[[sources]]`` entry)."""

    host: str = Field("0.0.0.0", description="Address the listeners bind to.")  # noqa: S104
    port: int | None = Field(
        1883, ge=0, le=65535, description="Plain TCP listener port (0 picks a free one); null for a TLS-only server."
    )
    tls_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="TLS listener port (usually 8883; 0 picks a free one); needs `cert_file` and `key_file`.",
    )
    cert_file: Path | None = Field(None, description="PEM server certificate (chain) for the TLS listener.")
    key_file: Path | None = Field(None, description="PEM private key of `cert_file`.")
    ca_file: Path | None = Field(
        None,
        description="PEM CA certificates that client certificates must chain to (or the self-signed device "
        "certificates themselves). Required when `client_cert` is not `none`.",
    )
    client_cert: Literal["none", "optional", "required"] = Field(
        "none",
        description="TLS client certificates: `none` (not asked for), `optional` (verified and used for "
        "authentication when presented), `required` (the TLS handshake fails without one).",
    )
    max_packet_size: int = Field(
        65536,
        ge=64,
        le=268_435_460,
        description="Largest MQTT packet accepted, in bytes (header included). Bigger ones close the "
        "connection (MQTT 5: DISCONNECT 0x95); announced to MQTT 5 clients in CONNACK.",
    )
    max_connections: int = Field(
        10000,
        ge=1,
        description="Most connected clients. Further CONNECTs are refused (MQTT 5 CONNACK 0x97, 3.1.1 return code 3).",
    )
    max_inflight: int = Field(
        256,
        ge=1,
        le=65535,
        description="Most unacknowledged PUBLISHes per connection; at the limit the server stops reading from "
        "that connection until acks go out. Announced to MQTT 5 clients as Receive Maximum.",
    )
    rate: RateOptions = Field(
        default_factory=RateOptions,
        description="Per-connection PUBLISH rate limit; see `rate_per_second` and `burst`.",
    )
    device_rate: RateOptions | None = Field(
        None,
        description="Per-device PUBLISH rate limit, one bucket shared by all connections of a device (a device "
        "opening several connections, or reconnecting, cannot multiply `rate`); null: none.",
    )
    connect_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a new connection has to complete its TLS handshake and its CONNECT, "
        "authentication included.",
    )
    session_expiry: int = Field(
        86400,
        ge=0,
        description="Longest time, in seconds, a persistent session (MQTT 3.1.1 Clean Session 0, MQTT 5 Session "
        "Expiry Interval) outlives its connection, keeping subscriptions and queued QoS 1 messages. MQTT 3.1.1 "
        "sessions get exactly this; MQTT 5 clients get what they ask for, at most this. 0: no persistent sessions.",
    )
    max_queued: int = Field(
        100,
        ge=1,
        description="Most messages (attribute updates, RPC requests) queued per session for a client that is "
        "disconnected or has its receive window full; beyond it, RPC calls are refused as unreachable.",
    )
    gateway_policy: Literal["accept", "quarantine", "reject"] = Field(
        "accept",
        description="Devices a ThingsBoard gateway announces that are not registered yet: `accept` creates an "
        "enabled device, `quarantine` a disabled one whose frames are kept but not delivered, `reject` drops "
        "their messages.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Accept connections without a user name; they may publish only to `topics` patterns "
        "(which name the device). Requires `topics`.",
    )
    topics: list[TopicPattern] = Field(
        default_factory=list,
        description="Generic topic patterns for anonymous connections, tried in order; the first match wins.",
    )
    websocket_path: str | None = Field(
        "/mqtt",
        description="Path on the HTTP port where MQTT over WebSocket is served (subprotocol `mqtt`); "
        'null disables it. Must start with "/".',
    )

    @model_validator(mode="after")
    def _check(self) -> MqttServerOptions:
        if self.websocket_path is not None and not self.websocket_path.startswith("/"):
            raise ValueError('websocket_path must start with "/"')
        if self.port is None and self.tls_port is None:
            raise ValueError("no listener: set port, tls_port or both")
        if self.tls_port is not None and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls_port needs cert_file and key_file")
        if self.client_cert != "none" and (self.tls_port is None or self.ca_file is None):
            raise ValueError("client_cert needs tls_port and ca_file")
        if self.allow_anonymous and not self.topics:
            raise ValueError("allow_anonymous needs topics: anonymous devices are named by their topic")
        if self.port and self.port == self.tls_port:
            raise ValueError("port and tls_port must differ")
        return self


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True)
class _Pattern:
    """A compiled :class:`TopicPattern`: literal levels, and which levels are placeholders."""

    levels: tuple[str | None, ...]  # None where a placeholder is
    names: tuple[str, ...]
    kind: Kind
    decoder: str | None
    policy: str

    def match(self, topic: str) -> dict[str, str | int] | None:
        """The placeholders' values when ``topic`` matches (each non-empty), else ``None``."""
        parts = topic.split("/")
        if len(parts) != len(self.levels):
            return None
        ids: dict[str, str | int] = {}
        names = iter(self.names)
        for part, level in zip(parts, self.levels, strict=True):
            if level is None:
                if not part:
                    return None
                ids[next(names)] = part
            elif part != level:
                return None
        return ids


def _compile_pattern(pattern: str) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    """Split ``pattern`` into levels; raise ValueError if it is not a valid pattern."""
    if not pattern or "+" in pattern or "#" in pattern or "\x00" in pattern:
        raise ValueError(f"pattern {pattern!r} must be a non-empty topic name without wildcards")
    levels: list[str | None] = []
    names: list[str] = []
    for level in pattern.split("/"):
        m = _PLACEHOLDER.match(level)
        if m is not None:
            if m.group(1) in names:
                raise ValueError(f"pattern {pattern!r} names {{{m.group(1)}}} twice")
            names.append(m.group(1))
            levels.append(None)
        elif "{" in level or "}" in level:
            raise ValueError(f"pattern {pattern!r}: a placeholder must be a whole topic level, like {{device}}")
        else:
            levels.append(level)
    if not names:
        raise ValueError(f"pattern {pattern!r} has no placeholder naming the device")
    return tuple(levels), tuple(names)


@dataclass(frozen=True, slots=True)
class _Route:
    """Where one PUBLISH goes: a known device, or source ids still to resolve."""

    kind: Kind
    device: DeviceRef | None
    source_ids: dict[str, str | int] | None = None
    decoder: str | None = None
    policy: str = "reject"
    gateway: bool = False
    """The payload carries data of many devices, by name (ThingsBoard gateway API)."""


# --------------------------------------------------------------------------- metrics


class _Metrics:
    """The source's collectors in the instance registry, shared by every ``mqtt`` source there."""

    def __init__(self, ctx: SourceContext) -> None:
        registry, source = ctx.metrics, ctx.name
        connections = _collector(
            ctx,
            "isthmus_mqtt_connections",
            lambda: Gauge(
                "isthmus_mqtt_connections", "Connected (authenticated) MQTT clients.", ["source"], registry=registry
            ),
        )
        connects = _collector(
            ctx,
            "isthmus_mqtt_connects",
            lambda: Counter(
                "isthmus_mqtt_connects",
                "CONNECT attempts by result (accepted, bad_credentials, not_authorized, too_many_connections …).",
                ["source", "result"],
                registry=registry,
            ),
        )
        errors = _collector(
            ctx,
            "isthmus_mqtt_protocol_errors",
            lambda: Counter(
                "isthmus_mqtt_protocol_errors",
                "Connections closed for a protocol error, by reason (malformed_packet, packet_too_large …).",
                ["source", "reason"],
                registry=registry,
            ),
        )
        disconnects = _collector(
            ctx,
            "isthmus_mqtt_disconnects",
            lambda: Counter(
                "isthmus_mqtt_disconnects",
                "Closed client connections by reason (client, connection_lost, keepalive_timeout …).",
                ["source", "reason"],
                registry=registry,
            ),
        )
        requests = _collector(
            ctx,
            "isthmus_mqtt_requests",
            lambda: Counter(
                "isthmus_mqtt_requests",
                "Device requests that are not data, by kind (attributes, rpc_response, client_rpc, gateway_connect …).",
                ["source", "kind"],
                registry=registry,
            ),
        )
        rejected = _collector(
            ctx,
            "isthmus_mqtt_publishes_rejected",
            lambda: Counter(
                "isthmus_mqtt_publishes_rejected",
                "PUBLISHes not journaled, by reason (unsupported_topic, unknown_device, rate_limited).",
                ["source", "reason"],
                registry=registry,
            ),
        )
        self.source = source
        self.connections = connections.labels(source)
        self._connects = connects
        self._errors = errors
        self._disconnects = disconnects
        self._rejected = rejected
        self._requests = requests

    def request(self, kind: str) -> None:
        """Count one device request (attribute request, RPC response …)."""
        self._requests.labels(self.source, kind).inc()

    def connect(self, result: str) -> None:
        """Count one CONNECT attempt."""
        self._connects.labels(self.source, result).inc()

    def protocol_error(self, reason_code: int) -> None:
        """Count one connection closed for a protocol error."""
        self._errors.labels(self.source, _REASON_NAMES.get(reason_code, f"0x{reason_code:02x}")).inc()

    def disconnect(self, reason: str) -> None:
        """Count one closed connection."""
        self._disconnects.labels(self.source, reason).inc()

    def rejected(self, reason: str) -> None:
        """Count one PUBLISH that was not journaled."""
        self._rejected.labels(self.source, reason).inc()


def _collector(ctx: SourceContext, name: str, make: Callable[[], Counter | Gauge]) -> Any:
    """Register the collector ``make`` builds once per instance; every ``mqtt`` source shares it."""
    existing = ctx.shared.get(name)
    if existing is None:
        existing = ctx.shared[name] = make()
    return existing


# --------------------------------------------------------------------------- the source


class MqttServer:
    """The ``mqtt`` source: implements :class:`~isthmus.interfaces.Source`.

    Built by the plugin factory (options validated, TLS context loaded: a bad certificate path is
    a :class:`~isthmus.errors.ConfigError` at start-up); :meth:`run` listens until cancelled and
    may be called again after it returned (the supervisor restarts crashed sources).
    """

    def __init__(self, options: MqttServerOptions, ctx: SourceContext) -> None:
        self.options = options
        self.ctx = ctx
        self.name = ctx.name
        self.metrics = _Metrics(ctx)
        self.patterns = [
            _Pattern(*_compile_pattern(t.pattern), kind=t.kind, decoder=t.decoder, policy=t.policy)
            for t in options.topics
        ]
        self.anonymous = options.allow_anonymous and bool(self.patterns)
        self.ssl_context = _ssl_context(options) if options.tls_port is not None else None
        self.rate = options.rate.rate_per_second
        self.burst = float(options.rate.burst)
        self.device_rate = options.device_rate
        self.device_buckets: dict[int, list[float]] = {}
        """Per-device token buckets (``device_rate``): uid -> [tokens, last refill time]."""
        self.max_inflight = options.max_inflight
        self.resume_below = max(options.max_inflight // 2, 1)
        self.connack_properties: dict[str, int] = {"maximum_packet_size": options.max_packet_size}
        if options.max_inflight < 65535:
            self.connack_properties["receive_maximum"] = options.max_inflight
        # Raw sockets beyond the session limit are closed at once, before any CONNECT is read.
        self.socket_limit = options.max_connections + max(64, options.max_connections // 10)
        self.connections: set[_Connection] = set()
        self.sessions = 0
        # Connected clients by (device uid or None when anonymous, client id), for session takeover.
        self.clients: dict[tuple[int | None, str], _Connection] = {}
        self.session_state: dict[tuple[int | None, str], Session] = {}
        """Sessions by client key: connected ones, and persistent ones waiting for their client."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.ingest: Ingest | None = None
        self.stopping = False
        self.wakeup: asyncio.Event | None = None
        self.bound: dict[str, int] = {}
        """The ports actually listened on while running: ``{"tcp": 1883, "tls": 8883}``."""
        path = options.websocket_path
        if path is not None:  # MQTT over WebSocket on the HTTP port
            from isthmus.sources.mqtt_websocket import MqttWebSocketApp

            if path not in ctx.websockets:
                ctx.websockets[path] = MqttWebSocketApp(self)
            elif "websocket_path" in options.model_fields_set:
                raise ConfigError(
                    f"source {self.name!r}: websocket_path {path!r} is already served by another source; "
                    "set a different one, or null"
                )
            else:  # several mqtt sources on their defaults: the first one serves /mqtt
                log.warning("mqtt source %s: %s is served by another source; set websocket_path", self.name, path)

    def accept_transport(self, transport: asyncio.Transport) -> _Connection | None:
        """Serve MQTT on a transport the listeners did not make (MQTT over WebSocket).

        Returns the new connection protocol, already told ``connection_made`` as a listener's
        would be, or ``None`` while the server is not running (before :meth:`run`, while stopping).
        """
        ingest = self.ingest
        if ingest is None or self.stopping:
            return None
        protocol = _Connection(self, asyncio.get_running_loop(), ingest)
        protocol.connection_made(transport)
        return protocol

    async def run(self, ingest: Ingest) -> None:
        """Listen on the configured ports until cancelled; then close every connection and return.

        At cancellation the listeners close first, in-flight PUBLISHes get a moment to be
        journaled and acknowledged, then each client gets a DISCONNECT (MQTT 5: 0x8B) and its
        socket is closed; wills are not journaled for this (the device did not fail).
        """
        self.ingest = ingest
        self.stopping = False
        self.connections, self.clients, self.sessions = set(), {}, 0
        self.session_state = {}
        self.metrics.connections.set(0)
        servers: list[asyncio.Server] = []
        try:
            if self.options.port is not None:
                servers.append(await self._listen(self.options.port, None))
                self.bound["tcp"] = servers[-1].sockets[0].getsockname()[1]
            if self.options.tls_port is not None:
                servers.append(await self._listen(self.options.tls_port, self.ssl_context))
                self.bound["tls"] = servers[-1].sockets[0].getsockname()[1]
            log.info("mqtt source %s listening on %s port(s) %s", self.name, self.options.host, self.bound)
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            await self._shutdown(servers)

    async def _listen(self, port: int, ssl_context: ssl.SSLContext | None) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        ingest = self.ingest
        if ingest is None:  # pragma: no cover - run() sets it first
            raise RuntimeError("listening before run()")
        return await loop.create_server(
            lambda: _Connection(self, loop, ingest),
            self.options.host,
            port,
            ssl=ssl_context,
            ssl_handshake_timeout=self.options.connect_timeout if ssl_context is not None else None,
            backlog=4096,
            reuse_address=True,
        )

    async def _shutdown(self, servers: list[asyncio.Server]) -> None:
        self.stopping = True
        for server in servers:
            server.close()
        connections = list(self.connections)
        for conn in connections:
            conn.stop_reading()
        await self._wait_for(lambda: not any(c.busy for c in connections), _SHUTDOWN_DRAIN)
        for conn in connections:
            conn.shutdown()
        await self._wait_for(lambda: not self.connections, _SHUTDOWN_CLOSE)
        for conn in list(self.connections):
            conn.abort()
        await self._wait_for(lambda: not self.connections, 1.0)
        for session in list(self.session_state.values()):
            self.end_session(session)
        self.bound = {}
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in servers:
            await server.wait_closed()
        self.connections.clear()

    async def _wait_for(self, done: Callable[[], bool], seconds: float) -> None:
        """Wait until ``done()`` (re-checked whenever a connection pokes the server), at most ``seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            while not done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                self.wakeup = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), remaining)
        finally:
            self.wakeup = None

    def poke(self) -> None:
        """A connection finished work or closed: wake :meth:`_wait_for`, if shutting down."""
        if self.wakeup is not None:
            self.wakeup.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task the server keeps (and cancels at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mqtt source %s: task failed", self.name, exc_info=task.exception())

    # ------------------------------------------------------------------ sessions and device requests

    def end_session(self, session: Session) -> None:
        """Forget ``session``: its devices are no longer reachable through it."""
        if self.session_state.get(session.key) is session:
            del self.session_state[session.key]
        session.cancel_expiry()
        session.writer = None
        session.detach_all()

    async def answer_attributes(self, session: Session, device: DeviceRef, request_id: str, payload: bytes) -> None:
        """Answer ``v1/devices/me/attributes/request/{id}`` on ``.../response/{id}``.

        The request names comma-separated ``clientKeys`` and/or ``sharedKeys`` (strings or lists);
        the response holds the scopes asked for, all attributes of both when it names none.
        """
        try:
            request = _json_decode(payload) if payload.strip() else {}
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object with clientKeys and/or sharedKeys")
            client_keys, shared_keys = _keys(request.get("clientKeys")), _keys(request.get("sharedKeys"))
            body: dict[str, Any] = await self.ctx.attributes.request(device.p_uid, client_keys, shared_keys)
        except (ValueError, msgspec.DecodeError) as exc:
            body = {"error": f"bad attribute request: {exc}"}
        except IsthmusError as exc:  # the attribute store is unavailable: say so, keep the connection
            log.warning("mqtt source %s: attribute request failed: %s", self.name, exc)
            body = {"error": "attributes unavailable, try again later"}
        session.publish(f"{ATTRIBUTE_RESPONSE_PREFIX}{request_id}", _json_encode(body))

    async def answer_client_rpc(self, session: Session, p_uid: int, request_id: str, payload: bytes) -> None:
        """Answer a client-side RPC (``v1/devices/me/rpc/request/{id}``) on ``.../rpc/response/{id}``."""
        try:
            request = _json_decode(payload)
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise ValueError("expected a JSON object with a string method")
            if request["method"] == "getSessionLimits":
                result = self.session_limits()
            else:
                result = await self.ctx.downlink.client_rpc(p_uid, request["method"], request.get("params"))
        except (ValueError, msgspec.DecodeError) as exc:
            result = {"error": f"bad RPC request: {exc}"}
        session.publish(f"{RPC_RESPONSE_PREFIX}{request_id}", _json_encode(result))

    def session_limits(self) -> dict[str, Any]:
        """This server's limits in the shape ThingsBoard device SDKs ask for (``getSessionLimits``),
        so they pace themselves instead of being disconnected for going too fast."""
        per_second = f"{max(1, int(self.rate))}:1,"
        return {
            "maxPayloadSize": self.options.max_packet_size,
            "maxInflightMessages": self.max_inflight,
            "rateLimits": {"messages": per_second, "telemetryMessages": per_second, "telemetryDataPoints": "0:0,"},
        }

    async def gateway_child(self, session: Session, name: object) -> DeviceRef | None:
        """The device a gateway names (created by ``gateway_policy``), now reachable through it."""
        if not _valid_device_name(name):
            return None
        device = await self.ctx.resolver.resolve(self.name, {"device": name}, self.options.gateway_policy)
        if device is not None and session.children.get(device.p_uid) != name:
            session.children[device.p_uid] = name
            self.ctx.downlink.attach(device.p_uid, session)
        return device

    async def gateway_control(self, session: Session, topic: str, payload: bytes) -> None:
        """Handle a gateway's connect, disconnect, RPC response or attribute request."""
        try:
            request = _json_decode(payload)
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            name = request.get("device")
            if topic == GATEWAY_DISCONNECT_TOPIC:
                for uid, child in list(session.children.items()):
                    if child == name:
                        del session.children[uid]
                        self.ctx.downlink.detach(uid, session)
                return
            device = await self.gateway_child(session, name)
            if device is None:
                raise ValueError(f"unknown or refused device {name!r}")
            if topic == GATEWAY_RPC_TOPIC:
                request_id = request.get("id")
                if isinstance(request_id, int):
                    self.ctx.downlink.rpc_response(device.p_uid, request_id, request.get("data"))
            elif topic == GATEWAY_ATTRIBUTE_REQUEST_TOPIC:
                await self._answer_gateway_attributes(session, device, name, request)
        except (ValueError, msgspec.DecodeError, RegistryError) as exc:
            log.info("mqtt source %s: gateway request on %s ignored: %s", self.name, topic, exc)
            self.metrics.rejected("bad_gateway_request")

    async def _answer_gateway_attributes(
        self, session: Session, device: DeviceRef, name: object, request: dict[str, Any]
    ) -> None:
        scope = "client" if request.get("client") is True else "shared"
        body: dict[str, Any] = {"id": request.get("id"), "device": name}
        if isinstance(request.get("key"), str):
            values = await self.ctx.attributes.get(device.p_uid, scope, [request["key"]])
            body["value"] = values.get(request["key"])
        else:
            body["values"] = await self.ctx.attributes.get(device.p_uid, scope, _keys(request.get("keys")))
        session.publish(GATEWAY_ATTRIBUTE_RESPONSE_TOPIC, _json_encode(body))

    def route(self, topic: str, device: DeviceRef | None) -> _Route | None:
        """Where a PUBLISH on ``topic`` goes for a connection authenticated as ``device``.

        Token and certificate devices may publish to the ThingsBoard topics only; anonymous
        connections (``device`` is ``None``) only to the ``topics`` patterns. ``None``: unsupported.
        """
        if device is not None:
            kind = THINGSBOARD_TOPICS.get(topic)
            if kind is not None:
                return _Route(kind, device)
            kind = GATEWAY_TOPICS.get(topic) if device.gateway else None
            return None if kind is None else _Route(kind, device, policy=self.options.gateway_policy, gateway=True)
        for pattern in self.patterns:
            ids = pattern.match(topic)
            if ids is not None:
                return _Route(pattern.kind, None, ids, pattern.decoder, pattern.policy)
        return None

    def frame(
        self,
        publish: Publish | Will,
        kind: Kind,
        *,
        will: bool = False,
        gateway: str | None = None,
        payload: bytes | None = None,
    ) -> RawFrame:
        """The raw frame of a PUBLISH (or a will message; or one device's ``payload`` of a gateway's)."""
        meta: dict[str, Any] = {"topic": publish.topic, "qos": publish.qos}
        if publish.retain:
            meta["retain"] = True
        if will:
            meta["will"] = True
        if gateway is not None:
            meta["gateway"] = gateway
        content_type = publish.properties.get("content_type", "") if publish.properties else ""
        return RawFrame(
            correlation_id=new_correlation_id(),
            received_at=utcnow(),
            source=self.name,
            payload=publish.payload if payload is None else payload,
            kind=kind,
            content_type=content_type if isinstance(content_type, str) else "",
            meta=meta,
        )

    async def journal_will(self, will: Will, device: DeviceRef | None) -> None:
        """Journal a will message like a QoS 0 PUBLISH on its topic, with ``meta["will"] = True``."""
        ingest = self.ingest
        route = self.route(will.topic, device)
        if route is None or ingest is None:
            self.metrics.rejected("unsupported_topic")
            return
        try:
            target = route.device
            if target is None and route.source_ids is not None:
                target = await self.ctx.resolver.resolve(self.name, route.source_ids, route.policy)
            if target is None:
                self.metrics.rejected("unknown_device")
                return
            await ingest.submit(self.frame(will, route.kind, will=True), target, decoder=route.decoder)
        except (JournalError, RegistryError) as exc:
            log.warning("mqtt source %s: could not journal a will message: %s", self.name, exc)


def _valid_device_name(name: object) -> TypeGuard[str]:
    """A device name a gateway may use: a non-empty string of at most 200 characters, no NUL."""
    return isinstance(name, str) and 0 < len(name) <= 200 and "\x00" not in name


def _keys(value: object) -> list[str] | None:
    """Attribute keys of a request: a comma-separated string or a list of strings; ``None``: absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return [key.strip() for key in value.split(",") if key.strip()]
    if isinstance(value, list) and all(isinstance(key, str) for key in value):
        return list(value)
    raise ValueError("keys must be a comma-separated string or a list of strings")


def _json_or_text(payload: bytes) -> Any:
    """A device's RPC response: its JSON value, else its text."""
    try:
        return _json_decode(payload)
    except msgspec.DecodeError:
        return payload.decode("utf-8", "replace")


def _ssl_context(options: MqttServerOptions) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(options.cert_file), str(options.key_file))
        if options.client_cert != "none":
            context.load_verify_locations(cafile=str(options.ca_file))
            context.verify_mode = ssl.CERT_REQUIRED if options.client_cert == "required" else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"mqtt TLS listener: cannot load certificates: {exc}") from exc
    return context


# --------------------------------------------------------------------------- connections


class _Slot:
    """One QoS 1/2 PUBLISH between its arrival and its acknowledgement."""

    __slots__ = ("code", "done", "packet_id", "qos", "reason", "task")

    def __init__(self, packet_id: int, qos: int) -> None:
        self.packet_id = packet_id
        self.qos = qos
        self.done = False
        self.code = RC_SUCCESS
        self.reason: str | None = None
        self.task: asyncio.Task[None] | None = None

    def finish(self, code: int = RC_SUCCESS, reason: str | None = None) -> None:
        self.done = True
        self.code = code
        self.reason = reason


_Job = tuple[Publish, _Route, _Slot | None]
_Durable = tuple[Submission, _Slot]
"""A frame of a QoS 1/2 PUBLISH waiting to be journaled with the others of its batch (a gateway
PUBLISH becomes several frames sharing one slot)."""


class _Connection(asyncio.Protocol):
    """One client connection: MQTT session state, keep-alive, rate limit, in-order acks."""

    __slots__ = (
        "_backlog",
        "_batch",
        "_closed",
        "_closing",
        "_connected",
        "_decoder",
        "_device",
        "_flush_scheduled",
        "_grace",
        "_ingest",
        "_intake",
        "_intake_task",
        "_key",
        "_last_rx",
        "_linger",
        "_loop",
        "_max_out",
        "_pending",
        "_problem_info",
        "_qos2",
        "_read_paused",
        "_reason",
        "_refill_at",
        "_server",
        "_session",
        "_timer",
        "_tokens",
        "_transport",
        "_version",
        "_will",
        "_write_paused",
    )

    def __init__(self, server: MqttServer, loop: asyncio.AbstractEventLoop, ingest: Ingest) -> None:
        self._server = server
        self._loop = loop
        self._ingest = ingest
        self._transport: asyncio.Transport | None = None
        self._decoder = Decoder(server.options.max_packet_size)
        self._version = 0
        self._connected = False
        self._closing = False  # no more input is processed
        self._closed = False  # the transport is closing: nothing more is written
        self._linger: int | None = None  # DISCONNECT code to send once the last acks are out
        self._device: DeviceRef | None = None
        self._will: Will | None = None
        self._grace = 0.0
        self._last_rx = 0.0
        self._refill_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = server.burst
        self._pending: deque[_Slot] | None = None
        self._intake: deque[_Job] | None = None
        self._intake_task: asyncio.Task[None] | None = None
        self._qos2: dict[int, bool] | None = None  # packet id -> PUBREC sent
        self._backlog: list[Packet] | None = None
        self._batch: list[_Durable] | None = None
        self._read_paused = False
        self._write_paused = False
        self._flush_scheduled = False
        self._problem_info = True
        self._max_out = 0
        self._reason = "connection_lost"
        self._key: tuple[int | None, str] | None = None
        self._session: Session | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection; refuse it at once if far too many sockets are open."""
        transport = cast(asyncio.Transport, transport)  # a stream server: always a Transport
        server = self._server
        self._transport = transport
        if server.stopping or len(server.connections) >= server.socket_limit:
            server.metrics.connect("overloaded")
            self._closing = True
            transport.abort()
            return
        server.connections.add(self)
        self._refill_at = self._last_rx = now = self._loop.time()
        self._timer = self._loop.call_at(now + server.options.connect_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        """Decode what arrived and handle each packet in order."""
        if self._closing:
            return
        self._last_rx = self._loop.time()
        try:
            packets = self._decoder.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        if self._backlog is not None:
            self._backlog.extend(packets)
            return
        try:
            self._handle(packets, 0)
        except Exception:
            log.exception("mqtt source %s: internal error; closing the connection", self._server.name)
            self._close(RC_UNSPECIFIED, "internal_error", will=False)

    def eof_received(self) -> bool | None:
        """The client half-closed: treat it as going away (close our side too)."""
        return None

    def pause_writing(self) -> None:
        """The client does not read our acks: stop reading its PUBLISHes until it does."""
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        """The client drained our acks: read again."""
        self._write_paused = False
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Release everything; journal the will if the client went away without DISCONNECT."""
        server = self._server
        if not self._closing:  # the peer went away (or the network failed)
            self._closing = True
            self._publish_will()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self in server.connections:
            server.connections.discard(self)
            server.metrics.disconnect(self._reason)
        if self._connected:
            self._connected = False
            server.sessions -= 1
            server.metrics.connections.dec()
            if self._key is not None and server.clients.get(self._key) is self:
                del server.clients[self._key]
        session, self._session = self._session, None
        if session is not None and session.writer is self:
            session.suspend()
            if session.expiry > 0 and not server.stopping:
                session.state_changed()
                session.expire_later(self._loop, server.end_session)
            else:
                server.end_session(session)
        self._transport = None
        server.poke()

    # ------------------------------------------------------------------ server-side control

    @property
    def busy(self) -> bool:
        """True while PUBLISHes of this connection are being journaled."""
        return bool(self._pending) or bool(self._intake)

    def stop_reading(self) -> None:
        """Shutdown, step 1: accept nothing more from this client."""
        if not self._read_paused and self._transport is not None and not self._closing:
            self._transport.pause_reading()
        self._read_paused = True

    def shutdown(self) -> None:
        """Shutdown, step 2: DISCONNECT 0x8B (MQTT 5), abandon unacknowledged work, close."""
        self._cancel_work()
        if self._closing:
            self._end()
        else:
            self._close(RC_SERVER_SHUTTING_DOWN, "shutdown", will=False)

    def take_over(self) -> None:
        """A new connection of the same client replaces this one: DISCONNECT 0x8E, will, close."""
        self._close(RC_SESSION_TAKEN_OVER, "taken_over", will=True, linger=True)

    def abort(self) -> None:
        """Shutdown, last resort: drop the socket without waiting for buffered data."""
        if self._transport is not None:
            self._transport.abort()

    # ------------------------------------------------------------------ packets

    def _handle(self, packets: list[Packet], start: int) -> None:
        try:
            self._handle_packets(packets, start)
        finally:
            self._start_batch()

    def _handle_packets(self, packets: list[Packet], start: int) -> None:
        for i in range(start, len(packets)):
            if self._closing:
                return
            packet = packets[i]
            if isinstance(packet, Publish):
                self._on_publish(packet)
            elif isinstance(packet, Pingreq):
                self._write(encode_pingresp())
            elif isinstance(packet, Pubrel):
                self._on_pubrel(packet)
            elif isinstance(packet, Connect):
                self._on_connect(packet)
                if self._backlog is not None:  # authentication continues asynchronously
                    self._backlog.extend(packets[i + 1 :])
                    return
            elif isinstance(packet, Puback):
                if self._session is not None:
                    self._session.acked(packet.packet_id)
            elif isinstance(packet, Subscribe):
                self._on_subscribe(packet)
            elif isinstance(packet, Unsubscribe):
                self._on_unsubscribe(packet)
            elif isinstance(packet, Disconnect):
                # 0x04 "disconnect with will message"; anything else discards the will.
                self._close(None, "client", will=packet.reason_code == 0x04)
            elif isinstance(packet, Auth):  # pragma: no cover - refused at CONNECT, the codec rejects AUTH
                self._close(RC_BAD_AUTH_METHOD, "protocol_error", will=True)
            # PUBREC / PUBCOMP from a client answer nothing we sent (we publish at QoS 0 or 1): ignored.
        self._update_reading()

    def _on_connect(self, connect: Connect) -> None:
        server = self._server
        self._version = connect.protocol_level
        if connect.protocol_level == 5:
            self._problem_info = connect.properties.get("request_problem_information", 1) != 0
            self._max_out = connect.maximum_packet_size or 0
        if "authentication_method" in connect.properties:
            self._refuse(RC_BAD_AUTH_METHOD)
            return
        fingerprint = self._peer_fingerprint()
        if fingerprint is not None:
            self._authenticate_later(connect, self._certificate_device(fingerprint))
            return
        if not connect.username:
            if server.anonymous:
                self._accept(connect, None)
            else:
                self._refuse(RC_BAD_CREDENTIALS)
            return
        device = server.ctx.directory.by_token(connect.username)
        if device is not None:
            self._accept(connect, device)  # an access token: any password is ignored (ThingsBoard)
        elif connect.password:
            try:
                password = connect.password.decode("utf-8")
            except UnicodeDecodeError:
                self._refuse(RC_BAD_CREDENTIALS)
                return
            self._authenticate_later(connect, server.ctx.directory.by_password(connect.username, password))
        else:
            self._refuse(RC_NOT_AUTHORIZED)

    def _peer_fingerprint(self) -> str | None:
        if self._server.options.client_cert == "none" or self._transport is None:
            return None
        ssl_object = self._transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return None if not der else hashlib.sha256(der).hexdigest()

    async def _certificate_device(self, fingerprint: str) -> DeviceRef | None:
        server = self._server
        device = await server.ctx.resolver.resolve(server.name, {"cert_sha256": fingerprint}, "reject")
        if device is None or device.quarantined:
            log.info("mqtt source %s: refused unknown or disabled certificate sha256=%s", server.name, fingerprint)
            return None
        return device

    def _authenticate_later(self, connect: Connect, lookup: Coroutine[Any, Any, DeviceRef | None]) -> None:
        """Authenticate off the packet path (a registry lookup, a password check); packets that
        arrive meanwhile wait in the backlog and reading pauses."""
        self._backlog = []
        self._update_reading()
        self._server.spawn(self._finish_authentication(connect, lookup))

    async def _finish_authentication(self, connect: Connect, lookup: Coroutine[Any, Any, DeviceRef | None]) -> None:
        server = self._server
        try:
            device = await lookup
        except RegistryError as exc:
            log.warning("mqtt source %s: registry unavailable during CONNECT: %s", server.name, exc)
            device = None
            code = RC_SERVER_UNAVAILABLE
        else:
            code = RC_NOT_AUTHORIZED
        if self._closing:
            return
        backlog, self._backlog = self._backlog or [], None
        if device is None:
            self._refuse(code)
            return
        self._accept(connect, device)
        try:
            self._handle(backlog, 0)
        except Exception:
            log.exception("mqtt source %s: internal error; closing the connection", server.name)
            self._close(RC_UNSPECIFIED, "internal_error", will=False)

    def _refuse(self, code: int) -> None:
        self._server.metrics.connect(_CONNACK_RESULTS.get(code, f"0x{code:02x}"))
        self._write(encode_connack(False, code, self._version))
        self._close(None, "refused", will=False)

    def _accept(self, connect: Connect, device: DeviceRef | None) -> None:
        server = self._server
        # Session takeover (MQTT 5 section 3.1.4): a client reconnecting with the same client id,
        # typically while its old connection is half-open, replaces the old connection. Scoped to
        # the authenticated device, so that devices cannot evict each other.
        key = (device.p_uid if device is not None else None, connect.client_id)
        old = server.clients.get(key) if connect.client_id else None
        if old is None and server.sessions >= server.options.max_connections:
            self._refuse(RC_QUOTA_EXCEEDED)
            return
        if old is not None:
            old.take_over()
        if connect.client_id:
            server.clients[key] = self
            self._key = key
        session, present = self._take_session(connect, key, device)
        self._device = device
        self._will = connect.will
        self._connected = True
        server.sessions += 1
        server.metrics.connections.inc()
        server.metrics.connect("accepted")
        if device is not None:
            server.ctx.directory.seen(device.p_uid, None, utcnow())
        if self._version == 5:
            props: dict[str, int | str] = dict(server.connack_properties)
            if connect.session_expiry_interval != int(session.expiry):
                props["session_expiry_interval"] = int(session.expiry)  # capped by `session_expiry`
            if not connect.client_id:
                props["assigned_client_identifier"] = f"isthmus-{secrets.token_hex(8)}"
            self._write(encode_connack(present, RC_SUCCESS, 5, props))
        else:
            self._write(encode_connack(present, RC_SUCCESS, 4))
        self._session = session
        receive_maximum = connect.receive_maximum if self._version == 5 else 32
        session.resume(self, receive_maximum)
        session.attach_all()
        # Keep-alive: 1.5 x the client's interval after the last bytes received (0: none).
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if connect.keepalive:
            self._grace = connect.keepalive * 1.5
            self._timer = self._loop.call_at(self._last_rx + self._grace, self._on_timer)

    def _take_session(
        self, connect: Connect, key: tuple[int | None, str], device: DeviceRef | None
    ) -> tuple[Session, bool]:
        """The session this connection continues (``True``: session present) or starts."""
        server = self._server
        limit = server.options.session_expiry
        if connect.clean_start or not connect.client_id:
            expiry = min(connect.session_expiry_interval, limit) if self._version == 5 and connect.client_id else 0
        else:
            expiry = min(connect.session_expiry_interval, limit) if self._version == 5 else limit
        session = server.session_state.get(key) if connect.client_id else None
        if session is not None and connect.clean_start:
            server.end_session(session)
            session = None
        present = session is not None
        if session is None:
            session = Session(key, device, server.ctx.downlink, server.options.max_queued)
            if connect.client_id:
                server.session_state[key] = session
        session.expiry = float(expiry)
        return session, present

    def send_publish(self, topic: str, payload: bytes, qos: int, packet_id: int, *, dup: bool) -> None:
        """Write one PUBLISH to the client (a session's outbound message)."""
        data = encode_publish(topic, payload, qos, packet_id, version=self._version, dup=dup)
        if self._max_out and len(data) > self._max_out:
            log.info("mqtt source %s: a %d-byte message on %s exceeds the client's maximum", self._server.name,
                     len(data), topic)  # fmt: skip
            if self._session is not None and qos:
                self._session.acked(packet_id)
            return
        self._write(data)

    def _on_subscribe(self, subscribe: Subscribe) -> None:
        """Record the subscriptions; QoS 2 is granted as 1 (the server sends at most QoS 1)."""
        refused = RC_SUBSCRIPTION_REFUSED if self._version == 5 else RC_UNSPECIFIED
        session = self._session
        codes = [
            session.subscribe(f, options & 3) if session is not None and is_valid_topic_filter(f) else refused
            for f, options in subscribe.subscriptions
        ]
        self._write(encode_suback(subscribe.packet_id, codes, self._version))

    def _on_unsubscribe(self, unsubscribe: Unsubscribe) -> None:
        session = self._session
        no_subscription = 0x11 if self._version == 5 else RC_SUCCESS
        codes = [
            RC_SUCCESS if session is not None and session.unsubscribe(f) else no_subscription
            for f in unsubscribe.topic_filters
        ]
        self._write(encode_unsuback(unsubscribe.packet_id, codes, self._version))

    def _on_request(self, publish: Publish, device: DeviceRef) -> bool:
        """Handle a ThingsBoard request topic (attributes, RPC, gateway control); ``False``: not one."""
        server = self._server
        session = self._session
        topic = publish.topic
        if session is None:  # pragma: no cover - set at CONNACK, before any PUBLISH is handled
            return False
        if topic.startswith(ATTRIBUTE_REQUEST_PREFIX):
            kind = "attributes"
            server.spawn(
                server.answer_attributes(session, device, topic[len(ATTRIBUTE_REQUEST_PREFIX) :], publish.payload)
            )
        elif topic.startswith(RPC_RESPONSE_PREFIX):
            kind = "rpc_response"
            request_id = topic[len(RPC_RESPONSE_PREFIX) :]
            if not request_id.isdigit() or not server.ctx.downlink.rpc_response(
                device.p_uid, int(request_id), _json_or_text(publish.payload)
            ):
                kind = "rpc_response_unmatched"
        elif topic.startswith(RPC_REQUEST_PREFIX):
            kind = "client_rpc"
            server.spawn(
                server.answer_client_rpc(session, device.p_uid, topic[len(RPC_REQUEST_PREFIX) :], publish.payload)
            )
        elif device.gateway and topic in (
            GATEWAY_CONNECT_TOPIC, GATEWAY_DISCONNECT_TOPIC, GATEWAY_RPC_TOPIC, GATEWAY_ATTRIBUTE_REQUEST_TOPIC
        ):  # fmt: skip
            kind = "gateway_" + topic.rsplit("/", 1)[1]
            server.spawn(server.gateway_control(session, topic, publish.payload))
        else:
            return False
        server.metrics.request(kind)
        return True

    def _on_pubrel(self, pubrel: Pubrel) -> None:
        qos2 = self._qos2
        if qos2 is not None and qos2.get(pubrel.packet_id):
            del qos2[pubrel.packet_id]
            self._write(encode_pubcomp(pubrel.packet_id, self._version))
        else:
            code = RC_PACKET_ID_NOT_FOUND if self._version == 5 else RC_SUCCESS
            self._write(encode_pubcomp(pubrel.packet_id, self._version, code))

    def _on_publish(self, publish: Publish) -> None:
        server = self._server
        qos = publish.qos
        if publish.properties and "topic_alias" in publish.properties:
            # We announce no Topic Alias Maximum, so any alias is invalid (MQTT 5 section 3.3.2.3.4).
            self._protocol_error(ProtocolError(RC_TOPIC_ALIAS_INVALID, "topic alias used but none allowed"))
            return
        qos2 = self._qos2
        if qos == 2:
            if qos2 is None:
                qos2 = self._qos2 = {}
            elif publish.packet_id in qos2:
                # A resend of a QoS 2 PUBLISH we hold: journaled once; PUBREC again if already sent.
                if qos2[publish.packet_id]:
                    self._ack(_Slot(publish.packet_id, 2), done=True)
                return
        # Rate limit: a token bucket refilled at `rate_per_second`, `burst` deep.
        now = self._last_rx
        tokens = min(server.burst, self._tokens + (now - self._refill_at) * server.rate)
        self._refill_at = now
        if tokens < 1.0:
            self._tokens = tokens
            self._rate_limited(publish)
            return
        self._tokens = tokens - 1.0
        device_rate = server.device_rate
        if device_rate is not None and self._device is not None:
            bucket = server.device_buckets.get(self._device.p_uid)
            if bucket is None:
                bucket = server.device_buckets[self._device.p_uid] = [float(device_rate.burst), now]
            tokens = min(float(device_rate.burst), bucket[0] + (now - bucket[1]) * device_rate.rate_per_second)
            bucket[1] = now
            if tokens < 1.0:
                bucket[0] = tokens
                self._rate_limited(publish)
                return
            bucket[0] = tokens - 1.0
        route = server.route(publish.topic, self._device)
        if route is None:
            if self._device is not None and self._on_request(publish, self._device):
                if qos:
                    self._ack(_Slot(publish.packet_id, qos), done=True)
                return
            server.metrics.rejected("unsupported_topic")
            if qos:
                self._ack(_Slot(publish.packet_id, qos), done=True, code=RC_TOPIC_NAME_INVALID)
            return
        slot = None
        if qos:
            slot = _Slot(publish.packet_id, qos)
            if qos2 is not None and qos == 2:
                qos2[publish.packet_id] = False
            self._ack(slot, done=False)
        if self._intake_task is None and slot is not None and route.device is not None and not route.gateway:
            # Fast path: nothing of this connection waits for an asynchronous step. The QoS 1/2
            # PUBLISHes of one read are journaled together (see _start_batch).
            batch = self._batch
            if batch is None:
                batch = self._batch = []
            batch.append((Submission(server.frame(publish, route.kind), route.device, route.decoder), slot))
            return
        self._start_batch()  # what came before goes to the journal before this
        intake = self._intake
        if intake is None:
            intake = self._intake = deque()
        intake.append((publish, route, slot))
        if self._intake_task is None:
            self._intake_task = self._loop.create_task(self._run_intake())

    def _rate_limited(self, publish: Publish) -> None:
        """Refuse a PUBLISH over a rate limit: MQTT 5 0x96 for QoS 1/2, else disconnect."""
        self._server.metrics.rejected("rate_limited")
        if self._version == 5 and publish.qos:
            self._ack(_Slot(publish.packet_id, publish.qos), done=True, code=RC_RATE_TOO_HIGH)
        else:
            self._close(RC_RATE_TOO_HIGH, "rate_limited", will=True, linger=True)

    # ------------------------------------------------------------------ journaling and acks

    async def _run_intake(self) -> None:
        """Take queued PUBLISHes one by one, resolving devices, in arrival order."""
        server = self._server
        ingest = self._ingest
        intake = self._intake
        if intake is None:  # pragma: no cover - created before the task
            return
        try:
            # Received PUBLISHes are journaled even if the client has gone meanwhile (a QoS 0 one
            # followed by DISCONNECT); only a journal or registry failure abandons the rest.
            while intake:
                publish, route, slot = intake.popleft()
                if route.gateway:
                    if not await self._intake_gateway(publish, route, slot):
                        return
                    continue
                device = route.device
                if device is None and route.source_ids is not None:
                    try:
                        device = await server.ctx.resolver.resolve(server.name, route.source_ids, route.policy)
                    except RegistryError as exc:
                        self._unavailable(exc)
                        return
                if device is None:
                    server.metrics.rejected("unknown_device")
                    if slot is not None:
                        slot.finish(RC_NOT_AUTHORIZED if self._version == 5 else RC_SUCCESS)
                        self._flush_acks()
                    continue
                submission = Submission(server.frame(publish, route.kind), device, route.decoder)
                if slot is not None:
                    self._commit([(submission, slot)])
                    continue
                # QoS 0: this one and the QoS 0 PUBLISHes of known devices queued behind it, in one append.
                batch = [submission]
                while intake:
                    next_publish, next_route, next_slot = intake[0]
                    if next_slot is not None or next_route.device is None or next_route.gateway:
                        break
                    intake.popleft()
                    batch.append(
                        Submission(server.frame(next_publish, next_route.kind), next_route.device, next_route.decoder)
                    )
                try:
                    await ingest.submit_nowait(batch)
                except JournalError as exc:
                    self._unavailable(exc)
                    return
        finally:
            self._intake_task = None
            self._update_reading()

    async def _intake_gateway(self, publish: Publish, route: _Route, slot: _Slot | None) -> bool:
        """Journal a gateway PUBLISH as one frame per device it names, in order; ``False``: unavailable.

        ``{"Device A": [...], "Device B": {...}}``: each device's part becomes a frame of that device
        (``meta["gateway"]`` names the gateway). A payload that is not such an object is journaled
        whole, as the gateway's own frame with the error, so nothing is lost.
        """
        server = self._server
        session = self._session
        gateway = route.device
        if gateway is None or session is None:  # pragma: no cover - gateway routes carry the device
            return True
        parts: list[Submission] = []
        try:
            data = _json_decode(publish.payload)
            if not isinstance(data, dict) or not data:
                raise ValueError("expected a JSON object of device name -> data")
            for name, value in data.items():
                frame = server.frame(publish, route.kind, gateway=gateway.name, payload=_json_encode(value))
                if not _valid_device_name(name):
                    # Kept, as the gateway's own frame with the error: the data is not lost.
                    parts.append(
                        Submission(frame, gateway, error=f"gateway {route.kind}: invalid device name {name[:50]!r}")
                    )
                    continue
                device = await server.gateway_child(session, name)
                if device is None:  # `gateway_policy = "reject"` and an unknown device
                    server.metrics.rejected("unknown_device")
                    continue
                parts.append(Submission(frame, device))
        except (ValueError, msgspec.DecodeError) as exc:
            parts = [Submission(server.frame(publish, route.kind), gateway, error=f"gateway {route.kind}: {exc}")]
        except RegistryError as exc:
            self._unavailable(exc)
            return False
        if slot is not None:
            if parts:
                self._commit([(part, slot) for part in parts])
            else:  # every device it names was refused (`gateway_policy = "reject"`): nothing to wait for
                slot.finish()
                self._flush_acks()
            return True
        try:
            await self._ingest.submit_nowait(parts)
        except JournalError as exc:
            self._unavailable(exc)
            return False
        return True

    def _start_batch(self) -> None:
        """Start journaling the fast-path PUBLISHes gathered from one read, in one append.

        Called at the end of every read and before anything takes the intake path, so that the
        batch's task is created before any later submit: journal order stays arrival order.
        """
        batch, self._batch = self._batch, None
        if batch:
            self._commit(batch)

    def _commit(self, batch: list[_Durable]) -> None:
        """Start journaling ``batch`` in one append; its slots keep the task (cancelled at shutdown)."""
        task = self._loop.create_task(self._commit_batch(batch))
        for _, slot in batch:
            slot.task = task

    async def _commit_batch(self, batch: list[_Durable]) -> None:
        """Journal a batch of QoS 1/2 frames durably, then let their acks go (in order).

        A slot whose frames include a decode error is acknowledged with the first one (MQTT 5:
        0x99 payload format invalid); the others with success.
        """
        try:
            results = await self._ingest.submit_batch([submission for submission, _ in batch])
        except JournalError as exc:
            self._unavailable(exc)
            return
        except Exception:
            log.exception("mqtt source %s: ingest failed; closing the connection unacknowledged", self._server.name)
            self._close(RC_UNSPECIFIED, "internal_error", will=False)
            return
        finally:
            for _, slot in batch:
                slot.task = None
        if self._version == 5:
            for (_, slot), result in zip(batch, results, strict=True):
                if result.record.status is Status.DECODE_ERROR and not slot.done:
                    slot.finish(RC_PAYLOAD_FORMAT_INVALID, result.record.error)
        for _, slot in batch:
            if not slot.done:
                slot.finish()
        self._schedule_flush()

    def _ack(self, slot: _Slot, *, done: bool, code: int = RC_SUCCESS) -> None:
        """Queue ``slot`` for an in-order ack (already ``done`` for refusals)."""
        if done:
            slot.finish(code if self._version == 5 else RC_SUCCESS)
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        pending.append(slot)
        if done:
            self._flush_acks()

    def _schedule_flush(self) -> None:
        """Flush acks at the end of this loop iteration: the PUBLISHes one group commit made durable
        all finish in this iteration, so their acks leave in one write instead of one write each."""
        pending = self._pending
        if not self._flush_scheduled and pending and pending[0].done:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Send the acks of the finished PUBLISHes at the head of the queue, in arrival order."""
        pending = self._pending
        if not pending or not pending[0].done:
            return
        version = self._version
        qos2 = self._qos2
        out: list[bytes] = []
        while pending and pending[0].done:
            slot = pending.popleft()
            props = self._reason_props(slot)
            if slot.qos == 1:
                out.append(encode_puback(slot.packet_id, version, slot.code, props))
            else:
                out.append(encode_pubrec(slot.packet_id, version, slot.code, props))
                if qos2 is not None:
                    if slot.code < 0x80:
                        qos2[slot.packet_id] = True
                    else:  # a refused QoS 2 exchange ends with its PUBREC
                        qos2.pop(slot.packet_id, None)
        self._write(out[0] if len(out) == 1 else b"".join(out))
        if self._server.wakeup is not None:
            self._server.poke()
        if self._closing and not pending:
            self._end()  # a lingering close: the last ack is out
        elif self._read_paused and len(pending) < self._server.resume_below:
            self._update_reading()

    def _reason_props(self, slot: _Slot) -> dict[str, Any] | None:
        if slot.reason is None or not self._problem_info:
            return None
        reason = slot.reason[:_REASON_STRING_MAX]
        if self._max_out and len(reason.encode()) + 16 > self._max_out:
            return None
        return {"reason_string": reason}

    def _update_reading(self) -> None:
        """Pause reading while work piles up or the client does not read; resume when it drains."""
        transport = self._transport
        if transport is None or self._closing or self._server.stopping:
            return
        queued = (len(self._pending) if self._pending else 0) + (len(self._intake) if self._intake else 0)
        limit = self._server.resume_below if self._read_paused else self._server.max_inflight
        want_pause = self._backlog is not None or self._write_paused or queued >= limit
        if want_pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not want_pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    # ------------------------------------------------------------------ closing

    def _write(self, data: bytes) -> None:
        transport = self._transport
        # is_closing(): the peer may be gone before connection_lost() has run.
        if not self._closed and transport is not None and not transport.is_closing():
            transport.write(data)

    def _on_timer(self) -> None:
        """Connect timeout before CONNACK; keep-alive (1.5 x interval since the last bytes) after."""
        self._timer = None
        if self._closing:
            return
        loop = self._loop
        now = loop.time()
        if not self._connected:
            self._server.metrics.connect("timeout")
            self._close(None, "connect_timeout", will=False)
            return
        # Reading paused because the journal is behind is our doing, not the client's silence.
        if self._read_paused and not self._write_paused:
            self._last_rx = now
        deadline = self._last_rx + self._grace
        if now >= deadline:
            self._close(RC_KEEP_ALIVE_TIMEOUT, "keepalive_timeout", will=True, linger=True)
        else:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _protocol_error(self, exc: ProtocolError) -> None:
        server = self._server
        server.metrics.protocol_error(exc.reason_code)
        log.debug("mqtt source %s: protocol error: %s", server.name, exc)
        if exc.connack_version is not None:
            server.metrics.connect(_REASON_NAMES.get(exc.reason_code, "protocol_error"))
            with contextlib.suppress(ValueError):
                self._write(encode_connack(False, exc.reason_code, exc.connack_version))
            self._close(None, "protocol_error", will=False)
        else:
            self._close(exc.reason_code, "protocol_error", will=True, linger=True)

    def _unavailable(self, exc: Exception) -> None:
        log.warning(
            "mqtt source %s: cannot store messages (%s); disconnecting the client unacknowledged",
            self._server.name,
            exc,
        )
        if self._intake:
            self._intake.clear()
        if self._closing:  # already lingering: end now, with "server busy"
            self._linger = RC_SERVER_BUSY
            self._end()
        else:
            self._close(RC_SERVER_BUSY, "unavailable", will=False)

    def _close(self, code: int | None, reason: str, *, will: bool, linger: bool = False) -> None:
        """Stop processing input and close; MQTT 5 clients past CONNACK get DISCONNECT ``code`` last.

        ``linger``: PUBLISHes received before the offence still being journaled are acknowledged
        first (for at most ``_LINGER`` seconds), so a misbehaving client does not resend them.
        """
        if self._closing:
            return
        self._closing = True
        self._reason = reason
        if will:
            self._publish_will()
        self._will = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._linger = code
        if linger and self._pending and self._transport is not None:
            if not self._read_paused:
                self._read_paused = True
                self._transport.pause_reading()
            self._timer = self._loop.call_later(_LINGER, self._end)
            return
        self._end()

    def _end(self) -> None:
        """Close the transport (after the lingering DISCONNECT, if any)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._closed:
            return
        code, self._linger = self._linger, None
        if code is not None and self._version == 5 and self._connected:
            self._write(encode_disconnect(code, 5))
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def _publish_will(self) -> None:
        will, self._will = self._will, None
        server = self._server
        if will is not None and self._connected and not server.stopping:
            server.spawn(server.journal_will(will, self._device))

    def _cancel_work(self) -> None:
        if self._intake_task is not None:
            self._intake_task.cancel()
        for slot in self._pending or ():
            if slot.task is not None:
                slot.task.cancel()


PLUGIN = SourcePlugin(
    name="mqtt",
    description="MQTT 3.1.1/5.0 server for devices: ThingsBoard device topics and generic topic patterns, "
    "acknowledged after the journal commit.",
    config=MqttServerOptions,
    factory=MqttServer,
)
