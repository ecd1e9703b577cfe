"""RegistryStore behaviour that only PostgreSQL can show: concurrent writers, time zones, NUL.

SQLite serialises every write transaction (``BEGIN IMMEDIATE``); PostgreSQL runs them
concurrently under READ COMMITTED, so these tests drive real interleavings with threads and a
blocking third connection. Everything backend-neutral runs on both databases through the
``[postgresql]`` parametrisation of the other test files (see ``conftest.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from functools import partial
from itertools import pairwise

import pytest
from argon2 import PasswordHasher
from sqlalchemy import Connection, create_engine, select, text

from isthmus.errors import AuthError, Conflict, InvalidRequest, NotFound
from isthmus.registry.models import (
    LogicalDeviceCreate,
    LogicalDevicePatch,
    Mapping,
    PhysicalDeviceCreate,
    PhysicalDevicePatch,
)
from isthmus.registry.schema import mappings
from isthmus.registry.store import RegistryStore

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)

MakeStore = Callable[..., RegistryStore]

pytestmark = pytest.mark.parametrize("registry_backend", ["postgresql"], indirect=True)


@pytest.fixture
def registry(make_store: MakeStore) -> RegistryStore:
    """A store on a fresh migrated PostgreSQL database (not named ``store``: that one runs on both)."""
    return make_store()


def _physical(store: RegistryStore, name: str, **fields: object) -> int:
    return store.create_physical(PhysicalDeviceCreate.model_validate({"name": name, **fields})).uid


def _logical(store: RegistryStore, name: str) -> int:
    return store.create_logical(LogicalDeviceCreate(name=name)).uid


def _overlaps(history: list[Mapping]) -> list[tuple[int, int]]:
    """Pairs of mapping ids of one device whose time ranges overlap."""
    found = []
    ordered = sorted(history, key=lambda m: (m.start_time, m.id))
    for earlier, later in pairwise(ordered):
        if earlier.end_time is None or earlier.end_time > later.start_time:
            found.append((earlier.id, later.id))
    return found


def _all_overlaps(store: RegistryStore) -> dict[str, list[tuple[int, int]]]:
    everything = store.all_mappings()
    result: dict[str, list[tuple[int, int]]] = {}
    for kind in ("p_uid", "l_uid"):
        for uid in {getattr(m, kind) for m in everything}:
            pairs = _overlaps([m for m in everything if getattr(m, kind) == uid])
            if pairs:
                result[f"{kind}={uid}"] = pairs
    return result


class Threads:
    """Run store calls in threads; collect results or exceptions by name."""

    def __init__(self) -> None:
        self.results: dict[str, object] = {}
        self._threads: list[threading.Thread] = []

    def start(self, name: str, call: Callable[[], object]) -> None:
        def run() -> None:
            try:
                self.results[name] = call()
            except Exception as exc:  # noqa: BLE001 - collected and asserted on by the test
                self.results[name] = exc

        thread = threading.Thread(target=run, name=name)
        self._threads.append(thread)
        thread.start()

    def join(self) -> dict[str, object]:
        for thread in self._threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{thread.name} is still blocked"
        return self.results


@pytest.fixture
def blocker(registry: RegistryStore) -> Iterator[Connection]:
    """A connection of its own to the store's database, for holding locks; rolled back at the end."""
    engine = create_engine(registry.engine.url)
    conn = engine.connect()
    yield conn
    conn.rollback()
    conn.close()
    engine.dispose()


