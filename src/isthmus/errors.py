"""The Isthmus error tree.

Every error Isthmus raises on purpose derives from :class:`IsthmusError`. Library errors
(SQLite, SQLAlchemy, httpx, msgspec) are translated into this tree at the boundary where they
are caught, so callers never need to know which library sits underneath::

    IsthmusError
     ├── ConfigError            a configuration file, environment variable or plugin option is invalid
     ├── InvalidRequest         an API request is well-formed but asks for something impossible
     ├── DecodeError            a payload could not be turned into points (the frame is still journaled)
     │    └── UnsupportedShape  valid JSON, but not a shape the decoder understands
     ├── AuthError              unknown, revoked or disabled credentials
     │    └── Forbidden         valid credentials without the right to do this (read-only user)
     ├── RegistryError          the device/user registry refused an operation
     │    ├── NotFound          no such device, mapping, user, dead letter …
     │    └── Conflict          a uniqueness or state rule would be broken (duplicate token, name …)
     ├── DeviceUnreachable      no connection or session can carry a request to the device
     ├── DeviceTimeout          the device did not answer an RPC request in time
     ├── JournalError           the journal could not durably store or read records
     │    └── JournalClosed     the journal was used after close()
     └── SinkError              a sink could not write a batch
          ├── RetryableSinkError  transient: the runner retries with backoff
          └── PermanentSinkError  the batch can never be written: dead-lettered without retries
"""

from __future__ import annotations


class IsthmusError(Exception):
    """Base of every error Isthmus raises on purpose."""

    code = "error"


class ConfigError(IsthmusError):
    """Invalid configuration. The message names the offending key or file."""

    code = "config_error"


class InvalidRequest(IsthmusError):  # noqa: N818
    """An API request that cannot be served as asked (conflicting or missing parameters)."""

    code = "invalid_request"


class DecodeError(IsthmusError):
    """A payload could not be decoded into points. The message says why, for the device's owner."""

    code = "decode_error"


class UnsupportedShape(DecodeError):  # noqa: N818 - the name reads as the condition it reports
    """The payload is well-formed but not a shape this decoder understands."""

    code = "unsupported_shape"


class AuthError(IsthmusError):
    """Unknown, revoked or disabled credentials."""

    code = "unauthorized"


class Forbidden(AuthError):  # noqa: N818
    """Authenticated, but not allowed to perform this operation."""

    code = "forbidden"


class RegistryError(IsthmusError):
    """The registry refused an operation."""

    code = "registry_error"


class NotFound(RegistryError):  # noqa: N818
    """The named object does not exist."""

    code = "not_found"


class Conflict(RegistryError):  # noqa: N818
    """The operation would break a uniqueness or state rule."""

    code = "conflict"


class DeviceUnreachable(IsthmusError):  # noqa: N818
    """No live connection or persistent session takes requests for the device."""

    code = "device_unreachable"


class DeviceTimeout(IsthmusError):  # noqa: N818
    """The device did not answer in time."""

    code = "device_timeout"


class JournalError(IsthmusError):
    """The journal could not store or read records durably."""

    code = "journal_error"


class JournalClosed(JournalError):  # noqa: N818
    """The journal was used after it was closed."""

    code = "journal_closed"


class SinkError(IsthmusError):
    """A sink could not write a batch."""

    code = "sink_error"


class RetryableSinkError(SinkError):
    """A transient failure (destination down, timeout, 5xx): the runner retries with backoff."""

    code = "sink_retryable"


class PermanentSinkError(SinkError):
    """The batch can never be written as it is (4xx, schema violation): dead-lettered at once."""

    code = "sink_permanent"
