"""Fixtures of the registry tests: real, migrated databases, on SQLite and on PostgreSQL.

Every test that uses the ``store`` fixture (directly or through ``cache``, ``events``,
``new_physical``, ``new_logical``) runs twice, as ``[sqlite]`` and ``[postgresql]``: see
:func:`pytest_generate_tests`. Other tests use SQLite files only (several of them are about
SQLite, or build ``sqlite:///`` URLs themselves); the PostgreSQL-only tests live in
``test_*_postgres.py`` and use the ``postgres`` fixture.

SQLite: each store file is a copy of a file migrated once per session. PostgreSQL: one private
server per test session (:func:`isthmus.testing.postgres.shared_postgres`, shared with the
other test directories), a database migrated once per session as a template, and a fresh
copy of it for each store name of each test (~20 ms), dropped at teardown. Missing PostgreSQL
fails those tests; it never skips them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher, profiles
from sqlalchemy.engine import make_url

from isthmus.registry.cache import DeviceCache
from isthmus.registry.models import LogicalDeviceCreate, PhysicalDeviceCreate
from isthmus.registry.store import RegistryStore
from isthmus.testing.postgres import TemporaryPostgres, shared_postgres

MakeStore = Callable[..., RegistryStore]

BACKENDS = ("sqlite", "postgresql")
POSTGRES_TEMPLATE = "registry_template"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that depends on ``store`` on each backend."""
    if "store" in metafunc.fixturenames:  # the whole fixture closure, not just the arguments
        metafunc.parametrize("registry_backend", BACKENDS, indirect=True)


@pytest.fixture
def registry_backend(request: pytest.FixtureRequest) -> str:
    """The database behind ``make_store``: ``"sqlite"`` unless parametrised (see above)."""
    backend: str = getattr(request, "param", "sqlite")
    return backend


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[TemporaryPostgres]:
    """The session's private PostgreSQL server (started on first use)."""
    with shared_postgres() as pg:
        yield pg


@pytest.fixture(scope="session")
def postgres_template(postgres: TemporaryPostgres) -> str:
    """Name of a PostgreSQL database migrated once per session, to be copied by tests."""
    with RegistryStore(postgres.create_database(POSTGRES_TEMPLATE)) as store:
        store.migrate()
    return POSTGRES_TEMPLATE  # the store is closed: a template must have no connection


@pytest.fixture
def make_postgres_url(postgres: TemporaryPostgres, postgres_template: str) -> Iterator[Callable[[], str]]:
    """``make_postgres_url()`` → URL of a fresh migrated PostgreSQL database, dropped at teardown."""
    created: list[str] = []

    def make() -> str:
        url = postgres.create_database(template=postgres_template)
        created.append(str(make_url(url).database))
        return url

    yield make
    for name in created:
        postgres.drop_database(name)  # also closes whatever connection a test leaked


@pytest.fixture
def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_template: Path, registry_backend: str
) -> Iterator[MakeStore]:
    """Open stores on migrated databases; all are closed at teardown.

    The first call with a given ``name`` creates a database (a copy of the migrated SQLite
    file under ``tmp_path``, or of the migrated PostgreSQL template); later calls open another
    store on the same database (like a second process would).
    """
    opened: list[RegistryStore] = []
    urls: dict[str, str] = {}
    new_postgres_url: Callable[[], str] | None = None
    if registry_backend == "postgresql":
        new_postgres_url = request.getfixturevalue("make_postgres_url")

    def url_of(name: str) -> str:
        if name not in urls:
            if new_postgres_url is not None:
                urls[name] = new_postgres_url()
            else:
                path = tmp_path / name
                if not path.exists():
                    shutil.copyfile(migrated_template, path)
                urls[name] = f"sqlite:///{path}"
        return urls[name]

    def make(
        name: str = "registry.db",
        *,
        hasher: PasswordHasher | None = None,
        device_hasher: PasswordHasher | None = None,
    ) -> RegistryStore:
        store = RegistryStore(
            url_of(name),
            password_hasher=hasher or cheap_hasher(),
            device_password_hasher=device_hasher or cheap_hasher(),
        )
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
