"""The contracts between the parts of Isthmus. Read this file to understand the architecture.

::

    device ─► Source ─► Ingest.submit ─┬─ authenticate (DeviceDirectory)
                                       ├─ decode (Decoder)            pure; errors become records
                                       ├─ map physical → logical (DeviceDirectory.mapping_at)
                                       └─ Journal.append              durable before the device is acked
                                                   │
                       SinkRunner (one per sink, own cursor in the Journal) ─► Sink.write

    operator ─► management API ─► Downlink ─► DeviceLink (a source's session) ─► device
                                  (shared-attribute updates, server-side RPC, online state)

A plugin (source, decoder, sink) imports only :mod:`isthmus.message`, this module,
:mod:`isthmus.errors`, :mod:`isthmus.plugins` and third-party libraries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol, runtime_checkable

from isthmus.message import Kind, Point, RawFrame, Record

# --------------------------------------------------------------------------- decoding


@runtime_checkable
class Decoder(Protocol):
    """Turns a payload into points. A pure function: no I/O, no state between calls.

    Chosen per source / device; called once per frame (and again on replay).
    """

    def decode(self, payload: bytes, kind: Kind) -> list[Point]:
        """Return the points in ``payload``.

        Points without their own timestamp take the message's default timestamp later.
        Raises :class:`~isthmus.errors.DecodeError` (never anything else) with a message meant
        for the device's owner; the frame is journaled with that error either way.
        """
        ...


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """What the hot path knows about an authenticated physical device.

    ``quarantined`` marks a device auto-created under the ``quarantine`` policy and not yet
    enabled by an operator: its frames are journaled as quarantined, never delivered.
    ``gateway``: the device may speak for other devices (ThingsBoard gateway API); set with the
    device property ``"gateway": true``.
    """

    p_uid: int
    name: str
    source_name: str
    decoder: str | None = None
    quarantined: bool = False
    gateway: bool = False


class DeviceDirectory(Protocol):
    """Hot-path device lookups, served from memory and invalidated when the registry changes."""

    def by_token(self, token: str) -> DeviceRef | None:
        """The enabled device with this access token, or ``None`` (unknown or revoked)."""
        ...

    async def by_password(self, username: str, password: str) -> DeviceRef | None:
        """The enabled device with this username + password credential, or ``None``.

        ``None`` for an unknown username, a wrong password or a disabled device; never raises
        for bad input (empty, over-long or odd text is simply not a credential). The password
        check is CPU-heavy (argon2) and runs off the event loop; repeated successful checks are
        answered from memory. Raises :class:`~isthmus.errors.RegistryError` when the registry is
        unavailable (or too busy checking passwords to take another one now): answer "server
        unavailable", not "bad credentials", so the device retries.
        """
        ...

    def mapping_at(self, p_uid: int, at: datetime) -> int | None:
        """The logical device ``p_uid`` fed at time ``at``; ``None`` if unmapped or paused."""
        ...

    def seen(self, p_uid: int, l_uid: int | None, at: datetime) -> None:
        """Record that the device sent a frame at ``at`` (last_seen is flushed in batches)."""
        ...


class DeviceResolver(Protocol):
    """Finds — and, by policy, creates — the physical device behind a source's own ids.

    For sources that name devices themselves (a broker topic ``pebble/{device}/data``, a LoRaWAN
    network server's dev_eui) rather than authenticating them with an access token.
    """

    async def resolve(self, source_name: str, source_ids: dict[str, str | int], policy: str) -> DeviceRef | None:
        """The device with exactly these ``source_ids`` for ``source_name``.

        Unknown devices are auto-created according to ``policy``: ``"accept"`` creates an enabled
        device; ``"quarantine"`` creates a disabled one whose frames are kept but not delivered
        until an operator enables it; ``"reject"`` creates nothing and returns ``None``. A known
        but disabled device returns a quarantined reference. Served from memory after the first
        lookup. Raises :class:`~isthmus.errors.RegistryError` when the registry is unavailable.
        """
        ...


# --------------------------------------------------------------------------- ingest


class Submission(NamedTuple):
    """One frame for :meth:`Ingest.submit_batch` / :meth:`Ingest.submit_nowait`, with the
    ``error`` and ``decoder`` arguments :meth:`Ingest.submit` takes."""

    frame: RawFrame
    device: DeviceRef
    decoder: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What became of one submitted frame, once it is durably journaled."""

    seq: int
    record: Record


class Ingest(Protocol):
    """The one door into Isthmus. Sources call it; it never raises for a device's mistake."""

    async def submit(
        self,
        frame: RawFrame,
        device: DeviceRef,
        *,
        wait: bool = True,
        error: str | None = None,
        decoder: str | None = None,
    ) -> IngestResult | None:
        """Decode, map and journal ``frame`` sent by ``device``.

        ``error``: the source already knows the frame is unusable (wrong content type …); it is
        journaled with that error, undecoded. ``decoder``: the decoder the source's configuration
        names for this frame (a topic pattern's); a decoder set on the device itself wins.

        With ``wait=True`` returns once the record is durable (the source may now acknowledge
        the device); the result tells whether decoding failed or the message was quarantined.
        With ``wait=False`` (QoS 0, fire-and-forget) returns ``None`` as soon as the record is
        queued (at once, unless the journal is far behind: then it waits until there is room, so
        that a flood slows its senders instead of filling memory); the record is journaled in the
        next group commit. Raises :class:`~isthmus.errors.JournalError` only
        when the journal cannot store anything (disk full, closed): the device must not be acked.

        Order: submits started in sequence from one task — awaited one by one, or started with
        ``asyncio.create_task`` one after another without awaiting in between — are journaled in
        that order, so a source may keep many submits of one connection in flight (and share a
        group commit) and still acknowledge in order.
        """
        ...

    async def submit_batch(self, items: Sequence[Submission]) -> list[IngestResult]:
        """:meth:`submit` each of ``items``, durably, in one journal append; the results in the
        same order. Cheaper per frame for a source that received many acknowledged frames at once;
        the same order promise and errors as :meth:`submit`.
        """
        ...

    async def submit_nowait(self, items: Sequence[Submission]) -> None:
        """``submit(..., wait=False)`` each of ``items``, in order, queued for the journal in one
        step: cheaper per frame for a source that received many fire-and-forget (QoS 0) frames at
        once. Waits only for room, like ``submit(wait=False)``; keeps the same order promise.
        """
        ...


class Source(Protocol):
    """A way frames arrive (MQTT server, HTTP device API, broker subscription, poller …)."""

    async def run(self, ingest: Ingest) -> None:
        """Accept frames and hand them to ``ingest`` until cancelled.

        Must acknowledge a device only after ``ingest.submit(..., wait=True)`` returned. On
        cancellation, stop accepting, finish or abandon (unacknowledged) in-flight frames, and
        release every socket before returning.
        """
        ...


# --------------------------------------------------------------------------- downlink


class DeviceLink(Protocol):
    """One way to reach devices back: a source's session (an MQTT connection, or the persistent
    session it leaves behind; a gateway connection carrying many devices).

    Calls come from the event loop and must not block: a link queues what it cannot send at once.
    """

    @property
    def connected(self) -> bool:
        """True while the device is connected through this link (a persistent session that
        outlives its connection stays attached but is not connected)."""
        ...

    def push_attributes(self, p_uid: int, values: Mapping[str, Any]) -> bool:
        """Send device ``p_uid`` its changed shared attributes (queued while disconnected).

        ``False`` when the device has not subscribed to attribute updates on this link.
        """
        ...

    def send_rpc(self, p_uid: int, request_id: int, method: str, params: Any) -> bool:
        """Send device ``p_uid`` a server-side RPC request (queued while disconnected).

        ``False`` when the device does not take RPC requests on this link (not subscribed) or
        the link's queue is full. The response, if any, comes back through
        :meth:`Downlink.rpc_response`.
        """
        ...


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A physical device's connection state as the sources see it."""

    online: bool
    since: datetime | None = None
    """When the device last came online or went offline (``None``: not since start-up)."""
    links: int = 0
    """Live links (connections and persistent sessions) that can reach the device."""


class Downlink(Protocol):
    """The instance's registry of device links: online state, attribute pushes and RPC.

    Sources attach a link when a device connects (or a gateway announces it) and detach it when
    the connection and any session it leaves behind are gone.
    """

    def attach(self, p_uid: int, link: DeviceLink) -> None:
        """Device ``p_uid`` is reachable through ``link`` (idempotent)."""
        ...

    def detach(self, p_uid: int, link: DeviceLink) -> None:
        """Device ``p_uid`` is no longer reachable through ``link`` (idempotent)."""
        ...

    def changed(self, p_uid: int) -> None:
        """A link of ``p_uid`` connected or disconnected without attaching or detaching
        (a persistent session resumed or was left behind): re-evaluate the online state."""
        ...

    def state(self, p_uid: int) -> DeviceState:
        """Whether ``p_uid`` is online (connected through at least one link) and since when."""
        ...

    def push_attributes(self, p_uid: int, values: Mapping[str, Any]) -> int:
        """Push changed shared attributes to every link of ``p_uid``; how many took them."""
        ...

    async def rpc(self, p_uid: int, method: str, params: Any, *, within: float, oneway: bool = False) -> Any:
        """Call ``method`` on device ``p_uid`` and return its response (``None`` when ``oneway``).

        Raises :class:`~isthmus.errors.DeviceUnreachable` when no link takes RPC for the device,
        :class:`~isthmus.errors.DeviceTimeout` when no response came ``within`` seconds.
        """
        ...

    def rpc_response(self, p_uid: int, request_id: int, response: Any) -> bool:
        """A device answered request ``request_id``; ``False`` if nobody waits for it (late, unknown)."""
        ...

    async def client_rpc(self, p_uid: int, method: str, params: Any) -> Any:
        """Answer an RPC request a device sent to the server (client-side RPC)."""
        ...


class AttributeReader(Protocol):
    """Read access to the devices' latest attributes."""

    async def get(self, p_uid: int, scope: str, keys: list[str] | None) -> dict[str, Any]:
        """The device's attributes in ``scope`` (``client`` or ``shared``), optionally only ``keys``."""
        ...

    async def request(
        self, p_uid: int, client_keys: list[str] | None, shared_keys: list[str] | None
    ) -> dict[str, dict[str, Any]]:
        """A device's attribute request (ThingsBoard): ``{"client": {…}, "shared": {…}}`` with the
        scopes whose keys are given, or both scopes in full when neither is."""
        ...


# --------------------------------------------------------------------------- journal


@dataclass(slots=True)
class Cursor:
    """A consumer's position in the journal and the books it has kept so far.

    ``seq`` is the last sequence number fully handled (delivered, dead-lettered or skipped).
    """

    consumer: str
    seq: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record a sink gave up on, with why (the AWS IoT error-action shape)."""

    id: int
    sink: str
    seq: int
    correlation_id: str
    stage: str
    reason: str
    attempts: int
    created_at: datetime
    payload: bytes
    message: bytes | None = None
    redriven: bool = False


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """Filter for :meth:`Journal.query` (all fields optional, combined with AND)."""

    p_uid: int | None = None
    l_uid: int | None = None
    status: str | None = None
    correlation_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int = 0
    limit: int = 100
    newest_first: bool = True
    unmapped: bool = False


class Journal(Protocol):
    """The durable, append-only log of records, and the cursors that read it."""

    async def append(self, records: Sequence[Record]) -> list[int]:
        """Store ``records``; return their sequence numbers once they are durable.

        Concurrent calls are group-committed (many records, one commit). Raises
        :class:`~isthmus.errors.JournalError` if they could not be stored; then none of them is.
        """
        ...

    def append_nowait(self, records: Sequence[Record]) -> asyncio.Future[list[int]]:
        """Queue ``records`` for the next group commit without waiting (fire-and-forget, QoS 0).

        The future resolves like :meth:`append`; callers may ignore it. Records appended this
        way from one task keep their order with that task's other appends.
        """
        ...

    async def wait_for_room(self) -> None:
        """Return once the journal can take more fire-and-forget records (at once, normally).

        Bounds what :meth:`append_nowait` may queue: callers wait here first, so that a flood
        slows its senders instead of filling memory.
        """
        ...

    async def read(self, after: int, limit: int, *, wait: float = 0.0) -> list[Record]:
        """Up to ``limit`` records with ``seq > after`` in order.

        If there are none and ``wait > 0``, wait up to ``wait`` seconds for an append.
        """
        ...

    async def read_selected(
        self,
        after: int,
        limit: int,
        *,
        kinds: frozenset[str],
        mapped_only: bool,
        max_bytes: int | None = None,
        wait: float = 0.0,
    ) -> tuple[list[Record], int, int]:
        """What a sink takes after ``after``: ``(selected, last_seq, skipped)``.

        ``selected``: records with status ``ok`` and a message, of one of ``kinds`` (and mapped to a
        logical device when ``mapped_only``), in order; at most ``limit`` of them and at most
        ``max_bytes`` of payload (but at least one). The range examined is ``(after, last_seq]``
        (``last_seq == after``: nothing new); ``skipped`` counts its other records, which the
        journal filters out without fetching or decoding them. Records deleted by retention
        before the read count as neither. Waits like :meth:`read`.
        """
        ...

    async def query(self, q: RecordQuery) -> list[Record]:
        """Records matching ``q`` (for the management API; not the hot path)."""
        ...


class CursorStore(Protocol):
    """Committed consumer positions (Kafka consumer-group semantics)."""

    async def load_cursor(self, consumer: str) -> Cursor:
        """The committed cursor of ``consumer``, or a new one at the journal's start."""
        ...

    async def commit_cursor(
        self, cursor: Cursor, dead_letters: Sequence[DeadLetter] = (), redriven: Sequence[int] = ()
    ) -> None:
        """Durably store ``cursor`` with the dead letters that moved it, in one commit.

        ``redriven`` names dead letters (by id) that a redrive has now delivered; they are marked so,
        in the same commit that moves their count from dead-lettered to delivered.
        """
        ...


# --------------------------------------------------------------------------- sinks


@dataclass(frozen=True, slots=True)
class WriteResult:
    """The outcome of a partly successful :meth:`Sink.write`.

    ``rejected`` maps an index into the batch to the reason that record can never be written;
    those are dead-lettered, the rest count as delivered.
    """

    rejected: dict[int, str] = field(default_factory=dict)


class Sink(Protocol):
    """A destination. Wrapped by a runner that owns batching, retry, dead letters and health."""

    async def open(self) -> None:
        """Connect / create tables. Called once before the first write; may raise SinkError."""
        ...

    async def write(self, batch: Sequence[Record]) -> WriteResult | None:
        """Write deliverable records (``record.deliverable`` is true for each).

        Writes are idempotent, keyed by (logical device, point name, timestamp), so a batch
        written twice (after a crash, or by a replay) overwrites instead of duplicating.
        Raise :class:`~isthmus.errors.RetryableSinkError` for transient failures (the runner
        retries the same batch), :class:`~isthmus.errors.PermanentSinkError` when the whole
        batch can never be written, or return a :class:`WriteResult` naming rejected records.
        Any other exception is treated as retryable.
        """
        ...

    async def close(self) -> None:
        """Release connections. No call follows."""
        ...


@dataclass(frozen=True, slots=True)
class StoredPoint:
    """One point as a timeseries store returns it."""

    l_uid: int
    name: str
    timestamp: datetime
    value: object
    correlation_id: str


class TimeseriesReader(Protocol):
    """Implemented by sinks that can answer queries (the management API's ``/timeseries``)."""

    async def query(
        self,
        l_uid: int,
        name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[StoredPoint]:
        """Points of logical device ``l_uid`` (optionally one name) in ``[since, until)``, oldest first."""
        ...
