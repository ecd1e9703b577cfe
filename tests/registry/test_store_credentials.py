"""RegistryStore: username + password credentials of physical devices (ThingsBoard's "MQTT Basic")."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from argon2 import PasswordHasher, profiles
from sqlalchemy import select

from isthmus.errors import Conflict, InvalidRequest, NotFound, RegistryError
from isthmus.interfaces import DeviceRef
from isthmus.registry.models import PhysicalDeviceCreate, PhysicalDevicePatch
from isthmus.registry.schema import device_credentials, users
from isthmus.registry.store import RegistryStore, default_device_hasher

NewDevice = Callable[..., int]
MakeStore = Callable[..., RegistryStore]

PASSWORD = "s3cret-device-pw"


def _stored(store: RegistryStore) -> list[tuple[int, str, str]]:
    table = device_credentials
    with store.engine.connect() as conn:
        rows = conn.execute(select(table.c.p_uid, table.c.username, table.c.password_hash).order_by(table.c.p_uid))
        return [(int(p_uid), str(username), str(password_hash)) for p_uid, username, password_hash in rows]


def test_set_stores_an_argon2id_hash_and_shows_only_the_username(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical("tank-7")
    assert store.get_physical(uid).username is None
    device = store.set_credentials(uid, "tank-7", PASSWORD)
    assert device.uid == uid and device.username == "tank-7"
    assert store.get_physical(uid).username == "tank-7"
    assert [d.username for d in store.list_physical()] == ["tank-7"]
    [(p_uid, username, password_hash)] = _stored(store)
    assert (p_uid, username) == (uid, "tank-7")
    assert password_hash.startswith("$argon2id$")
    assert PASSWORD not in password_hash
    dumped = device.model_dump_json()
    assert PASSWORD not in dumped and "argon2" not in dumped and "password" not in dumped


def test_device_lookups_carry_the_username(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical("a", token="tok-a", source_name="mqtt", source_ids={"k": "v"})
    new_physical("b")
    store.set_credentials(uid, "user-a", PASSWORD)
    found = store.physical_by_token("tok-a")
    assert found is not None and found.username == "user-a"
    by_ids = store.find_physical("mqtt", {"k": "v"})
    assert by_ids is not None and by_ids.username == "user-a"
    assert [(d.name, d.username) for d in store.list_physical()] == [("a", "user-a"), ("b", None)]
    assert [d.name for d in store.list_physical(source="mqtt")] == ["a"]
    assert [d.name for d in store.list_physical(unmapped=True)] == ["a", "b"]
    assert store.update_physical(uid, PhysicalDevicePatch(name="a2")).username == "user-a"


def test_physical_by_username(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical()
    store.set_credentials(uid, "user", PASSWORD)
    found = store.physical_by_username("user")
    assert found is not None and found.uid == uid
    assert store.physical_by_username("nobody") is None
    store.update_physical(uid, PhysicalDevicePatch(enabled=False))
    disabled = store.physical_by_username("user")
    assert disabled is not None and not disabled.enabled  # enabled or not, like physical_by_token


def test_set_replaces_the_credential(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical()
    store.set_credentials(uid, "first", "pw-1")
    [(_, _, first_hash)] = _stored(store)
    assert store.set_credentials(uid, "second", "pw-2").username == "second"
    [(p_uid, username, second_hash)] = _stored(store)  # still one credential per device
    assert (p_uid, username) == (uid, "second")
    assert store.check_device_password(second_hash, "pw-2")
    assert not store.check_device_password(second_hash, "pw-1")
    assert store.physical_by_username("first") is None
    store.set_credentials(uid, "second", "pw-3")  # same username, new password
    [(_, _, third_hash)] = _stored(store)
    assert third_hash not in {first_hash, second_hash}
    assert store.check_device_password(third_hash, "pw-3")


def test_usernames_are_unique_across_devices(store: RegistryStore, new_physical: NewDevice) -> None:
    a, b = new_physical("a"), new_physical("b")
    store.set_credentials(a, "shared", "pw-a")
    with pytest.raises(Conflict, match=r"^username 'shared' already in use by another device$"):
        store.set_credentials(b, "shared", "pw-b")
    assert [(p_uid, username) for p_uid, username, _ in _stored(store)] == [(a, "shared")]
    assert store.get_physical(b).username is None
    store.remove_credentials(a)
    assert store.set_credentials(b, "shared", "pw-b").username == "shared"  # free again


def test_usernames_and_tokens_are_separate_namespaces(store: RegistryStore, new_physical: NewDevice) -> None:
    a = new_physical("a", token="same-text")
    b = new_physical("b")
    assert store.set_credentials(b, "same-text", PASSWORD).username == "same-text"
    assert store.get_physical(a).username is None


def test_remove(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical(token="tok")
    store.set_credentials(uid, "user", PASSWORD)
    device = store.remove_credentials(uid)
    assert device.username is None and device.token == "tok"  # the token keeps working
    assert _stored(store) == []
    with pytest.raises(NotFound, match=rf"^physical device {uid} has no username and password credentials$"):
        store.remove_credentials(uid)


def test_unknown_device(store: RegistryStore) -> None:
    with pytest.raises(NotFound, match=r"^physical device 404 not found$"):
        store.set_credentials(404, "user", PASSWORD)
    with pytest.raises(NotFound, match=r"^physical device 404 not found$"):
        store.remove_credentials(404)
    assert _stored(store) == []


def test_deleting_the_device_deletes_its_credential(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical()
    store.set_credentials(uid, "user", PASSWORD)
    assert store.delete_physical(uid).username == "user"  # as it was
    assert _stored(store) == []
    assert store.physical_by_username("user") is None
    other = new_physical("replacement")
    assert store.set_credentials(other, "user", PASSWORD).username == "user"  # the username is free


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("", PASSWORD, "username must be 1 to 200 characters"),
        ("u" * 201, PASSWORD, "username must be 1 to 200 characters"),
        ("us\x00er", PASSWORD, "control characters"),
        ("us\ner", PASSWORD, "control characters"),
        (" user", PASSWORD, "whitespace"),
        ("user ", PASSWORD, "whitespace"),
        ("us\ud800er", PASSWORD, "username must be valid Unicode text"),
        ("user", "", "password must be 1 to 1000 characters"),
        ("user", "p" * 1001, "password must be 1 to 1000 characters"),
        ("user", "pw\udc80", "password must be valid Unicode text"),
    ],
)
def test_invalid_credentials_are_refused_before_any_database_work(
    store: RegistryStore, new_physical: NewDevice, username: str, password: str, message: str
) -> None:
    uid = new_physical()
    with pytest.raises(InvalidRequest, match=message):
        store.set_credentials(uid, username, password)
    with pytest.raises(InvalidRequest):
        store.set_credentials(404, username, password)  # not NotFound: checked first
    assert _stored(store) == []


def test_longest_values_and_any_text_are_accepted(store: RegistryStore, new_physical: NewDevice) -> None:
    uid = new_physical()
    username, password = "ü:" + "u" * 198, " pässwörd with spaces & ✓ " + "p" * 974
    assert store.set_credentials(uid, username, password).username == username
    [(_, _, password_hash)] = _stored(store)
    assert store.check_device_password(password_hash, password)
    assert store.check_device_password(password_hash, password.encode())


def test_changes_notify_the_device(
    store: RegistryStore, new_physical: NewDevice, events: list[tuple[str, int | None]]
) -> None:
    uid, other = new_physical(), new_physical("other")
    store.set_credentials(other, "taken", PASSWORD)
    events.clear()
    store.set_credentials(uid, "user", PASSWORD)
    store.set_credentials(uid, "user", "other")
    store.remove_credentials(uid)
    assert events == [("physical", uid)] * 3
    with pytest.raises(NotFound):
        store.remove_credentials(uid)
    with pytest.raises(Conflict):
        store.set_credentials(uid, "taken", PASSWORD)
    assert len(events) == 3  # failures notify nobody


def test_credential_refs_list_enabled_devices_only(store: RegistryStore, new_physical: NewDevice) -> None:
    on = new_physical("on", source_name="mqtt", decoder="thingsboard", properties={"gateway": True})
    off = new_physical("off", enabled=False)
    new_physical("no-credential")
    store.set_credentials(on, "user-on", PASSWORD)
    store.set_credentials(off, "user-off", PASSWORD)
    refs = store.credential_refs()
    assert [(username, ref) for username, _, ref in refs] == [
        ("user-on", DeviceRef(p_uid=on, name="on", source_name="mqtt", decoder="thingsboard", gateway=True))
    ]
    assert refs[0][1].startswith("$argon2id$")
    assert [u for u, _, _ in store.credential_refs(username="user-on")] == ["user-on"]
    assert store.credential_refs(username="user-off") == []
    assert store.credential_refs(username="nobody") == []
    assert [u for u, _, _ in store.credential_refs(p_uid=on)] == ["user-on"]
    assert store.credential_refs(p_uid=off) == []


def test_check_device_password(store: RegistryStore, new_physical: NewDevice) -> None:
    store.set_credentials(new_physical(), "user", PASSWORD)
    [(_, _, password_hash)] = _stored(store)
    assert store.check_device_password(password_hash, PASSWORD) is True
    assert store.check_device_password(password_hash, PASSWORD + "x") is False
    assert store.check_device_password("not an argon2 hash", PASSWORD) is False
    assert store.check_device_password(password_hash, b"\xff\xfe not utf-8") is False


def test_argon2_failure_is_a_registry_error_not_a_mismatch(store: RegistryStore) -> None:
    # A hash asking for more memory than argon2 may allocate: it cannot check at all. Refusing
    # the device as if its password were wrong would be a lie; the caller says "unavailable".
    impossible = "$argon2id$v=19$m=4294967295,t=1,p=1$c29tZXNhbHQ$c29tZWhhc2hzb21laGFzaHNvbWVoYXNo"
    with pytest.raises(RegistryError, match="cannot check a device password"):
        store.check_device_password(impossible, PASSWORD)


def test_device_passwords_use_their_own_hasher(make_store: MakeStore) -> None:
    store = make_store(
        hasher=PasswordHasher.from_parameters(profiles.CHEAPEST),
        device_hasher=PasswordHasher(time_cost=1, memory_cost=16, parallelism=1),
    )
    store.set_credentials(store.create_physical(PhysicalDeviceCreate(name="d")).uid, "user", PASSWORD)
    store.add_user("alice", PASSWORD)
    [(_, _, device_hash)] = _stored(store)
    assert "$m=16,t=1,p=1$" in device_hash
    with store.engine.connect() as conn:
        user_hash = conn.execute(select(users.c.password_hash)).scalar_one()
    assert "$m=8,t=1,p=1$" in user_hash


def test_default_device_hasher_is_owasp_argon2id() -> None:
    hasher = default_device_hasher()
    assert (hasher.time_cost, hasher.memory_cost, hasher.parallelism) == (2, 19 * 1024, 1)
    assert hasher.type.name == "ID"
