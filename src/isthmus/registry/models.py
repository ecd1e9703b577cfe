"""The registry's data models (pydantic v2).

They are the registry's public vocabulary and the management REST API's OpenAPI schemas:

* output models (:class:`PhysicalDevice`, :class:`LogicalDevice`, :class:`Mapping`,
  :class:`User`) are frozen and carry aware UTC datetimes, whatever the database returned;
* ``*Create`` models describe a new object; ``*Patch`` models change only the fields that are
  present (``model_fields_set``): an absent field is left alone, an explicit ``null`` clears an
  optional field and is rejected for a required one. Both forbid unknown keys, and the
  validation error names the offending key.

Input datetimes must carry a time zone offset; naive ones are rejected.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
)

__all__ = [
    "DEVICE_PASSWORD_MAX",
    "DEVICE_USERNAME_MAX",
    "TOKEN_PATTERN",
    "Location",
    "LogicalDevice",
    "LogicalDeviceCreate",
    "LogicalDevicePatch",
    "Mapping",
    "PhysicalDevice",
    "PhysicalDeviceCreate",
    "PhysicalDevicePatch",
    "User",
]

TOKEN_PATTERN = r"^[A-Za-z0-9._~-]{1,64}$"  # noqa: S105 - a regex, not a secret
"""A device token: URL-path and MQTT-username safe (RFC 3986 unreserved characters)."""

DEVICE_USERNAME_MAX = 200
"""Longest username of a device's username + password credential, in characters."""

DEVICE_PASSWORD_MAX = 1000
"""Longest password of a device's username + password credential, in characters."""


def _as_utc(value: datetime) -> datetime:
    """``value`` as aware UTC; a naive value is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


UTCDatetime = Annotated[datetime, AfterValidator(_as_utc)]
"""A datetime normalised to aware UTC (used by the output models)."""

InputDatetime = Annotated[AwareDatetime, AfterValidator(_as_utc)]
"""A datetime given by a caller: must be aware; stored as UTC."""

_ABSENT: Any = None
"""Default of the non-nullable patch fields: never validated, never read (see the patches)."""

_Name = Annotated[str, Field(min_length=1, max_length=200)]
_SourceName = Annotated[str, Field(min_length=1, max_length=64)]
_Decoder = Annotated[str, Field(min_length=1, max_length=200)]
_Token = Annotated[str, Field(pattern=TOKEN_PATTERN)]
_SourceIds = dict[str, str | int]

_D_UID = "Unique id, assigned by the registry and never reused."
_D_NAME = "Human-readable name (1 to 200 characters)."
_D_SOURCE_NAME = "The source that receives this device's frames (e.g. `http`, `mqtt`, `ttn`)."
_D_SOURCE_IDS = (
    "Source-specific identifiers used to find the device from an incoming message "
    "(e.g. TTN `app_id`, `dev_id`, `dev_eui`)."
)
_D_LOCATION = "Where the device is, or null if unknown."
_D_LAST_SEEN = "When the device last sent a frame (UTC), or null if never."
_D_PROPERTIES = "Free-form JSON properties for the use of sources, decoders and sinks."
_D_ACCESS = (
    "Access token of the device: part of HTTP URL paths and the MQTT username. "
    "1 to 64 characters from `A-Z a-z 0-9 . _ ~ -`."
)
_D_ENABLED = "Disabled devices are refused by every source."
_D_DECODER = "Name of the decoder for this device's payloads; null for the source default."
_D_USERNAME = (
    "Username of the device's username + password credential (MQTT), or null if it has none. "
    "Set with PUT /mgmt/physical/{uid}/credentials; the password is never shown."
)
_D_CREATED = "When the object was created (UTC)."


class Location(BaseModel):
    """A WGS 84 position."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lat: float = Field(ge=-90, le=90, allow_inf_nan=False, description="Latitude in degrees.")
    long: float = Field(ge=-180, le=180, allow_inf_nan=False, description="Longitude in degrees.")


class PhysicalDevice(BaseModel):
    """A device in the field, as the registry stores it."""

    model_config = ConfigDict(frozen=True)

    uid: int = Field(description=_D_UID)
    name: str = Field(description=_D_NAME)
    source_name: str = Field(description=_D_SOURCE_NAME)
    source_ids: _SourceIds = Field(description=_D_SOURCE_IDS)
    location: Location | None = Field(description=_D_LOCATION)
    last_seen: UTCDatetime | None = Field(description=_D_LAST_SEEN)
    properties: dict[str, Any] = Field(description=_D_PROPERTIES)
    token: str = Field(description=_D_ACCESS)
    enabled: bool = Field(description=_D_ENABLED)
    decoder: str | None = Field(description=_D_DECODER)
    created_at: UTCDatetime = Field(description=_D_CREATED)
    username: str | None = Field(default=None, description=_D_USERNAME)


