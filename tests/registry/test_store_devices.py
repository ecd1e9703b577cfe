"""RegistryStore: physical and logical device CRUD, against real SQLite files."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from isthmus.errors import Conflict, InvalidRequest, NotFound, RegistryError
from isthmus.registry.models import (
    Location,
    LogicalDeviceCreate,
    LogicalDevicePatch,
    PhysicalDeviceCreate,
    PhysicalDevicePatch,
)
from isthmus.registry.store import RegistryStore

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

MakeStore = Callable[..., RegistryStore]
NewDevice = Callable[..., int]
Events = list[tuple[str, int | None]]

# ------------------------------------------------------------------ physical devices


def test_create_and_get_physical_round_trips_every_field(store: RegistryStore) -> None:
    before = datetime.now(UTC)
    created = store.create_physical(
        PhysicalDeviceCreate(
            name="Tank sensor",
            source_name="ttn",
            source_ids={"app_id": "farm", "dev_eui": "0004A30B001C1234", "port": 2},
            location=Location(lat=-39.769108, long=147.920245),
            last_seen=T0,
            properties={"nested": {"list": [1, 2.5, None, True]}, "note": "ünïcode"},
            token="my.token-1",
            enabled=False,
            decoder="thingsboard",
        )
    )
    assert created.uid >= 1
    assert created.created_at >= before - timedelta(seconds=1)
    assert created.created_at.tzinfo is UTC
    again = store.get_physical(created.uid)
    assert again == created
    assert again.source_ids == {"app_id": "farm", "dev_eui": "0004A30B001C1234", "port": 2}
    assert again.location == Location(lat=-39.769108, long=147.920245)
    assert again.last_seen == T0
    assert again.properties == {"nested": {"list": [1, 2.5, None, True]}, "note": "ünïcode"}
    assert (again.token, again.enabled, again.decoder) == ("my.token-1", False, "thingsboard")


def test_missing_token_is_generated(store: RegistryStore) -> None:
    a = store.create_physical(PhysicalDeviceCreate(name="a"))
    b = store.create_physical(PhysicalDeviceCreate(name="b"))
    assert a.token != b.token
    # secrets.token_urlsafe(15): 15 random bytes, 20 URL-safe characters, valid as a token.
    assert len(a.token) == len(secrets.token_urlsafe(15)) == 20
    assert PhysicalDevicePatch(token=a.token).token == a.token


def test_duplicate_token_is_a_conflict(store: RegistryStore, new_physical: NewDevice) -> None:
    store.create_physical(PhysicalDeviceCreate(name="a", token="shared"))
    with pytest.raises(Conflict, match=r"^token already in use by another device$"):
        store.create_physical(PhysicalDeviceCreate(name="b", token="shared"))
    other = new_physical("c")
    with pytest.raises(Conflict, match="token already in use by another device"):
        store.update_physical(other, PhysicalDevicePatch(token="shared"))
    assert store.get_physical(other).token != "shared"
    assert [d.name for d in store.list_physical()] == ["a", "c"]


def test_uids_are_not_reused_after_delete(store: RegistryStore, new_physical: NewDevice) -> None:
    first = new_physical("a")
    store.delete_physical(first)
    assert new_physical("b") > first


def test_get_missing_physical_names_it(store: RegistryStore) -> None:
    with pytest.raises(NotFound, match=r"^physical device 7 not found$"):
        store.get_physical(7)
    with pytest.raises(NotFound, match=r"^physical device 7 not found$"):
        store.update_physical(7, PhysicalDevicePatch(name="x"))
    with pytest.raises(NotFound, match=r"^physical device 7 not found$"):
        store.update_physical(7, PhysicalDevicePatch())
    with pytest.raises(NotFound, match=r"^physical device 7 not found$"):
        store.delete_physical(7)


def test_patch_changes_only_present_fields(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical(
        "old",
        location={"lat": 1, "long": 2},
        properties={"a": 1},
        decoder="thingsboard",
        source_ids={"id": "x"},
    )
    before = store.get_physical(uid)
    after = store.update_physical(uid, PhysicalDevicePatch(name="new"))
    assert after.name == "new"
    assert after.model_dump(exclude={"name"}) == before.model_dump(exclude={"name"})


def test_patch_explicit_null_clears_optional_fields(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical(location={"lat": 1, "long": 2}, decoder="thingsboard", last_seen=T0)
    patch = PhysicalDevicePatch.model_validate({"location": None, "decoder": None, "last_seen": None})
    after = store.update_physical(uid, patch)
    assert (after.location, after.decoder, after.last_seen) == (None, None, None)
    assert store.get_physical(uid).location is None


def test_patch_replaces_every_field_it_names(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical()
    patch = PhysicalDevicePatch.model_validate(
        {
            "name": "n2",
            "source_name": "mqtt",
            "source_ids": {"client": "c1"},
            "location": {"lat": -33.5, "long": 151.25},
            "last_seen": "2024-01-01T10:00:00+10:00",
            "properties": {"b": [1]},
            "token": "tok2",
            "enabled": False,
            "decoder": "custom",
        }
    )
    after = store.update_physical(uid, patch)
    assert after.name == "n2"
    assert after.source_name == "mqtt"
    assert after.source_ids == {"client": "c1"}
    assert after.location == Location(lat=-33.5, long=151.25)
    assert after.last_seen == datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
    assert after.properties == {"b": [1]}
    assert (after.token, after.enabled, after.decoder) == ("tok2", False, "custom")
    assert store.get_physical(uid) == after
    assert store.find_physical("mqtt", {"client": "c1"}) == after


def test_empty_patch_changes_nothing_and_notifies_nobody(
    store: RegistryStore, events: Events, new_physical: NewDevice
) -> None:
    uid = new_physical()
    events.clear()
    assert store.update_physical(uid, PhysicalDevicePatch()) == store.get_physical(uid)
    assert events == []


def test_delete_physical_returns_the_deleted_device(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical("gone")
    deleted = store.delete_physical(uid)
    assert deleted.uid == uid
    assert deleted.name == "gone"
    with pytest.raises(NotFound):
        store.get_physical(uid)


def test_list_physical_filters_by_source(store: RegistryStore, new_physical: NewDevice) -> None:
    a = new_physical("a", source_name="ttn")
    b = new_physical("b")
    c = new_physical("c", source_name="ttn")
    assert [d.uid for d in store.list_physical()] == [a, b, c]
    assert [d.uid for d in store.list_physical(source="ttn")] == [a, c]
    assert store.list_physical(source="nothing") == []


def test_list_physical_unmapped(store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice) -> None:
    never = new_physical("never mapped")
    mapped = new_physical("mapped", source_name="ttn")
    paused = new_physical("paused")
    ended = new_physical("ended")
    l1, l2, l3 = new_logical("l1"), new_logical("l2"), new_logical("l3")
    store.start_mapping(mapped, l1, T0)
    store.start_mapping(paused, l2, T0)
    store.pause_mapping(paused)
    store.start_mapping(ended, l3, T0)
    store.end_mapping(p_uid=ended)
    assert [d.uid for d in store.list_physical(unmapped=True)] == [never, ended]
    assert [d.uid for d in store.list_physical(source="ttn", unmapped=True)] == []
    assert [d.uid for d in store.list_physical(source="http", unmapped=True)] == [never, ended]


def test_find_physical_matches_source_ids_exactly(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical(source_name="ttn", source_ids={"app_id": "a", "dev_id": "d", "n": 1})
    # Key order does not matter; keys, values and value types do.
    assert store.find_physical("ttn", {"n": 1, "dev_id": "d", "app_id": "a"}) is not None
    found = store.find_physical("ttn", {"app_id": "a", "dev_id": "d", "n": 1})
    assert found is not None and found.uid == uid
    assert store.find_physical("ttn", {"app_id": "a", "dev_id": "d", "n": "1"}) is None
    assert store.find_physical("ttn", {"app_id": "a", "dev_id": "d"}) is None
    assert store.find_physical("ttn", {"app_id": "a", "dev_id": "d", "n": 1, "x": 2}) is None
    assert store.find_physical("http", {"app_id": "a", "dev_id": "d", "n": 1}) is None


def test_find_physical_prefers_the_oldest_of_duplicates(store: RegistryStore, new_physical: NewDevice) -> None:
    first = new_physical("first")
    new_physical("second")
    found = store.find_physical("http", {})
    assert found is not None and found.uid == first


def test_physical_by_token(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical(token="abc", enabled=False)
    found = store.physical_by_token("abc")
    assert found is not None and found.uid == uid and not found.enabled
    assert store.physical_by_token("abd") is None
    assert store.physical_by_token("ABC") is None


SQLISH = [
    "'; DROP TABLE physical_devices; --",
    'Robert"); --',
    "x' OR '1'='1",
    "%_\\ %%",
    "😀 名前 \u202e",
]


@pytest.mark.parametrize("name", SQLISH)
def test_sql_like_values_are_stored_verbatim(
    store: RegistryStore, name: str, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    uid = new_physical(name, source_name="s'--", source_ids={name: name}, properties={name: [name]})
    device = store.get_physical(uid)
    assert device.name == name
    assert device.source_ids == {name: name}
    assert device.properties == {name: [name]}
    assert [d.uid for d in store.list_physical(source="s'--")] == [uid]
    found = store.find_physical("s'--", {name: name})
    assert found is not None and found.uid == uid
    lid = new_logical(name)
    assert store.get_logical(lid).name == name
    assert store.update_logical(lid, LogicalDevicePatch(name=name + "2")).name == name + "2"
    assert len(store.list_physical()) == 1


def test_physical_notifications(store: RegistryStore, events: Events, new_physical: NewDevice) -> None:
    uid = new_physical()
    store.update_physical(uid, PhysicalDevicePatch(name="x"))
    store.delete_physical(uid)
    assert events == [("physical", uid)] * 3


def test_failed_change_notifies_nobody(store: RegistryStore, events: Events, new_physical: NewDevice) -> None:
    new_physical(token="t1")
    uid = new_physical(token="t2")
    events.clear()
    with pytest.raises(Conflict):
        store.update_physical(uid, PhysicalDevicePatch(token="t1"))
    assert events == []


def test_a_failing_listener_does_not_undo_the_change(store: RegistryStore, new_physical: NewDevice) -> None:
    def broken(kind: str, uid: int | None) -> None:
        raise RuntimeError("listener bug")

    calls: list[tuple[str, int | None]] = []
    store.add_listener(broken)
    store.add_listener(lambda kind, uid: calls.append((kind, uid)))
    uid = new_physical()
    assert calls == [("physical", uid)]
    assert store.get_physical(uid).uid == uid
    store.remove_listener(broken)
    store.remove_listener(broken)  # unknown callbacks are ignored


# ------------------------------------------------------------------ logical devices


def test_logical_crud(store: RegistryStore, events: Events, new_logical: NewDevice) -> None:
    created = store.create_logical(
        LogicalDeviceCreate(name="Buoy", location=Location(lat=-35, long=149), properties={"depth": 3})
    )
    assert store.get_logical(created.uid) == created
    assert created.created_at.tzinfo is UTC
    updated = store.update_logical(created.uid, LogicalDevicePatch.model_validate({"location": None}))
    assert updated.location is None
    assert updated.name == "Buoy"
    assert updated.properties == {"depth": 3}
    other = new_logical("other")
    assert [d.uid for d in store.list_logical()] == [created.uid, other]
    assert store.delete_logical(created.uid) == updated
    assert [d.uid for d in store.list_logical()] == [other]
    assert events == [
        ("logical", created.uid),
        ("logical", created.uid),
        ("logical", other),
        ("logical", created.uid),
    ]


def test_logical_not_found_messages(store: RegistryStore) -> None:
    with pytest.raises(NotFound, match=r"^logical device 3 not found$"):
        store.get_logical(3)
    with pytest.raises(NotFound, match=r"^logical device 3 not found$"):
        store.update_logical(3, LogicalDevicePatch(name="x"))
    with pytest.raises(NotFound, match=r"^logical device 3 not found$"):
        store.delete_logical(3)


def test_logical_last_seen_can_be_set_and_cleared(store: RegistryStore, new_logical: NewDevice) -> None:
    plus_ten = timezone(timedelta(hours=10))
    uid = new_logical()
    local = datetime(2024, 1, 1, 10, tzinfo=plus_ten)
    assert store.update_logical(uid, LogicalDevicePatch(last_seen=local)).last_seen == local
    assert store.get_logical(uid).last_seen == datetime(2024, 1, 1, tzinfo=UTC)
    assert store.update_logical(uid, LogicalDevicePatch(last_seen=None)).last_seen is None


# ------------------------------------------------------------------ touch (last seen)


def test_touch_only_moves_last_seen_forward(
    store: RegistryStore, new_physical: NewDevice, new_logical: NewDevice
) -> None:
    p, q = new_physical("p"), new_physical("q")
    lid = new_logical()
    store.touch({p: T0}, {lid: T0})
    assert store.get_physical(p).last_seen == T0
    assert store.get_logical(lid).last_seen == T0
    assert store.get_physical(q).last_seen is None
    store.touch({p: T0 - timedelta(hours=1), q: T0 - timedelta(hours=1)}, {lid: T0 - timedelta(days=1)})
    assert store.get_physical(p).last_seen == T0
    assert store.get_physical(q).last_seen == T0 - timedelta(hours=1)
    assert store.get_logical(lid).last_seen == T0
    later = T0 + timedelta(microseconds=1)
    store.touch({p: later}, {lid: later})
    assert store.get_physical(p).last_seen == later
    assert store.get_logical(lid).last_seen == later


def test_touch_ignores_missing_devices_and_empty_input(store: RegistryStore, new_physical: NewDevice) -> None:
    p = new_physical()
    store.touch({}, {})
    store.touch({p: T0, 999: T0}, {999: T0})
    assert store.get_physical(p).last_seen == T0


def test_touch_converts_other_time_zones(store: RegistryStore, new_physical: NewDevice) -> None:
    p = new_physical()
    store.touch({p: datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=10)))}, {})
    store.touch({p: datetime(2024, 1, 1, 1, tzinfo=UTC)}, {})  # later in UTC, smaller wall clock
    assert store.get_physical(p).last_seen == datetime(2024, 1, 1, 2, tzinfo=UTC)


def test_touch_rejects_naive_datetimes_and_writes_nothing(store: RegistryStore, new_physical: NewDevice) -> None:
    p, q = new_physical("p"), new_physical("q")
    with pytest.raises(InvalidRequest, match="timezone-aware"):
        store.touch({p: T0, q: datetime(2024, 1, 1)}, {})  # noqa: DTZ001
    assert store.get_physical(p).last_seen is None


def test_touch_sends_no_notification(store: RegistryStore, events: Events, new_physical: NewDevice) -> None:
    p = new_physical()
    events.clear()
    store.touch({p: T0}, {})
    assert events == []


# ------------------------------------------------------------------ store lifecycle


def test_closed_store_refuses_work(make_store: MakeStore, new_physical: NewDevice) -> None:
    store = make_store()
    with store:
        new_physical()
    with pytest.raises(RegistryError, match="closed"):
        store.list_physical()


def test_sqlite_parent_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        RegistryStore(f"sqlite:///{tmp_path}/missing/registry.db")


def test_invalid_url_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="invalid registry database URL"):
        RegistryStore("not a url")
