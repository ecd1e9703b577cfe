"""Device resolution by source ids, with the auto-create policies, over a real registry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from isthmus.decoders.thingsboard import ThingsBoardDecoder
from isthmus.errors import InvalidRequest
from isthmus.journal.sqlite import SQLiteJournal
from isthmus.message import RawFrame, Status, new_correlation_id, utcnow
from isthmus.registry.cache import DeviceCache
from isthmus.registry.models import PhysicalDevicePatch
from isthmus.registry.store import RegistryStore
from isthmus.runtime.ingest import IngestService, TimestampPolicy
from isthmus.runtime.metrics import Metrics
from isthmus.runtime.resolver import RegistryResolver

IDS: dict[str, str | int] = {"topic_device": "pump-3"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RegistryStore]:
    s = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}", password_hasher=PasswordHasher.from_parameters(CHEAPEST))
    s.migrate()
    yield s
    s.close()


async def test_accept_creates_once_then_serves_from_memory(store: RegistryStore) -> None:
    resolver = RegistryResolver(store)
    refs = await asyncio.gather(*(resolver.resolve("mqtt", IDS, "accept") for _ in range(20)))
    assert len({r.p_uid for r in refs if r is not None}) == 1, "concurrent first messages create one device"
    (device,) = store.list_physical(source="mqtt")
    assert device.source_ids == IDS and device.enabled and device.properties == {"auto_created": True}
    assert refs[0] is not None and not refs[0].quarantined
    assert await resolver.resolve("mqtt", {"topic_device": "other"}, "accept") != refs[0]


async def test_reject_creates_nothing_but_finds_known_devices(store: RegistryStore) -> None:
    resolver = RegistryResolver(store)
    assert await resolver.resolve("mqtt", IDS, "reject") is None
    assert store.list_physical() == []
    await resolver.resolve("mqtt", IDS, "accept")
    known = await resolver.resolve("mqtt", IDS, "reject")
    assert known is not None and known.name == "pump-3"


async def test_quarantine_until_an_operator_enables_the_device(store: RegistryStore) -> None:
    resolver = RegistryResolver(store)
    ref = await resolver.resolve("mqtt", IDS, "quarantine")
    assert ref is not None and ref.quarantined
    store.update_physical(ref.p_uid, PhysicalDevicePatch(enabled=True, name="pump 3, north field"))
    ref2 = await resolver.resolve("mqtt", IDS, "quarantine")
    assert ref2 is not None and not ref2.quarantined and ref2.name == "pump 3, north field"


async def test_unknown_policy_is_refused(store: RegistryStore) -> None:
    with pytest.raises(InvalidRequest, match="policy"):
        await RegistryResolver(store).resolve("mqtt", IDS, "maybe")


async def test_quarantined_device_frames_are_kept_not_delivered(store: RegistryStore, tmp_path: Path) -> None:
    resolver = RegistryResolver(store)
    ref = await resolver.resolve("mqtt", IDS, "quarantine")
    assert ref is not None
    cache = DeviceCache(store)
    cache.load()
    journal = SQLiteJournal(tmp_path / "journal.db")
    await journal.open()
    try:
        ingest = IngestService(
            journal, cache, {"thingsboard": ThingsBoardDecoder()}, "thingsboard", TimestampPolicy(), Metrics()
        )
        frame = RawFrame(new_correlation_id(), utcnow(), "mqtt", b'{"flow": 3.5}')
        result = await ingest.submit(frame, ref)
        assert result is not None
        assert result.record.status is Status.QUARANTINED
        assert "quarantined until an operator enables it" in (result.record.error or "")
        assert result.record.message is not None and result.record.message.timeseries[0].value == 3.5
        assert not result.record.deliverable
    finally:
        await journal.close()
        cache.close()


async def test_submits_started_in_sequence_are_journaled_in_order(store: RegistryStore, tmp_path: Path) -> None:
    """The ordering promise of Ingest.submit that pipelining sources rely on."""
    ref = await RegistryResolver(store).resolve("mqtt", IDS, "accept")
    assert ref is not None
    cache = DeviceCache(store)
    cache.load()
    journal = SQLiteJournal(tmp_path / "journal.db")
    await journal.open()
    try:
        ingest = IngestService(
            journal, cache, {"thingsboard": ThingsBoardDecoder()}, "thingsboard", TimestampPolicy(), Metrics()
        )
        frames = [RawFrame(new_correlation_id(), utcnow(), "mqtt", b'{"n": %d}' % i) for i in range(300)]
        tasks = [asyncio.create_task(ingest.submit(f, ref)) for f in frames]
        results = await asyncio.gather(*tasks)
        seqs = [r.seq for r in results if r is not None]
        assert seqs == sorted(seqs) and len(set(seqs)) == 300
        stored = await journal.read(0, 1000)
        assert [r.frame.correlation_id for r in stored] == [f.correlation_id for f in frames]
    finally:
        await journal.close()
        cache.close()
