"""DeviceCache.by_password: username + password credentials on the hot path.

The argon2 check runs in the cache's own threads, successes are remembered until the credential
changes, failures for a minute, concurrent identical attempts share one check, and a flood of
checks is refused as "busy" instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from argon2 import PasswordHasher, profiles

from isthmus.errors import RegistryError
from isthmus.interfaces import DeviceDirectory, DeviceRef
from isthmus.registry.cache import DeviceCache
from isthmus.registry.models import PhysicalDevice, PhysicalDeviceCreate, PhysicalDevicePatch
from isthmus.registry.store import RegistryStore

PW = "correct horse"


class CountingStore(RegistryStore):
    """A real store that records password checks (and their threads), can hold them, can fail."""

    def __init__(self, url: str) -> None:
        cheap = PasswordHasher.from_parameters(profiles.CHEAPEST)
        super().__init__(url, password_hasher=cheap, device_password_hasher=cheap)
        self.checks: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_get_physical = 0
        self.fail_credentials = False

    def check_device_password(self, password_hash: str, password: str | bytes) -> bool:
        self.checks.append(threading.current_thread().name)
        assert self.gate.wait(10), "the test never opened the gate"
        return super().check_device_password(password_hash, password)

    def get_physical(self, uid: int) -> PhysicalDevice:
        if self.fail_get_physical:
            self.fail_get_physical -= 1
            raise RegistryError("database is locked (injected)")
        return super().get_physical(uid)

    def credential_refs(
        self, *, username: str | None = None, p_uid: int | None = None
    ) -> list[tuple[str, str, DeviceRef]]:
        if self.fail_credentials:
            raise RegistryError("database is unreachable (injected)")
        return super().credential_refs(username=username, p_uid=p_uid)


@pytest.fixture
def cstore(store: RegistryStore) -> Iterator[CountingStore]:
    counting = CountingStore(store.engine.url.render_as_string(hide_password=False))
    yield counting
    counting.gate.set()  # never leave a check thread waiting
    counting.close()


def _cache(store: CountingStore, **options: object) -> DeviceCache:
    cache = DeviceCache(store, **options)  # type: ignore[arg-type]
    cache.load()
    return cache


@pytest.fixture
def cache(cstore: CountingStore) -> Iterator[DeviceCache]:
    c = _cache(cstore)
    yield c
    c.close()


def _device(store: RegistryStore, name: str = "sensor", username: str | None = "user", **fields: object) -> int:
    uid = store.create_physical(PhysicalDeviceCreate.model_validate({"name": name, **fields})).uid
    if username is not None:
        store.set_credentials(uid, username, PW)
    return uid


async def _until(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------ the contract


async def test_the_right_password_finds_the_enabled_device(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore, "tank-7", source_name="mqtt", decoder="thingsboard", token="tok")
    directory: DeviceDirectory = cache
    ref = await directory.by_password("user", PW)
    assert ref == DeviceRef(p_uid=uid, name="tank-7", source_name="mqtt", decoder="thingsboard")
    assert ref == cache.by_token("tok")


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("user", "wrong"),
        ("user", PW + " "),
        ("nobody", PW),
        ("USER", PW),
        ("", ""),
        ("user", ""),
        ("user", "x" * 70_000),
        ("user", "pw\ud800"),
        ("us\x00er", PW),
        ("u" * 70_000, PW),
        ("user\udc80", "pw\udc80"),
    ],
)
async def test_anything_but_the_credential_is_none_and_never_raises(
    cache: DeviceCache, cstore: CountingStore, username: str, password: str
) -> None:
    _device(cstore)
    assert await cache.by_password(username, password) is None
    assert await cache.by_password("user", PW) is not None


async def test_unknown_usernames_and_impossible_passwords_cost_no_hashing(
    cache: DeviceCache, cstore: CountingStore
) -> None:
    _device(cstore)
    for username, password in (("nobody", PW), ("user", ""), ("user", "x" * 1001), ("user", "\ud800")):
        assert await cache.by_password(username, password) is None
    assert cstore.checks == []


async def test_disabled_device_is_refused_even_after_a_successful_check(
    cache: DeviceCache, cstore: CountingStore
) -> None:
    uid = _device(cstore)
    assert await cache.by_password("user", PW) is not None
    cstore.update_physical(uid, PhysicalDevicePatch(enabled=False))
    assert await cache.by_password("user", PW) is None
    cstore.update_physical(uid, PhysicalDevicePatch(enabled=True))
    ref = await cache.by_password("user", PW)
    assert ref is not None and ref.p_uid == uid


async def test_a_device_disabled_at_load_is_refused(cstore: CountingStore) -> None:
    _device(cstore, enabled=False)
    cache = _cache(cstore)
    try:
        assert await cache.by_password("user", PW) is None
    finally:
        cache.close()


async def test_deleted_device_is_refused_and_its_username_reusable(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore, "old")
    assert await cache.by_password("user", PW) is not None
    cstore.delete_physical(uid)
    assert await cache.by_password("user", PW) is None
    new = _device(cstore, "new")
    ref = await cache.by_password("user", PW)
    assert ref is not None and (ref.p_uid, ref.name) == (new, "new")


async def test_replaced_password_old_one_stops_working_also_when_remembered(
    cache: DeviceCache, cstore: CountingStore
) -> None:
    uid = _device(cstore)
    assert await cache.by_password("user", PW) is not None  # checked and remembered
    cstore.set_credentials(uid, "user", "new password")
    assert await cache.by_password("user", PW) is None
    assert await cache.by_password("user", "new password") is not None
    cstore.set_credentials(uid, "user", PW)  # back to the old password: a new hash, a new check
    before = len(cstore.checks)
    assert await cache.by_password("user", PW) is not None
    assert len(cstore.checks) == before + 1


async def test_changed_username_and_removed_credential(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore, token="tok")
    assert await cache.by_password("user", PW) is not None
    cstore.set_credentials(uid, "renamed", PW)
    assert await cache.by_password("user", PW) is None
    assert await cache.by_password("renamed", PW) is not None
    cstore.remove_credentials(uid)
    assert await cache.by_password("renamed", PW) is None
    assert cache.by_token("tok") is not None  # the token is untouched


async def test_username_moving_between_devices(cache: DeviceCache, cstore: CountingStore) -> None:
    a = _device(cstore, "a")
    b = _device(cstore, "b", username=None)
    cstore.remove_credentials(a)
    cstore.set_credentials(b, "user", "b's password")
    assert await cache.by_password("user", PW) is None
    ref = await cache.by_password("user", "b's password")
    assert ref is not None and ref.p_uid == b


async def test_load_reads_the_credentials(cstore: CountingStore) -> None:
    uid = _device(cstore)
    cache = DeviceCache(cstore)
    try:
        assert await cache.by_password("user", PW) is None  # empty until loaded
        cache.load()
        ref = await cache.by_password("user", PW)
        assert ref is not None and ref.p_uid == uid
    finally:
        cache.close()


# ------------------------------------------------------------------ the guards


async def test_success_is_remembered_across_renames(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore, "before")
    for _ in range(5):
        assert await cache.by_password("user", PW) is not None
    assert len(cstore.checks) == 1
    cstore.update_physical(uid, PhysicalDevicePatch(name="after"))
    ref = await cache.by_password("user", PW)
    assert ref is not None and ref.name == "after"
    assert len(cstore.checks) == 1  # same credential: still remembered
    assert await cache.by_password("user", "wrong") is None  # a wrong password is still checked
    assert len(cstore.checks) == 2


async def test_failure_is_remembered_per_password_and_hash(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore)
    for _ in range(5):
        assert await cache.by_password("user", "stale password") is None
    assert len(cstore.checks) == 1
    assert await cache.by_password("user", "another guess") is None
    assert len(cstore.checks) == 2
    cstore.set_credentials(uid, "user", "stale password")  # the operator fixes the server side
    assert await cache.by_password("user", "stale password") is not None  # at once


async def test_failures_are_forgotten_after_the_ttl(cstore: CountingStore) -> None:
    _device(cstore)
    cache = _cache(cstore, rejection_ttl=0.0)
    try:
        for _ in range(3):
            assert await cache.by_password("user", "wrong") is None
        assert len(cstore.checks) == 3
    finally:
        cache.close()


async def test_checks_run_in_the_caches_own_threads_not_on_the_loop(cache: DeviceCache, cstore: CountingStore) -> None:
    _device(cstore, token="tok")
    cstore.gate.clear()
    attempt = asyncio.create_task(cache.by_password("user", PW))
    await _until(lambda: cstore.checks)
    # The check is blocked in its thread; the event loop is free meanwhile.
    assert cache.by_token("tok") is not None
    await asyncio.sleep(0.01)
    assert not attempt.done()
    cstore.gate.set()
    assert await attempt is not None
    assert cstore.checks[0].startswith("isthmus-device-pw")
    assert cstore.checks[0] != threading.main_thread().name


async def test_concurrent_identical_attempts_share_one_check(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore)
    cstore.gate.clear()
    good = [asyncio.create_task(cache.by_password("user", PW)) for _ in range(5)]
    bad = [asyncio.create_task(cache.by_password("user", "wrong")) for _ in range(5)]
    await _until(lambda: cstore.checks)
    cstore.gate.set()
    assert [r.p_uid if r else None for r in await asyncio.gather(*good)] == [uid] * 5
    assert await asyncio.gather(*bad) == [None] * 5
    assert len(cstore.checks) == 2


async def test_a_device_hanging_up_does_not_cancel_the_shared_check(cache: DeviceCache, cstore: CountingStore) -> None:
    _device(cstore)
    cstore.gate.clear()
    first = asyncio.create_task(cache.by_password("user", PW))
    second = asyncio.create_task(cache.by_password("user", PW))
    await _until(lambda: cstore.checks)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    cstore.gate.set()
    assert await second is not None
    assert await cache.by_password("user", PW) is not None
    assert len(cstore.checks) == 1


async def test_a_flood_is_bounded_and_refused_as_busy(cstore: CountingStore) -> None:
    _device(cstore, "victim")
    known = _device(cstore, "known", username="known")
    cache = _cache(cstore, verify_threads=1, max_pending_verifications=3)
    try:
        assert await cache.by_password("known", PW) is not None  # verified before the flood
        cstore.gate.clear()
        flood = [asyncio.create_task(cache.by_password("user", f"guess {i}")) for i in range(3)]
        await _until(lambda: len(cstore.checks) == 2)
        await asyncio.sleep(0.05)
        assert len(cstore.checks) == 2, "one thread: one check at a time"  # the third waits
        with pytest.raises(RegistryError, match="too many device password checks"):
            await cache.by_password("user", "guess 4")
        ref = await cache.by_password("known", PW)  # remembered: not slowed by the flood
        assert ref is not None and ref.p_uid == known
        cstore.gate.set()
        assert await asyncio.gather(*flood) == [None] * 3
        assert await cache.by_password("user", PW) is not None  # room again
    finally:
        cache.close()


async def test_credential_replaced_during_its_check(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore)
    cstore.gate.clear()
    attempt = asyncio.create_task(cache.by_password("user", PW))
    await _until(lambda: cstore.checks)
    await asyncio.to_thread(cstore.set_credentials, uid, "user", "rotated")
    cstore.gate.set()
    assert await attempt is None  # matched the old hash, then failed against the current one
    assert len(cstore.checks) == 2
    assert await cache.by_password("user", "rotated") is not None


async def test_device_disabled_during_its_check(cache: DeviceCache, cstore: CountingStore) -> None:
    uid = _device(cstore)
    cstore.gate.clear()
    attempt = asyncio.create_task(cache.by_password("user", PW))
    await _until(lambda: cstore.checks)
    await asyncio.to_thread(cstore.update_physical, uid, PhysicalDevicePatch(enabled=False))
    cstore.gate.set()
    assert await attempt is None


# ------------------------------------------------------------------ registry trouble


async def test_unavailable_registry_is_a_registry_error_not_a_refusal(
    cache: DeviceCache, cstore: CountingStore
) -> None:
    uid = _device(cstore)
    cstore.fail_get_physical = 1
    cstore.update_physical(uid, PhysicalDevicePatch(name="renamed"))  # committed; the refresh fails
    cstore.fail_credentials = True
    with pytest.raises(RegistryError, match="unreachable"):
        await cache.by_password("user", PW)
    cstore.fail_credentials = False
    ref = await cache.by_password("user", PW)  # read from the registry while the refresh is pending
    assert ref is not None and ref.name == "renamed"
    assert await cache.by_password("user", "wrong") is None
    assert await cache.by_password("us\x00er", PW) is None  # still never raises for bad input
    cache.flush_seen()  # retries the refresh
    cstore.fail_credentials = True
    assert await cache.by_password("user", PW) is not None  # from memory again
    assert await cache.by_password("nobody", PW) is None  # nothing pending: no registry read


async def test_close_lets_the_check_threads_go_and_lookups_still_work(cstore: CountingStore) -> None:
    _device(cstore)
    cache = _cache(cstore)
    assert await cache.by_password("user", PW) is not None
    cache.close()
    assert await cache.by_password("user", PW) is not None  # remembered
    assert await cache.by_password("user", "wrong") is None  # checked in a new pool
