"""The instance's :class:`~isthmus.interfaces.Downlink`: which devices are reachable, and how.

Sources attach a :class:`~isthmus.interfaces.DeviceLink` per device they can reach; the
management API pushes shared attributes and calls RPC methods through this hub, which picks the
links and matches responses to waiting callers. Everything runs on the event loop: no locks.

Online state is derived: a device is online while at least one of its links is connected. A
Prometheus gauge counts online devices; each transition is logged at debug level.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from isthmus.errors import DeviceTimeout, DeviceUnreachable
from isthmus.interfaces import DeviceLink, DeviceState
from isthmus.message import utcnow

log = logging.getLogger(__name__)

ClientMethod = Callable[[int, Any], Awaitable[Any]]
"""A client-side RPC method: ``(p_uid, params) -> result`` (JSON-serialisable)."""


async def _current_time(p_uid: int, params: Any) -> Any:
    return {"time": int(time.time() * 1000)}


class DownlinkHub:
    """Implements :class:`~isthmus.interfaces.Downlink` for one instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._links: dict[int, list[DeviceLink]] = {}
        self._online: set[int] = set()
        self._since: dict[int, datetime] = {}
        self._waiting: dict[tuple[int, int], asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._methods: dict[str, ClientMethod] = {"getCurrentTime": _current_time}
        self._gauge = Gauge(
            "isthmus_devices_online", "Devices connected through at least one source link.", registry=registry
        )
        self._rpc = Counter(
            "isthmus_rpc_requests",
            "Server-side RPC requests by outcome (answered, oneway, timeout, unreachable).",
            ["outcome"],
            registry=registry,
        )

    # ------------------------------------------------------------------ links and state

    def attach(self, p_uid: int, link: DeviceLink) -> None:
        links = self._links.setdefault(p_uid, [])
        if link not in links:
            links.append(link)
        self.changed(p_uid)

    def detach(self, p_uid: int, link: DeviceLink) -> None:
        links = self._links.get(p_uid)
        if links is not None and link in links:
            links.remove(link)
            if not links:
                del self._links[p_uid]
        self.changed(p_uid)

    def changed(self, p_uid: int) -> None:
        online = any(link.connected for link in self._links.get(p_uid, ()))
        if online == (p_uid in self._online):
            return
        self._since[p_uid] = utcnow()
        if online:
            self._online.add(p_uid)
            self._gauge.inc()
        else:
            self._online.discard(p_uid)
            self._gauge.dec()
        log.debug("device %d is %s", p_uid, "online" if online else "offline")

    def state(self, p_uid: int) -> DeviceState:
        return DeviceState(
            online=p_uid in self._online,
            since=self._since.get(p_uid),
            links=len(self._links.get(p_uid, ())),
        )

    # ------------------------------------------------------------------ attributes

    def push_attributes(self, p_uid: int, values: Mapping[str, Any]) -> int:
        if not values:
            return 0
        return sum(1 for link in list(self._links.get(p_uid, ())) if link.push_attributes(p_uid, values))

    # ------------------------------------------------------------------ RPC

    async def rpc(self, p_uid: int, method: str, params: Any, *, within: float, oneway: bool = False) -> Any:
        request_id = next(self._ids) & 0x7FFFFFFF
        key = (p_uid, request_id)
        future: asyncio.Future[Any] | None = None
        if not oneway:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
        try:
            # Connected links first: a persistent session only queues the request.
            links = sorted(self._links.get(p_uid, ()), key=lambda link: not link.connected)
            if not any(link.send_rpc(p_uid, request_id, method, params) for link in links):
                self._rpc.labels("unreachable").inc()
                raise DeviceUnreachable(
                    f"device {p_uid} is not connected, or has not subscribed to RPC requests"
                    if not links
                    else f"device {p_uid} takes no RPC requests now (not subscribed, or its queue is full)"
                )
            if future is None:
                self._rpc.labels("oneway").inc()
                return None
            try:
                result = await asyncio.wait_for(future, within)
            except TimeoutError:
                self._rpc.labels("timeout").inc()
                raise DeviceTimeout(f"device {p_uid} did not answer RPC {method!r} within {within:g} s") from None
            self._rpc.labels("answered").inc()
            return result
        finally:
            self._waiting.pop(key, None)

    def rpc_response(self, p_uid: int, request_id: int, response: Any) -> bool:
        future = self._waiting.pop((p_uid, request_id), None)
        if future is None or future.done():
            return False
        future.set_result(response)
        return True

    async def client_rpc(self, p_uid: int, method: str, params: Any) -> Any:
        handler = self._methods.get(method)
        if handler is None:
            return {"error": f"unknown method {method!r}; the server offers {sorted(self._methods)}"}
        return await handler(p_uid, params)
