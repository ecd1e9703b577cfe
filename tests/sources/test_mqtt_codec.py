"""Tests for the sans-I/O MQTT packet codec (isthmus.sources.mqtt_codec).

Layout: golden bytes for the server-side encoders; round trips of every
client packet type in both protocol versions, whole and split at every byte;
one test per kind of bad input, asserting the reason code; Hypothesis round
trips and fuzzing; and a real paho-mqtt client talking to a loopback server
built from this codec.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isthmus.sources.mqtt_codec import (
    Auth,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Pingreq,
    Properties,
    ProtocolError,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Unsubscribe,
    Will,
    encode_auth,
    encode_connack,
    encode_connect,
    encode_disconnect,
    encode_pingreq,
    encode_pingresp,
    encode_puback,
    encode_pubcomp,
    encode_publish,
    encode_pubrec,
    encode_pubrel,
    encode_suback,
    encode_subscribe,
    encode_unsuback,
    encode_unsubscribe,
    is_valid_topic_filter,
)

TELEMETRY = "v1/devices/me/telemetry"
PACKET_TYPES = (
    Connect, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Unsubscribe, Pingreq, Disconnect, Auth,
)  # fmt: skip
REASON_CODES_RAISED = {0x81, 0x82, 0x84, 0x85, 0x90, 0x94, 0x95}


# --------------------------------------------------------------------------
# Helpers


def encode_client_packet(packet: Packet, version: int) -> bytes:
    """Encode any packet the decoder accepts, from its own fields."""
    match packet:
        case Connect():
            return encode_connect(
                packet.client_id,
                version,
                clean_start=packet.clean_start,
                keepalive=packet.keepalive,
                username=packet.username,
                password=packet.password,
                will=packet.will,
                properties=packet.properties,
            )
        case Publish():
            return encode_publish(
                packet.topic,
                packet.payload,
                packet.qos,
                packet.packet_id,
                packet.retain,
                version,
                packet.properties,
                dup=packet.dup,
            )
        case Puback():
            return encode_puback(packet.packet_id, version, packet.reason_code, packet.properties)
        case Pubrec():
            return encode_pubrec(packet.packet_id, version, packet.reason_code, packet.properties)
        case Pubrel():
            return encode_pubrel(packet.packet_id, version, packet.reason_code, packet.properties)
        case Pubcomp():
            return encode_pubcomp(packet.packet_id, version, packet.reason_code, packet.properties)
        case Subscribe():
            return encode_subscribe(packet.packet_id, packet.subscriptions, version, packet.properties)
        case Unsubscribe():
            return encode_unsubscribe(packet.packet_id, packet.topic_filters, version, packet.properties)
        case Pingreq():
            return encode_pingreq()
        case Disconnect():
            return encode_disconnect(packet.reason_code, version, packet.properties)
        case Auth():
            return encode_auth(packet.reason_code, packet.properties)
    raise AssertionError(packet)


def connected(version: int, **connect_kwargs: Any) -> Decoder:
    """A decoder that has already accepted a CONNECT of ``version``."""
    decoder = Decoder(max_packet_size=connect_kwargs.pop("max_packet_size", 65536))
    [connect] = decoder.feed(encode_connect("dev-1", version, **connect_kwargs))
    assert isinstance(connect, Connect)
    assert decoder.protocol_level == version
    return decoder


def feed_bytewise(decoder: Decoder, data: bytes) -> list[Packet]:
    packets: list[Packet] = []
    for i in range(len(data)):
        packets += decoder.feed(data[i : i + 1])
    return packets


def assert_rejected(data: bytes, reason_code: int, decoder: Decoder | None = None) -> ProtocolError:
    decoder = decoder if decoder is not None else Decoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(data)
    assert info.value.reason_code == reason_code, str(info.value)
    return info.value


def raw_packet(first_byte: int, body: bytes) -> bytes:
    """A packet with a hand-built body (bodies here are shorter than 128 bytes)."""
    assert len(body) < 128
    return bytes((first_byte, len(body))) + body


def raw_str(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with an exception instead of hanging if the body runs too long."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Sample packets: every type a client sends, per protocol version.
SAMPLES_V4: list[Packet] = [
    Connect(4, "dev-1", False, 30, "user", b"pass\x00word", Will("devices/dev-1/status", b"offline", 1, True)),
    Publish(TELEMETRY, b'{"temperature":21.5}', 0),
    Publish(TELEMETRY, b"", 1, retain=True, packet_id=1),
    Publish("a/b/c", b"\x00\xff" * 100, 2, dup=True, packet_id=65535),
    Puback(1),
    Pubrec(2),
    Pubrel(2),
    Pubcomp(2),
    Subscribe(3, [("a/+/c", 0), ("d/#", 1), ("e", 2)]),
    Unsubscribe(4, ["a/+/c", "d/#"]),
    Pingreq(),
    Disconnect(),
]
SAMPLES_V5: list[Packet] = [
    Connect(
        5,
        "dev-5",
        True,
        0,
        "user",
        b"secret",
        Will("devices/dev-5/status", b"gone", 2, False, {"will_delay_interval": 10, "content_type": "text"}),
        {
            "session_expiry_interval": 300,
            "receive_maximum": 16,
            "maximum_packet_size": 4096,
            "authentication_method": "SCRAM-SHA-1",
            "user_property": [("fw", "1.2"), ("fw", "1.3")],
        },
    ),
    Publish(TELEMETRY, b"{}", 0),
    Publish(
        TELEMETRY,
        b"x" * 300,
        1,
        packet_id=7,
        properties={
            "payload_format_indicator": 1,
            "message_expiry_interval": 60,
            "content_type": "application/json",
            "response_topic": "replies/dev-5",
            "correlation_data": b"\x01\x02",
            "user_property": [("k", "v")],
        },
    ),
    Publish("", b"aliased", 1, packet_id=8, properties={"topic_alias": 3}),
    Puback(7),
    Puback(8, 0x10, {"reason_string": "no subscribers"}),
    Pubrec(9, 0x80),
    Pubrel(9, 0x92),
    Pubcomp(9, 0, {"user_property": [("a", "b")]}),
    Subscribe(
        10,
        [("a/+/c", 0x01 | 0x04 | 0x08 | 0x20), ("$share/g/d/#", 2)],
        {"subscription_identifier": 268_435_455, "user_property": [("x", "y")]},
    ),
    Unsubscribe(11, ["a/+/c"], {"user_property": [("why", "done")]}),
    Pingreq(),
    Auth(0x18, {"authentication_method": "SCRAM-SHA-1", "authentication_data": b"\x00nonce"}),
    Disconnect(0x04, {"session_expiry_interval": 60, "reason_string": "bye"}),
]
SAMPLES = {4: SAMPLES_V4, 5: SAMPLES_V5}


def stream(version: int) -> bytes:
    return b"".join(encode_client_packet(packet, version) for packet in SAMPLES[version])


# --------------------------------------------------------------------------
# Server-side encoders: golden bytes from the specifications.


def test_connack_golden_bytes() -> None:
    assert encode_connack(False, 0, 4) == b"\x20\x02\x00\x00"
    assert encode_connack(True, 0, 4) == b"\x20\x02\x01\x00"
    assert encode_connack(False, 0, 5) == b"\x20\x03\x00\x00\x00"
    props: Properties = {
        "receive_maximum": 100,
        "topic_alias_maximum": 10,
        "assigned_client_identifier": "abc",
    }
    assert (
        encode_connack(True, 0, 5, props)
        == b"\x20\x0f\x01\x00\x0c" + b"\x21\x00\x64" + b"\x22\x00\x0a" + b"\x12\x00\x03abc"
    )
    assert encode_connack(False, 0x86, 5) == b"\x20\x03\x00\x86\x00"


@pytest.mark.parametrize(
    ("code", "return_code"),
    [(0x84, 1), (0x85, 2), (0x88, 3), (0x86, 4), (0x87, 5), (0x8A, 5), (0x80, 3), (0x81, 3), (5, 5), (1, 1)],
)
def test_connack_translates_reason_codes_for_mqtt_311(code: int, return_code: int) -> None:
    assert encode_connack(False, code, 4) == bytes((0x20, 2, 0, return_code))


def test_connack_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="session_present"):
        encode_connack(True, 0x87, 5)
    with pytest.raises(ValueError, match="reason code"):
        encode_connack(False, 1, 5)  # a 3.1.1 return code is not an MQTT 5 reason code
    with pytest.raises(ValueError, match="properties"):
        encode_connack(False, 0, 4, {"receive_maximum": 1})
    with pytest.raises(ValueError, match="not valid in this packet"):
        encode_connack(False, 0, 5, {"topic_alias": 1})
    with pytest.raises(ValueError, match="must not be 0"):
        encode_connack(False, 0, 5, {"receive_maximum": 0})
    with pytest.raises(ValueError, match="version"):
        encode_connack(False, 0, 3)


def test_ack_golden_bytes() -> None:
    assert encode_puback(1, 4) == b"\x40\x02\x00\x01"
    assert encode_puback(0x1234, 5) == b"\x40\x02\x12\x34"
    assert encode_puback(7, 5, 0x10) == b"\x40\x03\x00\x07\x10"
    assert encode_puback(7, 4, 0x10) == b"\x40\x02\x00\x07"  # 3.1.1 has no reason code
    assert encode_puback(7, 5, 0x87, {"reason_string": "no"}) == b"\x40\x09\x00\x07\x87\x05\x1f\x00\x02no"
    assert encode_pubrec(5, 4) == b"\x50\x02\x00\x05"
    assert encode_pubrel(5, 4) == b"\x62\x02\x00\x05"
    assert encode_pubcomp(5, 5, 0x92) == b"\x70\x03\x00\x05\x92"
    with pytest.raises(ValueError, match="packet id"):
        encode_puback(0, 4)
    with pytest.raises(ValueError, match="packet id"):
        encode_puback(65536, 5)
    with pytest.raises(ValueError, match="error code"):
        encode_puback(1, 4, 0x80)


def test_suback_unsuback_pingresp_golden_bytes() -> None:
    assert encode_suback(10, [0, 1, 2, 0x80], 4) == b"\x90\x06\x00\x0a\x00\x01\x02\x80"
    assert encode_suback(10, [1, 0x87], 4) == b"\x90\x04\x00\x0a\x01\x80"
    assert encode_suback(10, [0, 0x87], 5) == b"\x90\x05\x00\x0a\x00\x00\x87"
    assert encode_unsuback(10, [0], 4) == b"\xb0\x02\x00\x0a"
    assert encode_unsuback(10, [0, 0x11], 5) == b"\xb0\x05\x00\x0a\x00\x00\x11"
    assert encode_pingresp() == b"\xd0\x00"
    with pytest.raises(ValueError, match="SUBACK reason code"):
        encode_suback(10, [3], 5)
    with pytest.raises(ValueError, match="at least one"):
        encode_suback(10, [], 4)
    with pytest.raises(ValueError, match="UNSUBACK reason code"):
        encode_unsuback(10, [0x10], 5)


def test_disconnect_and_auth_golden_bytes() -> None:
    assert encode_disconnect(0, 5) == b"\xe0\x00"
    assert encode_disconnect(0x8E, 5) == b"\xe0\x01\x8e"
    assert encode_disconnect(0x9C, 5, {"server_reference": "b"}) == b"\xe0\x06\x9c\x04\x1c\x00\x01b"
    assert encode_disconnect(0, 4) == b"\xe0\x00"
    with pytest.raises(ValueError, match="no reason code"):
        encode_disconnect(0x81, 4)
    assert encode_auth() == b"\xf0\x00"
    assert encode_auth(0x18, {"authentication_method": "M"}) == b"\xf0\x06\x18\x04\x15\x00\x01M"
    with pytest.raises(ValueError, match="AUTH reason code"):
        encode_auth(0x01)


def test_publish_golden_bytes() -> None:
    assert encode_publish("a/b", b"hi", 0) == b"\x30\x07\x00\x03a/bhi"
    assert encode_publish("a/b", b"hi", 1, 10, True, 4, dup=True) == b"\x3b\x09\x00\x03a/b\x00\x0ahi"
    assert encode_publish("a/b", b"hi", 2, 10, False, 5) == b"\x34\x0a\x00\x03a/b\x00\x0a\x00hi"
    # Server to client: several subscription identifiers (300 is a 2-byte varint).
    assert (
        encode_publish("t", b"", 0, 0, False, 5, {"subscription_identifier": [1, 300]})
        == b"\x30\x09\x00\x01t\x05\x0b\x01\x0b\xac\x02"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topic": "a/+", "qos": 0}, "wildcard"),
        ({"topic": "a/#", "qos": 0}, "wildcard"),
        ({"topic": "a\x00", "qos": 0}, "U\\+0000"),
        ({"topic": "", "qos": 0}, "empty topic"),
        ({"topic": "a", "qos": 3}, "QoS"),
        ({"topic": "a", "qos": 1, "packet_id": 0}, "packet id"),
        ({"topic": "a", "qos": 0, "packet_id": 5}, "QoS 0"),
        ({"topic": "a", "qos": 0, "version": 4, "properties": {"content_type": "x"}}, "properties"),
        ({"topic": "a", "qos": 0, "version": 5, "properties": {"nonsense": 1}}, "unknown"),
        ({"topic": "a", "qos": 0, "version": 5, "properties": {"topic_alias": 0}}, "must not be 0"),
        ({"topic": "a", "qos": 0, "version": 5, "properties": {"content_type": 5}}, "must be str"),
        ({"topic": "a", "qos": 0, "version": 5, "properties": {"message_expiry_interval": -1}}, "range"),
        ({"topic": "a", "qos": 0, "version": 5, "properties": {"user_property": [("a",)]}}, "pairs"),
    ],
)
def test_encode_publish_rejects_invalid_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_publish(payload=b"", **kwargs)


def test_encoders_reject_what_the_decoder_would_refuse() -> None:
    with pytest.raises(ValueError, match="subscription options"):
        encode_subscribe(1, [("a", 3)], 5)
    with pytest.raises(ValueError, match="subscription options"):
        encode_subscribe(1, [("a", 0x04)], 4)  # No Local does not exist in 3.1.1
    with pytest.raises(ValueError, match="subscription options"):
        encode_subscribe(1, [("a", 0x30)], 5)
    with pytest.raises(ValueError, match="single value"):
        encode_subscribe(1, [("a", 0)], 5, {"subscription_identifier": [1, 2]})
    with pytest.raises(ValueError, match="user name"):
        encode_connect("c", 4, password=b"p")
    with pytest.raises(ValueError, match="U\\+0000"):
        encode_connect("c\x00", 4)
    with pytest.raises(ValueError, match="65535"):
        encode_connect("c" * 65536, 4)
    # 256 MiB of address space that is never touched: only its length matters.
    with mmap.mmap(-1, 268_435_456) as huge, pytest.raises(ValueError, match="268435455"):
        encode_publish("t", cast(bytes, memoryview(huge)), 0)


# --------------------------------------------------------------------------
# Decoding: round trips, splitting, state.


@pytest.mark.parametrize("version", [4, 5])
def test_every_client_packet_type_round_trips(version: int) -> None:
    decoder = Decoder()
    assert decoder.protocol_level is None
    packets = decoder.feed(stream(version))
    assert packets == SAMPLES[version]
    assert {type(p) for p in packets} == set(PACKET_TYPES) - ({Auth} if version == 4 else set())
    assert decoder.protocol_level == version


@pytest.mark.parametrize("version", [4, 5])
def test_packets_fed_one_byte_at_a_time(version: int) -> None:
    data = stream(version)
    decoder = Decoder()
    packets: list[Packet] = []
    for i in range(len(data)):
        got = decoder.feed(data[i : i + 1])
        packets += got
        # A packet comes out exactly when its last byte arrives.
        if got:
            assert (
                encode_client_packet(got[-1], version)
                == data[i + 1 - len(encode_client_packet(got[-1], version)) : i + 1]
            )
    assert packets == SAMPLES[version]


@pytest.mark.parametrize("version", [4, 5])
def test_stream_split_at_every_byte_boundary(version: int) -> None:
    data = stream(version)
    for cut in range(len(data) + 1):
        decoder = Decoder()
        assert decoder.feed(data[:cut]) + decoder.feed(data[cut:]) == SAMPLES[version], cut


def test_many_packets_in_one_chunk_and_memoryview_input() -> None:
    decoder = connected(4)
    chunk = b"".join(encode_publish(TELEMETRY, b"%d" % i, 1, i % 65535 + 1) for i in range(5000))
    packets = decoder.feed(memoryview(chunk))
    assert len(packets) == 5000
    assert all(type(p) is Publish and type(p.payload) is bytes for p in packets)
    assert [cast(Publish, p).payload for p in packets[:3]] == [b"0", b"1", b"2"]
    assert packets[-1] == Publish(TELEMETRY, b"4999", 1, packet_id=5000)


def test_topic_changes_are_not_masked_by_the_repeated_topic_shortcut() -> None:
    decoder = connected(4)
    topics = ["a/b", "a/b", "a/c", "a/bb", "é/ü", "é/ü", "a/b"]
    data = b"".join(encode_publish(t, b"", 0) for t in topics)
    assert [p.topic for p in decoder.feed(data) if isinstance(p, Publish)] == topics
    # Same length as the remembered "a/b", different bytes: still checked.
    assert_rejected(raw_packet(0x30, raw_str(b"a/+")), 0x90, decoder)


@pytest.mark.parametrize("remaining_length", [0x7F, 0x80, 0x3FFF, 0x4000, 0x1FFFFF, 0x200000])
def test_remaining_length_boundaries(remaining_length: int) -> None:
    decoder = connected(4, max_packet_size=3_000_000)
    payload = bytes(remaining_length - 3)  # topic "t" takes 3 bytes
    data = encode_publish("t", payload, 0)
    header_length = 2 + (remaining_length >= 0x80) + (remaining_length >= 0x4000) + (remaining_length >= 0x200000)
    assert len(data) == header_length + remaining_length
    # Nothing comes out until the last byte, however the header is split.
    for i in range(header_length + 1):
        assert decoder.feed(data[i : i + 1]) == []
    assert decoder.feed(data[header_length + 1 : -1]) == []
    assert decoder.feed(data[-1:]) == [Publish("t", payload, 0)]


def test_large_packet_fed_byte_by_byte_is_linear_time() -> None:
    decoder = connected(4, max_packet_size=1 << 20)
    payload = bytes(range(256)) * 1024  # 256 KiB
    data = encode_publish("big", payload, 1, 1)
    start = time.perf_counter()
    packets = feed_bytewise(decoder, data)
    assert packets == [Publish("big", payload, 1, packet_id=1)]
    # Re-scanning the buffered bytes on every feed would copy ~32 GB here.
    assert time.perf_counter() - start < 5


def test_exact_max_packet_size_is_accepted() -> None:
    decoder = connected(4, max_packet_size=100)
    packet = encode_publish("t", bytes(95), 0)  # 2 + 3 + 95 bytes
    assert len(packet) == 100
    assert len(decoder.feed(packet)) == 1
    assert_rejected(encode_publish("t", bytes(96), 0), 0x95, decoder)


def test_connect_accessors_and_defaults() -> None:
    [v4] = Decoder().feed(encode_connect("c", 4, keepalive=0))
    assert isinstance(v4, Connect)
    assert (v4.session_expiry_interval, v4.receive_maximum, v4.maximum_packet_size) == (0, 65535, None)
    assert (v4.username, v4.password, v4.will, v4.properties) == (None, None, None, {})
    [v5] = Decoder().feed(
        encode_connect(
            "c",
            5,
            properties={"session_expiry_interval": 3600, "receive_maximum": 5, "maximum_packet_size": 999},
        )
    )
    assert isinstance(v5, Connect)
    assert (v5.session_expiry_interval, v5.receive_maximum, v5.maximum_packet_size) == (3600, 5, 999)


def test_empty_client_id_and_password_only_login() -> None:
    [v4] = Decoder().feed(encode_connect("", 4, clean_start=True))
    assert isinstance(v4, Connect)
    assert v4.client_id == ""
    [v5] = Decoder().feed(encode_connect("", 5, clean_start=False, password=b"token"))
    assert isinstance(v5, Connect)
    assert (v5.client_id, v5.username, v5.password) == ("", None, b"token")


def test_everything_after_disconnect_is_ignored() -> None:
    decoder = connected(4)
    data = encode_publish("a", b"1", 0) + encode_disconnect(0, 4) + b"\xff\xff garbage"
    assert decoder.feed(data) == [Publish("a", b"1", 0), Disconnect()]
    assert decoder.feed(encode_publish("a", b"2", 0)) == []


def test_decoder_stays_failed_after_an_error() -> None:
    decoder = connected(4)
    assert_rejected(b"\x00\x00", 0x81, decoder)
    assert_rejected(encode_pingreq(), 0x81, decoder)
    other = connected(4)  # decoders share nothing
    assert other.feed(encode_pingreq()) == [Pingreq()]


def test_protocol_error_message_names_the_reason_code() -> None:
    error = assert_rejected(b"\x30\x02\x00\x00", 0x82)
    assert "0x82" in str(error)
    assert "CONNECT" in str(error)
    assert error.connack_version is None


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [
        ("a/b", True), ("+", True), ("#", True), ("a/+/c/#", True), ("+/+", True), ("/", True),
        ("$SYS/#", True), ("$share/g/a/+", True), ("", False), ("a/#/b", False), ("a#", False),
        ("a/b+", False), ("+a", False), ("$share/g", False), ("$share//a", False), ("$share/g+/a", False),
        ("$share/g/", False),
    ],
)  # fmt: skip
def test_is_valid_topic_filter(topic_filter: str, valid: bool) -> None:
    assert is_valid_topic_filter(topic_filter) is valid


# --------------------------------------------------------------------------
# Bad input: one test per kind, each asserting the reason code.


def test_garbage_bytes_before_connect() -> None:
    assert_rejected(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0x81)  # 'G' = PUBACK with flags 7
    assert_rejected(b"\x16\x03\x01\x02\x00", 0x81)  # a TLS ClientHello: CONNECT with flags 6


def test_garbage_bytes_after_connect() -> None:
    assert_rejected(b"\xff" * 8, 0x81, connected(4))  # type 15 is reserved in 3.1.1
    assert_rejected(b"\xf1\x00", 0x81, connected(5))  # AUTH with flags


@pytest.mark.parametrize("first_byte", [0x00, 0x0F])
@pytest.mark.parametrize("version", [4, 5])
def test_reserved_packet_type_0(first_byte: int, version: int) -> None:
    assert_rejected(bytes((first_byte, 0)), 0x81, connected(version))


def test_reserved_packet_type_15_in_mqtt_311() -> None:
    assert_rejected(b"\xf0\x00", 0x81, connected(4))


@pytest.mark.parametrize(
    ("first_byte", "name"),
    [(0x80, "SUBSCRIBE"), (0x83, "SUBSCRIBE"), (0x60, "PUBREL"), (0x6A, "PUBREL"), (0x41, "PUBACK"),
     (0xA0, "UNSUBSCRIBE"), (0xC1, "PINGREQ"), (0xE2, "DISCONNECT"), (0x11, "CONNECT")],
)  # fmt: skip
def test_wrong_fixed_header_flags(first_byte: int, name: str) -> None:
    decoder = connected(5) if first_byte >> 4 != 1 else Decoder()
    error = assert_rejected(bytes((first_byte,)), 0x81, decoder)  # refused on the first byte alone
    assert name in str(error)


def test_remaining_length_over_four_bytes() -> None:
    decoder = connected(4)
    # Refused as soon as the fourth length byte still has its continuation bit set.
    assert_rejected(b"\x30\xff\xff\xff\xff", 0x81, decoder)
    assert_rejected(b"\x30\x80\x80\x80\x80\x01", 0x81, connected(5))


def test_packet_over_max_packet_size_is_refused_from_its_header() -> None:
    decoder = connected(4, max_packet_size=128)
    data = encode_publish(TELEMETRY, bytes(200), 1, 1)
    assert decoder.feed(data[:1]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(data[1:3])  # the two length bytes: the body never needs to arrive
    assert info.value.reason_code == 0x95
    assert_rejected(b"\x30\xff\xff\xff\x7f", 0x95, connected(5))  # 256 MiB announced


def test_truncated_string() -> None:
    decoder = connected(4)
    assert_rejected(raw_packet(0x30, b"\x00\x0aabc"), 0x81, decoder)  # topic says 10 bytes, packet has 3
    bad_connect = raw_packet(0x10, raw_str(b"MQTT") + b"\x04\x02\x00\x3c" + b"\x00\x09dev")
    assert_rejected(bad_connect, 0x81)


def test_truncated_fields_in_other_packets() -> None:
    assert_rejected(raw_packet(0x40, b"\x00"), 0x81, connected(4))  # PUBACK with 1-byte id
    assert_rejected(raw_packet(0x32, b"\x00\x01a\x00"), 0x81, connected(4))  # QoS 1, 1-byte packet id
    assert_rejected(raw_packet(0x82, b"\x00\x01\x00\x01a"), 0x81, connected(4))  # filter without options
    assert_rejected(raw_packet(0x40, b"\x00\x01\x00"), 0x81, connected(4))  # 3.1.1 PUBACK with reason code
    assert_rejected(raw_packet(0x40, b"\x00\x01\x00\x05\x1f"), 0x81, connected(5))  # property runs past end
    assert_rejected(raw_packet(0x30, b"\x00\x01a"), 0x81, connected(5))  # no property length
    assert_rejected(raw_packet(0xC0, b"\x00"), 0x81, connected(4))  # PINGREQ with a body
    assert_rejected(raw_packet(0xE0, b"\x00"), 0x81, connected(4))  # 3.1.1 DISCONNECT with a body
    assert_rejected(encode_connect("c", 4) + b"x", 0x81)  # CONNECT length includes an extra byte


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x00b"])
def test_invalid_utf8_in_strings(bad: bytes) -> None:
    assert_rejected(raw_packet(0x30, raw_str(bad) + b"payload"), 0x81, connected(4))
    assert_rejected(raw_packet(0x82, b"\x00\x01" + raw_str(bad) + b"\x00"), 0x81, connected(4))
    connect = raw_packet(0x10, raw_str(b"MQTT") + b"\x04\x02\x00\x3c" + raw_str(bad))
    assert_rejected(connect, 0x81)


@pytest.mark.parametrize("topic", [b"a/+/c", b"#", b"a/#", b"+"])
def test_wildcard_in_publish_topic(topic: bytes) -> None:
    assert_rejected(raw_packet(0x30, raw_str(topic) + b"x"), 0x90, connected(4))
    assert_rejected(raw_packet(0x30, raw_str(topic) + b"\x00x"), 0x90, connected(5))


def test_empty_publish_topic() -> None:
    assert_rejected(raw_packet(0x30, raw_str(b"") + b"x"), 0x82, connected(4))
    assert_rejected(raw_packet(0x30, raw_str(b"") + b"\x00x"), 0x82, connected(5))  # no topic alias


@pytest.mark.parametrize("first_byte", [0x36, 0x37, 0x3E, 0x3F])
def test_publish_qos_3(first_byte: int) -> None:
    assert_rejected(bytes((first_byte,)), 0x81, connected(4))


def test_publish_dup_on_qos_0() -> None:
    assert_rejected(raw_packet(0x38, raw_str(b"a") + b"x"), 0x81, connected(4))


@pytest.mark.parametrize("version", [4, 5])
def test_packet_id_zero(version: int) -> None:
    props = b"\x00" if version == 5 else b""
    assert_rejected(raw_packet(0x32, raw_str(b"a") + b"\x00\x00" + props), 0x82, connected(version))
    assert_rejected(raw_packet(0x40, b"\x00\x00"), 0x82, connected(version))
    assert_rejected(raw_packet(0x82, b"\x00\x00" + props + raw_str(b"a") + b"\x00"), 0x82, connected(version))
    assert_rejected(raw_packet(0xA2, b"\x00\x00" + props + raw_str(b"a")), 0x82, connected(version))


@pytest.mark.parametrize("first", [encode_publish("a", b"", 0), encode_pingreq(), encode_subscribe(1, [("a", 0)], 4)])
def test_publish_or_anything_before_connect(first: bytes) -> None:
    error = assert_rejected(first, 0x82)
    assert error.connack_version is None


def test_second_connect() -> None:
    assert_rejected(encode_connect("again", 4), 0x82, connected(4))
    assert_rejected(encode_connect("again", 5), 0x82, connected(5))


@pytest.mark.parametrize("first_byte", [0x20, 0x90, 0xB0, 0xD0])
def test_server_only_packets_from_a_client(first_byte: int) -> None:
    assert_rejected(bytes((first_byte, 2, 0, 1)), 0x82, connected(5))


@pytest.mark.parametrize(
    "properties",
    [
        b"\x7f\x00",  # no such property
        b"\x00\x00",  # id 0 is not a property
        b"\x80\x01",  # multi-byte property id
        b"\x11\x00\x00\x00\x01",  # session expiry interval is a CONNECT property, not a PUBLISH one
    ],
)
def test_unknown_or_misplaced_mqtt5_property(properties: bytes) -> None:
    publish = raw_packet(0x30, raw_str(b"a") + bytes((len(properties),)) + properties + b"x")
    assert_rejected(publish, 0x81, connected(5))


@pytest.mark.parametrize(
    "properties",
    [
        b"\x02\x00\x00\x00\x01" * 2,  # message expiry interval twice
        b"\x03\x00\x01a\x03\x00\x01b",  # content type twice
        b"\x01\x00\x01\x01",  # payload format indicator twice, different values
    ],
)
def test_duplicate_mqtt5_property(properties: bytes) -> None:
    publish = raw_packet(0x30, raw_str(b"a") + bytes((len(properties),)) + properties + b"x")
    assert_rejected(publish, 0x82, connected(5))


def test_repeated_user_properties_are_not_duplicates() -> None:
    props = b"\x26\x00\x01k\x00\x011" + b"\x26\x00\x01k\x00\x012"
    publish = raw_packet(0x30, raw_str(b"a") + bytes((len(props),)) + props + b"x")
    [packet] = connected(5).feed(publish)
    assert isinstance(packet, Publish)
    assert packet.properties == {"user_property": [("k", "1"), ("k", "2")]}


def test_invalid_mqtt5_property_values() -> None:
    def publish_with(props: bytes) -> bytes:
        return raw_packet(0x30, raw_str(b"a") + bytes((len(props),)) + props + b"x")

    assert_rejected(publish_with(b"\x23\x00\x00"), 0x94, connected(5))  # topic alias 0
    assert_rejected(publish_with(b"\x01\x02"), 0x82, connected(5))  # payload format indicator 2
    assert_rejected(publish_with(b"\x0b\x01"), 0x82, connected(5))  # subscription id from a client
    assert_rejected(publish_with(b"\x03\x00\x02\xff\xff"), 0x81, connected(5))  # content type not UTF-8
    receive_maximum_zero = encode_connect("c", 5, properties={"receive_maximum": 1}).replace(
        b"\x21\x00\x01", b"\x21\x00\x00"
    )
    error = assert_rejected(receive_maximum_zero, 0x82)
    assert error.connack_version == 5  # an MQTT 5 CONNECT error is reported in a CONNACK


def test_connect_protocol_name_and_level() -> None:
    mqisdp = raw_packet(0x10, raw_str(b"MQIsdp") + b"\x03\x02\x00\x3c" + raw_str(b"old"))
    error = assert_rejected(mqisdp, 0x84)
    assert error.connack_version == 4
    assert encode_connack(False, error.reason_code, error.connack_version) == b"\x20\x02\x00\x01"
    level_6 = raw_packet(0x10, raw_str(b"MQTT") + b"\x06\x02\x00\x3c" + raw_str(b"new"))
    assert assert_rejected(level_6, 0x84).connack_version == 4
    assert assert_rejected(raw_packet(0x10, raw_str(b"HTTP") + b"\x04\x02\x00\x3c"), 0x82).connack_version is None


def test_connect_flag_violations() -> None:
    def connect(flags: int, payload: bytes = raw_str(b"c")) -> bytes:
        return raw_packet(0x10, raw_str(b"MQTT") + bytes((4, flags)) + b"\x00\x3c" + payload)

    assert_rejected(connect(0x03), 0x81)  # reserved flag
    assert_rejected(connect(0x08), 0x81)  # will QoS without will flag
    assert_rejected(connect(0x20), 0x81)  # will retain without will flag
    assert_rejected(connect(0x1C, raw_str(b"c") + raw_str(b"t") + raw_str(b"p")), 0x81)  # will QoS 3
    assert_rejected(connect(0x42, raw_str(b"c") + raw_str(b"pw")), 0x81)  # 3.1.1 password without user
    assert_rejected(connect(0x06, raw_str(b"c") + raw_str(b"a/#") + raw_str(b"p")), 0x90)  # wildcard will
    error = assert_rejected(connect(0x00, raw_str(b"")), 0x85)  # empty id, no clean session
    assert (error.connack_version, encode_connack(False, 0x85, 4)) == (4, b"\x20\x02\x00\x02")


def test_subscribe_violations() -> None:
    def subscribe(version: int, entries: bytes) -> bytes:
        return raw_packet(0x82, b"\x00\x01" + (b"\x00" if version == 5 else b"") + entries)

    assert_rejected(subscribe(4, b""), 0x82, connected(4))  # no filters
    assert_rejected(subscribe(5, b""), 0x82, connected(5))
    assert_rejected(subscribe(4, raw_str(b"a") + b"\x03"), 0x81, connected(4))  # QoS 3
    assert_rejected(subscribe(4, raw_str(b"a") + b"\x04"), 0x81, connected(4))  # v5 bits in 3.1.1
    assert_rejected(subscribe(5, raw_str(b"a") + b"\x40"), 0x81, connected(5))  # reserved bits
    assert_rejected(subscribe(5, raw_str(b"a") + b"\x30"), 0x82, connected(5))  # retain handling 3
    assert_rejected(subscribe(5, raw_str(b"$share/g/a") + b"\x04"), 0x82, connected(5))  # shared no local
    assert_rejected(raw_packet(0xA2, b"\x00\x01"), 0x82, connected(4))  # UNSUBSCRIBE without filters


def test_auth_and_disconnect_rules() -> None:
    assert_rejected(encode_auth(0x18, {"authentication_method": "M"}), 0x82, connected(5))  # no auth method
    decoder = connected(5, properties={"authentication_method": "M"})
    assert decoder.feed(encode_auth()) == [Auth()]
    # A session expiry the CONNECT left at 0 cannot be set at DISCONNECT.
    assert_rejected(encode_disconnect(0, 5, {"session_expiry_interval": 10}), 0x82, connected(5))
    assert connected(5).feed(encode_disconnect(0x04, 5)) == [Disconnect(0x04)]


# --------------------------------------------------------------------------
# Hypothesis


MQTT_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
TOPIC_NAMES = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00+#"), min_size=1, max_size=12)
USER_PROPERTIES = st.lists(st.tuples(MQTT_TEXT, MQTT_TEXT), min_size=1, max_size=3)
U16 = st.integers(1, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)

PUBLISH_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "payload_format_indicator": st.integers(0, 1),
        "message_expiry_interval": U32,
        "topic_alias": U16,
        "response_topic": TOPIC_NAMES,
        "correlation_data": st.binary(max_size=8),
        "content_type": MQTT_TEXT,
        "user_property": USER_PROPERTIES,
    },
)
CONNECT_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "session_expiry_interval": U32,
        "receive_maximum": U16,
        "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
        "topic_alias_maximum": st.integers(0, 0xFFFF),
        "request_response_information": st.integers(0, 1),
        "request_problem_information": st.integers(0, 1),
        "authentication_method": MQTT_TEXT,
        "user_property": USER_PROPERTIES,
    },
)
WILL_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "will_delay_interval": U32,
        "payload_format_indicator": st.integers(0, 1),
        "message_expiry_interval": U32,
        "content_type": MQTT_TEXT,
        "response_topic": TOPIC_NAMES,
        "correlation_data": st.binary(max_size=8),
        "user_property": USER_PROPERTIES,
    },
)


@st.composite
def publishes(draw: st.DrawFn, version: int) -> Publish:
    qos = draw(st.integers(0, 2))
    props = cast(Properties, draw(PUBLISH_PROPERTIES)) if version == 5 else {}
    topic = draw(TOPIC_NAMES | st.just("")) if "topic_alias" in props else draw(TOPIC_NAMES)
    return Publish(
        topic,
        draw(st.binary(max_size=300)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(U16) if qos else 0,
        props,
    )


@st.composite
def subscribes(draw: st.DrawFn, version: int) -> Subscribe:
    if version == 5:
        options = st.integers(0, 0x2F).filter(lambda o: o & 3 != 3)
        filters = MQTT_TEXT.filter(lambda f: f and not f.startswith("$share/"))
        optional = {"subscription_identifier": st.integers(1, 268_435_455), "user_property": USER_PROPERTIES}
        props = cast(Properties, draw(st.fixed_dictionaries({}, optional=optional)))
    else:
        options = st.integers(0, 2)
        filters = MQTT_TEXT.filter(bool)
        props = {}
    return Subscribe(draw(U16), draw(st.lists(st.tuples(filters, options), min_size=1, max_size=4)), props)


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    props = cast(dict[str, Any], draw(CONNECT_PROPERTIES)) if version == 5 else {}
    if "authentication_method" in props and draw(st.booleans()):
        props["authentication_data"] = draw(st.binary(max_size=8))
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(TOPIC_NAMES),
            draw(st.binary(max_size=20)),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            cast(Properties, draw(WILL_PROPERTIES)) if version == 5 else {},
        )
    clean_start = draw(st.booleans())
    client_id = draw(MQTT_TEXT)
    if version == 4 and not client_id:
        clean_start = True  # 3.1.1 refuses an empty client id without a clean session
    username = draw(st.none() | MQTT_TEXT)
    password = draw(st.none() | st.binary(max_size=12))
    if version == 4 and username is None:
        password = None
    return Connect(version, client_id, clean_start, draw(st.integers(0, 0xFFFF)), username, password, will, props)


def client_packets(version: int) -> st.SearchStrategy[Packet]:
    return st.one_of(
        publishes(version),
        subscribes(version),
        st.builds(Unsubscribe, U16, st.lists(MQTT_TEXT.filter(bool), min_size=1, max_size=3)),
        st.builds(Puback, U16),
        st.builds(Pubrel, U16),
        st.just(Pingreq()),
    )


ROUND_TRIP = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@ROUND_TRIP
@given(data=st.data(), version=st.sampled_from([4, 5]))
def test_hypothesis_round_trip(data: st.DataObject, version: int) -> None:
    connect = data.draw(connects(version))
    packets = data.draw(st.lists(client_packets(version), max_size=6))
    encoded = [encode_client_packet(p, version) for p in [connect, *packets]]
    decoder = Decoder()
    cuts = sorted(data.draw(st.lists(st.integers(0, sum(map(len, encoded))), max_size=4)))
    whole = b"".join(encoded)
    decoded: list[Packet] = []
    for start, stop in zip([0, *cuts], [*cuts, len(whole)], strict=True):
        decoded += decoder.feed(whole[start:stop])
    assert decoded == [connect, *packets]


def fuzz_feed(decoder: Decoder, chunks: Sequence[bytes]) -> tuple[list[Packet], int | None]:
    """Feed chunks; return the packets and the reason code of the error, if any."""
    packets: list[Packet] = []
    error: ProtocolError | None = None
    with time_limit(5):
        try:
            for chunk in chunks:
                got = decoder.feed(chunk)
                assert isinstance(got, list)
                assert all(isinstance(p, PACKET_TYPES) for p in got)
                packets += got
        except ProtocolError as exc:
            error = exc
    if error is None:
        return packets, None
    assert error.reason_code in REASON_CODES_RAISED
    with pytest.raises(ProtocolError):
        decoder.feed(b"\xc0\x00")
    return packets, error.reason_code


def check_fuzz_input(prefix: bytes, data: bytes, cuts: list[int]) -> None:
    whole_packets, whole_error = fuzz_feed(Decoder(), [prefix + data])
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    chunks = [prefix] + [data[a:b] for a, b in itertools.pairwise(bounds)]
    split_packets, split_error = fuzz_feed(Decoder(), chunks)
    # However the bytes are split, the outcome is the same.
    assert split_error == whole_error
    if whole_error is None:
        assert split_packets == whole_packets


CONNECT_PREFIXES = st.sampled_from(
    [b"", encode_connect("f", 4), encode_connect("f", 5, properties={"authentication_method": "M"})]
)


@FUZZ
@given(prefix=CONNECT_PREFIXES, data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=5))
def test_hypothesis_fuzz_arbitrary_bytes(prefix: bytes, data: bytes, cuts: list[int]) -> None:
    check_fuzz_input(prefix, data, cuts)


@FUZZ
@given(
    data=st.data(),
    version=st.sampled_from([4, 5]),
    mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
)
def test_hypothesis_fuzz_mutated_valid_streams(
    data: st.DataObject, version: int, mutations: list[tuple[int, int]], cuts: list[int]
) -> None:
    packets = data.draw(st.lists(client_packets(version), min_size=1, max_size=4))
    prefix = encode_connect("f", version, properties={"authentication_method": "M"} if version == 5 else None)
    body = bytearray(b"".join(encode_client_packet(p, version) for p in packets))
    for index, value in mutations:
        body[index % len(body)] = value
    check_fuzz_input(prefix, bytes(body), cuts)


def test_fuzz_harness_detects_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(self: Decoder, data: bytes) -> list[Packet]:
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(Decoder, "_decode", hang)
    with pytest.raises(TimeoutError), time_limit(0.2):
        Decoder().feed(b"\x10")


# --------------------------------------------------------------------------
# Cross-check against an independent implementation: a real paho-mqtt client.


def serve_one_connection(listener: socket.socket) -> tuple[list[Packet], bytes]:
    """A minimal MQTT server: decode with Decoder, answer with the encoders."""
    packets: list[Packet] = []
    raw = bytearray()
    version = 4
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        decoder = Decoder()
        while True:
            data = conn.recv(65536)
            if not data:
                return packets, bytes(raw)
            raw += data
            for packet in decoder.feed(data):
                packets.append(packet)
                match packet:
                    case Connect():
                        version = packet.protocol_level
                        props = {"receive_maximum": 20, "topic_alias_maximum": 0} if version == 5 else None
                        conn.sendall(encode_connack(False, 0, version, props))
                    case Publish(qos=1):
                        conn.sendall(encode_puback(packet.packet_id, version))
                    case Publish(qos=2):
                        conn.sendall(encode_pubrec(packet.packet_id, version))
                    case Pubrel():
                        conn.sendall(encode_pubcomp(packet.packet_id, version))
                    case Subscribe():
                        conn.sendall(encode_suback(packet.packet_id, [o & 3 for _, o in packet.subscriptions], version))
                        user: Properties = {"user_property": [("origin", "test")]}
                        conn.sendall(
                            encode_publish("cmd/reboot", b"now", 1, 1, False, version, user if version == 5 else None)
                        )
                    case Unsubscribe():
                        conn.sendall(encode_unsuback(packet.packet_id, [0] * len(packet.topic_filters), version))
                    case Pingreq():
                        conn.sendall(encode_pingresp())
                    case Disconnect():
                        return packets, bytes(raw)


@pytest.mark.parametrize("version", [4, 5])
def test_real_paho_client_over_loopback(version: int) -> None:
    paho = pytest.importorskip("paho.mqtt.client")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties as PahoProperties

    seen: dict[str, Any] = {}
    events = {name: threading.Event() for name in ("connected", "subscribed", "message", "unsubscribed")}

    def on_connect(client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        seen["connect"] = (reason_code.is_failure, getattr(properties, "ReceiveMaximum", None))
        events["connected"].set()

    def on_subscribe(client: Any, userdata: Any, mid: int, reason_codes: list[Any], properties: Any) -> None:
        seen["granted"] = [rc.value for rc in reason_codes]
        events["subscribed"].set()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        user = getattr(message.properties, "UserProperty", None) if version == 5 else None
        seen["message"] = (message.topic, message.payload, message.qos, user)
        events["message"].set()

    def on_unsubscribe(client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        events["unsubscribed"].set()

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    with listener, ThreadPoolExecutor(max_workers=1) as pool:
        server = pool.submit(serve_one_connection, listener)
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"paho-v{version}",
            protocol=paho.MQTTv5 if version == 5 else paho.MQTTv311,
        )
        client.on_connect, client.on_subscribe = on_connect, on_subscribe
        client.on_message, client.on_unsubscribe = on_message, on_unsubscribe
        client.username_pw_set("device-user", "s3cret")
        client.will_set("devices/paho/status", b"offline", qos=1, retain=True)
        connect_props = publish_props = None
        if version == 5:
            connect_props = PahoProperties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = 120
            publish_props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            publish_props.UserProperty = [("sensor", "t-1")]
            publish_props.MessageExpiryInterval = 60
        client.connect("127.0.0.1", listener.getsockname()[1], keepalive=30, properties=connect_props)
        client.loop_start()
        try:
            assert events["connected"].wait(5)
            for qos in (0, 1, 2):
                info = client.publish(TELEMETRY, b'{"qos":%d}' % qos, qos=qos, properties=publish_props)
                info.wait_for_publish(timeout=5)
                assert info.is_published()
            client.subscribe("cmd/#", qos=1)
            assert events["subscribed"].wait(5)
            assert events["message"].wait(5)
            client.unsubscribe("cmd/#")
            assert events["unsubscribed"].wait(5)
            client.disconnect()
        finally:
            client.loop_stop()
        packets, raw = server.result(timeout=10)

    # What paho made of the codec's CONNACK, SUBACK and PUBLISH.
    assert seen["connect"] == (False, 20 if version == 5 else None)
    assert seen["granted"] == [1]
    assert seen["message"] == ("cmd/reboot", b"now", 1, [("origin", "test")] if version == 5 else None)

    # What the codec made of paho's packets.
    connect = packets[0]
    assert isinstance(connect, Connect)
    assert (connect.protocol_level, connect.client_id, connect.keepalive) == (version, f"paho-v{version}", 30)
    assert (connect.username, connect.password, connect.clean_start) == ("device-user", b"s3cret", True)
    assert connect.will is not None
    assert (connect.will.topic, connect.will.payload, connect.will.qos, connect.will.retain) == (
        "devices/paho/status", b"offline", 1, True,
    )  # fmt: skip
    assert connect.session_expiry_interval == (120 if version == 5 else 0)
    publishes_seen = [p for p in packets if isinstance(p, Publish)]
    assert [(p.topic, p.payload, p.qos) for p in publishes_seen] == [
        (TELEMETRY, b'{"qos":%d}' % qos, qos) for qos in (0, 1, 2)
    ]
    assert publishes_seen[0].packet_id == 0
    assert all(p.packet_id > 0 for p in publishes_seen[1:])
    if version == 5:
        assert all(
            p.properties == {"user_property": [("sensor", "t-1")], "message_expiry_interval": 60}
            for p in publishes_seen
        )
    assert [p.packet_id for p in packets if isinstance(p, Pubrel)] == [publishes_seen[2].packet_id]
    [subscribe] = [p for p in packets if isinstance(p, Subscribe)]
    assert [(f, o & 3) for f, o in subscribe.subscriptions] == [("cmd/#", 1)]
    assert [p.packet_id for p in packets if isinstance(p, Puback)] == [1]  # paho acked our PUBLISH
    assert [p.topic_filters for p in packets if isinstance(p, Unsubscribe)] == [["cmd/#"]]
    assert packets[-1] == Disconnect()
    # The same bytes fed one at a time decode to the same packets.
    assert feed_bytewise(Decoder(), raw) == packets
