"""RegistryStore: users, argon2id passwords and API tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from isthmus.errors import AuthError, Conflict, InvalidRequest, NotFound
from isthmus.registry.schema import api_tokens, users
from isthmus.registry.store import RegistryStore

MakeStore = Callable[..., RegistryStore]

PASSWORD = "correct horse battery staple"


def _stored_hash(store: RegistryStore, username: str) -> str:
    with store.engine.connect() as conn:
        return str(conn.execute(select(users.c.password_hash).where(users.c.username == username)).scalar_one())


def test_add_user_stores_an_argon2id_hash_and_returns_a_working_token(store: RegistryStore) -> None:
    user, token = store.add_user("alice", PASSWORD, read_only=True)
    assert (user.username, user.read_only, user.enabled) == ("alice", True, True)
    stored = _stored_hash(store, "alice")
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    assert store.user_for_token(token) == user
    with store.engine.connect() as conn:
        hashes = list(conn.execute(select(api_tokens.c.token_hash)).scalars())
    assert hashes == [hashlib.sha256(token.encode()).hexdigest()]
    assert len(token) >= 43  # secrets.token_urlsafe(32)


def test_user_is_never_exposed_with_its_hash(store: RegistryStore) -> None:
    user, _ = store.add_user("alice", PASSWORD)
    assert set(user.model_dump()) == {"username", "read_only", "enabled", "created_at"}
    assert user.created_at.tzinfo is not None


def test_duplicate_username_is_a_conflict(store: RegistryStore) -> None:
    store.add_user("alice", PASSWORD)
    with pytest.raises(Conflict, match=r"^user 'alice' already exists$"):
        store.add_user("alice", "other")


@pytest.mark.parametrize("username", ["", "a:b", " alice", "alice ", "al\x00ice", "x" * 201])
def test_invalid_usernames_are_rejected(store: RegistryStore, username: str) -> None:
    with pytest.raises(InvalidRequest):
        store.add_user(username, PASSWORD)


def test_empty_password_is_rejected(store: RegistryStore) -> None:
    with pytest.raises(InvalidRequest):
        store.add_user("alice", "")
    store.add_user("alice", PASSWORD)
    with pytest.raises(InvalidRequest):
        store.set_password("alice", "")


def test_verify_password(store: RegistryStore) -> None:
    user, _ = store.add_user("alice", PASSWORD)
    assert store.verify_password("alice", PASSWORD) == user
    with pytest.raises(AuthError) as wrong:
        store.verify_password("alice", "wrong")
    with pytest.raises(AuthError) as unknown:
        store.verify_password("mallory", PASSWORD)
    # The same message for both: no user enumeration.
    assert str(wrong.value) == str(unknown.value) == "invalid username or password"


def test_disabled_user_cannot_log_in_or_use_tokens(store: RegistryStore) -> None:
    _, token = store.add_user("alice", PASSWORD)
    disabled = store.set_user_enabled("alice", False)
    assert disabled.enabled is False
    with pytest.raises(AuthError, match="disabled"):
        store.verify_password("alice", PASSWORD)
    with pytest.raises(AuthError, match="invalid username or password"):
        store.verify_password("alice", "wrong")  # wrong password says nothing about the state
    with pytest.raises(AuthError):
        store.user_for_token(token)
    store.set_user_enabled("alice", True)
    assert store.user_for_token(token).username == "alice"
    assert store.verify_password("alice", PASSWORD).enabled


def test_set_password(store: RegistryStore) -> None:
    store.add_user("alice", PASSWORD)
    store.set_password("alice", "new password")
    with pytest.raises(AuthError):
        store.verify_password("alice", PASSWORD)
    assert store.verify_password("alice", "new password").username == "alice"


def test_token_lifecycle(store: RegistryStore) -> None:
    _, first = store.add_user("alice", PASSWORD)
    second = store.issue_token("alice")
    assert second != first
    assert store.user_for_token(first).username == store.user_for_token(second).username == "alice"

    store.set_tokens_enabled("alice", False)
    for token in (first, second):
        with pytest.raises(AuthError, match="invalid, revoked or disabled API token"):
            store.user_for_token(token)
    store.set_tokens_enabled("alice", True)
    assert store.user_for_token(first).username == "alice"

    fresh = store.refresh_tokens("alice")
    assert store.user_for_token(fresh).username == "alice"
    for token in (first, second):
        with pytest.raises(AuthError):
            store.user_for_token(token)


def test_tokens_are_per_user(store: RegistryStore) -> None:
    _, alice = store.add_user("alice", PASSWORD)
    _, bob = store.add_user("bob", PASSWORD)
    store.refresh_tokens("bob")
    assert store.user_for_token(alice).username == "alice"
    with pytest.raises(AuthError):
        store.user_for_token(bob)


def test_unknown_token_is_an_auth_error(store: RegistryStore) -> None:
    with pytest.raises(AuthError):
        store.user_for_token("nope")
    with pytest.raises(AuthError):
        store.user_for_token("")


def test_issue_token_label_is_checked(store: RegistryStore) -> None:
    store.add_user("alice", PASSWORD)
    with pytest.raises(InvalidRequest):
        store.issue_token("alice", label="")
    assert store.issue_token("alice", label="ci")


def test_remove_user_removes_their_tokens(store: RegistryStore) -> None:
    _, token = store.add_user("alice", PASSWORD)
    store.remove_user("alice")
    with pytest.raises(AuthError):
        store.user_for_token(token)
    with store.engine.connect() as conn:
        assert conn.execute(select(api_tokens.c.id)).all() == []
    assert store.list_users() == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.remove_user("ghost"),
        lambda s: s.set_password("ghost", "pw"),
        lambda s: s.set_user_enabled("ghost", False),
        lambda s: s.issue_token("ghost"),
        lambda s: s.refresh_tokens("ghost"),
        lambda s: s.set_tokens_enabled("ghost", True),
        lambda s: s.get_user("ghost"),
    ],
)
def test_unknown_user_is_not_found(store: RegistryStore, call: Callable[[RegistryStore], object]) -> None:
    with pytest.raises(NotFound, match=r"^user 'ghost' not found$"):
        call(store)


def test_list_users_is_sorted(store: RegistryStore) -> None:
    store.add_user("carol", PASSWORD)
    store.add_user("alice", PASSWORD, enabled=False)
    assert [(u.username, u.enabled) for u in store.list_users()] == [("alice", False), ("carol", True)]
    assert store.get_user("alice").enabled is False


def test_ensure_admin_only_once(store: RegistryStore) -> None:
    token = store.ensure_admin()
    assert token is not None
    admin = store.user_for_token(token)
    assert (admin.username, admin.read_only, admin.enabled) == ("admin", False, True)
    assert store.ensure_admin() is None
    assert [u.username for u in store.list_users()] == ["admin"]


def test_ensure_admin_does_nothing_when_any_user_exists(store: RegistryStore) -> None:
    store.add_user("alice", PASSWORD)
    assert store.ensure_admin() is None
    assert [u.username for u in store.list_users()] == ["alice"]


def test_outdated_hash_is_upgraded_on_login(make_store: MakeStore) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    strong = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    make_store(hasher=weak).add_user("alice", PASSWORD)
    store = make_store(hasher=strong)
    old = _stored_hash(store, "alice")
    assert weak.check_needs_rehash(old) is False
    assert strong.check_needs_rehash(old) is True
    store.verify_password("alice", PASSWORD)
    new = _stored_hash(store, "alice")
    assert new != old
    assert strong.check_needs_rehash(new) is False
    assert store.verify_password("alice", PASSWORD).username == "alice"


def test_default_hasher_is_argon2id_with_library_defaults(make_store: MakeStore) -> None:
    store = RegistryStore(f"sqlite:///{make_store().engine.url.database}")
    try:
        store.add_user("alice", PASSWORD)
        stored = _stored_hash(store, "alice")
        assert stored.startswith("$argon2id$")
        assert PasswordHasher().check_needs_rehash(stored) is False
    finally:
        store.close()
