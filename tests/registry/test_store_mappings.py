"""RegistryStore: physical → logical mappings with IoTa's semantics."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from isthmus.errors import Conflict, InvalidRequest, NotFound
from isthmus.registry.store import RegistryStore

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)

NewDevice = Callable[..., int]
Events = list[tuple[str, int | None]]


def test_start_mapping_opens_an_unpaused_mapping(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    p, lg = new_physical(), new_logical()
    mapping = store.start_mapping(p, lg, T0)
    assert (mapping.p_uid, mapping.l_uid, mapping.start_time, mapping.end_time) == (p, lg, T0, None)
    assert mapping.paused is False
    assert store.current_mapping(p_uid=p) == mapping
    assert store.current_mapping(l_uid=lg) == mapping


def test_start_mapping_defaults_to_now(store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice) -> None:
    before = datetime.now(UTC)
    mapping = store.start_mapping(new_physical(), new_logical())
    assert before <= mapping.start_time <= datetime.now(UTC)


def test_start_mapping_ends_open_mappings_of_both_devices(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice, events: Events
) -> None:
    # p1 → l1 and p2 → l2 are open; mapping p1 → l2 must end both at the new start.
    p1, p2 = new_physical("p1"), new_physical("p2")
    l1, l2 = new_logical("l1"), new_logical("l2")
    m11 = store.start_mapping(p1, l1, T0)
    m22 = store.start_mapping(p2, l2, T0)
    events.clear()
    m12 = store.start_mapping(p1, l2, T0 + H)
    assert store.current_mapping(p_uid=p1) == m12
    assert store.current_mapping(l_uid=l2) == m12
    assert store.current_mapping(p_uid=p2) is None
    assert store.current_mapping(l_uid=l1) is None
    history = {m.id: m for m in store.all_mappings()}
    assert history[m11.id].end_time == T0 + H
    assert history[m22.id].end_time == T0 + H
    assert sorted(events) == [("mapping", p1), ("mapping", p2)]


def test_remapping_the_same_pair_starts_a_new_mapping(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    p, lg = new_physical(), new_logical()
    first = store.start_mapping(p, lg, T0)
    second = store.start_mapping(p, lg, T0 + H)
    assert second.id != first.id
    assert [m.id for m in store.mapping_history(p_uid=p)] == [second.id, first.id]
    assert store.mapping_history(p_uid=p)[1].end_time == T0 + H


def test_start_mapping_requires_both_devices(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    p, lg = new_physical(), new_logical()
    with pytest.raises(NotFound, match=r"^physical device 99 not found$"):
        store.start_mapping(99, lg, T0)
    with pytest.raises(NotFound, match=r"^logical device 98 not found$"):
        store.start_mapping(p, 98, T0)
    assert store.all_mappings() == []


def test_start_mapping_cannot_go_back_in_time(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    p, other_p = new_physical("p"), new_physical("other")
    l1, l2 = new_logical("l1"), new_logical("l2")
    store.start_mapping(p, l1, T0)
    store.end_mapping(p_uid=p)  # ends now, long after T0
    with pytest.raises(Conflict, match="earlier than an existing mapping"):
        store.start_mapping(p, l2, T0 + H)
    store.start_mapping(other_p, l2, T0 + 5 * H)
    with pytest.raises(Conflict):  # l2's latest mapping started later
        store.start_mapping(new_physical("third"), l2, T0 + 2 * H)
    assert len(store.all_mappings()) == 2


def test_start_mapping_rejects_naive_start(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    with pytest.raises(InvalidRequest, match="timezone-aware"):
        store.start_mapping(new_physical(), new_logical(), datetime(2024, 1, 1))  # noqa: DTZ001


def test_end_mapping_by_either_device(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice, events: Events
) -> None:
    p1, p2 = new_physical("p1"), new_physical("p2")
    l1, l2 = new_logical("l1"), new_logical("l2")
    store.start_mapping(p1, l1, T0)
    store.start_mapping(p2, l2, T0)
    events.clear()
    before = datetime.now(UTC)
    ended = store.end_mapping(p_uid=p1)
    assert ended.end_time is not None and ended.end_time >= before
    ended2 = store.end_mapping(l_uid=l2)
    assert ended2.p_uid == p2 and ended2.end_time is not None
    assert store.current_mapping(p_uid=p1) is None
    assert store.current_mapping(l_uid=l2) is None
    assert events == [("mapping", p1), ("mapping", p2)]


def test_end_mapping_errors(store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice) -> None:
    p = new_physical()
    with pytest.raises(NotFound, match=r"^physical device 42 not found$"):
        store.end_mapping(p_uid=42)
    with pytest.raises(NotFound, match=rf"^physical device {p} has no current mapping$"):
        store.end_mapping(p_uid=p)
    with pytest.raises(NotFound, match=r"^logical device 42 not found$"):
        store.end_mapping(l_uid=42)
    with pytest.raises(InvalidRequest, match="exactly one"):
        store.end_mapping()
    with pytest.raises(InvalidRequest, match="exactly one"):
        store.end_mapping(p_uid=p, l_uid=new_logical())


def test_end_of_a_future_mapping_is_its_start(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    future = datetime.now(UTC) + timedelta(days=1)
    p = new_physical()
    store.start_mapping(p, new_logical(), future)
    assert store.end_mapping(p_uid=p).end_time == future


def test_pause_and_resume(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice, events: Events
) -> None:
    p, lg = new_physical(), new_logical()
    started = store.start_mapping(p, lg, T0)
    events.clear()
    paused = store.pause_mapping(p)
    assert paused.paused is True
    assert paused.id == started.id
    assert store.pause_mapping(p) == paused  # idempotent, no second notification
    assert store.current_mapping(p_uid=p) == paused  # a paused mapping is still current
    resumed = store.resume_mapping(p)
    assert resumed.paused is False
    assert resumed.end_time is None
    assert events == [("mapping", p), ("mapping", p)]


def test_pause_needs_an_open_mapping(store: RegistryStore, new_physical: NewDevice) -> None:
    p = new_physical()
    with pytest.raises(NotFound, match="has no current mapping"):
        store.pause_mapping(p)
    with pytest.raises(NotFound, match=r"^physical device 77 not found$"):
        store.resume_mapping(77)


def test_starting_a_new_mapping_clears_the_pause(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    p = new_physical()
    store.start_mapping(p, new_logical("a"), T0)
    store.pause_mapping(p)
    assert store.start_mapping(p, new_logical("b"), T0 + H).paused is False


def test_history_is_newest_first(store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice) -> None:
    p1, p2 = new_physical("p1"), new_physical("p2")
    l1, l2 = new_logical("l1"), new_logical("l2")
    a = store.start_mapping(p1, l1, T0)
    b = store.start_mapping(p1, l2, T0 + H)
    c = store.start_mapping(p2, l1, T0 + 2 * H)
    d = store.start_mapping(p1, l1, T0 + 3 * H)
    assert [m.id for m in store.mapping_history(p_uid=p1)] == [d.id, b.id, a.id]
    assert [m.id for m in store.mapping_history(l_uid=l1)] == [d.id, c.id, a.id]
    assert [m.id for m in store.all_mappings()] == [a.id, b.id, d.id, c.id]
    assert store.mapping_history(p_uid=999) == []
    assert store.current_mapping(p_uid=999) is None
    with pytest.raises(InvalidRequest):
        store.mapping_history()
    with pytest.raises(InvalidRequest):
        store.current_mapping(p_uid=p1, l_uid=l1)


def test_deleting_devices_cascades_to_mappings(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice, events: Events
) -> None:
    p1, p2, p3 = new_physical("p1"), new_physical("p2"), new_physical("p3")
    l1, l2 = new_logical("l1"), new_logical("l2")
    store.start_mapping(p1, l1, T0)
    store.start_mapping(p2, l1, T0 + H)  # ends p1 → l1
    store.start_mapping(p3, l2, T0)
    events.clear()
    store.delete_logical(l1)
    assert events == [("logical", l1), ("mapping", p1), ("mapping", p2)]
    assert store.mapping_history(p_uid=p1) == []
    assert store.mapping_history(p_uid=p2) == []
    events.clear()
    store.delete_physical(p3)
    assert events == [("physical", p3), ("mapping", p3)]
    assert store.all_mappings() == []
    events.clear()
    store.delete_physical(p1)  # no mappings left: no mapping notification
    assert events == [("physical", p1)]
