"""End-to-end fixtures: the real ``isthmus serve`` process, started, killed and restarted on one data dir.

Test modules cannot import from this conftest at run time (``--import-mode=importlib``): they get
:class:`Server` through the ``server`` and ``server_factory`` fixtures and import it for type
annotations only.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m isthmus serve`` as a child process.

    ``extra_config`` is appended to the generated TOML (e.g. a ``[[sources]]`` table).
    """

    def __init__(self, tmp: Path, extra_config: str = "") -> None:
        self.port = free_port()
        self.data = tmp / "data"
        self.config = tmp / "isthmus.toml"
        self.config.write_text(
            f'data_dir = "{self.data}"\n[http]\nhost = "127.0.0.1"\nport = {self.port}\n[log]\nlevel = "warning"\n'
            + extra_config
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "server.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "isthmus", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not become healthy")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)

    @property
    def token(self) -> str:
        return (self.data / "admin.token").read_text().strip()


ServerFactory = Callable[..., Server]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Make (not yet started) servers in ``tmp_path``; any still running at the end are killed."""
    made: list[Server] = []

    def make(extra_config: str = "") -> Server:
        tmp = tmp_path / f"server{len(made)}" if made else tmp_path
        tmp.mkdir(exist_ok=True)
        s = Server(tmp, extra_config)
        made.append(s)
        return s

    yield make
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture
def server(server_factory: ServerFactory) -> Server:
    """A server with the default configuration (HTTP only), not yet started."""
    return server_factory()
