"""The in-memory device directory used on the hot path.

:class:`DeviceCache` implements :class:`isthmus.interfaces.DeviceDirectory` from a snapshot of
the :class:`~isthmus.registry.store.RegistryStore`, kept current by the store's change
notifications: each notification re-reads one device or one device's mappings, never the whole
registry.

Threading model. Lookups (:meth:`DeviceCache.by_token`, :meth:`DeviceCache.by_password`,
:meth:`DeviceCache.mapping_at`, :meth:`DeviceCache.seen`) run on the event-loop thread; refreshes
run in whatever thread changed the registry, and :meth:`DeviceCache.flush_seen` in a worker
thread. Refreshes are serialised by a lock and only ever replace whole dictionary entries with new
immutable objects (a single ``dict`` store or delete is atomic under the GIL), so lookups need no
lock and never see a half-built entry. Nothing iterates over a dictionary another thread may be changing.

A cache only hears about changes made through the same :class:`RegistryStore` object: another
process writing to the same database is not seen until :meth:`DeviceCache.load` is called again.

Username + password credentials. :meth:`DeviceCache.by_password` is the one asynchronous lookup:
the credentials (username → device and argon2 hash) are in memory like the tokens, but checking
a password costs tens of milliseconds of CPU, so it runs in a small thread pool of its own
(never on the event loop, never in the default executor that registry calls share), with these
guards, all keyed by the username and an HMAC-SHA-256 of the password under a random per-process
key (so the digests are worthless outside the process):

* **verified** — a successful check is remembered per username (with the hash it matched), so a
  reconnect storm of known devices costs no argon2 at all; an entry counts only while the
  device's current hash is that hash, and a credential change, removal, device disable or
  delete also drops it;
* **rejected** — a failed check is remembered for ``rejection_ttl`` seconds (default 60) per
  (username, digest) and hash, at most 10 000 entries: a misconfigured device retrying the same
  wrong password costs one check per minute, and fixing its credential takes effect at once;
* **coalesced** — concurrent attempts with the same username, password and hash share one check;
* **bounded** — at most ``verify_threads`` checks run at once (default: half the CPUs, at
  least one) and at most ``max_pending_verifications`` (default 64) wait; beyond that
  ``by_password`` refuses at once with :class:`~isthmus.errors.RegistryError` ("busy, retry")
  instead of queueing without bound. A flood of wrong passwords can therefore occupy at most
  those threads, never the event loop or every core, and devices already verified are not
  slowed by it.

Unknown usernames are refused without any hashing (usernames are identifiers, not secrets, and
a dummy hash per unknown name would hand out free CPU). ``_rejected`` and ``_checking`` are only
touched on the event-loop thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from bisect import bisect_right
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from itertools import groupby
from operator import attrgetter

from isthmus.errors import InvalidRequest, NotFound, RegistryError
from isthmus.interfaces import DeviceRef
from isthmus.registry.models import DEVICE_PASSWORD_MAX, DEVICE_USERNAME_MAX, Mapping, PhysicalDevice
from isthmus.registry.store import RegistryStore

__all__ = ["DeviceCache"]

logger = logging.getLogger(__name__)

REJECTION_TTL = 60.0
"""Seconds a failed password check is remembered (per username, password digest and hash)."""

MAX_REJECTIONS = 10_000
"""Most failed checks remembered at once (the oldest are forgotten first)."""

MAX_PENDING_VERIFICATIONS = 64
"""Most password checks running or waiting at once; more are refused as "busy"."""

_CHECK_ROUNDS = 3  # re-checks when the credential is replaced while its password is being checked

_RejectionKey = tuple[str, bytes]
_CheckKey = tuple[str, bytes, str]


def _default_verify_threads() -> int:
    return max(1, (os.cpu_count() or 1) // 2)


@dataclass(frozen=True, slots=True)
class _Credential:
    """A device's username + password credential as the cache holds it (enabled devices only)."""

    ref: DeviceRef
    password_hash: str


def _secret(password: str) -> bytes | None:
    """The password's bytes, or None when it cannot be any device's password."""
    if not password or len(password) > DEVICE_PASSWORD_MAX:
        return None
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate: no stored password has one
        return None


@dataclass(frozen=True, slots=True)
class _Timeline:
    """The mappings of one physical device, sorted by (start_time, id), as parallel tuples.

    ``l_uids[i]`` is None for a paused mapping, so that a lookup needs no further test.
    """

    starts: tuple[datetime, ...]
    ends: tuple[datetime | None, ...]
    l_uids: tuple[int | None, ...]


