"""The MQTT suite of ``bench/run.py`` (``--suite mqtt``): Isthmus's MQTT server against mosquitto and nats-server.

Three servers, each a single process on free loopback ports, measured in the same run with the
same generator (``bench/mqtt_load.py``), alternating target by target within every load:

* **mosquitto** (Debian ``mosquitto``): anonymous, no persistence. It only reads and acknowledges.
* **nats** (Debian ``nats-server``): the MQTT listener with JetStream on a store directory in the
  temporary directory, plus a file-backed stream ``TELEMETRY`` on the subject the telemetry
  topic maps to, so every message is written to disk (asynchronously: the PUBACK does not wait
  for it, and JetStream does not fsync per message).
* **isthmus**: ``python -m isthmus serve`` with the ``mqtt`` source on, the default SQL
  timeseries sink, and the devices written into its registry before it starts (physical device
  ``bench-<k>`` with token ``tok-<k>``, a logical device and a mapping each). Its PUBACK waits
  for the journal's group commit (``synchronous = "full"``).

Loads, per repetition and target: ``idle`` (10,000 connected devices with keep-alive: server
RSS), ``qos1`` (QoS 1 saturation, 1,000 connections x 10 in flight), ``rate`` (QoS 1 at a fixed
10,000 messages/s: publish -> PUBACK latency) and ``qos0`` (QoS 0 saturation; for Isthmus the
frames journaled, from ``isthmus_frames_journaled_total`` on ``/metrics``). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert, select

from common import (
    BENCH_DIR,
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
    fmt_num,
    fmt_value,
    free_port,
    get_sinks,
    http_client,
    journal_metrics,
    log,
    machine_line,
    median_of,
    mgmt_client,
    numbers,
    raise_nofile,
    start_isthmus,
    stop_server,
    wait_drained,
    wait_for_port,
    wait_until_ready,
)
from mqtt_load import PAYLOAD, TOPIC

GENERATOR = BENCH_DIR / "mqtt_load.py"
TOKEN_FORMAT = "tok-%06d"
NAME_FORMAT = "bench-%06d"
SOURCE = "mqtt"
POINTS_PER_MESSAGE = len(json.loads(PAYLOAD))
TARGETS = ("mosquitto", "nats", "isthmus")
REFERENCES = ("mosquitto", "nats")
LOADS = ("idle", "qos1", "rate", "qos0")
NATS_STREAM = "TELEMETRY"
NATS_STREAM_BYTES = 2 << 30  # the stream drops its oldest messages beyond 2 GiB
SATURATE_WARMUP_S = 1.0
RATE_WARMUP_S = 1.0
GENERATOR_SLACK_S = 120.0  # connect + drain + disconnect, on top of warm-up and duration
PROFILE_SECONDS = 10

_ISTHMUS_COUNTERS = re.compile(
    r"^(isthmus_(?:frames_(?:received|journaled|rejected|failed)_total|mqtt_publishes_rejected_total|"
    r"mqtt_disconnects_total)\{[^}]*\}) (\S+)$",
    re.M,
)


# ----------------------------------------------------------------------------- servers


@dataclass
class MqttServer:
    """A target of the MQTT suite: its process and the port its MQTT listener is on."""

    name: str
    server: Server
    mqtt_port: int
    monitor_port: int = 0  # nats: the monitoring endpoint (/jsz)
    journal: Path | None = None  # Isthmus: the journal database

    @property
    def pid(self) -> int:
        return self.server.pid


def start_mosquitto(workdir: Path) -> MqttServer:
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"# written by bench/mqtt_bench.py\nlistener {port} {HOST}\nallow_anonymous true\npersistence false\n"
        "max_connections -1\nlog_dest stderr\nlog_type error\nlog_type warning\n",
        encoding="utf-8",
    )
    log_path = workdir / "mosquitto.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            ["mosquitto", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server("mosquitto", proc, port, log_path)
    wait_for_port(server, port)
    return MqttServer("mosquitto", server, port)


def start_nats(workdir: Path) -> MqttServer:
    client_port, mqtt_port, monitor_port = free_port(), free_port(), free_port()
    store = workdir / "nats-store"
    config = workdir / "nats.conf"
    config.write_text(
        f"# written by bench/mqtt_bench.py\nserver_name: isthmus_bench\nlisten: {json.dumps(f'{HOST}:{client_port}')}\n"
        f"http: {json.dumps(f'{HOST}:{monitor_port}')}\nmax_connections: 100000\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n  max_file_store: {2 * NATS_STREAM_BYTES}\n}}\n"
        f"mqtt {{\n  listen: {json.dumps(f'{HOST}:{mqtt_port}')}\n}}\n",
        encoding="utf-8",
    )
    log_path = workdir / "nats.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            ["nats-server", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server("nats", proc, client_port, log_path)
    wait_for_port(server, mqtt_port)
    nats_create_stream(client_port, NATS_STREAM, TOPIC.replace("/", "."))
    return MqttServer("nats", server, mqtt_port, monitor_port)


def nats_create_stream(port: int, name: str, subject: str) -> None:
    """Create a file-backed JetStream stream over the NATS client protocol (no NATS client library needed)."""
    config = json.dumps(
        {
            "name": name,
            "subjects": [subject],
            "storage": "file",
            "retention": "limits",
            "discard": "old",
            "max_bytes": NATS_STREAM_BYTES,
            "num_replicas": 1,
        }
    ).encode()
    inbox = b"_INBOX.isthmus_bench"
    with socket.create_connection((HOST, port), timeout=10) as sock, sock.makefile("rb") as reader:
        if not reader.readline().startswith(b"INFO "):
            raise BenchError("nats-server did not greet with INFO")
        sock.sendall(
            b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB ' + inbox + b" 1\r\n"
            b"PUB $JS.API.STREAM.CREATE." + name.encode() + b" " + inbox + b" %d\r\n%s\r\n" % (len(config), config)
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = reader.readline()
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                reply = json.loads(reader.read(int(line.split()[-1]) + 2))
                if "error" in reply:
                    raise BenchError(f"nats-server refused the stream {name}: {reply['error']}")
                return
            elif line.startswith(b"-ERR") or not line:
                raise BenchError(f"nats-server: {line.decode(errors='replace').strip() or 'connection closed'}")
    raise BenchError("nats-server did not answer the stream creation within 10 s")


def nats_stored(target: MqttServer) -> int | None:
    """Messages JetStream holds (all streams), from the monitoring endpoint."""
    try:
        with http_client() as client:
            return int(client.get(f"http://{HOST}:{target.monitor_port}/jsz").json()["messages"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def provision_registry(data_dir: Path, devices: int) -> None:
    """Write ``devices`` physical devices (with tokens), logical devices and mappings into a new registry.

    One transaction with multi-row INSERTs into the registry's own tables (``isthmus.registry.schema``),
    on the database the server is about to open, after the store has migrated it: the management API
    takes about 15 ms per device (three requests), far too long for 10,000 devices. The result is
    checked through the store's API.
    """
    from isthmus.registry import RegistryStore
    from isthmus.registry.schema import logical_devices, mappings, physical_devices

    store = RegistryStore(f"sqlite:///{data_dir / 'registry.db'}")
    try:
        store.migrate()
        now = datetime.now(UTC)
        names = [NAME_FORMAT % k for k in range(1, devices + 1)]
        with store.engine.begin() as conn:
            conn.execute(
                insert(physical_devices),
                [
                    {
                        "name": name,
                        "source_name": SOURCE,
                        "source_ids": {},
                        "source_key": "{}",
                        "latitude": None,
                        "longitude": None,
                        "last_seen": None,
                        "properties": {},
                        "token": TOKEN_FORMAT % k,
                        "enabled": True,
                        "decoder": None,
                        "created_at": now,
                    }
                    for k, name in enumerate(names, 1)
                ],
            )
            conn.execute(
                insert(logical_devices),
                [
                    {
                        "name": name,
                        "latitude": None,
                        "longitude": None,
                        "last_seen": None,
                        "properties": {},
                        "created_at": now,
                    }
                    for name in names
                ],
            )
            p_uid = dict(conn.execute(select(physical_devices.c.name, physical_devices.c.uid)).tuples().all())
            l_uid = dict(conn.execute(select(logical_devices.c.name, logical_devices.c.uid)).tuples().all())
            conn.execute(
                insert(mappings),
                [
                    {"p_uid": p_uid[name], "l_uid": l_uid[name], "start_time": now, "end_time": None, "paused": False}
                    for name in names
                ],
            )
        for k in (1, devices):
            device = store.physical_by_token(TOKEN_FORMAT % k)
            mapping = store.current_mapping(p_uid=device.uid) if device is not None else None
            if device is None or not device.enabled or mapping is None or mapping.l_uid != l_uid[NAME_FORMAT % k]:
                raise BenchError(f"bulk provisioning: device {NAME_FORMAT % k} is not there or not mapped")
    finally:
        store.close()


def start_isthmus_mqtt(workdir: Path, args: argparse.Namespace, devices: int) -> MqttServer:
    port = free_port()
    options = (
        "[[sources]]\n"
        f'name = "{SOURCE}"\n'
        'type = "mqtt"\n'
        "[sources.options]\n"
        f'host = "{HOST}"\n'
        f"port = {port}\n"
        f"max_connections = {max(args.idle_conns, args.mqtt_conns) + 1000}\n"
        f"max_inflight = {max(256, 2 * args.mqtt_inflight)}\n"
        "rate = { rate_per_second = 100000, burst = 100000 }\n"
    )
    t0 = time.monotonic()
    data_dirs: list[Path] = []

    def prepare(data_dir: Path) -> None:
        data_dirs.append(data_dir)
        provision_registry(data_dir, devices)

    server = start_isthmus(workdir, "isthmus-mqtt", options, prepare)
    log(f"Isthmus with the mqtt source up in {time.monotonic() - t0:.1f} s ({devices:,} devices provisioned)")
    wait_for_port(server, port)
    journal = data_dirs[0] / "journal.db"
    if not journal.exists():
        raise BenchError(f"no journal database at {journal}")
    return MqttServer("isthmus", server, port, journal=journal)


# ----------------------------------------------------------------------------- Isthmus books


def isthmus_counters(client: httpx.Client) -> dict[str, float]:
    """Frame and MQTT counters from ``GET /metrics``."""
    response = client.get("/metrics")
    if response.status_code != 200:
        return {}
    return {name: float(value) for name, value in _ISTHMUS_COUNTERS.findall(response.text)}


def counter_deltas(c0: dict[str, float], c1: dict[str, float], prefix: str) -> dict[str, int]:
    """Non-zero changes of the counters whose name starts with ``prefix``, by their labels."""
    out = {}
    for name, value in c1.items():
        if name.startswith(prefix) and (delta := round(value - c0.get(name, 0.0))):
            out[name[len(prefix) :]] = delta
    return out


# ----------------------------------------------------------------------------- runs


@dataclass
class MqttBench:
    args: argparse.Namespace
    targets: list[str]
    servers: dict[str, MqttServer] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    failed: bool = False
    shutdowns: list[tuple[int | None, float]] = field(default_factory=list)  # Isthmus: (exit status, seconds)

    def report(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        print("RESULT " + " ".join(f"{k}={fmt_value(v)}" for k, v in result.items()), flush=True)
        where = f"mqtt {result['target']} {result['load']} rep {result['rep']}"
        if result.get("errors"):
            self.failed = True
            detail = ", ".join(
                f"{k}={result[k]}"
                for k in ("conn_fail", "refused", "dropped", "unacked", "unanswered", "alive", "server_packets")
                if result.get(k) not in (None, "", 0)
            )
            self.notes.append(f"{where}: {result['errors']} errors ({detail or 'see the RESULT line'})")
        for key in ("dead_lettered", "skipped", "rejected", "not_journaled"):
            if result.get(key):
                self.failed = True
                self.notes.append(f"{where}: {key} = {result[key]}")
        if result.get("sink_drain_s") == "timeout":
            self.failed = True
            self.notes.append(f"{where}: the {TIMESERIES_SINK!r} sink did not drain its lag in time")
        if result["load"] == "rate" and result.get("unsent"):
            self.notes.append(
                f"{where}: did not sustain {self.args.mqtt_rate:,.0f} msg/s ({result['unsent']} messages skipped "
                f"because {self.args.mqtt_inflight} were unacknowledged): its latency there is queueing"
            )
        stored = result.get("stored")
        if result["load"] == "qos1" and stored is not None and stored < result.get("acked", 0):
            self.notes.append(f"{where}: JetStream stored {result['stored']} of {result['acked']} messages")

    def stop(self, name: str) -> None:
        """SIGTERM the target's server; Isthmus must exit with status 0 within 10 s."""
        target = self.servers[name]
        code, took = stop_server(target.server)
        log(f"{name} stopped: exit status {code} after {took:.1f} s")
        if name == "isthmus":
            self.shutdowns.append((code, took))
            if code != 0 or took > STOP_TIMEOUT_S:
                self.failed = True
                self.notes.append(f"Isthmus (MQTT) did not shut down cleanly: exit status {code} after {took:.1f} s")
        elif code is None:  # had to be killed (nats-server exits with 1 on SIGTERM: that is fine)
            log(f"its log ends with:\n{target.server.log_tail()}")

    def restart(self, name: str) -> None:
        """Stop the target and start the same command again: same ports, same data, a fresh process."""
        self.stop(name)
        target = self.servers[name]
        old = target.server
        with old.log_path.open("ab") as out:
            proc = subprocess.Popen(old.proc.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=clean_env())  # fmt: skip
        target.server = Server(old.target, proc, old.port, old.log_path, old.admin_token)
        if name == "isthmus":
            wait_until_ready(target.server, lambda c: c.get("/health").status_code == 200)
        wait_for_port(target.server, target.mqtt_port)

    @property
    def drain_timeout(self) -> float:
        return max(120.0, 20.0 * float(self.args.mqtt_duration))

    def generator_cmd(self, target: MqttServer, load: str, duration: float | None = None) -> tuple[list[str], float]:
        """The generator's command line for ``load`` against ``target``, and its warm-up + measured seconds."""
        a = self.args
        duration = a.mqtt_duration if duration is None else duration
        cmd = [sys.executable, str(GENERATOR), "--port", str(target.mqtt_port), "--target", target.name,
               "--server-pid", str(target.pid), "--token-format", TOKEN_FORMAT, "--json"]  # fmt: skip
        if load == "idle":
            cmd += ["--mode", "idle", "--conns", str(a.idle_conns), "--duration", f"{a.idle_hold:g}",
                    "--keepalive", "30", "--connect-concurrency", "200"]  # fmt: skip
            return cmd, a.idle_hold
        cmd += ["--conns", str(a.mqtt_conns), "--inflight", str(a.mqtt_inflight), "--duration", f"{duration:g}"]
        if load == "rate":
            cmd += ["--mode", "rate", "--rate", f"{a.mqtt_rate:g}", "--warmup", f"{RATE_WARMUP_S:g}"]
            window = RATE_WARMUP_S + duration
        else:
            cmd += ["--mode", "saturate", "--qos", "1" if load == "qos1" else "0", "--warmup", f"{SATURATE_WARMUP_S:g}"]
            window = SATURATE_WARMUP_S + duration
        if target.journal is not None:  # records durably journaled: the journal's sequence
            cmd += ["--counter-sqlite", str(target.journal)]
        return cmd, window

    def run(self, target_name: str, load: str, rep: int, profile: Path | None = None) -> dict[str, Any] | None:
        target = self.servers[target_name]
        duration = max(self.args.mqtt_duration, PROFILE_SECONDS + 2.0) if profile else None
        cmd, window = self.generator_cmd(target, load, duration)
        log(f"mqtt rep {rep}: {target_name}: {load}{' (profiled)' if profile else ''}")
        isthmus = target_name == "isthmus"
        client = mgmt_client(target.server) if isthmus else None
        try:
            before: dict[str, Any] = {}
            if client is not None:
                if wait_drained(target.server, client, self.drain_timeout) is None:
                    log("warning: Isthmus's sinks did not drain before the run")
                before = get_sinks(target.server, client)[TIMESERIES_SINK]
                counters0, m0 = isthmus_counters(client), journal_metrics(client)
            stored0 = nats_stored(target) if target_name == "nats" else None
            # Write back what earlier runs left dirty (nats-server's stream files, the journal's WAL):
            # otherwise that write-back competes with the fsyncs of whichever target runs next.
            os.sync()
            spy = start_profiler(target.pid, profile, window) if profile else None
            t_launch = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=window + GENERATOR_SLACK_S, check=False)
            if spy is not None:
                finish_profiler(spy, profile)
            target.server.check_alive()
            lines = proc.stdout.strip().splitlines()
            if not lines:
                raise BenchError(f"mqtt_load.py printed nothing (status {proc.returncode}): {proc.stderr.strip()}")
            out = json.loads(lines[-1])
            if proc.stderr.strip():
                log(f"mqtt_load.py said: {proc.stderr.strip()[:500]}")
            result: dict[str, Any] = {"suite": "mqtt", "target": target_name, "load": load, "rep": rep}
            result.update({k: v for k, v in out.items() if k not in ("target", "mode")})
            if stored0 is not None:
                stored1 = nats_stored(target)
                result["stored"] = None if stored1 is None else stored1 - stored0
            if client is not None:
                t_loaded = t_launch + float(out.get("connect_s") or 0.0)
                drain = wait_drained(target.server, client, self.drain_timeout, TIMESERIES_SINK)
                t_end = time.monotonic()
                counters1, m1 = isthmus_counters(client), journal_metrics(client)
                after = get_sinks(target.server, client)[TIMESERIES_SINK]
                delivered = after["delivered"] - before["delivered"]
                received = counter_deltas(counters0, counters1, "isthmus_frames_received_total")
                journaled = counter_deltas(counters0, counters1, "isthmus_frames_journaled_total")
                rejected = {
                    **counter_deltas(counters0, counters1, "isthmus_frames_rejected_total"),
                    **counter_deltas(counters0, counters1, "isthmus_mqtt_publishes_rejected_total"),
                    **counter_deltas(counters0, counters1, "isthmus_frames_failed_total"),
                }
                n_received, n_journaled = sum(received.values()), sum(journaled.values())
                result.update(
                    sink_drain_s="timeout" if drain is None else drain,
                    delivered=delivered,
                    points_per_s=delivered * POINTS_PER_MESSAGE / (t_end - t_loaded) if delivered else None,
                    dead_lettered=after["dead_lettered"] - before["dead_lettered"],
                    skipped=after["skipped"] - before["skipped"],
                    sink_state=after["state"],
                    received=n_received,
                    journaled=n_journaled,
                    not_journaled=n_received - n_journaled,
                    rejected=",".join(f"{k}:{v}" for k, v in rejected.items()),
                )
                result.update(commit_stats(m0, m1, t_end - t_loaded))
        finally:
            if client is not None:
                client.close()
        self.report(result)
        return result


