"""Sources as plugins: configured, started with the runtime, restarted after a crash, stopped first."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from isthmus.config import SourceConfig, load_config
from isthmus.errors import ConfigError
from isthmus.interfaces import Ingest, RecordQuery
from isthmus.message import RawFrame, new_correlation_id, utcnow
from isthmus.plugins import PluginConfig, Plugins, SourceContext, SourcePlugin
from isthmus.runtime.supervisor import Runtime


class FlakyOptions(PluginConfig):
    device: str = "pump-1"


class FlakySource:
    """Crashes on its first run (a plugin bug), then sends one frame and idles."""

    runs = 0
    cancelled = False

    def __init__(self, options: FlakyOptions, ctx: SourceContext) -> None:
        self.options = options
        self.ctx = ctx

    async def run(self, ingest: Ingest) -> None:
        type(self).runs += 1
        if type(self).runs == 1:
            raise RuntimeError("plugin bug")
        device = await self.ctx.resolver.resolve(self.ctx.name, {"device": self.options.device}, "accept")
        assert device is not None
        await ingest.submit(RawFrame(new_correlation_id(), utcnow(), self.ctx.name, b'{"flow": 1}'), device)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            type(self).cancelled = True
            raise


def plugins_with_flaky() -> Plugins:
    found = Plugins.discover()
    flaky = SourcePlugin(name="flaky", description="test", config=FlakyOptions, factory=FlakySource)
    return Plugins(found.sinks, found.decoders, {"flaky": flaky})


async def test_a_crashing_source_is_restarted_and_its_frames_are_journaled(tmp_path: Path) -> None:
    config = load_config(None, {"ISTHMUS_DATA_DIR": str(tmp_path)})
    config = config.model_copy(
        update={"sources": [SourceConfig(name="pumps", type="flaky", options={"device": "pump-7"})]}
    )
    rt = Runtime(config, plugins_with_flaky())
    await rt.start()
    try:
        for _ in range(100):
            records = await rt.journal.query(RecordQuery())
            if records:
                break
            await asyncio.sleep(0.05)
        (record,) = records
        assert record.frame.source == "pumps"
        assert FlakySource.runs == 2
        (device,) = rt.store.list_physical(source="pumps")
        assert device.source_ids == {"device": "pump-7"} and record.p_uid == device.uid
    finally:
        await rt.stop()
    assert FlakySource.cancelled, "sources are cancelled on stop"


def test_unknown_source_type_and_options_are_config_errors(tmp_path: Path) -> None:
    config = load_config(None, {"ISTHMUS_DATA_DIR": str(tmp_path)})
    bad_type = config.model_copy(update={"sources": [SourceConfig(name="x", type="nope")]})
    with pytest.raises(ConfigError, match="unknown source type 'nope'"):
        Runtime(bad_type, plugins_with_flaky())
    bad_key = config.model_copy(update={"sources": [SourceConfig(name="x", type="flaky", options={"colour": 1})]})
    with pytest.raises(ConfigError, match="source 'x': colour: unknown key"):
        Runtime(bad_key, plugins_with_flaky())
