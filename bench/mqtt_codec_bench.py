"""Micro-benchmark: MQTT PUBLISH decoding and PUBACK encoding, packets per second.

Decodes N QoS 1 PUBLISH packets (topic ``v1/devices/me/telemetry``, ~120-byte
JSON payload) from one buffer and encodes N PUBACKs, for Isthmus's codec and
for every candidate library that is importable; the others are skipped.  The
input bytes are built here with ``struct``, independently of every codec, and
each codec's first and last decoded packet are checked before timing.

    python bench/mqtt_codec_bench.py [--packets N] [--runs R]

Prints one line per codec: median decode rate, median PUBACK encode rate, and
the per-packet cost of decode + acknowledge.  Rates are per second of this
process's CPU time, and the codecs take turns within every run, so that other
load on the machine skews the comparison as little as possible.  Candidates (optional):
``mqtt5`` (MQTT 5 only), ``amqtt``, ``gmqtt``, ``mqtt-codec`` (3.1.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import io
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

TOPIC = "v1/devices/me/telemetry"
PAYLOAD = (
    b'{"ts":1718000000000,"values":{"temperature":21.53,"humidity":48.2,'
    b'"pressure":1013.25,"battery":87,"rssi":-67,"status":"ok"}}'
)
CHUNK = 1460  # one TCP segment's worth, for the chunked-feed variant


def packet_ids(n: int) -> list[int]:
    return [i % 65535 + 1 for i in range(n)]


def build_publishes(n: int, version: int) -> bytes:
    """N QoS 1 PUBLISHes, built without any codec."""
    topic = TOPIC.encode()
    props = b"\x00" if version == 5 else b""
    parts = []
    for pid in packet_ids(n):
        body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", pid) + props + PAYLOAD
        rl = len(body)
        header = bytes((0x32, rl)) if rl < 128 else bytes((0x32, rl & 0x7F | 0x80, rl >> 7))
        parts.append(header + body)
    return b"".join(parts)


def build_connect(version: int) -> bytes:
    body = b"\x00\x04MQTT" + bytes((version, 0x02)) + b"\x00\x3c"
    if version == 5:
        body += b"\x00"
    body += b"\x00\x05bench"
    return bytes((0x10, len(body))) + body


# Each codec is (name, version, setup) where setup() returns
# (decode(buffer) -> list of (topic, payload, packet_id), encode_puback(packet_id) -> bytes).
Decode = Callable[[bytes], list[tuple[str, bytes, int]]]
EncodeAck = Callable[[int], bytes]


def isthmus_codec(version: int, chunked: bool = False) -> tuple[Decode, EncodeAck]:
    try:
        from isthmus.sources import mqtt_codec
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
        from isthmus.sources import mqtt_codec

    connect = build_connect(version)

    def decode(buf: bytes) -> list[Any]:
        decoder = mqtt_codec.Decoder(max_packet_size=1 << 20)
        decoder.feed(connect)
        if not chunked:
            return decoder.feed(buf)
        out: list[Any] = []
        for i in range(0, len(buf), CHUNK):
            out += decoder.feed(buf[i : i + CHUNK])
        return out

    def encode(pid: int) -> bytes:
        return mqtt_codec.encode_puback(pid, version)

    return decode, encode


def mqtt5_codec() -> tuple[Decode, EncodeAck]:
    import mqtt5

    def decode(buf: bytes) -> list[Any]:
        view = memoryview(buf)
        out = []
        offset = 0
        end = len(buf)
        read = mqtt5.read
        while offset < end:
            packet, size = read(view[offset:])
            out.append(packet)
            offset += size
        return out

    def encode(pid: int) -> bytes:
        return mqtt5.PubAckPacket(pid).write()

    return decode, encode


def amqtt_codec() -> tuple[Decode, EncodeAck]:
    from amqtt.adapters import BufferReader
    from amqtt.mqtt.puback import PubackPacket
    from amqtt.mqtt.publish import PublishPacket

    async def decode_all(buf: bytes) -> list[Any]:
        reader = BufferReader(buf)
        out = []
        end = len(buf)
        # BufferReader wraps io.BytesIO; its position tells when the buffer is used up.
        stream = reader._stream
        while stream.tell() < end:
            out.append(await PublishPacket.from_stream(reader))
        return out

    def decode(buf: bytes) -> list[Any]:
        return asyncio.run(decode_all(buf))

    def encode(pid: int) -> bytes:
        return bytes(PubackPacket.build(pid).to_bytes())

    return decode, encode


def gmqtt_codec() -> tuple[Decode, EncodeAck]:
    # gmqtt is a client: its PUBLISH parsing lives in the connection handler and
    # cannot run without one, so only its framing step is measured here (a
    # lower bound on its decoding cost); packets are (command, body) pairs.
    from gmqtt.mqtt.constants import MQTTCommands
    from gmqtt.mqtt.package import CommandWithMidPacket
    from gmqtt.mqtt.protocol import MQTTProtocol

    def decode(buf: bytes) -> list[Any]:
        out: list[Any] = []
        stub = SimpleNamespace(_connection=SimpleNamespace(put_package=out.append))
        MQTTProtocol._read_packet(stub, buf)
        return out

    def encode(pid: int) -> bytes:
        return CommandWithMidPacket.build_package(MQTTCommands.PUBACK, pid, False, proto_ver=4)

    return decode, encode


def mqtt_codec_codec() -> tuple[Decode, EncodeAck]:
    from mqtt_codec.packet import MqttPuback, MqttPublish

    def decode(buf: bytes) -> list[Any]:
        stream = io.BytesIO(buf)
        end = len(buf)
        out = []
        while stream.tell() < end:
            out.append(MqttPublish.decode(stream)[1])
        return out

    def encode(pid: int) -> bytes:
        stream = io.BytesIO()
        MqttPuback(pid).encode(stream)
        return stream.getvalue()

    return decode, encode


def fields(packet: Any) -> tuple[str, bytes, int]:
    """(topic, payload, packet id) of a decoded packet, whatever its library."""
    if hasattr(packet, "variable_header"):  # amqtt
        return packet.variable_header.topic_name, bytes(packet.payload.data), packet.variable_header.packet_id
    if hasattr(packet, "cmd"):  # gmqtt framing: raw body
        return TOPIC, packet.data[-len(PAYLOAD) :], struct.unpack(">H", packet.data[25:27])[0]
    return packet.topic, bytes(packet.payload), packet.packet_id


CODECS: list[tuple[str, int, str | None, Callable[[], tuple[Decode, EncodeAck]]]] = [
    ("isthmus", 4, None, lambda: isthmus_codec(4)),
    ("isthmus", 5, None, lambda: isthmus_codec(5)),
    ("isthmus, 1460-byte feeds", 4, None, lambda: isthmus_codec(4, chunked=True)),
    ("mqtt5", 5, "mqtt5", mqtt5_codec),
    ("amqtt", 4, "amqtt", amqtt_codec),
    ("gmqtt (framing only)", 4, "gmqtt", gmqtt_codec),
    ("mqtt-codec", 4, "mqtt_codec", mqtt_codec_codec),
]


def time_once(decode: Decode, encode: EncodeAck, buf: bytes, ids: list[int]) -> tuple[float, float]:
    """CPU seconds (this process only) to decode ``buf`` and to encode one PUBACK per id."""
    gc.collect()
    start = time.process_time()
    decode(buf)
    decode_s = time.process_time() - start
    gc.collect()
    start = time.process_time()
    for pid in ids:
        encode(pid)
    return decode_s, time.process_time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    n: int = args.packets
    ids = packet_ids(n)
    buffers = {4: build_publishes(n, 4), 5: build_publishes(n, 5)}
    print(
        f"# {n} QoS 1 PUBLISH ({len(buffers[4]) // n} bytes each in 3.1.1, topic {TOPIC!r}, "
        f"{len(PAYLOAD)}-byte payload), median of {args.runs} runs, process CPU time, "
        f"Python {sys.version.split()[0]}"
    )
    ready: list[tuple[str, int, Decode, EncodeAck]] = []
    for name, version, module, setup in CODECS:
        label = f"{name} [MQTT {'5.0' if version == 5 else '3.1.1'}]"
        if module is not None and importlib.util.find_spec(module) is None:
            print(f"{label:44} skipped: {module} not installed")
            continue
        decode, encode = setup()
        decoded = decode(buffers[version])
        expected_ack = struct.pack(">BBH", 0x40, 2, ids[-1])
        if len(decoded) != n or fields(decoded[0]) != (TOPIC, PAYLOAD, 1):
            print(f"{label:44} skipped: decoded {len(decoded)} packets, first {decoded[:1]!r}")
        elif fields(decoded[-1])[2] != ids[-1] or encode(ids[-1]) != expected_ack:
            print(f"{label:44} skipped: wrong last packet or PUBACK bytes")
        else:
            ready.append((label, version, decode, encode))
    # Round-robin over the codecs in every run, so that load from other
    # processes spreads over all of them instead of skewing one.
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in ready}
    for _ in range(args.runs):
        for label, version, decode, encode in ready:
            times[label].append(time_once(decode, encode, buffers[version], ids))
    for label, *_ in ready:
        decode_s = statistics.median(t[0] for t in times[label])
        encode_s = statistics.median(t[1] for t in times[label])
        print(
            f"{label:44} decode {n / decode_s:>10,.0f} pkt/s   encode PUBACK {n / encode_s:>10,.0f} pkt/s"
            f"   decode+ack {(decode_s + encode_s) / n * 1e6:6.2f} us/pkt"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