def start_profiler(pid: int, path: Path | None, window: float) -> subprocess.Popen[bytes] | None:
    """py-spy record (raw collapsed stacks) of ``pid`` for ``PROFILE_SECONDS``, started after the warm-up."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if path is None or not Path(spy).exists():
        log("py-spy not found: no profile (pip install py-spy)")
        return None
    seconds = max(1, min(PROFILE_SECONDS, int(window - SATURATE_WARMUP_S)))
    cmd = [spy, "record", "--format", "raw", "-o", str(path), "-d", str(seconds), "-r", "100", "--nonblocking",
           "-p", str(pid)]  # fmt: skip
    log(f"profiling Isthmus for {seconds} s: {shlex.join(cmd)}")
    # Let the generator connect and warm up before sampling starts.
    return subprocess.Popen(
        ["sh", "-c", f"sleep {SATURATE_WARMUP_S + 1:g}; exec {shlex.join(cmd)}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish_profiler(spy: subprocess.Popen[bytes], path: Path | None) -> None:
    try:
        _, err = spy.communicate(timeout=PROFILE_SECONDS + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode != 0:
        log(f"py-spy failed (status {spy.returncode}): {err.decode(errors='replace')[-500:]}")
    elif path is not None:
        log(f"profile written to {path}")


_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_ENTRY_FILES = ("<frozen runpy>", "isthmus/__main__.py", "isthmus/cli/", "site-packages/typer/", "threading.py",
                "isthmus/runtime/supervisor.py", "site-packages/uvloop/__init__.py")  # fmt: skip


def profile_summary(path: Path, top: int = 15) -> list[str]:
    """Where the time goes in a py-spy raw (collapsed stacks) profile.

    Shares are of all samples (every thread that was not idle). "Own" is the time in the function
    itself, including C code it calls that has no Python frame (SQLite, the uvloop event loop,
    system calls); "total" also counts the Python functions it calls (Isthmus's own frames only,
    without the start-up chain). ``Runner.run`` own time is uvloop's C code: polling, socket I/O,
    callbacks' dispatch.
    """
    own: collections.Counter[str] = collections.Counter()
    own_file: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = []
        for raw in stack.split(";"):
            found = _FRAME.match(raw)
            frames.append((found["function"], found["file"]) if found else (raw, "?"))
        function, file = frames[-1]
        own[f"{function} ({file})"] += n
        own_file[file] += n
        threads["worker threads (journal writer, sinks, executors)" if frames[0][1] == "threading.py" else
                "main thread (event loop)"] += n  # fmt: skip
        for function, file in set(frames):
            if file.startswith("isthmus/") and not file.startswith(_ENTRY_FILES):
                total[f"{function} ({file})"] += n
    if not samples:
        return []

    def pct(n: int) -> str:
        return f"{100 * n / samples:5.1f} %"

    lines = [f"{samples} samples; " + ", ".join(f"{name} {pct(n).strip()}" for name, n in threads.most_common())]
    lines.append("own time by function:")
    lines += [f"  {pct(n)}  {name}" for name, n in own.most_common(top)]
    lines.append("own time by file:")
    lines += [f"  {pct(n)}  {name}" for name, n in own_file.most_common(10)]
    lines.append("total time of Isthmus's functions (with what they call):")
    lines += [f"  {pct(n)}  {name}" for name, n in total.most_common(top)]
    return lines


# ----------------------------------------------------------------------------- the suite


def run_suite(args: argparse.Namespace, workdir: Path) -> MqttBench:
    """Start the servers, run every load for every target ``args.mqtt_reps`` times, stop them."""
    targets = [t for t in TARGETS if t in args.mqtt_targets]
    bench = MqttBench(args, targets)
    loads = [load for load in LOADS if load in args.mqtt_loads and not (load == "idle" and not args.idle_conns)]
    devices = max(args.mqtt_conns, args.idle_conns if "idle" in loads else 0)
    limit = raise_nofile(devices + 2048)
    if limit < devices + 512:
        bench.notes.append(f"open-file limit {limit} is too low for {devices:,} connections (ulimit -Hn)")
    try:
        for name in targets:
            log(f"starting {name}")
            if name == "mosquitto":
                bench.servers[name] = start_mosquitto(workdir)
            elif name == "nats":
                bench.servers[name] = start_nats(workdir)
            else:
                t0 = time.monotonic()
                bench.servers[name] = start_isthmus_mqtt(workdir, args, devices)
                bench.facts.append(
                    f"Isthmus: {devices:,} devices written into the registry before the start (one transaction) and "
                    f"the server up in {time.monotonic() - t0:.1f} s."
                )
        for rep in range(1, args.mqtt_reps + 1):
            if rep > 1 and "idle" in loads:
                log("restarting the servers, so that the idle run measures fresh processes")
                for name in targets:
                    bench.restart(name)
            for load in loads:
                for name in targets:
                    bench.run(name, load, rep)
        if args.profile and "isthmus" in targets:
            result = bench.run("isthmus", "qos1", 0, profile=args.profile)
            if result is not None:
                bench.results.remove(result)  # not part of the table: py-spy takes CPU
                bench.facts.append(
                    f"Profiled QoS 1 saturation (py-spy, not in the table): {fmt_num(result['msgs_per_s'])} msg/s."
                )
    except BenchError as exc:
        log(f"error: {exc}")
        bench.failed = True
        bench.notes.append(f"mqtt suite aborted: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        bench.failed = True
        bench.notes.append("interrupted: the MQTT figures are incomplete")
    finally:
        for name in list(bench.servers):
            bench.stop(name)
        if bench.shutdowns:
            bench.facts.append(
                f"Isthmus (MQTT) on SIGTERM: exit status {', '.join(str(c) for c, _ in bench.shutdowns)} after "
                f"{cell(t for _, t in bench.shutdowns)} s."
            )
        target = bench.servers.get("isthmus")
        if target is not None:
            lines = [ln for ln in target.server.log_tail(100_000).splitlines() if ln.strip()]
            if lines:
                bench.notes.append(f"Isthmus (MQTT) logged {len(lines)} lines at warning or above; the first: "
                                   f"{lines[0][:300]}")  # fmt: skip
    return bench


# ----------------------------------------------------------------------------- summary


def labels(args: argparse.Namespace) -> dict[str, str]:
    return {
        "idle": f"{args.idle_conns:,} idle conns, keep-alive 30 s",
        "qos1": f"QoS 1 saturating ({args.mqtt_conns:,} conns {TIMES} {args.mqtt_inflight} in flight)",
        "rate": f"QoS 1 at {args.mqtt_rate:,.0f} msg/s ({args.mqtt_conns:,} conns)",
        "qos0": f"QoS 0 saturating ({args.mqtt_conns:,} conns)",
    }


def counted(target: str, load: str) -> str:
    if load == "idle":
        return "answered PINGREQ"
    if load == "qos0":
        return "journaled" if target == "isthmus" else "read"
    return {"isthmus": "PUBACK after fsync", "nats": "PUBACK (stored async)"}.get(target, "PUBACK")


def cpu_us_per_msg(row: dict[str, Any]) -> float | None:
    cpu, rate = row.get("server_cpu"), row.get("msgs_per_s")
    if not isinstance(cpu, int | float) or not isinstance(rate, int | float) or rate <= 0:
        return None
    return cpu / 100 / rate * 1e6


def summary(bench: MqttBench, command: str, loadavg: str) -> str:
    args = bench.args
    reps = "repetitions" if args.mqtt_reps > 1 else "repetition"
    out = [
        "",
        f"**Machine:** {machine_line(('mosquitto', 'nats-server'))}",
        "",
        f"**Command:** `{command}` (load average before: {loadavg})",
        "",
        f"MQTT 3.1.1, {len(PAYLOAD)}-byte JSON payload ({POINTS_PER_MESSAGE} values) on `{TOPIC}`, one device per "
        f"connection; cells are median [min{DASH}max] over {args.mqtt_reps} {reps}, {args.mqtt_duration:g} s "
        f"measured each, targets alternating; CPU in % of one core.",
        "",
        "| target | load | counted | msg/s | p50 ms | p99 ms | server CPU % | CPU µs/msg | generator CPU % | "
        "server RSS MiB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in bench.results:
        groups.setdefault((r["load"], r["target"]), []).append(r)
    label = labels(args)
    for load in LOADS:
        for target in TARGETS:
            rows = groups.get((load, target))
            if not rows:
                continue
            errors = sum(int(r.get("errors") or 0) for r in rows)
            if load == "idle":
                alive = cell(r.get("alive") for r in rows)
                cells = [alive, DASH, DASH]
            else:
                cells = [cell(r.get(k) for r in rows) for k in ("msgs_per_s", "p50_ms", "p99_ms")]
            cells.append(cell(r.get("server_cpu") for r in rows))
            cells.append(DASH if load == "idle" else cell(cpu_us_per_msg(r) for r in rows))
            cells.append(cell(r.get("load_cpu") for r in rows))
            cells.append(cell(r.get("rss_mb") for r in rows) if load == "idle" else DASH)
            out.append(f"| {target} | {label[load]} | {counted(target, load)} | {' | '.join(cells)} | {errors} |")
    facts = ratio_lines(groups) + goal_lines(groups, args) + detail_lines(groups, args) + bench.facts
    out += ["", *(f"* {fact}" for fact in facts)]
    return "\n".join(out)


def _ratio(
    groups: dict[tuple[str, str], list[dict[str, Any]]], load: str, ref: str, value: Callable[[dict[str, Any]], Any]
) -> tuple[float, list[float]] | None:
    """Isthmus / ``ref``: the ratio of the medians of ``value``, and the ratios repetition by repetition."""
    mine, theirs = groups.get((load, "isthmus")), groups.get((load, ref))
    if not mine or not theirs:
        return None
    mi, mr = numbers(value(r) for r in mine), numbers(value(r) for r in theirs)
    if not mi or not mr or not statistics.median(mr):
        return None
    pairs = []
    for i in mine:
        for r in theirs:
            vi, vr = numbers([value(i)]), numbers([value(r)])
            if i["rep"] == r["rep"] and vi and vr and vr[0]:
                pairs.append(vi[0] / vr[0])
    return statistics.median(mi) / statistics.median(mr), pairs


def _fmt_ratio(ratio: tuple[float, list[float]], times: bool) -> str:
    """``0.42 [0.40-0.45]``, or ``x12.3 [x11.0-x14.1]`` (with the multiplication sign) for costs."""
    value, pairs = ratio
    sign = TIMES if times else ""
    text = f"{sign}{fmt_num(value)}" if times else f"{value:.2f}"
    if len(pairs) > 1:
        low, high = min(pairs), max(pairs)
        text += f" [{sign}{fmt_num(low)}{DASH}{sign}{fmt_num(high)}]" if times else f" [{low:.2f}{DASH}{high:.2f}]"
    return text


def value_of(key: str) -> Callable[[dict[str, Any]], Any]:
    def get(row: dict[str, Any]) -> Any:
        return row.get(key)

    return get


def ratio_lines(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Isthmus against each reference: throughput ratios (higher is better) and cost ratios (lower is better)."""
    lines = []
    for ref in REFERENCES:
        parts = []
        for load, key, what in (("qos1", "msgs_per_s", "QoS 1 saturated msg/s"), ("qos0", "msgs_per_s", "QoS 0 msg/s")):
            ratio = _ratio(groups, load, ref, value_of(key))
            if ratio is not None:
                parts.append(f"{what} **{_fmt_ratio(ratio, times=False)}**")
        for load, value, what in (
            ("rate", value_of("p50_ms"), "p50 at the fixed rate"),
            ("rate", value_of("p99_ms"), "p99 at the fixed rate"),
            ("qos1", cpu_us_per_msg, "CPU per message at QoS 1 saturation"),
            ("rate", cpu_us_per_msg, "CPU per message at the fixed rate"),
            ("idle", value_of("rss_mb"), "RSS with the idle connections"),
        ):
            ratio = _ratio(groups, load, ref, value)
            if ratio is not None:
                parts.append(f"{what} {_fmt_ratio(ratio, times=True)}")
        if parts:
            lines.append(f"Isthmus / {ref}, median [per repetition]: {'; '.join(parts)}.")
    return lines


