"""The management REST API (``/mgmt/…``), its OpenAPI document and the operational endpoints.

Every ``/mgmt`` endpoint needs ``Authorization: Bearer <token>`` (``GET /mgmt/token`` exchanges
HTTP Basic credentials for one); read-only users may only read. Every error, here and on the
device API, has one shape: ``{"error": {"code": "...", "message": "..."}}``.
Registry calls are synchronous and run in the thread pool (plain ``def`` endpoints); journal
calls are awaited.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from isthmus import __version__
from isthmus.errors import (
    AuthError,
    ConfigError,
    Conflict,
    DecodeError,
    DeviceTimeout,
    DeviceUnreachable,
    Forbidden,
    InvalidRequest,
    IsthmusError,
    JournalError,
    NotFound,
    RegistryError,
)
from isthmus.interfaces import DeadLetter, RecordQuery
from isthmus.message import Record
from isthmus.registry.models import (
    LogicalDevice,
    LogicalDeviceCreate,
    LogicalDevicePatch,
    Mapping,
    PhysicalDevice,
    PhysicalDeviceCreate,
    PhysicalDevicePatch,
    User,
)

if TYPE_CHECKING:
    from isthmus.runtime.supervisor import Runtime

# Most specific class first wins (walk of the MRO). Storage failures are 503: retry later.
_STATUS: dict[type[IsthmusError], int] = {
    Forbidden: 403,
    DeviceUnreachable: 409,
    DeviceTimeout: 504,
    AuthError: 401,
    NotFound: 404,
    Conflict: 409,
    InvalidRequest: 400,
    DecodeError: 400,
    ConfigError: 400,
    RegistryError: 503,
    JournalError: 503,
}


def _status_for(exc: IsthmusError) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape, as a response."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- response models


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenOut(_Out):
    token: str | None = Field(description="An API token for the Authorization: Bearer header.")


class RpcRequest(_Out):
    method: str = Field(min_length=1, max_length=200, description="The method the device should run.")
    params: Any = Field(default_factory=dict, description="Its parameters (any JSON value).")
    timeout: float = Field(10.0, gt=0, le=300, description="Seconds to wait for the device's response.")
    oneway: bool = Field(False, description="Do not wait for a response (202-like: `response` is null).")


class RpcResponse(_Out):
    response: Any = Field(description="The device's response: its JSON value, or its text if not JSON.")


class DeviceStateOut(_Out):
    online: bool = Field(description="Connected now through at least one source session.")
    since: datetime | None = Field(description="When it last came online or went offline (null: not since start).")
    links: int = Field(description="Live sessions (connected or persistent) that can reach the device.")
    last_seen: datetime | None = Field(description="When the device last sent anything.")


class NewUserIn(_Out):
    username: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._@-]+$")
    password: str = Field(min_length=8, max_length=1000)
    read_only: bool = False
    enabled: bool = True


class NewUserOut(_Out):
    user: User
    token: str


class PasswordIn(_Out):
    password: str = Field(min_length=8, max_length=1000)


class CredentialsIn(_Out):
    username: str = Field(
        description="1 to 200 characters, without control characters or surrounding whitespace; "
        "unique across devices (409 when another device has it)."
    )
    password: str = Field(description="1 to 1000 characters. Stored only as an argon2id hash, never returned.")


class TokenActionIn(_Out):
    action: Literal["refresh", "disable", "enable"]


class MappingStartIn(_Out):
    p_uid: int
    l_uid: int
    start: datetime | None = Field(None, description="Start time (default: now). Must be timezone-aware.")


class MappingRefIn(_Out):
    p_uid: int | None = None
    l_uid: int | None = None


class MappingsOut(_Out):
    current: Mapping | None
    history: list[Mapping]


class MessageOut(_Out):
    seq: int
    correlation_id: str
    received_at: datetime
    source: str
    p_uid: int | None
    l_uid: int | None
    kind: str
    status: str
    error: str | None
    content_type: str
    payload: str
    payload_encoding: Literal["utf-8", "base64"]
    message: dict[str, Any] | None
    replay_of: int | None = None


class PointOut(_Out):
    l_uid: int
    name: str
    timestamp: datetime
    value: Any
    correlation_id: str


class SinkOut(_Out):
    name: str
    type: str
    state: str
    last_error: str | None
    cursor: int
    lag: int
    delivered: int
    dead_lettered: int
    skipped: int


class RedriveIn(_Out):
    sink: str = Field(description="The sink whose dead letters to deliver again.")
    ids: list[int] | None = Field(None, description="Dead letter ids (default: the oldest not yet redriven).")
    limit: int = Field(1000, ge=1, le=10_000, description="Most dead letters to redrive when ids is not given.")


class RedriveOut(_Out):
    redriven: int = Field(description="Dead letters delivered and marked redriven.")
    failed: int = Field(description="Dead letters that failed again (they stay dead-lettered).")
    reason: str | None = Field(description="Why the failed ones failed.")


class DeadLetterOut(_Out):
    id: int
    sink: str
    seq: int
    correlation_id: str
    stage: str
    reason: str
    attempts: int
    created_at: datetime
    payload: str
    payload_encoding: Literal["utf-8", "base64"]
    message: dict[str, Any] | None
    redriven: bool = Field(description="Delivered later by a redrive.")


def _payload(data: bytes) -> tuple[str, Literal["utf-8", "base64"]]:
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _message_out(r: Record) -> MessageOut:
    payload, encoding = _payload(r.frame.payload)
    return MessageOut(
        seq=r.seq,
        correlation_id=r.frame.correlation_id,
        received_at=r.frame.received_at,
        source=r.frame.source,
        p_uid=r.p_uid,
        l_uid=r.l_uid,
        kind=r.frame.kind,
        status=r.status.value,
        error=r.error,
        content_type=r.frame.content_type,
        payload=payload,
        payload_encoding=encoding,
        message=msgspec.to_builtins(r.message) if r.message is not None else None,
        replay_of=r.replay_of,
    )


# ----------------------------------------------------------------------------- authentication

_bearer = HTTPBearer(auto_error=False)
_basic = HTTPBasic(auto_error=False)


def current_user(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    """The user behind the bearer token; AuthError (401) without a valid one."""
    if creds is None:
        raise AuthError("missing bearer token (Authorization: Bearer <token>)")
    runtime: Runtime = request.app.state.runtime
    return runtime.store.user_for_token(creds.credentials)


def writer(user: Annotated[User, Depends(current_user)]) -> User:
    """The current user, if allowed to change things; Forbidden (403) for read-only users."""
    if user.read_only:
        raise Forbidden(f"user {user.username!r} is read-only")
    return user


Reader = Annotated[User, Depends(current_user)]
Writer = Annotated[User, Depends(writer)]


# ----------------------------------------------------------------------------- the app


def management_app(rt: Runtime) -> FastAPI:
    """Build the FastAPI application for one runtime (no module-level app, no global state)."""
    app = FastAPI(
        title="Isthmus",
        version=__version__,
        description="Management API of the Isthmus IoT telemetry gateway. Device-facing endpoints "
        "(`/api/v1/{token}/telemetry`, `/attributes`) are documented in the README.",
    )
    app.state.runtime = rt
    store = rt.store

    @app.exception_handler(IsthmusError)
    async def _isthmus_error(request: Request, exc: IsthmusError) -> JSONResponse:
        status = _status_for(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return error_response(status, exc.code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"] if x != "body") or "body"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            parts.append(f"{loc}: {msg}")
        return error_response(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"no such endpoint: {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, code, message)

    # --------------------------------------------------------------- operational

    @app.get("/health", tags=["operations"], summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["operations"],
        summary="Readiness: journal writable, no sink failing",
        responses={503: {"description": "Not ready; the body says why."}},
    )
    async def ready() -> JSONResponse:
        problems = rt.readiness_problems()
        body = {"status": "ready" if not problems else "not_ready", "problems": problems}
        return JSONResponse(body, status_code=200 if not problems else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        rt.refresh_gauges()
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --------------------------------------------------------------- auth

    @app.get("/mgmt/token", tags=["auth"], summary="Exchange HTTP Basic credentials for an API token")
    def login(creds: Annotated[HTTPBasicCredentials | None, Depends(_basic)]) -> TokenOut:
        if creds is None:
            raise AuthError("missing HTTP Basic credentials")
        store.verify_password(creds.username, creds.password)
        return TokenOut(token=store.issue_token(creds.username))

    # --------------------------------------------------------------- physical devices

    @app.get("/mgmt/physical", tags=["physical devices"])
    def list_physical(
        _: Reader, source: str | None = None, unmapped: bool = False, properties: bool = True
    ) -> list[PhysicalDevice]:
        devices = store.list_physical(source=source, unmapped=unmapped)
        return devices if properties else [d.model_copy(update={"properties": {}}) for d in devices]

    @app.post("/mgmt/physical", tags=["physical devices"], status_code=201)
    def create_physical(_: Writer, body: PhysicalDeviceCreate) -> PhysicalDevice:
        _check_decoder(rt, body.decoder)
        return store.create_physical(body)

    @app.get("/mgmt/physical/{uid}", tags=["physical devices"])
    def get_physical(_: Reader, uid: int) -> PhysicalDevice:
        return store.get_physical(uid)

    @app.patch("/mgmt/physical/{uid}", tags=["physical devices"])
    def update_physical(_: Writer, uid: int, body: PhysicalDevicePatch) -> PhysicalDevice:
        _check_decoder(rt, body.decoder)
        return store.update_physical(uid, body)

    @app.delete("/mgmt/physical/{uid}", tags=["physical devices"])
    def delete_physical(_: Writer, uid: int) -> PhysicalDevice:
        return store.delete_physical(uid)

    @app.get(
        "/mgmt/physical/{uid}/attributes",
        tags=["physical devices"],
        summary="The device's latest client and shared attributes",
    )
    async def get_attributes(_: Reader, uid: int) -> dict[str, dict[str, Any]]:
        return {
            "client": await rt.attributes.get(uid, "client", None),
            "shared": await rt.attributes.get(uid, "shared", None),
        }

    @app.put(
        "/mgmt/physical/{uid}/attributes",
        tags=["physical devices"],
        summary="Set shared attributes (merged into the existing ones)",
        description="The changed attributes are pushed at once to the device's sessions that subscribed to "
        "attribute updates (MQTT `v1/devices/me/attributes`, or `v1/gateway/attributes` through a gateway), "
        "and queued for persistent sessions while the device is offline.",
    )
    async def set_attributes(_: Writer, uid: int, body: dict[str, Any]) -> dict[str, Any]:
        await rt.in_thread(store.get_physical, uid)
        await rt.attributes.set_shared(uid, body)
        rt.downlink.push_attributes(uid, body)
        return await rt.attributes.get(uid, "shared", None)

    @app.post(
        "/mgmt/physical/{uid}/rpc",
        tags=["physical devices"],
        summary="Call a method on the device (server-side RPC)",
        description="Sent to the device's connected session subscribed to RPC requests (MQTT "
        "`v1/devices/me/rpc/request/+`, or `v1/gateway/rpc` through a gateway), else queued in its persistent "
        "session. Two-way calls wait up to `timeout` seconds for the device's response: 409 when no session "
        "takes the request, 504 when the device does not answer in time.",
        responses={409: {"description": "device not reachable"}, 504: {"description": "no response in time"}},
    )
    async def call_device(_: Writer, uid: int, body: RpcRequest) -> RpcResponse:
        await rt.in_thread(store.get_physical, uid)
        response = await rt.downlink.rpc(uid, body.method, body.params, within=body.timeout, oneway=body.oneway)
        return RpcResponse(response=response)

    @app.get("/mgmt/physical/{uid}/state", tags=["physical devices"], summary="Online state and last_seen")
    async def device_state(_: Reader, uid: int) -> DeviceStateOut:
        device = await rt.in_thread(store.get_physical, uid)
        state = rt.downlink.state(uid)
        times = [t for t in (device.last_seen, rt.cache.unflushed_seen(uid)) if t is not None]
        last_seen = max(times, default=None)
        return DeviceStateOut(online=state.online, since=state.since, links=state.links, last_seen=last_seen)

    @app.put(
        "/mgmt/physical/{uid}/credentials",
        tags=["physical devices"],
        summary="Set the device's username + password credential (MQTT), replacing any it had",
        description="ThingsBoard's MQTT Basic credentials without the client id: the device connects with this "
        "user name and password. Answers the device, which shows the `username`; the password is never shown. "
        "400 for an empty or over-long username or password, 409 when another device has the username.",
        responses={409: {"description": "username in use by another device"}},
    )
    def set_credentials(_: Writer, uid: int, body: CredentialsIn) -> PhysicalDevice:
        return store.set_credentials(uid, body.username, body.password)

    @app.delete(
        "/mgmt/physical/{uid}/credentials",
        tags=["physical devices"],
        summary="Remove the device's username + password credential (its access token keeps working)",
        responses={404: {"description": "no such device, or it has no username + password credential"}},
    )
    def remove_credentials(_: Writer, uid: int) -> PhysicalDevice:
        return store.remove_credentials(uid)

    # --------------------------------------------------------------- logical devices

    @app.get("/mgmt/logical", tags=["logical devices"])
    def list_logical(_: Reader, properties: bool = True) -> list[LogicalDevice]:
        devices = store.list_logical()
        return devices if properties else [d.model_copy(update={"properties": {}}) for d in devices]

    @app.post("/mgmt/logical", tags=["logical devices"], status_code=201)
    def create_logical(_: Writer, body: LogicalDeviceCreate) -> LogicalDevice:
        return store.create_logical(body)

    @app.get("/mgmt/logical/{uid}", tags=["logical devices"])
    def get_logical(_: Reader, uid: int) -> LogicalDevice:
        return store.get_logical(uid)

    @app.patch("/mgmt/logical/{uid}", tags=["logical devices"])
    def update_logical(_: Writer, uid: int, body: LogicalDevicePatch) -> LogicalDevice:
        return store.update_logical(uid, body)

    @app.delete("/mgmt/logical/{uid}", tags=["logical devices"])
    def delete_logical(_: Writer, uid: int) -> LogicalDevice:
        return store.delete_logical(uid)

    # --------------------------------------------------------------- mappings

    @app.get("/mgmt/mappings", tags=["mappings"], summary="Current mapping and history of one device")
    def get_mappings(_: Reader, p_uid: int | None = None, l_uid: int | None = None) -> MappingsOut:
        _exactly_one(p_uid, l_uid)
        return MappingsOut(
            current=store.current_mapping(p_uid=p_uid, l_uid=l_uid),
            history=store.mapping_history(p_uid=p_uid, l_uid=l_uid),
        )

    @app.post(
        "/mgmt/mappings",
        tags=["mappings"],
        status_code=201,
        summary="Map a physical device to a logical device (ends their current mappings)",
    )
    def start_mapping(_: Writer, body: MappingStartIn) -> Mapping:
        return store.start_mapping(body.p_uid, body.l_uid, body.start)

    @app.post("/mgmt/mappings/end", tags=["mappings"])
    def end_mapping(_: Writer, body: MappingRefIn) -> Mapping:
        _exactly_one(body.p_uid, body.l_uid)
        return store.end_mapping(p_uid=body.p_uid, l_uid=body.l_uid)

    @app.post("/mgmt/mappings/pause", tags=["mappings"])
    def pause_mapping(_: Writer, body: MappingRefIn) -> Mapping:
        return store.pause_mapping(_required_puid(body))

    @app.post("/mgmt/mappings/resume", tags=["mappings"])
    def resume_mapping(_: Writer, body: MappingRefIn) -> Mapping:
        return store.resume_mapping(_required_puid(body))

    # --------------------------------------------------------------- users

    @app.get("/mgmt/users", tags=["users"])
    def list_users(_: Reader) -> list[User]:
        return store.list_users()

    @app.post("/mgmt/users", tags=["users"], status_code=201)
    def add_user(_: Writer, body: NewUserIn) -> NewUserOut:
        user, token = store.add_user(body.username, body.password, read_only=body.read_only, enabled=body.enabled)
        return NewUserOut(user=user, token=token)

    @app.delete("/mgmt/users/{username}", tags=["users"], status_code=204, response_class=Response)
    def remove_user(user: Writer, username: str) -> Response:
        store.remove_user(username)
        return Response(status_code=204)

    @app.put("/mgmt/users/{username}/password", tags=["users"], status_code=204, response_class=Response)
    def change_password(_: Writer, username: str, body: PasswordIn) -> Response:
        store.set_password(username, body.password)
        return Response(status_code=204)

    @app.post("/mgmt/users/{username}/token", tags=["users"], summary="Refresh, disable or enable a user's tokens")
    def user_token(_: Writer, username: str, body: TokenActionIn) -> TokenOut:
        if body.action == "refresh":
            return TokenOut(token=store.refresh_tokens(username))
        store.set_tokens_enabled(username, body.action == "enable")
        return TokenOut(token=None)

    # --------------------------------------------------------------- messages and timeseries

    @app.get("/mgmt/messages", tags=["data"], summary="Raw messages with their correlation ids, newest first")
    async def messages(
        _: Reader,
        p_uid: int | None = None,
        l_uid: int | None = None,
        correlation_id: str | None = None,
        status: Literal["ok", "decode_error", "quarantined"] | None = None,
        unmapped: bool = False,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[MessageOut]:
        records = await rt.journal.query(
            RecordQuery(
                p_uid=p_uid,
                l_uid=l_uid,
                status=status,
                correlation_id=correlation_id,
                since=_aware(since, "since"),
                until=_aware(until, "until"),
                limit=limit,
                unmapped=unmapped,
            )
        )
        return [_message_out(r) for r in records]

    @app.get("/mgmt/timeseries", tags=["data"], summary="Stored points of a logical device, oldest first")
    async def timeseries(
        _: Reader,
        l_uid: int,
        name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
        sink: str | None = None,
    ) -> list[PointOut]:
        reader = rt.timeseries_reader(sink)
        points = await reader.query(l_uid, name, _aware(since, "since"), _aware(until, "until"), limit)
        return [
            PointOut(l_uid=p.l_uid, name=p.name, timestamp=p.timestamp, value=p.value, correlation_id=p.correlation_id)
            for p in points
        ]

    # --------------------------------------------------------------- sinks and dead letters

    @app.get("/mgmt/sinks", tags=["sinks"], summary="Health, position and books of every sink")
    async def sinks(_: Reader) -> list[SinkOut]:
        return [
            SinkOut(
                name=r.name,
                type=r.type_name,
                state=r.state.value,
                last_error=r.last_error,
                cursor=r.cursor.seq,
                lag=r.lag,
                delivered=r.cursor.delivered,
                dead_lettered=r.cursor.dead_lettered,
                skipped=r.cursor.skipped,
            )
            for r in rt.runners.values()
        ]

    @app.get("/mgmt/dead-letters", tags=["sinks"], summary="Dead letters, oldest first")
    async def dead_letters(
        _: Reader,
        sink: str | None = None,
        after_id: int = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[DeadLetterOut]:
        return [_dead_letter_out(d) for d in await rt.journal.dead_letters(sink, after_id=after_id, limit=limit)]

    @app.post("/mgmt/dead-letters/redrive", tags=["sinks"], summary="Deliver dead letters to their sink again")
    async def redrive(_: Writer, body: RedriveIn) -> RedriveOut:
        runner = rt.runners.get(body.sink)
        if runner is None:
            raise NotFound(f"no running sink named {body.sink!r}")
        if body.ids is None:
            letters = await rt.journal.dead_letters(body.sink, limit=body.limit, pending_only=True)
        else:
            letters = [await rt.journal.dead_letter(i) for i in body.ids]
            foreign = [d.id for d in letters if d.sink != body.sink]
            if foreign:
                raise InvalidRequest(f"dead letters {foreign} belong to another sink")
        result = await runner.redrive(letters)
        return RedriveOut(redriven=result.redriven, failed=result.failed, reason=result.reason)

    @app.get("/mgmt/dead-letters/{dl_id}", tags=["sinks"])
    async def dead_letter(_: Reader, dl_id: int) -> DeadLetterOut:
        return _dead_letter_out(await rt.journal.dead_letter(dl_id))

    return app


def _dead_letter_out(d: DeadLetter) -> DeadLetterOut:
    payload, encoding = _payload(d.payload)
    message = msgspec.json.decode(d.message) if d.message else None
    return DeadLetterOut(
        id=d.id,
        sink=d.sink,
        seq=d.seq,
        correlation_id=d.correlation_id,
        stage=d.stage,
        reason=d.reason,
        attempts=d.attempts,
        created_at=d.created_at,
        payload=payload,
        payload_encoding=encoding,
        message=message,
        redriven=d.redriven,
    )


def _exactly_one(p_uid: int | None, l_uid: int | None) -> None:
    if (p_uid is None) == (l_uid is None):
        raise InvalidRequest("give exactly one of p_uid and l_uid")


def _required_puid(body: MappingRefIn) -> int:
    if body.p_uid is None or body.l_uid is not None:
        raise InvalidRequest("give p_uid (mappings are paused and resumed by physical device)")
    return body.p_uid


def _aware(ts: datetime | None, name: str) -> datetime | None:
    if ts is not None and ts.tzinfo is None:
        raise InvalidRequest(f"{name} must include a timezone (e.g. 2026-11-22T10:00:00Z)")
    return ts


def _check_decoder(rt: Runtime, name: str | None) -> None:
    if name is not None and name not in rt.decoders:
        known = ", ".join(sorted(rt.decoders))
        raise InvalidRequest(f"unknown decoder {name!r} (known: {known})")
