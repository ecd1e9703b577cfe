"""MQTT client source: subscribe to topics on an existing broker and journal what arrives.

Each configured ``[[sources]]`` entry of type ``mqtt-client`` is one connection to one broker
(``mqtt://`` or ``mqtts://``) with any number of subscriptions. A subscription names a topic
filter (``$share/<group>/…`` shared subscriptions included), a QoS and how the device is found:
placeholders in a topic template (``pebble/{device}/data``) and/or a field of the JSON payload.
Devices first seen are auto-created through :class:`~isthmus.interfaces.DeviceResolver` under the
source's ``policy``. See ``docs/mqtt-client.md`` for the options and the failure behaviour.

Delivery guarantee (QoS 1, the default): the session is persistent (MQTT 5 session expiry, or
``clean_session = false`` for 3.1.1) and every message is acknowledged to the broker only after
``Ingest.submit(..., wait=True)`` returned, i.e. once the record is durable in the journal. A
crash, a cancelled source, a lost connection or a journal failure therefore leaves the message
unacknowledged and the broker delivers it again on the next connection: nothing acknowledged is
lost; duplicates are possible (QoS 1 is at-least-once).

Pipelining: up to ``max_inflight`` messages of a connection wait for their journal commit at the
same time and share group commits. The messages of one subscription are journaled in arrival
order (one intake task per subscription resolves the devices one by one and starts one submit
task per message, in order), and acknowledgements leave strictly in arrival order, each once its
own record is durable; see :class:`_Session`.

Threads: none of our own. paho's network loop is driven from the asyncio event loop (the socket
is registered with ``loop.add_reader``/``add_writer``; ``loop_read``, ``loop_write`` and
``loop_misc`` run in the event-loop thread), so paho's callbacks, our acknowledgements and our
state all live on one thread and need no locks. The only blocking paho call, ``reconnect()``
(DNS, TCP connect, TLS handshake, bounded by ``connect_timeout``), runs in a worker thread while
the event loop does not touch the client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import ssl
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from itertools import zip_longest
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import Counter, Gauge
from pydantic import Field, FilePath, SecretStr, field_validator, model_validator

from isthmus.errors import JournalError, RegistryError
from isthmus.interfaces import DeviceRef, Ingest
from isthmus.message import Kind, RawFrame, new_correlation_id, utcnow
from isthmus.plugins import PluginConfig, SourceContext, SourcePlugin

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MISC_INTERVAL = 1.0
"""Seconds between calls of paho's ``loop_misc`` (keep-alive pings and their timeout)."""
REMINDER_INTERVAL = 600.0
"""Seconds between warnings while a broker stays unreachable (single failed attempts log at DEBUG)."""
REJECT_REASONS = ("no_device", "policy", "journal_error")
ROUTE_CACHE = 10_000
"""Topics whose subscription is remembered (the cache is emptied when full)."""
READ_CHUNK = 65536
"""Bytes read from the broker's socket at once (paho's own reads are a few bytes each)."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MISSING = object()


# --------------------------------------------------------------------------- topic syntax


def split_share(topic_filter: str) -> tuple[str | None, str]:
    """``("group", "a/+/b")`` for ``$share/group/a/+/b``; ``(None, filter)`` otherwise."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise ValueError(f"shared subscription {topic_filter!r} must look like '$share/<group>/<filter>'")
    group = parts[1]
    if any(c in group for c in "+#"):
        raise ValueError(f"shared subscription group {group!r} must not contain '+' or '#'")
    return group, parts[2]