def goal_lines(groups: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    """The issue's targets for Isthmus, met or not (medians)."""
    checks = []
    qos1 = median_of(groups.get(("qos1", "isthmus"), []), "msgs_per_s")
    if qos1 is not None:
        checks.append(f"QoS 1 ≥ 20,000 msg/s: {fmt_num(qos1)} ({'met' if qos1 >= 20_000 else 'not met'})")
    rate = groups.get(("rate", "isthmus"), [])
    p99 = median_of(rate, "p99_ms")
    if p99 is not None:
        sustained = all(not r.get("unsent") for r in rate)
        ok = p99 < 25 and sustained and args.mqtt_rate >= 10_000
        checks.append(
            f"p99 < 25 ms at 10,000 msg/s: {fmt_num(p99)} ms at {args.mqtt_rate:,.0f} msg/s"
            f"{'' if sustained else ', rate not sustained'} ({'met' if ok else 'not met'})"
        )
    qos0 = median_of(groups.get(("qos0", "isthmus"), []), "msgs_per_s")
    if qos0 is not None:
        checks.append(f"QoS 0 ≥ 50,000 msg/s journaled: {fmt_num(qos0)} ({'met' if qos0 >= 50_000 else 'not met'})")
    idle = groups.get(("idle", "isthmus"), [])
    rss = median_of(idle, "rss_mb")
    if rss is not None:
        worst = max(numbers(r.get("rss_mb") for r in idle))
        ok = worst <= 1024 and args.idle_conns >= 10_000 and all(r.get("alive") == args.idle_conns for r in idle)
        checks.append(
            f"{args.idle_conns:,} idle devices within 1 GiB: {fmt_num(rss)} MiB, at most {fmt_num(worst)} "
            f"({'met' if ok else 'not met'})"
        )
    return [f"Isthmus against the issue's goals: {'; '.join(checks)}."] if checks else []


def detail_lines(groups: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    lines = []
    for load in ("qos1", "qos0"):
        rows = groups.get((load, "isthmus"))
        if rows:
            lines.append(
                f"Isthmus {labels(args)[load]}: timeseries sink drained {cell(r.get('sink_drain_s') for r in rows)} s "
                f"after the load, {cell(r.get('points_per_s') for r in rows)} points stored/s; "
                f"{cell(r.get('records_per_commit') for r in rows)} records per group commit, "
                f"{cell(r.get('commit_ms') for r in rows)} ms per commit (over the run and the drain)."
            )
    rows = groups.get(("qos0", "isthmus"))
    if rows:
        lines.append(
            f"Isthmus QoS 0: read off the sockets {cell(r.get('read_per_s') for r in rows)} msg/s "
            f"(PINGREQ-paced, see docs/benchmarks.md) against {cell(r.get('msgs_per_s') for r in rows)} journaled."
        )
    for ref in REFERENCES:
        rows = groups.get(("qos1", ref))
        if ref == "nats" and rows:
            lines.append(f"nats QoS 1: messages JetStream stored per run {cell(r.get('stored') for r in rows)} "
                         f"(acknowledged: {cell(r.get('acked') for r in rows)}).")  # fmt: skip
    parts = []
    for target in TARGETS:
        rows = groups.get(("idle", target))
        if rows:
            parts.append(
                f"{target} {cell(r.get('connect_s') for r in rows)} s, "
                f"{cell(r.get('rss_per_conn_kb') for r in rows)} KiB per connection "
                f"(RSS before {cell(r.get('rss_base_mb') for r in rows)} MiB)"
            )
    if parts:
        lines.append(f"Connecting the {args.idle_conns:,} idle devices: {'; '.join(parts)}.")
    gen = [r.get("load_cpu") for r in (groups.get(("qos1", "mosquitto")) or [])]
    if numbers(gen) and statistics.median(numbers(gen)) > 80:
        lines.append(
            "The generator used most of a core against mosquitto: its mosquitto figures are floors (generator-bound)."
        )
    other = numbers(r.get("other_cpu") for rows in groups.values() for r in rows)
    if other:
        lines.append(f"Other processes on the machine during the MQTT runs: {cell(other)} % of one core.")
    return lines


def command_parts(args: argparse.Namespace) -> list[str]:
    """The MQTT options of the command line that produced the figures."""
    parts = [
        "--mqtt-duration", f"{args.mqtt_duration:g}", "--mqtt-reps", str(args.mqtt_reps),
        "--mqtt-conns", str(args.mqtt_conns), "--mqtt-inflight", str(args.mqtt_inflight),
        "--mqtt-rate", f"{args.mqtt_rate:g}", "--idle-conns", str(args.idle_conns),
        "--idle-hold", f"{args.idle_hold:g}",
    ]  # fmt: skip
    if tuple(args.mqtt_targets) != TARGETS:
        parts += ["--mqtt-targets", ",".join(args.mqtt_targets)]
    if tuple(args.mqtt_loads) != LOADS:
        parts += ["--mqtt-loads", ",".join(args.mqtt_loads)]
    return parts


def check_tools(targets: list[str]) -> str | None:
    """A message naming the missing reference servers, or None."""
    missing = [pkg for name, pkg in (("mosquitto", "mosquitto"), ("nats", "nats-server")) if name in targets
               and shutil.which(pkg) is None]  # fmt: skip
    if missing:
        return f"{' and '.join(missing)} not found: run 'make system-deps' (Debian packages {', '.join(missing)})"
    return None
