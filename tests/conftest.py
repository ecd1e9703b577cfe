"""Shared fixtures: a real Isthmus instance (real SQLite files, real uvicorn on loopback)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from isthmus.config import SinkConfig, load_config
from isthmus.runtime.supervisor import Runtime, _Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Instance:
    """A running Isthmus: its runtime, base URL, admin client and device client."""

    runtime: Runtime
    url: str
    admin: httpx.AsyncClient
    http: httpx.AsyncClient
    data_dir: Path

    async def device(self, name: str = "dev", *, map_to: str | None = None, **extra: Any) -> dict[str, Any]:
        """Create a physical device (and optionally a logical one it maps to)."""
        r = await self.admin.post("/mgmt/physical", json={"name": name, **extra})
        assert r.status_code == 201, r.text
        dev: dict[str, Any] = r.json()
        if map_to is not None:
            r = await self.admin.post("/mgmt/logical", json={"name": map_to})
            assert r.status_code == 201, r.text
            dev["l_uid"] = r.json()["uid"]
            r = await self.admin.post("/mgmt/mappings", json={"p_uid": dev["uid"], "l_uid": dev["l_uid"]})
            assert r.status_code == 201, r.text
        return dev

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Poll an async predicate until it returns something truthy."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = await predicate()
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"condition not reached within {timeout} s (last: {result!r})")
            await asyncio.sleep(0.05)


async def start_instance(
    data_dir: Path, extra_env: Mapping[str, str] | None = None, sinks: list[dict[str, Any]] | None = None
) -> tuple[Runtime, _Server, asyncio.Task[None], int]:
    port = free_port()
    env = {
        "ISTHMUS_DATA_DIR": str(data_dir),
        "ISTHMUS_HTTP__HOST": "127.0.0.1",
        "ISTHMUS_HTTP__PORT": str(port),
        **(extra_env or {}),
    }
    cfg = load_config(None, env)
    if sinks is not None:
        cfg = cfg.model_copy(update={"sinks": [SinkConfig(**s) for s in sinks]})
    rt = Runtime(cfg)
    await rt.start()
    server = _Server(
        uvicorn.Config(
            rt.asgi_app(), host="127.0.0.1", port=cfg.http.port, lifespan="off", log_config=None, access_log=False
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return rt, server, task, cfg.http.port


@pytest.fixture
async def instance_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    running: list[tuple[Runtime, _Server, asyncio.Task[None], list[httpx.AsyncClient]]] = []

    async def make(
        extra_env: Mapping[str, str] | None = None,
        sinks: list[dict[str, Any]] | None = None,
        data_dir: Path | None = None,
    ) -> Instance:
        d = data_dir or tmp_path / f"data{len(running)}"
        rt, server, task, port = await start_instance(d, extra_env, sinks)
        url = f"http://127.0.0.1:{port}"
        token = (d / "admin.token").read_text().strip()
        admin = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"})
        http = httpx.AsyncClient(base_url=url)
        running.append((rt, server, task, [admin, http]))
        return Instance(rt, url, admin, http, d)

    yield make
    for rt, server, task, clients in running:
        for c in clients:
            await c.aclose()
        server.should_exit = True
        await task
        await rt.stop()


@pytest.fixture
async def instance(instance_factory: Callable[..., Any]) -> Instance:
    inst: Instance = await instance_factory()
    return inst
