"""The in-memory device directory used on the hot path.

:class:`DeviceCache` implements :class:`isthmus.interfaces.DeviceDirectory` from a snapshot of
the :class:`~isthmus.registry.store.RegistryStore`, kept current by the store's change
notifications: each notification re-reads one device or one device's mappings, never the whole
registry.

Threading model. Lookups (:meth:`DeviceCache.by_token`, :meth:`DeviceCache.mapping_at`,
:meth:`DeviceCache.seen`) run on the event-loop thread; refreshes run in whatever thread changed
the registry, and :meth:`DeviceCache.flush_seen` in a worker thread. Refreshes are serialised by a
lock and only ever replace whole dictionary entries with new immutable objects (a single
``dict`` store or delete is atomic under the GIL), so lookups need no lock and never see a
half-built entry. Nothing iterates over a dictionary another thread may be changing.

A cache only hears about changes made through the same :class:`RegistryStore` object: another
process writing to the same database is not seen until :meth:`DeviceCache.load` is called again.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby
from operator import attrgetter

from isthmus.errors import NotFound
from isthmus.interfaces import DeviceRef
from isthmus.registry.models import Mapping, PhysicalDevice
from isthmus.registry.store import RegistryStore

__all__ = ["DeviceCache"]

logger = logging.getLogger(__name__)


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
    return DeviceRef(p_uid=device.uid, name=device.name, source_name=device.source_name, decoder=device.decoder)


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

    def __init__(self, store: RegistryStore) -> None:
        self._store = store
        self._by_token: dict[str, DeviceRef] = {}
        self._token_of: dict[int, str] = {}
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
            history = self._store.all_mappings()
            by_token = dict(refs)
            token_of = {ref.p_uid: token for token, ref in refs}
            timelines: dict[int, _Timeline] = {}
            for p_uid, group in groupby(history, key=attrgetter("p_uid")):
                timeline = _timeline(group)
                if timeline is not None:
                    timelines[p_uid] = timeline
            # Swap whole dictionaries: a lookup sees either the old or the new one.
            self._by_token, self._token_of, self._timelines = by_token, token_of, timelines
            self._failed = set()

    def close(self) -> None:
        """Stop listening to the store. Lookups keep answering from the last state."""
        self._store.remove_listener(self._on_change)

    # ------------------------------------------------------------------ DeviceDirectory

    def by_token(self, token: str) -> DeviceRef | None:
        """The enabled device whose access token is ``token``, or None (unknown or disabled).

        O(1), no allocation.
        """
        return self._by_token.get(token)

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
            self._timelines.pop(uid, None)
            return
        if not device.enabled:
            self._drop_token(uid)
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