def check_filter(topic_filter: str) -> None:
    """Raise ValueError unless ``topic_filter`` is a valid MQTT topic filter (no share prefix)."""
    if not topic_filter:
        raise ValueError("a topic filter must not be empty")
    if "\x00" in topic_filter or len(topic_filter.encode()) > 65535:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {topic_filter!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic_filter!r}: '+' must be a whole level")


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled device template: ``pebble/{device}/data``, ``v3/{app}@ttn/devices/{device}/up``.

    Each ``{name}`` captures a non-empty part of one topic level (at most one per level); ``+``
    matches any one level and a final ``#`` any remaining levels, neither captured.
    """

    text: str
    levels: tuple[str, ...]
    names: tuple[str, ...]
    pattern: re.Pattern[str]

    @classmethod
    def parse(cls, text: str) -> Template:
        """Compile ``text``; raise ValueError naming the problem."""
        if not text:
            raise ValueError("a device template must not be empty")
        levels = tuple(text.split("/"))
        names: list[str] = []
        parts: list[str] = []
        for i, level in enumerate(levels):
            if level == "#":
                if i != len(levels) - 1:
                    raise ValueError(f"device template {text!r}: '#' must be the last level")
                parts.append("(?:/.*)?" if parts else ".*")
                continue
            piece = "[^/]*" if level == "+" else cls._level_regex(text, level, names)
            parts.append(piece if not parts else "/" + piece)
        return cls(text, levels, tuple(names), re.compile("".join(parts)))

    @staticmethod
    def _level_regex(text: str, level: str, names: list[str]) -> str:
        found = list(_PLACEHOLDER.finditer(level))
        if len(found) > 1:
            raise ValueError(f"device template {text!r}: at most one placeholder per topic level ({level!r})")
        rest = _PLACEHOLDER.sub("", level)
        if any(c in rest for c in "{}+#"):
            raise ValueError(
                f"device template {text!r}: level {level!r} may hold literal text and one '{{name}}' "
                "placeholder (a name is letters, digits and '_'), or be '+' or a final '#'"
            )
        if not found:
            return re.escape(level)
        m = found[0]
        name = m.group(1)
        if name in names:
            raise ValueError(f"device template {text!r}: placeholder {{{name}}} appears twice")
        names.append(name)
        return f"{re.escape(level[: m.start()])}(?P<{name}>[^/]+){re.escape(level[m.end() :])}"

    def match(self, topic: str) -> dict[str, str] | None:
        """The placeholders captured from ``topic``, or ``None`` when it does not match."""
        m = self.pattern.fullmatch(topic)
        return None if m is None else m.groupdict()

    def compatible(self, topic_filter: str) -> bool:
        """False when no topic matched by ``topic_filter`` (share prefix removed) can match."""
        for f, t in zip_longest(topic_filter.split("/"), self.levels):
            if f == "#" or t == "#":
                return True
            if f is None or t is None:
                return False
            if f == "+" or t == "+":
                continue
            if _PLACEHOLDER.search(t):
                if not re.fullmatch(Template._level_regex(self.text, t, []), f):
                    return False
            elif f != t:
                return False
        return True


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """The reference tokens of a JSON pointer (RFC 6901) such as ``/dev_id`` or ``/meta/id``."""
    if not pointer.startswith("/"):
        raise ValueError(f"device_field {pointer!r} must be a JSON pointer starting with '/' (e.g. '/dev_id')")
    tokens = []
    for raw in pointer[1:].split("/"):
        if re.search(r"~(?![01])", raw):
            raise ValueError(f"device_field {pointer!r}: '~' must be followed by 0 or 1 (RFC 6901)")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    if any(not t for t in tokens):
        raise ValueError(f"device_field {pointer!r} has an empty reference token")
    return tuple(tokens)


def _lookup(doc: Any, tokens: tuple[str, ...]) -> Any:
    for part in tokens:
        if isinstance(doc, dict):
            doc = doc.get(part, _MISSING)
        elif isinstance(doc, list) and part.isdigit() and (part == "0" or part[0] != "0") and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
        if doc is _MISSING:
            return _MISSING
    return doc


# --------------------------------------------------------------------------- options


class Subscription(PluginConfig):
    """One topic filter and how the device is found in what arrives on it."""

    filter: str = Field(
        description="MQTT topic filter, wildcards allowed ('pebble/+/data', 'sensors/#'). "
        "'$share/<group>/<filter>' makes it a shared subscription: the broker spreads the messages "
        "over every client subscribed with the same group (several Isthmus nodes splitting the load)."
    )
    qos: Literal[0, 1, 2] = Field(
        1,
        description="Subscription QoS. 1 (default): at-least-once, acknowledged only after the journal commit. "
        "0: at-most-once, no acknowledgement. 2: see 'QoS 2' in docs/mqtt-client.md.",
    )
    device: str | None = Field(
        None,
        description="Topic template naming the device: 'pebble/{device}/data'. Each '{name}' captures part of "
        "one topic level and becomes a source id; '+' matches a level, a final '#' the rest. Matched against "
        "the topic without any '$share/<group>/' prefix. Must contain '{device}' unless device_field is set; "
        "when omitted, every topic of the filter matches and only device_field identifies the device.",
    )
    device_field: str | None = Field(
        None,
        description="JSON pointer into the payload whose value (a string or an integer) identifies the device, "
        "e.g. '/dev_id'. Stored as a source id under the pointer without its leading '/' ('dev_id').",
    )
    decoder: str = Field(
        "thingsboard", description="Decoder for these frames; a decoder set on the device itself wins."
    )
    kind: Literal["telemetry", "attributes"] = Field("telemetry", description="What the payloads carry.")

    @field_validator("filter")
    @classmethod
    def _valid_filter(cls, value: str) -> str:
        check_filter(split_share(value)[1])
        return value

    @model_validator(mode="after")
    def _valid_identity(self) -> Subscription:
        names: tuple[str, ...] = ()
        if self.device is not None:
            template = Template.parse(self.device)
            names = template.names
            topic_filter = split_share(self.filter)[1]
            if not template.compatible(topic_filter):
                raise ValueError(f"device template {self.device!r} matches no topic of filter {topic_filter!r}")
        if self.device_field is None:
            if "device" not in names:
                raise ValueError("a subscription needs a device template containing '{device}', or a device_field")
        else:
            key = self.device_field[1:]
            parse_pointer(self.device_field)
            if key in names:
                raise ValueError(f"device_field {self.device_field!r} and placeholder {{{key}}} would share a name")
        return self


class MqttClientOptions(PluginConfig):
    """Options of an ``mqtt-client`` source: one broker connection and its subscriptions."""

    url: str = Field(
        description="Broker address: 'mqtt://host:port' (default port 1883) or 'mqtts://host:port' (TLS, "
        "default port 8883). Credentials go in username/password, not in the URL."
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="MQTT client id; the broker keeps the persistent session under it. Default "
        "'isthmus-<source name>'. Give each Isthmus node its own id when several share a broker.",
    )
    username: str | None = Field(None, description="User name for the broker (unset: anonymous).")
    password: SecretStr | None = Field(None, description="Password for the broker (needs username).")
    ca_file: FilePath | None = Field(
        None,
        description="mqtts only: PEM file of the CA(s) that signed the broker's certificate (default: system CAs).",
    )
    cert_file: FilePath | None = Field(
        None, description="mqtts only: PEM client certificate, for brokers that require one (may also hold the key)."
    )
    key_file: FilePath | None = Field(None, description="mqtts only: PEM private key of cert_file.")
    protocol: Literal["3.1.1", "5"] = Field("5", description="MQTT protocol version: '5' or '3.1.1'.")
    keepalive: int = Field(
        30, ge=1, le=65535, description="Seconds between keep-alive pings; a silent broker is dropped after ~2x this."
    )
    session_expiry: int = Field(
        86400,
        ge=0,
        le=0xFFFFFFFF,
        description="MQTT 5: seconds the broker keeps the session (subscriptions and unacknowledged messages) "
        "while Isthmus is disconnected. MQTT 3.1.1 always asks for a persistent session (clean_session false); "
        "how long the broker keeps it is the broker's setting.",
    )
    connect_timeout: float = Field(
        10.0, gt=0, le=300, description="Seconds for the TCP connect, TLS handshake and CONNACK of one attempt."
    )
    reconnect_min: float = Field(1.0, gt=0, le=3600, description="First reconnect delay in seconds.")
    reconnect_max: float = Field(
        60.0, gt=0, le=86400, description="Longest reconnect delay in seconds (exponential backoff with jitter)."
    )
    max_inflight: int = Field(
        256,
        ge=1,
        le=65535,
        description="Most messages received but not yet journaled and acknowledged; their journal commits run "
        "concurrently (pipelined) and share group commits. MQTT 5 sends it to the broker (Receive Maximum); with "
        "either protocol Isthmus stops reading the socket while this many are pending.",
    )
    policy: Literal["accept", "quarantine", "reject"] = Field(
        "accept",
        description="Devices first seen: 'accept' auto-creates an enabled physical device; 'quarantine' a disabled "
        "one whose frames are journaled as quarantined; 'reject' creates nothing and drops their messages.",
    )
    subscriptions: list[Subscription] = Field(min_length=1, description="Topic filters to subscribe to.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_number(cls, value: Any) -> Any:
        return "5" if value == 5 and not isinstance(value, bool) else value  # protocol = 5 in TOML

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in DEFAULT_PORTS:
            raise ValueError(f"url {value!r} must start with mqtt:// or mqtts://")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put credentials in username/password, not in the url")
        if not parts.hostname:
            raise ValueError(f"url {value!r} names no host")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"url {value!r}: {exc}") from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"url {value!r} must not have a path, query or fragment")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttClientOptions:
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("ca_file, cert_file and key_file need an mqtts:// url")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    @property
    def tls(self) -> bool:
        """True for ``mqtts://``."""
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        """The broker's host name or address."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """The broker's port (the scheme's default when the url has none)."""
        parts = urlsplit(self.url)
        return parts.port or DEFAULT_PORTS[parts.scheme]


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True)
class Route:
    """A subscription compiled for the hot path."""

    index: int
    filter: str
    match_filter: str
    qos: int
    template: Template | None
    field: tuple[str, ...] | None
    field_key: str | None
    decoder: str
    kind: Kind

    @classmethod
    def build(cls, index: int, sub: Subscription) -> Route:
        """Compile validated ``sub`` (configuration order ``index``)."""
        return cls(
            index=index,
            filter=sub.filter,
            match_filter=split_share(sub.filter)[1],
            qos=sub.qos,
            template=None if sub.device is None else Template.parse(sub.device),
            field=None if sub.device_field is None else parse_pointer(sub.device_field),
            field_key=None if sub.device_field is None else sub.device_field[1:],
            decoder=sub.decoder,
            kind=sub.kind,
        )

    def identify(self, topic: str, payload: bytes) -> dict[str, str | int] | None:
        """The device's source ids from ``topic`` (and the payload field), or ``None`` if there are none."""
        ids: dict[str, str | int] = {}
        if self.template is not None:
            captured = self.template.match(topic)
            if captured is None:
                return None
            ids.update(captured)
        if self.field is not None and self.field_key is not None:
            try:
                doc = msgspec.json.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
                return None
            value = _lookup(doc, self.field)
            if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
                return None
            ids[self.field_key] = value
        return ids


