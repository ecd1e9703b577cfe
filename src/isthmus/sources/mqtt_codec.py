"""Sans-I/O MQTT 3.1.1 / 5.0 packet codec for the device-facing MQTT server.

Bytes in, packet objects out (:class:`Decoder`); arguments in, bytes out (the
``encode_*`` functions).  The module does no I/O, starts no tasks, keeps no
module-level mutable state and does no work at import time beyond defining
constants; one :class:`Decoder` holds the state of one connection.

Protocol decisions (see ``docs/decisions/0003-mqtt-packet-codec.md``):

* Supported protocol levels are 4 (MQTT 3.1.1) and 5 (MQTT 5.0).  MQTT 3.1
  (protocol name ``MQIsdp``, level 3) and any other level are rejected with
  reason code 0x84; the error's ``connack_version`` is 4, so the server answers
  with a 3.1.1-format CONNACK carrying return code 1 before closing.
* The decoder is written for the server side: it accepts the packets a client
  sends (CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE,
  UNSUBSCRIBE, PINGREQ, DISCONNECT, AUTH) and rejects the ones only a server
  sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) with 0x82.
* Reason codes throughout are MQTT 5 reason codes.  Encoders given a 3.1.1
  version translate them to the 3.1.1 return codes where 3.1.1 has any.
* MQTT 5 properties are plain mappings keyed by the snake_case property name
  (``"session_expiry_interval"``, ``"user_property"`` ...).  ``user_property``
  is a list of ``(name, value)`` pairs; ``subscription_identifier`` is an int
  (a list of ints is accepted when encoding a server-to-client PUBLISH).
* Topic aliases are reported, not resolved: a PUBLISH that uses an alias has
  ``properties["topic_alias"]`` and possibly an empty ``topic``; mapping the
  alias to a topic (and checking it against the advertised Topic Alias
  Maximum) belongs to the session layer.
* Topic *filters* are not syntax-checked by the decoder, because MQTT 5 lets
  the server refuse a single filter in the SUBACK (0x8F) instead of closing the
  connection; use :func:`is_valid_topic_filter`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "CLIENT_IDENTIFIER_NOT_VALID",
    "MALFORMED_PACKET",
    "PACKET_TOO_LARGE",
    "PROTOCOL_ERROR",
    "TOPIC_ALIAS_INVALID",
    "TOPIC_NAME_INVALID",
    "UNSUPPORTED_PROTOCOL_VERSION",
    "Auth",
    "Connect",
    "Decoder",
    "Disconnect",
    "Packet",
    "Pingreq",
    "Properties",
    "PropertyValue",
    "ProtocolError",
    "Puback",
    "Pubcomp",
    "Publish",
    "Pubrec",
    "Pubrel",
    "Subscribe",
    "Unsubscribe",
    "Will",
    "encode_auth",
    "encode_connack",
    "encode_connect",
    "encode_disconnect",
    "encode_pingreq",
    "encode_pingresp",
    "encode_puback",
    "encode_pubcomp",
    "encode_publish",
    "encode_pubrec",
    "encode_pubrel",
    "encode_suback",
    "encode_subscribe",
    "encode_unsuback",
    "encode_unsubscribe",
    "is_valid_topic_filter",
]

# --------------------------------------------------------------------------
# Reason codes the decoder raises (MQTT 5.0 section 2.4).

MALFORMED_PACKET: Final = 0x81
PROTOCOL_ERROR: Final = 0x82
UNSUPPORTED_PROTOCOL_VERSION: Final = 0x84
CLIENT_IDENTIFIER_NOT_VALID: Final = 0x85
TOPIC_NAME_INVALID: Final = 0x90
TOPIC_ALIAS_INVALID: Final = 0x94
PACKET_TOO_LARGE: Final = 0x95

_MAX_REMAINING_LENGTH: Final = 268_435_455
_MAX_VARINT: Final = 268_435_455

PropertyValue: TypeAlias = int | str | bytes | list[tuple[str, str]] | list[int]
"""A decoded MQTT 5 property value (see the module docstring for the shapes)."""

Properties: TypeAlias = Mapping[str, PropertyValue]
"""MQTT 5 properties keyed by snake_case name; empty for MQTT 3.1.1."""


class _NoProperties(Mapping[str, PropertyValue]):
    """The shared, immutable, empty property mapping (equal to ``{}``).

    Hashable so that it can be a dataclass default; saves a dict per packet.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> PropertyValue:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __contains__(self, key: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"


_NO_PROPERTIES: Final[Mapping[str, PropertyValue]] = _NoProperties()


class ProtocolError(Exception):
    """A malformed or forbidden packet; the connection must be closed after it.

    ``reason_code`` is the MQTT 5 reason code to report: 0x81 malformed packet,
    0x82 protocol error, 0x84 unsupported protocol version, 0x85 client
    identifier not valid, 0x90 topic name invalid, 0x94 topic alias invalid,
    0x95 packet too large.

    ``connack_version`` says how to report it.  When it is not ``None`` the
    error was found in the CONNECT packet and the server should send
    ``encode_connack(False, reason_code, connack_version)`` before closing.
    When it is ``None`` the server sends ``encode_disconnect(reason_code, 5)``
    if the connection is an MQTT 5 one past its CONNACK, and otherwise just
    closes the connection (MQTT 3.1.1 has no way to report the error).
    """

    def __init__(self, reason_code: int, message: str, *, connack_version: int | None = None) -> None:
        super().__init__(f"{message} (reason code 0x{reason_code:02X})")
        self.reason_code = reason_code
        self.connack_version = connack_version


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(MALFORMED_PACKET, message)


def _truncated() -> ProtocolError:
    return ProtocolError(MALFORMED_PACKET, "field runs past the end of the packet")


# --------------------------------------------------------------------------
# Packets.  Plain slotted dataclasses: fast to build, comparable, printable.


@dataclass(slots=True)
class Will:
    """The will message of a CONNECT: published by the server if the client
    goes away without a normal DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = _NO_PROPERTIES


@dataclass(slots=True)
class Connect:
    """CONNECT.  ``protocol_level`` is 4 (MQTT 3.1.1) or 5 (MQTT 5.0).

    ``clean_start`` is the 3.1.1 Clean Session / 5.0 Clean Start flag;
    ``keepalive`` is in seconds (0 = off).  ``password`` is raw bytes.
    """

    protocol_level: int
    client_id: str
    clean_start: bool
    keepalive: int
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = _NO_PROPERTIES

    @property
    def session_expiry_interval(self) -> int:
        """Session Expiry Interval in seconds; 0 (end with the connection) if absent."""
        value = self.properties.get("session_expiry_interval", 0)
        return value if isinstance(value, int) else 0

    @property
    def receive_maximum(self) -> int:
        """How many QoS>0 PUBLISHes the client accepts in flight; 65,535 if absent."""
        value = self.properties.get("receive_maximum", 65535)
        return value if isinstance(value, int) else 65535

    @property
    def maximum_packet_size(self) -> int | None:
        """Largest packet the client accepts, in bytes; ``None`` means no limit."""
        value = self.properties.get("maximum_packet_size")
        return value if isinstance(value, int) else None


@dataclass(slots=True)
class Publish:
    """PUBLISH.  ``packet_id`` is 0 exactly when ``qos`` is 0.

    An MQTT 5 PUBLISH that uses a topic alias may have an empty ``topic`` and
    ``properties["topic_alias"]``; resolving it is the caller's job.
    """

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = _NO_PROPERTIES


@dataclass(slots=True)
class _Ack:
    packet_id: int
    reason_code: int = 0
    properties: Properties = _NO_PROPERTIES


@dataclass(slots=True)
class Puback(_Ack):
    """PUBACK: acknowledges a QoS 1 PUBLISH.  ``reason_code`` is 0 in 3.1.1."""


@dataclass(slots=True)
class Pubrec(_Ack):
    """PUBREC: first acknowledgement of a QoS 2 PUBLISH."""


@dataclass(slots=True)
class Pubrel(_Ack):
    """PUBREL: releases a QoS 2 PUBLISH after its PUBREC."""


@dataclass(slots=True)
class Pubcomp(_Ack):
    """PUBCOMP: completes a QoS 2 exchange."""


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE.  ``subscriptions`` holds ``(topic_filter, options)`` pairs.

    ``options`` is the raw subscription-options byte: bits 0-1 the maximum QoS
    (``options & 3``); MQTT 5 only: bit 2 No Local, bit 3 Retain As Published,
    bits 4-5 Retain Handling.  In 3.1.1 the byte is just the QoS.
    """

    packet_id: int
    subscriptions: list[tuple[str, int]]
    properties: Properties = _NO_PROPERTIES


@dataclass(slots=True)
class Unsubscribe:
    """UNSUBSCRIBE: the topic filters to remove, at least one."""

    packet_id: int
    topic_filters: list[str]
    properties: Properties = _NO_PROPERTIES


@dataclass(slots=True)
class Pingreq:
    """PINGREQ: answer with :func:`encode_pingresp`."""


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT from the client.  ``reason_code`` 0 is a normal disconnect
    (the will is discarded); MQTT 5 0x04 asks the server to publish the will."""

    reason_code: int = 0
    properties: Properties = _NO_PROPERTIES


@dataclass(slots=True)
class Auth:
    """AUTH (MQTT 5 enhanced authentication exchange).  The decoder accepts it
    only if the CONNECT named an Authentication Method; a server without
    enhanced authentication answers it with DISCONNECT 0x8C."""

    reason_code: int = 0
    properties: Properties = _NO_PROPERTIES


Packet: TypeAlias = (
    Connect | Publish | Puback | Pubrec | Pubrel | Pubcomp | Subscribe | Unsubscribe | Pingreq | Disconnect | Auth
)
"""Every packet type :meth:`Decoder.feed` can return."""

_ACK_TYPES: Final = (Puback, Pubrec, Pubrel, Pubcomp)

# --------------------------------------------------------------------------
# MQTT 5 properties (section 2.2.2.2).

_BYTE: Final = 0
_TWO: Final = 1
_FOUR: Final = 2
_VARINT: Final = 3
_STR: Final = 4
_BIN: Final = 5
_PAIR: Final = 6

_PROPERTY_BY_ID: Final[dict[int, tuple[str, int]]] = {
    0x01: ("payload_format_indicator", _BYTE),
    0x02: ("message_expiry_interval", _FOUR),
    0x03: ("content_type", _STR),
    0x08: ("response_topic", _STR),
    0x09: ("correlation_data", _BIN),
    0x0B: ("subscription_identifier", _VARINT),
    0x11: ("session_expiry_interval", _FOUR),
    0x12: ("assigned_client_identifier", _STR),
    0x13: ("server_keep_alive", _TWO),
    0x15: ("authentication_method", _STR),
    0x16: ("authentication_data", _BIN),
    0x17: ("request_problem_information", _BYTE),
    0x18: ("will_delay_interval", _FOUR),
    0x19: ("request_response_information", _BYTE),
    0x1A: ("response_information", _STR),
    0x1C: ("server_reference", _STR),
    0x1F: ("reason_string", _STR),
    0x21: ("receive_maximum", _TWO),
    0x22: ("topic_alias_maximum", _TWO),
    0x23: ("topic_alias", _TWO),
    0x24: ("maximum_qos", _BYTE),
    0x25: ("retain_available", _BYTE),
    0x26: ("user_property", _PAIR),
    0x27: ("maximum_packet_size", _FOUR),
    0x28: ("wildcard_subscription_available", _BYTE),
    0x29: ("subscription_identifier_available", _BYTE),
    0x2A: ("shared_subscription_available", _BYTE),
}

_PROPERTY_BY_NAME: Final[dict[str, tuple[int, int]]] = {
    "payload_format_indicator": (0x01, _BYTE),
    "message_expiry_interval": (0x02, _FOUR),
    "content_type": (0x03, _STR),
    "response_topic": (0x08, _STR),
    "correlation_data": (0x09, _BIN),
    "subscription_identifier": (0x0B, _VARINT),
    "session_expiry_interval": (0x11, _FOUR),
    "assigned_client_identifier": (0x12, _STR),
    "server_keep_alive": (0x13, _TWO),
    "authentication_method": (0x15, _STR),
    "authentication_data": (0x16, _BIN),
    "request_problem_information": (0x17, _BYTE),
    "will_delay_interval": (0x18, _FOUR),
    "request_response_information": (0x19, _BYTE),
    "response_information": (0x1A, _STR),
    "server_reference": (0x1C, _STR),
    "reason_string": (0x1F, _STR),
    "receive_maximum": (0x21, _TWO),
    "topic_alias_maximum": (0x22, _TWO),
    "topic_alias": (0x23, _TWO),
    "maximum_qos": (0x24, _BYTE),
    "retain_available": (0x25, _BYTE),
    "user_property": (0x26, _PAIR),
    "maximum_packet_size": (0x27, _FOUR),
    "wildcard_subscription_available": (0x28, _BYTE),
    "subscription_identifier_available": (0x29, _BYTE),
    "shared_subscription_available": (0x2A, _BYTE),
}

_USER_PROPERTY: Final = 0x26
_SUBSCRIPTION_IDENTIFIER: Final = 0x0B
_ZERO_OR_ONE: Final = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_NON_ZERO: Final = frozenset({0x0B, 0x21, 0x23, 0x27})

# Which properties each packet may carry.
_CONNECT_PROPS: Final = frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27})
_WILL_PROPS: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26})
_CONNACK_PROPS: Final = frozenset(
    {0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A}
)
_PUBLISH_PROPS: Final = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26})
_ACK_PROPS: Final = frozenset({0x1F, 0x26})
_SUBSCRIBE_PROPS: Final = frozenset({0x0B, 0x26})
_UNSUBSCRIBE_PROPS: Final = frozenset({0x26})
_DISCONNECT_PROPS: Final = frozenset({0x11, 0x1C, 0x1F, 0x26})
_AUTH_PROPS: Final = frozenset({0x15, 0x16, 0x1F, 0x26})


def _property_value_problem(pid: int, value: int) -> str | None:
    """Why an integer property value is not allowed, or None if it is."""
    if pid in _ZERO_OR_ONE and value > 1:
        return f"property 0x{pid:02x} must be 0 or 1"
    if pid in _NON_ZERO and value == 0:
        return f"property 0x{pid:02x} must not be 0"
    return None


# --------------------------------------------------------------------------
# Field readers.  Each takes the buffer, a start offset and the offset the
# field must not run past, and returns (value, offset after the field).


def _read_varint(data: bytes, p: int, end: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:  # at most four rounds: the shift check below ends the loop
        if p >= end:
            raise _truncated()
        b = data[p]
        p += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, p
        shift += 7
        if shift == 28:
            raise _malformed("variable byte integer longer than 4 bytes")


def _read_str(data: bytes, p: int, end: int) -> tuple[str, int]:
    q = p + 2
    if q > end:
        raise _truncated()
    r = q + (data[p] << 8 | data[p + 1])
    if r > end:
        raise _truncated()
    try:
        s = data[q:r].decode()
    except UnicodeDecodeError:
        raise _malformed("string is not valid UTF-8") from None
    if "\x00" in s:
        raise _malformed("string contains U+0000")
    return s, r


def _read_bin(data: bytes, p: int, end: int) -> tuple[bytes, int]:
    q = p + 2
    if q > end:
        raise _truncated()
    r = q + (data[p] << 8 | data[p + 1])
    if r > end:
        raise _truncated()
    return data[q:r], r


def _read_properties(data: bytes, p: int, end: int, allowed: frozenset[int]) -> tuple[Properties, int]:
    """Read an MQTT 5 property block; return it and the offset after it."""
    if p >= end:
        raise _malformed("missing property length")
    if data[p] == 0:
        return _NO_PROPERTIES, p + 1
    length, p = _read_varint(data, p, end)
    stop = p + length
    if stop > end:
        raise _truncated()
    props: dict[str, PropertyValue] = {}
    users: list[tuple[str, str]] | None = None
    while p < stop:
        pid = data[p]
        p += 1
        spec = _PROPERTY_BY_ID.get(pid)
        if spec is None or pid not in allowed:
            raise _malformed(f"property 0x{pid:02x} is not valid in this packet")
        name, kind = spec
        value: PropertyValue
        if kind == _BYTE:
            if p >= stop:
                raise _truncated()
            value = data[p]
            p += 1
        elif kind == _TWO:
            if p + 2 > stop:
                raise _truncated()
            value = data[p] << 8 | data[p + 1]
            p += 2
        elif kind == _FOUR:
            if p + 4 > stop:
                raise _truncated()
            value = int.from_bytes(data[p : p + 4], "big")
            p += 4
        elif kind == _VARINT:
            value, p = _read_varint(data, p, stop)
        elif kind == _STR:
            value, p = _read_str(data, p, stop)
        elif kind == _BIN:
            value, p = _read_bin(data, p, stop)
        else:
            key, p = _read_str(data, p, stop)
            val, p = _read_str(data, p, stop)
            if users is None:
                users = []
                props[name] = users
            users.append((key, val))
            continue
        if name in props:
            raise ProtocolError(PROTOCOL_ERROR, f"property {name} appears twice")
        if isinstance(value, int):
            problem = _property_value_problem(pid, value)
            if problem is not None:
                code = TOPIC_ALIAS_INVALID if pid == 0x23 else PROTOCOL_ERROR
                raise ProtocolError(code, problem)
        props[name] = value
    return props, stop


def _remaining_length(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """Decode the remaining length of the packet starting at ``pos``.

    Returns ``(remaining_length, fixed_header_length)``, or ``(0, 0)`` if the
    buffer ends inside the fixed header.
    """
    value = 0
    shift = 0
    p = pos + 1
    while p < n:
        b = data[p]
        p += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, p - pos
        shift += 7
        if shift == 28:
            raise _malformed("remaining length longer than 4 bytes")
    return 0, 0


# Required low nibble of the first byte per packet type; -1: reserved type,
# -2: PUBLISH (flags carry DUP/QoS/RETAIN).
_FIXED_FLAGS: Final = (-1, 0, 0, -2, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)
_NAMES: Final = (
    "reserved", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT",
    "AUTH",
)  # fmt: skip


def _check_first_byte(b0: int, level: int) -> None:
    """Reject a non-PUBLISH first byte that is invalid in the current state."""
    ptype = b0 >> 4
    if ptype == 0 or (ptype == 15 and level == 4):
        raise _malformed(f"reserved packet type {ptype}")
    if b0 & 0x0F != _FIXED_FLAGS[ptype]:
        raise _malformed(f"invalid fixed-header flags 0x{b0 & 0x0F:x} for {_NAMES[ptype]}")
    if ptype == 1:
        if level:
            raise ProtocolError(PROTOCOL_ERROR, "second CONNECT on the connection")
    elif not level:
        raise ProtocolError(PROTOCOL_ERROR, f"first packet is {_NAMES[ptype]}, not CONNECT")
    elif ptype in (2, 9, 11, 13):
        raise ProtocolError(PROTOCOL_ERROR, f"{_NAMES[ptype]} is only sent by a server")


def _check_topic_name(topic: str) -> None:
    if "+" in topic or "#" in topic:
        raise ProtocolError(TOPIC_NAME_INVALID, "topic name contains a wildcard")


# --------------------------------------------------------------------------
# Decoder


class Decoder:
    """Incremental decoder for the client-to-server byte stream of one connection.

    Feed it whatever the socket returned; it returns complete packets.  The
    first packet must be CONNECT; its protocol level (4 or 5) decides how
    later packets are parsed.  Everything after a DISCONNECT is ignored (the
    client must send nothing more and the server closes).  After a
    :class:`ProtocolError` the decoder is dead: every later :meth:`feed`
    raises a ProtocolError with the same reason code.

    ``max_packet_size`` bounds a whole packet (fixed header included); a
    bigger one is refused with 0x95 as soon as its fixed header arrives, so a
    client cannot make the decoder buffer more than that.  The buffered
    partial packet never exceeds ``max_packet_size`` bytes.
    """

    __slots__ = (
        "_auth_method",
        "_buf",
        "_disconnected",
        "_error",
        "_last_topic",
        "_last_topic_raw",
        "_level",
        "_max_packet_size",
        "_need",
        "_session_expiry_zero",
    )

    def __init__(self, max_packet_size: int = 65536) -> None:
        """``max_packet_size``: largest accepted packet in bytes, 2 to 268,435,460."""
        if not 2 <= max_packet_size <= _MAX_REMAINING_LENGTH + 5:
            raise ValueError("max_packet_size must be between 2 and 268435460")
        self._max_packet_size = max_packet_size
        self._buf = bytearray()
        self._need = 0
        self._level = 0
        self._error: ProtocolError | None = None
        self._disconnected = False
        self._auth_method = False
        self._session_expiry_zero = True
        self._last_topic_raw = b""
        self._last_topic = ""

    @property
    def protocol_level(self) -> int | None:
        """4 or 5 once a CONNECT has been decoded, else ``None``."""
        return self._level or None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Append bytes read from the socket; return every complete packet now
        available, in order (possibly none).

        Raises :class:`ProtocolError` on malformed or forbidden input, among
        others: a reserved packet type (0, or 15 in 3.1.1), wrong fixed-header
        flags, a remaining length over 4 bytes or a packet over
        ``max_packet_size`` (0x95), truncated or overlong fields, invalid
        UTF-8 or U+0000 in a string, a wildcard in a PUBLISH topic (0x90),
        QoS 3, a packet id of 0, a first packet other than CONNECT, a second
        CONNECT, an unknown, misplaced or duplicated MQTT 5 property.  Packets
        decoded earlier in the same call are dropped with the error: the
        connection is going to be closed anyway.
        """
        if self._error is not None:
            raise ProtocolError(self._error.reason_code, "decoder already failed")
        if self._disconnected:
            return []
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        elif type(data) is not bytes:
            data = bytes(data)
        try:
            return self._decode(data)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _decode(self, data: bytes) -> list[Packet]:
        out: list[Packet] = []
        append = out.append
        publish = Publish
        no_properties = _NO_PROPERTIES
        n = len(data)
        pos = 0
        need = 0
        level = self._level
        max_size = self._max_packet_size
        # Devices tend to publish to one topic over and over: remember the last
        # validated topic and skip decoding and checking it again.
        last_raw = self._last_topic_raw
        last_topic = self._last_topic
        while pos < n:
            b0 = data[pos]
            ptype = b0 >> 4
            if ptype == 3:
                if b0 & 6 == 6:
                    raise _malformed("PUBLISH with QoS 3")
                if not level:
                    raise ProtocolError(PROTOCOL_ERROR, "first packet is PUBLISH, not CONNECT")
            else:
                _check_first_byte(b0, level)

            # Fixed header: remaining length, inlined for 1- and 2-byte lengths.
            if pos + 1 >= n:
                need = n - pos + 1
                break
            b = data[pos + 1]
            if b < 0x80:
                rl = b
                hl = 2
            elif pos + 2 < n and data[pos + 2] < 0x80:
                rl = (b & 0x7F) | data[pos + 2] << 7
                hl = 3
            else:
                rl, hl = _remaining_length(data, pos, n)
                if not hl:
                    need = n - pos + 1
                    break
            total = hl + rl
            if total > max_size:
                raise ProtocolError(PACKET_TOO_LARGE, f"packet of {total} bytes exceeds maximum of {max_size}")
            end = pos + total
            if end > n:
                need = total
                break
            p = pos + hl

            if ptype == 3:
                # PUBLISH, the hot path: inlined field reads.
                if p + 2 > end:
                    raise _truncated()
                topic_len = data[p] << 8 | data[p + 1]
                p += 2
                q = p + topic_len
                if q > end:
                    raise _truncated()
                if topic_len == len(last_raw) and data.startswith(last_raw, p):
                    topic = last_topic
                else:
                    last_raw = data[p:q]
                    try:
                        topic = last_raw.decode()
                    except UnicodeDecodeError:
                        raise _malformed("topic is not valid UTF-8") from None
                    if "+" in topic or "#" in topic:
                        raise ProtocolError(TOPIC_NAME_INVALID, "PUBLISH topic contains a wildcard")
                    if "\x00" in topic:
                        raise _malformed("topic contains U+0000")
                    last_topic = topic
                qos = (b0 >> 1) & 3
                if qos:
                    if q + 2 > end:
                        raise _truncated()
                    packet_id = data[q] << 8 | data[q + 1]
                    if not packet_id:
                        raise ProtocolError(PROTOCOL_ERROR, "PUBLISH QoS>0 with packet id 0")
                    q += 2
                else:
                    packet_id = 0
                    if b0 & 8:
                        raise _malformed("DUP set on a QoS 0 PUBLISH")
                if level == 5:
                    if q < end and data[q] == 0:
                        props = no_properties
                        q += 1
                    else:
                        props, q = _read_properties(data, q, end, _PUBLISH_PROPS)
                        if "subscription_identifier" in props:
                            raise ProtocolError(PROTOCOL_ERROR, "client PUBLISH carries a subscription identifier")
                    if not topic and "topic_alias" not in props:
                        raise ProtocolError(PROTOCOL_ERROR, "empty topic without topic alias")
                else:
                    props = no_properties
                    if not topic:
                        raise ProtocolError(PROTOCOL_ERROR, "empty PUBLISH topic")
                append(publish(topic, data[q:end], qos, (b0 & 1) != 0, (b0 & 8) != 0, packet_id, props))
            elif 4 <= ptype <= 7:
                out.append(self._decode_ack(ptype, data, p, end, rl))
            elif ptype == 1:
                out.append(self._decode_connect(data, p, end))
                level = self._level
            elif ptype == 8:
                out.append(self._decode_subscribe(data, p, end))
            elif ptype == 10:
                out.append(self._decode_unsubscribe(data, p, end))
            elif ptype == 12:
                if rl:
                    raise _malformed("PINGREQ with a body")
                out.append(Pingreq())
            elif ptype == 14:
                out.append(self._decode_disconnect(data, p, end, rl))
                self._disconnected = True
                pos = n
                break
            else:  # 15: AUTH; _check_first_byte let it through only for MQTT 5
                out.append(self._decode_auth(data, p, end, rl))
            pos = end

        self._last_topic_raw = last_raw
        self._last_topic = last_topic
        if pos < n:
            self._buf += memoryview(data)[pos:]
            self._need = need
        return out

    def _decode_ack(self, ptype: int, data: bytes, p: int, end: int, rl: int) -> Packet:
        if rl < 2:
            raise _truncated()
        packet_id = data[p] << 8 | data[p + 1]
        if not packet_id:
            raise ProtocolError(PROTOCOL_ERROR, f"{_NAMES[ptype]} with packet id 0")
        reason_code = 0
        props = _NO_PROPERTIES
        if rl > 2:
            if self._level == 4:
                raise _malformed(f"MQTT 3.1.1 {_NAMES[ptype]} longer than 2 bytes")
            reason_code = data[p + 2]
            if rl > 3:
                props, q = _read_properties(data, p + 3, end, _ACK_PROPS)
                if q != end:
                    raise _malformed("bytes after the properties")
        return _ACK_TYPES[ptype - 4](packet_id, reason_code, props)

    def _decode_connect(self, data: bytes, p: int, end: int) -> Connect:
        if p + 2 > end:
            raise _truncated()
        name_end = p + 2 + (data[p] << 8 | data[p + 1])
        if name_end >= end:
            raise _truncated()
        name = data[p + 2 : name_end]
        level = data[name_end]
        if name == b"MQIsdp":
            raise ProtocolError(UNSUPPORTED_PROTOCOL_VERSION, "MQTT 3.1 (MQIsdp) is not supported", connack_version=4)
        if name != b"MQTT":
            raise ProtocolError(PROTOCOL_ERROR, f"unknown protocol name {name!r}")
        if level not in (4, 5):
            raise ProtocolError(
                UNSUPPORTED_PROTOCOL_VERSION,
                f"unsupported protocol level {level}",
                connack_version=4,
            )
        try:
            connect = self._decode_connect_body(level, data, name_end + 1, end)
        except ProtocolError as exc:
            if level == 5 and exc.connack_version is None:
                exc.connack_version = 5
            raise
        self._level = level
        props = connect.properties
        self._auth_method = "authentication_method" in props
        self._session_expiry_zero = not props.get("session_expiry_interval", 0)
        return connect

    def _decode_connect_body(self, level: int, data: bytes, p: int, end: int) -> Connect:
        if p + 3 > end:
            raise _truncated()
        flags = data[p]
        keepalive = data[p + 1] << 8 | data[p + 2]
        p += 3
        if flags & 0x01:
            raise _malformed("reserved CONNECT flag is set")
        has_will = flags & 0x04
        will_qos = (flags >> 3) & 3
        will_retain = bool(flags & 0x20)
        if will_qos == 3:
            raise _malformed("will QoS 3")
        if not has_will and (will_qos or will_retain):
            raise _malformed("will QoS/retain set without the will flag")
        if level == 4 and flags & 0x40 and not flags & 0x80:
            raise _malformed("password flag without user name flag")
        props = _NO_PROPERTIES
        if level == 5:
            props, p = _read_properties(data, p, end, _CONNECT_PROPS)
            if "authentication_data" in props and "authentication_method" not in props:
                raise ProtocolError(PROTOCOL_ERROR, "authentication data without method")
        client_id, p = _read_str(data, p, end)
        will = None
        if has_will:
            will_props = _NO_PROPERTIES
            if level == 5:
                will_props, p = _read_properties(data, p, end, _WILL_PROPS)
            will_topic, p = _read_str(data, p, end)
            if not will_topic:
                raise ProtocolError(TOPIC_NAME_INVALID, "empty will topic")
            _check_topic_name(will_topic)
            will_payload, p = _read_bin(data, p, end)
            will = Will(will_topic, will_payload, will_qos, will_retain, will_props)
        username = None
        if flags & 0x80:
            username, p = _read_str(data, p, end)
        password = None
        if flags & 0x40:
            password, p = _read_bin(data, p, end)
        if p != end:
            raise _malformed("bytes after the CONNECT payload")
        clean_start = bool(flags & 0x02)
        if level == 4 and not client_id and not clean_start:
            raise ProtocolError(
                CLIENT_IDENTIFIER_NOT_VALID,
                "empty client id requires clean session",
                connack_version=4,
            )
        return Connect(level, client_id, clean_start, keepalive, username, password, will, props)

    def _decode_subscribe(self, data: bytes, p: int, end: int) -> Subscribe:
        if p + 2 > end:
            raise _truncated()
        packet_id = data[p] << 8 | data[p + 1]
        if not packet_id:
            raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE with packet id 0")
        p += 2
        v5 = self._level == 5
        props = _NO_PROPERTIES
        if v5:
            props, p = _read_properties(data, p, end, _SUBSCRIBE_PROPS)
        subscriptions: list[tuple[str, int]] = []
        while p < end:
            topic_filter, p = _read_str(data, p, end)
            if p >= end:
                raise _truncated()
            options = data[p]
            p += 1
            if options & 3 == 3:
                raise _malformed("subscription QoS 3")
            if v5:
                if options & 0xC0:
                    raise _malformed("reserved subscription option bits set")
                if options & 0x30 == 0x30:
                    raise ProtocolError(PROTOCOL_ERROR, "retain handling 3")
                if options & 0x04 and topic_filter.startswith("$share/"):
                    raise ProtocolError(PROTOCOL_ERROR, "no local on a shared subscription")
            elif options & 0xFC:
                raise _malformed("reserved subscription option bits set")
            subscriptions.append((topic_filter, options))
        if not subscriptions:
            raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE without topic filters")
        return Subscribe(packet_id, subscriptions, props)

    def _decode_unsubscribe(self, data: bytes, p: int, end: int) -> Unsubscribe:
        if p + 2 > end:
            raise _truncated()
        packet_id = data[p] << 8 | data[p + 1]
        if not packet_id:
            raise ProtocolError(PROTOCOL_ERROR, "UNSUBSCRIBE with packet id 0")
        p += 2
        props = _NO_PROPERTIES
        if self._level == 5:
            props, p = _read_properties(data, p, end, _UNSUBSCRIBE_PROPS)
        filters: list[str] = []
        while p < end:
            topic_filter, p = _read_str(data, p, end)
            filters.append(topic_filter)
        if not filters:
            raise ProtocolError(PROTOCOL_ERROR, "UNSUBSCRIBE without topic filters")
        return Unsubscribe(packet_id, filters, props)

    def _decode_disconnect(self, data: bytes, p: int, end: int, rl: int) -> Disconnect:
        if self._level == 4:
            if rl:
                raise _malformed("MQTT 3.1.1 DISCONNECT with a body")
            return Disconnect()
        if not rl:
            return Disconnect()
        reason_code = data[p]
        props = _NO_PROPERTIES
        if rl > 1:
            props, q = _read_properties(data, p + 1, end, _DISCONNECT_PROPS)
            if q != end:
                raise _malformed("bytes after the properties")
            if self._session_expiry_zero and props.get("session_expiry_interval", 0):
                raise ProtocolError(PROTOCOL_ERROR, "DISCONNECT sets a session expiry the CONNECT had as 0")
        return Disconnect(reason_code, props)

    def _decode_auth(self, data: bytes, p: int, end: int, rl: int) -> Auth:
        if not self._auth_method:
            raise ProtocolError(PROTOCOL_ERROR, "AUTH without an authentication method")
        if not rl:
            return Auth()
        props = _NO_PROPERTIES
        if rl > 1:
            props, q = _read_properties(data, p + 1, end, _AUTH_PROPS)
            if q != end:
                raise _malformed("bytes after the properties")
        return Auth(data[p], props)


# --------------------------------------------------------------------------
# Encoding helpers.  Invalid arguments raise ValueError: they are bugs in the
# caller, never something a peer can cause.

_PACK_H: Final = struct.Struct(">H").pack
_PACK_ACK: Final = struct.Struct(">BBH").pack


def _encode_varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fixed_header(b0: int, remaining_length: int) -> bytes:
    if remaining_length < 0x80:
        return bytes((b0, remaining_length))
    if remaining_length > _MAX_REMAINING_LENGTH:
        raise ValueError("packet exceeds the MQTT maximum of 268435455 bytes")
    return bytes((b0,)) + _encode_varint(remaining_length)


def _encode_str(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    if "\x00" in value:
        raise ValueError("string contains U+0000")
    return _PACK_H(len(raw)) + raw


def _encode_bin(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return _PACK_H(len(value)) + bytes(value)


_INT_LIMITS: Final = {_BYTE: 0xFF, _TWO: 0xFFFF, _FOUR: 0xFFFFFFFF, _VARINT: _MAX_VARINT}


def _encode_properties(properties: Properties | None, allowed: frozenset[int]) -> bytes:
    """Encode a property block (length prefix included)."""
    if not properties:
        return b"\x00"
    parts: list[bytes] = []
    for name, value in properties.items():
        spec = _PROPERTY_BY_NAME.get(name)
        if spec is None:
            raise ValueError(f"unknown MQTT 5 property {name!r}")
        pid, kind = spec
        if pid not in allowed:
            raise ValueError(f"property {name!r} is not valid in this packet")
        prefix = bytes((pid,))
        if kind == _PAIR:
            if not isinstance(value, list):
                raise ValueError("user_property must be a list of (name, value) pairs")
            for pair in value:
                if not (isinstance(pair, tuple) and len(pair) == 2):
                    raise ValueError("user_property must be a list of (name, value) pairs")
                key, val = pair
                if not (isinstance(key, str) and isinstance(val, str)):
                    raise ValueError("user_property names and values must be str")
                parts.append(prefix + _encode_str(key) + _encode_str(val))
        elif kind == _STR:
            if not isinstance(value, str):
                raise ValueError(f"property {name!r} must be str")
            parts.append(prefix + _encode_str(value))
        elif kind == _BIN:
            if not isinstance(value, bytes | bytearray):
                raise ValueError(f"property {name!r} must be bytes")
            parts.append(prefix + _encode_bin(value))
        else:
            values: Sequence[object] = [value]
            if isinstance(value, list):
                # Only a server-to-client PUBLISH may repeat the subscription identifier.
                if pid != _SUBSCRIPTION_IDENTIFIER or allowed is not _PUBLISH_PROPS:
                    raise ValueError(f"property {name!r} takes a single value")
                values = value
            for item in values:
                if not isinstance(item, int) or not 0 <= item <= _INT_LIMITS[kind]:
                    raise ValueError(f"property {name!r} out of range: {item!r}")
                problem = _property_value_problem(pid, item)
                if problem is not None:
                    raise ValueError(problem)
                if kind == _VARINT:
                    parts.append(prefix + _encode_varint(item))
                else:
                    parts.append(prefix + item.to_bytes(1 << (kind - _BYTE), "big"))
    body = b"".join(parts)
    return _encode_varint(len(body)) + body


def _check_version(version: int) -> None:
    if version != 4 and version != 5:
        raise ValueError(f"protocol version must be 4 or 5, not {version!r}")


def _check_packet_id(packet_id: int) -> None:
    if not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet id must be 1..65535, not {packet_id!r}")


def _no_properties_in_v4(version: int, properties: Properties | None) -> None:
    if version == 4 and properties:
        raise ValueError("MQTT 3.1.1 packets carry no properties")


def is_valid_topic_filter(topic_filter: str) -> bool:
    """True if ``topic_filter`` is a syntactically valid MQTT topic filter.

    Non-empty; ``#`` only as the whole last level; ``+`` only as a whole
    level; a ``$share/{group}/{filter}`` shared subscription needs a non-empty
    group without wildcards and a valid filter.
    """
    if not topic_filter:
        return False
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
            return False
        topic_filter = parts[2]
        if not topic_filter:
            return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return True
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if ("+" in level or "#" in level) and len(level) != 1:
            return False
        if level == "#" and i != last:
            return False
    return True


# --------------------------------------------------------------------------
# Server-to-client packets.

_CONNACK_V5_CODES: Final = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
     0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)  # fmt: skip
# MQTT 5 CONNACK reason code -> MQTT 3.1.1 return code; other failures -> 3.
_CONNACK_V311: Final = {0x84: 1, 0x85: 2, 0x86: 4, 0x87: 5, 0x8A: 5, 0x8C: 4, 0x88: 3, 0x89: 3}
_SUBACK_V5_CODES: Final = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E,
                                     0xA1, 0xA2})  # fmt: skip
