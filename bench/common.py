"""Helpers shared by the benchmark suites of ``bench/run.py``: servers, CPU accounting, Isthmus's
management API and metrics, and the formatting of the summary tables."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from http_load import process_cpu_seconds

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
TIMESERIES_SINK = "timeseries"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
DRAIN_POLL_S = 0.1
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


def start_isthmus(
    workdir: Path,
    name: str = "isthmus",
    extra_config: str = "",
    prepare: Callable[[Path], None] | None = None,
) -> Server:
    """Start ``python -m isthmus serve`` with a fresh data directory ``workdir/<name>-data``.

    ``extra_config`` is appended to the generated TOML file; ``prepare(data_dir)`` runs before the
    server starts (e.g. to fill the registry). Waits for ``/health`` and reads the admin token.
    """
    data_dir = workdir / ("data" if name == "isthmus" else f"{name}-data")
    port = free_port()
    config = workdir / f"{name}.toml"
    # json.dumps gives a valid TOML basic string for any path.
    config.write_text(
        f'data_dir = {json.dumps(str(data_dir))}\n[http]\nhost = "{HOST}"\nport = {port}\n[log]\nlevel = "warning"\n'
        + extra_config,
        encoding="utf-8",
    )
    if prepare is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        prepare(data_dir)
    log_path = workdir / f"{name}.log"
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


def wait_for_port(server: Server, port: int) -> None:
    """Wait until ``port`` on loopback accepts TCP connections (the server is up)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        server.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1.0):
            return
        time.sleep(0.1)
    raise BenchError(f"{server.target} did not listen on port {port} within {START_TIMEOUT_S:.0f} s")


def raise_nofile(needed: int) -> int:
    """Raise this process's soft open-file limit towards ``needed`` (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


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


# ----------------------------------------------------------------------------- summary


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


def tool_version(cmd: list[str], pattern: str) -> str | None:
    """The version ``cmd`` prints (stdout or stderr), found by ``pattern``'s first group; None if not."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        found = re.search(pattern, done.stdout + done.stderr)
        if found:
            return found[1]
    return None


def machine_line(tools: Iterable[str] = ("wrk",)) -> str:
    """The machine, Python, Isthmus and the versions of the libraries and ``tools`` the benchmark uses."""
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
    probes = {
        "wrk": (["wrk", "-v"], r"wrk (?:\S+/)?(\d[\w.+~-]*)"),
        "mosquitto": (["mosquitto", "-h"], r"mosquitto version (\S+)"),
        "nats-server": (["nats-server", "--version"], r"nats-server: v?(\S+)"),
    }
    for tool in tools:
        cmd, pattern = probes[tool]
        versions.append(f"{tool} {tool_version(cmd, pattern) or '?'}")
    isthmus = importlib.metadata.version("isthmus")
    return (
        f"nproc {nproc}, {model}, Linux {platform.release()}, Python {platform.python_version()}; "
        f"Isthmus {isthmus}, {', '.join(versions)}"
    )
