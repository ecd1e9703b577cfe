"""Fixed-rate HTTP/1.1 POST load with latency measurement, loopback only.

    python bench/http_load.py --port 8080 --rate 2000 --conns 64 --devices 1000 --duration 10

``--conns`` keep-alive connections (plain ``asyncio.open_connection``) carry ``--rate`` requests
per second in total, sent on a fixed schedule: request *i* is due at ``start + i / rate``. A
request waits in one shared FIFO until a connection is free; each connection has exactly one
request in flight. Request *i* is a POST of ``--body`` to ``/api/v1/<token>/telemetry`` with
``<token> = TOKEN_FORMAT % (i mod devices + 1)``.

Measured for requests *scheduled* inside the window (after ``--warmup``, for ``--duration`` s):

* ``p50_ms`` / ``p99_ms`` / ``max_ms``: from writing the request to having read the complete
  response (status line, headers, ``Content-Length`` body) - the server's latency;
* ``sched_p99_ms``: from the scheduled send time instead, so it also counts the time a request
  waited for a free connection (the client falls behind when the server does) plus the
  scheduler's tick (about 1 ms);
* ``sent`` (written), ``completed`` (2xx responses), ``rps`` = completed / duration,
  ``unsent`` (still queued when the window closed; they are dropped, not sent late).

``errors`` counts everything that went wrong over the whole run, warm-up included: non-2xx
responses (by status in ``non2xx``) and connection failures, timeouts and malformed responses
(``sock_errors``). With ``--server-pid`` the server's CPU over the window is reported as
``server_cpu`` (% of one core, all threads), the client's own as ``load_cpu``.

Prints one ``RESULT key=value …`` line (or a JSON object with ``--json``). Every wait is bounded:
the run ends at most ``--timeout`` + 1 s after the window, whatever the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_BODY = '{"temperature":21.5,"humidity":60,"battery":4.1,"rssi":-67,"fw":"1.4.2","seq":1234567}'
MAX_DURATION = 600.0
MAX_WARMUP = 60.0
TICK = 0.001  # shortest scheduler sleep (s)


class ProtocolError(Exception):
    """The server's response is not something this minimal HTTP/1.1 client understands."""