_UNSUBACK_V5_CODES: Final = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})


def encode_connack(session_present: bool, code: int, version: int, properties: Properties | None = None) -> bytes:
    """Encode a CONNACK.

    ``code`` is an MQTT 5 CONNACK reason code (0 = accepted).  For version 4 a
    3.1.1 return code (0-5) is also accepted, and an MQTT 5 failure code is
    translated (0x84->1, 0x85->2, 0x86/0x8C->4, 0x87/0x8A->5, any other->3
    server unavailable).  ``session_present`` must be false unless ``code``
    is 0.  ``properties`` (MQTT 5 only) are CONNACK properties such as
    ``receive_maximum``, ``topic_alias_maximum``, ``assigned_client_identifier``.
    Raises ValueError on an invalid combination.
    """
    _check_version(version)
    if session_present and code:
        raise ValueError("session_present must be false on a refused connection")
    if version == 4:
        _no_properties_in_v4(version, properties)
        if 0 <= code <= 5:
            rc = code
        elif code in _CONNACK_V5_CODES:
            rc = _CONNACK_V311.get(code, 3)
        else:
            raise ValueError(f"invalid CONNACK code 0x{code:02x}")
        return bytes((0x20, 2, 1 if session_present else 0, rc))
    if code not in _CONNACK_V5_CODES:
        raise ValueError(f"invalid MQTT 5 CONNACK reason code 0x{code:02x}")
    body = bytes((1 if session_present else 0, code)) + _encode_properties(properties, _CONNACK_PROPS)
    return _fixed_header(0x20, len(body)) + body