class PhysicalDeviceCreate(BaseModel):
    """A new physical device. Only ``name`` is required.

    ``token`` is generated (``secrets.token_urlsafe(15)``) when absent.
    """

    model_config = ConfigDict(extra="forbid")

    name: _Name = Field(description=_D_NAME)
    source_name: _SourceName = Field(default="http", description=_D_SOURCE_NAME)
    source_ids: _SourceIds = Field(default_factory=dict, description=_D_SOURCE_IDS)
    location: Location | None = Field(default=None, description=_D_LOCATION)
    last_seen: InputDatetime | None = Field(default=None, description=_D_LAST_SEEN)
    properties: dict[str, Any] = Field(default_factory=dict, description=_D_PROPERTIES)
    token: _Token | None = Field(default=None, description=_D_ACCESS + " Generated when absent.")
    enabled: bool = Field(default=True, description=_D_ENABLED)
    decoder: _Decoder | None = Field(default=None, description=_D_DECODER)


class PhysicalDevicePatch(BaseModel):
    """Changes to a physical device: only the fields present are changed.

    ``location``, ``last_seen`` and ``decoder`` may be set to null to clear them; the other
    fields cannot be null. ``properties`` and ``source_ids`` are replaced as a whole.

    Non-nullable fields are typed without ``None`` and default to ``None`` unvalidated:
    read a field only when it is in ``model_fields_set``, where it is always valid.
    """

    model_config = ConfigDict(extra="forbid")

    name: _Name = Field(default=_ABSENT, description=_D_NAME)
    source_name: _SourceName = Field(default=_ABSENT, description=_D_SOURCE_NAME)
    source_ids: _SourceIds = Field(default=_ABSENT, description=_D_SOURCE_IDS)
    location: Location | None = Field(default=None, description=_D_LOCATION)
    last_seen: InputDatetime | None = Field(default=None, description=_D_LAST_SEEN)
    properties: dict[str, Any] = Field(default=_ABSENT, description=_D_PROPERTIES)
    token: _Token = Field(default=_ABSENT, description=_D_ACCESS)
    enabled: bool = Field(default=_ABSENT, description=_D_ENABLED)
    decoder: _Decoder | None = Field(default=None, description=_D_DECODER)


class LogicalDevice(BaseModel):
    """A destination of time series (a tank, a buoy), fed by physical devices over time."""

    model_config = ConfigDict(frozen=True)

    uid: int = Field(description=_D_UID)
    name: str = Field(description=_D_NAME)
    location: Location | None = Field(description=_D_LOCATION)
    last_seen: UTCDatetime | None = Field(description="When a frame mapped to this device last arrived (UTC), or null.")
    properties: dict[str, Any] = Field(description=_D_PROPERTIES)
    created_at: UTCDatetime = Field(description=_D_CREATED)


class LogicalDeviceCreate(BaseModel):
    """A new logical device. Only ``name`` is required."""

    model_config = ConfigDict(extra="forbid")

    name: _Name = Field(description=_D_NAME)
    location: Location | None = Field(default=None, description=_D_LOCATION)
    last_seen: InputDatetime | None = Field(default=None, description=_D_LAST_SEEN)
    properties: dict[str, Any] = Field(default_factory=dict, description=_D_PROPERTIES)


class LogicalDevicePatch(BaseModel):
    """Changes to a logical device: only the fields present are changed.

    ``location`` and ``last_seen`` may be set to null to clear them; ``name`` and
    ``properties`` cannot be null. Read a field only when it is in ``model_fields_set``.
    """

    model_config = ConfigDict(extra="forbid")

    name: _Name = Field(default=_ABSENT, description=_D_NAME)
    location: Location | None = Field(default=None, description=_D_LOCATION)
    last_seen: InputDatetime | None = Field(default=None, description=_D_LAST_SEEN)
    properties: dict[str, Any] = Field(default=_ABSENT, description=_D_PROPERTIES)


class Mapping(BaseModel):
    """A physical device feeding a logical device from ``start_time`` until ``end_time``.

    The mapping covers ``start_time <= t < end_time``; an open mapping (``end_time`` null)
    is the device's current one. While ``paused``, frames are not routed to the logical
    device.
    """

    model_config = ConfigDict(frozen=True)

    id: int = Field(description="Unique id of the mapping.")
    p_uid: int = Field(description="The physical device.")
    l_uid: int = Field(description="The logical device it feeds.")
    start_time: UTCDatetime = Field(description="Start of the mapping, inclusive (UTC).")
    end_time: UTCDatetime | None = Field(
        description="End of the mapping, exclusive (UTC); null while the mapping is open."
    )
    paused: bool = Field(description="True while frames from the physical device are not routed.")


class User(BaseModel):
    """An operator of the management API (the password hash is never exposed)."""

    model_config = ConfigDict(frozen=True)

    username: str = Field(description="Unique login name.")
    read_only: bool = Field(description="Read-only users cannot change anything.")
    enabled: bool = Field(description="Disabled users cannot log in or use their tokens.")
    created_at: UTCDatetime = Field(description=_D_CREATED)
