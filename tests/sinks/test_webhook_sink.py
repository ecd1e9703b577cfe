"""The webhook sink against a real HTTP/1.1 server on 127.0.0.1 (an asyncio server in the test)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from isthmus.errors import ConfigError, PermanentSinkError, RetryableSinkError
from isthmus.message import Point, Record, encode_message
from isthmus.plugins import SinkContext
from isthmus.sinks.webhook import PLUGIN, WebhookSink

MakeRecord = Callable[..., Record]


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Request], Awaitable[tuple[int, bytes]]]


async def ok(_: Request) -> tuple[int, bytes]:
    return 200, b'{"ok": true}'


@dataclass
class HTTPServer:
    """A small HTTP/1.1 server with keep-alive that records requests and answers via ``respond``."""

    respond: Responder = ok
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, value = header.decode("latin-1").split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                request = Request(method, target, headers, body)
                self.requests.append(request)
                status, payload = await self.respond(request)
                head = (
                    f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
                    f"Content-Type: text/plain\r\nContent-Length: {len(payload)}\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)


@pytest.fixture
async def server() -> AsyncIterator[HTTPServer]:
    srv = HTTPServer()
    await srv.start()
    yield srv
    await srv.stop()


@contextlib.asynccontextmanager
async def opened(tmp_path: Path, **options: Any) -> AsyncIterator[WebhookSink]:
    sink = PLUGIN.create(options, SinkContext(name="hook", data_dir=tmp_path))
    assert isinstance(sink, WebhookSink)
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


def answer(status: int, body: bytes = b"") -> Responder:
    async def respond(_: Request) -> tuple[int, bytes]:
        return status, body

    return respond


# --------------------------------------------------------------------------- batch format


async def test_batch_is_one_post_with_a_json_array(tmp_path: Path, server: HTTPServer, make_record: MakeRecord) -> None:
    batch = [make_record([Point("t", i), Point("s", {"n": i})], l_uid=100 + i) for i in range(3)]
    headers = {"Authorization": "Bearer abc", "X-Tenant": "acme"}
    async with opened(tmp_path, url=server.url("/in?source=isthmus"), headers=headers) as sink:
        assert await sink.write(batch) is None

    [request] = server.requests
    assert request.method == "POST"
    assert request.target == "/in?source=isthmus"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer abc"
    assert request.headers["x-tenant"] == "acme"
    body = request.json()
    assert body == [json.loads(encode_message(r.message)) for r in batch if r.message]
    assert [m["correlation_id"] for m in body] == [r.frame.correlation_id for r in batch]
    assert [m["l_uid"] for m in body] == [100, 101, 102]
    assert request.body.startswith(b"[" + encode_message(batch[0].message))  # type: ignore[arg-type]


async def test_connection_is_reused_and_empty_batch_sends_nothing(
    tmp_path: Path, server: HTTPServer, make_record: MakeRecord
) -> None:
    async with opened(tmp_path, url=server.url()) as sink:
        assert await sink.write([]) is None
        for _ in range(3):
            assert await sink.write([make_record()]) is None
    assert len(server.requests) == 3


async def test_open_sends_no_request(tmp_path: Path, server: HTTPServer) -> None:
    async with opened(tmp_path, url=server.url()):
        await asyncio.sleep(0.05)
    assert server.requests == []


async def test_write_before_open_is_an_error(tmp_path: Path, make_record: MakeRecord) -> None:
    sink = PLUGIN.create({"url": "http://127.0.0.1:9/"}, SinkContext(name="hook", data_dir=tmp_path))
    with pytest.raises(RetryableSinkError, match="not open"):
        await sink.write([make_record()])


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
async def test_transient_statuses_are_retryable(
    tmp_path: Path, server: HTTPServer, make_record: MakeRecord, status: int
) -> None:
    server.respond = answer(status, b"try later")
    async with opened(tmp_path, url=server.url()) as sink:
        with pytest.raises(RetryableSinkError) as info:
            await sink.write([make_record()])
    reason = str(info.value)
    assert f"HTTP {status}" in reason
    assert server.url() in reason
    assert "try later" in reason


@pytest.mark.parametrize("status", [400, 401, 404, 413, 422, 302])
async def test_other_statuses_are_permanent(
    tmp_path: Path, server: HTTPServer, make_record: MakeRecord, status: int
) -> None:
    server.respond = answer(status, b"field 'x' is invalid")
    async with opened(tmp_path, url=server.url()) as sink:
        with pytest.raises(PermanentSinkError) as info:
            await sink.write([make_record(), make_record()])
    reason = str(info.value)
    assert f"HTTP {status}" in reason
    assert server.url() in reason
    assert reason.endswith(": field 'x' is invalid")


async def test_permanent_reason_quotes_at_most_200_bytes(
    tmp_path: Path, server: HTTPServer, make_record: MakeRecord
) -> None:
    server.respond = answer(400, b"x" * 100_000)
    async with opened(tmp_path, url=server.url()) as sink:
        with pytest.raises(PermanentSinkError) as info:
            await sink.write([make_record()])
        assert str(info.value).endswith(": " + "x" * 200)
        # The big body was abandoned, not read to the end; the sink still works.
        server.respond = ok
        assert await sink.write([make_record()]) is None


async def test_credentials_and_query_are_not_in_reasons(
    tmp_path: Path, server: HTTPServer, make_record: MakeRecord
) -> None:
    server.respond = answer(503)
    url = f"http://user:s3cret@127.0.0.1:{server.port}/hook?token=t0ps3cret"
    async with opened(tmp_path, url=url) as sink:
        with pytest.raises(RetryableSinkError) as info:
            await sink.write([make_record()])
    assert "s3cret" not in str(info.value)
    assert "t0ps3cret" not in str(info.value)
    assert f"127.0.0.1:{server.port}/hook" in str(info.value)
    assert server.requests[0].target == "/hook?token=t0ps3cret"


async def test_closed_port_is_retryable(tmp_path: Path, make_record: MakeRecord) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with opened(tmp_path, url=f"http://127.0.0.1:{port}/hook") as sink:
        with pytest.raises(RetryableSinkError, match="cannot connect") as info:
            await sink.write([make_record()])
    assert f"127.0.0.1:{port}/hook" in str(info.value)


async def test_slow_server_times_out_retryably(tmp_path: Path, server: HTTPServer, make_record: MakeRecord) -> None:
    async def slow(_: Request) -> tuple[int, bytes]:
        await asyncio.sleep(10)
        return 200, b""

    server.respond = slow
    loop = asyncio.get_running_loop()
    async with opened(tmp_path, url=server.url(), timeout=0.2) as sink:
        started = loop.time()
        with pytest.raises(RetryableSinkError, match=r"timed out after 0\.2 s"):
            await sink.write([make_record()])
        assert loop.time() - started < 2


async def test_broken_response_is_retryable(tmp_path: Path, make_record: MakeRecord) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        async with opened(tmp_path, url=f"http://127.0.0.1:{port}/") as sink:
            with pytest.raises(RetryableSinkError, match="broken response"):
                await sink.write([make_record()])
    finally:
        srv.close()
        await srv.wait_closed()


# --------------------------------------------------------------------------- single format


async def test_single_posts_each_message_and_rejects_only_the_refused_one(
    tmp_path: Path, server: HTTPServer, make_record: MakeRecord
) -> None:
    batch = [make_record([Point("n", i)]) for i in range(4)]
    refused = batch[2].frame.correlation_id

    async def respond(request: Request) -> tuple[int, bytes]:
        if request.json()["correlation_id"] == refused:
            return 422, b"bad value"
        return 204, b""

    server.respond = respond
    async with opened(tmp_path, url=server.url(), format="single") as sink:
        result = await sink.write(batch)

    assert result is not None
    assert list(result.rejected) == [2]
    assert "HTTP 422" in result.rejected[2]
    assert "bad value" in result.rejected[2]
    assert [r.json() for r in server.requests] == [json.loads(encode_message(r.message)) for r in batch if r.message]
    assert all(r.headers["content-type"] == "application/json" for r in server.requests)


async def test_single_stops_at_a_transient_failure(tmp_path: Path, server: HTTPServer, make_record: MakeRecord) -> None:
    batch = [make_record([Point("n", i)]) for i in range(4)]

    async def respond(request: Request) -> tuple[int, bytes]:
        return (503, b"") if len(server.requests) == 2 else (200, b"")

    server.respond = respond
    async with opened(tmp_path, url=server.url(), format="single") as sink:
        with pytest.raises(RetryableSinkError, match="HTTP 503"):
            await sink.write(batch)
    assert len(server.requests) == 2


async def test_single_all_accepted(tmp_path: Path, server: HTTPServer, make_record: MakeRecord) -> None:
    async with opened(tmp_path, url=server.url(), format="single") as sink:
        assert await sink.write([make_record(), make_record()]) is None
    assert [type(r.json()) for r in server.requests] == [dict, dict]


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "url: Field required"),
        ({"url": "ftp://example.com/x"}, "http"),
        ({"url": "/relative/path"}, "http"),
        ({"url": "http://"}, "url"),
        ({"url": "http://h/", "timeout": 0}, "timeout"),
        ({"url": "http://h/", "format": "ndjson"}, "format"),
        ({"url": "http://h/", "headers": {"Bad Name": "x"}}, "header name"),
        ({"url": "http://h/", "headers": {"X-A": "a\r\nInjected: 1"}}, "line break"),
        ({"url": "http://h/", "method": "PUT"}, "method: unknown key"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PLUGIN.create(options, SinkContext(name="hook", data_dir=tmp_path))


def test_defaults_and_documentation() -> None:
    config = PLUGIN.config.model_validate({"url": "https://example.com/hook"})
    assert config.model_dump() == {
        "url": "https://example.com/hook",
        "headers": {},
        "timeout": 10.0,
        "format": "batch",
    }
    assert all(f.description for f in PLUGIN.config.model_fields.values())


def test_entry_point_names_this_plugin() -> None:
    [ep] = [ep for ep in entry_points(group="isthmus.sinks") if ep.name == "webhook"]
    assert ep.load() is PLUGIN
    assert PLUGIN.name == "webhook"