def _encode_ack(b0: int, packet_id: int, version: int, reason_code: int, properties: Properties | None) -> bytes:
    _check_version(version)
    _check_packet_id(packet_id)
    if not 0 <= reason_code <= 0xFF:
        raise ValueError(f"invalid reason code {reason_code!r}")
    if version == 4:
        _no_properties_in_v4(version, properties)
        if reason_code >= 0x80:
            raise ValueError("MQTT 3.1.1 acknowledgements cannot carry an error code")
        return _PACK_ACK(b0, 2, packet_id)
    if not properties:
        if not reason_code:
            return _PACK_ACK(b0, 2, packet_id)
        return _PACK_ACK(b0, 3, packet_id) + bytes((reason_code,))
    body = _PACK_H(packet_id) + bytes((reason_code,)) + _encode_properties(properties, _ACK_PROPS)
    return _fixed_header(b0, len(body)) + body


def encode_puback(packet_id: int, version: int, reason_code: int = 0, properties: Properties | None = None) -> bytes:
    """Encode a PUBACK for QoS 1 PUBLISH ``packet_id`` (1-65535).

    MQTT 5: ``reason_code`` and ``properties`` (``reason_string``,
    ``user_property``) are sent in the shortest legal form.  MQTT 3.1.1 has
    no reason code: success codes (< 0x80) are dropped, error codes raise
    ValueError (close the connection instead).
    """
    if not reason_code and not properties and 0 < packet_id <= 0xFFFF and version in (4, 5):
        return _PACK_ACK(0x40, 2, packet_id)
    return _encode_ack(0x40, packet_id, version, reason_code, properties)