# --------------------------------------------------------------------------- metrics


def _shared(ctx: SourceContext, name: str, make: Callable[[], T]) -> T:
    """Register a collector once per instance: every mqtt-client source of it shares it."""
    existing: T | None = ctx.shared.get(name)
    if existing is None:
        existing = ctx.shared[name] = make()
    return existing


def _collectors(ctx: SourceContext) -> tuple[Counter, Gauge]:
    registry = ctx.metrics
    rejected = _shared(
        ctx,
        "isthmus_mqtt_client_rejected_total",
        lambda: Counter(
            "isthmus_mqtt_client_rejected",
            "MQTT messages acknowledged without being journaled, by source and reason "
            "(no_device: no device in topic/payload; policy: unknown device under the reject policy; "
            "journal_error: a QoS 0 message the journal could not store).",
            ["source", "reason"],
            registry=registry,
        ),
    )
    connected = _shared(
        ctx,
        "isthmus_mqtt_client_connected",
        lambda: Gauge(
            "isthmus_mqtt_client_connected",
            "1 while the source is connected to its broker, else 0.",
            ["source"],
            registry=registry,
        ),
    )
    return rejected, connected


# --------------------------------------------------------------------------- the source


class MqttClientSource:
    """Implements :class:`~isthmus.interfaces.Source` for one broker connection.

    Built once by the runtime; :meth:`run` may be called again after it raised (the supervisor
    restarts crashed sources), each call with a fresh paho client and the same persistent session.
    """

    def __init__(self, options: MqttClientOptions, ctx: SourceContext) -> None:
        self.options = options
        self.ctx = ctx
        self.client_id = options.client_id or f"isthmus-{ctx.name}"
        self.routes = [Route.build(i, s) for i, s in enumerate(options.subscriptions)]
        self._routes: dict[str, Route | None] = {}  # topic -> route, see route()
        rejected, connected = _collectors(ctx)
        self.rejected = {reason: rejected.labels(ctx.name, reason) for reason in REJECT_REASONS}
        self.connected = connected.labels(ctx.name)
        self.connected.set(0)

    def route(self, topic: str) -> Route | None:
        """The first subscription (in configuration order) whose filter matches ``topic``."""
        cache = self._routes
        if topic in cache:
            return cache[topic]
        found = None
        for route in self.routes:
            if mqtt.topic_matches_sub(route.match_filter, topic):  # builds a matcher on each call: cached
                found = route
                break
        if len(cache) >= ROUTE_CACHE:
            cache.clear()
        cache[topic] = found
        return found

    async def run(self, ingest: Ingest) -> None:
        """Connect, subscribe and journal messages until cancelled; see :class:`~isthmus.interfaces.Source`.

        Never returns on its own and survives broker outages of any length (reconnecting with
        backoff). On cancellation sends DISCONNECT, closes the socket and returns with every
        message not yet journaled left unacknowledged (the broker redelivers it).
        """
        await _Session(self, ingest, asyncio.get_running_loop()).run()


