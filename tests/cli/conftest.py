"""Fixtures of the CLI tests: a scripted fake of the management API, and a CLI runner.

The fake is an ``httpx.MockTransport`` handed to the CLI as the Click context object
(``CliRunner.invoke(..., obj=transport)``), so these tests need no server and no sockets.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from isthmus.cli.main import app

FAKE_URL = "http://isthmus.test:8080"
FAKE_TOKEN = "admin-token-123"

Handler = Callable[[httpx.Request], httpx.Response]


class FakeApi:
    """Answers scripted routes, records every request, 404s (in the API's error shape) the rest."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self._routes: dict[tuple[str, str], Handler] = {}

    def on(self, method: str, path: str, body: Any = None, status: int = 200) -> None:
        """Answer ``method path`` with ``status`` and ``body`` as JSON."""
        self._routes[(method, path)] = lambda _request: httpx.Response(status, json=body)

    def on_call(self, method: str, path: str, handler: Handler) -> None:
        """Answer ``method path`` with ``handler(request)``."""
        self._routes[(method, path)] = handler

    def error(self, method: str, path: str, status: int, code: str, message: str) -> None:
        """Answer ``method path`` with the API's error shape."""
        self.on(method, path, {"error": {"code": code, "message": message}}, status)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.raw_path.split(b"?")[0].decode()  # still percent-encoded
        route = self._routes.get((request.method, path))
        if route is None:
            body = {"error": {"code": "not_found", "message": f"fake: no route {request.method} {path}"}}
            return httpx.Response(404, json=body)
        return route(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    @property
    def last(self) -> httpx.Request:
        assert self.requests, "the CLI sent no request"
        return self.requests[-1]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)

    def params(self, index: int = -1) -> dict[str, str]:
        return dict(self.requests[index].url.params)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No ISTHMUS_* variable of the developer's shell, and a scratch working directory."""
    for name in list(os.environ):
        if name.startswith("ISTHMUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake() -> FakeApi:
    return FakeApi()


@pytest.fixture
def cli(fake: FakeApi) -> Callable[..., Result]:
    """Run ``isthmus --url FAKE --token T <args>`` in process against the fake API."""
    runner = CliRunner()

    def run(*args: str, input: str | None = None, auth: bool = True) -> Result:
        prefix: Sequence[str] = ["--url", FAKE_URL, "--token", FAKE_TOKEN] if auth else []
        return runner.invoke(app, [*prefix, *args], input=input, obj=fake.transport)

    return run


@pytest.fixture
def bare_cli() -> Callable[..., Result]:
    """Run ``isthmus <args>`` in process with no fake: real HTTP, real configuration loading."""
    runner = CliRunner()

    def run(*args: str, input: str | None = None, env: dict[str, str | None] | None = None) -> Result:
        return runner.invoke(app, list(args), input=input, env=env)

    return run


def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def free_port() -> int:
    return closed_port()


def one_error_line(result: Result) -> str:
    """The single ``error: …`` line the CLI printed on stderr (asserting there is exactly one)."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def error_line() -> Callable[[Result], str]:
    return one_error_line
