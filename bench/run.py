"""The HTTP ingest benchmark of Isthmus (``make bench``), against a bare Starlette reference.

    .venv/bin/python bench/run.py [--duration 10] [--reps 3] [--devices 1000] [--conns 64]
                                  [--rate 2000] [--only isthmus|reference] [--skip-latency] [--keep]

1. Starts Isthmus (``python -m isthmus serve``) with a throw-away data directory and the default
   sinks (the SQL timeseries sink ``timeseries``), and the reference (``bench/ref_app.py`` under
   uvicorn, uvloop + httptools, one worker), each on a free loopback port.
2. Provisions ``--devices`` devices in Isthmus through the management API: physical device
   ``bench-%06d`` with token ``tok-%06d``, a logical device of the same name, and a mapping, so
   every message is decoded, mapped and stored as points.
3. Per repetition, alternating reference / Isthmus:
   * saturation: ``wrk -t1 -c<conns> --latency`` with ``bench/wrk_post.lua`` (cycling over every
     device's ``/api/v1/<token>/telemetry``) after a discarded 2 s warm-up; for Isthmus also the
     points the ``timeseries`` sink stored per second, counting the time it took to drain its lag;
   * fixed rate: ``bench/http_load.py --rate <rate>`` (write → response latency well below capacity).
4. Prints one ``RESULT`` line per run and, at the end, a Markdown table (median [min-max] over the
   repetitions) with the machine description and the Isthmus / reference ratios.

Progress goes to stderr; RESULT lines, the table and the notes to stdout. Everything runs on
127.0.0.1, every wait is bounded, and both servers are stopped with SIGTERM at the end (Isthmus
must exit with status 0 within 10 s). See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from http_load import process_cpu_seconds

BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "wrk_post.lua"
LOAD_CLIENT = BENCH_DIR / "http_load.py"
HOST = "127.0.0.1"
BODY = '{"temperature":21.5,"humidity":60,"battery":4.1,"rssi":-67,"fw":"1.4.2","seq":1234567}'
POINTS_PER_MESSAGE = len(json.loads(BODY))
TOKEN_FORMAT = "tok-%06d"
NAME_FORMAT = "bench-%06d"
TIMESERIES_SINK = "timeseries"
WARMUP_S = 2
LATENCY_WARMUP_S = 1.0
PROVISION_CONCURRENCY = 16
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
DRAIN_POLL_S = 0.1
TARGETS = ("reference", "isthmus")
BUSY_OTHER_CPU = 20
DASH = "\u2013"  # en dash, as in "median [min-max]"
TIMES = "\u00d7"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark cannot go on (a server did not start, provisioning failed, wrk is missing …)."""


# ----------------------------------------------------------------------------- servers


