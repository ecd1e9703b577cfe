"""The device-facing HTTP API, ThingsBoard-compatible, as a lean ASGI application.

* ``POST /api/v1/{token}/telemetry`` and ``POST /api/v1/{token}/attributes``: 200 (empty body)
  once the frame is durably journaled; 400 with the error shape when it could not be decoded or
  was quarantined (the frame is journaled all the same); 401 unknown or revoked token; 413 body
  over ``http.max_payload``; 415 a content type other than JSON; 503 when the journal cannot
  store anything (the device should retry).
* ``GET /api/v1/{token}/attributes?clientKeys=a,b&sharedKeys=c``: the device's latest client
  attributes and the shared attributes set by operators, ``{"client": {…}, "shared": {…}}``.
* The way back, by long polling (``timeout`` in milliseconds, default 20,000, at most 300,000):
  ``GET /api/v1/{token}/attributes/updates?timeout=…`` answers the next shared-attribute update
  ``{"key": value, …}``; ``GET /api/v1/{token}/rpc?timeout=…`` the next server-side RPC request
  ``{"id", "method", "params"}``; both 408 when nothing came in time. While a poll waits, the
  device is online and reachable through the :class:`~isthmus.interfaces.Downlink`.
  ``POST /api/v1/{token}/rpc/{id}`` answers request ``id`` (404 when nobody waits for it);
  ``POST /api/v1/{token}/rpc`` with ``{"method", "params"}`` is a client-side RPC, answered in the
  response body.

This path runs for every device request, so it is plain ASGI: no routing framework, no
dependency injection, no response models (``docs/decisions/0002-device-http-path.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import msgspec

from isthmus.errors import JournalError
from isthmus.interfaces import DeviceDirectory, DeviceRef, Downlink
from isthmus.message import Kind, RawFrame, Status, new_correlation_id, utcnow
from isthmus.runtime.ingest import IngestService
from isthmus.runtime.metrics import Metrics
from isthmus.sinks.attributes import AttributeStore

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

SOURCE = "http"
_JSON_HEADERS = [(b"content-type", b"application/json")]
_encoder = msgspec.json.Encoder()


class _TooLarge(Exception):  # noqa: N818 - internal control flow
    pass


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The one JSON error shape of every Isthmus HTTP API: ``{"error": {"code", "message", …}}``."""
    return _encoder.encode({"error": {"code": code, "message": message, **extra}})


def _json_content_type(value: bytes) -> bool:
    media = value.split(b";", 1)[0].strip().lower()
    return media in (b"", b"application/json", b"text/json") or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


