"""MQTT 3.1.1 device load generator, loopback only: saturating, fixed-rate and idle connections.

    python bench/mqtt_load.py --port 1883 --mode saturate --qos 1 --conns 1000 --inflight 10 --duration 10
    python bench/mqtt_load.py --port 1883 --mode rate --rate 10000 --conns 1000 --duration 10
    python bench/mqtt_load.py --port 1883 --mode saturate --qos 0 --conns 1000 --duration 10 \\
        --counter-url http://127.0.0.1:8080/metrics --counter 'isthmus_frames_journaled_total{source="mqtt"}'
    python bench/mqtt_load.py --port 1883 --mode idle --conns 10000 --duration 10 --server-pid PID

Device *k* (``--first-device`` … ``--first-device + conns - 1``) is one TCP connection with the
client id ``bench-<k>`` and the MQTT user name ``--token-format % k`` (its access token; no
password), clean session, publishing ``--payload`` (a 120-byte JSON object with six values) to
``v1/devices/me/telemetry``. Every packet is encoded before the clock starts: one buffer holds
the QoS 1 PUBLISH for every packet id, so sending *k* messages is one slice and one ``write``.
One process, one event loop (uvloop when installed), one :class:`asyncio.Protocol` per
connection and no task per connection.

Modes (the clock: connect everything, then ``--warmup`` s unmeasured, then ``--duration`` s measured):

* ``saturate --qos 1``: every connection keeps ``--inflight`` PUBLISHes unacknowledged and sends
  as many new ones as PUBACKs arrive. ``msgs_per_s`` = PUBACKs received in the window;
  ``p50_ms``/``p99_ms`` = publish -> PUBACK of those (queueing: about conns * inflight / rate).
  After the window no new PUBLISH is sent and every outstanding one must be acknowledged within
  ``--timeout`` s (``unacked`` otherwise).
* ``rate`` (QoS 1): ``--rate`` PUBLISHes per second in total on a fixed schedule, round-robin
  over the connections (message *i* is due at ``start + i / rate``, sent in ticks of about 1 ms).
  ``p50_ms``/``p99_ms``/``max_ms`` = publish -> PUBACK of the messages *sent* in the window, acked
  up to ``--timeout`` s later. A connection with ``--inflight`` unacknowledged messages skips its
  turn (``unsent``): the server is not keeping up.
* ``saturate --qos 0``: QoS 0 has no acknowledgement, so every ``--batch`` PUBLISHes are followed
  by a PINGREQ, and each connection keeps ``--window`` such batches unanswered (the PINGRESP
  comes back once the server has read the batch: MQTT handles a connection's packets in order).
  This bounds what sits in socket buffers, so the run measures the server and not the kernel,
  and ``read_per_s`` = messages of the batches answered in the window. With a server-side counter
  (below) ``msgs_per_s`` is that counter's rate over the window; otherwise ``read_per_s`` is.
  ``drain_s``: from the end of the window until every outstanding batch was answered.
* ``idle``: connect ``--conns`` devices with ``--keepalive``, hold them ``--duration`` s (each
  sends a PINGREQ every keepalive / 2 s, spread over the connections), then a PINGREQ round:
  ``alive`` answered it. With ``--server-pid``: the server's resident memory before connecting
  (``rss_base_mb``), at the end (``rss_mb``), its peak while held, and ``rss_per_conn_kb``.

A server-side counter of processed messages, read at both edges of the window, gives
``counter_per_s`` in every mode: ``--counter-sqlite DB`` runs ``--counter-sql`` (default
``SELECT max(seq) FROM records``: Isthmus's journal sequence, i.e. records durably journaled) on a
read-only connection to an SQLite database; ``--counter-url http://127.0.0.1:PORT/metrics`` with
``--counter NAME`` scrapes one Prometheus sample instead (its time is the midpoint of the request,
so it is only as exact as the server is quick to answer).

Connections are opened at most ``--connect-concurrency`` at a time (``connect_s``); failures are
counted by cause (``conn_fail``), CONNACK refusals by return code (``refused``), connections the
server closed during the run as ``dropped``. ``errors`` = all of those + ``unacked`` + unanswered
PINGREQs (+ 1 if the counter could not be scraped); it must be 0. With ``--server-pid`` the
server's CPU over the window is ``server_cpu`` (% of one core, every thread), the generator's own
``load_cpu`` and every other process's ``other_cpu``. At the end every connection sends
DISCONNECT and waits (up to 2 s) for the server to close it. The soft open-file limit is raised
as far as the hard limit allows.

Prints one ``RESULT key=value …`` line (a JSON object with ``--json``). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import re
import resource
import socket
import sqlite3
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from http_load import percentile, process_cpu_seconds

TOPIC = "v1/devices/me/telemetry"
PAYLOAD = (
    '{"temperature":21.53,"humidity":48.25,"pressure":1013.25,"battery_mv":3987,"rssi_dbm":-67,'
    '"firmware":"v1.4.2-rc3+b1707"}'
)
CLIENT_ID_FORMAT = "bench-%06d"
MAX_PACKET_ID = 65535
MAX_DURATION = 600.0
TICK = 0.001  # shortest scheduler sleep (s)
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
CONNACK_CODES = {1: "bad_protocol", 2: "bad_client_id", 3: "unavailable", 4: "bad_credentials", 5: "not_authorized"}


# ----------------------------------------------------------------------------- encoding


def varint(n: int) -> bytes:
    """MQTT variable byte integer (remaining length)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def field16(data: bytes) -> bytes:
    """A length-prefixed MQTT string or binary field."""
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, username: str, keepalive: int) -> bytes:
    """MQTT 3.1.1 CONNECT: clean session, user name, no password, no will."""
    flags = 0x80 | 0x02
    body = field16(b"MQTT") + bytes((4, flags)) + keepalive.to_bytes(2, "big")
    body += field16(client_id.encode()) + field16(username.encode())
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int, packet_id: int = 0) -> bytes:
    """A PUBLISH (no DUP, no retain); ``packet_id`` only for QoS 1."""
    body = field16(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return bytes((0x30 | qos << 1,)) + varint(len(body)) + body


class Qos1Packets:
    """Every QoS 1 PUBLISH of one topic and payload, one per packet id, in a single buffer.

    The ids run 1 … 65535 and then 1 … ``spare`` again, so ``take(first, k)`` (k ≤ spare + 1)
    is always one contiguous slice, wrapping around like the ids do.
    """

    def __init__(self, topic: bytes, payload: bytes, spare: int) -> None:
        self.size = len(publish_packet(topic, payload, 1, 1))
        ids = [*range(1, MAX_PACKET_ID + 1), *range(1, spare + 1)]
        self.data = b"".join(publish_packet(topic, payload, 1, i) for i in ids)

    def take(self, first: int, count: int) -> bytes:
        start = (first - 1) * self.size
        return self.data[start : start + count * self.size]


def next_id(first: int, count: int) -> int:
    """The packet id after ``count`` ids starting at ``first``."""
    return (first + count - 1) % MAX_PACKET_ID + 1


# ----------------------------------------------------------------------------- system figures


def rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` in KiB (VmRSS), None if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def system_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def raise_nofile(needed: int) -> str | None:
    """Raise the soft open-file limit to at least ``needed`` (up to the hard limit); a warning or None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return None
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        return f"open-file limit {target} (hard limit) is below the {needed} needed"
    return None


async def scrape_counter(url: str, name: str, timeout: float) -> tuple[float, float] | None:
    """GET ``url`` (plain HTTP on loopback) and return (value of the sample ``name``, time of the
    scrape: the midpoint of request and response). A missing sample counts as 0; None on error."""
    found = re.fullmatch(r"http://([^/:]+):(\d+)(/.*)?", url)
    if found is None:
        raise ValueError(f"unsupported counter URL {url!r}")
    host, port, path = found[1], int(found[2]), found[3] or "/"
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            raw = await asyncio.wait_for(reader.read(), timeout)
        finally:
            writer.close()
    except (OSError, TimeoutError):
        return None
    t1 = time.perf_counter()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or head[9:12] != b"200":
        return None
    prefix = name.encode() + b" "
    value = 0.0
    for line in body.splitlines():
        if line.startswith(prefix):
            value = float(line[len(prefix) :])
            break
    return value, (t0 + t1) / 2


def query_counter(path: str, sql: str) -> tuple[float, float] | None:
    """Run ``sql`` (one number) on the SQLite database ``path``, read-only: (value, time); None on error."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as conn:
            row = conn.execute(sql).fetchone()
    except sqlite3.Error:
        return None
    t = time.perf_counter()
    return float(row[0] or 0) if row else 0.0, t


async def read_counter(args: argparse.Namespace) -> tuple[float, float] | None:
    if args.counter_sqlite:
        return query_counter(args.counter_sqlite, args.counter_sql)
    return await scrape_counter(args.counter_url, args.counter, args.timeout)


# ----------------------------------------------------------------------------- connections


@dataclass
class Stats:
    """What the connections record while the load runs."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    sent: int = 0  # PUBLISHes handed to the transports, whole run
    acked: int = 0  # PUBACKs (QoS 1) or messages of answered batches (QoS 0), whole run
    done_window: int = 0  # saturation: acks / answered messages received inside the window
    sent_window: int = 0  # fixed rate: sent with a due time inside the window
    acked_sent_window: int = 0  # fixed rate: acks of those
    unsent: int = 0
    dropped: int = 0
    server_packets: Counter[str] = field(default_factory=Counter)


class Client(asyncio.Protocol):
    """One device connection. Parses CONNACK, PUBACK and PINGRESP (and counts anything else)."""

    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[int] = load.loop.create_future()
        self.lost: asyncio.Future[None] = load.loop.create_future()
        self.connected = False
        self.closed = False
        self.buf = b""
        self.inflight = 0  # QoS 1: unacknowledged PUBLISHes; QoS 0: unanswered batches
        self.next_pid = 1
        self.batches: deque[list[float]] = deque()  # QoS 1 saturation: [send time, messages not acked]
        self.sent_at: dict[int, tuple[float, bool]] = {}  # fixed rate: packet id -> (send time, in window)
        self.pong: asyncio.Future[float] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.load.connect_packet(self.index))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        elif self.connected and not self.load.closing:
            self.load.stats.dropped += 1
        if self.pong is not None and not self.pong.done():
            self.pong.set_exception(ConnectionError("closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        n = len(data)
        # Fast paths: nothing but PUBACKs (40 02 id id), or nothing but PINGRESPs (d0 00).
        if n & 3 == 0 and data[0::4].count(0x40) == n >> 2 and data[1::4].count(2) == n >> 2:
            self.on_acks(n >> 2, data)
            return
        if n & 1 == 0 and data[0::2].count(0xD0) == n >> 1 and data[1::2].count(0) == n >> 1:
            self.on_pongs(n >> 1)
            return
        i = 0
        acks = bytearray()
        pongs = 0
        while i + 2 <= n:
            head = data[i]
            length = data[i + 1]
            j = i + 2
            if length & 0x80:
                length &= 0x7F
                shift = 7
                complete = False
                while j < n and shift <= 21:
                    digit = data[j]
                    j += 1
                    length |= (digit & 0x7F) << shift
                    if not digit & 0x80:
                        complete = True
                        break
                    shift += 7
                if not complete:
                    break
            end = j + length
            if end > n:
                break
            kind = head >> 4
            if kind == 4:
                acks += data[i:end]
            elif kind == 13:
                pongs += 1
            elif kind == 2:
                code = data[j + 1] if length >= 2 else 255
                if not self.connack.done():
                    self.connected = code == 0
                    self.connack.set_result(code)
            else:
                self.load.stats.server_packets[f"type{kind}"] += 1
                if kind == 3 and (head >> 1) & 3 and self.transport is not None:  # ack a server PUBLISH
                    topic_len = int.from_bytes(data[j : j + 2], "big")
                    self.transport.write(b"\x40\x02" + data[j + 2 + topic_len : j + 4 + topic_len])
            i = end
        self.buf = data[i:]
        if acks:
            self.on_acks(len(acks) >> 2, bytes(acks))
        if pongs:
            self.on_pongs(pongs)

    # -- load

    def on_acks(self, count: int, acks: bytes) -> None:
        load = self.load
        stats = load.stats
        now = time.perf_counter()
        self.inflight -= count
        stats.acked += count
        if load.measuring:
            stats.done_window += count
        if load.mode == "rate":
            sent_at = self.sent_at
            for k in range(2, len(acks), 4):
                sent = sent_at.pop(acks[k] << 8 | acks[k + 1], None)
                if sent is not None and sent[1]:
                    stats.acked_sent_window += 1
                    stats.latencies.append(now - sent[0])
            return
        # Saturation: acks come back in publish order, so the oldest batch is acknowledged first.
        left = count
        batches = self.batches
        record = load.measuring
        while left and batches:
            batch = batches[0]
            take = min(left, int(batch[1]))
            if record:
                stats.latencies.extend([now - batch[0]] * take)
            left -= take
            batch[1] -= take
            if not batch[1]:
                batches.popleft()
        if load.running:
            self.fill()

    def on_pongs(self, count: int) -> None:
        pong = self.pong
        if pong is not None and not pong.done():  # an explicit ping round (idle mode, the end)
            pong.set_result(time.perf_counter())
            return
        load = self.load
        if load.qos != 0 or load.mode != "saturate":
            return  # keep-alive pings while idle
        messages = count * load.args.batch
        self.inflight -= count
        load.stats.acked += messages
        if load.measuring:
            load.stats.done_window += messages
        if load.running:
            self.fill()

    def fill(self) -> None:
        """Saturation: top the connection up to its window (QoS 1 PUBLISHes or QoS 0 batches)."""
        load = self.load
        if self.transport is None or self.closed:
            return
        if load.qos == 0:
            want = load.args.window - self.inflight
            if want > 0:
                self.transport.write(load.qos0_unit * want)
                self.inflight += want
                load.stats.sent += want * load.args.batch
            return
        want = load.inflight - self.inflight
        if want <= 0:
            return
        first = self.next_pid
        self.transport.write(load.packets.take(first, want))
        self.next_pid = next_id(first, want)
        self.inflight += want
        load.stats.sent += want
        self.batches.append([time.perf_counter(), want])

    def send_one(self, in_window: bool) -> None:
        """Fixed rate: one QoS 1 PUBLISH now."""
        assert self.transport is not None
        pid = self.next_pid
        self.transport.write(self.load.packets.take(pid, 1))
        self.next_pid = next_id(pid, 1)
        self.inflight += 1
        self.load.stats.sent += 1
        if in_window:
            self.load.stats.sent_window += 1
        self.sent_at[pid] = (time.perf_counter(), in_window)

    def ping(self) -> asyncio.Future[float] | None:
        if self.closed or self.transport is None:
            return None
        self.pong = self.load.loop.create_future()
        self.transport.write(PINGREQ)
        return self.pong


# ----------------------------------------------------------------------------- the load


class Load:
    """One run of the generator: connect, load, measure, disconnect."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.mode: str = args.mode
        self.qos: int = 1 if args.mode == "rate" else args.qos
        self.inflight: int = args.inflight
        self.stats = Stats()
        self.running = False
        self.measuring = False
        self.closing = False
        self.window = (0.0, 0.0)
        self.clients: list[Client] = []
        self.conn_fail: Counter[str] = Counter()
        self.refused: Counter[int] = Counter()
        topic, payload = args.topic.encode(), args.payload.encode()
        needs_qos1 = args.mode == "rate" or (args.mode == "saturate" and args.qos == 1)
        self._packets = Qos1Packets(topic, payload, args.inflight) if needs_qos1 else None
        self.qos0_unit = publish_packet(topic, payload, 0) * args.batch + PINGREQ

    @property
    def packets(self) -> Qos1Packets:
        assert self._packets is not None, "QoS 1 packets are built for the QoS 1 modes only"
        return self._packets

    def connect_packet(self, index: int) -> bytes:
        k = self.args.first_device + index
        return connect_packet(CLIENT_ID_FORMAT % k, self.args.token_format % k, self.args.keepalive)

    async def connect_all(self) -> float:
        """Open every connection (bounded concurrency); return the seconds it took."""
        args = self.args
        gate = asyncio.Semaphore(args.connect_concurrency)

        async def one(index: int) -> Client | None:
            async with gate:
                try:
                    _, client = await asyncio.wait_for(
                        self.loop.create_connection(lambda: Client(self, index), args.host, args.port),
                        args.timeout,
                    )
                except TimeoutError:
                    self.conn_fail["tcp_timeout"] += 1
                    return None
                except OSError as exc:
                    self.conn_fail["tcp_" + errno.errorcode.get(exc.errno or 0, type(exc).__name__)] += 1
                    return None
                try:
                    code = await asyncio.wait_for(client.connack, args.timeout)
                except TimeoutError:
                    self.conn_fail["connack_timeout"] += 1
                except ConnectionError:
                    self.conn_fail["closed_before_connack"] += 1
                else:
                    if code == 0:
                        return client
                    self.refused[code] += 1
                if client.transport is not None:
                    client.transport.abort()
                return None

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(args.conns)))
        self.clients = [c for c in results if c is not None]
        return time.perf_counter() - t0

    async def ping_round(self, timeout: float) -> tuple[int, float]:
        """PINGREQ on every open connection: (answered, seconds until the last answer)."""
        t0 = time.perf_counter()
        futures = [f for c in self.clients if (f := c.ping()) is not None]
        if not futures:
            return 0, 0.0
        done, _ = await asyncio.wait(futures, timeout=timeout)
        answered = [f.result() for f in done if not f.exception()]
        return len(answered), (max(answered) - t0) if answered else timeout

    async def schedule_rate(self, start: float, end: float) -> None:
        """Fixed rate: message i is due at ``start + i / rate``, on connection ``i mod conns``."""
        clients = self.clients
        interval = 1.0 / self.args.rate
        measure_from = self.window[0]
        scheduled = 0
        stats = self.stats
        while True:
            now = time.perf_counter()
            if now >= end:
                return
            while (due := start + scheduled * interval) <= now and due < end:
                client = clients[scheduled % len(clients)]
                scheduled += 1
                in_window = due >= measure_from
                if client.closed or client.inflight >= self.inflight:
                    if in_window:
                        stats.unsent += 1
                    continue
                client.send_one(in_window)
            await asyncio.sleep(max(TICK, min(start + scheduled * interval, end) - time.perf_counter()))

    async def hold_idle(self, end: float, sample: Callable[[], None]) -> None:
        """Idle: each connection sends a PINGREQ every keepalive / 2 s, spread evenly; ``sample`` each second."""
        period = max(self.args.keepalive / 2, 0.5)
        clients = self.clients
        start = time.perf_counter()
        step = period / len(clients)
        k = 0
        next_sample = start
        while (now := time.perf_counter()) < end:
            while k * step <= now - start:
                c = clients[k % len(clients)]
                if not c.closed and c.transport is not None:
                    c.transport.write(PINGREQ)
                k += 1
            if now >= next_sample:
                sample()
                next_sample = now + 1.0
            await asyncio.sleep(max(TICK, min(start + k * step, end) - time.perf_counter()))

    async def wait_outstanding(self, timeout: float) -> float:
        """After the window: until nothing is unacknowledged / unanswered (bounded); seconds waited."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if all(c.inflight <= 0 or c.closed for c in self.clients):
                break
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0

    async def disconnect(self) -> None:
        """DISCONNECT everywhere; wait (briefly) for the server to close, so that TIME_WAIT is its."""
        self.closing = True
        for c in self.clients:
            if not c.closed and c.transport is not None:
                c.transport.write(DISCONNECT)
        waiting = [c.lost for c in self.clients if not c.closed]
        if waiting:
            await asyncio.wait(waiting, timeout=2.0)
        for c in self.clients:
            if not c.closed and c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0)


# ----------------------------------------------------------------------------- a run


@dataclass
class Mark:
    """The figures sampled at one edge of the measured window."""

    wall: float
    server_cpu: float
    own_cpu: float
    busy: float
    counter: tuple[float, float] | None = None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(args)
    stats = load.stats
    result: dict[str, Any] = {
        "target": args.target,
        "mode": args.mode,
        "qos": None if args.mode == "idle" else load.qos,
        "conns": args.conns,
    }
    pid = args.server_pid
    rss_base = rss_kib(pid) if pid else None
    rss_peak = rss_base or 0

    def sample_rss() -> None:
        nonlocal rss_peak
        if pid:
            rss_peak = max(rss_peak, rss_kib(pid) or 0)

    connect_s = await load.connect_all()
    result.update(connected=len(load.clients), connect_s=connect_s)
    errors = sum(load.conn_fail.values()) + sum(load.refused.values())
    if not load.clients:
        result.update(msgs_per_s=0, errors=errors)
        return finish(load, result)

    start = time.perf_counter() + 0.05
    measure_from = start + args.warmup
    end = measure_from + args.duration
    load.window = (measure_from, end)

    async def mark(when: float, measuring: bool) -> Mark:
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        load.measuring = measuring
        m = Mark(time.perf_counter(), (process_cpu_seconds(pid) or 0.0) if pid else 0.0, sum(os.times()[:2]),
                 system_busy_seconds())  # fmt: skip
        if args.counter_url or args.counter_sqlite:
            m.counter = await read_counter(args)
        return m

    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    load.running = True
    marks = asyncio.gather(mark(measure_from, True), mark(end, False))
    if args.mode == "saturate":
        for c in load.clients:
            c.fill()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
    elif args.mode == "rate":
        await load.schedule_rate(start, end)
    else:
        await load.hold_idle(end, sample_rss)
    m0, m1 = await marks
    load.running = False
    window = m1.wall - m0.wall

    if args.mode == "idle":
        answered, ping_s = await load.ping_round(args.timeout)
        sample_rss()
        rss_end = rss_kib(pid) if pid else None
        errors += len(load.clients) - answered
        result.update(msgs_per_s=None, alive=answered, ping_s=ping_s, keepalive=args.keepalive,
                      hold_s=args.duration)  # fmt: skip
        if rss_base is not None and rss_end is not None:
            result.update(rss_base_mb=rss_base / 1024, rss_mb=rss_end / 1024, rss_peak_mb=rss_peak / 1024,
                          rss_per_conn_kb=(rss_end - rss_base) / max(answered, 1))  # fmt: skip
    else:
        result["drain_s"] = await load.wait_outstanding(max(args.timeout, 30.0))
        outstanding = sum(max(c.inflight, 0) for c in load.clients if not c.closed)
        errors += outstanding
        if load.qos == 0:
            read_per_s = stats.done_window / args.duration
            result.update(msgs_per_s=read_per_s, read_per_s=read_per_s, sent=stats.sent, batch=args.batch,
                          window=args.window, unanswered=outstanding)  # fmt: skip
        else:
            lat = sorted(x * 1000 for x in stats.latencies)
            done = stats.acked_sent_window if args.mode == "rate" else stats.done_window
            result.update(msgs_per_s=done / args.duration, p50_ms=percentile(lat, 50), p99_ms=percentile(lat, 99),
                          max_ms=lat[-1] if lat else None, acked=stats.acked, sent=stats.sent,
                          unacked=outstanding, inflight=args.inflight)  # fmt: skip
            if args.mode == "rate":
                result.update(rate=args.rate, sent_window=stats.sent_window, unsent=stats.unsent)

    if args.counter_url or args.counter_sqlite:
        c0, c1 = m0.counter, m1.counter
        if c0 is not None and c1 is not None and c1[1] > c0[1]:
            result["counter_per_s"] = (c1[0] - c0[0]) / (c1[1] - c0[1])
            if args.mode == "saturate" and load.qos == 0:
                result["msgs_per_s"] = result["counter_per_s"]
        else:
            result["counter_per_s"] = None
            errors += 1
            stats.server_packets["counter_unreadable"] += 1
    if pid:
        result["server_cpu"] = 100 * (m1.server_cpu - m0.server_cpu) / window
    result["load_cpu"] = 100 * (m1.own_cpu - m0.own_cpu) / window
    busy = 100 * (m1.busy - m0.busy) / window
    result["other_cpu"] = max(0.0, busy - result["load_cpu"] - result.get("server_cpu", 0.0))
    result["errors"] = errors
    await load.disconnect()
    return finish(load, result)


def finish(load: Load, result: dict[str, Any]) -> dict[str, Any]:
    stats = load.stats
    result["errors"] = result.get("errors", 0) + stats.dropped
    result.update(
        dropped=stats.dropped,
        conn_fail=",".join(f"{k}:{v}" for k, v in sorted(load.conn_fail.items())),
        refused=",".join(f"{CONNACK_CODES.get(k, k)}:{v}" for k, v in sorted(load.refused.items())),
        server_packets=",".join(f"{k}:{v}" for k, v in sorted(stats.server_packets.items())),
    )
    return result


# ----------------------------------------------------------------------------- command line


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_value(value: Any) -> str:
    if value is None or value == "":
        return "na"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="a loopback address (nothing else is accepted)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=("saturate", "rate", "idle"), default="saturate")
    ap.add_argument("--qos", type=int, choices=(0, 1), default=1, help="saturate: QoS of the PUBLISHes (default 1)")
    ap.add_argument("--conns", type=int, default=1000, help="connections, one device each (default 1000)")
    ap.add_argument("--first-device", type=int, default=1, help="number of the first device (default 1)")
    ap.add_argument("--token-format", default="tok-%06d", help="printf-style user name of device k (tok-%%06d)")
    ap.add_argument("--inflight", type=int, default=10, help="unacknowledged QoS 1 PUBLISHes per connection")
    ap.add_argument("--rate", type=float, default=10000.0, help="rate: PUBLISHes per second in total")
    ap.add_argument("--batch", type=int, default=16, help="QoS 0: PUBLISHes per PINGREQ (default 16)")
    ap.add_argument("--window", type=int, default=4, help="QoS 0: unanswered batches per connection (default 4)")
    ap.add_argument("--duration", type=float, default=10.0, help=f"measured (idle: held) seconds, max {MAX_DURATION:g}")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before the window (default 2)")
    ap.add_argument("--keepalive", type=int, default=30, help="MQTT keep-alive in seconds (default 30)")
    ap.add_argument("--timeout", type=float, default=10.0, help="s to connect, get a CONNACK, or the last ack")
    ap.add_argument("--connect-concurrency", type=int, default=100, help="connections being opened at once")
    ap.add_argument("--topic", default=TOPIC)
    ap.add_argument("--payload", default=PAYLOAD)
    ap.add_argument("--server-pid", type=int, default=0, help="report this process's CPU and memory")
    ap.add_argument("--counter-url", default="", help="http://127.0.0.1:PORT/metrics to scrape --counter from")
    ap.add_argument("--counter", default='isthmus_frames_journaled_total{source="mqtt"}', help="sample name")
    ap.add_argument("--counter-sqlite", default="", help="SQLite database to read the counter from instead")
    ap.add_argument("--counter-sql", default="SELECT max(seq) FROM records", help="the counter's query")
    ap.add_argument("--target", default="mqtt", help="label for the result")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    if not is_loopback(args.host):
        ap.error(f"refusing host {args.host!r}: this tool only talks to loopback addresses")
    if args.counter_url and not is_loopback(re.sub(r"^http://([^/:]+).*$", r"\1", args.counter_url)):
        ap.error("--counter-url must be http:// on a loopback address")
    if not 1 <= args.conns <= 60_000 or not 1 <= args.inflight <= 1000:
        ap.error("need 1 <= --conns <= 60000, 1 <= --inflight <= 1000")
    if not 1 <= args.batch <= 1000 or not 1 <= args.window <= 100:
        ap.error("need 1 <= --batch <= 1000, 1 <= --window <= 100")
    if not 0 < args.rate <= 1_000_000 or not 0 < args.duration <= MAX_DURATION or not 0 <= args.warmup <= 60:
        ap.error(f"need 0 < --rate <= 1e6, 0 < --duration <= {MAX_DURATION:g}, 0 <= --warmup <= 60")
    if not 0 < args.timeout <= 120 or not 1 <= args.connect_concurrency <= 10_000 or not 0 <= args.keepalive < 65536:
        ap.error("need 0 < --timeout <= 120, 1 <= --connect-concurrency <= 10000, 0 <= --keepalive < 65536")
    try:
        args.token_format % args.first_device
    except (TypeError, ValueError):
        ap.error(f"--token-format {args.token_format!r} must take one integer (e.g. tok-%06d)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warning = raise_nofile(args.conns + 256)
    if warning:
        print(f"mqtt_load: warning: {warning}", file=sys.stderr)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        print("RESULT " + " ".join(f"{k}={format_value(v)}" for k, v in result.items()), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