@dataclass
class Stats:
    """What the connections record while the load runs."""

    latencies: list[float] = field(default_factory=list)
    sched_latencies: list[float] = field(default_factory=list)
    sent: int = 0
    completed: int = 0
    non2xx: Counter[int] = field(default_factory=Counter)
    sock_errors: Counter[str] = field(default_factory=Counter)


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of process ``pid`` (every thread), in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3 of stat(5); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0…100) of an ascending list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def build_requests(host: str, port: int, devices: int, token_format: str, body: bytes) -> list[bytes]:
    """One complete, pre-encoded POST request per device."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    out = []
    for k in range(1, devices + 1):
        path = f"/api/v1/{token_format % k}/telemetry"
        head = (
            f"POST {path} HTTP/1.1\r\n"
            f"Host: {authority}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
        )
        out.append(head.encode("ascii") + body)
    return out


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the server will close the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    status = int(code)
    length: int | None = None
    closing = version == b"HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ProtocolError(f"bad header line {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit():
                raise ProtocolError(f"bad Content-Length {value[:20]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            raise ProtocolError("Transfer-Encoding is not supported by this client")
        elif name == b"connection":
            closing = value.lower() == b"close"
    if length is None:
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        else:
            raise ProtocolError(f"response {status} without Content-Length")
    if length:
        await reader.readexactly(length)
    return status, closing


class Connection:
    """One keep-alive connection that sends queued requests one at a time."""

    def __init__(self, host: str, port: int, timeout: float, stats: Stats) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.stats = stats
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> bool:
        """(Re)open the connection; False (and counted) when that fails."""
        self.close()
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout
            )
        except TimeoutError:
            self.stats.sock_errors["connect_timeout"] += 1
            return False
        except OSError as exc:
            self.stats.sock_errors[f"connect_{type(exc).__name__}"] += 1
            return False
        return True

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def run(
        self,
        queue: asyncio.Queue[tuple[int, float] | None],
        requests: list[bytes],
        window: tuple[float, float],
    ) -> None:
        """Send what the scheduler queues until it queues ``None``."""
        stats = self.stats
        start, end = window
        while (item := await queue.get()) is not None:
            k, due = item
            if self.writer is None and not await self.connect():
                continue
            assert self.reader is not None
            assert self.writer is not None
            in_window = start <= due < end
            sent_at = time.perf_counter()
            try:
                self.writer.write(requests[k])
                if in_window:
                    stats.sent += 1
                status, closing = await asyncio.wait_for(read_response(self.reader), self.timeout)
            except TimeoutError:
                stats.sock_errors["timeout"] += 1
                self.close()
                continue
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError) as exc:
                stats.sock_errors[type(exc).__name__] += 1
                self.close()
                continue
            done = time.perf_counter()
            if closing:
                self.close()
            if not 200 <= status <= 299:
                stats.non2xx[status] += 1
            elif in_window:
                stats.completed += 1
                stats.latencies.append(done - sent_at)
                stats.sched_latencies.append(done - due)
        self.close()


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """Run the schedule; return the result fields."""
    stats = Stats()
    requests = build_requests(args.host, args.port, args.devices, args.token_format, args.body.encode())
    conns = [Connection(args.host, args.port, args.timeout, stats) for _ in range(args.conns)]
    # Open every connection before the clock starts so that connecting is not measured.
    await asyncio.gather(*(c.connect() for c in conns))
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    start = time.perf_counter() + 0.05
    measure_from = start + args.warmup
    end = measure_from + args.duration
    workers = [asyncio.create_task(c.run(queue, requests, (measure_from, end))) for c in conns]

    interval = 1.0 / args.rate
    scheduled = 0
    cpu0: float | None = None
    own0 = 0.0
    t_cpu0 = measure_from
    sampled = False
    while True:
        now = time.perf_counter()
        if not sampled and now >= measure_from:
            sampled = True
            cpu0 = process_cpu_seconds(args.server_pid) if args.server_pid else None
            own0 = sum(os.times()[:2])
            t_cpu0 = now
        if now >= end:
            break
        # Queue every request that is due by now, each stamped with its own due time.
        while (due := start + scheduled * interval) <= now and due < end:
            queue.put_nowait((scheduled % len(requests), due))
            scheduled += 1
        # Sleep until the next request is due, but at least one tick: shorter sleeps would spin the
        # loop (timers have millisecond resolution) and burn a core the server needs.
        await asyncio.sleep(max(TICK, min(start + scheduled * interval, end) - time.perf_counter()))
    cpu1 = process_cpu_seconds(args.server_pid) if args.server_pid else None
    own1 = sum(os.times()[:2])
    t_cpu1 = time.perf_counter()

    unsent = queue.qsize()
    while not queue.empty():
        queue.get_nowait()
    for _ in workers:
        queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=args.timeout + 1.0)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if pending:
        stats.sock_errors["unfinished"] += len(pending)
    for c in conns:
        c.close()

    lat = sorted(x * 1000 for x in stats.latencies)
    sched = sorted(x * 1000 for x in stats.sched_latencies)
    elapsed = t_cpu1 - t_cpu0
    server_cpu = None
    if cpu0 is not None and cpu1 is not None and elapsed > 0:
        server_cpu = 100 * (cpu1 - cpu0) / elapsed
    return {
        "target": args.target,
        "load": "rate",
        "rate": args.rate,
        "conns": args.conns,
        "devices": args.devices,
        "rps": stats.completed / args.duration,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else None,
        "sched_p99_ms": percentile(sched, 99),
        "errors": sum(stats.non2xx.values()) + sum(stats.sock_errors.values()),
        "sent": stats.sent,
        "completed": stats.completed,
        "unsent": unsent,
        "non2xx": ",".join(f"{s}:{n}" for s, n in sorted(stats.non2xx.items())),
        "sock_errors": ",".join(f"{s}:{n}" for s, n in sorted(stats.sock_errors.items())),
        "server_cpu": server_cpu,
        "load_cpu": 100 * (own1 - own0) / elapsed if elapsed > 0 else None,
    }


def format_value(value: Any) -> str:
    """How a value appears in a RESULT line."""
    if value is None or value == "":
        return "na"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1", help="127.0.0.1, localhost or ::1 (nothing else)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=2000.0, help="requests per second in total")
    ap.add_argument("--conns", type=int, default=64, help="keep-alive connections")
    ap.add_argument("--devices", type=int, default=1000, help="device tokens to cycle over")
    ap.add_argument("--token-format", default="tok-%06d", help="printf-style token of device k (1…devices)")
    ap.add_argument("--body", default=DEFAULT_BODY, help="the JSON body of every request")
    ap.add_argument("--duration", type=float, default=10.0, help=f"measured s (max {MAX_DURATION:.0f})")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to connect or get one response")
    ap.add_argument("--server-pid", type=int, default=0, help="report this process's CPU over the window")
    ap.add_argument("--target", default="http", help="label for the RESULT line")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = ap.parse_args(argv)
    if args.host not in LOOPBACK_HOSTS:
        ap.error(f"refusing host {args.host!r}: this tool only talks to 127.0.0.1, localhost or ::1")
    if not (0 < args.rate <= 1_000_000 and 1 <= args.conns <= 10_000 and args.devices >= 1):
        ap.error("need 0 < --rate <= 1e6, 1 <= --conns <= 10000, --devices >= 1")
    if not 0 < args.duration <= MAX_DURATION or not 0 <= args.warmup <= MAX_WARMUP or args.timeout <= 0:
        ap.error(f"need 0 < --duration <= {MAX_DURATION:.0f}, 0 <= --warmup <= {MAX_WARMUP:.0f}, timeout > 0")
    try:
        args.token_format % 1
    except (TypeError, ValueError):
        ap.error(f"--token-format {args.token_format!r} must take one integer (e.g. tok-%06d)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run_load(args))
    else:
        result = uvloop.run(run_load(args))
    if args.json:
        print(json.dumps(result))
    else:
        print("RESULT " + " ".join(f"{k}={format_value(v)}" for k, v in result.items()), flush=True)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