def encode_pubrec(packet_id: int, version: int, reason_code: int = 0, properties: Properties | None = None) -> bytes:
    """Encode a PUBREC (first answer to a QoS 2 PUBLISH); as :func:`encode_puback`."""
    return _encode_ack(0x50, packet_id, version, reason_code, properties)


def encode_pubrel(packet_id: int, version: int, reason_code: int = 0, properties: Properties | None = None) -> bytes:
    """Encode a PUBREL (fixed-header flags 0b0010); as :func:`encode_puback`."""
    return _encode_ack(0x62, packet_id, version, reason_code, properties)


def encode_pubcomp(packet_id: int, version: int, reason_code: int = 0, properties: Properties | None = None) -> bytes:
    """Encode a PUBCOMP (answer to PUBREL); as :func:`encode_puback`."""
    return _encode_ack(0x70, packet_id, version, reason_code, properties)


def encode_suback(
    packet_id: int,
    reason_codes: Sequence[int],
    version: int,
    properties: Properties | None = None,
) -> bytes:
    """Encode a SUBACK with one code per requested filter, in request order.

    Codes are MQTT 5 SUBACK reason codes (0/1/2 = granted QoS, >= 0x80 =
    refused).  For version 4 every failure code is sent as 0x80.  Raises
    ValueError for an empty list or a code not valid in a SUBACK.
    """
    _check_version(version)
    _check_packet_id(packet_id)
    _no_properties_in_v4(version, properties)
    if not reason_codes:
        raise ValueError("SUBACK needs at least one reason code")
    for code in reason_codes:
        if code not in _SUBACK_V5_CODES:
            raise ValueError(f"invalid SUBACK reason code {code!r}")
    if version == 4:
        body = _PACK_H(packet_id) + bytes(c if c < 0x80 else 0x80 for c in reason_codes)
    else:
        body = _PACK_H(packet_id) + _encode_properties(properties, _ACK_PROPS) + bytes(reason_codes)
    return _fixed_header(0x90, len(body)) + body


