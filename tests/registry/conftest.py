"""Fixtures of the registry tests: real, migrated SQLite files under ``tmp_path``."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, profiles

from isthmus.registry.cache import DeviceCache
from isthmus.registry.models import LogicalDeviceCreate, PhysicalDeviceCreate
from isthmus.registry.store import RegistryStore

MakeStore = Callable[..., RegistryStore]


def cheap_hasher() -> PasswordHasher:
    """argon2id with the library's cheapest parameters: keeps the suite fast."""
    return PasswordHasher.from_parameters(profiles.CHEAPEST)


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry file migrated once per session; tests start from copies (migrating costs ~0.1 s)."""
    path = tmp_path_factory.mktemp("template") / "registry.db"
    with RegistryStore(f"sqlite:///{path}") as store:
        store.migrate()
    return path


@pytest.fixture
def make_store(tmp_path: Path, migrated_template: Path) -> Iterator[MakeStore]:
    """Open stores on migrated files under ``tmp_path``; all are closed at teardown.

    The first call with a given ``name`` copies the migrated template; later calls open
    another store on the same file (like a second process would).
    """
    opened: list[RegistryStore] = []

    def make(name: str = "registry.db", *, hasher: PasswordHasher | None = None) -> RegistryStore:
        path = tmp_path / name
        if not path.exists():
            shutil.copyfile(migrated_template, path)
        store = RegistryStore(f"sqlite:///{path}", password_hasher=hasher or cheap_hasher())
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: MakeStore) -> RegistryStore:
    return make_store()


@pytest.fixture
def cache(store: RegistryStore) -> Iterator[DeviceCache]:
    c = DeviceCache(store)
    c.load()
    yield c
    c.close()


@pytest.fixture
def events(store: RegistryStore) -> list[tuple[str, int | None]]:
    """Every change notification the store sends, in order."""
    seen: list[tuple[str, int | None]] = []
    store.add_listener(lambda kind, uid: seen.append((kind, uid)))
    return seen


NewDevice = Callable[..., int]


@pytest.fixture
def new_physical(store: RegistryStore) -> NewDevice:
    """``new_physical(name="sensor", **fields) -> uid``: create a physical device in ``store``."""

    def make(name: str = "sensor", **fields: object) -> int:
        return store.create_physical(PhysicalDeviceCreate.model_validate({"name": name, **fields})).uid

    return make


@pytest.fixture
def new_logical(store: RegistryStore) -> NewDevice:
    """``new_logical(name="tank", **fields) -> uid``: create a logical device in ``store``."""

    def make(name: str = "tank", **fields: object) -> int:
        return store.create_logical(LogicalDeviceCreate.model_validate({"name": name, **fields})).uid

    return make