def _wait_for_lock_waiters(store: RegistryStore, count: int) -> None:
    """Wait until ``count`` sessions of the store's database are blocked on a lock."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    deadline = time.monotonic() + 10
    while True:
        with store.engine.connect() as conn:  # a new snapshot of pg_stat_activity each time
            waiting = conn.execute(query).scalar_one()
        if waiting >= count:
            return
        assert time.monotonic() < deadline, f"only {waiting} of {count} sessions blocked"
        time.sleep(0.01)


# ------------------------------------------------------------------ concurrent mapping changes


def test_concurrent_starts_on_one_device_leave_one_open_mapping(registry: RegistryStore) -> None:
    p = _physical(registry, "p")
    targets = [_logical(registry, f"l{i}") for i in range(6)]
    threads = Threads()
    for i, lg in enumerate(targets):
        threads.start(f"start{i}", lambda lg=lg: registry.start_mapping(p, lg))
    results = threads.join()
    # "Now" is read before waiting for the lock, so a call that waited may start before the
    # mapping that got in first: that one is a Conflict, as it would be on SQLite.
    assert [r for r in results.values() if not isinstance(r, Mapping | Conflict)] == []
    history = registry.mapping_history(p_uid=p)
    assert len(history) == sum(isinstance(r, Mapping) for r in results.values()) >= 1
    assert [m.end_time for m in history].count(None) == 1
    assert _all_overlaps(registry) == {}


def test_mixed_concurrent_mapping_changes_neither_deadlock_nor_overlap(registry: RegistryStore) -> None:
    physical = [_physical(registry, f"p{i}") for i in range(3)]
    logical = [_logical(registry, f"l{i}") for i in range(3)]
    rounds = 8

    def worker(n: int) -> list[str]:
        seen = []
        for i in range(rounds):
            p, lg = physical[(n + i) % 3], logical[(n * 2 + i) % 3]
            for call in (
                partial(registry.start_mapping, p, lg),
                partial(registry.pause_mapping, p),
                partial(registry.resume_mapping, p),
                partial(registry.end_mapping, l_uid=lg),
            ):
                try:
                    call()
                except (Conflict, NotFound) as exc:  # expected under contention
                    seen.append(type(exc).__name__)
        return seen

    threads = Threads()
    for n in range(4):
        threads.start(f"w{n}", lambda n=n: worker(n))
    results = threads.join()
    assert [r for r in results.values() if isinstance(r, Exception)] == []  # no RegistryError (deadlock)
    assert _all_overlaps(registry) == {}


def test_mapping_change_waiting_on_another_never_creates_an_overlap(
    registry: RegistryStore, blocker: Connection
) -> None:
    # p1 → l2 is open. A maps p1 → l1 from T0+2H (ending p1 → l2 at T0+2H); B maps p2 → l2
    # from T0+H. Serially, whichever runs second sees the other's change: B after A is a
    # Conflict (l2's mapping ended after T0+H), A after B is fine. Concurrently, B must not
    # check l2's history before A has committed its change to it.
    p1, p2 = _physical(registry, "p1"), _physical(registry, "p2")
    l1, l2 = _logical(registry, "l1"), _logical(registry, "l2")
    shared = registry.start_mapping(p1, l2, T0)
    blocker.execute(select(mappings.c.id).where(mappings.c.id == shared.id).with_for_update())
    threads = Threads()
    threads.start("A", lambda: registry.start_mapping(p1, l1, T0 + 2 * H))
    _wait_for_lock_waiters(registry, 1)  # A waits for the row: it queues first
    threads.start("B", lambda: registry.start_mapping(p2, l2, T0 + H))
    _wait_for_lock_waiters(registry, 2)
    blocker.rollback()
    results = threads.join()
    assert isinstance(results["A"], Mapping)
    assert isinstance(results["B"], Conflict), results["B"]
    assert _all_overlaps(registry) == {}


def test_ending_a_mapping_while_another_starts_never_creates_an_overlap(
    registry: RegistryStore, blocker: Connection
) -> None:
    # Same race with end_mapping: it ends p1 → l2 "now", after B checked l2's history.
    p1, p2 = _physical(registry, "p1"), _physical(registry, "p2")
    l2 = _logical(registry, "l2")
    shared = registry.start_mapping(p1, l2, T0)
    blocker.execute(select(mappings.c.id).where(mappings.c.id == shared.id).with_for_update())
    threads = Threads()
    threads.start("A", lambda: registry.end_mapping(p_uid=p1))
    _wait_for_lock_waiters(registry, 1)
    threads.start("B", lambda: registry.start_mapping(p2, l2, T0 + H))  # long before "now"
    _wait_for_lock_waiters(registry, 2)
    blocker.rollback()
    results = threads.join()
    assert isinstance(results["A"], Mapping)
    assert isinstance(results["B"], Conflict), results["B"]
    assert _all_overlaps(registry) == {}


def test_concurrent_ensure_admin_creates_one_admin(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(4)]  # like four processes starting at once
    barrier = threading.Barrier(len(stores))
    threads = Threads()
    for i, s in enumerate(stores):
        threads.start(f"s{i}", lambda s=s: (barrier.wait(), s.ensure_admin())[1])
    results = threads.join()
    tokens = [r for r in results.values() if r is not None]
    assert len(tokens) == 1, results
    assert isinstance(tokens[0], str)
    assert stores[0].user_for_token(tokens[0]).username == "admin"
    assert [u.username for u in stores[0].list_users()] == ["admin"]


def test_concurrent_duplicate_tokens_one_wins_the_other_conflicts(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()
    barrier = threading.Barrier(2)
    threads = Threads()
    for name, s in (("a", a), ("b", b)):
        threads.start(name, lambda s=s, name=name: (barrier.wait(), _physical(s, name, token="same"))[1])
    results = threads.join()
    assert sorted(type(r).__name__ for r in results.values()) == ["Conflict", "int"]
    assert [d.token for d in a.list_physical()] == ["same"]


def test_concurrent_credentials_with_one_username_one_wins_the_other_conflicts(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()
    devices = {"a": _physical(a, "a"), "b": _physical(a, "b")}
    barrier = threading.Barrier(2)
    threads = Threads()
    for name, s in (("a", a), ("b", b)):
        threads.start(name, lambda s=s, name=name: (barrier.wait(), s.set_credentials(devices[name], "same", "pw"))[1])
    results = threads.join()
    assert sorted(type(r).__name__ for r in results.values()) == ["Conflict", "PhysicalDevice"]
    assert [d.username for d in a.list_physical()].count("same") == 1


def test_concurrent_credentials_of_one_device_leave_one(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(4)]
    uid = _physical(stores[0], "d")
    barrier = threading.Barrier(len(stores))
    threads = Threads()
    for i, s in enumerate(stores):
        threads.start(f"s{i}", lambda s=s, i=i: (barrier.wait(), s.set_credentials(uid, f"user{i}", "pw"))[1])
    results = threads.join()
    assert [r for r in results.values() if isinstance(r, Exception)] == []
    refs = stores[0].credential_refs()
    assert len(refs) == 1
    assert stores[0].get_physical(uid).username == refs[0][0]


# ------------------------------------------------------------------ time zones


def test_a_session_in_another_time_zone_reads_and_writes_utc(make_store: MakeStore) -> None:
    # A server (or role, or connection) whose TimeZone is not UTC: values still come back as
    # aware UTC datetimes and comparisons in SQL (touch) use the instant, not the wall clock.
    utc_store = make_store()
    kathmandu = RegistryStore(f"{utc_store.engine.url.render_as_string()}?options=-c%20timezone%3DAsia/Kathmandu")
    try:
        with kathmandu.engine.connect() as conn:
            assert conn.execute(text("SHOW timezone")).scalar_one() == "Asia/Kathmandu"
        p = kathmandu.create_physical(PhysicalDeviceCreate(name="p", last_seen=T0)).uid
        device = kathmandu.get_physical(p)
        assert device.last_seen == T0
        assert device.last_seen is not None and device.last_seen.tzinfo is UTC
        assert device.created_at.tzinfo is UTC
        kathmandu.touch({p: datetime(2024, 3, 1, 17, 44, tzinfo=timezone(timedelta(hours=5, minutes=45)))}, {})
        assert kathmandu.get_physical(p).last_seen == T0  # 11:59 UTC is older: unchanged
        kathmandu.touch({p: T0 + H}, {})
        assert utc_store.get_physical(p).last_seen == T0 + H
        lg = kathmandu.create_logical(LogicalDeviceCreate(name="l")).uid
        kathmandu.start_mapping(p, lg, T0)
        [mapping] = utc_store.mapping_history(p_uid=p)
        assert mapping.start_time == T0 and mapping.start_time.tzinfo is UTC
    finally:
        kathmandu.close()


# ------------------------------------------------------------------ text PostgreSQL cannot store


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.create_physical(PhysicalDeviceCreate(name="a\x00b")),
        lambda s: s.create_physical(PhysicalDeviceCreate(name="n", source_name="s\x00")),
        lambda s: s.create_physical(PhysicalDeviceCreate(name="n", decoder="d\x00")),
        lambda s: s.create_logical(LogicalDeviceCreate(name="a\x00b")),
        lambda s: s.update_physical(_physical(s, "n"), PhysicalDevicePatch(name="a\x00b")),
        lambda s: s.update_logical(_logical(s, "n"), LogicalDevicePatch(name="a\x00b")),
        lambda s: (s.add_user("alice", "pw"), s.issue_token("alice", label="l\x00"))[1],
    ],
)
def test_nul_in_stored_text_is_an_invalid_request(
    registry: RegistryStore, call: Callable[[RegistryStore], object]
) -> None:
    # PostgreSQL's text cannot hold NUL. That is the caller's mistake (400), not the database
    # being unavailable (RegistryError → 503, "try again later", which would never help).
    with pytest.raises(InvalidRequest, match="NUL"):
        call(registry)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.verify_password("alice\x00", "pw"),
        lambda s: s.physical_by_token("t\x00"),
        lambda s: s.find_physical("http\x00", {}),
        lambda s: s.get_user("alice\x00"),
        lambda s: s.physical_by_username("user\x00"),
    ],
)
def test_nul_in_a_lookup_is_an_invalid_request(
    registry: RegistryStore, call: Callable[[RegistryStore], object]
) -> None:
    registry.add_user("alice", "pw")
    with pytest.raises(InvalidRequest, match="NUL"):
        call(registry)


def test_nul_inside_json_is_stored(registry: RegistryStore) -> None:
    # JSON text escapes NUL (\u0000) and the json type keeps the text as it is: no refusal there.
    uid = _physical(registry, "p", source_ids={"k": "a\x00b"}, properties={"k\x00": "v\x00"})
    found = registry.find_physical("http", {"k": "a\x00b"})
    assert found is not None and found.uid == uid
    assert found.properties == {"k\x00": "v\x00"}
    with pytest.raises(AuthError):
        registry.user_for_token("t\x00")  # only its hash reaches the database


# ------------------------------------------------------------------ passwords


def test_outdated_hash_is_upgraded_on_login(make_store: MakeStore) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    strong = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    make_store(hasher=weak).add_user("alice", "pw")
    store = make_store(hasher=strong)
    with store.engine.connect() as conn:
        old = conn.execute(text("SELECT password_hash FROM users")).scalar_one()
    store.verify_password("alice", "pw")
    with store.engine.connect() as conn:
        new = conn.execute(text("SELECT password_hash FROM users")).scalar_one()
    assert new != old
    assert strong.check_needs_rehash(new) is False