def encode_unsuback(
    packet_id: int,
    reason_codes: Sequence[int],
    version: int,
    properties: Properties | None = None,
) -> bytes:
    """Encode an UNSUBACK.

    MQTT 5: one reason code per filter (0x00 success, 0x11 no subscription
    existed, >= 0x80 refused).  MQTT 3.1.1 has no payload: ``reason_codes``
    is ignored.  Raises ValueError for invalid codes or an empty MQTT 5 list.
    """
    _check_version(version)
    _check_packet_id(packet_id)
    if version == 4:
        _no_properties_in_v4(version, properties)
        return _PACK_ACK(0xB0, 2, packet_id)
    if not reason_codes:
        raise ValueError("UNSUBACK needs at least one reason code")
    for code in reason_codes:
        if code not in _UNSUBACK_V5_CODES:
            raise ValueError(f"invalid UNSUBACK reason code {code!r}")
    body = _PACK_H(packet_id) + _encode_properties(properties, _ACK_PROPS) + bytes(reason_codes)
    return _fixed_header(0xB0, len(body)) + body


def encode_pingresp() -> bytes:
    """Encode a PINGRESP (the same in both versions)."""
    return b"\xd0\x00"


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    version: int = 4,
    properties: Properties | None = None,
    *,
    dup: bool = False,
) -> bytes:
    """Encode a PUBLISH (either direction).

    ``packet_id`` must be 1-65535 for QoS 1/2 and 0 for QoS 0 (where ``dup``
    must be false).  ``topic`` must not contain wildcards or U+0000 and may
    be empty only in MQTT 5 with a ``topic_alias`` property.  MQTT 5
    ``properties`` may include ``subscription_identifier`` as an int or a
    list of ints (server to client).  Raises ValueError on invalid arguments.
    """
    if qos == 0:
        if packet_id or dup:
            raise ValueError("a QoS 0 PUBLISH has no packet id and no DUP flag")
    elif qos == 1 or qos == 2:
        _check_packet_id(packet_id)
    else:
        raise ValueError(f"invalid QoS {qos!r}")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ValueError("PUBLISH topic contains a wildcard or U+0000")
    raw_topic = topic.encode()
    if len(raw_topic) > 0xFFFF:
        raise ValueError("topic longer than 65535 bytes")
    if version == 5:
        if properties:
            prop_bytes = _encode_properties(properties, _PUBLISH_PROPS)
            if not raw_topic and "topic_alias" not in properties:
                raise ValueError("empty topic without topic_alias")
        else:
            prop_bytes = b"\x00"
            if not raw_topic:
                raise ValueError("empty topic without topic_alias")
    elif version == 4:
        if properties:
            raise ValueError("MQTT 3.1.1 packets carry no properties")
        if not raw_topic:
            raise ValueError("empty topic")
        prop_bytes = b""
    else:
        raise ValueError(f"protocol version must be 4 or 5, not {version!r}")
    b0 = 0x30 | qos << 1 | (8 if dup else 0) | (1 if retain else 0)
    topic_len = len(raw_topic)
    if qos:
        rl = 4 + topic_len + len(prop_bytes) + len(payload)
        return b"".join(
            (_fixed_header(b0, rl), _PACK_H(topic_len), raw_topic, _PACK_H(packet_id),
             prop_bytes, payload)
        )  # fmt: skip
    rl = 2 + topic_len + len(prop_bytes) + len(payload)
    return b"".join((_fixed_header(b0, rl), _PACK_H(topic_len), raw_topic, prop_bytes, payload))