@dataclass
class Server:
    """One server process under test."""

    target: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    admin_token: str = ""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.target} exited with status {code}; its log ends with:\n{self.log_tail()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env() -> dict[str, str]:
    """This environment without ISTHMUS_* variables, which would override the benchmark's config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ISTHMUS_")}


def http_client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(trust_env=False, timeout=10.0, **kwargs)


def wait_until_ready(server: Server, probe: Callable[[httpx.Client], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with http_client(base_url=server.url) as client:
        while time.monotonic() < deadline:
            server.check_alive()
            with contextlib.suppress(httpx.TransportError):
                if probe(client):
                    return
            time.sleep(0.1)
    raise BenchError(f"{server.target} did not answer within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def start_isthmus(workdir: Path) -> Server:
    data_dir = workdir / "data"
    port = free_port()
    config = workdir / "isthmus.toml"
    # json.dumps gives a valid TOML basic string for any path.
    config.write_text(
        f'data_dir = {json.dumps(str(data_dir))}\n[http]\nhost = "{HOST}"\nport = {port}\n[log]\nlevel = "warning"\n',
        encoding="utf-8",
    )
    log_path = workdir / "isthmus.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "isthmus", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    server = Server("isthmus", proc, port, log_path)
    wait_until_ready(server, lambda c: c.get("/health").status_code == 200)
    token_file = data_dir / "admin.token"
    mode = token_file.stat().st_mode & 0o777
    if mode != 0o600:
        log(f"note: {token_file} has mode {mode:o}, expected 600")
    server.admin_token = token_file.read_text(encoding="utf-8").strip()
    if not server.admin_token:
        raise BenchError(f"{token_file} is empty")
    return server


def start_reference(workdir: Path) -> Server:
    port = free_port()
    log_path = workdir / "reference.log"
    cmd = [
        sys.executable, "-m", "uvicorn", "ref_app:app", "--app-dir", str(BENCH_DIR),
        "--host", HOST, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    server = Server("reference", proc, port, log_path)
    wait_until_ready(
        server,
        lambda c: c.post(f"/api/v1/{TOKEN_FORMAT % 1}/telemetry", content=BODY).status_code == 200,
    )
    return server


def stop_server(server: Server) -> tuple[int | None, float]:
    """SIGTERM, then wait up to 10 s (SIGKILL after that). Returns (exit status or None, seconds)."""
    if server.proc.poll() is not None:
        return server.proc.returncode, 0.0
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = server.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
        server.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=5)
    return code, time.monotonic() - t0


# ----------------------------------------------------------------------------- Isthmus management API


async def provision(server: Server, devices: int) -> list[tuple[int, int]]:
    """Create ``devices`` physical + logical devices and map them; return their (p_uid, l_uid)."""
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    limits = httpx.Limits(max_connections=PROVISION_CONCURRENCY)
    uids: list[tuple[int, int]] = [(0, 0)] * devices
    pending = iter(range(1, devices + 1))

    async with httpx.AsyncClient(
        base_url=server.url, headers=headers, limits=limits, timeout=30.0, trust_env=False
    ) as client:

        async def create(path: str, body: dict[str, Any]) -> dict[str, Any]:
            response = await client.post(path, json=body)
            if response.status_code != 201:
                raise BenchError(f"POST {path} {body} -> {response.status_code} {response.text[:300]}")
            result: dict[str, Any] = response.json()
            return result

        async def worker() -> None:
            for k in pending:
                name, token = NAME_FORMAT % k, TOKEN_FORMAT % k
                physical = await create("/mgmt/physical", {"name": name, "source_name": "http", "token": token})
                if physical.get("token") != token:
                    raise BenchError(f"device {name} got token {physical.get('token')!r}, asked for {token!r}")
                logical = await create("/mgmt/logical", {"name": name})
                await create("/mgmt/mappings", {"p_uid": physical["uid"], "l_uid": logical["uid"]})
                uids[k - 1] = (physical["uid"], logical["uid"])

        await asyncio.gather(*(worker() for _ in range(PROVISION_CONCURRENCY)))
    return uids


_COMMIT_METRICS = re.compile(r"^(isthmus_journal_commit_(?:seconds|records)_(?:sum|count)) (\S+)$", re.M)


def journal_metrics(client: httpx.Client) -> dict[str, float]:
    """The journal's group-commit counters from ``GET /metrics`` (empty if they are not there)."""
    response = client.get("/metrics")
    if response.status_code != 200:
        return {}
    return {name: float(value) for name, value in _COMMIT_METRICS.findall(response.text)}


def commit_stats(m0: dict[str, float], m1: dict[str, float], seconds: float) -> dict[str, float | None]:
    """Group commits per second, mean commit time and mean records per commit between two scrapes."""

    def delta(name: str) -> float | None:
        if name not in m0 or name not in m1:
            return None
        return m1[name] - m0[name]

    commits = delta("isthmus_journal_commit_seconds_count")
    busy = delta("isthmus_journal_commit_seconds_sum")
    records = delta("isthmus_journal_commit_records_sum")
    if not commits or busy is None or records is None:
        return {"commits_per_s": None, "commit_ms": None, "records_per_commit": None}
    return {
        "commits_per_s": commits / seconds,
        "commit_ms": 1000 * busy / commits,
        "records_per_commit": records / commits,
    }


def get_sinks(server: Server, client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get("/mgmt/sinks")
    if response.status_code != 200:
        raise BenchError(f"GET /mgmt/sinks -> {response.status_code} {response.text[:300]}")
    return {s["name"]: s for s in response.json()}


def wait_drained(server: Server, client: httpx.Client, timeout: float, sink: str | None = None) -> float | None:
    """Poll until ``sink`` (or every sink) has lag 0; seconds waited, or None on timeout."""
    t0 = time.monotonic()
    while True:
        server.check_alive()
        sinks = get_sinks(server, client)
        lags = [s["lag"] for name, s in sinks.items() if sink is None or name == sink]
        now = time.monotonic()
        if all(lag == 0 for lag in lags):
            return now - t0
        if now - t0 > timeout:
            return None
        time.sleep(DRAIN_POLL_S)


def mgmt_client(server: Server) -> httpx.Client:
    return http_client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"})


def check_storage(server: Server, l_uid: int) -> None:
    """One message through the whole path: 200, delivered by the sink, queryable as points."""
    with mgmt_client(server) as client:
        before = get_sinks(server, client)[TIMESERIES_SINK]["delivered"]
        r = client.post(f"/api/v1/{TOKEN_FORMAT % 1}/telemetry", content=BODY,
                        headers={"Content-Type": "application/json"})  # fmt: skip
        if r.status_code != 200:
            raise BenchError(f"test message -> {r.status_code} {r.text[:300]}")
        if wait_drained(server, client, 10.0) is None:
            raise BenchError("the test message was not handled by every sink within 10 s")
        sinks = get_sinks(server, client)[TIMESERIES_SINK]
        if sinks["delivered"] != before + 1:
            raise BenchError(f"the test message was not delivered to {TIMESERIES_SINK!r}: {sinks}")
        points = client.get("/mgmt/timeseries", params={"l_uid": l_uid, "limit": 100})
        if points.status_code != 200 or len(points.json()) != POINTS_PER_MESSAGE:
            raise BenchError(f"GET /mgmt/timeseries?l_uid={l_uid} -> {points.status_code} {points.text[:300]}")


# ----------------------------------------------------------------------------- CPU accounting


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    server: float
    children: float
    system_busy: float


def system_busy_seconds() -> float:
    """CPU seconds every core spent not idle since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pid: int) -> CpuSnapshot:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSnapshot(
        wall=time.monotonic(),
        server=process_cpu_seconds(pid) or 0.0,
        children=usage.ru_utime + usage.ru_stime,
        system_busy=system_busy_seconds(),
    )


def cpu_shares(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
    """% of one core between two snapshots: the server, the load generator, everything else."""
    wall = max(b.wall - a.wall, 1e-9)
    server = 100 * (b.server - a.server) / wall
    load = 100 * (b.children - a.children) / wall
    busy = 100 * (b.system_busy - a.system_busy) / wall
    return {"server_cpu": server, "load_cpu": load, "other_cpu": max(0.0, busy - server - load)}


# ----------------------------------------------------------------------------- wrk

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def run_wrk(server: Server, args: argparse.Namespace, duration: int) -> dict[str, Any]:
    """One wrk run; its requests/s, latency percentiles and errors."""
    cmd = [
        "wrk", "-t1", f"-c{args.conns}", f"-d{duration}s", "--latency", "--timeout", "5s",
        "-s", str(WRK_SCRIPT), server.url, "--", str(args.devices), TOKEN_FORMAT, BODY,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration + 60} s") from exc
    out = proc.stdout
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if proc.returncode != 0 or rps is None:
        raise BenchError(f"wrk failed (status {proc.returncode}):\n{proc.stderr.strip()}\n{out.strip()}")
    pcts = {
        int(m[1]): float(m[2]) * _UNIT_MS[m[3]]
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
    }
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out, re.M)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    sock_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True)) if sock else {}
    )
    statuses = re.search(r"^ISTHMUS_NON2XX ?(.*)$", out, re.M)
    if statuses is None:
        raise BenchError(f"wrk printed no ISTHMUS_NON2XX line (is {WRK_SCRIPT} the script?):\n{out}")
    non2xx = {int(code): int(n) for code, n in (p.split(":") for p in statuses[1].split(",") if p)}
    return {
        "rps": float(rps[1]),
        "p50_ms": pcts.get(50),
        "p99_ms": pcts.get(99),
        "requests": int(total[1]) if total else None,
        "errors": sum(non2xx.values()) + sum(sock_errors.values()),
        "non2xx": ",".join(f"{c}:{n}" for c, n in sorted(non2xx.items())),
        "sock_errors": ",".join(f"{k}:{v}" for k, v in sock_errors.items() if v),
    }


# ----------------------------------------------------------------------------- runs


@dataclass
class Bench:
    args: argparse.Namespace
    servers: dict[str, Server]
    results: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    failed: bool = False

    def report(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        print("RESULT " + " ".join(f"{k}={fmt_value(v)}" for k, v in result.items()), flush=True)
        where = f"{result['target']} {result['load']} rep {result['rep']}"
        if result.get("errors"):
            self.failed = True
            self.notes.append(
                f"{where}: {result['errors']} errors (non2xx={result.get('non2xx') or '-'}, "
                f"sock_errors={result.get('sock_errors') or '-'})"
            )
        if result.get("dead_lettered"):
            self.failed = True
            self.notes.append(f"{where}: {result['dead_lettered']} records dead-lettered by {TIMESERIES_SINK!r}")
        if result.get("skipped"):
            self.failed = True
            self.notes.append(f"{where}: {result['skipped']} records skipped by {TIMESERIES_SINK!r} (unmapped?)")
        if result.get("drain_s") == "timeout":
            self.failed = True
            self.notes.append(f"{where}: the {TIMESERIES_SINK!r} sink did not drain its lag in time")
        if result["load"] == "rate" and result["completed"] < 0.99 * self.args.rate * self.args.duration:
            self.notes.append(
                f"{where}: did not sustain {self.args.rate:g} req/s ({result['rps']:.0f} completed/s, "
                f"{result['unsent']} never sent): its latency there is queueing, not service time"
            )

    def base(self, target: str, load: str, rep: int) -> dict[str, Any]:
        a = self.args
        return {"target": target, "load": load, "rep": rep, "conns": a.conns, "devices": a.devices}

    def saturate(self, target: str, rep: int) -> None:
        server = self.servers[target]
        args = self.args
        log(f"rep {rep}: {target}: saturation, warm-up {WARMUP_S} s then {args.duration} s")
        warm = run_wrk(server, args, WARMUP_S)
        if warm["errors"]:
            log(f"warning: warm-up against {target} had errors: {warm}")
        client = mgmt_client(server) if target == "isthmus" else None
        try:
            before: dict[str, Any] = {}
            if client is not None:
                if wait_drained(server, client, self.drain_timeout) is None:
                    log("warning: the sinks did not drain after the warm-up")
                before = get_sinks(server, client)[TIMESERIES_SINK]
            m0 = journal_metrics(client) if client is not None else {}
            c0 = cpu_snapshot(server.pid)
            wrk = run_wrk(server, args, args.duration)
            c1 = cpu_snapshot(server.pid)
            m1 = journal_metrics(client) if client is not None else {}
            server.check_alive()
            result = self.base(target, "saturate", rep)
            result.update(rps=wrk["rps"], p50_ms=wrk["p50_ms"], p99_ms=wrk["p99_ms"], points_per_s=None,
                          errors=wrk["errors"])  # fmt: skip
            result.update(cpu_shares(c0, c1))
            result.update(requests=wrk["requests"], non2xx=wrk["non2xx"], sock_errors=wrk["sock_errors"])
            if client is not None:
                drain = wait_drained(server, client, self.drain_timeout, TIMESERIES_SINK)
                t_end = time.monotonic()
                after = get_sinks(server, client)[TIMESERIES_SINK]
                delivered = after["delivered"] - before["delivered"]
                result["points_per_s"] = delivered * POINTS_PER_MESSAGE / (t_end - c0.wall)
                result.update(
                    drain_s="timeout" if drain is None else drain,
                    delivered=delivered,
                    dead_lettered=after["dead_lettered"] - before["dead_lettered"],
                    skipped=after["skipped"] - before["skipped"],
                    sink_state=after["state"],
                )
                result.update(commit_stats(m0, m1, c1.wall - c0.wall))
                if drain is not None:  # let every other consumer catch up before the next run
                    wait_drained(server, client, self.drain_timeout)
        finally:
            if client is not None:
                client.close()
        self.report(result)

    def fixed_rate(self, target: str, rep: int) -> None:
        server = self.servers[target]
        args = self.args
        log(f"rep {rep}: {target}: {args.rate:g} req/s for {args.duration} s after {LATENCY_WARMUP_S:g} s")
        cmd = [
            sys.executable, str(LOAD_CLIENT), "--host", HOST, "--port", str(server.port),
            "--rate", str(args.rate), "--conns", str(args.conns), "--devices", str(args.devices),
            "--token-format", TOKEN_FORMAT, "--body", BODY, "--duration", str(args.duration),
            "--warmup", str(LATENCY_WARMUP_S), "--server-pid", str(server.pid), "--target", target, "--json",
        ]  # fmt: skip
        client = mgmt_client(server) if target == "isthmus" else None
        try:
            before = get_sinks(server, client)[TIMESERIES_SINK] if client is not None else {}
            m0 = journal_metrics(client) if client is not None else {}
            c0 = cpu_snapshot(server.pid)
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=args.duration + LATENCY_WARMUP_S + 60,
                check=False,
            )
            c1 = cpu_snapshot(server.pid)
            m1 = journal_metrics(client) if client is not None else {}
            server.check_alive()
            lines = proc.stdout.strip().splitlines()
            if not lines:
                raise BenchError(f"http_load.py printed nothing (status {proc.returncode}): {proc.stderr.strip()}")
            load = json.loads(lines[-1])
            result = self.base(target, "rate", rep)
            result.update(rps=load["rps"], p50_ms=load["p50_ms"], p99_ms=load["p99_ms"], points_per_s=None,
                          errors=load["errors"], server_cpu=load["server_cpu"], load_cpu=load["load_cpu"],
                          other_cpu=cpu_shares(c0, c1)["other_cpu"], rate=args.rate,
                          sched_p99_ms=load["sched_p99_ms"], max_ms=load["max_ms"], sent=load["sent"],
                          completed=load["completed"], unsent=load["unsent"], non2xx=load["non2xx"],
                          sock_errors=load["sock_errors"])  # fmt: skip
            if client is not None:
                drain = wait_drained(server, client, self.drain_timeout)
                after = get_sinks(server, client)[TIMESERIES_SINK]
                result.update(
                    drain_s="timeout" if drain is None else drain,
                    dead_lettered=after["dead_lettered"] - before["dead_lettered"],
                    skipped=after["skipped"] - before["skipped"],
                )
                result.update(commit_stats(m0, m1, c1.wall - c0.wall))
        finally:
            if client is not None:
                client.close()
        self.report(result)

    @property
    def drain_timeout(self) -> float:
        return max(60.0, 10.0 * float(self.args.duration))


def fmt_value(value: Any) -> str:
    if value is None or value == "":
        return "na"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


# ----------------------------------------------------------------------------- summary


def fmt_num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def cell(values: Iterable[Any]) -> str:
    nums = numbers(values)
    if not nums:
        return DASH
    med, low, high = fmt_num(statistics.median(nums)), fmt_num(min(nums)), fmt_num(max(nums))
    return med if low == high else f"{med} [{low}{DASH}{high}]"


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    nums = numbers(r.get(key) for r in rows)
    return statistics.median(nums) if nums else None


def cpu_us_per_request(row: dict[str, Any]) -> float | None:
    cpu, rps = row.get("server_cpu"), row.get("rps")
    if not isinstance(cpu, int | float) or not isinstance(rps, int | float) or rps <= 0:
        return None
    return cpu / 100 / rps * 1e6


def machine_line() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nproc = len(os.sched_getaffinity(0))
    versions = []
    for dist in ("uvicorn", "starlette", "uvloop", "httptools", "msgspec"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
    wrk = "wrk ?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        first = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False).stdout
        found = re.search(r"wrk (?:\S+/)?(\d[\w.+~-]*)", first)
        wrk = f"wrk {found[1]}" if found else wrk
    isthmus = importlib.metadata.version("isthmus")
    return (
        f"nproc {nproc}, {model}, Linux {platform.release()}, Python {platform.python_version()}; "
        f"Isthmus {isthmus}, {', '.join(versions)}, {wrk}"
    )


def summary(bench: Bench, command: str, loadavg: str) -> str:
    args = bench.args
    label = {
        "saturate": f"saturating (wrk, {args.conns} conns)",
        "rate": f"{args.rate:,.0f} req/s ({args.conns} conns)",
    }
    reps = "repetitions" if args.reps > 1 else "repetition"
    out = [
        "",
        f"**Machine:** {machine_line()}",
        "",
        f"**Command:** `{command}` (load average before: {loadavg})",
        "",
        f"{args.devices:,} devices; cells are median [min{DASH}max] over {args.reps} {reps}, "
        "reference and Isthmus alternating; CPU in % of one core.",
        "",
        "| target | load | req/s | p50 ms | p99 ms | sched p99 ms | points stored/s | server CPU % | "
        "CPU µs/req | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in bench.results:
        groups.setdefault((r["load"], r["target"]), []).append(r)
    for load in ("saturate", "rate"):
        for target in TARGETS:
            rows = groups.get((load, target))
            if not rows:
                continue
            errors = sum(int(r["errors"] or 0) for r in rows)
            cells = [cell(r.get(key) for r in rows) for key in ("rps", "p50_ms", "p99_ms", "sched_p99_ms")]
            cells += [cell(r.get(key) for r in rows) for key in ("points_per_s", "server_cpu")]
            cells.append(cell(cpu_us_per_request(r) for r in rows))
            out.append(f"| {target} | {label[load]} | {' | '.join(cells)} | {errors} |")
    facts = ratio_lines(groups, args)
    drains = numbers(r.get("drain_s") for r in bench.results if r["load"] == "saturate")
    if drains:
        facts.append(f"Isthmus sink drain after the saturating runs: {cell(drains)} s (in points stored/s).")
    other = numbers(r.get("other_cpu") for r in bench.results)
    if other:
        facts.append(f"Other processes on the machine during the runs: {cell(other)} % of one core.")
    facts += bench.facts
    out += ["", *(f"* {fact}" for fact in facts)]
    return "\n".join(out)


def ratio_lines(groups: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    lines = []
    sat_i, sat_r = groups.get(("saturate", "isthmus")), groups.get(("saturate", "reference"))
    if sat_i and sat_r:
        mi, mr = median_of(sat_i, "rps"), median_of(sat_r, "rps")
        pairs = [i["rps"] / r["rps"] for i in sat_i for r in sat_r if i["rep"] == r["rep"] and r["rps"]]
        if mi is not None and mr:
            spread = f" (per repetition {min(pairs):.2f}{DASH}{max(pairs):.2f})" if len(pairs) > 1 else ""
            lines.append(f"Isthmus / reference, saturated throughput: **{mi / mr:.2f}**{spread}.")
    rate_i, rate_r = groups.get(("rate", "isthmus")), groups.get(("rate", "reference"))
    if rate_i and rate_r:
        parts = []
        for key, name in (("p50_ms", "p50"), ("p99_ms", "p99")):
            mi, mr = median_of(rate_i, key), median_of(rate_r, key)
            if mi is not None and mr:
                parts.append(f"{name} {TIMES}{mi / mr:.1f}")
        ci = statistics.median(numbers(cpu_us_per_request(r) for r in rate_i) or [0.0])
        cr = statistics.median(numbers(cpu_us_per_request(r) for r in rate_r) or [0.0])
        if ci and cr:
            parts.append(f"server CPU per request {TIMES}{ci / cr:.1f}")
        if parts:
            lines.append(f"Isthmus / reference at {args.rate:,.0f} req/s: {', '.join(parts)}.")
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="measured seconds per run (default 10)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every run (default 3)")
    ap.add_argument("--devices", type=int, default=1000, help="devices provisioned and cycled over (default 1000)")
    ap.add_argument("--conns", type=int, default=64, help="keep-alive connections (default 64)")
    ap.add_argument("--rate", type=float, default=2000.0, help="requests/s of the latency runs (default 2000)")
    ap.add_argument("--only", choices=TARGETS, help="measure only this target")
    ap.add_argument("--skip-latency", action="store_true", help="skip the fixed-rate latency runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (Isthmus's data, logs)")
    args = ap.parse_args(argv)
    if not 1 <= args.duration <= 600 or not 1 <= args.reps <= 50:
        ap.error("need 1 <= --duration <= 600 and 1 <= --reps <= 50")
    if not 1 <= args.devices <= 1_000_000 or not 1 <= args.conns <= 10_000 or not 0 < args.rate <= 1_000_000:
        ap.error("need 1 <= --devices <= 1e6, 1 <= --conns <= 10000, 0 < --rate <= 1e6")
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = [
        "python", "bench/run.py", "--duration", str(args.duration), "--reps", str(args.reps),
        "--devices", str(args.devices), "--conns", str(args.conns), "--rate", f"{args.rate:g}",
    ]  # fmt: skip
    if args.only:
        parts += ["--only", args.only]
    if args.skip_latency:
        parts.append("--skip-latency")
    return shlex.join(parts)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk not found: run 'make system-deps' (Debian package wrk)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    targets = [t for t in TARGETS if args.only in (None, t)]
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0, busy0 = time.monotonic(), system_busy_seconds()
    time.sleep(1.0)
    idle_check = 100 * (system_busy_seconds() - busy0) / (time.monotonic() - t0)
    loadavg += f"; {idle_check:.0f} % of a core busy just before"
    if idle_check > BUSY_OTHER_CPU:
        log(f"warning: the machine is busy ({idle_check:.0f} % of a core in use before the start); figures will be low")
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-bench-"))
    bench = Bench(args, {})
    try:
        if "isthmus" in targets:
            log(f"starting Isthmus (data in {workdir / 'data'})")
            isthmus = start_isthmus(workdir)
            bench.servers["isthmus"] = isthmus
            t0 = time.monotonic()
            uids = asyncio.run(provision(isthmus, args.devices))
            took = time.monotonic() - t0
            log(f"provisioned {args.devices} devices in {took:.1f} s ({args.devices / took:.0f} devices/s)")
            bench.facts.append(
                f"Provisioning {args.devices:,} devices through the management API ({PROVISION_CONCURRENCY} in "
                f"flight, 3 requests each): {took:.1f} s ({args.devices / took:.0f} devices/s)."
            )
            check_storage(isthmus, uids[0][1])
            log("a test message went through: 200, delivered, stored as points")
        if "reference" in targets:
            log("starting the reference (bench/ref_app.py under uvicorn)")
            bench.servers["reference"] = start_reference(workdir)
        for rep in range(1, args.reps + 1):
            for target in targets:
                bench.saturate(target, rep)
            if not args.skip_latency:
                for target in targets:
                    bench.fixed_rate(target, rep)
    except BenchError as exc:
        log(f"error: {exc}")
        bench.failed = True
        bench.notes.append(f"aborted: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        bench.failed = True
        bench.notes.append("interrupted: the figures are incomplete")
    finally:
        for target, server in bench.servers.items():
            code, took = stop_server(server)
            log(f"{target} stopped: exit status {code} after {took:.1f} s")
            if target == "isthmus":
                bench.facts.append(f"Isthmus on SIGTERM: exit status {code} after {took:.1f} s.")
            if target == "isthmus" and (code != 0 or took > STOP_TIMEOUT_S):
                bench.failed = True
                bench.notes.append(
                    f"Isthmus did not shut down cleanly on SIGTERM: exit status {code} after {took:.1f} s"
                )
            if code not in (0, None) and target == "isthmus":
                log(f"its log ends with:\n{server.log_tail()}")
        if "isthmus" in bench.servers:
            lines = [ln for ln in bench.servers["isthmus"].log_tail(10_000).splitlines() if ln.strip()]
            if lines:
                bench.notes.append(
                    f"Isthmus logged {len(lines)} lines at warning or above; the first: {lines[0][:300]}"
                )
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if bench.results:
        print(summary(bench, command_line(args), loadavg), flush=True)
    busy = [r for r in bench.results if (r.get("other_cpu") or 0) > BUSY_OTHER_CPU]
    if busy:
        worst = max(r["other_cpu"] for r in busy)
        bench.notes.append(
            f"in {len(busy)} of {len(bench.results)} runs other processes used more than {BUSY_OTHER_CPU} % of a "
            f"core (up to {worst:.0f} %): the machine was not idle, those figures are low and noisy"
        )
    if bench.notes:
        print("\nNotes:", flush=True)
        for note in bench.notes:
            print(f"* {note}", flush=True)
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