@dataclass(slots=True, eq=False)
class _Inbound:
    """One received message on its way to the journal."""

    generation: int
    epoch: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    retain: bool
    content_type: str
    received_at: datetime
    order: int  # arrival number in this session: failed QoS 2 commits are retried in this order
    done: bool = False
    ok: bool = False


class _Lane:
    """One subscription's way to the journal: its messages in arrival order (``intake``), the
    durable submits in flight (``tasks``) and the QoS 2 messages whose commit failed (``retry``)."""

    __slots__ = ("crashed", "intake", "retry", "route", "tasks", "wakeup")

    def __init__(self, route: Route, crashed: asyncio.Future[None]) -> None:
        self.route = route
        self.crashed = crashed
        self.intake: deque[_Inbound] = deque()
        self.wakeup = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self.retry: list[_Inbound] = []

    def settled(self, task: asyncio.Task[None]) -> None:
        """A submit task ended; one that raised (a bug) fails the source: run() re-raises it."""
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None and not self.crashed.done():
            self.crashed.set_exception(exc)


class _Session:
    """The state of one :meth:`MqttClientSource.run` call. Everything runs on the event-loop thread.

    ``generation`` counts connections: a QoS 1 message is acknowledged only on the connection it
    arrived on (after a reconnect the broker redelivers it and may reuse its packet id). ``epoch``
    counts broker sessions (a CONNACK without session_present starts a new one): QoS 2 flows
    survive a reconnect within a session, so their PUBCOMP may be sent on a later connection.
    Acknowledgements leave in the order the messages arrived (MQTT 3.1.1 §4.6 / 5.0 §4.6).

    Pipelining, in order (as the device-facing server does it): every received message joins
    ``unacked`` (QoS 1/2: in arrival order, acknowledged from its head once done) and its
    subscription's lane. One intake task per lane takes the lane's messages one by one, resolves
    the device (awaited there, so a first-seen device holds up only later messages of the same
    subscription) and starts one task per QoS 1/2 message awaiting ``ingest.submit(wait=True)``.
    Submit tasks created one after another from one task are journaled in that order
    (:meth:`~isthmus.interfaces.Ingest.submit`), so journal order is arrival order per
    subscription while up to ``max_inflight`` commits are in flight and share group commits.
    """

    def __init__(self, source: MqttClientSource, ingest: Ingest, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.options = source.options
        self.ingest = ingest
        self.loop = loop
        self.thread = threading.get_ident()
        self.crashed: asyncio.Future[None] = loop.create_future()  # set by a submit task that raised (a bug)
        self.lanes = [_Lane(route, self.crashed) for route in source.routes]
        self.unacked: deque[_Inbound] = deque()  # QoS 1/2 messages not yet acknowledged, in arrival order
        self.loose = 0  # QoS 0 messages received and not yet handed to the journal
        self.arrivals = 0
        self.deferred_pubcomp: list[int] = []
        self.generation = 0
        self.epoch = 0
        self.acking = False  # connected, and acknowledgements may go out on this connection
        self.closing = False
        self.sock: Any = None  # the socket registered with the event loop
        self.reading = False
        self.writing = False
        self.connack: asyncio.Future[str | None] | None = None
        self.session_present = False
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.subscribed = False
        self.sub_mids: dict[int, list[Route]] = {}
        self.refused_filters: set[str] = set()
        self.failures = 0
        self.tls_ready = not self.options.tls
        self.store_trouble = False
        self.store_failures = 0  # journal or registry failures so far
        self.trouble_mark = 0  # store_failures when the current trouble began
        self.logged_rejects: set[str] = set()
        self.paho_error: str | None = None  # the last error paho logged during a connection attempt
        self.dropped_on_purpose = False
        self.client = self._make_client()

    # ------------------------------------------------------------------ setup

    def _make_client(self) -> _Client:
        o = self.options
        v5 = o.protocol == "5"
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.source.client_id,
            clean_session=None if v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,  # else paho reconnects by itself, blocking, inside loop_read
            manual_ack=True,
        )
        client.connect_timeout = o.connect_timeout
        if o.username is not None:
            client.username_pw_set(o.username, None if o.password is None else o.password.get_secret_value())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = o.session_expiry
            properties.ReceiveMaximum = o.max_inflight
            client.connect_async(o.host, o.port, o.keepalive, clean_start=False, properties=properties)
        else:
            client.connect_async(o.host, o.port, o.keepalive)
        return client

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Run the connection, the timers and one intake per subscription until cancelled or one fails."""
        name = self.source.ctx.name
        tasks: list[asyncio.Future[None]] = [
            asyncio.create_task(self._intake(lane), name=f"source-{name}-subscription-{lane.route.index}")
            for lane in self.lanes
        ]
        tasks.append(asyncio.create_task(self._misc(), name=f"source-{name}-misc"))
        tasks.append(asyncio.create_task(self._maintain(), name=f"source-{name}-connection"))
        try:
            done, _ = await asyncio.wait([*tasks, self.crashed], return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raise the first failure (a bug): the supervisor restarts the source
        finally:
            self.closing = True  # nothing more is acknowledged: what is in flight comes back from the broker
            submits = [task for lane in self.lanes for task in lane.tasks]
            for task in (*tasks, *submits):
                task.cancel()
            await asyncio.gather(*tasks, *submits, return_exceptions=True)
            self._shutdown()

    def _shutdown(self) -> None:
        """Disconnect cleanly if connected, then make sure the socket is closed and unregistered."""
        self.closing = True
        if self.client.is_connected() and self.sock is not None:
            self.client.disconnect()
            self.client.loop_write()  # usually writes DISCONNECT at once, and paho closes the socket
        self._drop()
        self._set_down()
        log.info("source %s: disconnected from %s", self.source.ctx.name, self.options.url)

    def _drop(self) -> None:
        """Close the socket now. paho has no public abortive close; ``_sock_close`` is what it uses itself."""
        if self.client.socket() is not None:
            self.client._sock_close()
        self._unregister()

    async def _maintain(self) -> None:
        """Connect, and reconnect after every failure or loss, forever (exponential backoff with jitter).

        Logs transitions, not retries: the first failed attempt of an outage (WARNING), a reminder
        every :data:`REMINDER_INTERVAL` while it lasts, the loss of a connection (WARNING) and the
        recovery (INFO). A connection dropped on purpose after a journal error logs at DEBUG (the
        journal error itself was logged).
        """
        name, url = self.source.ctx.name, self.options.url
        down_since = self.loop.time()
        attempts = 0  # failed attempts in the current outage
        reminder = 0.0
        ever_up = quiet = False
        while True:
            error = await self._connect()
            now = self.loop.time()
            if error is None:
                if not ever_up:
                    log.info("source %s: connected to %s as %r (session present: %s)",
                             name, url, self.source.client_id, self.session_present)  # fmt: skip
                else:
                    log.log(logging.DEBUG if quiet and not attempts else logging.INFO,
                            "source %s: reconnected to %s after %.1f s, %d failed attempts (session present: %s)",
                            name, url, now - down_since, attempts, self.session_present)  # fmt: skip
                ever_up, attempts = True, 0
                if not self.store_trouble:
                    self.failures = 0
                if not self.subscribed or not self.session_present:
                    self._subscribe()
                await self.lost.wait()
                down_since, quiet = self.loop.time(), self.dropped_on_purpose
                self.dropped_on_purpose = False
                if self.store_trouble:  # dropped to get redeliveries: back off further each time
                    self.failures += 1
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "source %s: connection to %s lost (%s); reconnecting", name, url, self.lost_reason)  # fmt: skip
            else:
                self.failures += 1
                attempts += 1
                if attempts == 1:
                    reminder = now + REMINDER_INTERVAL
                    log.warning("source %s: cannot connect to %s: %s; retrying with backoff up to %g s",
                                name, url, error, self.options.reconnect_max)  # fmt: skip
                elif now >= reminder:
                    reminder = now + REMINDER_INTERVAL
                    log.warning("source %s: still cannot connect to %s after %.0f s and %d attempts: %s",
                                name, url, now - down_since, attempts, error)  # fmt: skip
                else:
                    log.debug("source %s: attempt %d to connect to %s failed: %s", name, attempts, url, error)
            await asyncio.sleep(self._backoff())

    def _backoff(self) -> float:
        o = self.options
        cap = min(o.reconnect_max, o.reconnect_min * 2.0 ** min(self.failures, 40))
        return random.uniform(o.reconnect_min, max(o.reconnect_min, cap))  # noqa: S311 - jitter, not crypto

    async def _connect(self) -> str | None:
        """One connection attempt: ``None`` once CONNACK accepted it, else why it failed."""
        self.lost.clear()
        if not self.tls_ready:
            try:
                context = await asyncio.to_thread(_tls_context, self.options)
            except (OSError, ValueError) as exc:
                return f"TLS setup failed: {exc}"
            self.client.tls_set_context(context)
            self.tls_ready = True
        self.paho_error = None
        self.client.on_log = self._on_log  # to explain a failure; removed once connected
        job = asyncio.ensure_future(asyncio.to_thread(self.client.reconnect))
        try:
            rc = await asyncio.shield(job)
        except asyncio.CancelledError:
            # The blocking connect cannot be interrupted (it ends within connect_timeout): let it
            # finish so that its socket is closed here rather than leaked.
            await asyncio.wait([job])
            if not job.cancelled() and job.exception() is None:
                self._drop()
            raise
        except (OSError, ValueError) as exc:  # refused, unreachable, DNS, timeout, TLS (ssl errors are OSErrors)
            return _describe(exc)
        sock = self.client.socket()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
            self._drop()
            return mqtt.error_string(rc)
        self._register(sock)
        self.connack = self.loop.create_future()
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                return await self.connack
        except TimeoutError:
            self._drop()
            return f"no CONNACK within {self.options.connect_timeout:g} s"
        finally:
            self.connack = None
            self.paho_error = None
            if not log.isEnabledFor(logging.DEBUG):
                self.client.on_log = None

    def _subscribe(self) -> None:
        """Subscribe to every configured filter in one SUBSCRIBE (its SUBACK is checked in _on_subscribe)."""
        routes = self.source.routes
        if self.options.protocol == "5":
            # Retained messages only for a new subscription, not again on every reconnect.
            v5 = [
                (r.filter, SubscribeOptions(qos=r.qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
                for r in routes
            ]
            rc, mid = self.client.subscribe(v5)
        else:
            rc, mid = self.client.subscribe([(r.filter, r.qos) for r in routes])
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self.sub_mids[mid] = routes

    async def _misc(self) -> None:
        """Drive paho's timers: keep-alive pings, and dropping a broker that stopped answering them."""
        while True:
            await asyncio.sleep(MISC_INTERVAL)
            if self.sock is not None:
                self.client.loop_misc()

    # ------------------------------------------------------------------ event-loop I/O

    def _register(self, sock: Any) -> None:
        self.sock = sock
        # reconnect() queued CONNECT from the worker thread, where our write callback ignores it.
        self.loop.add_writer(sock, self._writable)
        self.writing = True
        self._resume()

    def _unregister(self) -> None:
        if self.sock is None:
            return
        if self.reading:
            self.loop.remove_reader(self.sock)
        if self.writing:
            self.loop.remove_writer(self.sock)
        self.sock = None
        self.reading = self.writing = False

    def _readable(self) -> None:
        if not self.reading:  # paused since this call was scheduled (by _resume)
            return
        client = self.client
        client.loop_read()
        # Bytes already read (our buffer, or TLS records already decrypted) are invisible to the
        # selector: handle them now, unless the back-pressure limit stopped reading.
        while self.reading and client.socket() is self.sock and client.buffered():
            client.loop_read()

    def _writable(self) -> None:
        self.client.loop_write()

    def _pause(self) -> None:
        if self.reading and len(self.unacked) + self.loose >= self.options.max_inflight:
            self.loop.remove_reader(self.sock)
            self.reading = False

    def _resume(self) -> None:
        if not self.reading and self.sock is not None and len(self.unacked) + self.loose < self.options.max_inflight:
            self.loop.add_reader(self.sock, self._readable)
            self.reading = True
            if self.client.buffered():
                self.loop.call_soon(self._readable)

    def _in_loop(self, sock: Any) -> bool:
        return threading.get_ident() == self.thread and sock is self.sock

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_loop(sock) and not self.writing:
            self.loop.add_writer(sock, self._writable)
            self.writing = True

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_loop(sock) and self.writing:
            self.loop.remove_writer(sock)
            self.writing = False

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_loop(sock):
            self._unregister()

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        # Installed while connecting (paho formats every message for it) or at debug level.
        if level in (mqtt.MQTT_LOG_ERR, mqtt.MQTT_LOG_WARNING):
            self.paho_error = message
        log.debug("source %s: paho: %s", self.source.ctx.name, message)

    def _describe_reason(self, reason: ReasonCode) -> str:
        if self.paho_error is not None:
            return self.paho_error
        if reason.value == 0x80:  # paho's code for a connection that simply ended
            return "closed by the broker or the network"
        return str(reason)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if self.connack is None or self.connack.done():
            return
        if reason.is_failure:
            self.connack.set_result(f"broker refused the connection: {reason}")
            return
        self.session_present = flags.session_present
        if not self.session_present:  # a new broker session: nothing of the old one can be acknowledged
            self.epoch += 1
            self.deferred_pubcomp.clear()
            self.subscribed = False
        self.generation += 1
        self.acking = True
        self.source.connected.set(1)
        for mid in self.deferred_pubcomp:
            self.client.ack(mid, 2)
        self.deferred_pubcomp.clear()
        self._drain()
        self.connack.set_result(None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._unregister()
        why = self._describe_reason(reason)
        self.paho_error = None
        self.sub_mids.clear()
        if self.connack is not None and not self.connack.done():
            self.connack.set_result(f"connection closed before CONNACK: {why}")
        self._set_down()
        if not self.dropped_on_purpose:
            self.lost_reason = why
        self.lost.set()

    def _set_down(self) -> None:
        self.acking = False
        self.source.connected.set(0)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        routes = self.sub_mids.pop(mid, [])
        self.subscribed = True
        for route, reason in zip(routes, reasons, strict=False):
            if reason.is_failure:
                if route.filter not in self.refused_filters:
                    self.refused_filters.add(route.filter)
                    log.error(
                        "source %s: the broker refused the subscription to %r: %s",
                        self.source.ctx.name,
                        route.filter,
                        reason,
                    )
            elif reason.value < route.qos:
                log.warning(
                    "source %s: subscription %r granted QoS %d instead of %d",
                    self.source.ctx.name,
                    route.filter,
                    reason.value,
                    route.qos,
                )

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received_at = utcnow()
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = ""
        props = msg.properties
        content_type = getattr(props, "ContentType", None) if props is not None else None
        self.arrivals += 1
        item = _Inbound(
            generation=self.generation,
            epoch=self.epoch,
            mid=msg.mid,
            qos=msg.qos,
            topic=topic,
            payload=bytes(msg.payload),
            retain=bool(msg.retain),
            content_type=content_type if isinstance(content_type, str) else "application/json",
            received_at=received_at,
            order=self.arrivals,
        )
        if item.qos > 0:
            self.unacked.append(item)
        else:
            self.loose += 1
        route = self.source.route(topic) if topic else None
        if route is None:
            self._reject(item, "no_device")
            self._finish(item, ok=True)
            return
        lane = self.lanes[route.index]
        lane.intake.append(item)
        lane.wakeup.set()
        self._pause()

    # ------------------------------------------------------------------ processing

    async def _intake(self, lane: _Lane) -> None:
        """Take one subscription's messages in arrival order and start their journal submits."""
        while True:
            if lane.retry:
                await self._retry(lane)
            elif lane.intake:
                await self._start(lane, lane.intake.popleft())
            else:
                lane.wakeup.clear()
                await lane.wakeup.wait()

    async def _start(self, lane: _Lane, item: _Inbound) -> None:
        """Resolve ``item``'s device and start its submit: a task of its own for QoS 1/2 (started in
        arrival order, so journaled in arrival order), an unwaited submit for QoS 0."""
        route = lane.route
        try:
            device = await self._device(route, item)
            if device is None:
                self._finish(item, ok=True)  # acknowledged: it can never be accepted
                return
            frame = self._frame(route, item)
            if item.qos == 0:
                await self.ingest.submit(frame, device, wait=False, decoder=route.decoder)
                self._finish(item, ok=True)
                return
        except (JournalError, RegistryError) as exc:
            self._failed(lane, item, exc)
            return
        task = self.loop.create_task(self._commit(lane, item, frame, device))
        lane.tasks.add(task)
        task.add_done_callback(lane.settled)

    async def _commit(self, lane: _Lane, item: _Inbound, frame: RawFrame, device: DeviceRef) -> None:
        """Journal one QoS 1/2 message durably, then let its acknowledgement (and any due before it) go."""
        mark = self.store_failures
        try:
            await self.ingest.submit(frame, device, wait=True, decoder=lane.route.decoder)
        except (JournalError, RegistryError) as exc:
            self._failed(lane, item, exc)
        else:
            self._committed(mark)
            self._finish(item, ok=True)

    async def _retry(self, lane: _Lane) -> None:
        """Journal the lane's QoS 2 messages whose commit failed, in arrival order, before anything newer.

        paho answered PUBREC on receipt, so the broker never sends them again: they are kept and
        retried with backoff until the journal takes them (or the source stops). The lane's submits
        still in flight end first (those failing join the list), then the retries run one by one.
        """
        while lane.tasks:
            await asyncio.wait(list(lane.tasks))
        lane.retry.sort(key=lambda item: item.order)
        route = lane.route
        delay = self.options.reconnect_min
        while lane.retry:
            await asyncio.sleep(delay)
            item = lane.retry[0]
            mark = self.store_failures
            try:
                device = await self._device(route, item)
                if device is not None:
                    await self.ingest.submit(self._frame(route, item), device, wait=True, decoder=route.decoder)
                    self._committed(mark)
            except (JournalError, RegistryError) as exc:
                self._store_failed(exc, item)
                delay = min(delay * 2, self.options.reconnect_max)
                continue
            lane.retry.pop(0)
            self._finish(item, ok=True)
            delay = 0.0

    async def _device(self, route: Route, item: _Inbound) -> DeviceRef | None:
        """``item``'s device; ``None`` (counted as rejected) when it names none or the policy refuses it."""
        ids = route.identify(item.topic, item.payload)
        if ids is None:
            self._reject(item, "no_device")
            return None
        ctx = self.source.ctx
        device = await ctx.resolver.resolve(ctx.name, ids, self.options.policy)
        if device is None:
            self._reject(item, "policy")  # acknowledged: under this policy it can never be accepted
        return device

    def _frame(self, route: Route, item: _Inbound) -> RawFrame:
        return RawFrame(
            correlation_id=new_correlation_id(),
            received_at=item.received_at,
            source=self.source.ctx.name,
            payload=item.payload,
            kind=route.kind,
            content_type=item.content_type,
            meta={"topic": item.topic, "qos": item.qos, "retain": item.retain},
        )

    def _failed(self, lane: _Lane, item: _Inbound, exc: Exception) -> None:
        """``item`` could not be journaled: QoS 2 waits for its retry; QoS 0/1 are done, unacknowledged."""
        self._store_failed(exc, item)
        if item.qos == 2:
            lane.retry.append(item)
            lane.wakeup.set()
        else:
            self._finish(item, ok=False)

    def _committed(self, mark: int) -> None:
        """A commit started when ``store_failures`` was ``mark`` succeeded: trouble begun before it is over."""
        if self.store_trouble and mark >= self.trouble_mark:
            self.store_trouble = False
            log.info("source %s: journal and registry usable again", self.source.ctx.name)

    def _store_failed(self, exc: Exception, item: _Inbound) -> None:
        name = self.source.ctx.name
        self.store_failures += 1
        if not self.store_trouble:
            self.store_trouble = True
            self.trouble_mark = self.store_failures
            log.error(
                "source %s: cannot journal MQTT messages (%s); not acknowledging them, the broker "
                "redelivers them after a reconnect",
                name,
                exc,
            )
        else:
            log.debug("source %s: still cannot journal (%s)", name, exc)
        if item.qos == 0:
            self._reject(item, "journal_error")
        elif item.qos == 1 and self.acking:
            # Without a new connection the broker would not redeliver what we leave unacknowledged.
            self.acking = False
            self.dropped_on_purpose = True
            self.lost_reason = "dropped to have the unacknowledged messages redelivered"
            self.client.disconnect()

    def _reject(self, item: _Inbound, reason: str) -> None:
        self.source.rejected[reason].inc()
        level = logging.DEBUG if reason in self.logged_rejects else logging.INFO
        self.logged_rejects.add(reason)
        log.log(
            level,
            "source %s: message on %r not journaled (%s); further ones are counted in "
            "isthmus_mqtt_client_rejected_total",
            self.source.ctx.name,
            item.topic,
            reason,
        )

    def _finish(self, item: _Inbound, ok: bool) -> None:
        """``item`` is journaled, or will never be (``ok``: acknowledge it all the same)."""
        if item.qos == 0:
            self.loose -= 1
            self._resume()
            return
        item.done, item.ok = True, ok
        if self.unacked and self.unacked[0] is item:
            self._drain()

    def _drain(self) -> None:
        """Send the acknowledgements that are due, in arrival order."""
        unacked = self.unacked
        if self.closing or not unacked or not unacked[0].done:
            return
        while unacked and unacked[0].done:
            item = unacked.popleft()
            if not item.ok:
                continue
            if item.qos == 1:
                if self.acking and item.generation == self.generation:
                    self.client.ack(item.mid, 1)
            elif item.epoch == self.epoch:
                if self.acking:
                    self.client.ack(item.mid, 2)
                else:
                    self.deferred_pubcomp.append(item.mid)
        self._resume()


class _Client(mqtt.Client):
    """paho's client, reading the socket in chunks.

    paho reads each packet with at least three ``recv`` calls (the type byte, the length bytes
    one by one, the rest), through its ``_sock_recv``: here that reads up to :data:`READ_CHUNK`
    bytes at once and serves paho's small reads from them, so a burst of PUBLISHes costs one
    system call instead of three per message. What is buffered is invisible to the selector:
    :meth:`buffered` tells the reader to go on (as for bytes TLS has already decrypted).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunk = b""
        self._chunk_pos = 0
        self._chunk_sock: Any = None

    def buffered(self) -> bool:
        """True when bytes of the current socket were received but not yet handed to paho."""
        sock = self._sock
        if sock is None:
            return False
        if self._chunk_pos < len(self._chunk) and sock is self._chunk_sock:
            return True
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def _sock_recv(self, bufsize: int) -> bytes:
        chunk, pos = self._chunk, self._chunk_pos
        if pos >= len(chunk) or self._sock is not self._chunk_sock:
            chunk = super()._sock_recv(max(bufsize, READ_CHUNK))  # raises BlockingIOError when empty
            self._chunk_sock = self._sock
            if len(chunk) <= bufsize:
                self._chunk, self._chunk_pos = b"", 0
                return chunk
            pos = 0
        data = chunk[pos : pos + bufsize]
        self._chunk, self._chunk_pos = chunk, pos + len(data)
        return data


def _tls_context(options: MqttClientOptions) -> ssl.SSLContext:
    """Verify the broker against ``ca_file`` (or the system CAs); present the client certificate if set."""
    context = ssl.create_default_context(cafile=None if options.ca_file is None else str(options.ca_file))
    if options.cert_file is not None:
        context.load_cert_chain(options.cert_file, options.key_file)
    context.sslsocket_class = _ClosingSSLSocket
    return context


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the TLS handshake fails; paho would leave the socket to the garbage collector."""

    def do_handshake(self, block: bool = False) -> None:
        """See :meth:`ssl.SSLSocket.do_handshake`."""
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except BaseException:
            self.close()
            raise


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, OSError) and exc.errno is None else f"{type(exc).__name__}: {text}"


PLUGIN = SourcePlugin(
    name="mqtt-client",
    description="Subscribes to topics on an existing MQTT broker (3.1.1 or 5, TLS, shared subscriptions); "
    "acknowledges each message only after the journal commit.",
    config=MqttClientOptions,
    factory=MqttClientSource,
)