def encode_disconnect(reason_code: int = 0, version: int = 5, properties: Properties | None = None) -> bytes:
    """Encode a DISCONNECT.

    MQTT 5: either side may send it, with a reason code and ``reason_string``
    / ``user_property`` / ``server_reference`` / ``session_expiry_interval``
    properties.  MQTT 3.1.1: only the client sends it and it has no reason
    code, so ``reason_code`` must be 0; a 3.1.1 server just closes instead.
    """
    _check_version(version)
    if not 0 <= reason_code <= 0xFF:
        raise ValueError(f"invalid reason code {reason_code!r}")
    if version == 4:
        _no_properties_in_v4(version, properties)
        if reason_code:
            raise ValueError("MQTT 3.1.1 DISCONNECT has no reason code")
        return b"\xe0\x00"
    if not properties:
        return b"\xe0\x00" if not reason_code else bytes((0xE0, 1, reason_code))
    body = bytes((reason_code,)) + _encode_properties(properties, _DISCONNECT_PROPS)
    return _fixed_header(0xE0, len(body)) + body


def encode_auth(reason_code: int = 0, properties: Properties | None = None) -> bytes:
    """Encode an MQTT 5 AUTH (0x00 success, 0x18 continue, 0x19 re-authenticate)."""
    if reason_code not in (0x00, 0x18, 0x19):
        raise ValueError(f"invalid AUTH reason code {reason_code!r}")
    if not reason_code and not properties:
        return b"\xf0\x00"
    body = bytes((reason_code,)) + _encode_properties(properties, _AUTH_PROPS)
    return _fixed_header(0xF0, len(body)) + body


