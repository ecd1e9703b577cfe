"""The ingest benchmarks of Isthmus (``make bench``): HTTP against Starlette, MQTT against mosquitto and nats-server.

    .venv/bin/python bench/run.py [--suite http,mqtt] [--duration 10] [--reps 3] [--devices 1000] [--conns 64]
                                  [--rate 2000] [--only isthmus|reference] [--skip-latency] [--keep]
                                  [--mqtt-duration 5] [--mqtt-reps N] [--mqtt-conns 1000] [--mqtt-inflight 10]
                                  [--mqtt-rate 10000] [--idle-conns 10000] [--idle-hold 5] [--profile FILE]

The suites run one after the other, each with its own servers. The HTTP suite (this file):

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

The MQTT suite is ``bench/mqtt_bench.py`` (its generator ``bench/mqtt_load.py``): idle connections,
QoS 1 saturation, QoS 1 at a fixed rate and QoS 0 saturation against mosquitto and nats-server.

Progress goes to stderr; RESULT lines, the tables and the notes to stdout. Everything runs on
127.0.0.1, every wait is bounded, and every server is stopped with SIGTERM at the end (Isthmus
must exit with status 0 within 10 s). See ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

import mqtt_bench
from common import (
    BENCH_DIR,
    BUSY_OTHER_CPU,
    DASH,
    HOST,
    STOP_TIMEOUT_S,
    TIMES,
    TIMESERIES_SINK,
    BenchError,
    Server,
    cell,
    clean_env,
    commit_stats,
    cpu_shares,
    cpu_snapshot,
    fmt_value,
    free_port,
    get_sinks,
    journal_metrics,
    log,
    machine_line,
    median_of,
    mgmt_client,
    numbers,
    start_isthmus,
    stop_server,
    system_busy_seconds,
    wait_drained,
    wait_until_ready,
)

WRK_SCRIPT = BENCH_DIR / "wrk_post.lua"
LOAD_CLIENT = BENCH_DIR / "http_load.py"
BODY = '{"temperature":21.5,"humidity":60,"battery":4.1,"rssi":-67,"fw":"1.4.2","seq":1234567}'
POINTS_PER_MESSAGE = len(json.loads(BODY))
TOKEN_FORMAT = "tok-%06d"
NAME_FORMAT = "bench-%06d"
WARMUP_S = 2
LATENCY_WARMUP_S = 1.0
PROVISION_CONCURRENCY = 16
PROVISION_ATTEMPTS = 4
TARGETS = ("reference", "isthmus")
SUITES = ("http", "mqtt")


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


# ----------------------------------------------------------------------------- Isthmus management API


async def provision(server: Server, devices: int, retries: list[str]) -> list[tuple[int, int]]:
    """Create ``devices`` physical + logical devices and map them; return their (p_uid, l_uid).

    A 503 (registry unavailable, e.g. "database is locked") is retried after 0.5, 1, 2 s; each
    retry is appended to ``retries`` so that the run reports it.
    """
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    limits = httpx.Limits(max_connections=PROVISION_CONCURRENCY)
    uids: list[tuple[int, int]] = [(0, 0)] * devices
    pending = iter(range(1, devices + 1))

    async with httpx.AsyncClient(
        base_url=server.url, headers=headers, limits=limits, timeout=30.0, trust_env=False
    ) as client:

        async def create(path: str, body: dict[str, Any]) -> dict[str, Any]:
            for attempt in range(PROVISION_ATTEMPTS):
                response = await client.post(path, json=body)
                if response.status_code == 503 and attempt + 1 < PROVISION_ATTEMPTS:  # documented: retry later
                    retries.append(f"{response.status_code} {response.text[:200]}")
                    await asyncio.sleep(0.5 * 2**attempt)
                    continue
                if response.status_code != 201:
                    raise BenchError(f"POST {path} {body} -> {response.status_code} {response.text[:300]}")
                break
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


def cpu_us_per_request(row: dict[str, Any]) -> float | None:
    cpu, rps = row.get("server_cpu"), row.get("rps")
    if not isinstance(cpu, int | float) or not isinstance(rps, int | float) or rps <= 0:
        return None
    return cpu / 100 / rps * 1e6


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


def comma_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", type=comma_list(SUITES), default=list(SUITES), help="http,mqtt (default both)")
    ap.add_argument("--duration", type=int, default=10, help="HTTP: measured seconds per run (default 10)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every run (default 3)")
    ap.add_argument("--devices", type=int, default=1000, help="HTTP: devices provisioned and cycled over (1000)")
    ap.add_argument("--conns", type=int, default=64, help="HTTP: keep-alive connections (default 64)")
    ap.add_argument("--rate", type=float, default=2000.0, help="HTTP: requests/s of the latency runs (default 2000)")
    ap.add_argument("--only", choices=TARGETS, help="only Isthmus, or only the references (both suites)")
    ap.add_argument("--skip-latency", action="store_true", help="HTTP: skip the fixed-rate latency runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (Isthmus's data, logs)")
    mqtt = ap.add_argument_group("MQTT suite")
    mqtt.add_argument("--mqtt-duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    mqtt.add_argument("--mqtt-reps", type=int, default=None, help="repetitions (default: --reps)")
    mqtt.add_argument("--mqtt-conns", type=int, default=1000, help="connections of the loaded runs (default 1000)")
    mqtt.add_argument("--mqtt-inflight", type=int, default=10, help="QoS 1 PUBLISHes in flight per connection (10)")
    mqtt.add_argument("--mqtt-rate", type=float, default=10000.0, help="msg/s of the QoS 1 latency runs (10000)")
    mqtt.add_argument("--idle-conns", type=int, default=10000, help="idle connections (default 10000; 0: skip)")
    mqtt.add_argument("--idle-hold", type=float, default=5.0, help="seconds the idle connections are held (5)")
    mqtt.add_argument("--mqtt-targets", type=comma_list(mqtt_bench.TARGETS), default=list(mqtt_bench.TARGETS),
                      help="mosquitto,nats,isthmus (default all)")  # fmt: skip
    mqtt.add_argument("--mqtt-loads", type=comma_list(mqtt_bench.LOADS), default=list(mqtt_bench.LOADS),
                      help="idle,qos1,rate,qos0 (default all)")  # fmt: skip
    mqtt.add_argument("--profile", type=Path, default=None,
                      help="then profile Isthmus under QoS 1 saturation with py-spy into this file")  # fmt: skip
    args = ap.parse_args(argv)
    if args.mqtt_reps is None:
        args.mqtt_reps = args.reps
    if not 1 <= args.duration <= 600 or not 1 <= args.reps <= 50 or not 1 <= args.mqtt_reps <= 50:
        ap.error("need 1 <= --duration <= 600, 1 <= --reps <= 50 and 1 <= --mqtt-reps <= 50")
    if not 1 <= args.devices <= 1_000_000 or not 1 <= args.conns <= 10_000 or not 0 < args.rate <= 1_000_000:
        ap.error("need 1 <= --devices <= 1e6, 1 <= --conns <= 10000, 0 < --rate <= 1e6")
    if not 0 < args.mqtt_duration <= 600 or not 1 <= args.mqtt_conns <= 20_000 or not 1 <= args.mqtt_inflight <= 1000:
        ap.error("need 0 < --mqtt-duration <= 600, 1 <= --mqtt-conns <= 20000, 1 <= --mqtt-inflight <= 1000")
    if not 0 < args.mqtt_rate <= 1_000_000 or not 0 <= args.idle_conns <= 20_000 or not 0 < args.idle_hold <= 600:
        ap.error("need 0 < --mqtt-rate <= 1e6, 0 <= --idle-conns <= 20000, 0 < --idle-hold <= 600")
    if args.only == "isthmus":
        args.mqtt_targets = ["isthmus"]
    elif args.only == "reference":
        args.mqtt_targets = [t for t in args.mqtt_targets if t != "isthmus"] or list(mqtt_bench.REFERENCES)
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = ["python", "bench/run.py"]
    if args.suite != list(SUITES):
        parts += ["--suite", ",".join(args.suite)]
    if "http" in args.suite:
        parts += [
            "--duration", str(args.duration), "--reps", str(args.reps), "--devices", str(args.devices),
            "--conns", str(args.conns), "--rate", f"{args.rate:g}",
        ]  # fmt: skip
        if args.skip_latency:
            parts.append("--skip-latency")
    if "mqtt" in args.suite:
        parts += mqtt_bench.command_parts(args)
    if args.only:
        parts += ["--only", args.only]
    return shlex.join(parts)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_http(args: argparse.Namespace, workdir: Path) -> Bench:
    """The HTTP suite: Isthmus and the Starlette reference, saturation and fixed rate, alternating."""
    targets = [t for t in TARGETS if args.only in (None, t)]
    bench = Bench(args, {})
    try:
        if "isthmus" in targets:
            log(f"starting Isthmus (data in {workdir / 'data'})")
            isthmus = start_isthmus(workdir)
            bench.servers["isthmus"] = isthmus
            t0 = time.monotonic()
            retries: list[str] = []
            uids = asyncio.run(provision(isthmus, args.devices, retries))
            took = time.monotonic() - t0
            if retries:
                bench.notes.append(
                    f"provisioning through the management API needed {len(retries)} retries after a 503; "
                    f"the first: {retries[0]}"
                )
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
        bench.notes.append(f"HTTP suite aborted: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        bench.failed = True
        bench.notes.append("interrupted: the HTTP figures are incomplete")
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
    busy = [r for r in bench.results if (r.get("other_cpu") or 0) > BUSY_OTHER_CPU]
    if busy:
        worst = max(r["other_cpu"] for r in busy)
        bench.notes.append(
            f"in {len(busy)} of {len(bench.results)} HTTP runs other processes used more than {BUSY_OTHER_CPU} % of "
            f"a core (up to {worst:.0f} %): the machine was not idle, those figures are low and noisy"
        )
    return bench


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "http" in args.suite and shutil.which("wrk") is None:
        print("wrk not found: run 'make system-deps' (Debian package wrk)", file=sys.stderr)
        return 2
    if "mqtt" in args.suite and (missing := mqtt_bench.check_tools(args.mqtt_targets)):
        print(missing, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0, busy0 = time.monotonic(), system_busy_seconds()
    time.sleep(1.0)
    idle_check = 100 * (system_busy_seconds() - busy0) / (time.monotonic() - t0)
    loadavg += f"; {idle_check:.0f} % of a core busy just before"
    if idle_check > BUSY_OTHER_CPU:
        log(f"warning: the machine is busy ({idle_check:.0f} % of a core in use before the start); figures will be low")
    workdir = Path(tempfile.mkdtemp(prefix="isthmus-bench-"))
    command = command_line(args)
    http: Bench | None = None
    mqtt: mqtt_bench.MqttBench | None = None
    try:
        if "http" in args.suite:
            http = run_http(args, workdir)
        if "mqtt" in args.suite:
            mqtt = mqtt_bench.run_suite(args, workdir)
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    notes: list[str] = []
    if http is not None:
        if http.results:
            print("\n### HTTP\n" + summary(http, command, loadavg), flush=True)
        notes += http.notes
    if mqtt is not None:
        if mqtt.results:
            print("\n### MQTT\n" + mqtt_bench.summary(mqtt, command, loadavg), flush=True)
        busy = [r for r in mqtt.results if (r.get("other_cpu") or 0) > BUSY_OTHER_CPU]
        if busy:
            mqtt.notes.append(
                f"in {len(busy)} of {len(mqtt.results)} MQTT runs other processes used more than {BUSY_OTHER_CPU} % "
                f"of a core (up to {max(r['other_cpu'] for r in busy):.0f} %): the machine was not idle"
            )
        notes += mqtt.notes
        if args.profile is not None and args.profile.exists():
            print(f"\nProfile of Isthmus under QoS 1 saturation ({args.profile}):", flush=True)
            for line in mqtt_bench.profile_summary(args.profile):
                print(f"    {line}", flush=True)
    if notes:
        print("\nNotes:", flush=True)
        for note in notes:
            print(f"* {note}", flush=True)
    failed = (http is not None and http.failed) or (mqtt is not None and mqtt.failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