def _timeline(history: Iterable[Mapping]) -> _Timeline | None:
    ordered = sorted(history, key=_order)
    if not ordered:
        return None
    if len(ordered) == 1:  # the common case, built without generators
        only = ordered[0]
        return _Timeline((only.start_time,), (only.end_time,), (None if only.paused else only.l_uid,))
    return _Timeline(
        starts=tuple(m.start_time for m in ordered),
        ends=tuple(m.end_time for m in ordered),
        l_uids=tuple(None if m.paused else m.l_uid for m in ordered),
    )


def _order(mapping: Mapping) -> tuple[datetime, int]:
    return mapping.start_time, mapping.id


def _ref(device: PhysicalDevice) -> DeviceRef:
    return DeviceRef(
        p_uid=device.uid,
        name=device.name,
        source_name=device.source_name,
        decoder=device.decoder,
        gateway=device.properties.get("gateway") is True,
    )


class DeviceCache:
    """Hot-path device lookups served from memory (a :class:`~isthmus.interfaces.DeviceDirectory`).

    Creating the cache registers it as a listener of ``store`` (undo with :meth:`close`); it
    is empty until :meth:`load` is called. Changes made through ``store`` after that are
    visible to the next lookup once the store method that made them has returned.

    If re-reading a device after a change fails (database locked, unreachable), the cache fails
    closed: the device is refused (or, for mappings, treated as unmapped, so its frames are
    journaled unmapped and can be replayed) until the refresh succeeds; failed refreshes are
    retried by :meth:`flush_seen`.
    """

    def __init__(
        self,
        store: RegistryStore,
        *,
        verify_threads: int | None = None,
        max_pending_verifications: int = MAX_PENDING_VERIFICATIONS,
        rejection_ttl: float = REJECTION_TTL,
    ) -> None:
        self._store = store
        self._by_token: dict[str, DeviceRef] = {}
        self._token_of: dict[int, str] = {}
        self._by_username: dict[str, _Credential] = {}
        self._username_of: dict[int, str] = {}
        self._verified: dict[str, tuple[bytes, str]] = {}  # username -> (digest, hash it matched)
        self._rejected: dict[_RejectionKey, tuple[float, str]] = {}  # -> (expiry, hash it failed)
        self._checking: dict[_CheckKey, asyncio.Future[bool]] = {}
        self._digest_key = secrets.token_bytes(32)
        self._verify_threads = verify_threads if verify_threads is not None else _default_verify_threads()
        self._max_pending = max_pending_verifications
        self._rejection_ttl = rejection_ttl
        self._executor: ThreadPoolExecutor | None = None
        self._timelines: dict[int, _Timeline] = {}
        self._refresh_lock = threading.Lock()
        self._failed: set[tuple[str, int]] = set()
        self._seen_lock = threading.Lock()
        self._seen_physical: dict[int, datetime] = {}
        self._seen_logical: dict[int, datetime] = {}
        store.add_listener(self._on_change)

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Replace the whole cache with a fresh snapshot of the registry.

        Called once at start-up (and whenever the registry may have been changed behind this
        store's back). Reads every physical device and mapping; lookups keep being served from
        the previous snapshot until the new one is swapped in. Raises
        :class:`~isthmus.errors.RegistryError` if the registry cannot be read; the previous
        snapshot is kept then.
        """
        with self._refresh_lock:
            refs = self._store.device_refs()
            credentials = self._store.credential_refs()
            history = self._store.all_mappings()
            by_token = dict(refs)
            token_of = {ref.p_uid: token for token, ref in refs}
            by_username = {name: _Credential(ref, password_hash) for name, password_hash, ref in credentials}
            username_of = {ref.p_uid: name for name, _, ref in credentials}
            timelines: dict[int, _Timeline] = {}
            for p_uid, group in groupby(history, key=attrgetter("p_uid")):
                timeline = _timeline(group)
                if timeline is not None:
                    timelines[p_uid] = timeline
            # Swap whole dictionaries: a lookup sees either the old or the new one.
            self._by_token, self._token_of, self._timelines = by_token, token_of, timelines
            self._by_username, self._username_of, self._verified = by_username, username_of, {}
            self._failed = set()

    def close(self) -> None:
        """Stop listening to the store. Lookups keep answering from the last state.

        Also lets the password-checking threads end once the checks already started are done.
        """
        self._store.remove_listener(self._on_change)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    # ------------------------------------------------------------------ DeviceDirectory

    def by_token(self, token: str) -> DeviceRef | None:
        """The enabled device whose access token is ``token``, or None (unknown or disabled).

        O(1), no allocation.
        """
        return self._by_token.get(token)

    async def by_password(self, username: str, password: str) -> DeviceRef | None:
        """The enabled device whose username + password credential this is, or None.

        None for an unknown username, a wrong password or a disabled device, and for any input
        that cannot be a credential (empty, too long, unpaired surrogates): bad input never
        raises. A known device's first check costs one argon2 verification in the cache's own
        threads; later ones with the same password cost a dictionary lookup and an HMAC (see the
        module docstring for every guard). Raises :class:`~isthmus.errors.RegistryError` when
        the answer cannot be known: the registry is unavailable (a refresh failed and re-reading
        the username failed too) or too many checks are pending — answer "server unavailable",
        not "bad credentials", so the device retries. Call it from one event loop.
        """
        credential = self._by_username.get(username)
        if credential is None:
            if not self._failed:  # the snapshot is whole: an unknown username is unknown
                return None
            return await self._by_password_from_store(username, password)
        secret = _secret(password)
        if secret is None:
            return None
        digest = self._digest(secret)
        for _ in range(_CHECK_ROUNDS):
            known = self._verified.get(username)
            if known is not None and known[1] == credential.password_hash and hmac.compare_digest(known[0], digest):
                return credential.ref
            matched = await self._check(username, digest, secret, credential.password_hash)
            current = self._by_username.get(username)
            if current is None:  # removed, or the device disabled or deleted, meanwhile
                return None
            if current.password_hash == credential.password_hash:
                if not matched:
                    return None
                self._verified[username] = (digest, current.password_hash)
                return current.ref
            credential = current  # replaced meanwhile: the new password is what counts
        return None

    def _digest(self, secret: bytes) -> bytes:
        return hmac.new(self._digest_key, secret, hashlib.sha256).digest()

    async def _by_password_from_store(self, username: str, password: str) -> DeviceRef | None:
        """Check against the registry itself while a failed refresh may have dropped the username."""
        secret = _secret(password)
        if secret is None or not username or len(username) > DEVICE_USERNAME_MAX:
            return None
        try:
            found = await asyncio.to_thread(self._store.credential_refs, username=username)
        except InvalidRequest:  # text the database cannot hold (NUL on PostgreSQL): no such username
            return None
        if not found:
            return None
        _, password_hash, ref = found[0]
        matched = await self._check(username, self._digest(secret), secret, password_hash)
        return ref if matched else None

    async def _check(self, username: str, digest: bytes, secret: bytes, password_hash: str) -> bool:
        """Whether the password matches ``password_hash``: remembered, shared or checked in a thread."""
        rejected = self._rejected.get((username, digest))
        if rejected is not None and rejected[1] == password_hash and rejected[0] > time.monotonic():
            return False
        key = (username, digest, password_hash)
        future = self._checking.get(key)
        if future is None:
            if len(self._checking) >= self._max_pending:
                msg = f"too many device password checks in progress ({self._max_pending}); try again later"
                raise RegistryError(msg)
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._verifier(), self._store.check_device_password, password_hash, secret)
            self._checking[key] = future
            future.add_done_callback(partial(self._checked, key))
        # Shielded: a device that hangs up does not cancel the check others may be waiting for.
        return await asyncio.shield(future)

    def _checked(self, key: _CheckKey, future: asyncio.Future[bool]) -> None:
        """Done callback of a check (event-loop thread): forget it, remember a rejection."""
        self._checking.pop(key, None)
        if future.cancelled() or future.exception() is not None or future.result():
            return
        username, digest, password_hash = key
        now = time.monotonic()
        rejected = self._rejected
        rejected.pop((username, digest), None)  # re-inserted last: insertion order is expiry order
        rejected[(username, digest)] = (now + self._rejection_ttl, password_hash)
        while rejected:
            oldest = next(iter(rejected))
            if len(rejected) <= MAX_REJECTIONS and rejected[oldest][0] > now:
                break
            del rejected[oldest]

    def _verifier(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            executor = ThreadPoolExecutor(max_workers=self._verify_threads, thread_name_prefix="isthmus-device-pw")
            self._executor = executor
        return executor

    def mapping_at(self, p_uid: int, at: datetime) -> int | None:
        """The logical device ``p_uid`` fed at ``at`` (aware), or None.

        A mapping covers ``start_time <= at < end_time`` (an open mapping has no end). None if
        no mapping covers ``at`` or the covering mapping is paused. O(log n) in the number of
        mappings the device ever had, no allocation.
        """
        timeline = self._timelines.get(p_uid)
        if timeline is None:
            return None
        i = bisect_right(timeline.starts, at) - 1
        if i < 0:
            return None
        end = timeline.ends[i]
        if end is not None and at >= end:
            return None
        return timeline.l_uids[i]

    def seen(self, p_uid: int, l_uid: int | None, at: datetime) -> None:
        """Remember that ``p_uid`` (and ``l_uid``, if mapped) sent a frame at ``at`` (aware).

        Memory only; :meth:`flush_seen` writes the newest time per device to the registry.
        """
        with self._seen_lock:
            current = self._seen_physical.get(p_uid)
            if current is None or at > current:
                self._seen_physical[p_uid] = at
            if l_uid is not None:
                current = self._seen_logical.get(l_uid)
                if current is None or at > current:
                    self._seen_logical[l_uid] = at

    def unflushed_seen(self, p_uid: int) -> datetime | None:
        """The newest last-seen time of ``p_uid`` not yet written to the registry, if any."""
        with self._seen_lock:
            return self._seen_physical.get(p_uid)

    def flush_seen(self) -> int:
        """Write the pending last-seen times to the registry; return how many were written.

        Called from a worker thread every few seconds (and at shutdown). The registry only
        moves ``last_seen`` forward. If the write fails, the pending times are kept (merged with
        any newer ones) for the next call and the :class:`~isthmus.errors.RegistryError` is
        raised. Also retries change refreshes that failed earlier.
        """
        self._retry_failed()
        with self._seen_lock:
            physical, self._seen_physical = self._seen_physical, {}
            logical, self._seen_logical = self._seen_logical, {}
        if not physical and not logical:
            return 0
        try:
            self._store.touch(physical, logical)
        except BaseException:
            with self._seen_lock:
                _merge_max(self._seen_physical, physical)
                _merge_max(self._seen_logical, logical)
            raise
        return len(physical) + len(logical)

    # ------------------------------------------------------------------ refreshes

    def _on_change(self, kind: str, uid: int | None) -> None:
        """Store listener: apply one change notification (see RegistryStore.add_listener)."""
        if kind not in {"physical", "mapping"}:
            return  # logical devices are not cached; their deletions arrive as mapping changes
        if uid is None:
            self.load()
            return
        with self._refresh_lock:
            self._refresh(kind, uid)

    def _refresh(self, kind: str, uid: int) -> None:
        """Re-read one device or one device's mappings. Call with the refresh lock held."""
        try:
            if kind == "physical":
                self._refresh_device(uid)
            else:
                self._refresh_mappings(uid)
        except Exception:  # fail closed and retry later; the store's caller already committed
            logger.exception("could not refresh the cached %s of physical device %d", kind, uid)
            self._failed.add((kind, uid))
            if kind == "physical":
                self._drop_token(uid)
                self._drop_credential(uid)
            else:
                self._timelines.pop(uid, None)
        else:
            self._failed.discard((kind, uid))

    def _retry_failed(self) -> None:
        if not self._failed:
            return
        with self._refresh_lock:
            for kind, uid in sorted(self._failed):
                self._refresh(kind, uid)

    def _refresh_device(self, uid: int) -> None:
        try:
            device: PhysicalDevice | None = self._store.get_physical(uid)
        except NotFound:
            device = None
        if device is None:
            self._drop_token(uid)
            self._drop_credential(uid)
            self._timelines.pop(uid, None)
            return
        if not device.enabled:
            self._drop_token(uid)
            self._drop_credential(uid)
            return
        old = self._token_of.get(uid)
        if old is not None and old != device.token:
            self._drop_token(uid)
        previous = self._by_token.get(device.token)
        if previous is not None and previous.p_uid != uid:
            # The token moved from another device whose own refresh has not run yet.
            self._token_of.pop(previous.p_uid, None)
        self._by_token[device.token] = _ref(device)
        self._token_of[uid] = device.token
        self._refresh_credential(uid, device)

    def _refresh_credential(self, uid: int, device: PhysicalDevice) -> None:
        found = self._store.credential_refs(p_uid=uid) if device.username is not None else []
        if not found:
            self._drop_credential(uid)
            return
        username, password_hash, _ = found[0]
        old = self._username_of.get(uid)
        if old is not None and old != username:
            self._drop_credential(uid)
        previous = self._by_username.get(username)
        if previous is not None and previous.ref.p_uid != uid:
            # The username moved from another device whose own refresh has not run yet.
            self._username_of.pop(previous.ref.p_uid, None)
        if previous is None or previous.password_hash != password_hash:
            self._verified.pop(username, None)
        self._by_username[username] = _Credential(_ref(device), password_hash)
        self._username_of[uid] = username

    def _drop_credential(self, uid: int) -> None:
        username = self._username_of.pop(uid, None)
        if username is not None:
            credential = self._by_username.get(username)
            if credential is not None and credential.ref.p_uid == uid:
                self._by_username.pop(username, None)
                self._verified.pop(username, None)

    def _drop_token(self, uid: int) -> None:
        token = self._token_of.pop(uid, None)
        if token is not None:
            ref = self._by_token.get(token)
            if ref is not None and ref.p_uid == uid:
                del self._by_token[token]

    def _refresh_mappings(self, uid: int) -> None:
        timeline = _timeline(self._store.mapping_history(p_uid=uid))
        if timeline is None:
            self._timelines.pop(uid, None)
        else:
            self._timelines[uid] = timeline


def _merge_max(target: dict[int, datetime], source: dict[int, datetime]) -> None:
    for uid, when in source.items():
        current = target.get(uid)
        if current is None or when > current:
            target[uid] = when
