"""The device registry: physical and logical devices, their mappings, users and API tokens.

:class:`RegistryStore` is synchronous (SQLAlchemy Core); async callers run its methods in a
thread pool. It is safe to share one store between threads: each method uses its own
connection and transaction.

Errors. Every method raises only :mod:`isthmus.errors` types for database trouble:

* :class:`~isthmus.errors.NotFound` — the named device, mapping or user does not exist;
* :class:`~isthmus.errors.Conflict` — a uniqueness or ordering rule would be broken (a device
  token, device username or user name already in use, a mapping starting before the device's
  latest one);
* :class:`~isthmus.errors.AuthError` — bad credentials (:meth:`RegistryStore.verify_password`,
  :meth:`RegistryStore.user_for_token` only);
* :class:`~isthmus.errors.InvalidRequest` — an argument the registry cannot accept (a naive
  datetime, both or neither of ``p_uid``/``l_uid``, an empty password …), checked before any
  database work, or a value the database refuses as malformed data (PostgreSQL's text cannot
  hold NUL characters);
* :class:`~isthmus.errors.RegistryError` — anything else: the database being unreachable,
  locked for too long, at an unknown schema revision, or refusing a write.

Messages name the object (``"physical device 7 not found"``) and never contain SQL, tokens or
password hashes.

Change notification. :meth:`RegistryStore.add_listener` registers a callback that is called
after every committed change of a device or mapping, in the thread that made the change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from collections.abc import Mapping as AbstractMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from alembic.util.exc import CommandError
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import (
    Engine,
    Select,
    Table,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, CursorResult, RowMapping, make_url
from sqlalchemy.exc import ArgumentError, DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from isthmus.errors import AuthError, Conflict, InvalidRequest, IsthmusError, NotFound, RegistryError
from isthmus.interfaces import DeviceRef
from isthmus.registry.migrations import migrate as _migrate
from isthmus.registry.models import (
    DEVICE_PASSWORD_MAX,
    DEVICE_USERNAME_MAX,
    Location,
    LogicalDevice,
    LogicalDeviceCreate,
    LogicalDevicePatch,
    Mapping,
    PhysicalDevice,
    PhysicalDeviceCreate,
    PhysicalDevicePatch,
    User,
)
from isthmus.registry.schema import (
    UTCDateTime,
    api_tokens,
    device_credentials,
    logical_devices,
    mappings,
    physical_devices,
    users,
)

__all__ = ["ChangeKind", "Listener", "RegistryStore", "default_device_hasher"]

logger = logging.getLogger(__name__)

ChangeKind = Literal["physical", "logical", "mapping"]
"""What changed: a physical device, a logical device, or the mappings of a physical device."""

Listener = Callable[[str, int | None], None]
"""A change callback: ``callback(kind, uid)``; see :meth:`RegistryStore.add_listener`."""

_WRITE_OPTION = "isthmus_registry_write"
_TAKEN_MSG = "token already in use by another device"
_BAD_LOGIN_MSG = "invalid username or password"
_BAD_BEARER_MSG = "invalid, revoked or disabled API token"
_USERNAME_MAX = 200
_LABEL_MAX = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_Kind = Literal["physical", "logical"]

# argon2id with OWASP's recommended minimum (m=19 MiB, t=2, p=1): a device's password is checked
# on every cold MQTT CONNECT and a fleet reconnects at once after a restart, so device hashes use
# under a third of the memory and a fraction of the time of the library default used for
# operators (m=64 MiB, t=3, p=4): ~35 ms of one core instead of ~230 ms on the reference box.
_DEVICE_HASH_TIME_COST = 2
_DEVICE_HASH_MEMORY_KIB = 19 * 1024
_DEVICE_HASH_PARALLELISM = 1


def default_device_hasher() -> PasswordHasher:
    """The default hasher of device passwords: argon2id, m=19 MiB, t=2, p=1 (OWASP's minimum)."""
    return PasswordHasher(
        time_cost=_DEVICE_HASH_TIME_COST,
        memory_cost=_DEVICE_HASH_MEMORY_KIB,
        parallelism=_DEVICE_HASH_PARALLELISM,
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime, what: str) -> datetime:
    """``value`` in UTC; a naive datetime is reported as InvalidRequest."""
    if value.tzinfo is None or value.utcoffset() is None:
        msg = f"{what} must be a timezone-aware datetime, got {value.isoformat()}"
        raise InvalidRequest(msg)
    return value.astimezone(UTC)


def _source_key(source_ids: AbstractMapping[str, str | int]) -> str:
    """The canonical text of ``source_ids``: equal dicts give equal keys."""
    return json.dumps(source_ids, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _new_id(result: CursorResult[Any]) -> int:
    """The primary key of the row an INSERT just created."""
    key = result.inserted_primary_key
    if key is None or key[0] is None:  # pragma: no cover - every insert here has one
        msg = "the database did not report the new row's id"
        raise RegistryError(msg)
    return int(key[0])


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's own message, without the SQL statement or its parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def _is_unique_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code is not None:
        return str(code) == "23505"
    name = getattr(orig, "sqlite_errorname", None)
    if name is not None:
        return str(name) in {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}
    return "unique" in str(orig).lower()


def _location(row: RowMapping) -> Location | None:
    if row["latitude"] is None or row["longitude"] is None:
        return None
    return Location(lat=row["latitude"], long=row["longitude"])


def _location_values(location: Location | None) -> dict[str, float | None]:
    if location is None:
        return {"latitude": None, "longitude": None}
    return {"latitude": location.lat, "longitude": location.long}


def _select_physical() -> Select[Any]:
    """Every column of physical devices and the username of their credential (or NULL)."""
    joined = physical_devices.outerjoin(device_credentials, device_credentials.c.p_uid == physical_devices.c.uid)
    return select(physical_devices, device_credentials.c.username).select_from(joined)


def _physical(row: RowMapping) -> PhysicalDevice:
    return PhysicalDevice(
        uid=row["uid"],
        name=row["name"],
        source_name=row["source_name"],
        source_ids=row["source_ids"],
        location=_location(row),
        last_seen=row["last_seen"],
        properties=row["properties"],
        token=row["token"],
        enabled=row["enabled"],
        decoder=row["decoder"],
        created_at=row["created_at"],
        username=row.get("username"),
    )


def _logical(row: RowMapping) -> LogicalDevice:
    return LogicalDevice(
        uid=row["uid"],
        name=row["name"],
        location=_location(row),
        last_seen=row["last_seen"],
        properties=row["properties"],
        created_at=row["created_at"],
    )


def _mapping(row: RowMapping) -> Mapping:
    return Mapping(
        id=row["id"],
        p_uid=row["p_uid"],
        l_uid=row["l_uid"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        paused=row["paused"],
    )


def _user(row: RowMapping) -> User:
    return User(
        username=row["username"],
        read_only=row["read_only"],
        enabled=row["enabled"],
        created_at=row["created_at"],
    )


def _check_username(username: str) -> None:
    if not username or len(username) > _USERNAME_MAX:
        msg = f"username must be 1 to {_USERNAME_MAX} characters"
        raise InvalidRequest(msg)
    if ":" in username or _CONTROL.search(username) or username.strip() != username:
        msg = "username must not contain ':' or control characters, nor start or end with whitespace"
        raise InvalidRequest(msg)


def _check_password(password: str) -> None:
    if not password:
        msg = "password must not be empty"
        raise InvalidRequest(msg)


def _check_unicode(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        msg = f"{what} must be valid Unicode text (it holds an unpaired surrogate)"
        raise InvalidRequest(msg) from None


def _check_device_username(username: str) -> None:
    if not username or len(username) > DEVICE_USERNAME_MAX:
        msg = f"username must be 1 to {DEVICE_USERNAME_MAX} characters"
        raise InvalidRequest(msg)
    if _CONTROL.search(username) or username.strip() != username:
        msg = "username must not contain control characters, nor start or end with whitespace"
        raise InvalidRequest(msg)
    _check_unicode(username, "username")


def _check_device_password(password: str) -> None:
    if not password or len(password) > DEVICE_PASSWORD_MAX:
        msg = f"password must be 1 to {DEVICE_PASSWORD_MAX} characters"
        raise InvalidRequest(msg)
    _check_unicode(password, "password")


def _one_device(p_uid: int | None, l_uid: int | None) -> tuple[_Kind, int]:
    if (p_uid is None) == (l_uid is None):
        msg = "give exactly one of p_uid and l_uid"
        raise InvalidRequest(msg)
    if p_uid is not None:
        return "physical", p_uid
    assert l_uid is not None  # noqa: S101 - narrowed by the check above
    return "logical", l_uid


def _device_table(kind: _Kind) -> Table:
    return physical_devices if kind == "physical" else logical_devices


def _mapping_column(kind: _Kind) -> Any:
    return mappings.c.p_uid if kind == "physical" else mappings.c.l_uid


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_on_begin); the driver must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    # Write transactions take the write lock up front: a deferred transaction that reads
    # and then writes can fail with SQLITE_BUSY (no busy wait) when another writer got in
    # between; BEGIN IMMEDIATE waits for busy_timeout instead.
    immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _create_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not chained and not echoed: a malformed URL may well contain a password.
        msg = "invalid registry database URL (expected e.g. sqlite:///data/registry.db)"
        raise RegistryError(msg) from None
    try:
        if parsed.get_backend_name() != "sqlite":
            return create_engine(parsed, pool_pre_ping=True)
        database = parsed.database or ""
        in_memory = database in {"", ":memory:"} or parsed.query.get("mode") == "memory"
        if in_memory:
            # One connection shared by every thread: fine for tests, not for production.
            engine = create_engine(
                parsed,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
        else:
            if not database.startswith("file:"):
                parent = Path(database).expanduser().parent
                if not parent.is_dir():
                    msg = f"registry database directory {str(parent)!r} does not exist"
                    raise RegistryError(msg)
            engine = create_engine(parsed)
    except (SQLAlchemyError, ImportError) as exc:
        msg = f"cannot create the registry database engine: {exc}"
        raise RegistryError(msg) from exc
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


class RegistryStore:
    """The device and user registry, stored with SQLAlchemy Core (SQLite or PostgreSQL).

    ``url`` is a SQLAlchemy database URL. For SQLite the database file's parent directory
    must exist (the file is created on first use) and every connection runs in WAL mode with
    foreign keys on and a 5 s busy timeout; ``sqlite://`` (in memory) shares one connection
    and is meant for single-threaded tests. Creating the store opens no connection; call
    :meth:`migrate` before anything else on a new database.

    ``password_hasher`` (users' passwords) defaults to argon2-cffi's
    :class:`~argon2.PasswordHasher` with the library's default (argon2id) parameters;
    ``device_password_hasher`` (devices' username + password credentials) to
    :func:`default_device_hasher`. Tests may pass cheaper ones.

    Raises :class:`~isthmus.errors.RegistryError` if the URL is invalid, its driver is not
    installed or the SQLite directory does not exist.
    """

    def __init__(
        self,
        url: str,
        *,
        password_hasher: PasswordHasher | None = None,
        device_password_hasher: PasswordHasher | None = None,
    ) -> None:
        self._engine = _create_engine(url)
        self._writer = self._engine.execution_options(**{_WRITE_OPTION: True})
        self._hasher = password_hasher if password_hasher is not None else PasswordHasher()
        self._device_hasher = device_password_hasher if device_password_hasher is not None else default_device_hasher()
        self._dummy_hash: str | None = None
        self._listeners: tuple[Listener, ...] = ()
        self._listeners_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for migrations tooling and tests; not for queries)."""
        return self._engine

    def migrate(self) -> None:
        """Bring the database to the newest schema (``alembic upgrade head``).

        Idempotent and safe to run from several processes at once on SQLite (the upgrade
        takes the write lock). Raises :class:`~isthmus.errors.RegistryError` if the database
        cannot be reached or carries a revision this version of Isthmus does not know
        (written by a newer version).
        """
        self._check_open()
        try:
            _migrate(self._writer)
        except CommandError as exc:
            msg = f"cannot migrate the registry database: {exc}"
            raise RegistryError(msg) from exc
        except SQLAlchemyError as exc:
            msg = f"cannot migrate the registry database: {_reason(exc)}"
            raise RegistryError(msg) from exc

    def close(self) -> None:
        """Close every pooled connection. Any later call raises RegistryError."""
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> RegistryStore:
        """Use the store as a context manager that closes it on exit."""
        return self

    def __exit__(self, *_exc: object) -> None:
        """Close the store."""
        self.close()

    # ------------------------------------------------------------------ listeners

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(kind, uid)`` after every committed change.

        ``kind`` is ``"physical"`` (``uid`` is the physical device's), ``"logical"`` (``uid``
        is the logical device's) or ``"mapping"`` (``uid`` is a physical device whose
        mappings changed; one call per physical device). ``uid`` is ``None`` only when the
        scope is unknown, meaning "anything of this kind may have changed"; this store never
        sends ``None`` today. :meth:`touch` (last seen) sends nothing.

        Callbacks run synchronously in the thread that made the change, after the commit,
        in registration order. An exception in a callback is logged and swallowed: the
        change is committed either way.
        """
        with self._listeners_lock:
            self._listeners = (*self._listeners, callback)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback``. Unknown callbacks are ignored."""
        with self._listeners_lock:
            self._listeners = tuple(cb for cb in self._listeners if cb != callback)

    def _notify(self, events: list[tuple[ChangeKind, int | None]]) -> None:
        listeners = self._listeners
        for kind, uid in events:
            for callback in listeners:
                try:
                    callback(kind, uid)
                except Exception:  # a listener's bug must not undo a committed change
                    logger.exception("registry listener failed on %s %s", kind, uid)

    # ------------------------------------------------------------------ transactions

    def _check_open(self) -> None:
        if self._closed:
            msg = "the registry store is closed"
            raise RegistryError(msg)

    @contextmanager
    def _tx(self, action: str, *, write: bool, conflict: str | None = None) -> Iterator[Connection]:
        """A transaction, with database errors translated into :mod:`isthmus.errors`."""
        self._check_open()
        engine = self._writer if write else self._engine
        try:
            with engine.begin() as connection:
                yield connection
        except IsthmusError:
            raise
        except IntegrityError as exc:
            if _is_unique_violation(exc):
                raise Conflict(conflict or f"cannot {action}: already exists") from exc
            msg = f"cannot {action}: {_reason(exc)}"
            raise RegistryError(msg) from exc
        except DataError as exc:
            # The value, not the database, is at fault (SQLSTATE class 22, or the driver refusing
            # to send it): retrying cannot help, so this is not a RegistryError.
            msg = f"cannot {action}: {_reason(exc)}"
            raise InvalidRequest(msg) from exc
        except SQLAlchemyError as exc:
            msg = f"cannot {action}: {_reason(exc)}"
            raise RegistryError(msg) from exc

    @staticmethod
    def _serialise_mapping_changes(conn: Connection) -> None:
        """Make concurrent mapping changes run one after the other (PostgreSQL).

        Starting or ending a mapping can end the open mapping of *another* device (the logical
        device of ``p_uid``'s open mapping, say), whose row the transaction has not locked; a
        concurrent :meth:`start_mapping` for that other device would check its history before
        the change commits and create overlapping mappings. SHARE ROW EXCLUSIVE conflicts with
        itself and with every write to ``mappings``, but not with reads. Every method that
        writes mappings takes it before locking any mapping row (a row lock taken first would
        deadlock with a holder of this lock waiting for that row). SQLite needs nothing: its
        write transactions (``BEGIN IMMEDIATE``) are serialised already.
        """
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("LOCK TABLE mappings IN SHARE ROW EXCLUSIVE MODE")

    # ------------------------------------------------------------------ physical devices

    def create_physical(self, data: PhysicalDeviceCreate) -> PhysicalDevice:
        """Create a physical device and return it with its new uid.

        A missing ``token`` is generated. Raises :class:`~isthmus.errors.Conflict`
        (``"token already in use by another device"``) if the token is taken.
        """
        dumped = data.model_dump(mode="json", include={"source_ids", "properties"})
        values: dict[str, Any] = {
            "name": data.name,
            "source_name": data.source_name,
            "source_ids": dumped["source_ids"],
            "source_key": _source_key(dumped["source_ids"]),
            **_location_values(data.location),
            "last_seen": data.last_seen,
            "properties": dumped["properties"],
            "token": data.token if data.token is not None else secrets.token_urlsafe(15),
            "enabled": data.enabled,
            "decoder": data.decoder,
            "created_at": _utcnow(),
        }
        with self._tx("create physical device", write=True, conflict=_TAKEN_MSG) as conn:
            result = conn.execute(insert(physical_devices).values(values))
            uid = _new_id(result)
            device = self._get_physical(conn, uid)
        self._notify([("physical", uid)])
        return device

    def get_physical(self, uid: int) -> PhysicalDevice:
        """The physical device ``uid``. Raises NotFound if there is none."""
        with self._tx(f"read physical device {uid}", write=False) as conn:
            return self._get_physical(conn, uid)

    def list_physical(self, source: str | None = None, unmapped: bool = False) -> list[PhysicalDevice]:
        """Physical devices ordered by uid.

        ``source`` keeps those of that source only; ``unmapped`` keeps those without an open
        mapping (a paused open mapping still counts as mapped).
        """
        query = _select_physical().order_by(physical_devices.c.uid)
        if source is not None:
            query = query.where(physical_devices.c.source_name == source)
        if unmapped:
            is_open = (
                select(mappings.c.id)
                .where(
                    mappings.c.p_uid == physical_devices.c.uid,
                    mappings.c.end_time.is_(None),
                )
                .exists()
            )
            query = query.where(~is_open)
        with self._tx("list physical devices", write=False) as conn:
            return [_physical(row) for row in conn.execute(query).mappings()]

    def update_physical(self, uid: int, patch: PhysicalDevicePatch) -> PhysicalDevice:
        """Change the fields present in ``patch`` and return the updated device.

        Raises NotFound if the device does not exist and Conflict if the new token is taken.
        An empty patch changes nothing (and notifies nobody).
        """
        fields = patch.model_fields_set
        dumped = patch.model_dump(mode="json", include={"source_ids", "properties"} & fields)
        values: dict[str, Any] = {}
        for name in ("name", "source_name", "last_seen", "token", "enabled", "decoder"):
            if name in fields:
                values[name] = getattr(patch, name)
        if "source_ids" in fields:
            values["source_ids"] = dumped["source_ids"]
            values["source_key"] = _source_key(dumped["source_ids"])
        if "properties" in fields:
            values["properties"] = dumped["properties"]
        if "location" in fields:
            values.update(_location_values(patch.location))
        with self._tx(f"update physical device {uid}", write=True, conflict=_TAKEN_MSG) as conn:
            if values:
                conn.execute(update(physical_devices).where(physical_devices.c.uid == uid).values(values))
            device = self._get_physical(conn, uid)
        if values:
            self._notify([("physical", uid)])
        return device

    def delete_physical(self, uid: int) -> PhysicalDevice:
        """Delete the physical device ``uid``, its mappings and its credential; return what was deleted.

        Raises NotFound if it does not exist. Notifies ``"physical"`` and, if the device had
        mappings, ``"mapping"``.
        """
        with self._tx(f"delete physical device {uid}", write=True) as conn:
            device = self._get_physical(conn, uid)
            had_mappings = (
                conn.execute(select(mappings.c.id).where(mappings.c.p_uid == uid).limit(1)).first() is not None
            )
            conn.execute(delete(physical_devices).where(physical_devices.c.uid == uid))
        events: list[tuple[ChangeKind, int | None]] = [("physical", uid)]
        if had_mappings:
            events.append(("mapping", uid))
        self._notify(events)
        return device

    def device_refs(self) -> list[tuple[str, DeviceRef]]:
        """``(token, DeviceRef)`` of every *enabled* physical device, ordered by uid.

        The hot-path view of the devices (of the JSON columns only ``properties``, for the gateway flag), for
        :meth:`DeviceCache.load <isthmus.registry.cache.DeviceCache.load>` on large fleets.
        """
        table = physical_devices
        query = (
            select(table.c.uid, table.c.token, table.c.name, table.c.source_name, table.c.decoder, table.c.properties)
            .where(table.c.enabled.is_(True))
            .order_by(table.c.uid)
        )
        with self._tx("list device tokens", write=False) as conn:
            return [
                (str(token), _hot_ref(uid, name, source, decoder, props))
                for uid, token, name, source, decoder, props in conn.execute(query)
            ]

    # ------------------------------------------------------------------ device credentials

    def set_credentials(self, p_uid: int, username: str, password: str) -> PhysicalDevice:
        """Give physical device ``p_uid`` this username + password credential, replacing its old one.

        A device has at most one such credential and usernames are unique across devices. The
        password is stored only as an argon2id hash (``device_password_hasher``). Usernames are
        1 to 200 characters without control characters or surrounding whitespace; passwords 1
        to 1000 characters (InvalidRequest otherwise, before any database work). Raises NotFound
        if the device does not exist and Conflict if another device has ``username``. Returns
        the device (its ``username`` set) and notifies ``"physical"``.
        """
        _check_device_username(username)
        _check_device_password(password)
        password_hash = self._device_hasher.hash(password)
        values = {"username": username, "password_hash": password_hash, "updated_at": _utcnow()}
        taken = f"username {username!r} already in use by another device"
        table = device_credentials
        with self._tx(f"set credentials of physical device {p_uid}", write=True, conflict=taken) as conn:
            self._lock_device(conn, "physical", p_uid)
            owner = conn.execute(select(table.c.p_uid).where(table.c.username == username)).scalar_one_or_none()
            if owner is not None and owner != p_uid:
                raise Conflict(taken)
            # Concurrent writers: the device row lock serialises two calls for one device; the
            # unique constraint turns a race for one username into a Conflict (see _tx).
            if not conn.execute(update(table).where(table.c.p_uid == p_uid).values(values)).rowcount:
                conn.execute(insert(table).values(p_uid=p_uid, **values))
            device = self._get_physical(conn, p_uid)
        self._notify([("physical", p_uid)])
        return device

    def remove_credentials(self, p_uid: int) -> PhysicalDevice:
        """Remove the username + password credential of ``p_uid``; return the device.

        Raises NotFound if the device does not exist or has no such credential. Its access token
        keeps working. Notifies ``"physical"``.
        """
        table = device_credentials
        with self._tx(f"remove credentials of physical device {p_uid}", write=True) as conn:
            self._lock_device(conn, "physical", p_uid)
            if not conn.execute(delete(table).where(table.c.p_uid == p_uid)).rowcount:
                msg = f"physical device {p_uid} has no username and password credentials"
                raise NotFound(msg)
            device = self._get_physical(conn, p_uid)
        self._notify([("physical", p_uid)])
        return device

    def physical_by_username(self, username: str) -> PhysicalDevice | None:
        """The device whose credential has this username (enabled or not), or None."""
        query = _select_physical().where(device_credentials.c.username == username)
        with self._tx("find physical device by username", write=False) as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _physical(row)

    def credential_refs(
        self, *, username: str | None = None, p_uid: int | None = None
    ) -> list[tuple[str, str, DeviceRef]]:
        """``(username, password_hash, DeviceRef)`` of the credentials of *enabled* devices, by uid.

        Only the one with ``username`` or of device ``p_uid`` when given. For
        :class:`DeviceCache <isthmus.registry.cache.DeviceCache>`: hashes never leave the package.
        """
        table = physical_devices
        query = (
            select(
                device_credentials.c.username,
                device_credentials.c.password_hash,
                table.c.uid,
                table.c.name,
                table.c.source_name,
                table.c.decoder,
                table.c.properties,
            )
            .join(device_credentials, device_credentials.c.p_uid == table.c.uid)
            .where(table.c.enabled.is_(True))
            .order_by(table.c.uid)
        )
        if username is not None:
            query = query.where(device_credentials.c.username == username)
        if p_uid is not None:
            query = query.where(table.c.uid == p_uid)
        with self._tx("list device credentials", write=False) as conn:
            return [
                (str(username_), str(password_hash), _hot_ref(uid, name, source, decoder, props))
                for username_, password_hash, uid, name, source, decoder, props in conn.execute(query)
            ]

    def check_device_password(self, password_hash: str, password: str | bytes) -> bool:
        """Whether ``password`` matches a device credential's ``password_hash`` (argon2, CPU-bound).

        Never touches the database; run it in a worker thread. False for a wrong password and
        for a hash that is not an argon2 hash (logged). Raises RegistryError when argon2 cannot
        check at all (out of memory …): a refusal then would be taken for a wrong password.
        """
        try:
            return bool(self._device_hasher.verify(password_hash, password))
        except VerifyMismatchError:
            return False
        except InvalidHashError:
            logger.warning("a device credential's password hash is not a valid argon2 hash")
            return False
        except VerificationError as exc:
            msg = f"cannot check a device password: {exc}"
            raise RegistryError(msg) from exc

    def find_physical(self, source_name: str, source_ids: AbstractMapping[str, str | int]) -> PhysicalDevice | None:
        """The device of ``source_name`` whose ``source_ids`` equal ``source_ids`` exactly.

        Keys and values must match, including their types (``1`` is not ``"1"``). If several
        devices match, the one with the lowest uid is returned.
        """
        query = (
            _select_physical()
            .where(
                physical_devices.c.source_name == source_name,
                physical_devices.c.source_key == _source_key(source_ids),
            )
            .order_by(physical_devices.c.uid)
            .limit(1)
        )
        with self._tx("find physical device", write=False) as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _physical(row)

    def physical_by_token(self, token: str) -> PhysicalDevice | None:
        """The device whose access token is ``token`` (enabled or not), or None."""
        query = _select_physical().where(physical_devices.c.token == token)
        with self._tx("find physical device by token", write=False) as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _physical(row)

    @staticmethod
    def _get_physical(conn: Connection, uid: int) -> PhysicalDevice:
        query = _select_physical().where(physical_devices.c.uid == uid)
        row = conn.execute(query).mappings().first()
        if row is None:
            msg = f"physical device {uid} not found"
            raise NotFound(msg)
        return _physical(row)

    # ------------------------------------------------------------------ logical devices

    def create_logical(self, data: LogicalDeviceCreate) -> LogicalDevice:
        """Create a logical device and return it with its new uid."""
        values: dict[str, Any] = {
            "name": data.name,
            **_location_values(data.location),
            "last_seen": data.last_seen,
            "properties": data.model_dump(mode="json", include={"properties"})["properties"],
            "created_at": _utcnow(),
        }
        with self._tx("create logical device", write=True) as conn:
            result = conn.execute(insert(logical_devices).values(values))
            uid = _new_id(result)
            device = self._get_logical(conn, uid)
        self._notify([("logical", uid)])
        return device

    def get_logical(self, uid: int) -> LogicalDevice:
        """The logical device ``uid``. Raises NotFound if there is none."""
        with self._tx(f"read logical device {uid}", write=False) as conn:
            return self._get_logical(conn, uid)

    def list_logical(self) -> list[LogicalDevice]:
        """Every logical device, ordered by uid."""
        query = select(logical_devices).order_by(logical_devices.c.uid)
        with self._tx("list logical devices", write=False) as conn:
            return [_logical(row) for row in conn.execute(query).mappings()]

    def update_logical(self, uid: int, patch: LogicalDevicePatch) -> LogicalDevice:
        """Change the fields present in ``patch`` and return the updated device.

        Raises NotFound if the device does not exist. An empty patch changes nothing.
        """
        fields = patch.model_fields_set
        values: dict[str, Any] = {}
        if "name" in fields:
            values["name"] = patch.name
        if "last_seen" in fields:
            values["last_seen"] = patch.last_seen
        if "properties" in fields:
            values["properties"] = patch.model_dump(mode="json", include={"properties"})["properties"]
        if "location" in fields:
            values.update(_location_values(patch.location))
        with self._tx(f"update logical device {uid}", write=True) as conn:
            if values:
                conn.execute(update(logical_devices).where(logical_devices.c.uid == uid).values(values))
            device = self._get_logical(conn, uid)
        if values:
            self._notify([("logical", uid)])
        return device

    def delete_logical(self, uid: int) -> LogicalDevice:
        """Delete the logical device ``uid`` and every mapping to it; return what was deleted.

        Raises NotFound if it does not exist. Notifies ``"logical"`` and one ``"mapping"``
        per physical device that had a mapping (past or present) to it.
        """
        with self._tx(f"delete logical device {uid}", write=True) as conn:
            device = self._get_logical(conn, uid)
            affected = sorted(
                conn.execute(select(mappings.c.p_uid).where(mappings.c.l_uid == uid).distinct()).scalars()
            )
            conn.execute(delete(logical_devices).where(logical_devices.c.uid == uid))
        events: list[tuple[ChangeKind, int | None]] = [("logical", uid)]
        events.extend(("mapping", int(p_uid)) for p_uid in affected)
        self._notify(events)
        return device

    @staticmethod
    def _get_logical(conn: Connection, uid: int) -> LogicalDevice:
        query = select(logical_devices).where(logical_devices.c.uid == uid)
        row = conn.execute(query).mappings().first()
        if row is None:
            msg = f"logical device {uid} not found"
            raise NotFound(msg)
        return _logical(row)

    # ------------------------------------------------------------------ mappings

    def start_mapping(self, p_uid: int, l_uid: int, start: datetime | None = None) -> Mapping:
        """Map physical device ``p_uid`` to logical device ``l_uid`` from ``start`` on.

        Any open mapping of the physical device and any open mapping of the logical device
        is ended at ``start`` (default: now), then the new, unpaused mapping is opened and
        returned. Raises NotFound if either device does not exist, Conflict if ``start`` is
        earlier than the start or end of an existing mapping of either device (mappings of
        a device never overlap), InvalidRequest if ``start`` is naive.
        """
        at = _utcnow() if start is None else _aware(start, "start")
        involved = or_(mappings.c.p_uid == p_uid, mappings.c.l_uid == l_uid)
        with self._tx(f"map physical device {p_uid}", write=True) as conn:
            self._lock_device(conn, "physical", p_uid)
            self._lock_device(conn, "logical", l_uid)
            # Device rows first, then the table, as a concurrent delete of either device does.
            self._serialise_mapping_changes(conn)
            latest_start, latest_end = conn.execute(
                select(func.max(mappings.c.start_time), func.max(mappings.c.end_time)).where(involved)
            ).one()
            latest = max(t for t in (latest_start, latest_end, at) if t is not None)
            if at < latest:
                msg = (
                    f"mapping start {at.isoformat()} is earlier than an existing mapping"
                    f" of physical device {p_uid} or logical device {l_uid}"
                    f" ({latest.isoformat()})"
                )
                raise Conflict(msg)
            open_rows = conn.execute(
                select(mappings.c.id, mappings.c.p_uid).where(involved, mappings.c.end_time.is_(None)).with_for_update()
            ).all()
            if open_rows:
                conn.execute(
                    update(mappings).where(mappings.c.id.in_([row.id for row in open_rows])).values(end_time=at)
                )
            result = conn.execute(
                insert(mappings).values(p_uid=p_uid, l_uid=l_uid, start_time=at, end_time=None, paused=False)
            )
            mapping = self._get_mapping(conn, _new_id(result))
        affected = sorted({p_uid, *(int(row.p_uid) for row in open_rows)})
        self._notify([("mapping", uid) for uid in affected])
        return mapping

    def end_mapping(self, p_uid: int | None = None, l_uid: int | None = None) -> Mapping:
        """End the open mapping of the given device now; return the ended mapping.

        Give exactly one of ``p_uid`` and ``l_uid`` (InvalidRequest otherwise). Raises
        NotFound if the device does not exist or has no open mapping. A mapping that starts
        in the future is ended at its start.
        """
        kind, uid = _one_device(p_uid, l_uid)
        with self._tx(f"end mapping of {kind} device {uid}", write=True) as conn:
            self._serialise_mapping_changes(conn)
            current = self._open_mapping(conn, kind, uid)
            end = max(_utcnow(), current.start_time)
            conn.execute(update(mappings).where(mappings.c.id == current.id).values(end_time=end))
            mapping = self._get_mapping(conn, current.id)
        self._notify([("mapping", mapping.p_uid)])
        return mapping

    def pause_mapping(self, p_uid: int) -> Mapping:
        """Pause the open mapping of physical device ``p_uid`` (frames stop being routed).

        Idempotent. Raises NotFound if the device does not exist or has no open mapping.
        """
        return self._set_paused(p_uid, paused=True)

    def resume_mapping(self, p_uid: int) -> Mapping:
        """Resume the paused open mapping of ``p_uid``. Idempotent; NotFound as for pause."""
        return self._set_paused(p_uid, paused=False)

    def _set_paused(self, p_uid: int, *, paused: bool) -> Mapping:
        verb = "pause" if paused else "resume"
        with self._tx(f"{verb} mapping of physical device {p_uid}", write=True) as conn:
            self._serialise_mapping_changes(conn)
            current = self._open_mapping(conn, "physical", p_uid)
            if current.paused == paused:
                return current
            conn.execute(update(mappings).where(mappings.c.id == current.id).values(paused=paused))
            mapping = self._get_mapping(conn, current.id)
        self._notify([("mapping", p_uid)])
        return mapping

    def current_mapping(self, p_uid: int | None = None, l_uid: int | None = None) -> Mapping | None:
        """The open (possibly paused) mapping of the given device, or None.

        Give exactly one of ``p_uid`` and ``l_uid``. An unknown device has no mapping.
        """
        kind, uid = _one_device(p_uid, l_uid)
        query = select(mappings).where(_mapping_column(kind) == uid, mappings.c.end_time.is_(None))
        with self._tx(f"read mapping of {kind} device {uid}", write=False) as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _mapping(row)

    def mapping_history(self, p_uid: int | None = None, l_uid: int | None = None) -> list[Mapping]:
        """Every mapping of the given device, newest first (by start time, then id).

        Give exactly one of ``p_uid`` and ``l_uid``. An unknown device has no history.
        """
        kind, uid = _one_device(p_uid, l_uid)
        query = (
            select(mappings)
            .where(_mapping_column(kind) == uid)
            .order_by(mappings.c.start_time.desc(), mappings.c.id.desc())
        )
        with self._tx(f"read mappings of {kind} device {uid}", write=False) as conn:
            return [_mapping(row) for row in conn.execute(query).mappings()]

    def all_mappings(self) -> list[Mapping]:
        """Every mapping, ordered by physical device, start time and id (for caches)."""
        query = select(mappings).order_by(mappings.c.p_uid, mappings.c.start_time, mappings.c.id)
        with self._tx("read all mappings", write=False) as conn:
            return [_mapping(row) for row in conn.execute(query).mappings()]

    @staticmethod
    def _lock_device(conn: Connection, kind: _Kind, uid: int) -> None:
        """Check that the device exists and lock its row until commit (PostgreSQL)."""
        table = _device_table(kind)
        query = select(table.c.uid).where(table.c.uid == uid).with_for_update()
        if conn.execute(query).first() is None:
            msg = f"{kind} device {uid} not found"
            raise NotFound(msg)

    @staticmethod
    def _get_mapping(conn: Connection, mapping_id: int) -> Mapping:
        query = select(mappings).where(mappings.c.id == mapping_id)
        row = conn.execute(query).mappings().first()
        if row is None:
            msg = f"mapping {mapping_id} not found"
            raise NotFound(msg)
        return _mapping(row)

    @classmethod
    def _open_mapping(cls, conn: Connection, kind: _Kind, uid: int) -> Mapping:
        query = select(mappings).where(_mapping_column(kind) == uid, mappings.c.end_time.is_(None)).with_for_update()
        row = conn.execute(query).mappings().first()
        if row is not None:
            return _mapping(row)
        table = _device_table(kind)
        if conn.execute(select(table.c.uid).where(table.c.uid == uid)).first() is None:
            msg = f"{kind} device {uid} not found"
        else:
            msg = f"{kind} device {uid} has no current mapping"
        raise NotFound(msg)

    # ------------------------------------------------------------------ last seen

    def touch(
        self,
        physical: AbstractMapping[int, datetime],
        logical: AbstractMapping[int, datetime],
    ) -> None:
        """Move ``last_seen`` of the given devices forward, in one transaction.

        For each ``uid: when`` the stored value becomes ``max(stored, when)``: it never moves
        backwards. Uids that no longer exist are ignored. Sends no change notification.
        Raises InvalidRequest for a naive datetime (nothing is written then).
        """
        batches = [
            (
                table,
                [
                    {"b_uid": uid, "b_ts": _aware(when, f"last seen of {kind} {uid}")}
                    for uid, when in sorted(seen.items())
                ],
            )
            for kind, table, seen in (
                ("physical device", physical_devices, physical),
                ("logical device", logical_devices, logical),
            )
            if seen
        ]
        if not batches:
            return
        with self._tx("record last seen", write=True) as conn:
            for table, params in batches:
                ts = bindparam("b_ts", type_=UTCDateTime())
                statement = (
                    update(table)
                    .where(
                        table.c.uid == bindparam("b_uid"),
                        or_(table.c.last_seen.is_(None), table.c.last_seen < ts),
                    )
                    .values(last_seen=ts)
                )
                conn.execute(statement, params)

    # ------------------------------------------------------------------ users

    def add_user(
        self,
        username: str,
        password: str,
        read_only: bool = False,
        enabled: bool = True,
    ) -> tuple[User, str]:
        """Create a user and a first API token; return the user and that token.

        The password is stored as an argon2id hash, the token as its SHA-256. Usernames are
        1 to 200 characters without ``:``, control characters or surrounding whitespace;
        the password must not be empty (InvalidRequest otherwise). Raises Conflict if the
        username is taken.
        """
        _check_username(username)
        _check_password(password)
        password_hash = self._hasher.hash(password)
        with self._tx(
            f"add user {username!r}",
            write=True,
            conflict=f"user {username!r} already exists",
        ) as conn:
            user, token = self._insert_user(conn, username, password_hash, read_only=read_only, enabled=enabled)
        return user, token

    def _insert_user(
        self,
        conn: Connection,
        username: str,
        password_hash: str,
        *,
        read_only: bool,
        enabled: bool,
    ) -> tuple[User, str]:
        now = _utcnow()
        result = conn.execute(
            insert(users).values(
                username=username,
                password_hash=password_hash,
                read_only=read_only,
                enabled=enabled,
                created_at=now,
            )
        )
        user_id = _new_id(result)
        token = self._insert_token(conn, user_id, "initial")
        row = conn.execute(select(users).where(users.c.id == user_id)).mappings().one()
        return _user(row), token

    @staticmethod
    def _insert_token(conn: Connection, user_id: int, label: str) -> str:
        token = secrets.token_urlsafe(32)
        conn.execute(
            insert(api_tokens).values(
                user_id=user_id,
                token_hash=_token_hash(token),
                enabled=True,
                created_at=_utcnow(),
                label=label,
            )
        )
        return token

    @staticmethod
    def _user_id(conn: Connection, username: str) -> int:
        row = conn.execute(select(users.c.id).where(users.c.username == username)).first()
        if row is None:
            msg = f"user {username!r} not found"
            raise NotFound(msg)
        return int(row.id)

    def remove_user(self, username: str) -> None:
        """Delete the user and all their API tokens. Raises NotFound if there is none."""
        with self._tx(f"remove user {username!r}", write=True) as conn:
            user_id = self._user_id(conn, username)
            conn.execute(delete(users).where(users.c.id == user_id))

    def set_password(self, username: str, password: str) -> None:
        """Replace the user's password. Tokens stay valid (see :meth:`refresh_tokens`).

        Raises NotFound if there is no such user, InvalidRequest if the password is empty.
        """
        _check_password(password)
        password_hash = self._hasher.hash(password)
        with self._tx(f"set password of user {username!r}", write=True) as conn:
            user_id = self._user_id(conn, username)
            conn.execute(update(users).where(users.c.id == user_id).values(password_hash=password_hash))

    def list_users(self) -> list[User]:
        """Every user, ordered by username."""
        with self._tx("list users", write=False) as conn:
            rows = conn.execute(select(users).order_by(users.c.username)).mappings()
            return [_user(row) for row in rows]

    def get_user(self, username: str) -> User:
        """The user ``username``. Raises NotFound if there is none."""
        with self._tx(f"read user {username!r}", write=False) as conn:
            row = conn.execute(select(users).where(users.c.username == username)).mappings().first()
        if row is None:
            msg = f"user {username!r} not found"
            raise NotFound(msg)
        return _user(row)

    def set_user_enabled(self, username: str, enabled: bool) -> User:
        """Enable or disable the user (a disabled user's tokens stop working too).

        Returns the updated user. Raises NotFound if there is no such user.
        """
        with self._tx(f"update user {username!r}", write=True) as conn:
            user_id = self._user_id(conn, username)
            conn.execute(update(users).where(users.c.id == user_id).values(enabled=enabled))
            row = conn.execute(select(users).where(users.c.id == user_id)).mappings().one()
        return _user(row)

    def issue_token(self, username: str, label: str = "login") -> str:
        """Issue a new API token for the user and return it (it is not stored in clear).

        ``label`` (1 to 200 characters) says what the token is for. Raises NotFound if there
        is no such user. Existing tokens stay valid.
        """
        if not label or len(label) > _LABEL_MAX:
            msg = f"token label must be 1 to {_LABEL_MAX} characters"
            raise InvalidRequest(msg)
        with self._tx(f"issue token for user {username!r}", write=True) as conn:
            return self._insert_token(conn, self._user_id(conn, username), label)

    def refresh_tokens(self, username: str) -> str:
        """Revoke every API token of the user, issue one new token and return it.

        Raises NotFound if there is no such user.
        """
        with self._tx(f"refresh tokens of user {username!r}", write=True) as conn:
            user_id = self._user_id(conn, username)
            conn.execute(delete(api_tokens).where(api_tokens.c.user_id == user_id))
            return self._insert_token(conn, user_id, "refresh")

    def set_tokens_enabled(self, username: str, enabled: bool) -> None:
        """Enable or disable every API token of the user. Raises NotFound if none."""
        with self._tx(f"update tokens of user {username!r}", write=True) as conn:
            user_id = self._user_id(conn, username)
            conn.execute(update(api_tokens).where(api_tokens.c.user_id == user_id).values(enabled=enabled))

    def verify_password(self, username: str, password: str) -> User:
        """The user, if ``password`` is theirs and they are enabled.

        Raises :class:`~isthmus.errors.AuthError` with the same message for an unknown user
        and a wrong password (and spends the same hashing time on both, so neither message
        nor timing reveals which usernames exist); a disabled user with the right password
        gets a message saying so. A hash made with outdated parameters is upgraded.
        """
        with self._tx("verify password", write=False) as conn:
            row = conn.execute(select(users).where(users.c.username == username)).mappings().first()
        if row is None:
            self._verify(self._dummy(), password)
            raise AuthError(_BAD_LOGIN_MSG)
        password_hash = str(row["password_hash"])
        if not self._verify(password_hash, password):
            raise AuthError(_BAD_LOGIN_MSG)
        if not row["enabled"]:
            msg = f"user {username!r} is disabled"
            raise AuthError(msg)
        if self._hasher.check_needs_rehash(password_hash):
            self._rehash(int(row["id"]), password_hash, password)
        return _user(row)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def _rehash(self, user_id: int, old_hash: str, password: str) -> None:
        new_hash = self._hasher.hash(password)
        try:
            with self._tx("upgrade password hash", write=True) as conn:
                conn.execute(
                    update(users)
                    .where(users.c.id == user_id, users.c.password_hash == old_hash)
                    .values(password_hash=new_hash)
                )
        except RegistryError:  # the login is valid either way; try again next time
            logger.warning("could not upgrade the password hash of user %d", user_id)

    def user_for_token(self, token: str) -> User:
        """The enabled user owning the enabled API token ``token``.

        Raises :class:`~isthmus.errors.AuthError` if the token is unknown, revoked, disabled
        or belongs to a disabled user (one message for all).
        """
        query = (
            select(users)
            .join(api_tokens, api_tokens.c.user_id == users.c.id)
            .where(
                api_tokens.c.token_hash == _token_hash(token),
                api_tokens.c.enabled.is_(True),
                users.c.enabled.is_(True),
            )
        )
        with self._tx("verify API token", write=False) as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            raise AuthError(_BAD_BEARER_MSG)
        return _user(row)

    def ensure_admin(self) -> str | None:
        """Create user ``admin`` if there are no users at all; return its API token.

        The password is random and not returned: log in with the token and set one with
        :meth:`set_password`. Returns None (and changes nothing) when any user exists, also
        when another process creates the first user at the same time.
        """
        with self._tx("count users", write=False) as conn:
            if conn.execute(select(func.count()).select_from(users)).scalar_one():
                return None
        password_hash = self._hasher.hash(secrets.token_urlsafe(24))
        try:
            with self._tx("create the admin user", write=True) as conn:
                if conn.execute(select(func.count()).select_from(users)).scalar_one():
                    return None
                _, token = self._insert_user(conn, "admin", password_hash, read_only=False, enabled=True)
        except Conflict:  # another process created it between our check and our insert
            return None
        return token


def _hot_ref(uid: Any, name: str, source: str, decoder: str | None, properties: Any) -> DeviceRef:
    """The hot-path view of a device row (the gateway flag is its ``"gateway": true`` property)."""
    return DeviceRef(
        p_uid=int(uid),
        name=name,
        source_name=source,
        decoder=decoder,
        gateway=isinstance(properties, dict) and properties.get("gateway") is True,
    )
