"""Device resolution for sources that name devices by their own ids (topics, dev_eui …).

Lookups are served from memory after the first; unknown devices are auto-created according to
the source's policy (IoTa's front-end behaviour). The cache is invalidated per device when the
registry reports a change, so renaming, disabling or enabling a device takes effect at once.
"""

from __future__ import annotations

import asyncio
import json

from isthmus.errors import InvalidRequest
from isthmus.interfaces import DeviceRef
from isthmus.registry.models import PhysicalDevice, PhysicalDeviceCreate
from isthmus.registry.store import RegistryStore

POLICIES = ("accept", "quarantine", "reject")
_Key = tuple[str, str]


def _key(source_name: str, source_ids: dict[str, str | int]) -> _Key:
    return source_name, json.dumps(source_ids, sort_keys=True, separators=(",", ":"))


def _ref(device: PhysicalDevice) -> DeviceRef:
    return DeviceRef(
        device.uid,
        device.name,
        device.source_name,
        device.decoder,
        quarantined=not device.enabled,
        gateway=device.properties.get("gateway") is True,
    )


class RegistryResolver:
    """Implements :class:`~isthmus.interfaces.DeviceResolver` over a :class:`RegistryStore`."""

    def __init__(self, store: RegistryStore) -> None:
        self.store = store
        self._by_key: dict[_Key, DeviceRef] = {}
        self._key_of: dict[int, _Key] = {}
        self._creating: dict[_Key, asyncio.Future[DeviceRef | None]] = {}
        store.add_listener(self._on_change)

    def _on_change(self, kind: str, uid: int | None) -> None:
        # Runs in a worker thread after a registry commit: drop the one entry; the next lookup
        # re-reads it. Replacing dict entries is atomic under the GIL.
        if kind == "physical" and uid is not None:
            key = self._key_of.pop(uid, None)
            if key is not None:
                self._by_key.pop(key, None)

    async def resolve(self, source_name: str, source_ids: dict[str, str | int], policy: str) -> DeviceRef | None:
        """See :class:`~isthmus.interfaces.DeviceResolver`."""
        if policy not in POLICIES:
            raise InvalidRequest(f"unknown auto-create policy {policy!r} (one of {', '.join(POLICIES)})")
        key = _key(source_name, source_ids)
        ref = self._by_key.get(key)
        if ref is not None:
            return ref
        pending = self._creating.get(key)
        if pending is not None:  # a concurrent first message from the same device
            return await asyncio.shield(pending)
        future: asyncio.Future[DeviceRef | None] = asyncio.get_running_loop().create_future()
        self._creating[key] = future
        try:
            ref = await asyncio.to_thread(self._find_or_create, source_name, source_ids, policy)
            future.set_result(ref)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: concurrent waiters re-raise it themselves
            raise
        finally:
            del self._creating[key]
        if ref is not None:
            self._by_key[key] = ref
            self._key_of[ref.p_uid] = key
        return ref

    def _find_or_create(self, source_name: str, source_ids: dict[str, str | int], policy: str) -> DeviceRef | None:
        found = self.store.find_physical(source_name, source_ids)
        if found is not None:
            return _ref(found)
        if policy == "reject":
            return None
        name = "-".join(str(v) for v in source_ids.values()) or source_name
        created = self.store.create_physical(
            PhysicalDeviceCreate(
                name=name[:200],
                source_name=source_name,
                source_ids=source_ids,
                enabled=policy == "accept",
                properties={"auto_created": True},
            )
        )
        return _ref(created)
