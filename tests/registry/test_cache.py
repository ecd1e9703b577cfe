"""DeviceCache: the hot-path directory, its targeted refreshes and last-seen batching."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone

import pytest
from argon2 import PasswordHasher, profiles

from isthmus.errors import RegistryError
from isthmus.interfaces import DeviceDirectory, DeviceRef
from isthmus.registry.cache import DeviceCache
from isthmus.registry.models import (
    LogicalDeviceCreate,
    PhysicalDevice,
    PhysicalDeviceCreate,
    PhysicalDevicePatch,
)
from isthmus.registry.models import (
    Mapping as MappingModel,
)
from isthmus.registry.store import RegistryStore

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
US = timedelta(microseconds=1)

MakeStore = Callable[..., RegistryStore]


class InstrumentedStore(RegistryStore):
    """A real store that counts whole-registry reads and can be told to fail."""

    def __init__(self, url: str) -> None:
        super().__init__(url, password_hasher=PasswordHasher.from_parameters(profiles.CHEAPEST))
        self.full_reads = 0
        self.fail_get_physical = 0
        self.fail_touch = False

    def device_refs(self) -> list[tuple[str, DeviceRef]]:
        self.full_reads += 1
        return super().device_refs()

    def all_mappings(self) -> list[MappingModel]:
        self.full_reads += 1
        return super().all_mappings()

    def list_physical(self, source: str | None = None, unmapped: bool = False) -> list[PhysicalDevice]:
        self.full_reads += 1
        return super().list_physical(source, unmapped)

    def get_physical(self, uid: int) -> PhysicalDevice:
        if self.fail_get_physical:
            self.fail_get_physical -= 1
            raise RegistryError("database is locked (injected)")
        return super().get_physical(uid)

    def touch(self, physical: Mapping[int, datetime], logical: Mapping[int, datetime]) -> None:
        if self.fail_touch:
            raise RegistryError("database is locked (injected)")
        super().touch(physical, logical)


@pytest.fixture
def istore(make_store: MakeStore) -> Iterator[InstrumentedStore]:
    path = make_store().engine.url.database
    store = InstrumentedStore(f"sqlite:///{path}")
    yield store
    store.close()


@pytest.fixture
def icache(istore: InstrumentedStore) -> Iterator[DeviceCache]:
    cache = DeviceCache(istore)
    cache.load()
    yield cache
    cache.close()


def _physical(store: RegistryStore, name: str = "sensor", **fields: object) -> PhysicalDevice:
    return store.create_physical(PhysicalDeviceCreate.model_validate({"name": name, **fields}))


def _logical(store: RegistryStore, name: str = "tank") -> int:
    return store.create_logical(LogicalDeviceCreate(name=name)).uid


def test_cache_is_a_device_directory(cache: DeviceCache) -> None:
    directory: DeviceDirectory = cache
    assert directory.by_token("nothing") is None


def test_load_indexes_enabled_devices_by_token(store: RegistryStore) -> None:
    on = _physical(store, "on", source_name="mqtt", decoder="thingsboard")
    off = _physical(store, "off", enabled=False)
    cache = DeviceCache(store)
    assert cache.by_token(on.token) is None  # empty until loaded
    cache.load()
    assert cache.by_token(on.token) == DeviceRef(p_uid=on.uid, name="on", source_name="mqtt", decoder="thingsboard")
    assert cache.by_token(off.token) is None
    assert cache.by_token("unknown") is None
    cache.close()


def test_new_device_is_visible_without_load(cache: DeviceCache, store: RegistryStore) -> None:
    device = _physical(store)
    ref = cache.by_token(device.token)
    assert ref is not None and ref.p_uid == device.uid


def test_rename_is_reflected(cache: DeviceCache, store: RegistryStore) -> None:
    device = _physical(store, "old")
    store.update_physical(device.uid, PhysicalDevicePatch(name="new", decoder="custom"))
    ref = cache.by_token(device.token)
    assert ref is not None and (ref.name, ref.decoder) == ("new", "custom")


def test_disable_and_enable(cache: DeviceCache, store: RegistryStore) -> None:
    device = _physical(store)
    store.update_physical(device.uid, PhysicalDevicePatch(enabled=False))
    assert cache.by_token(device.token) is None
    store.update_physical(device.uid, PhysicalDevicePatch(enabled=True))
    assert cache.by_token(device.token) is not None


def test_token_change_is_found_only_under_the_new_token(cache: DeviceCache, store: RegistryStore) -> None:
    device = _physical(store, token="before")
    store.update_physical(device.uid, PhysicalDevicePatch(token="after"))
    assert cache.by_token("before") is None
    ref = cache.by_token("after")
    assert ref is not None and ref.p_uid == device.uid


def test_token_moving_between_devices(cache: DeviceCache, store: RegistryStore) -> None:
    a = _physical(store, "a", token="x")
    b = _physical(store, "b", token="z")
    store.update_physical(a.uid, PhysicalDevicePatch(token="y"))
    store.update_physical(b.uid, PhysicalDevicePatch(token="x"))
    refs = {t: cache.by_token(t) for t in ("x", "y", "z")}
    assert {t: (r.p_uid if r else None) for t, r in refs.items()} == {"x": b.uid, "y": a.uid, "z": None}
    store.delete_physical(a.uid)
    assert cache.by_token("y") is None
    ref = cache.by_token("x")
    assert ref is not None and ref.p_uid == b.uid


def test_delete_forgets_the_device_and_its_mappings(cache: DeviceCache, store: RegistryStore) -> None:
    device = _physical(store)
    store.start_mapping(device.uid, _logical(store), T0)
    assert cache.mapping_at(device.uid, T0) is not None
    store.delete_physical(device.uid)
    assert cache.by_token(device.token) is None
    assert cache.mapping_at(device.uid, T0) is None


def test_mapping_at_boundaries(cache: DeviceCache, store: RegistryStore) -> None:
    p = _physical(store).uid
    l1, l2 = _logical(store, "l1"), _logical(store, "l2")
    assert cache.mapping_at(p, T0) is None
    store.start_mapping(p, l1, T0)  # visible without load()
    assert cache.mapping_at(p, T0 - US) is None
    assert cache.mapping_at(p, T0) == l1  # exactly at start: mapped
    assert cache.mapping_at(p, T0 + 1000 * H) == l1  # open mapping
    store.start_mapping(p, l2, T0 + H)
    assert cache.mapping_at(p, T0 + H - US) == l1
    assert cache.mapping_at(p, T0 + H) == l2  # exactly at the old end: the new mapping
    store.end_mapping(p_uid=p)
    end = store.mapping_history(p_uid=p)[0].end_time
    assert end is not None
    assert cache.mapping_at(p, end - US) == l2
    assert cache.mapping_at(p, end) is None  # exactly at end: not mapped
    assert cache.mapping_at(p, T0 + H - US) == l1  # history is kept for replays


def test_mapping_at_with_gaps_and_many_mappings(cache: DeviceCache, store: RegistryStore) -> None:
    p, other = _physical(store, "p").uid, _physical(store, "other").uid
    l1, l2, l3 = _logical(store, "l1"), _logical(store, "l2"), _logical(store, "l3")
    store.start_mapping(p, l1, T0)
    store.start_mapping(other, l1, T0 + H)  # takes l1 over: p is unmapped from T0 + H
    store.start_mapping(p, l2, T0 + 2 * H)
    store.start_mapping(p, l3, T0 + 3 * H)
    expected = {
        T0 - US: None,
        T0: l1,
        T0 + H - US: l1,
        T0 + H: None,  # the gap
        T0 + 2 * H - US: None,
        T0 + 2 * H: l2,
        T0 + 3 * H - US: l2,
        T0 + 3 * H: l3,
        T0 + 100 * H: l3,
    }
    assert {at: cache.mapping_at(p, at) for at in expected} == expected
    assert cache.mapping_at(other, T0 + H) == l1


def test_mapping_at_in_another_time_zone(cache: DeviceCache, store: RegistryStore) -> None:
    p = _physical(store).uid
    lg = _logical(store)
    store.start_mapping(p, lg, T0)
    plus_ten = datetime(2024, 3, 1, 22, 0, tzinfo=timezone(timedelta(hours=10)))
    assert plus_ten == T0
    assert cache.mapping_at(p, plus_ten) == lg


def test_paused_mapping_yields_none(cache: DeviceCache, store: RegistryStore) -> None:
    p = _physical(store).uid
    lg = _logical(store)
    store.start_mapping(p, lg, T0)
    store.pause_mapping(p)
    assert cache.mapping_at(p, T0 + H) is None
    store.resume_mapping(p)
    assert cache.mapping_at(p, T0 + H) == lg


def test_mapping_taken_over_by_another_device(cache: DeviceCache, store: RegistryStore) -> None:
    old, new = _physical(store, "old").uid, _physical(store, "new").uid
    lg = _logical(store)
    store.start_mapping(old, lg, T0)
    store.start_mapping(new, lg, T0 + H)  # ends old → lg; the cache hears about both
    assert cache.mapping_at(old, T0 + 2 * H) is None
    assert cache.mapping_at(old, T0) == lg
    assert cache.mapping_at(new, T0 + 2 * H) == lg


def test_deleting_a_logical_device_unmaps_its_physical_devices(cache: DeviceCache, store: RegistryStore) -> None:
    p = _physical(store).uid
    lg = _logical(store)
    store.start_mapping(p, lg, T0)
    store.delete_logical(lg)
    assert cache.mapping_at(p, T0 + H) is None


def test_changes_never_reload_everything(icache: DeviceCache, istore: InstrumentedStore) -> None:
    assert istore.full_reads == 2  # load(): devices and mappings, once each
    devices = [_physical(istore, f"d{i}") for i in range(3)]
    lg = _logical(istore)
    for d in devices:
        istore.update_physical(d.uid, PhysicalDevicePatch(name=d.name + "!"))
    istore.start_mapping(devices[0].uid, lg, T0)
    istore.start_mapping(devices[1].uid, lg, T0 + H)
    istore.pause_mapping(devices[1].uid)
    istore.end_mapping(l_uid=lg)
    istore.delete_physical(devices[2].uid)
    istore.delete_logical(lg)
    assert istore.full_reads == 2
    ref = icache.by_token(devices[0].token)
    assert ref is not None and ref.name == "d0!"


def test_failed_refresh_fails_closed_and_is_retried(icache: DeviceCache, istore: InstrumentedStore) -> None:
    device = _physical(istore, token="tok")
    istore.fail_get_physical = 1
    istore.update_physical(device.uid, PhysicalDevicePatch(name="renamed"))  # committed anyway
    assert istore.get_physical(device.uid).name == "renamed"
    assert icache.by_token("tok") is None  # refused until the refresh succeeds
    icache.flush_seen()
    ref = icache.by_token("tok")
    assert ref is not None and ref.name == "renamed"


def test_seen_keeps_the_newest_time_until_flushed(icache: DeviceCache, istore: InstrumentedStore) -> None:
    p = _physical(istore).uid
    lg = _logical(istore)
    icache.seen(p, lg, T0 + H)
    icache.seen(p, None, T0)  # older: ignored
    icache.seen(p, lg, T0 + 2 * H)
    icache.seen(p, None, T0 + 3 * H)
    assert istore.get_physical(p).last_seen is None  # memory only
    assert icache.flush_seen() == 2
    assert istore.get_physical(p).last_seen == T0 + 3 * H
    assert istore.get_logical(lg).last_seen == T0 + 2 * H
    assert icache.flush_seen() == 0


def test_failed_flush_keeps_pending_times(icache: DeviceCache, istore: InstrumentedStore) -> None:
    p = _physical(istore).uid
    icache.seen(p, None, T0)
    istore.fail_touch = True
    with pytest.raises(RegistryError):
        icache.flush_seen()
    icache.seen(p, None, T0 - H)  # older than the kept value: ignored after the merge
    istore.fail_touch = False
    assert icache.flush_seen() == 1
    assert istore.get_physical(p).last_seen == T0


def test_flush_of_deleted_devices_is_harmless(icache: DeviceCache, istore: InstrumentedStore) -> None:
    p = _physical(istore).uid
    icache.seen(p, 12345, T0)
    istore.delete_physical(p)
    assert icache.flush_seen() == 2


def test_close_stops_listening(store: RegistryStore) -> None:
    cache = DeviceCache(store)
    cache.load()
    cache.close()
    device = _physical(store)
    assert cache.by_token(device.token) is None


def test_lookups_stay_consistent_while_other_threads_change_the_registry(
    cache: DeviceCache, store: RegistryStore
) -> None:
    devices = [_physical(store, f"d{i}") for i in range(4)]
    for d in devices:
        store.start_mapping(d.uid, _logical(store, f"l{d.uid}"), T0)
    lg = _logical(store)
    stop = threading.Event()
    problems: list[Exception] = []

    def read() -> None:
        try:
            while not stop.is_set():
                for d in devices:
                    ref = cache.by_token(d.token)
                    assert ref is None or ref.p_uid == d.uid
                    assert cache.mapping_at(d.uid, T0 + H) is not None
                    cache.seen(d.uid, None, T0)
        except Exception as exc:  # noqa: BLE001 - collected, asserted on after join
            problems.append(exc)

    def write(d: PhysicalDevice, rounds: int) -> None:
        try:
            for i in range(rounds):
                store.update_physical(d.uid, PhysicalDevicePatch(name=f"{d.name}-{i}", enabled=i % 2 == 0))
                store.touch({d.uid: T0 + i * US}, {})
        except Exception as exc:  # noqa: BLE001 - collected, asserted on after join
            problems.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(d, 5)) for d in devices]
    for t in readers + writers:
        t.start()
    while any(t.is_alive() for t in writers):
        cache.flush_seen()
        stop.wait(0.01)
    stop.set()
    for t in readers + writers:
        t.join()
    assert problems == []
    for d in devices:
        ref = cache.by_token(d.token)  # the last round (i = 4) left the device enabled
        assert ref is not None and ref.name == f"{d.name}-4"
        assert store.get_physical(d.uid).last_seen == T0 + 4 * US
    store.start_mapping(devices[0].uid, lg, T0 + H)
    assert cache.mapping_at(devices[0].uid, T0 + H) == lg
