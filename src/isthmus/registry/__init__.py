"""The device registry: who may send, and where their data goes.

Reproduces IoTa's device model. A *physical device* is a device in the field; it authenticates
with its access token and may carry source-specific ids. A *logical device* is where time series
end up (a tank, a weather station). A *mapping* says which logical device a physical device fed
from ``start_time`` until ``end_time``; replacing a device in the field means starting a new
mapping, so the logical device's series continues. A physical device may also have one
username + password credential (MQTT; argon2id-hashed, checked by
:meth:`DeviceCache.by_password <isthmus.registry.cache.DeviceCache.by_password>`). Users and their
API tokens guard the management API.

* :mod:`~isthmus.registry.models` — pydantic models (the management API's schemas);
* :mod:`~isthmus.registry.schema` — SQLAlchemy tables, the single source of truth for the schema;
* :mod:`~isthmus.registry.migrations` — Alembic migrations shipped in the package;
* :mod:`~isthmus.registry.store` — :class:`RegistryStore`, the synchronous storage API;
* :mod:`~isthmus.registry.cache` — :class:`DeviceCache`, the hot-path
  :class:`~isthmus.interfaces.DeviceDirectory`, kept current by the store's notifications.

Typical wiring::

    store = RegistryStore("sqlite:///data/registry.db")
    store.migrate()
    cache = DeviceCache(store)
    cache.load()
"""

from isthmus.registry.cache import DeviceCache
from isthmus.registry.models import (
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
from isthmus.registry.store import Listener, RegistryStore

__all__ = [
    "DeviceCache",
    "Listener",
    "Location",
    "LogicalDevice",
    "LogicalDeviceCreate",
    "LogicalDevicePatch",
    "Mapping",
    "PhysicalDevice",
    "PhysicalDeviceCreate",
    "PhysicalDevicePatch",
    "RegistryStore",
    "User",
]