# --------------------------------------------------------------------------
# Client-to-server packets (for tests, bridges and load generators).


def encode_connect(
    client_id: str,
    version: int,
    *,
    clean_start: bool = True,
    keepalive: int = 60,
    username: str | None = None,
    password: bytes | None = None,
    will: Will | None = None,
    properties: Properties | None = None,
) -> bytes:
    """Encode a CONNECT with protocol name "MQTT" and level ``version``.

    ``keepalive`` is 0-65535 seconds.  In MQTT 3.1.1 a password requires a
    user name.  ``will.properties`` and ``properties`` are MQTT 5 only.
    Raises ValueError on invalid arguments.
    """
    _check_version(version)
    _no_properties_in_v4(version, properties)
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError("keepalive must be 0..65535")
    flags = 0x02 if clean_start else 0
    parts = [b"\x00\x04MQTT", bytes((version,)), b"", _PACK_H(keepalive)]
    if version == 5:
        parts.append(_encode_properties(properties, _CONNECT_PROPS))
    parts.append(_encode_str(client_id))
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"invalid will QoS {will.qos!r}")
        if not will.topic or "+" in will.topic or "#" in will.topic:
            raise ValueError("will topic must be a non-empty topic name")
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        if version == 5:
            parts.append(_encode_properties(will.properties, _WILL_PROPS))
        elif will.properties:
            raise ValueError("MQTT 3.1.1 packets carry no properties")
        parts.append(_encode_str(will.topic))
        parts.append(_encode_bin(will.payload))
    if username is not None:
        flags |= 0x80
        parts.append(_encode_str(username))
    if password is not None:
        if version == 4 and username is None:
            raise ValueError("MQTT 3.1.1 requires a user name with a password")
        flags |= 0x40
        parts.append(_encode_bin(password))
    parts[2] = bytes((flags,))
    body = b"".join(parts)
    return _fixed_header(0x10, len(body)) + body


