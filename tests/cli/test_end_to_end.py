"""The IoTa walkthrough against the real server: ``python -m isthmus serve`` in a subprocess.

The CLI runs in process (``CliRunner`` with ``--config``, so the URL and the admin token come
from the server's own configuration file), devices post telemetry with httpx.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from isthmus.cli.main import app

STARTUP_TIMEOUT = 20.0
SHUTDOWN_TIMEOUT = 10.0
SINK_TIMEOUT = 5.0


@dataclass
class Server:
    url: str
    config: Path
    data_dir: Path
    log: Path

    def cli(self, *args: str, input: str | None = None) -> Result:
        """``isthmus --config <server's config> <args>``, in process."""
        return CliRunner().invoke(app, ["--config", str(self.config), *args], input=input)

    def ok(self, *args: str, input: str | None = None) -> str:
        """Run the CLI, insist on success, return stdout."""
        result = self.cli(*args, input=input)
        assert result.exit_code == 0, f"isthmus {' '.join(args)} failed:\n{result.output}"
        return result.stdout

    def json(self, *args: str, input: str | None = None) -> Any:
        return json.loads(self.ok(*args, input=input))

    def post_telemetry(self, token: str, body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/api/v1/{token}/telemetry", json=body, timeout=10)


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server output)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = root / "isthmus.toml"
    config.write_text(f'data_dir = "{root / "data"}"\n[http]\nhost = "127.0.0.1"\nport = {port}\n')
    log = root / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "isthmus", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"isthmus serve exited with {proc.returncode} at start:\n{_log_tail(log)}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"isthmus serve not healthy within {STARTUP_TIMEOUT:g} s:\n{_log_tail(log)}")
            time.sleep(0.1)
        yield Server(url=url, config=config, data_dir=root / "data", log=log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail(f"isthmus serve did not stop within {SHUTDOWN_TIMEOUT:g} s of SIGTERM")
            assert code == 0, f"isthmus serve exited with {code} after SIGTERM:\n{_log_tail(log)}"


def _eventually(check: Callable[[], Any], timeout: float = SINK_TIMEOUT) -> Any:
    """Call ``check`` until it returns something truthy (sinks deliver asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_admin_token_file_is_private(server: Server) -> None:
    token_file = server.data_dir / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600


def test_iota_walkthrough(server: Server) -> None:
    # A new sensor appears: create its physical device, note its uid and token.
    device = server.json("pd", "create", "--json", '{"name":"tank-7","source_name":"http"}')
    p_uid, token = device["uid"], device["token"]
    assert device["name"] == "tank-7"
    assert server.json("pd", "get", "--puid", str(p_uid))["token"] == token

    # It reports before anyone has mapped it: accepted, journaled, delivered nowhere.
    assert server.post_telemetry(token, {"level": 1.25}).status_code == 200
    assert f"{p_uid:>4} tank-7" in server.ok("pd", "lum", "--plain")
    assert [d["uid"] for d in server.json("pd", "lum")] == [p_uid]

    # The location it measures becomes a logical device, and the two are mapped.
    logical = server.json("ld", "create", "--json", '{"name": "tank 7 level"}')
    l_uid = logical["uid"]
    mapping = server.json("map", "start", "--puid", str(p_uid), "--luid", str(l_uid))
    assert (mapping["p_uid"], mapping["l_uid"], mapping["end_time"]) == (p_uid, l_uid, None)
    assert server.json("pd", "lum") == []
    assert f"-> {l_uid} tank 7 level" in server.ok("pd", "ls", "--plain")
    assert f"<- {p_uid} tank-7" in server.ok("ld", "ls", "--plain")

    # Now its telemetry reaches the time-series store.
    assert server.post_telemetry(token, {"level": 2.5}).status_code == 200

    def points() -> list[dict[str, Any]]:
        return [p for p in server.json("ts", "--luid", str(l_uid), "--json") if p["name"] == "level"]

    found = _eventually(points)
    assert [p["value"] for p in found] == [2.5], found
    assert found[0]["l_uid"] == l_uid
    assert "2.5" in server.ok("ts", "--luid", str(l_uid), "--name", "level")

    # Both raw messages are kept, newest first, with correlation ids linking them to the point.
    raw = server.json("messages", "--puid", str(p_uid), "--json")
    assert len(raw) == 2
    newest, oldest = raw
    assert newest["seq"] > oldest["seq"]
    assert newest["l_uid"] == l_uid
    assert oldest["l_uid"] is None
    assert newest["correlation_id"] != oldest["correlation_id"]
    assert newest["correlation_id"] == found[0]["correlation_id"]
    table = server.ok("messages", "--puid", str(p_uid))
    assert newest["correlation_id"] in table
    assert oldest["correlation_id"] in table
    unmapped = server.json("messages", "--unmapped", "--json")
    assert oldest["correlation_id"] in [m["correlation_id"] for m in unmapped]

    # Mapping history, pause and resume, end.
    history = server.json("map", "ls", "--puid", str(p_uid))
    assert history["current"]["l_uid"] == l_uid
    assert server.json("map", "pause", "--puid", str(p_uid))["paused"] is True
    assert server.json("map", "resume", "--puid", str(p_uid))["paused"] is False
    ended = server.json("map", "end", "--luid", str(l_uid))
    assert ended["end_time"] is not None
    history = server.json("map", "ls", "--luid", str(l_uid))
    assert history["current"] is None
    assert [m["p_uid"] for m in history["history"]] == [p_uid]

    # Updates from stdin, and a device that is removed again.
    renamed = server.json("pd", "up", "--puid", str(p_uid), "--file", "-", input='{"name": "tank-7b"}')
    assert renamed["name"] == "tank-7b"
    assert server.json("ld", "up", "--luid", str(l_uid), "--json", '{"name": "tank 7"}')["name"] == "tank 7"
    spare = server.json("pd", "create", "--json", '{"name":"spare","source_name":"http"}')
    assert server.json("pd", "rm", "--puid", str(spare["uid"]))["uid"] == spare["uid"]
    gone = server.cli("pd", "get", "--puid", str(spare["uid"]))
    assert gone.exit_code == 1
    assert gone.stderr.startswith("error: ")
    assert len(gone.stderr.splitlines()) == 1


def test_users(server: Server) -> None:
    token = server.ok("users", "add", "-u", "alice", "-p", "correct horse").strip()
    assert token
    assert "alice" in server.ok("users", "ls")
    listed = {u["username"]: u for u in server.json("users", "ls", "--json")}
    assert listed["alice"]["read_only"] is False

    def as_alice(*args: str, key: str) -> Result:
        return CliRunner().invoke(app, ["--url", server.url, "--token", key, *args])

    assert as_alice("pd", "ls", key=token).exit_code == 0

    fresh = server.ok("users", "token", "-u", "alice", "--refresh").strip()
    assert fresh
    assert fresh != token
    rejected = as_alice("pd", "ls", key=token)
    assert rejected.exit_code == 1
    assert rejected.stderr.startswith("error: Isthmus rejected the token from --token (401 unauthorized")
    assert as_alice("pd", "ls", key=fresh).exit_code == 0

    server.ok("users", "token", "-u", "alice", "--disable")
    assert as_alice("pd", "ls", key=fresh).exit_code == 1
    server.ok("users", "token", "-u", "alice", "--enable")
    assert as_alice("pd", "ls", key=fresh).exit_code == 0

    server.ok("users", "chng", "-u", "alice", "-p", "battery staple")
    basic = httpx.get(f"{server.url}/mgmt/token", auth=("alice", "battery staple"), timeout=10)
    assert basic.status_code == 200, basic.text

    reader = server.ok("users", "add", "-u", "reader", "-p", "read-only pw", "--read-only").strip()
    assert as_alice("sinks", key=reader).exit_code == 0
    forbidden = as_alice("ld", "create", "--json", '{"name": "x"}', key=reader)
    assert forbidden.exit_code == 1
    assert len(forbidden.stderr.splitlines()) == 1

    server.ok("users", "rm", "-u", "alice")
    assert "alice" not in [u["username"] for u in server.json("users", "ls", "--json")]
    assert as_alice("pd", "ls", key=fresh).exit_code == 1
    missing = server.cli("users", "rm", "-u", "alice")
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: ")


def test_dead_letters_and_sinks(server: Server) -> None:
    empty = server.cli("dlq", "ls")
    assert empty.exit_code == 0, empty.output
    assert server.json("dlq", "ls", "--json") == []
    assert server.cli("dlq", "show", "999").exit_code == 1
    sinks = {s["name"]: s for s in server.json("sinks", "--json")}
    assert "timeseries" in sinks
    assert sinks["timeseries"]["state"] in {"healthy", "starting", "retrying", "failing"}
    assert "timeseries" in server.ok("sinks")


def test_config_check_of_the_servers_configuration(server: Server) -> None:
    effective = server.json("config", "check")
    assert effective["data_dir"] == str(server.data_dir)


def test_console_entry_point(server: Server) -> None:
    """``python -m isthmus`` against the live server, and with a bad token."""
    base = [sys.executable, "-m", "isthmus", "--config", str(server.config)]
    listed = subprocess.run([*base, "ld", "ls"], capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    bad = subprocess.run(
        [*base, "--token", "not-a-token", "ld", "ls"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.startswith("error: Isthmus rejected the token from --token (401 unauthorized")
    assert bad.stderr.count("\n") == 1


def test_device_credentials(server: Server) -> None:
    uid = server.json("pd", "create", "--json", '{"name": "creds-a", "source_name": "mqtt"}')["uid"]
    other = server.json("pd", "create", "--json", '{"name": "creds-b", "source_name": "mqtt"}')["uid"]
    set_out = server.cli("pd", "credentials", "--puid", str(uid), "-u", "creds-a", input="hunter2 hunter2\n")
    assert set_out.exit_code == 0, set_out.output
    assert "hunter2" not in set_out.output
    assert json.loads(set_out.stdout)["username"] == "creds-a"
    assert server.json("pd", "get", "--puid", str(uid))["username"] == "creds-a"
    taken = server.cli("pd", "credentials", "--puid", str(other), "-u", "creds-a", "-p", "x")
    assert taken.exit_code == 1
    assert taken.stderr == "error: username 'creds-a' already in use by another device\n"
    assert server.json("pd", "credentials", "--puid", str(uid), "--remove")["username"] is None
    again = server.cli("pd", "credentials", "--puid", str(uid), "--remove")
    assert again.exit_code == 1
    assert "has no username and password credentials" in again.stderr