class DeviceAPI:
    """ASGI app for ``/api/v1/{token}/…``. Never raises to the server for a device's mistake."""

    def __init__(
        self,
        ingest: IngestService,
        directory: DeviceDirectory,
        attributes: AttributeStore,
        metrics: Metrics,
        max_payload: int,
        downlink: Downlink,
    ) -> None:
        self.ingest = ingest
        self.directory = directory
        self.attributes = attributes
        self.downlink = downlink
        self.max_payload = max_payload
        self._rejected = metrics.frames_rejected
        self._unauthorized = error_body("unauthorized", "unknown or revoked device token")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request (``scope["type"] == "http"`` is assumed)."""
        parts = scope["path"].split("/")
        # ['', 'api', 'v1', token, endpoint]
        if len(parts) >= 5 and parts[3] and (parts[4] == "rpc" or parts[4:] == ["attributes", "updates"]):
            await self._downlink(scope, receive, send, parts[3], parts[4:])
            return
        if len(parts) != 5 or parts[4] not in ("telemetry", "attributes") or not parts[3]:
            await _respond(send, 404, error_body("not_found", f"no device endpoint at {scope['path']}"))
            return
        token, endpoint = parts[3], parts[4]
        method = scope["method"]
        if method == "POST":
            await self._post(scope, receive, send, token, "telemetry" if endpoint == "telemetry" else "attributes")
        elif method == "GET" and endpoint == "attributes":
            await self._get_attributes(scope, send, token)
        else:
            await _respond(
                send,
                405,
                error_body("method_not_allowed", f"{method} is not allowed on /{endpoint}"),
                [(b"allow", b"POST" if endpoint == "telemetry" else b"GET, POST")],
            )

    async def _post(self, scope: Scope, receive: Receive, send: Send, token: str, kind: Kind) -> None:
        device = self.directory.by_token(token)
        if device is None:
            self._rejected.labels(SOURCE, "unauthorized").inc()
            await _drain(receive, self.max_payload)
            await _respond(send, 401, self._unauthorized)
            return
        content_type = b""
        declared = -1
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        if declared > self.max_payload:
            await self._too_large(send)
            return
        try:
            body = await _read_body(receive, self.max_payload)
        except _TooLarge:
            await self._too_large(send)
            return
        error = None
        if not _json_content_type(content_type):
            error = f"unsupported content type {content_type.decode('latin-1')!r}: send application/json"
        frame = RawFrame(
            correlation_id=new_correlation_id(),
            received_at=utcnow(),
            source=SOURCE,
            payload=body,
            kind=kind,
            content_type=content_type.decode("latin-1"),
        )
        try:
            result = await self.ingest.submit(frame, device, error=error)
        except JournalError as exc:
            log.error("journal unavailable, refusing frame: %s", exc, extra={"correlation_id": frame.correlation_id})
            await _respond(
                send,
                503,
                error_body("unavailable", "cannot store the message now; retry later"),
                [(b"retry-after", b"1")],
            )
            return
        if result is None:  # pragma: no cover - submit(wait=True) always returns a result
            raise RuntimeError("ingest returned no result for a waited submit")
        record = result.record
        if record.status is Status.OK:
            await _respond(send, 200, b"", [])
            return
        code = "quarantined" if record.status is Status.QUARANTINED else "decode_error"
        if error is not None:
            code = "unsupported_media_type"
        status = 415 if error is not None else 400
        await _respond(send, status, error_body(code, record.error or code, correlation_id=frame.correlation_id))

    async def _too_large(self, send: Send) -> None:
        self._rejected.labels(SOURCE, "too_large").inc()
        await _respond(
            send,
            413,
            error_body("payload_too_large", f"body larger than {self.max_payload} bytes"),
            [(b"connection", b"close")],
        )

    async def _get_attributes(self, scope: Scope, send: Send, token: str) -> None:
        device = self.directory.by_token(token)
        if device is None:
            await _respond(send, 401, self._unauthorized)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        result = await self.attributes.request(
            device.p_uid, _keys(query.get("clientKeys")), _keys(query.get("sharedKeys"))
        )
        await _respond(send, 200, _encoder.encode(result))

    # ------------------------------------------------------------------ the way back

    async def _downlink(self, scope: Scope, receive: Receive, send: Send, token: str, rest: list[str]) -> None:
        method = scope["method"]
        device = self.directory.by_token(token)
        if device is None:
            await _drain(receive, self.max_payload)
            await _respond(send, 401, self._unauthorized)
            return
        if method == "GET" and len(rest) in (1, 2) and (rest == ["rpc"] or rest[1:] == ["updates"]):
            await self._poll(scope, receive, send, device, "rpc" if rest == ["rpc"] else "attributes")
        elif method == "POST" and rest[0] == "rpc" and len(rest) <= 2:
            try:
                body = await _read_body(receive, self.max_payload)
            except _TooLarge:
                await self._too_large(send)
                return
            if len(rest) == 2:
                await self._rpc_response(send, device, rest[1], body)
            else:
                await self._client_rpc(send, device, body)
        else:
            await _respond(send, 405, error_body("method_not_allowed", f"{method} is not allowed here"))

    async def _poll(self, scope: Scope, receive: Receive, send: Send, device: DeviceRef, wants: str) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            timeout_ms = int(query.get("timeout", ["20000"])[0])
        except ValueError:
            await _respond(send, 400, error_body("invalid_request", "timeout must be an integer (milliseconds)"))
            return
        link = _Poll(wants)
        self.downlink.attach(device.p_uid, link)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait(
                (link.result, gone), timeout=min(max(timeout_ms, 1), 300_000) / 1000, return_when="FIRST_COMPLETED"
            )
        finally:
            link.connected = False
            self.downlink.detach(device.p_uid, link)
            gone.cancel()
        if link.result in done:
            await _respond(send, 200, _encoder.encode(link.result.result()))
        elif gone not in done:
            await _respond(send, 408, error_body("timeout", f"no {wants} for the device within {timeout_ms} ms"))

    async def _rpc_response(self, send: Send, device: DeviceRef, request_id: str, body: bytes) -> None:
        try:
            answer: Any = msgspec.json.decode(body) if body.strip() else None
        except msgspec.DecodeError:
            answer = body.decode("utf-8", "replace")
        if request_id.isdigit() and self.downlink.rpc_response(device.p_uid, int(request_id), answer):
            await _respond(send, 200, b"", [])
        else:
            await _respond(send, 404, error_body("not_found", f"no RPC request {request_id} waits for an answer"))

    async def _client_rpc(self, send: Send, device: DeviceRef, body: bytes) -> None:
        try:
            request = msgspec.json.decode(body)
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise ValueError("expected a JSON object with a string method")
        except (ValueError, msgspec.DecodeError) as exc:
            await _respond(send, 400, error_body("invalid_request", f"bad RPC request: {exc}"))
            return
        result = await self.downlink.client_rpc(device.p_uid, request["method"], request.get("params"))
        await _respond(send, 200, _encoder.encode(result))


class _Poll:
    """A long poll waiting for one shared-attribute update or RPC request: a one-shot DeviceLink."""

    def __init__(self, wants: str) -> None:
        self.wants = wants
        self.connected = True
        self.result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def push_attributes(self, p_uid: int, values: Any) -> bool:
        if self.wants != "attributes" or self.result.done() or not self.connected:
            return False
        self.result.set_result(dict(values))
        return True

    def send_rpc(self, p_uid: int, request_id: int, method: str, params: Any) -> bool:
        if self.wants != "rpc" or self.result.done() or not self.connected:
            return False
        self.result.set_result({"id": request_id, "method": method, "params": params})
        return True


async def _disconnected(receive: Receive) -> None:
    """Return when the client goes away (ASGI ``http.disconnect``)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _keys(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [k for v in values for k in v.split(",") if k]


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _drain(receive: Receive, limit: int) -> None:
    """Read and discard a request body we refuse, up to ``limit`` bytes."""
    with contextlib.suppress(_TooLarge):
        await _read_body(receive, limit)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    hdrs = list(_JSON_HEADERS if body else [])
    if headers:
        hdrs.extend(headers)
    hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})