def encode_subscribe(
    packet_id: int,
    subscriptions: Sequence[tuple[str, int]],
    version: int,
    properties: Properties | None = None,
) -> bytes:
    """Encode a SUBSCRIBE of ``(topic_filter, options)`` pairs (see :class:`Subscribe`).

    Raises ValueError for an empty list, QoS 3, reserved option bits (in
    3.1.1 everything above the QoS bits), or retain handling 3.
    """
    _check_version(version)
    _check_packet_id(packet_id)
    _no_properties_in_v4(version, properties)
    if not subscriptions:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    parts = [_PACK_H(packet_id)]
    if version == 5:
        parts.append(_encode_properties(properties, _SUBSCRIBE_PROPS))
    reserved = 0xC0 if version == 5 else 0xFC
    for topic_filter, options in subscriptions:
        if not 0 <= options <= 0xFF or options & reserved or options & 3 == 3 or options & 0x30 == 0x30:
            raise ValueError(f"invalid subscription options 0x{options:02x}")
        parts.append(_encode_str(topic_filter))
        parts.append(bytes((options,)))
    body = b"".join(parts)
    return _fixed_header(0x82, len(body)) + body


def encode_unsubscribe(
    packet_id: int,
    topic_filters: Sequence[str],
    version: int,
    properties: Properties | None = None,
) -> bytes:
    """Encode an UNSUBSCRIBE of at least one topic filter."""
    _check_version(version)
    _check_packet_id(packet_id)
    _no_properties_in_v4(version, properties)
    if not topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    parts = [_PACK_H(packet_id)]
    if version == 5:
        parts.append(_encode_properties(properties, _UNSUBSCRIBE_PROPS))
    parts.extend(_encode_str(topic_filter) for topic_filter in topic_filters)
    body = b"".join(parts)
    return _fixed_header(0xA2, len(body)) + body


def encode_pingreq() -> bytes:
    """Encode a PINGREQ."""
    return b"\xc0\x00"
